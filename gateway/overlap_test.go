package gateway

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

var overlapEpoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// pol is a policy created age minutes after the epoch, selecting with
// sources (all pods when none), to dests.
func pol(name string, age int, sources []v1.EgressSource, dests ...string) *v1.EgressNATPolicy {
	if sources == nil {
		sources = []v1.EgressSource{{}}
	}
	p := &v1.EgressNATPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(overlapEpoch.Add(time.Duration(age) * time.Minute))},
		Spec: v1.EgressNATPolicySpec{Sources: sources, Action: v1.ActionSNAT,
			GatewayRef: v1.GatewayRef{Namespace: "kube-system", Name: "gw"}},
	}
	for _, d := range dests {
		p.Spec.Destinations = append(p.Spec.Destinations, v1.EgressDestination{CIDR: d})
	}
	return p
}

func sel(labels map[string]string, exprs ...v1.LabelSelectorRequirement) v1.LabelSelector {
	s := v1.LabelSelector{MatchExpressions: exprs}
	if len(labels) > 0 {
		s.MatchLabels = map[string]v1.LabelValue{}
		for k, v := range labels {
			s.MatchLabels[k] = v1.LabelValue(v)
		}
	}
	return s
}

func req(key string, op v1.LabelSelectorOperator, values ...string) v1.LabelSelectorRequirement {
	r := v1.LabelSelectorRequirement{Key: key, Operator: op}
	for _, v := range values {
		r.Values = append(r.Values, v1.LabelValue(v))
	}
	return r
}

func src(ns, pod v1.LabelSelector) v1.EgressSource {
	return v1.EgressSource{NamespaceSelector: ns, PodSelector: pod}
}

func srcs(s ...v1.EgressSource) []v1.EgressSource { return s }

// ov renders overlaps as "policy: other on prefix (winner by)" lines.
func ov(m map[string][]PolicyOverlap) []string {
	var out []string
	for name, os := range m {
		for _, o := range os {
			out = append(out, fmt.Sprintf("%s: %s on %s (%s %s)", name, o.Policy, o.On, o.Winner, o.By))
		}
	}
	slices.Sort(out)
	return out
}

