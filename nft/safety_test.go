package nft

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap/zaptest"
)

// TestAddressOwnership: an agent removes only the addresses egressnat
// added, known by their label even after its table is lost and it
// restarted; an address something else put on the uplink is never
// removed, announced or taken over, even when a state names it.
func TestAddressOwnership(t *testing.T) {
	l := newLab(t)
	l.build()
	const other = "192.0.2.101" // put on B's uplink by someone else
	l.ip("b", "addr", "add", other+"/24", "dev", "eth0")

	db := l.dataplane("b")
	st := gatewayState(podA1)
	st.FloatingIPs = append(st.FloatingIPs, p(other+"/24"))
	st.ClusterFloatingIPs = addrList(floatIP, other)
	r := mustApply(t, db, st)
	if !slices.Equal(r.Foreign, addrList(other)) {
		t.Fatalf("foreign %v, want %s", r.Foreign, other)
	}
	if slices.Contains(r.Announced, a(other)) {
		t.Fatalf("announced an address that is not ours: %v", r.Announced)
	}
	if out := l.ip("b", "-4", "addr", "show", "dev", "eth0"); !strings.Contains(out, floatIP+"/24") || !strings.Contains(out, "eth0:enat") {
		t.Fatalf("floating IP without our label:\n%s", out)
	}

	// The table is lost (nft flush ruleset) and the agent restarts with a
	// state that holds nothing: it removes its own labelled address, not
	// the other one, nor the node's own.
	l.exec("b", "nft", "flush", "ruleset")
	db2 := l.dataplane("b")
	rs := rerouteState(podB1)
	rs.ClusterFloatingIPs = addrList(floatIP, other)
	if r := mustApply(t, db2, rs); !slices.Equal(r.Foreign, addrList(other)) {
		t.Fatalf("a floating IP of the cluster on the uplink, not ours and not wanted: foreign %v, want %s", r.Foreign, other)
	}
	out := l.ip("b", "-4", "addr", "show", "dev", "eth0")
	if strings.Contains(out, floatIP+"/") {
		t.Fatalf("own floating IP kept after the table was lost:\n%s", out)
	}
	for _, keep := range []string{other + "/24", nodeBIP + "/24"} {
		if !strings.Contains(out, keep) {
			t.Fatalf("%s removed:\n%s", keep, out)
		}
	}
	// Cleanup leaves the other address too.
	if err := db2.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if out := l.ip("b", "-4", "addr", "show", "dev", "eth0"); !strings.Contains(out, other+"/24") || !strings.Contains(out, nodeBIP+"/24") {
		t.Fatalf("cleanup removed an address that is not ours:\n%s", out)
	}
}

// TestInternalNotSteered: a policy whose destinations are 0.0.0.0/0 and
// which fails closed (Drop) drops traffic to the outside, but never
// traffic to the cluster's own destinations (pods, nodes); and replies of
// a connection that came in to a selected pod are not steered.
func TestInternalNotSteered(t *testing.T) {
	l := newLab(t)
	l.build()
	l.ip("ext", "route", "add", "10.244.1.0/24", "via", nodeAIP)
	da := l.dataplane("a")
	st := selector.NodeState{
		Policies: []selector.PolicyState{{Name: "all", Sources: addrList(podA1), Destinations: []netip.Prefix{p("0.0.0.0/0")},
			Mode: selector.ModeDrop, EgressIP: a(floatIP)}},
		Excluded: []netip.Prefix{p("10.244.0.0/16"), p("192.0.2.0/24")},
	}
	mustApply(t, da, st)

	ext := l.server("ext", serverIP+":8080")
	if _, err := l.dial("pa1", podA1+":40100", serverIP+":8080", ext); err == nil {
		t.Fatal("selected pod reached the outside while its policy fails closed")
	}
	podB := l.server("pb1", podB1+":8080")
	if got, err := l.dial("pa1", podA1+":40101", podB1+":8080", podB); err != nil || got.Addr() != a(podA1) {
		t.Fatalf("pod to pod: %v %v", got, err)
	}
	nodeB := l.server("b", nodeBIP+":8080")
	if _, err := l.dial("pa1", podA1+":40102", nodeBIP+":8080", nodeB); err != nil {
		t.Fatalf("pod to node: %v", err)
	}
	// Inbound: ext connects to the selected pod; the pod's replies (to an
	// address its policy covers) are not dropped.
	in := l.server("pa1", podA1+":8081")
	if got, err := l.dial("ext", serverIP+":40103", podA1+":8081", in); err != nil || got.Addr() != a(serverIP) {
		t.Fatalf("inbound connection to a selected pod: %v %v", got, err)
	}

	// Without the exclusions, the same policy drops pod-to-pod traffic:
	// the test above is not vacuous.
	st.Excluded = nil
	mustApply(t, da, st)
	if _, err := l.dial("pa1", podA1+":40104", podB1+":8080", podB); err == nil {
		t.Fatal("pod to pod passed without the exclusion: the check proves nothing")
	}
}

