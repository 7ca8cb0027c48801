package nft

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"

	"github.com/egressnat/egressnat/selector"
)

// overlapState: on a node with local pods pa1 and pa2,
//
//	narrow (Gateway, 192.0.2.101): pa1 to 203.0.113.10/32
//	web    (Reroute via B):       pa1, pa2 to 203.0.113.0/24
//	deny   (Drop):                pa2 to 198.51.100.0/25
//	wide   (Gateway, 192.0.2.100): pa1, pb1, 10.244.7.7 to 0.0.0.0/0
//
// with the pod network excluded. pa1 is shared (a Reroute and Gateway
// policies select it): precedence (the longest destination first) decides
// in the shared chain, then in postrouting.
func overlapState() selector.NodeState {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pol := func(name string, mode selector.Mode, srcs []netip.Addr, dsts ...string) selector.PolicyState {
		var ps []netip.Prefix
		for _, d := range dsts {
			ps = append(ps, p(d))
		}
		return selector.PolicyState{Name: name, Mode: mode, Sources: srcs, Destinations: ps, Written: ps, Created: t0}
	}
	narrow := pol("narrow", selector.ModeGateway, addrList(podA1), serverIP+"/32")
	narrow.EgressIP = a("192.0.2.101")
	web := pol("web", selector.ModeReroute, addrList(podA1, podA2), "203.0.113.0/24")
	web.NextHop = a(nodeBIP)
	deny := pol("deny", selector.ModeDrop, addrList(podA2), "198.51.100.0/25")
	wide := pol("wide", selector.ModeGateway, addrList(podA1, podB1, "10.244.7.7"), "0.0.0.0/0")
	wide.EgressIP = a(floatIP)
	return selector.NodeState{
		Policies:    []selector.PolicyState{narrow, web, deny, wide},
		FloatingIPs: []netip.Prefix{p(floatIP + "/24"), p("192.0.2.101/24")},
		Excluded:    []netip.Prefix{p("10.244.0.0/16")},
	}
}

// overlapExpect is what overlapState decides, by "src>dst": the egress IP,
// or "" (not SNATed by a Gateway policy here).
var overlapExpect = map[string]string{
	podA1 + ">" + serverIP:           "192.0.2.101", // narrow's /32 first, in both chains
	podA1 + ">203.0.113.20":          "",            // web's /24 reroutes it
	podA1 + ">" + server2IP:          floatIP,       // wide
	podA1 + ">10.244.3.3":            "",            // cluster-internal
	podA2 + ">" + serverIP:           "",            // no Gateway policy selects pa2
	podA2 + ">" + server2IP:          "",
	podB1 + ">" + serverIP:           floatIP, // a remote pod: narrow does not select it
	podB1 + ">203.0.113.20":          floatIP,
	podB1 + ">10.244.3.3":            "",
	"10.244.7.7>198.51.100.200":      floatIP,
	"10.244.9.9>" + serverIP:         "", // selected by no policy
	"10.244.9.9>198.51.100.200":      "",
	podA1 + ">255.255.255.254":       floatIP, // /0 reaches the top of the space
	"10.244.7.7>0.0.0.1":             floatIP,
	podB1 + ">" + floatIP:            floatIP,
	"192.0.2.12>" + serverIP:         "",
	podA1 + ">198.51.100.1":          floatIP, // deny does not select pa1
	podA2 + ">198.51.100.1":          "",
	"10.244.7.7>" + serverIP:         floatIP,
	podB1 + ">203.0.113.255":         floatIP,
	podA1 + ">203.0.113.255":         "",
	podA1 + ">203.0.113.9":           "",
	podA1 + ">203.0.113.11":          "",
	podA1 + ">" + "192.0.2.1":        floatIP,
	podB1 + ">" + "198.51.100.128":   floatIP,
	podA2 + ">" + "198.51.100.128":   "",
	"10.244.7.8>" + "198.51.100.128": "",
}

func checkModel(t *testing.T, what string, m *snatModel) {
	t.Helper()
	for k, want := range overlapExpect {
		src, dst, _ := strings.Cut(k, ">")
		r, ok := m.expect(a(src), a(dst))
		got := ""
		if ok {
			got = r.egress.String()
		}
		if got != want {
			t.Errorf("%s: %s -> %s: SNAT to %q, want %q", what, src, dst, got, want)
		}
	}
}

