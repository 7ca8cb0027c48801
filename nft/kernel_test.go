package nft

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	tinetfilter "github.com/ti-mo/netfilter"

	"github.com/egressnat/egressnat/selector"
)

func a(s string) netip.Addr   { return netip.MustParseAddr(s) }
func p(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// states for node A (reroutes to B) and node B (gateway), one policy "web"
// selecting pod a1 and pod b1 towards 203.0.113.0/24.
func rerouteState(sources ...string) selector.NodeState {
	return selector.NodeState{Policies: []selector.PolicyState{{
		Name: "web", Sources: addrList(sources...), Destinations: []netip.Prefix{p("203.0.113.0/24")},
		Mode: selector.ModeReroute, EgressIP: a(floatIP), NextHop: a(nodeBIP),
	}}}
}

func gatewayState(sources ...string) selector.NodeState {
	return selector.NodeState{
		Policies: []selector.PolicyState{{
			Name: "web", Sources: addrList(sources...), Destinations: []netip.Prefix{p("203.0.113.0/24")},
			Mode: selector.ModeGateway, EgressIP: a(floatIP),
		}},
		FloatingIPs: []netip.Prefix{p(floatIP + "/24")},
	}
}

func addrList(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, a(s))
	}
	return out
}

func mustApply(t *testing.T, d *Dataplane, st selector.NodeState) Result {
	t.Helper()
	if err := d.Apply(ctxT(t), st); err != nil {
		t.Fatalf("apply: %v", err)
	}
	return d.LastResult()
}

func expectSource(t *testing.T, l *lab, pod, local string, seen <-chan netip.AddrPort, want netip.AddrPort, keepPort bool) {
	t.Helper()
	got, err := l.dial(pod, local, serverIP+":8080", seen)
	if err != nil {
		t.Fatalf("%s: dial: %v", pod, err)
	}
	if got.Addr() != want.Addr() {
		t.Fatalf("%s: server saw %s, want source %s", pod, got, want.Addr())
	}
	if keepPort && got.Port() != want.Port() {
		t.Fatalf("%s: server saw port %d, want %d (port not preserved)", pod, got.Port(), want.Port())
	}
}

// TestEgressEndToEnd: a selected pod on node A leaves through node B with
// the floating IP and its own source port; an unselected pod leaves with
// node A's IP (CNI masquerade); a selected pod on B itself is SNATed too.
func TestEgressEndToEnd(t *testing.T) {
	l := newLab(t)
	l.build()
	seen := l.server("ext", serverIP+":8080")
	da, db := l.dataplane("a"), l.dataplane("b")

	// Before: everything masquerades to the node IP.
	expectSource(t, l, "pa1", podA1+":40001", seen, netip.AddrPortFrom(a(nodeAIP), 0), false)

	mustApply(t, db, gatewayState(podA1, podB1))
	mustApply(t, da, rerouteState(podA1, podB1))

	expectSource(t, l, "pa1", podA1+":40002", seen, netip.MustParseAddrPort(floatIP+":40002"), true)
	expectSource(t, l, "pa2", podA2+":40003", seen, netip.AddrPortFrom(a(nodeAIP), 0), false)
	expectSource(t, l, "pb1", podB1+":40004", seen, netip.MustParseAddrPort(floatIP+":40004"), true)

	// Counters show the traffic per policy.
	ca, err := da.Dump(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(ca) != 1 || ca[0].Policy != "web" || ca[0].Mode != selector.ModeReroute || ca[0].Packets == 0 {
		t.Fatalf("node A counters: %+v", ca)
	}
	cb, err := db.Dump(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(cb) != 1 || cb[0].Mode != selector.ModeGateway || cb[0].Packets < 2 {
		t.Fatalf("node B counters: %+v", cb)
	}

	// The kernel holds what the brief describes.
	ruleset := l.exec("a", "nft", "list", "table", "ip", "egressnat")
	for _, want := range []string{
		"type filter hook prerouting priority mangle",
		"type nat hook postrouting priority srcnat - 1",
		"ip daddr @dst-web",
		"meta mark set meta mark & 0xffffc1ff | 0x00000100", // nft prints (m & ~0x3f00) | 0x100 this way
		`comment "policy web: reroute via 192.0.2.12 mark 0x100"`,
		"meta mark & 0x00003f00 != 0x00000000",
		"snat to ip saddr",
	} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("node A ruleset lacks %q:\n%s", want, ruleset)
		}
	}
	if rules := l.ip("a", "rule", "show"); !strings.Contains(rules, "29000:\tfrom all fwmark 0x100/0x3f00 lookup 2701") {
		t.Errorf("node A ip rules:\n%s", rules)
	}
	if routes := l.ip("a", "route", "show", "table", "2701"); !strings.Contains(routes, "default via 192.0.2.12 dev eth0") {
		t.Errorf("node A table 2701:\n%s", routes)
	}
	rb := l.exec("b", "nft", "list", "table", "ip", "egressnat")
	if !strings.Contains(rb, `oifname "eth0"`) || !strings.Contains(rb, "snat to 192.0.2.100") || strings.Contains(rb, "random") {
		t.Errorf("node B ruleset:\n%s", rb)
	}
	if got := strings.TrimSpace(l.exec("b", "cat", "/proc/sys/net/ipv4/conf/eth0/send_redirects")); got != "0" {
		t.Errorf("node B eth0 send_redirects = %s", got)
	}
	if got := strings.TrimSpace(l.exec("b", "cat", "/proc/sys/net/ipv4/conf/all/send_redirects")); got != "0" {
		t.Errorf("node B all send_redirects = %s", got)
	}
}

