package nft

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// fakeNF is a netfilter owner whose kernel is a fakeKernel.
func fakeNF(t *testing.T) (*netfilter, *fakeKernel) {
	t.Helper()
	cfg, err := Config{Uplink: "eth0"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	k := newFakeKernel(cfg.Table)
	return &netfilter{cfg: cfg, exec: k, read: k.read}, k
}

// desire computes what the table must hold for st, marks allocated fresh.
func desire(t *testing.T, nf *netfilter, st selector.NodeState, floating ...netip.Addr) desiredNFT {
	t.Helper()
	n, err := normalizeState(st)
	if err != nil {
		t.Fatal(err)
	}
	marks, err := selector.AllocateMarks(nf.cfg.MarkMask, selector.NextHops(st), nil)
	if err != nil {
		t.Fatal(err)
	}
	return desiredNFT{state: st, marks: marks, sources: n.sources, dests: n.dests, floating: floating, jumps: preSrcTargets(st)}
}

// change plans st against the fake kernel (a read of it, or the cache),
// runs the plan and returns it; the cache is updated as an Apply does.
func change(t *testing.T, nf *netfilter, st selector.NodeState, fromCache bool) *nftPlan {
	t.Helper()
	ks := nf.cache
	if !fromCache || ks == nil {
		var err error
		if ks, err = nf.read(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	want := desire(t, nf, st)
	p := nf.plan(ks, want)
	if _, err := nf.exec.run(context.Background(), &p.Plan); err != nil {
		t.Fatalf("run plan:\n%.2000s\nerror: %v", p, err)
	}
	nf.cache = p.after(nf, ks, want, nil)
	return p
}

func addrRange(from, n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{10, 128, byte((from + i) >> 8), byte(from + i)})
	}
	return out
}

// TestPlanText: the plan of a small state on an empty kernel, as nft -f
// text. Sets are created and filled, then the chains that read them, then
// the dispatch map, then the dispatch rule that reads the map.
func TestPlanText(t *testing.T) {
	nf, k := fakeNF(t)
	// 10.244.1.2 is selected by both policies, whose destinations
	// overlap: it jumps to the shared chain, whose rules rank each
	// destination (web's /25 first, then the /24s, gw being older).
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "gw", Sources: addrList("10.244.1.2", "10.244.2.2"), Destinations: []netip.Prefix{p("203.0.113.0/24")},
			Written: []netip.Prefix{p("203.0.113.0/24")}, Created: t0, Mode: selector.ModeGateway, EgressIP: a("192.0.2.100")},
		{Name: "web", Sources: addrList("10.244.1.2", "10.244.1.3"), Destinations: []netip.Prefix{p("198.51.100.0/24"), p("203.0.113.128/25")},
			Written: []netip.Prefix{p("198.51.100.0/24"), p("203.0.113.128/25")}, Created: t0.Add(time.Hour),
			Mode: selector.ModeReroute, EgressIP: a("192.0.2.101"), NextHop: a("192.0.2.12")},
	}, Excluded: []netip.Prefix{p("10.96.0.0/12"), p("10.244.0.0/16")},
		LocalPods: addrList("10.244.1.2", "10.244.1.3", "10.244.1.9"), PodNetworks: []netip.Prefix{p("10.244.0.0/16")},
		ReturnRoutes: []selector.ReturnRoute{{Dst: p("10.244.2.0/24"), Via: a("192.0.2.12")}}}
	got := change(t, nf, st, false).String()
	want := `add table ip egressnat
add set ip egressnat src-gw { type ipv4_addr; comment "sources of policy gw"; }
add set ip egressnat dst-gw { type ipv4_addr; flags interval; comment "destinations of policy gw"; }
add set ip egressnat src-web { type ipv4_addr; comment "sources of policy web"; }
add set ip egressnat dst-web { type ipv4_addr; flags interval; comment "destinations of policy web"; }
add set ip egressnat floating { type ipv4_addr; comment "floating IPs added by egressnat"; }
add set ip egressnat internal { type ipv4_addr; flags interval; comment "cluster-internal destinations: never steered"; }
add set ip egressnat pre-src { type ipv4_addr : verdict; comment "sources of reroute and drop policies -> their chain"; }
add set ip egressnat known-pods { type ipv4_addr; comment "this node's pods egressnat knows"; }
add set ip egressnat pod-nets { type ipv4_addr; flags interval; comment "pod networks"; }
add set ip egressnat held-dests { type ipv4_addr; flags interval; comment "every policy's destinations: held from pods egressnat does not know yet"; }
add element ip egressnat src-gw { 10.244.1.2, 10.244.2.2 }
add element ip egressnat dst-gw { 203.0.113.0-203.0.113.255 }
add element ip egressnat src-web { 10.244.1.2, 10.244.1.3 }
add element ip egressnat dst-web { 198.51.100.0-198.51.100.255, 203.0.113.128-203.0.113.255 }
add element ip egressnat internal { 10.96.0.0-10.111.255.255, 10.244.0.0-10.244.255.255 }
add element ip egressnat known-pods { 10.244.1.2, 10.244.1.3, 10.244.1.9 }
add element ip egressnat pod-nets { 10.244.0.0-10.244.255.255 }
add element ip egressnat held-dests { 198.51.100.0-198.51.100.255, 203.0.113.0-203.0.113.255 }
add chain ip egressnat multi
add chain ip egressnat postrouting { type nat hook postrouting priority 99; policy accept; }
add chain ip egressnat pp-web
add rule ip egressnat multi ip saddr @src-web ip daddr 203.0.113.128/25 counter meta mark set meta mark & 0xffffc0ff | 0x00000100 return comment "policy web: reroute via 192.0.2.12 mark 0x100"
add rule ip egressnat multi ip saddr @src-gw ip daddr 203.0.113.0/24 counter return comment "policy gw: snat to 192.0.2.100"
add rule ip egressnat multi ip saddr @src-web ip daddr 198.51.100.0/24 counter meta mark set meta mark & 0xffffc0ff | 0x00000100 return comment "policy web: reroute via 192.0.2.12 mark 0x100"
add rule ip egressnat postrouting meta mark & 0x00003f00 == 0x00003f00 meta mark set meta mark & 0xffffc0ff comment "reverse-path mark cleared: not a reroute mark"
add rule ip egressnat postrouting ip daddr @internal return comment "cluster-internal destinations are never steered"
add rule ip egressnat postrouting meta mark & 0x00003f00 != 0 counter snat to ip saddr comment "marked by egressnat: keep from masquerade"
add rule ip egressnat postrouting ip saddr @src-gw ip daddr @dst-gw oifname "eth0" counter snat to 192.0.2.100 comment "policy gw: snat to 192.0.2.100"
add rule ip egressnat postrouting ip saddr @internal iifname "eth0" oifname "eth0" counter drop comment "rerouted here, not SNATed by egressnat: drop, never masquerade"
add rule ip egressnat pp-web ip daddr @dst-web counter meta mark set meta mark & 0xffffc0ff | 0x00000100 comment "policy web: reroute via 192.0.2.12 mark 0x100"
add element ip egressnat pre-src { 10.244.1.2 : jump multi, 10.244.1.3 : jump pp-web }
add chain ip egressnat prerouting { type filter hook prerouting priority -150; policy accept; }
add rule ip egressnat prerouting ip daddr @floating ct state new counter drop comment "floating IPs are egress-only: no new inbound flows"
add rule ip egressnat prerouting ct direction reply ct mark & 0x00003f00 == 0x00003f00 meta mark set meta mark & 0xffffc0ff | 0x00003e00 comment "reply to traffic rerouted here: back by the uplink to the node that sent it"
add rule ip egressnat prerouting ct direction reply return comment "only the original direction of a connection is steered"
add rule ip egressnat prerouting ip daddr @internal return comment "cluster-internal destinations are never steered"
add rule ip egressnat prerouting ip saddr @internal iifname "eth0" fib daddr type != local meta mark set meta mark & 0xffffc0ff | 0x00003f00 ct mark set ct mark & 0xffffc0ff | 0x00003f00 comment "rerouted here: reverse-path check by the uplink (src_valid_mark)"
add rule ip egressnat prerouting iifname != "eth0" ip saddr != @known-pods ip saddr @pod-nets ip daddr @held-dests counter drop comment "a pod egressnat does not know yet, to a policy destination: held until it does"
add rule ip egressnat prerouting ip saddr vmap @pre-src comment "sources of reroute and drop policies: jump to their chain"
`
	if got != want {
		t.Fatalf("plan:\n%s\nwant:\n%s", got, want)
	}
	// The kernel now holds what was planned, and planning again from a
	// read of it (a restarted agent) or from the cache changes nothing.
	wantTable := `chain multi
  ip saddr @src-web ip daddr 203.0.113.128/25 counter meta mark set meta mark & 0xffffc0ff | 0x00000100 return comment "policy web: reroute via 192.0.2.12 mark 0x100"
  ip saddr @src-gw ip daddr 203.0.113.0/24 counter return comment "policy gw: snat to 192.0.2.100"
  ip saddr @src-web ip daddr 198.51.100.0/24 counter meta mark set meta mark & 0xffffc0ff | 0x00000100 return comment "policy web: reroute via 192.0.2.12 mark 0x100"
chain postrouting
  meta mark & 0x00003f00 == 0x00003f00 meta mark set meta mark & 0xffffc0ff comment "reverse-path mark cleared: not a reroute mark"
  ip daddr @internal return comment "cluster-internal destinations are never steered"
  meta mark & 0x00003f00 != 0 counter snat to ip saddr comment "marked by egressnat: keep from masquerade"
  ip saddr @src-gw ip daddr @dst-gw oifname "eth0" counter snat to 192.0.2.100 comment "policy gw: snat to 192.0.2.100"
  ip saddr @internal iifname "eth0" oifname "eth0" counter drop comment "rerouted here, not SNATed by egressnat: drop, never masquerade"
chain pp-web
  ip daddr @dst-web counter meta mark set meta mark & 0xffffc0ff | 0x00000100 comment "policy web: reroute via 192.0.2.12 mark 0x100"
chain prerouting
  ip daddr @floating ct state new counter drop comment "floating IPs are egress-only: no new inbound flows"
  ct direction reply ct mark & 0x00003f00 == 0x00003f00 meta mark set meta mark & 0xffffc0ff | 0x00003e00 comment "reply to traffic rerouted here: back by the uplink to the node that sent it"
  ct direction reply return comment "only the original direction of a connection is steered"
  ip daddr @internal return comment "cluster-internal destinations are never steered"
  ip saddr @internal iifname "eth0" fib daddr type != local meta mark set meta mark & 0xffffc0ff | 0x00003f00 ct mark set ct mark & 0xffffc0ff | 0x00003f00 comment "rerouted here: reverse-path check by the uplink (src_valid_mark)"
  iifname != "eth0" ip saddr != @known-pods ip saddr @pod-nets ip daddr @held-dests counter drop comment "a pod egressnat does not know yet, to a policy destination: held until it does"
  ip saddr vmap @pre-src comment "sources of reroute and drop policies: jump to their chain"
set dst-gw { 203.0.113.0-203.0.113.255 }
set dst-web { 198.51.100.0-198.51.100.255, 203.0.113.128-203.0.113.255 }
set floating {  }
set held-dests { 198.51.100.0-198.51.100.255, 203.0.113.0-203.0.113.255 }
set internal { 10.96.0.0-10.111.255.255, 10.244.0.0-10.244.255.255 }
set known-pods { 10.244.1.2, 10.244.1.3, 10.244.1.9 }
set pod-nets { 10.244.0.0-10.244.255.255 }
set pre-src { 10.244.1.2 : jump multi, 10.244.1.3 : jump pp-web }
set src-gw { 10.244.1.2, 10.244.2.2 }
set src-web { 10.244.1.2, 10.244.1.3 }
`
	if got := k.tbl.String(); got != wantTable {
		t.Fatalf("table:\n%s\nwant:\n%s", got, wantTable)
	}
	for _, fromCache := range []bool{false, true} {
		if p := change(t, nf, st, fromCache); !p.Empty() {
			t.Fatalf("unchanged state (from cache %v) planned:\n%s", fromCache, p)
		}
	}
}

