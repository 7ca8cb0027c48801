package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/egressnat/egressnat/selector"
)

// benchState: 1,000 Reroute policies over 10 next hops, 20 sources each
// (20,000 in all) and 5 destinations each: the source node of bench-scale.
func benchState() selector.NodeState {
	var st selector.NodeState
	for i := range 1000 {
		pol := selector.PolicyState{Name: fmt.Sprintf("s-%04d", i), Mode: selector.ModeReroute,
			EgressIP: a(floatIP), NextHop: netip.AddrFrom4([4]byte{192, 0, 2, byte(20 + i%10)})}
		for j := range 20 {
			n := i*20 + j
			pol.Sources = append(pol.Sources, netip.AddrFrom4([4]byte{10, 128 + byte(n>>16), byte(n >> 8), byte(n)}))
		}
		for j := range 5 {
			pol.Destinations = append(pol.Destinations, netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 2), byte(j + 8*(i%4))}), 32))
		}
		st.Policies = append(st.Policies, pol)
		st.LocalPods = append(st.LocalPods, pol.Sources...) // every source is this node's pod
	}
	st.PodNetworks = []netip.Prefix{netip.MustParsePrefix("10.128.0.0/9")}
	return st
}

// BenchmarkApplyOnePod: one pod's address joins, then leaves, one policy
// at 1,000 policies and 20,000 sources (run as root: a throwaway network
// namespace). "incremental" is the path a pod event takes; "full" plans
// the whole table against the cache (the periodic re-apply).
func BenchmarkApplyOnePod(b *testing.B) {
	for _, full := range []bool{false, true} {
		name := "incremental"
		if full {
			name = "full"
		}
		b.Run(name, func(b *testing.B) {
			if testing.Short() {
				b.Skip("kernel benchmark")
			}
			l := newLab(b)
			l.build()
			d := l.dataplane("a")
			st := benchState()
			if err := d.Apply(b.Context(), st); err != nil {
				b.Fatal(err)
			}
			extra := netip.MustParseAddr("10.200.0.1")
			with := st
			with.Policies = append([]selector.PolicyState(nil), st.Policies...)
			with.Policies[500].Sources = append(append([]netip.Addr(nil), st.Policies[500].Sources...), extra)
			with.LocalPods = append(append([]netip.Addr(nil), st.LocalPods...), extra)
			slices.SortFunc(with.LocalPods, netip.Addr.Compare)
			b.ResetTimer()
			for i := range b.N {
				next := st
				if i%2 == 0 {
					next = with
				}
				if full {
					d.Recheck()
				}
				if err := d.Apply(b.Context(), next); err != nil {
					b.Fatal(err)
				}
				// Its source set, the dispatch map and the known pods.
				if r := d.LastResult(); r.Incremental == full || r.ElementsAdded+r.ElementsDeleted != 3 {
					b.Fatalf("apply %d: %+v", i, r)
				}
			}
		})
	}
}