// TestOverlapPrecedence: a pod that two policies select, with overlapping
// destinations held by two different nodes, leaves by the policy with the
// longest destination, on both nodes alike: to 203.0.113.10 by "narrow"
// (a /32, held by A itself), to 198.51.100.10 by "wide" (0.0.0.0/0, held
// by B). Before the ranked rules, the reroute won everywhere.
func TestOverlapPrecedence(t *testing.T) {
	l := newLab(t)
	l.build()
	const narrowIP = "192.0.2.101"
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	wide := selector.PolicyState{Name: "wide", Destinations: []netip.Prefix{p("0.0.0.0/0")}, Written: []netip.Prefix{p("0.0.0.0/0")},
		Created: t0, EgressIP: a(floatIP)}
	narrow := selector.PolicyState{Name: "narrow", Destinations: []netip.Prefix{p(serverIP + "/32")}, Written: []netip.Prefix{p(serverIP + "/32")},
		Created: t0.Add(time.Hour), EgressIP: a(narrowIP)}
	excluded := []netip.Prefix{p("10.244.0.0/16"), p(nodeAIP + "/32"), p(nodeBIP + "/32")}

	// Node A holds narrow's IP; wide is rerouted to B.
	wa, na := wide, narrow
	wa.Mode, wa.NextHop, wa.Sources = selector.ModeReroute, a(nodeBIP), addrList(podA1)
	na.Mode, na.Sources = selector.ModeGateway, addrList(podA1)
	mustApply(t, l.dataplane("a"), selector.NodeState{Policies: []selector.PolicyState{na, wa}, FloatingIPs: []netip.Prefix{p(narrowIP + "/24")}, Excluded: excluded})
	// Node B holds wide's IP; narrow is rerouted to A (no local source).
	wb, nb := wide, narrow
	wb.Mode, wb.Sources = selector.ModeGateway, addrList(podA1)
	nb.Mode, nb.NextHop = selector.ModeReroute, a(nodeAIP)
	mustApply(t, l.dataplane("b"), selector.NodeState{Policies: []selector.PolicyState{nb, wb}, FloatingIPs: []netip.Prefix{p(floatIP + "/24")}, Excluded: excluded})

	s1 := l.server("ext", serverIP+":8080")
	s2 := l.server("ext", server2IP+":8080")
	for _, tc := range []struct {
		pod, local, to string
		seen           <-chan netip.AddrPort
		want           netip.Addr
	}{
		{"pa1", podA1 + ":40200", serverIP + ":8080", s1, a(narrowIP)},
		{"pa1", podA1 + ":40201", server2IP + ":8080", s2, a(floatIP)},
		// An unselected pod keeps its node's address.
		{"pa2", podA2 + ":40202", server2IP + ":8080", s2, a(nodeAIP)},
	} {
		got, err := l.dial(tc.pod, tc.local, tc.to, tc.seen)
		if err != nil || got.Addr() != tc.want {
			t.Fatalf("%s to %s: server saw %v (%v), want %s", tc.pod, tc.to, got, err, tc.want)
		}
	}
}

// TestOutOfMarks: more gateway next hops than the mark mask holds fail
// only the policies left without a mark (closed: they drop), not the
// whole apply.
func TestOutOfMarks(t *testing.T) {
	l := newLab(t)
	l.build()
	d, err := New(Config{Uplink: "eth0", NetNSFd: l.fd("a"), MarkMask: 0x100, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	dst := []netip.Prefix{p("203.0.113.0/24")}
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "one", Sources: addrList(podA1), Destinations: dst, Mode: selector.ModeReroute, EgressIP: a(floatIP), NextHop: a(nodeBIP)},
		{Name: "two", Sources: addrList(podA2), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeReroute, EgressIP: a("192.0.2.101"), NextHop: a("192.0.2.13")},
	}}
	r := mustApply(t, d, st)
	if !slices.Equal(r.Unroutable, []string{"two"}) {
		t.Fatalf("unroutable %v, want [two]", r.Unroutable)
	}
	if out := l.exec("a", "nft", "list", "chain", "ip", "egressnat", policyChainName("two")); !strings.Contains(out, "drop") {
		t.Fatalf("policy two does not fail closed:\n%s", out)
	}
	if out := l.exec("a", "nft", "list", "chain", "ip", "egressnat", policyChainName("one")); !strings.Contains(out, "meta mark set") {
		t.Fatalf("policy one does not reroute:\n%s", out)
	}
}
