package nft

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/selector"
)

// TestHoldUnknownPods: on a node, a pod address the agent has not
// evaluated yet (not in LocalPods) sending to a policy destination is held
// (dropped): it never leaves with the node's address; its traffic to other
// destinations is not held; once the agent knows the pod (an incremental
// apply), the pod's traffic goes as its policies say (here: unselected, so
// masqueraded by the CNI). Traffic that comes in on the uplink is not held
// (rerouted traffic is the gateway's forward guard's business). Without
// pod networks nothing is held.
func TestHoldUnknownPods(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	const unknown = "10.244.2.7"
	l.ip("pod", "addr", "add", unknown+"/32", "dev", relUplink)
	d := l.dataplane(-1)
	web := relGateway("web", relFloat1, relServer1+"/32")
	st := selector.NodeState{
		Policies:    []selector.PolicyState{web},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		PodNetworks: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		LocalPods:   []netip.Addr{netip.MustParseAddr(relPod)},
	}
	mustApply(t, d, st)
	mustVerify(t, d, "after apply")

	expectFromAddr := func(port int, src, server, want string) {
		t.Helper()
		l.expectFromAddr(seen, port, src, server, want)
	}
	expectFromAddr(8100, relPod, relServer1, relFloat1) // known and selected
	expectFromAddr(8101, unknown, relServer1, "")       // unknown, to a policy destination: held
	expectFromAddr(8102, unknown, relServer1, "")       // every packet, not only the first
	expectFromAddr(8103, unknown, relServer3, relGW)    // unknown, elsewhere: not held
	if out := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", "prerouting"); !strings.Contains(out, "@known-pods") ||
		!strings.Contains(out, "packets 2 ") {
		t.Fatalf("the hold rule did not count the two held packets:\n%s", out)
	}

	// The agent learns the pod (unselected): an incremental apply, and its
	// traffic leaves as the CNI sends it.
	st.LocalPods = append(st.LocalPods, netip.MustParseAddr(unknown))
	if r := mustApply(t, d, st); !r.Incremental || r.ElementsAdded != 1 {
		t.Fatalf("learning a pod: %+v, want one element added incrementally", r)
	}
	mustVerify(t, d, "after the pod is known")
	expectFromAddr(8104, unknown, relServer1, relGW)
	// It goes again (deleted): held again.
	st.LocalPods = st.LocalPods[:1]
	if r := mustApply(t, d, st); !r.Incremental || r.ElementsDeleted != 1 {
		t.Fatalf("forgetting a pod: %+v", r)
	}
	expectFromAddr(8105, unknown, relServer1, "")

	// Rerouted traffic from another node's unknown pod (in on the uplink)
	// is not held here: the forward guard drops it (TestForwardGuard).
	l.rerouteFromPeer()
	st.Policies[0].Sources = append(st.Policies[0].Sources, netip.MustParseAddr(remotePod))
	mustApply(t, d, st)
	l.expectRerouted(seen, 8106, relServer1, relFloat1)

	// No pod networks known: nothing is held (--pod-cidrs or
	// Node.spec.podCIDRs give them).
	st.PodNetworks = nil
	mustApply(t, d, st)
	mustVerify(t, d, "without pod networks")
	expectFromAddr(8107, unknown, relServer1, relGW)
}

