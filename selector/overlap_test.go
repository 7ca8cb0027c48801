package selector

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestWinner(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	// pol: a policy created minutes after t0 with destinations cidrs.
	pol := func(name string, minutes int, cidrs ...string) *v1.EgressNATPolicy {
		p := selPolicy(name, "gw", nil, cidrs...)
		p.CreationTimestamp = metav1.NewTime(t0.Add(time.Duration(minutes) * time.Minute))
		return p
	}
	dst := netip.MustParseAddr("203.0.113.10")
	cases := []struct {
		name       string
		policies   []*v1.EgressNATPolicy
		dst        netip.Addr
		want       string // winner's name, "" for none
		wantPrefix string
		wantBy     WonBy
	}{
		{name: "no policy", dst: dst},
		{
			name:     "none covers",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "198.51.100.0/24"), pol("b", 0, "203.0.113.128/25")},
			dst:      dst,
		},
		{
			name:     "one covers",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "198.51.100.0/24"), pol("b", 5, "203.0.113.0/24")},
			dst:      dst, want: "b", wantPrefix: "203.0.113.0/24", wantBy: WonAlone,
		},
		{
			name:     "longest prefix wins over age and name",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "203.0.113.0/24"), pol("z", 9, "203.0.113.0/25"), pol("m", 3, "0.0.0.0/0")},
			dst:      dst, want: "z", wantPrefix: "203.0.113.0/25", wantBy: WonByPrefix,
		},
		{
			name:     "a policy counts with its longest covering destination, not its first",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "203.0.113.0/25"), pol("b", 5, "10.0.0.0/8", "203.0.113.0/24", "203.0.113.8/29")},
			dst:      dst, want: "b", wantPrefix: "203.0.113.8/29", wantBy: WonByPrefix,
		},
		{
			name:     "host bits of a destination are cleared",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "203.0.113.0/24"), pol("b", 5, "203.0.113.7/28")},
			dst:      dst, want: "b", wantPrefix: "203.0.113.0/28", wantBy: WonByPrefix,
		},
		{
			name:     "same prefix: the oldest wins over the name",
			policies: []*v1.EgressNATPolicy{pol("a", 7, "203.0.113.0/24"), pol("b", 2, "203.0.113.0/24"), pol("c", 4, "203.0.113.0/24")},
			dst:      dst, want: "b", wantPrefix: "203.0.113.0/24", wantBy: WonByAge,
		},
		{
			name:     "same prefix and age: the first name",
			policies: []*v1.EgressNATPolicy{pol("b", 2, "203.0.113.0/24"), pol("a", 2, "203.0.113.0/24"), pol("c", 9, "203.0.113.0/24")},
			dst:      dst, want: "a", wantPrefix: "203.0.113.0/24", wantBy: WonByName,
		},
		{
			name:     "no creation time counts as oldest",
			policies: []*v1.EgressNATPolicy{pol("a", 2, "203.0.113.0/24"), selPolicy("b", "gw", nil, "203.0.113.0/24")},
			dst:      dst, want: "b", wantPrefix: "203.0.113.0/24", wantBy: WonByAge,
		},
		{
			name:     "an unparsable destination covers nothing; the others of its policy do",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "203.0.113.0/33", "203.0.113.0/26"), pol("b", 1, "203.0.113.0/25", "bogus")},
			dst:      dst, want: "a", wantPrefix: "203.0.113.0/26", wantBy: WonByPrefix,
		},
		{
			name:     "IPv4-mapped destination address",
			policies: []*v1.EgressNATPolicy{pol("a", 0, "203.0.113.0/24")},
			dst:      netip.AddrFrom16(dst.As16()), want: "a", wantPrefix: "203.0.113.0/24", wantBy: WonAlone,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			check := func(ps []*v1.EgressNATPolicy) {
				t.Helper()
				w := Winner(ps, tc.dst)
				name := ""
				if w.Index >= 0 {
					name = ps[w.Index].Name
				}
				if tc.want == "" {
					if w.Index != -1 {
						t.Fatalf("winner %s (%+v), want none", name, w)
					}
					return
				}
				if name != tc.want || w.Prefix != netip.MustParsePrefix(tc.wantPrefix) || w.By != tc.wantBy {
					t.Fatalf("winner %s %+v, want %s %s by %s", name, w, tc.want, tc.wantPrefix, tc.wantBy)
				}
			}
			check(tc.policies)
			// The order of the policies does not matter.
			r := rand.New(rand.NewPCG(1, 2))
			for range 5 {
				sh := slices.Clone(tc.policies)
				r.Shuffle(len(sh), func(i, j int) { sh[i], sh[j] = sh[j], sh[i] })
				check(sh)
			}
		})
	}
}

func TestCoveringDestination(t *testing.T) {
	dests := func(cidrs ...string) []v1.EgressDestination {
		var out []v1.EgressDestination
		for _, c := range cidrs {
			out = append(out, v1.EgressDestination{CIDR: c})
		}
		return out
	}
	for _, tc := range []struct {
		dests []v1.EgressDestination
		dst   string
		want  int
	}{
		{nil, "203.0.113.10", -1},
		{dests("198.51.100.0/24"), "203.0.113.10", -1},
		{dests("203.0.113.0/24", "203.0.113.0/28"), "203.0.113.10", 1},
		{dests("203.0.113.0/28", "203.0.113.0/24"), "203.0.113.10", 0},
		{dests("203.0.113.0/24", " 203.0.113.0/24 "), "203.0.113.10", 0},
		{dests("0.0.0.0/0"), "203.0.113.10", 0},
		{dests("2001:db8::/32", "::ffff:203.0.113.0/120"), "203.0.113.10", 1},
	} {
		if got := CoveringDestination(tc.dests, netip.MustParseAddr(tc.dst)); got != tc.want {
			t.Errorf("CoveringDestination(%v, %s) = %d, want %d", tc.dests, tc.dst, got, tc.want)
		}
	}
}