// TestSNATModel: the model of which translation a conntrack entry should
// carry follows the rules' precedence, built from the applied table (the
// cache) or decoded from the rules as the kernel returns them.
func TestSNATModel(t *testing.T) {
	nf, k := fakeNF(t)
	change(t, nf, overlapState(), false)
	m, err := modelOfCache(nf.cache, nf.cache.jumpMap())
	if err != nil {
		t.Fatal(err)
	}
	checkModel(t, "cache", m)
	if got := m.egresses(); !slices.Equal(got, addrList(floatIP, "192.0.2.101")) {
		t.Errorf("egresses %v", got)
	}
	ks, err := k.read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m, err = modelOfRules(ks.rules, func(set string) ([]nftables.SetElement, error) { return ks.elems[set], nil })
	if err != nil {
		t.Fatal(err)
	}
	checkModel(t, "decoded", m)

	// Decoding: each policy rule of the two chains, as written.
	for _, chain := range []string{chainMulti, chainPostrouting} {
		for _, r := range nf.cache.specs[chain] {
			kr := &nftables.Rule{Exprs: r.exprs(func(name string) *nftables.Set { return &nftables.Set{Name: name} }), UserData: r.userData()}
			mr, ok := decodeModelRule(kr)
			if r.src == "" || r.kind == ruleForwardGuard {
				if ok {
					t.Errorf("%s: %s decoded as a policy rule: %+v", chain, r, mr)
				}
				continue
			}
			wantDst, wantPfx, wantAll := r.dst, r.pfx, false
			if r.pfx.IsValid() {
				wantDst = ""
				if r.pfx.Bits() == 0 {
					wantPfx, wantAll = netip.Prefix{}, true
				}
			}
			if !ok || mr.kind != r.kind || mr.src != r.src || mr.dst != wantDst || mr.pfx != wantPfx || mr.all != wantAll ||
				mr.egress != r.egress || mr.policy != r.policy {
				t.Errorf("%s: %s decoded as %+v", chain, r, mr)
			}
		}
	}

	// narrow's IP released: its SNAT rule became a drop rule with the same
	// match (Release); its flows are decided there, not by wide's rule.
	released := slices.Clone(ks.rules[chainPostrouting])
	byName := func(name string) *nftables.Set { return &nftables.Set{Name: name} }
	n := 0
	for i, r := range nf.cache.specs[chainPostrouting] {
		if r.kind == ruleGateway && r.policy == "narrow" {
			r.kind, r.egress, r.oif = ruleDrop, netip.Addr{}, ""
			released[i] = &nftables.Rule{Exprs: r.exprs(byName), UserData: r.userData()}
			n++
		}
	}
	if n != 1 {
		t.Fatalf("narrow has %d SNAT rules", n)
	}
	m, err = modelOfRules(map[string][]*nftables.Rule{chainMulti: ks.rules[chainMulti], chainPostrouting: released},
		func(set string) ([]nftables.SetElement, error) { return ks.elems[set], nil })
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := m.expect(a(podA1), a(serverIP)); ok {
		t.Errorf("a flow of a released policy expects %s", r.egress)
	}
	if r, ok := m.expect(a(podB1), a(serverIP)); !ok || r.egress != a(floatIP) {
		t.Errorf("wide's flow after narrow's release: %v %v", r, ok)
	}
	if got := m.egresses(); !slices.Equal(got, addrList(floatIP)) {
		t.Errorf("egresses after the release: %v", got)
	}

	// No Gateway policy: an empty model.
	nf2, _ := fakeNF(t)
	change(t, nf2, rerouteState(podA1), false)
	if m, err := modelOfCache(nf2.cache, nf2.cache.jumpMap()); err != nil || !m.empty() {
		t.Fatalf("reroute only: %+v %v", m, err)
	}
}

