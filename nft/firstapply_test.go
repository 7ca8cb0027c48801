package nft

import (
	"net/netip"
	"testing"

	"github.com/egressnat/egressnat/selector"
	"github.com/ti-mo/conntrack"
)

func flow(src, dst, replyDst string) *conntrack.Flow {
	f := &conntrack.Flow{}
	f.TupleOrig.IP = conntrack.IPTuple{SourceAddress: netip.MustParseAddr(src), DestinationAddress: netip.MustParseAddr(dst)}
	f.TupleReply.IP = conntrack.IPTuple{SourceAddress: netip.MustParseAddr(dst), DestinationAddress: netip.MustParseAddr(replyDst)}
	return f
}

// TestFirstApplyConntrack: the first Apply of a Dataplane (an agent that
// restarted, maybe after a crash between the table change and its
// conntrack clean-up) deletes the masqueraded flows of every Reroute
// source to its destinations, the flows SNATed to a floating IP it holds
// that no Gateway policy of its would SNAT there, and nothing else; later
// Applies of an unchanged state delete nothing.
func TestFirstApplyConntrack(t *testing.T) {
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "web", Mode: selector.ModeReroute, NextHop: a("192.0.2.12"), EgressIP: a("192.0.2.100"),
			Sources: addrList("10.244.1.2"), Destinations: []netip.Prefix{p("203.0.113.0/24")}},
		{Name: "gw", Mode: selector.ModeGateway, EgressIP: a("192.0.2.101"),
			Sources: addrList("10.244.1.3"), Destinations: []netip.Prefix{p("203.0.113.0/24")}},
	}, FloatingIPs: []netip.Prefix{p("192.0.2.101/24")},
		Excluded: []netip.Prefix{p("10.244.0.0/16"), p("192.0.2.11/32")}}
	n, err := normalizeState(st)
	if err != nil {
		t.Fatal(err)
	}
	local := addrList("192.0.2.11", "192.0.2.101")
	first := conntrackMatcher(&nftPlan{prevGateway: map[string]netip.Addr{srcSetName("gw"): a("192.0.2.101")}}, n, nil, true, local)
	later := conntrackMatcher(&nftPlan{prevGateway: map[string]netip.Addr{srcSetName("gw"): a("192.0.2.101")}}, n, nil, false, local)
	for _, tc := range []struct {
		name        string
		f           *conntrack.Flow
		first, late bool
	}{
		{"reroute source masqueraded to the node", flow("10.244.1.2", "203.0.113.10", "192.0.2.11"), true, false},
		{"reroute source null-bound (right)", flow("10.244.1.2", "203.0.113.10", "10.244.1.2"), false, false},
		{"reroute source elsewhere", flow("10.244.1.2", "198.51.100.10", "192.0.2.11"), false, false},
		{"another pod", flow("10.244.1.9", "203.0.113.10", "192.0.2.11"), false, false},
		{"gateway source SNATed (right)", flow("10.244.1.3", "203.0.113.10", "192.0.2.101"), false, false},
		{"a pod no policy selects any more, still SNATed", flow("10.244.1.9", "203.0.113.10", "192.0.2.101"), true, false},
		{"a gateway source to a destination no longer the policy's, still SNATed", flow("10.244.1.3", "198.51.100.10", "192.0.2.101"), true, false},
		{"inbound to the floating IP (not translated)", flow("203.0.113.10", "192.0.2.101", "203.0.113.10"), false, false},
		{"a pod no longer rerouted, still untranslated", flow("10.244.1.9", "203.0.113.10", "10.244.1.9"), true, false},
		{"a reroute source to its destination, untranslated (right)", flow("10.244.1.2", "203.0.113.77", "10.244.1.2"), false, false},
		{"a pod untranslated to a destination of no policy", flow("10.244.1.9", "198.51.100.10", "10.244.1.9"), false, false},
		{"the node's own flow, untranslated", flow("192.0.2.11", "203.0.113.10", "192.0.2.11"), false, false},
		{"an outside source (not cluster-internal)", flow("198.51.100.7", "203.0.113.10", "198.51.100.7"), false, false},
	} {
		if got := first.match(tc.f); got != tc.first {
			t.Errorf("%s: first apply deletes %v, want %v", tc.name, got, tc.first)
		}
		if got := later.match(tc.f); got != tc.late {
			t.Errorf("%s: later apply deletes %v, want %v", tc.name, got, tc.late)
		}
	}
}
