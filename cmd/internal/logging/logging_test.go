package logging

import (
	"flag"
	"testing"
)

func TestFlags(t *testing.T) {
	cases := []struct {
		args    []string
		wantErr bool
	}{
		{nil, false},
		{[]string{"--log-format=console", "--log-level=debug"}, false},
		{[]string{"--log-format=xml"}, true},
		{[]string{"--log-level=loud"}, true},
	}
	for _, tc := range cases {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		o := AddFlags(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		l, err := New(o)
		if (err != nil) != tc.wantErr {
			t.Fatalf("%v: err = %v, wantErr %v", tc.args, err, tc.wantErr)
		}
		if err == nil && l == nil {
			t.Fatalf("%v: nil logger", tc.args)
		}
	}
}