// TestDrop: ModeDrop drops selected traffic instead of letting it leave with
// the node IP; unselected traffic is untouched.
func TestDrop(t *testing.T) {
	l := newLab(t)
	l.build()
	seen := l.server("ext", serverIP+":8080")
	da := l.dataplane("a")
	st := rerouteState(podA1)
	st.Policies[0].Mode = selector.ModeDrop
	st.Policies[0].NextHop = netip.Addr{}
	mustApply(t, da, st)

	if got, err := l.dial("pa1", podA1+":40010", serverIP+":8080", seen); err == nil {
		t.Fatalf("selected pod connected despite drop, server saw %s", got)
	}
	expectSource(t, l, "pa2", podA2+":40011", seen, netip.AddrPortFrom(a(nodeAIP), 0), false)
	c, err := da.Dump(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(c) != 1 || c[0].Mode != selector.ModeDrop || c[0].Packets == 0 {
		t.Fatalf("counters: %+v", c)
	}
	if r := l.ip("a", "rule", "show"); strings.Contains(r, "fwmark") {
		t.Fatalf("drop mode needs no ip rule:\n%s", r)
	}
}

// TestIdempotent: applying the same state again, from the same or from a
// restarted agent, changes nothing in the kernel (handles and counters
// included).
func TestIdempotent(t *testing.T) {
	l := newLab(t)
	l.build()
	db := l.dataplane("b")
	st := gatewayState(podA1, podB1)
	st.Policies = append(st.Policies,
		selector.PolicyState{Name: "db", Sources: addrList(podA2), Destinations: []netip.Prefix{p("198.51.100.0/25"), p("198.51.100.128/25"), p("0.0.0.0/8"), p("255.0.0.0/8")}, Mode: selector.ModeReroute, NextHop: a("192.0.2.13")},
		selector.PolicyState{Name: "deny", Sources: addrList(podA2), Destinations: []netip.Prefix{p("203.0.113.128/25")}, Mode: selector.ModeDrop},
	)
	first := mustApply(t, db, st)
	if !first.Changed() || first.Transactions != 1 {
		t.Fatalf("first apply: %+v", first)
	}
	before := l.snapshot("b")
	second := mustApply(t, db, st)
	if second.Changed() || second.ElementsAdded+second.ElementsDeleted != 0 || len(second.Announced) != 0 {
		t.Fatalf("second apply changed something: %+v", second)
	}
	if after := l.snapshot("b"); after != before {
		t.Fatalf("kernel changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
	// A restarted agent reads everything back and changes nothing either.
	restarted := l.dataplane("b")
	third := mustApply(t, restarted, st)
	if third.Changed() {
		t.Fatalf("restarted apply changed something: %+v", third)
	}
	if after := l.snapshot("b"); after != before {
		t.Fatalf("kernel changed after restart:\n--- before\n%s\n--- after\n%s", before, after)
	}
	// A one-pod change touches one element and no chain.
	st.Policies[0].Sources = addrList(podA1, podB1, "10.244.2.3")
	r := mustApply(t, db, st)
	if r.ElementsAdded != 1 || r.ElementsDeleted != 0 || len(r.ChainsRebuilt) != 0 || r.Transactions != 1 {
		t.Fatalf("one pod added: %+v", r)
	}
}

// TestSourceRemoval: removing a pod from the policy's sources sends its new
// connections back to the node IP, and its conntrack entries are flushed.
func TestSourceRemoval(t *testing.T) {
	l := newLab(t)
	l.build()
	seen := l.server("ext", serverIP+":8080")
	da, db := l.dataplane("a"), l.dataplane("b")
	mustApply(t, db, gatewayState(podA1, podA2))
	mustApply(t, da, rerouteState(podA1, podA2))
	expectSource(t, l, "pa2", podA2+":40020", seen, netip.MustParseAddrPort(floatIP+":40020"), true)

	// A UDP flow of pa2 exists on node A with the null binding.
	l.sendUDP("pa2", podA2+":5353", serverIP+":9999")
	if n := countFlows(t, l, "a", func(f conntrack.Flow) bool {
		return f.TupleOrig.IP.SourceAddress == a(podA2) && f.TupleOrig.Proto.Protocol == 17
	}); n != 1 {
		t.Fatalf("udp flows of pa2 on node A: %d", n)
	}

	mustApply(t, db, gatewayState(podA1))
	r := mustApply(t, da, rerouteState(podA1))
	// One element out of the policy's source set, one out of the dispatch map.
	if r.ElementsDeleted != 2 || r.ElementsAdded != 0 {
		t.Fatalf("removal: %+v", r)
	}
	if r.ConntrackDeleted == 0 {
		t.Fatalf("no conntrack entry flushed: %+v", r)
	}
	if n := countFlows(t, l, "a", func(f conntrack.Flow) bool { return f.TupleOrig.IP.SourceAddress == a(podA2) }); n != 0 {
		t.Fatalf("flows of pa2 left on node A: %d", n)
	}
	expectSource(t, l, "pa2", podA2+":40021", seen, netip.AddrPortFrom(a(nodeAIP), 0), false)
	expectSource(t, l, "pa1", podA1+":40022", seen, netip.MustParseAddrPort(floatIP+":40022"), true)
}

// TestCleanup: Cleanup leaves no table, ip rule, route or floating address,
// and is idempotent; an address on the uplink the agent did not add is kept.
func TestCleanup(t *testing.T) {
	l := newLab(t)
	l.build()
	db := l.dataplane("b")
	// Someone else's address that happens to be wanted as floating IP.
	l.ip("b", "addr", "add", "192.0.2.200/24", "dev", "eth0")
	st := gatewayState(podA1)
	st.FloatingIPs = append(st.FloatingIPs, p("192.0.2.200/24"))
	st.Policies = append(st.Policies, selector.PolicyState{Name: "r", Sources: addrList(podB1), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeReroute, NextHop: a("192.0.2.13")})
	mustApply(t, db, st)
	if addrs := l.ip("b", "addr", "show", "dev", "eth0"); !strings.Contains(addrs, floatIP+"/24") {
		t.Fatalf("floating ip not added:\n%s", addrs)
	}
	if err := db.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if out := l.exec("b", "nft", "list", "ruleset"); strings.Contains(out, "egressnat") {
		t.Fatalf("table left:\n%s", out)
	}
	if out := l.ip("b", "rule", "show"); strings.Contains(out, "29000") {
		t.Fatalf("ip rule left:\n%s", out)
	}
	if out := l.ip("b", "route", "show", "table", "all"); regexp.MustCompile(`table 27\d\d`).MatchString(out) {
		t.Fatalf("route left:\n%s", out)
	}
	addrs := l.ip("b", "addr", "show", "dev", "eth0")
	if strings.Contains(addrs, floatIP) {
		t.Fatalf("floating ip left:\n%s", addrs)
	}
	if !strings.Contains(addrs, "192.0.2.200/24") || !strings.Contains(addrs, nodeBIP+"/24") {
		t.Fatalf("addresses the agent did not add were removed:\n%s", addrs)
	}
	if err := db.Cleanup(ctxT(t)); err != nil {
		t.Fatalf("second cleanup: %v", err)
	}
	if r := db.LastResult(); r.Changed() {
		t.Fatalf("second cleanup changed something: %+v", r)
	}
}

// TestGratuitousARP: a peer holding a REACHABLE neighbour entry for the
// floating IP with another MAC switches to the gateway's MAC after Apply.
func TestGratuitousARP(t *testing.T) {
	l := newLab(t)
	l.build()
	mac := strings.TrimSpace(l.exec("b", "cat", "/sys/class/net/eth0/address"))
	l.ip("ext", "neigh", "replace", floatIP, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "reachable")
	db := l.dataplane("b")
	r := mustApply(t, db, gatewayState(podA1))
	if len(r.Announced) != 1 || r.Announced[0] != a(floatIP) {
		t.Fatalf("announced: %v", r.Announced)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		out := l.ip("ext", "neigh", "show", floatIP, "dev", "eth0")
		if strings.Contains(out, mac) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("peer neighbour entry not updated to %s: %s", mac, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Unchanged state: no new announcement.
	if r := mustApply(t, db, gatewayState(podA1)); len(r.Announced) != 0 {
		t.Fatalf("re-announced: %v", r.Announced)
	}
}

func dumpFlows(t *testing.T, l *lab, role string) []conntrack.Flow {
	t.Helper()
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: l.fd(role)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	flows, err := c.DumpFilter(conntrack.NewFilter().Family(tinetfilter.ProtoIPv4), nil)
	if err != nil {
		t.Fatal(err)
	}
	return flows
}

func countFlows(t *testing.T, l *lab, role string, pred func(conntrack.Flow) bool) int {
	t.Helper()
	n := 0
	for _, f := range dumpFlows(t, l, role) {
		if pred(f) {
			n++
		}
	}
	return n
}

// TestConntrackFlush: adding a pod to a policy flushes exactly its flows to
// the policy's destinations; giving up a floating IP flushes exactly the
// flows SNATed to it.
func TestConntrackFlush(t *testing.T) {
	l := newLab(t)
	l.build()
	da, db := l.dataplane("a"), l.dataplane("b")

	// Node A: policy exists but selects only pa2 at first.
	mustApply(t, db, gatewayState(podA2))
	mustApply(t, da, rerouteState(podA2))
	l.sendUDP("pa1", podA1+":6001", serverIP+":9999")  // to a destination: flushed
	l.sendUDP("pa1", podA1+":6002", server2IP+":9999") // elsewhere: kept
	l.sendUDP("pa2", podA2+":6003", serverIP+":9999")  // unchanged pod: kept
	key := func(f conntrack.Flow) string {
		return fmt.Sprintf("%s:%d>%s", f.TupleOrig.IP.SourceAddress, f.TupleOrig.Proto.SourcePort, f.TupleOrig.IP.DestinationAddress)
	}
	udpFrom := func(role string) map[string]bool {
		out := map[string]bool{}
		for _, f := range dumpFlows(t, l, role) {
			if f.TupleOrig.Proto.Protocol == 17 && strings.HasPrefix(f.TupleOrig.IP.SourceAddress.String(), "10.244.") {
				out[key(f)] = true
			}
		}
		return out
	}
	beforeA := udpFrom("a")
	for _, k := range []string{"10.244.1.2:6001>203.0.113.10", "10.244.1.2:6002>198.51.100.10", "10.244.1.3:6003>203.0.113.10"} {
		if !beforeA[k] {
			t.Fatalf("flow %s missing on node A: %v", k, beforeA)
		}
	}
	mustApply(t, db, gatewayState(podA1, podA2, podB1))
	r := mustApply(t, da, rerouteState(podA1, podA2))
	if r.ConntrackDeleted != 1 {
		t.Fatalf("node A flushed %d entries, want 1", r.ConntrackDeleted)
	}
	afterA := udpFrom("a")
	if afterA["10.244.1.2:6001>203.0.113.10"] || !afterA["10.244.1.2:6002>198.51.100.10"] || !afterA["10.244.1.3:6003>203.0.113.10"] {
		t.Fatalf("node A flows after flush: %v", afterA)
	}

	// Node B: flows SNATed to the floating IP (pa2's 6003 went through it
	// too), plus node B's own flow.
	l.sendUDP("pa1", podA1+":6004", serverIP+":9999")
	l.sendUDP("pb1", podB1+":6005", serverIP+":9999")
	l.sendUDP("b", nodeBIP+":6006", serverIP+":9999")
	snated := func(f conntrack.Flow) bool { return f.TupleReply.IP.DestinationAddress == a(floatIP) }
	if n := countFlows(t, l, "b", snated); n != 3 {
		for _, f := range dumpFlows(t, l, "b") {
			t.Logf("%s reply %s", f.TupleOrig, f.TupleReply)
		}
		t.Fatalf("flows SNATed to the floating ip on node B: %d, want 3", n)
	}
	own := func(f conntrack.Flow) bool {
		return f.TupleOrig.IP.SourceAddress == a(nodeBIP) && f.TupleOrig.Proto.SourcePort == 6006
	}
	if countFlows(t, l, "b", own) != 1 {
		t.Fatal("node B's own flow missing")
	}
	// Node B gives the floating IP up (it moved elsewhere): reroute instead.
	st := rerouteState(podA1, podA2, podB1)
	st.Policies[0].NextHop = a("192.0.2.13")
	r = mustApply(t, db, st)
	if r.ConntrackDeleted != 3 {
		t.Fatalf("node B flushed %d entries, want 3", r.ConntrackDeleted)
	}
	if n := countFlows(t, l, "b", snated); n != 0 {
		t.Fatalf("flows SNATed to the given-up ip left: %d", n)
	}
	if countFlows(t, l, "b", own) != 1 {
		t.Fatal("node B's own flow was flushed")
	}
	if addrs := l.ip("b", "addr", "show", "dev", "eth0"); strings.Contains(addrs, floatIP) {
		t.Fatalf("given-up floating ip still on uplink:\n%s", addrs)
	}
}

// TestLargeSet: more than 10k sources apply in several bounded transactions,
// a large diff too, and an unchanged large state changes nothing.
func TestLargeSet(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	srcs := func(from, n int) []netip.Addr {
		out := make([]netip.Addr, 0, n)
		for i := from; i < from+n; i++ {
			out = append(out, netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}))
		}
		return out
	}
	st := rerouteState()
	st.Policies[0].Sources = srcs(0, 12000)
	r := mustApply(t, da, st)
	// Each source of a Reroute or Drop policy is an element of its set and
	// of the dispatch map; plus the destination interval (2 elements), in
	// the policy's set and in the held destinations.
	if r.Transactions < 2 || r.ElementsAdded != 2*12000+2+2 {
		t.Fatalf("large apply: %+v", r)
	}
	if n := setSize(t, l, "a", "src-web"); n != 12000 {
		t.Fatalf("set holds %d elements", n)
	}
	if r := mustApply(t, da, st); r.Changed() {
		t.Fatalf("unchanged large state changed: %+v", r)
	}
	// Replace 9000 of them: 9000 adds and 9000 deletes, add before delete.
	st.Policies[0].Sources = srcs(9000, 12000)
	r = mustApply(t, da, st)
	if r.ElementsAdded != 2*9000 || r.ElementsDeleted != 2*9000 || r.Transactions < 3 || r.Incremental || r.SetsSwapped != 1 {
		t.Fatalf("large diff (more than a batch: the full path, the set swapped): %+v", r)
	}
	if n := setSize(t, l, "a", "src-web"); n != 12000 {
		t.Fatalf("set holds %d elements after the swap", n)
	}
	if out := l.exec("a", "nft", "list", "sets", "ip"); strings.Contains(out, "-swap") {
		t.Fatalf("the swap copy is left:\n%s", out)
	}
	if drift, err := da.Verify(ctxT(t)); drift != "" || err != nil {
		t.Fatalf("after the swap: %q, %v", drift, err)
	}
	// A small change of the same large state is incremental again.
	st.Policies[0].Sources = srcs(9001, 12000)
	if r := mustApply(t, da, st); !r.Incremental || r.ElementsAdded != 2 || r.ElementsDeleted != 2 {
		t.Fatalf("small change: %+v", r)
	}
	st.Policies[0].Sources = srcs(9000, 12000)
	mustApply(t, da, st)
	if n := setSize(t, l, "a", "src-web"); n != 12000 {
		t.Fatalf("set holds %d elements after diff", n)
	}
	// A new policy with a big set: filled before its rule references it.
	st.Policies = append(st.Policies, selector.PolicyState{Name: "big", Sources: srcs(30000, 11000), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeDrop})
	r = mustApply(t, da, st)
	if r.ElementsAdded != 2*11000+2+2 || r.Transactions < 2 { // its destination held too
		t.Fatalf("new big policy: %+v", r)
	}
	if n := setSize(t, l, "a", "src-big"); n != 11000 {
		t.Fatalf("big set holds %d", n)
	}
}

func setSize(t *testing.T, l *lab, role, set string) int {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(l.fd(role)))
	if err != nil {
		t.Fatal(err)
	}
	el, err := c.GetSetElements(&nftables.Set{Table: &nftables.Table{Name: DefaultTable, Family: nftables.TableFamilyIPv4}, Name: set})
	if err != nil {
		t.Fatal(err)
	}
	return len(el)
}

// TestMarksAndRoutes: each next hop gets its own mark, rule and table; the
// assignment survives a restart and removal of another next hop; stale rules
// and tables are removed.
func TestMarksAndRoutes(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	st := rerouteState(podA1)
	st.Policies = append(st.Policies, selector.PolicyState{Name: "x", Sources: addrList(podA2), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeReroute, NextHop: a("192.0.2.13")})
	r := mustApply(t, da, st)
	if r.Marks[a(nodeBIP)] != 0x100 || r.Marks[a("192.0.2.13")] != 0x200 {
		t.Fatalf("marks: %v", r.Marks)
	}
	// Drop next hop B; the other keeps mark 0x200 (restarted agent).
	st.Policies = st.Policies[1:]
	r = mustApply(t, l.dataplane("a"), st)
	if r.Marks[a("192.0.2.13")] != 0x200 || len(r.Marks) != 1 {
		t.Fatalf("marks after removal: %v", r.Marks)
	}
	rules := l.ip("a", "rule", "show")
	if strings.Contains(rules, "lookup 2701") || !strings.Contains(rules, "fwmark 0x200/0x3f00 lookup 2702") {
		t.Fatalf("ip rules:\n%s", rules)
	}
	if out := l.ip("a", "route", "show", "table", "2701"); strings.TrimSpace(out) != "" {
		t.Fatalf("stale table 2701:\n%s", out)
	}
	// A new next hop takes the lowest free mark.
	st.Policies = append(st.Policies, selector.PolicyState{Name: "y", Sources: addrList(podA1), Destinations: []netip.Prefix{p("203.0.113.0/24")}, Mode: selector.ModeReroute, NextHop: a("192.0.2.14")})
	r = mustApply(t, da, st)
	if r.Marks[a("192.0.2.14")] != 0x100 || r.Marks[a("192.0.2.13")] != 0x200 {
		t.Fatalf("marks: %v", r.Marks)
	}
}

func kernelRanges(t *testing.T, l *lab, role, set string) []ipRange {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(l.fd(role)))
	if err != nil {
		t.Fatal(err)
	}
	el, err := c.GetSetElements(&nftables.Set{Table: &nftables.Table{Name: DefaultTable, Family: nftables.TableFamilyIPv4}, Name: set})
	if err != nil {
		t.Fatal(err)
	}
	return elemRanges(el)
}

func sameRanges(a, b []ipRange) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if compareRange(a[i], b[i]) != 0 {
			return false
		}
	}
	return true
}

