package logging

import (
	"errors"
	"flag"
	"fmt"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"k8s.io/klog/v2"
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

// TestRouteKlog: klog's structured and formatted calls end up in the zap
// logger with their keys as fields; klog.V(n) stays gated by klog's -v.
func TestRouteKlog(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	RouteKlog(zap.New(core))
	t.Cleanup(klog.ClearLogger)

	klog.InfoS("Caches populated", "type", "*v1.Pod", "reflector", "informers.go:1")
	klog.ErrorS(errors.New("connection refused"), "Failed to watch", "resource", "pods")
	klog.Infof("successfully acquired lease %s", "egressnat-system/egressnat-operator")
	klog.V(4).InfoS("verbose", "k", "v")
	klog.Flush()

	entries := logs.AllUntimed()
	if len(entries) != 3 {
		t.Fatalf("got %d entries, want 3: %+v", len(entries), entries)
	}
	for i, want := range []struct {
		level  zapcore.Level
		msg    string
		fields map[string]any
	}{
		{zapcore.InfoLevel, "Caches populated", map[string]any{"type": "*v1.Pod", "reflector": "informers.go:1"}},
		{zapcore.ErrorLevel, "Failed to watch", map[string]any{"resource": "pods", "error": "connection refused"}},
		{zapcore.InfoLevel, "successfully acquired lease egressnat-system/egressnat-operator", map[string]any{}},
	} {
		e := entries[i]
		if e.Level != want.level || e.Message != want.msg || e.LoggerName != KlogName {
			t.Errorf("entry %d: %s %q logger %q, want %s %q logger %q", i, e.Level, e.Message, e.LoggerName, want.level, want.msg, KlogName)
		}
		got := e.ContextMap()
		for k, v := range want.fields {
			if fmt.Sprint(got[k]) != fmt.Sprint(v) {
				t.Errorf("entry %d (%s): field %s = %v, want %v (fields %v)", i, e.Message, k, got[k], v, got)
			}
		}
	}
}