// TestSNATModelFromKernel: the same model from the cache of a real Apply
// and from the kernel's table (ReadTable for egressnatctl).
func TestSNATModelFromKernel(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	mustApply(t, da, overlapState())
	m, err := da.snatModel(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	checkModel(t, "cache", m)
	c, err := nftables.New(nftables.WithNetNSFd(l.fd("a")))
	if err != nil {
		t.Fatal(err)
	}
	m, err = modelOfKernel(ctxT(t), tableReader{c: c, name: DefaultTable})
	if err != nil {
		t.Fatal(err)
	}
	checkModel(t, "kernel", m)
	// A restarted agent (no cache) reads the kernel.
	m, err = l.dataplane("a").snatModel(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	checkModel(t, "restarted", m)
	tbl, err := ReadTable(ctxT(t), l.fd("a"), DefaultTable)
	if err != nil {
		t.Fatal(err)
	}
	check := tbl.SNATCheck()
	if pol, egress, ok := check.Expect(a(podA1), a(serverIP)); !ok || pol != "narrow" || egress != a("192.0.2.101") {
		t.Errorf("ReadTable check: %s %s %v", pol, egress, ok)
	}
	if ps := check.Policies(); len(ps) != 2 || !slices.Equal(ps[a(floatIP)], []string{"wide"}) {
		t.Errorf("policies by egress IP: %v", ps)
	}
}

// createFlow creates a TCP conntrack entry src:sport -> dst:443 whose
// replies go to replyTo (src itself: not NATed).
func createFlow(t *testing.T, l *lab, role, src string, sport uint16, dst, replyTo string) {
	t.Helper()
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: l.fd(role)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	status := conntrack.StatusConfirmed | conntrack.StatusSeenReply | conntrack.StatusAssured
	if replyTo != src {
		status |= conntrack.StatusSrcNAT
	}
	f := conntrack.NewFlow(6, status, a(src), a(dst), sport, 443, 120, 0)
	f.TupleReply.IP.DestinationAddress = a(replyTo)
	if err := c.Create(f); err != nil {
		t.Fatalf("create conntrack entry %s:%d -> %s: %v", src, sport, dst, err)
	}
}

func hasFlow(t *testing.T, l *lab, role string, src string, sport uint16) bool {
	t.Helper()
	return countFlows(t, l, role, func(f conntrack.Flow) bool {
		return f.TupleOrig.IP.SourceAddress == a(src) && f.TupleOrig.Proto.SourcePort == sport
	}) > 0
}

// TestVerifyTaken: on the node that took the floating IPs, the entries of
// its Gateway policies translated to their egress IP are counted, the
// others (not NATed, masqueraded, SNATed to another floating IP) counted
// and flushed, per IP; entries of no Gateway policy, of a destination a
// Reroute policy takes first, or of an IP not asked about are left alone.
func TestVerifyTaken(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	mustApply(t, da, overlapState())
	const narrowIP = "192.0.2.101"
	createFlow(t, l, "a", podB1, 1001, serverIP, floatIP)         // wide: translated
	createFlow(t, l, "a", "10.244.7.7", 1002, server2IP, floatIP) // wide: translated
	createFlow(t, l, "a", podB1, 1003, server2IP, podB1)          // wide: not NATed
	createFlow(t, l, "a", podB1, 1004, "203.0.113.20", nodeAIP)   // wide: masqueraded
	createFlow(t, l, "a", podA1, 1005, serverIP, narrowIP)        // narrow: translated
	createFlow(t, l, "a", podA1, 1006, serverIP, floatIP)         // narrow: SNATed to wide's IP
	createFlow(t, l, "a", podA1, 1007, "203.0.113.20", podA1)     // web reroutes it: not ours
	createFlow(t, l, "a", podA2, 1008, serverIP, nodeAIP)         // no Gateway policy selects pa2
	createFlow(t, l, "a", podB1, 1009, "10.244.3.3", podB1)       // cluster-internal

	v, err := da.VerifyTaken(ctxT(t), addrList(floatIP))
	if err != nil {
		t.Fatal(err)
	}
	if v.Translated != 2 || v.Wrong != 2 || v.Flushed != 2 || v.Remaining != 0 || len(v.PerIP) != 1 ||
		v.PerIP[a(floatIP)] != (CTVerifyIP{Translated: 2, Wrong: 2, Flushed: 2}) {
		t.Fatalf("taken %s: %+v", floatIP, v)
	}
	for port, want := range map[uint16]bool{1001: true, 1002: true, 1003: false, 1004: false, 1005: true, 1006: true, 1007: true, 1008: true, 1009: true} {
		src := podB1
		switch port {
		case 1002:
			src = "10.244.7.7"
		case 1005, 1006, 1007:
			src = podA1
		case 1008:
			src = podA2
		}
		if got := hasFlow(t, l, "a", src, port); got != want {
			t.Errorf("entry from port %d present %v, want %v", port, got, want)
		}
	}

	// Both IPs, from a restarted agent (the table read back): narrow's
	// entry SNATed to the other IP is flushed now.
	v, err = l.dataplane("a").VerifyTaken(ctxT(t), addrList(floatIP, narrowIP))
	if err != nil {
		t.Fatal(err)
	}
	if v.Translated != 3 || v.Wrong != 1 || v.Flushed != 1 || v.Remaining != 0 ||
		v.PerIP[a(narrowIP)] != (CTVerifyIP{Translated: 1, Wrong: 1, Flushed: 1}) || v.PerIP[a(floatIP)] != (CTVerifyIP{Translated: 2}) {
		t.Fatalf("taken both: %+v", v)
	}
	if hasFlow(t, l, "a", podA1, 1006) || !hasFlow(t, l, "a", podA1, 1005) {
		t.Fatal("narrow's entries after the check")
	}
	// Nothing asked, or an IP no policy uses: nothing done.
	if v, err := da.VerifyTaken(ctxT(t), nil); err != nil || v.Translated+v.Wrong != 0 {
		t.Fatalf("no IP: %+v %v", v, err)
	}
	createFlow(t, l, "a", podB1, 1010, server2IP, podB1)
	if v, err := da.VerifyTaken(ctxT(t), addrList("192.0.2.102")); err != nil || v.Translated+v.Wrong != 0 || len(v.PerIP) != 1 {
		t.Fatalf("an IP of no policy: %+v %v", v, err)
	}
	if !hasFlow(t, l, "a", podB1, 1010) {
		t.Fatal("an entry of another IP was flushed")
	}
}

// TestVerifyReleased: after the node gave an IP up, the entries still
// SNATed to it are flushed and counted, per IP; others are kept. A real
// flow, SNATed by the gateway rule, is found and flushed too.
func TestVerifyReleased(t *testing.T) {
	l := newLab(t)
	l.build()
	db := l.dataplane("b")
	mustApply(t, db, gatewayState(podA1, podB1))
	createFlow(t, l, "b", podA1, 2001, serverIP, floatIP)
	createFlow(t, l, "b", podB1, 2002, server2IP, floatIP) // another destination, same IP
	createFlow(t, l, "b", podB1, 2003, serverIP, nodeBIP)  // masqueraded: not the IP's
	createFlow(t, l, "b", podA2, 2004, serverIP, "192.0.2.101")
	createFlow(t, l, "b", floatIP, 2005, nodeBIP, floatIP) // from the IP itself: not a translation
	v, err := db.VerifyReleased(ctxT(t), addrList(floatIP))
	if err != nil {
		t.Fatal(err)
	}
	if v.Flushed != 2 || v.Remaining != 0 || v.PerIP[a(floatIP)] != (CTVerifyIP{Flushed: 2}) {
		t.Fatalf("released: %+v", v)
	}
	if hasFlow(t, l, "b", podA1, 2001) || hasFlow(t, l, "b", podB1, 2002) || !hasFlow(t, l, "b", podB1, 2003) || !hasFlow(t, l, "b", podA2, 2004) ||
		!hasFlow(t, l, "b", floatIP, 2005) {
		t.Fatal("entries after the check")
	}
	if v, err := db.VerifyReleased(ctxT(t), nil); err != nil || v.Flushed != 0 {
		t.Fatalf("nothing released: %+v %v", v, err)
	}

	// Real traffic: pb1's UDP flow is SNATed to the floating IP on B.
	l.sendUDP("pb1", podB1+":7001", serverIP+":9999")
	snated := func(f conntrack.Flow) bool {
		return f.TupleReply.IP.DestinationAddress == a(floatIP) && f.TupleOrig.IP.SourceAddress != a(floatIP)
	}
	if n := countFlows(t, l, "b", snated); n != 1 {
		t.Fatalf("entries SNATed to the floating IP: %d, want 1", n)
	}
	v, err = db.VerifyReleased(ctxT(t), addrList(floatIP, "192.0.2.101"))
	if err != nil || v.Flushed != 2 || v.Remaining != 0 || v.PerIP[a(floatIP)] != (CTVerifyIP{Flushed: 1}) ||
		v.PerIP[a("192.0.2.101")] != (CTVerifyIP{Flushed: 1}) {
		t.Fatalf("released with traffic: %+v %v", v, err)
	}
	if n := countFlows(t, l, "b", snated); n != 0 {
		t.Fatalf("entries SNATed to the released IP left: %d", n)
	}
}