// orderChecker watches every committed transaction of a change from old to
// new and checks the ordering rules:
//   - fill before reference: a rule of a policy new in this change reads
//     a set that already holds all of the policy's new sources;
//   - add before remove: a rule of a policy in both states reads, after
//     every transaction, a set holding every address selected before and
//     after the change, and nothing selected by neither.
//
// The dispatch map is checked the same way: an address selected before and
// after by Reroute or Drop policies is in the map throughout.
type orderChecker struct {
	t          *testing.T
	old, new   map[string][]netip.Addr // policy -> sources
	oldJ, newJ map[netip.Addr]string
	commits    int
	fails      []string
}

func newOrderChecker(t *testing.T, old, new selector.NodeState) *orderChecker {
	c := &orderChecker{t: t, old: map[string][]netip.Addr{}, new: map[string][]netip.Addr{}, oldJ: preSrcTargets(old), newJ: preSrcTargets(new)}
	for _, p := range old.Policies {
		c.old[p.Name] = p.Sources
	}
	for _, p := range new.Policies {
		c.new[p.Name] = p.Sources
	}
	return c
}

func (c *orderChecker) check(tbl *fakeTable) {
	c.commits++
	fail := func(format string, args ...any) {
		c.fails = append(c.fails, fmt.Sprintf("after transaction %d: ", c.commits)+fmt.Sprintf(format, args...))
	}
	if tbl == nil {
		return
	}
	for _, ch := range tbl.chains {
		for _, r := range ch.rules {
			if r.policy == "" || r.src == "" {
				continue
			}
			set := tbl.sets[r.src]
			have := set.members()
			newSrc, inNew := c.new[r.policy]
			oldSrc, inOld := c.old[r.policy]
			switch {
			case inNew && !inOld:
				if !isSubset(newSrc, have) {
					fail("policy %s is read from %s holding %d of its %d sources", r.policy, r.src, len(have), len(newSrc))
				}
			case inNew && inOld:
				both := intersect(oldSrc, newSrc)
				if !isSubset(both, have) {
					fail("policy %s lost addresses it keeps: %s holds %d, %d are kept", r.policy, r.src, len(have), len(both))
				}
				if !isSubset(have, union(oldSrc, newSrc)) {
					fail("policy %s's set %s holds an address selected by neither state", r.policy, r.src)
				}
			}
		}
	}
	if m := tbl.sets[setPreSrc]; m != nil {
		for a := range c.newJ {
			if _, was := c.oldJ[a]; was {
				if _, ok := m.addrs[a]; !ok {
					fail("dispatch map lost %s, selected before and after", a)
				}
			}
		}
	}
}