// TestDestinationChanges: interval sets change by diff, including ranges
// that replace overlapping ones (deleted and added in one transaction), open
// and adjacent ranges, and diffs too large for one transaction.
func TestDestinationChanges(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	st := rerouteState(podA1)
	set := func(ps ...netip.Prefix) {
		t.Helper()
		st.Policies[0].Destinations = ps
		mustApply(t, da, st)
		if got, want := kernelRanges(t, l, "a", "dst-web"), mergeOverlaps(prefixRanges(ps)); !sameRanges(got, want) {
			t.Fatalf("kernel ranges %v, want %v", got, want)
		}
	}
	set(p("203.0.113.0/25"), p("203.0.113.128/25"), p("255.0.0.0/8"))
	set(p("203.0.113.0/24"), p("198.51.100.0/24")) // two adjacent replaced by their union
	set(p("198.51.100.0/25"), p("0.0.0.0/0"))      // an open range over the others
	set(p("203.0.113.0/24"), p("198.51.100.0/24"))
	if r := da.LastResult(); len(r.ChainsRebuilt) != 0 {
		t.Fatalf("destination change rebuilt chains: %+v", r)
	}

	// 6000 host ranges (12000 elements), then half of them widened.
	var hosts, widened []netip.Prefix
	for i := range 6000 {
		a := netip.AddrFrom4([4]byte{10, 244, byte(i * 2 >> 8), byte(i * 2)})
		hosts = append(hosts, netip.PrefixFrom(a, 32))
		if i < 3000 {
			widened = append(widened, netip.PrefixFrom(a, 31))
		} else {
			widened = append(widened, netip.PrefixFrom(a, 32))
		}
	}
	set(hosts...)
	if r := da.LastResult(); r.Transactions < 2 {
		t.Fatalf("12000 elements in one transaction: %+v", r)
	}
	set(widened...)
	// The policy's set and the held destinations change alike.
	if r := da.LastResult(); r.Transactions < 2 || r.ElementsAdded != 2*6000 || r.ElementsDeleted != 2*6000 {
		t.Fatalf("widening: %+v", r)
	}
}

