package selector

import (
	"net/netip"
	"strings"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
)

func TestInternalDestinations(t *testing.T) {
	cluster := []ClusterNetwork{
		{netip.MustParsePrefix("10.244.0.0/16"), "pod CIDR"},
		{netip.MustParsePrefix("10.96.0.0/12"), "Service CIDR"},
		{netip.MustParsePrefix("192.0.2.11/32"), "InternalIP of node n1"},
	}
	dests := func(cidrs ...string) []v1.EgressDestination {
		var out []v1.EgressDestination
		for _, c := range cidrs {
			out = append(out, v1.EgressDestination{CIDR: c})
		}
		return out
	}
	for _, tc := range []struct {
		dests []v1.EgressDestination
		want  []string // substrings; none: ""
	}{
		{dests("203.0.113.0/24", "198.51.100.0/24"), nil},
		{dests("0.0.0.0/0"), []string{"0.0.0.0/0 overlaps 10.244.0.0/16 (pod CIDR)", "10.96.0.0/12 (Service CIDR)", "192.0.2.11/32 (InternalIP of node n1)"}},
		{dests("10.244.3.0/24"), []string{"10.244.3.0/24 overlaps 10.244.0.0/16 (pod CIDR)"}},
		{dests("192.0.2.0/24", "bad"), []string{"192.0.2.0/24 overlaps 192.0.2.11/32"}},
		{dests("10.97.0.1/32"), []string{"Service CIDR", "never steered"}},
	} {
		got := InternalDestinations(tc.dests, cluster)
		if len(tc.want) == 0 && got != "" {
			t.Errorf("%v: %q, want none", tc.dests, got)
		}
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%v: %q lacks %q", tc.dests, got, w)
			}
		}
	}
}