func TestOverlaps(t *testing.T) {
	all := v1.LabelSelector{}
	teamA, teamB := sel(map[string]string{"team": "a"}), sel(map[string]string{"team": "b"})
	cases := []struct {
		name     string
		policies []*v1.EgressNATPolicy
		want     []string
	}{
		{
			name:     "same destination, all pods: both overlap, the older wins",
			policies: []*v1.EgressNATPolicy{pol("b", 1, nil, "203.0.113.0/24"), pol("a", 2, nil, "203.0.113.0/24")},
			want:     []string{"a: b on 203.0.113.0/24 (b oldest)", "b: a on 203.0.113.0/24 (b oldest)"},
		},
		{
			name:     "same destination and age: the name wins",
			policies: []*v1.EgressNATPolicy{pol("b", 1, nil, "203.0.113.0/24"), pol("a", 1, nil, "203.0.113.0/24")},
			want:     []string{"a: b on 203.0.113.0/24 (a name)", "b: a on 203.0.113.0/24 (a name)"},
		},
		{
			name:     "nested destinations: the longer prefix wins, on the inner one",
			policies: []*v1.EgressNATPolicy{pol("wide", 0, nil, "203.0.0.0/16"), pol("narrow", 5, nil, "203.0.113.0/24")},
			want:     []string{"narrow: wide on 203.0.113.0/24 (narrow longest prefix)", "wide: narrow on 203.0.113.0/24 (narrow longest prefix)"},
		},
		{
			name:     "disjoint and adjacent destinations do not overlap",
			policies: []*v1.EgressNATPolicy{pol("a", 0, nil, "203.0.113.0/25", "198.51.100.0/24"), pol("b", 0, nil, "203.0.113.128/25", "192.0.2.0/24")},
		},
		{
			name: "the first overlap is the lowest address; a policy's own destinations do not count",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, nil, "198.51.100.0/24", "10.0.0.0/24", "10.0.0.0/25"),
				pol("b", 1, nil, "198.51.100.0/25", "10.0.0.128/25"),
			},
			want: []string{"a: b on 10.0.0.128/25 (b longest prefix)", "b: a on 10.0.0.128/25 (b longest prefix)"},
		},
		{
			name: "three nested policies: every pair",
			policies: []*v1.EgressNATPolicy{
				pol("p0", 0, nil, "0.0.0.0/0"), pol("p8", 1, nil, "10.0.0.0/8"), pol("p16", 2, nil, "10.1.0.0/16"),
			},
			want: []string{
				"p0: p16 on 10.1.0.0/16 (p16 longest prefix)", "p0: p8 on 10.0.0.0/8 (p8 longest prefix)",
				"p16: p0 on 10.1.0.0/16 (p16 longest prefix)", "p16: p8 on 10.1.0.0/16 (p16 longest prefix)",
				"p8: p0 on 10.0.0.0/8 (p8 longest prefix)", "p8: p16 on 10.1.0.0/16 (p16 longest prefix)",
			},
		},
		{
			name: "the winner is decided by each policy's longest destination there",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, nil, "10.0.0.0/8", "10.0.0.0/30"), pol("b", 1, nil, "10.0.0.0/16"),
			},
			// At 10.0.0.0 a covers with /30, b with /16: a wins.
			want: []string{"a: b on 10.0.0.0/16 (a longest prefix)", "b: a on 10.0.0.0/16 (a longest prefix)"},
		},
		{
			name: "namespace selectors that exclude each other: no overlap",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(teamA, all)), "203.0.113.0/24"), pol("b", 1, srcs(src(teamB, all)), "203.0.113.0/24"),
			},
		},
		{
			name: "pod selectors that exclude each other (In and NotIn): no overlap",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(all, sel(nil, req("role", "In", "fe")))), "203.0.113.0/24"),
				pol("b", 1, srcs(src(all, sel(nil, req("role", "NotIn", "fe", "be")))), "203.0.113.0/24"),
			},
		},
		{
			name: "Exists against DoesNotExist: no overlap",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(sel(nil, req("env", "Exists")), all)), "203.0.113.0/24"),
				pol("b", 1, srcs(src(sel(nil, req("env", "DoesNotExist")), all)), "203.0.113.0/24"),
			},
		},
		{
			name: "matchLabels against DoesNotExist: no overlap",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(all, sel(map[string]string{"role": "fe"}))), "203.0.113.0/24"),
				pol("b", 1, srcs(src(all, sel(nil, req("role", "DoesNotExist")))), "203.0.113.0/24"),
			},
		},
		{
			name: "In sets sharing a value: overlap",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(sel(nil, req("team", "In", "a", "b")), all)), "203.0.113.0/24"),
				pol("b", 1, srcs(src(sel(nil, req("team", "In", "b", "c")), all)), "203.0.113.0/24"),
			},
			want: []string{"a: b on 203.0.113.0/24 (a oldest)", "b: a on 203.0.113.0/24 (a oldest)"},
		},
		{
			name: "NotIn and DoesNotExist can both hold; different keys can both hold",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(sel(nil, req("team", "NotIn", "a")), sel(map[string]string{"x": "1"}))), "203.0.113.0/24"),
				pol("b", 1, srcs(src(sel(nil, req("team", "DoesNotExist")), sel(map[string]string{"y": "2"}))), "203.0.113.0/24"),
			},
			want: []string{"a: b on 203.0.113.0/24 (a oldest)", "b: a on 203.0.113.0/24 (a oldest)"},
		},
		{
			name: "one compatible source is enough",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(teamA, all), src(teamB, all)), "203.0.113.0/24"),
				pol("b", 1, srcs(src(teamB, sel(map[string]string{"app": "x"}))), "203.0.113.0/24"),
			},
			want: []string{"a: b on 203.0.113.0/24 (a oldest)", "b: a on 203.0.113.0/24 (a oldest)"},
		},
		{
			name: "a selector that matches nothing by itself overlaps nothing",
			policies: []*v1.EgressNATPolicy{
				pol("a", 0, srcs(src(sel(map[string]string{"team": "a"}, req("team", "In", "b")), all)), "203.0.113.0/24"),
				pol("b", 1, nil, "203.0.113.0/24"),
			},
		},
		{
			name: "a policy the agents refuse is skipped; a repeated name counts once",
			policies: []*v1.EgressNATPolicy{
				pol("bad", 0, nil, "not-a-cidr"), pol("badsel", 0, srcs(src(sel(nil, req("x", "Bogus")), all)), "203.0.113.0/24"),
				pol("a", 1, nil, "203.0.113.0/24"), pol("a", 2, nil, "203.0.113.0/24"), nil,
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := ov(Overlaps(tc.policies))
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Overlaps:\n got %q\nwant %q", got, tc.want)
			}
			rev := slices.Clone(tc.policies)
			slices.Reverse(rev)
			if strings.Contains(tc.name, "repeated name") {
				return // which copy counts depends on the order
			}
			if again := ov(Overlaps(rev)); !slices.Equal(again, got) {
				t.Fatalf("Overlaps with reversed policies:\n got %q\nwant %q", again, got)
			}
		})
	}
}