// TestManyPolicies: hundreds of policies and many next hops apply (in a few
// bounded transactions: 600 new sets), re-apply without change, and shrink
// cleanly.
func TestManyPolicies(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	var st selector.NodeState
	for i := range 300 {
		pol := selector.PolicyState{
			Name:         fmt.Sprintf("team-%03d", i),
			Sources:      []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 100, byte(i)})},
			Destinations: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 256)}), 32)},
		}
		switch i % 3 {
		case 0:
			pol.Mode, pol.NextHop = selector.ModeReroute, netip.AddrFrom4([4]byte{192, 0, 2, byte(20 + i%40)})
		case 1:
			pol.Mode, pol.EgressIP = selector.ModeGateway, a(floatIP)
		default:
			pol.Mode = selector.ModeDrop
		}
		st.Policies = append(st.Policies, pol)
	}
	r := mustApply(t, da, st)
	if r.Transactions < 1 || len(r.Marks) != 40 {
		t.Fatalf("first apply: transactions %d, marks %d", r.Transactions, len(r.Marks))
	}
	before := l.snapshot("a")
	if r := mustApply(t, da, st); r.Changed() {
		t.Fatalf("re-apply changed: %+v", r)
	}
	if l.snapshot("a") != before {
		t.Fatal("kernel changed on re-apply")
	}
	st.Policies = st.Policies[:30]
	r = mustApply(t, da, st)
	if r.SetsDeleted != 540 || len(r.Marks) != 10 {
		t.Fatalf("shrink: sets deleted %d, marks %d", r.SetsDeleted, len(r.Marks))
	}
	if n := strings.Count(l.ip("a", "rule", "show"), "fwmark"); n != 10 {
		t.Fatalf("%d fwmark rules left, want 10", n)
	}
}

