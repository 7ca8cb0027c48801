package nft

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/selector"
)

// remotePod is a pod on the peer node whose traffic the peer reroutes to
// the gateway (as a source node of a Reroute policy does).
const remotePod = "10.244.3.5"

// sendRerouted sends one datagram from the remote pod on the peer, routed
// through the gateway node, from port to server.
func (l *relLab) sendRerouted(port int, server string) {
	l.t.Helper()
	l.sendFrom("peer", remotePod, port, server)
}

// expectRerouted sends a datagram the peer rerouted through the gateway
// from port to server, and checks the source server sees (want), or that
// nothing leaves (want "").
func (l *relLab) expectRerouted(seen map[string]chan netip.AddrPort, port int, server, want string) {
	l.t.Helper()
	l.sendRerouted(port, server)
	select {
	case got := <-seen[server]:
		if want == "" {
			l.t.Fatalf("%s saw the rerouted datagram from %s: it should have been dropped", server, got)
		}
		if got.Addr() != netip.MustParseAddr(want) {
			l.t.Fatalf("%s saw the rerouted datagram from %s, want %s", server, got, want)
		}
	case <-time.After(relWaitLeak):
		if want != "" {
			l.t.Fatalf("%s saw nothing from port %d, want a datagram from %s", server, port, want)
		}
	}
}

// rerouteFromPeer makes the peer route its remote pod's traffic to the
// servers through the gateway (as a source node of a Reroute policy does).
func (l *relLab) rerouteFromPeer() {
	l.t.Helper()
	l.ip("peer", "addr", "add", remotePod+"/32", "dev", "lo")
	for _, s := range []string{relServer1, relServer2} {
		l.ip("peer", "route", "add", s+"/32", "via", relGW)
	}
}

// TestForwardGuard: traffic another node rerouted to this one (in on the
// uplink from a pod address, out by the uplink to the outside) leaves with
// the floating IP when a gateway rule of this node SNATs it, and is dropped
// otherwise: never masqueraded to the node's address by the CNI's rule
// (this node no longer, or not yet, its gateway; a pod it does not know
// yet). The node's own pods are not concerned.
func TestForwardGuard(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	l.rerouteFromPeer()
	// Without egressnat's table the CNI masquerades rerouted traffic: the
	// leak the guard closes.
	expectRerouted := func(port int, server, want string) {
		t.Helper()
		l.expectRerouted(seen, port, server, want)
	}
	expectRerouted(6000, relServer1, relGW)

	d := l.dataplane(-1)
	web := relGateway("web", relFloat1, relServer1+"/32")
	web.Sources = append(web.Sources, netip.MustParseAddr(remotePod))
	api := relGateway("api", relFloat1, relServer2+"/32") // gw does not know the remote pod yet
	st := selector.NodeState{
		Policies:    []selector.PolicyState{web, api},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}
	mustApply(t, d, st)
	mustVerify(t, d, "after apply")
	expectRerouted(6001, relServer1, relFloat1) // SNATed by web
	expectRerouted(6002, relServer2, "")        // api: source unknown here: dropped, not masqueraded
	l.expectFrom(seen, 6003, relServer2, relFloat1)

	// Released (web's IP moved away): the rule is a drop, and nothing else
	// masquerades the rerouted traffic either.
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	expectRerouted(6004, relServer1, "")
	// Not a gateway any more: the policies route elsewhere from here; the
	// remote pod's traffic still reaching this node is dropped.
	st.Policies, st.FloatingIPs = []selector.PolicyState{{Name: "web", Mode: selector.ModeReroute, NextHop: netip.MustParseAddr(relPeer),
		EgressIP: netip.MustParseAddr(relFloat1), Sources: []netip.Addr{netip.MustParseAddr(relPod)},
		Destinations: []netip.Prefix{netip.MustParsePrefix(relServer1 + "/32")}}}, nil
	mustApply(t, d, st)
	mustVerify(t, d, "after the move")
	expectRerouted(6005, relServer1, "")
	expectRerouted(6006, relServer2, "")
	c := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", chainPostrouting)
	t.Logf("postrouting:\n%s", c)

	// Without egressnat's table the node is as before.
	if err := d.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectRerouted(6007, relServer1, relGW)
}

// TestBootGuard: a node without its table (rebooted, or its ruleset
// flushed) gets the guard table before its agent can reach the API: the
// traffic other nodes still reroute to it is dropped instead of being
// masqueraded to the node's address, its own pods' traffic to a policy
// destination of the last apply is held, the rest of it is not concerned;
// an existing table is left as it is; the first Apply converges from
// there.
func TestBootGuard(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	l.rerouteFromPeer()
	l.expectRerouted(seen, 6100, relServer1, relGW) // the leak, without a table

	internal := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}
	d := l.dataplane(-1)
	dests := []netip.Prefix{netip.MustParsePrefix(relServer1 + "/32")}
	if ok, err := d.Guard(ctxT(t), nil, dests); err != nil || ok {
		t.Fatalf("guard without cluster networks: %v %v, want nothing installed", ok, err)
	}
	if ok, err := d.Guard(ctxT(t), internal, dests); err != nil || !ok {
		t.Fatalf("guard on a node without a table: %v %v, want installed", ok, err)
	}
	l.expectRerouted(seen, 6101, relServer1, "")
	// The flow masqueraded before the guard (its conntrack entry pins the
	// masquerade past any NAT chain) is dropped too.
	l.expectRerouted(seen, 6100, relServer1, "")
	// The node's own pod: held to a policy destination of the last apply,
	// as without egressnat elsewhere.
	l.expectNothing(seen, 6102, relServer1)
	l.expectFrom(seen, 6105, relServer2, relGW)
	if addrs := l.exec("gw", "ip", "-4", "addr", "show", "dev", relUplink); strings.Contains(addrs, relFloat1) {
		t.Fatalf("the guard added a floating IP: %s", addrs)
	}

	// The first Apply converges from the guard table.
	web := relGateway("web", relFloat1, relServer1+"/32")
	web.Sources = append(web.Sources, netip.MustParseAddr(remotePod))
	st := selector.NodeState{Policies: []selector.PolicyState{web},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")}, Excluded: internal}
	mustApply(t, d, st)
	mustVerify(t, d, "after the first apply")
	l.expectRerouted(seen, 6103, relServer1, relFloat1)

	// An agent restart with the table in place: the guard changes nothing.
	before := l.exec("gw", "nft", "list", "table", "ip", "egressnat")
	d2 := l.dataplane(-1)
	if ok, err := d2.Guard(ctxT(t), internal, dests); err != nil || ok {
		t.Fatalf("guard with the table in place: %v %v, want nothing installed", ok, err)
	}
	if after := l.exec("gw", "nft", "list", "table", "ip", "egressnat"); after != before {
		t.Fatalf("the guard changed an existing table:\n%s\nwas\n%s", after, before)
	}
	l.expectRerouted(seen, 6104, relServer1, relFloat1)
	if err := d2.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}