func isSubset(sub, super []netip.Addr) bool {
	for _, a := range sub {
		if _, ok := slices.BinarySearchFunc(super, a, netip.Addr.Compare); !ok {
			return false
		}
	}
	return true
}

// TestPlanOrder runs changes big enough to take several transactions on the
// fake kernel and checks the ordering rules after every transaction:
// from an empty kernel (fill before reference), big changes of sources in
// place (add before remove), a set changing by more than a batch (swap),
// sources moving between policies (the dispatch map), policies replaced.
func TestPlanOrder(t *testing.T) {
	dst1, dst2 := []netip.Prefix{p("203.0.113.0/24")}, []netip.Prefix{p("198.51.100.0/24")}
	nh := a("192.0.2.12")
	state := func(sa, sb, sg []netip.Addr) selector.NodeState {
		var st selector.NodeState
		if sa != nil {
			st.Policies = append(st.Policies, selector.PolicyState{Name: "a", Sources: sa, Destinations: dst1, Mode: selector.ModeReroute, NextHop: nh})
		}
		if sb != nil {
			st.Policies = append(st.Policies, selector.PolicyState{Name: "b", Sources: sb, Destinations: dst2, Mode: selector.ModeDrop})
		}
		if sg != nil {
			st.Policies = append(st.Policies, selector.PolicyState{Name: "g", Sources: sg, Destinations: dst2, Mode: selector.ModeGateway, EgressIP: a("192.0.2.100")})
		}
		return st
	}
	steps := []struct {
		name      string
		st        selector.NodeState
		fromCache bool
		minTx     int
		swapped   int
	}{
		{"empty kernel to 20k sources", state(addrRange(0, 12000), addrRange(8000, 12000), addrRange(24000, 12000)), false, 3, 0},
		{"gateway set replaced (swap)", state(addrRange(0, 12000), addrRange(8000, 12000), addrRange(40000, 12000)), true, 3, 1},
		{"gateway sources shared with local ones", state(addrRange(0, 12000), addrRange(8000, 12000), addrRange(6000, 20000)), true, 2, 0},
		{"sources move from a to b", state(addrRange(0, 4000), addrRange(4000, 16000), addrRange(30000, 12000)), true, 1, 0},
		{"big changes, a policy removed", state(addrRange(20000, 10000), nil, addrRange(0, 12000)), true, 3, 2},
		{"big change with a chain rebuild", state(addrRange(20000, 10000), nil, addrRange(25000, 12000)), true, 3, 0},
		{"read back from the kernel, policies replaced", state(nil, addrRange(0, 9000), addrRange(40000, 9000)), false, 2, 0},
	}
	nf, k := fakeNF(t)
	prev := selector.NodeState{}
	for _, s := range steps {
		c := newOrderChecker(t, prev, s.st)
		k.onCommit = c.check
		before := k.commits
		p := change(t, nf, s.st, s.fromCache)
		if n := k.commits - before; n < s.minTx {
			t.Fatalf("%s: %d transactions, want at least %d (the test must span transactions)", s.name, n, s.minTx)
		}
		if p.setsSwapped != s.swapped {
			t.Fatalf("%s: %d sets swapped, want %d", s.name, p.setsSwapped, s.swapped)
		}
		if len(c.fails) > 0 {
			t.Fatalf("%s: ordering broken:\n%s", s.name, strings.Join(c.fails, "\n"))
		}
		// The kernel holds exactly the new state: planning again from a
		// read of it changes nothing.
		k.onCommit = nil
		if p := change(t, nf, s.st, false); !p.Empty() {
			t.Fatalf("%s: the kernel differs from the state; a new plan:\n%.2000s", s.name, p)
		}
		prev = s.st
	}
}