func TestOverlapMessage(t *testing.T) {
	one := []PolicyOverlap{{Policy: "b", On: netip.MustParsePrefix("203.0.113.0/25"), Winner: "b", By: selector.WonByPrefix}}
	if got, want := OverlapMessage(one), "its destinations overlap those of 1 other policy that can select the same pods: b on 203.0.113.0/25 (b wins there: longest prefix)"; got != want {
		t.Errorf("OverlapMessage:\n got %q\nwant %q", got, want)
	}
	var many []PolicyOverlap
	for i := range MaxOverlapsListed + 3 {
		many = append(many, PolicyOverlap{Policy: fmt.Sprintf("p%02d", i), On: netip.MustParsePrefix("203.0.113.0/24"), Winner: "a", By: selector.WonByAge})
	}
	msg := OverlapMessage(many)
	if !strings.HasPrefix(msg, "its destinations overlap those of 13 other policies that can select the same pods: p00 on 203.0.113.0/24 (a wins there: oldest); p01") ||
		!strings.HasSuffix(msg, "p09 on 203.0.113.0/24 (a wins there: oldest); and 3 more") || strings.Contains(msg, "p10") {
		t.Errorf("OverlapMessage with %d overlaps: %q", len(many), msg)
	}
}

// naiveOverlaps is the rule written plainly: every pair of policies, every
// pair of destinations, and selectors tried against every label set of a
// small universe that covers the test's selectors.
func naiveOverlaps(policies []*v1.EgressNATPolicy, universe []labels.Set) map[string][]PolicyOverlap {
	out := map[string][]PolicyOverlap{}
	matchBoth := func(a, b v1.LabelSelector) bool {
		sa, _ := a.AsSelector()
		sb, _ := b.AsSelector()
		for _, l := range universe {
			if sa.Matches(l) && sb.Matches(l) {
				return true
			}
		}
		return false
	}
	for i, p := range policies {
		for j, q := range policies {
			if i == j {
				continue
			}
			var on netip.Prefix
			for _, dp := range p.Spec.Destinations {
				for _, dq := range q.Spec.Destinations {
					a, b := netip.MustParsePrefix(dp.CIDR), netip.MustParsePrefix(dq.CIDR)
					if !a.Overlaps(b) {
						continue
					}
					inner := a
					if b.Bits() > a.Bits() {
						inner = b
					}
					if !on.IsValid() || cmp.Or(inner.Addr().Compare(on.Addr()), cmp.Compare(inner.Bits(), on.Bits())) < 0 {
						on = inner
					}
				}
			}
			if !on.IsValid() {
				continue
			}
			share := false
			for _, s := range p.Spec.Sources {
				for _, r := range q.Spec.Sources {
					share = share || matchBoth(s.NamespaceSelector, r.NamespaceSelector) && matchBoth(s.PodSelector, r.PodSelector)
				}
			}
			if !share {
				continue
			}
			pair := []*v1.EgressNATPolicy{p, q}
			w := selector.Winner(pair, on.Addr())
			out[p.Name] = append(out[p.Name], PolicyOverlap{Policy: q.Name, On: on, Winner: pair[w.Index].Name, By: w.By})
		}
	}
	for _, o := range out {
		slices.SortFunc(o, func(x, y PolicyOverlap) int { return cmp.Compare(x.Policy, y.Policy) })
	}
	return out
}

func TestOverlapsMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	// Labels k1, k2 with values x, y; z stands for any other value.
	var universe []labels.Set
	for _, v1 := range []string{"", "x", "y", "z"} {
		for _, v2 := range []string{"", "x", "y", "z"} {
			l := labels.Set{}
			if v1 != "" {
				l["k1"] = v1
			}
			if v2 != "" {
				l["k2"] = v2
			}
			universe = append(universe, l)
		}
	}
	randSel := func() v1.LabelSelector {
		var s v1.LabelSelector
		for range r.IntN(3) {
			key := []string{"k1", "k2"}[r.IntN(2)]
			switch r.IntN(5) {
			case 0:
				if s.MatchLabels == nil {
					s.MatchLabels = map[string]v1.LabelValue{}
				}
				s.MatchLabels[key] = v1.LabelValue([]string{"x", "y"}[r.IntN(2)])
			case 1:
				s.MatchExpressions = append(s.MatchExpressions, req(key, "In", []string{"x", "y"}[:1+r.IntN(2)]...))
			case 2:
				s.MatchExpressions = append(s.MatchExpressions, req(key, "NotIn", []string{"y", "x"}[:1+r.IntN(2)]...))
			case 3:
				s.MatchExpressions = append(s.MatchExpressions, req(key, "Exists"))
			case 4:
				s.MatchExpressions = append(s.MatchExpressions, req(key, "DoesNotExist"))
			}
		}
		return s
	}
	pool := []string{"0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/16", "10.0.1.0/24", "10.0.0.0/24", "10.0.0.128/25", "10.0.0.0/25", "192.0.2.0/24", "192.0.2.7/32"}
	for iter := range 400 {
		var pols []*v1.EgressNATPolicy
		for k := range 2 + r.IntN(6) {
			var ss []v1.EgressSource
			for range 1 + r.IntN(2) {
				ss = append(ss, src(randSel(), randSel()))
			}
			var dests []string
			for range 1 + r.IntN(3) {
				dests = append(dests, pool[r.IntN(len(pool))])
			}
			pols = append(pols, pol(fmt.Sprintf("p%d", k), r.IntN(3), ss, dests...))
		}
		got, want := Overlaps(pols), naiveOverlaps(pols, universe)
		if len(want) == 0 {
			want = map[string][]PolicyOverlap{}
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("iteration %d:\n got %v\nwant %v", iter, ov(got), ov(want))
		}
	}
}

func BenchmarkOverlaps(b *testing.B) {
	for _, bc := range []struct {
		name  string
		build func(i int) *v1.EgressNATPolicy
	}{
		// 1,000 policies, each with 4 destinations of its own and one /24
		// shared with 9 others, in its own namespace.
		{"policies=1000/typical", func(i int) *v1.EgressNATPolicy {
			ns := sel(map[string]string{"kubernetes.io/metadata.name": fmt.Sprintf("ns-%d", i)})
			var dests []string
			for d := range 4 {
				dests = append(dests, fmt.Sprintf("10.%d.%d.0/24", i/50, (i%50)*5+d))
			}
			dests = append(dests, fmt.Sprintf("198.51.%d.0/24", i/10))
			return pol(fmt.Sprintf("p%04d", i), i, srcs(src(ns, v1.LabelSelector{})), dests...)
		}},
		// The worst case: 1,000 policies selecting every pod to 0.0.0.0/0.
		{"policies=1000/all-overlap", func(i int) *v1.EgressNATPolicy {
			return pol(fmt.Sprintf("p%04d", i), i, nil, "0.0.0.0/0")
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var pols []*v1.EgressNATPolicy
			for i := range 1000 {
				pols = append(pols, bc.build(i))
			}
			b.ReportAllocs()
			for b.Loop() {
				Overlaps(pols)
			}
		})
	}
}