// TestRepliesBackByUplink: strict reverse-path filtering on every node and
// an overlay between them (the gateway reaches the source node's pod CIDR
// by a VXLAN device). A pod on the source node sends to a server through
// the gateway; the reply comes back by the overlay and the source node's
// strict check drops it (the server's address routes by its uplink).
// With the source node's pod CIDR in the gateway's return routes, the
// reply goes back by the uplink, and the exchange works. Without return
// routes the replies follow the main table as before.
func TestRepliesBackByUplink(t *testing.T) {
	l := newRelLab(t)
	l.overlayLab()
	// The remote pod in its own namespace behind the peer (on a bridge-like
	// /24, as flannel's cni0 does), the peer routing it to the gateway.
	l.addNS("rpod")
	l.ip("peer", "link", "add", "enat-rel-c", "type", "veth", "peer", "name", relUplink, "netns", l.ns("rpod"))
	l.ip("peer", "addr", "add", "10.244.3.1/24", "dev", "enat-rel-c")
	l.ip("peer", "link", "set", "enat-rel-c", "up")
	l.ip("rpod", "addr", "add", remotePod+"/24", "dev", relUplink)
	l.ip("rpod", "link", "set", relUplink, "up")
	l.ip("rpod", "route", "add", "default", "via", "10.244.3.1")
	l.ip("peer", "route", "add", relServer1+"/32", "via", relGW)
	l.exec("peer", "sysctl", "-qw", "net.ipv4.ip_forward=1")
	for _, k := range []string{"all", "default", relUplink, "enat-rel-vx", "enat-rel-c"} {
		l.exec("peer", "sysctl", "-qw", "net.ipv4.conf."+k+".rp_filter=1")
	}
	l.udpEcho(relServer1)

	d := l.dataplane(-1)
	web := relGateway("web", relFloat1, relServer1+"/32")
	web.Sources = append(web.Sources, netip.MustParseAddr(remotePod))
	st := selector.NodeState{
		Policies:    []selector.PolicyState{web},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix(relPeer + "/32")},
	}
	mustApply(t, d, st)
	mustVerify(t, d, "without return routes")
	// The request leaves with the floating IP; its reply is lost on the
	// way back through the overlay.
	if got, err := l.exchange("rpod", remotePod, 8200, relServer1); err == nil {
		t.Fatalf("a reply by the overlay passed the peer's strict check (the server saw %s): the lab does not show the problem", got)
	}

	st.ReturnRoutes = []selector.ReturnRoute{{Dst: netip.MustParsePrefix("10.244.3.0/24"), Via: netip.MustParseAddr(relPeer)}}
	mustApply(t, d, st)
	mustVerify(t, d, "with return routes")
	for port := 8201; port < 8204; port++ {
		got, err := l.exchange("rpod", remotePod, port, relServer1)
		if err != nil {
			t.Fatalf("port %d: %v", port, err)
		}
		if got.Addr() != netip.MustParseAddr(relFloat1) {
			t.Fatalf("port %d: the server saw the pod as %s, want %s", port, got, relFloat1)
		}
	}
	replyTable := selector.DefaultRouteTableBase + selector.ReplyMarkIndex(selector.DefaultMarkMask)
	if out := l.ip("gw", "-4", "route", "show", "table", strconv.Itoa(replyTable)); !strings.Contains(out, "10.244.3.0/24 via "+relPeer+" dev "+relUplink) {
		t.Fatalf("reply table %d:\n%s", replyTable, out)
	}
	if out := l.ip("gw", "-4", "rule", "show"); !strings.Contains(out, "fwmark 0x3e00/0x3f00 lookup "+strconv.Itoa(replyTable)) {
		t.Fatalf("no reply rule:\n%s", out)
	}

	// The gateway's own pod is not concerned: its replies follow the main
	// table (no reply mark on its flows).
	if got, err := l.exchange("pod", relPod, 8204, relServer1); err != nil || got.Addr() != netip.MustParseAddr(relFloat1) {
		t.Fatalf("the gateway's own pod: server saw %s, %v", got, err)
	}

	// No longer a gateway: the reply table and its rule go.
	st.Policies, st.FloatingIPs, st.ReturnRoutes = nil, nil, nil
	mustApply(t, d, st)
	if out := l.ip("gw", "-4", "route", "show", "table", "all"); strings.Contains(out, "table "+strconv.Itoa(replyTable)) {
		t.Fatalf("reply routes left:\n%s", out)
	}
	if out := l.ip("gw", "-4", "rule", "show"); strings.Contains(out, "lookup "+strconv.Itoa(replyTable)) {
		t.Fatalf("reply rule left:\n%s", out)
	}
}

// udpEcho answers every datagram to server:9998 with the address it came
// from.
func (l *relLab) udpEcho(server string) {
	l.t.Helper()
	var c *net.UDPConn
	err := l.inNS("ext", func() (err error) {
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(server+":9998")))
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 64)
		for {
			_, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort([]byte(from.String()), from)
		}
	}()
}

// exchange sends one datagram from src:port in role's namespace to
// server:9998 and waits up to a second for the echo: the address the
// server saw.
func (l *relLab) exchange(role, src string, port int, server string) (netip.AddrPort, error) {
	l.t.Helper()
	var got netip.AddrPort
	err := l.inNS(role, func() error {
		c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), uint16(port))),
			net.UDPAddrFromAddrPort(netip.MustParseAddrPort(server+":9998")))
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte("x")); err != nil {
			return err
		}
		if err := c.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		got, err = netip.ParseAddrPort(string(buf[:n]))
		return err
	})
	return got, err
}

// expectFromAddr sends one datagram from src:port in the pod's namespace to
// server and checks the server saw it from want ("" for none: held or
// dropped).
func (l *relLab) expectFromAddr(seen map[string]chan netip.AddrPort, port int, src, server, want string) {
	l.t.Helper()
	l.sendFrom("pod", src, port, server)
	select {
	case got := <-seen[server]:
		if want == "" {
			l.t.Fatalf("%s saw %s's datagram from %s: it should have been held or dropped", server, src, got)
		}
		if got.Addr() != netip.MustParseAddr(want) {
			l.t.Fatalf("%s saw %s's datagram from %s, want %s", server, src, got, want)
		}
	case <-time.After(relWaitLeak):
		if want != "" {
			l.t.Fatalf("%s saw nothing from %s:%d, want a datagram from %s", server, src, port, want)
		}
	}
}