// TestPlanSwapSteps: a swap fills a copy before the rules switch to it,
// changes the set while no rule reads it, switches back, drops the copy.
func TestPlanSwapSteps(t *testing.T) {
	nf, _ := fakeNF(t)
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "g", Sources: addrRange(0, 12000), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeGateway, EgressIP: a("192.0.2.100")},
	}}
	change(t, nf, st, false)
	st.Policies[0].Sources = addrRange(20000, 12000) // all new
	p := change(t, nf, st, true)
	var kinds []string
	for _, line := range strings.Split(strings.TrimSpace(p.String()), "\n") {
		f := strings.Fields(line)
		kind := f[0] + " " + f[1] + " " + f[4]
		if f[1] == "rule" {
			reads := "no set"
			for _, w := range f {
				if strings.HasPrefix(w, "@") {
					reads = w
					break
				}
			}
			kind = "rule " + f[4] + " reads " + reads
		}
		kinds = append(kinds, kind)
	}
	kinds = slices.Compact(kinds)
	want := []string{
		"add set src-g-swap", "add element src-g-swap",
		"flush chain postrouting", "rule postrouting reads no set", "rule postrouting reads @internal", "rule postrouting reads no set", "rule postrouting reads @src-g-swap", "rule postrouting reads @internal",
		"add element src-g", "delete element src-g",
		"flush chain postrouting", "rule postrouting reads no set", "rule postrouting reads @internal", "rule postrouting reads no set", "rule postrouting reads @src-g", "rule postrouting reads @internal",
		"delete set src-g-swap",
	}
	if !slices.Equal(kinds, want) {
		t.Fatalf("swap steps\n%s\nwant\n%s\nplan:\n%.3000s", strings.Join(kinds, "\n"), strings.Join(want, "\n"), p)
	}
	// A change within a batch is no swap.
	st.Policies[0].Sources = addrRange(20000, 11000)
	if p := change(t, nf, st, true); p.setsSwapped != 0 {
		t.Fatal("a small change swapped")
	}
}

