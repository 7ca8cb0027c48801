package gateway

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
)

// PolicyOverlap is another policy that one policy overlaps.
type PolicyOverlap struct {
	// Policy is the other policy's name.
	Policy string
	// On is where the two overlap first (the lowest address, then the
	// shortest prefix): of two overlapping destinations, one of each, the
	// longer (CIDRs are either nested or disjoint).
	On netip.Prefix
	// Winner is the policy of the two that selector.Winner picks for traffic
	// to On's first address, and By why.
	Winner string
	By     selector.WonBy
}

// Overlaps finds, for every policy, the other policies it overlaps. Two
// policies overlap when a destination of one overlaps a destination of the
// other and their sources can select a common pod: a source of each whose
// namespace selectors can both match one namespace and whose pod selectors
// can both match one pod.
//
// Whether two label selectors can both match is decided from the selectors
// alone, as the operator watches neither namespaces nor pods: they cannot
// when, for some label key, one requires the label and the other its
// absence, or the values both allow (matchLabels, In, minus NotIn) have
// nothing in common; otherwise they can. Two policies reported may
// therefore select no common pod today (their selectors could, with other
// labels), but two policies not reported never select a common pod.
//
// policies should be those applied (Accepted); one that selector.Compile
// refuses is skipped, as the agents skip it, and of two with the same name
// the first counts. The result maps a policy's name to its overlaps, sorted
// by the other policy's name; a policy without overlaps is absent. The cost
// is a sort of all destinations and a sweep over them, plus the overlapping
// pairs themselves.
func Overlaps(policies []*v1.EgressNATPolicy) map[string][]PolicyOverlap {
	type info struct {
		pol     *v1.EgressNATPolicy
		sources []sourceCons
	}
	var pols []info
	type item struct {
		p   netip.Prefix
		pol int32
	}
	var items []item
	seen := map[string]bool{}
	for _, p := range policies {
		if p == nil || seen[p.Name] {
			continue
		}
		if _, err := selector.Compile(p); err != nil {
			continue
		}
		seen[p.Name] = true
		in := info{pol: p}
		for _, s := range p.Spec.Sources {
			in.sources = append(in.sources, sourceCons{ns: newSelCons(s.NamespaceSelector), pod: newSelCons(s.PodSelector)})
		}
		idx := int32(len(pols))
		pols = append(pols, in)
		for _, d := range p.Spec.Destinations {
			if pfx, ok := parseDestination(d.CIDR); ok {
				items = append(items, item{pfx, idx})
			}
		}
	}
	slices.SortFunc(items, func(a, b item) int {
		return cmp.Or(a.p.Addr().Compare(b.p.Addr()), cmp.Compare(a.p.Bits(), b.p.Bits()), cmp.Compare(a.pol, b.pol))
	})
	items = slices.Compact(items)

	// Sweep: the stack holds the distinct prefixes containing the current
	// one, shortest first, each with the policies that list it.
	type entry struct {
		p    netip.Prefix
		pols []int32
	}
	var stack []entry
	first := map[[2]int32]netip.Prefix{} // overlapping pair (low, high index) → first overlap
	for _, it := range items {
		for len(stack) > 0 {
			top := stack[len(stack)-1].p
			if top.Bits() <= it.p.Bits() && top.Contains(it.p.Addr()) {
				break
			}
			stack = stack[:len(stack)-1]
		}
		for _, e := range stack {
			for _, q := range e.pols {
				if q == it.pol {
					continue
				}
				k := [2]int32{min(q, it.pol), max(q, it.pol)}
				if _, ok := first[k]; !ok {
					first[k] = it.p
				}
			}
		}
		if n := len(stack); n > 0 && stack[n-1].p == it.p {
			stack[n-1].pols = append(stack[n-1].pols, it.pol)
		} else {
			stack = append(stack, entry{p: it.p, pols: []int32{it.pol}})
		}
	}

	out := map[string][]PolicyOverlap{}
	for k, on := range first {
		a, b := pols[k[0]], pols[k[1]]
		if !canShareSources(a.sources, b.sources) {
			continue
		}
		pair := []*v1.EgressNATPolicy{a.pol, b.pol}
		w := selector.Winner(pair, on.Addr())
		winner := ""
		if w.Index >= 0 {
			winner = pair[w.Index].Name
		}
		out[a.pol.Name] = append(out[a.pol.Name], PolicyOverlap{Policy: b.pol.Name, On: on, Winner: winner, By: w.By})
		out[b.pol.Name] = append(out[b.pol.Name], PolicyOverlap{Policy: a.pol.Name, On: on, Winner: winner, By: w.By})
	}
	for _, o := range out {
		slices.SortFunc(o, func(x, y PolicyOverlap) int { return cmp.Compare(x.Policy, y.Policy) })
	}
	return out
}

