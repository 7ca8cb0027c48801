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
// source to its destinations, and nothing else; later Applies of an
// unchanged state delete nothing.
func TestFirstApplyConntrack(t *testing.T) {
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "web", Mode: selector.ModeReroute, NextHop: a("192.0.2.12"), EgressIP: a("192.0.2.100"),
			Sources: addrList("10.244.1.2"), Destinations: []netip.Prefix{p("203.0.113.0/24")}},
		{Name: "gw", Mode: selector.ModeGateway, EgressIP: a("192.0.2.101"),
			Sources: addrList("10.244.1.3"), Destinations: []netip.Prefix{p("203.0.113.0/24")}},
	}}
	n, err := normalizeState(st)
	if err != nil {
		t.Fatal(err)
	}
	first := conntrackMatcher(&nftPlan{prevGateway: map[string]netip.Addr{srcSetName("gw"): a("192.0.2.101")}}, n, nil, true)
	later := conntrackMatcher(&nftPlan{prevGateway: map[string]netip.Addr{srcSetName("gw"): a("192.0.2.101")}}, n, nil, false)
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
	} {
		if got := first.match(tc.f); got != tc.first {
			t.Errorf("%s: first apply deletes %v, want %v", tc.name, got, tc.first)
		}
		if got := later.match(tc.f); got != tc.late {
			t.Errorf("%s: later apply deletes %v, want %v", tc.name, got, tc.late)
		}
	}
}