// TestFakeRejects: the fake rejects what the kernel rejects, and a failed
// transaction changes nothing.
func TestFakeRejects(t *testing.T) {
	nf, k := fakeNF(t)
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "web", Sources: addrList("10.244.1.3"), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeReroute, NextHop: a("192.0.2.12")},
	}}
	change(t, nf, st, false)
	before := k.tbl.String()
	dst := setDef{name: dstSetName("web"), kind: kindInterval}
	web := chainDef{name: policyChainName("web")}
	for _, tc := range []struct {
		name string
		ops  []Op
		want error
	}{
		{"unknown set", []Op{{Verb: VerbAdd, set: &setDef{name: "nope"}, elems: addrElements(addrList("10.0.0.1"))}}, unix.ENOENT},
		{"rule reading an unknown set", []Op{{Verb: VerbAdd, rule: &rule{chain: chainMulti, kind: ruleDrop, dst: "nope"}}}, unix.ENOENT},
		{"rule in an unknown chain", []Op{{Verb: VerbAdd, rule: &rule{chain: "nope", kind: ruleDrop, dst: dst.name}}}, unix.ENOENT},
		{"delete a chain with rules", []Op{{Verb: VerbDelete, chain: &web}}, unix.EBUSY},
		{"delete a chain still jumped to", []Op{{Verb: VerbFlush, chain: &web}, {Verb: VerbDelete, chain: &web}}, unix.EBUSY},
		{"delete a set a rule reads", []Op{{Verb: VerbDelete, set: &dst}}, unix.EBUSY},
		{"duplicate interval", []Op{{Verb: VerbAdd, set: &dst, elems: rangeElements(prefixRanges([]netip.Prefix{p("198.51.100.0/24")}))}}, unix.EEXIST},
		{"overlapping interval", []Op{{Verb: VerbAdd, set: &dst, elems: rangeElements(prefixRanges([]netip.Prefix{p("198.51.100.128/25")}))}}, unix.EEXIST},
		{"delete a missing element", []Op{{Verb: VerbDelete, set: &setDef{name: srcSetName("web")}, elems: addrElements(addrList("10.9.9.9"))}}, unix.ENOENT},
		{"jump to an unknown chain", []Op{{Verb: VerbAdd, set: &setDef{name: setPreSrc, kind: kindVerdict}, elems: []element{{addr: a("10.1.1.1"), chain: "nope"}}}}, unix.ENOENT},
		{"set of another kind", []Op{{Verb: VerbAdd, set: &setDef{name: dst.name}}}, unix.EEXIST},
	} {
		// Each in a transaction after a valid operation: all or nothing.
		ops := append([]Op{{Verb: VerbAdd, set: &setDef{name: srcSetName("web")}, elems: addrElements(addrList("10.244.7.7"))}}, tc.ops...)
		_, err := k.run(context.Background(), &Plan{table: k.name, steps: []step{{ops: ops}}})
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: error %v, want %v", tc.name, err, tc.want)
		}
		if got := k.tbl.String(); got != before {
			t.Fatalf("%s: a failed transaction changed the table:\n%s", tc.name, got)
		}
	}
}

// TestPlanAfterFailure: a transaction that fails half way through a big
// change leaves the kernel as the transactions before it left it; the
// next change, planned from a read of the kernel, completes it.
func TestPlanAfterFailure(t *testing.T) {
	nf, k := fakeNF(t)
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "g", Sources: addrRange(0, 20000), Destinations: []netip.Prefix{p("198.51.100.0/24")}, Mode: selector.ModeGateway, EgressIP: a("192.0.2.100")},
	}}
	k.failAt = 2
	ks, _ := nf.read(context.Background())
	pl := nf.plan(ks, desire(t, nf, st))
	if _, err := nf.exec.run(context.Background(), &pl.Plan); err == nil {
		t.Fatal("injected failure not reported")
	}
	if k.commits != 1 {
		t.Fatalf("%d transactions committed, want 1", k.commits)
	}
	if p := change(t, nf, st, false); p.Empty() {
		t.Fatal("nothing planned after a failure")
	}
	if p := change(t, nf, st, false); !p.Empty() {
		t.Fatalf("not converged:\n%.2000s", p)
	}
}