// MaxOverlapsListed bounds the policies an Overlap message names.
const MaxOverlapsListed = 10

// OverlapMessage is the message of the Overlap condition of policy name,
// naming at most MaxOverlapsListed of its overlaps: "its destinations
// overlap those of 2 other policies that can select the same pods: p2 on
// 203.0.113.0/25 (p2 wins there: longest prefix); p3 on ...".
func OverlapMessage(overlaps []PolicyOverlap) string {
	var b strings.Builder
	noun := "policy"
	if len(overlaps) > 1 {
		noun = "policies"
	}
	fmt.Fprintf(&b, "its destinations overlap those of %d other %s that can select the same pods: ", len(overlaps), noun)
	for i, o := range overlaps {
		if i == MaxOverlapsListed {
			fmt.Fprintf(&b, "; and %d more", len(overlaps)-MaxOverlapsListed)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s on %s (%s wins there: %s)", o.Policy, o.On, o.Winner, o.By)
	}
	return b.String()
}

// parseDestination parses a destination as selector does: IPv4 or
// IPv4-mapped, host bits cleared.
func parseDestination(cidr string) (netip.Prefix, bool) {
	p, err := netip.ParsePrefix(strings.TrimSpace(cidr))
	if err != nil {
		return netip.Prefix{}, false
	}
	p, ok := canonical4(p)
	return p, ok
}

// sourceCons is one source's selectors as constraints.
type sourceCons struct {
	ns, pod selCons
}

func canShareSources(a, b []sourceCons) bool {
	for _, x := range a {
		for _, y := range b {
			if canBothMatch(x.ns, y.ns) && canBothMatch(x.pod, y.pod) {
				return true
			}
		}
	}
	return false
}

// selCons is a label selector as constraints per key. ok is false when
// the selector alone can match nothing.
type selCons struct {
	keys map[string]keyCons
	ok   bool
}

// keyCons: what a selector requires of one label.
type keyCons struct {
	// restricted: the value must be one of in (sorted, without duplicates;
	// empty means no value can do).
	restricted bool
	in         []string
	notIn      []string
	present    bool // the label must exist
	absent     bool // the label must not exist
}

func newSelCons(s v1.LabelSelector) selCons {
	c := selCons{keys: map[string]keyCons{}}
	for k, v := range s.MatchLabels {
		c.keys[k] = c.keys[k].merge(keyCons{restricted: true, in: []string{string(v)}, present: true})
	}
	for _, r := range s.MatchExpressions {
		var vals []string
		for _, v := range r.Values {
			vals = append(vals, string(v))
		}
		slices.Sort(vals)
		vals = slices.Compact(vals)
		var kc keyCons
		switch r.Operator {
		case "In":
			kc = keyCons{restricted: true, in: vals, present: true}
		case "NotIn":
			kc = keyCons{notIn: vals}
		case "Exists":
			kc = keyCons{present: true}
		case "DoesNotExist":
			kc = keyCons{absent: true}
		}
		c.keys[r.Key] = c.keys[r.Key].merge(kc)
	}
	c.ok = true
	for _, kc := range c.keys {
		if !kc.satisfiable() {
			c.ok = false
		}
	}
	return c
}

// canBothMatch reports whether one set of labels can match both selectors.
func canBothMatch(a, b selCons) bool {
	if !a.ok || !b.ok {
		return false
	}
	if len(b.keys) < len(a.keys) {
		a, b = b, a
	}
	for k, x := range a.keys {
		if y, ok := b.keys[k]; ok && !x.merge(y).satisfiable() {
			return false
		}
	}
	return true
}

func (a keyCons) merge(b keyCons) keyCons {
	out := keyCons{present: a.present || b.present, absent: a.absent || b.absent}
	switch {
	case a.restricted && b.restricted:
		out.restricted = true
		for _, v := range a.in {
			if _, found := slices.BinarySearch(b.in, v); found {
				out.in = append(out.in, v)
			}
		}
	case a.restricted:
		out.restricted, out.in = true, a.in
	case b.restricted:
		out.restricted, out.in = true, b.in
	}
	out.notIn = append(slices.Clone(a.notIn), b.notIn...)
	slices.Sort(out.notIn)
	out.notIn = slices.Compact(out.notIn)
	return out
}

func (a keyCons) satisfiable() bool {
	if a.absent && (a.present || a.restricted) {
		return false
	}
	if !a.restricted {
		return true
	}
	for _, v := range a.in {
		if _, excluded := slices.BinarySearch(a.notIn, v); !excluded {
			return true
		}
	}
	return false
}