// TestPodInSeveralPolicies: a pod two Reroute policies select goes through
// the shared chain, and each destination takes its own policy's path; a pod
// one policy selects jumps straight to that policy's chain. The dispatch is
// one map lookup whatever the number of policies.
func TestPodInSeveralPolicies(t *testing.T) {
	l := newLab(t)
	l.build()
	seen := l.server("ext", serverIP+":8080")
	da, db := l.dataplane("a"), l.dataplane("b")
	mustApply(t, db, gatewayState(podA1, podA2))
	st := rerouteState(podA1, podA2)
	// "other": podA1 only, another destination, a next hop that does not
	// exist; listed first by name, so it comes first in the shared chain.
	st.Policies = append([]selector.PolicyState{{Name: "other", Sources: addrList(podA1), Destinations: []netip.Prefix{p("198.51.100.0/24")},
		Mode: selector.ModeReroute, NextHop: a("192.0.2.13")}}, st.Policies...)
	mustApply(t, da, st)

	c, err := nftables.New(nftables.WithNetNSFd(l.fd("a")))
	if err != nil {
		t.Fatal(err)
	}
	ks, err := tableReader{c: c, name: da.cfg.Table}.all(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	jumps := elemJumps(ks.elems[setPreSrc])
	if jumps[a(podA1)] != chainMulti || jumps[a(podA2)] != policyChainName("web") || len(jumps) != 2 {
		t.Fatalf("dispatch map: %v", jumps)
	}
	if n := len(ks.rules[chainPrerouting]); n != 4 {
		t.Fatalf("prerouting has %d rules, want the guard, the reply and internal returns, and the dispatch", n)
	}
	// podA1 to 203.0.113.10 is policy web's (via B), not other's.
	expectSource(t, l, "pa1", podA1+":40021", seen, netip.MustParseAddrPort(floatIP+":40021"), true)
	expectSource(t, l, "pa2", podA2+":40022", seen, netip.MustParseAddrPort(floatIP+":40022"), true)
	counters, err := da.Dump(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, cn := range counters {
		if cn.Policy == "other" && cn.Packets != 0 {
			t.Fatalf("policy other matched traffic to another destination: %+v", counters)
		}
		if cn.Policy == "web" && cn.Packets == 0 {
			t.Fatalf("policy web counted nothing: %+v", counters)
		}
	}
	// Dropping the second policy sends podA1 back to web's own chain, and
	// the unused chain goes away.
	mustApply(t, da, rerouteState(podA1, podA2))
	ks, err = tableReader{c: c, name: da.cfg.Table}.all(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if j := elemJumps(ks.elems[setPreSrc]); j[a(podA1)] != policyChainName("web") {
		t.Fatalf("dispatch map after removal: %v", j)
	}
	if _, ok := ks.chains[policyChainName("other")]; ok {
		t.Fatal("the chain of a removed policy is still there")
	}
}

// TestReleaseFloating: without a table it does nothing; on a gateway it
// removes the recorded floating IPs from the uplink and the record, and
// keeps the rest of the table.
func TestReleaseFloating(t *testing.T) {
	l := newLab(t)
	l.build()
	db := l.dataplane("b")
	if err := db.ReleaseFloating(ctxT(t)); err != nil {
		t.Fatalf("no table: %v", err)
	}
	mustApply(t, db, gatewayState(podA1))
	if !strings.Contains(l.ip("b", "-4", "addr", "show", "dev", "eth0"), floatIP+"/") {
		t.Fatal("gateway does not hold the floating IP")
	}
	if err := db.ReleaseFloating(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(l.ip("b", "-4", "addr", "show", "dev", "eth0"), floatIP+"/") {
		t.Fatal("floating IP still on the uplink")
	}
	if n := setSize(t, l, "b", setFloating); n != 0 {
		t.Fatalf("floating set holds %d elements", n)
	}
	if n := setSize(t, l, "b", "src-web"); n != 1 {
		t.Fatalf("the policy's set was touched: %d elements", n)
	}
}
