package nft

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables"

	"github.com/egressnat/egressnat/selector"
)

// threePolicies on node A: web reroutes to B, other reroutes elsewhere
// (another destination), dropper drops (no node serves it).
func threePolicies(web, other, dropper []string) selector.NodeState {
	return selector.NodeState{Policies: []selector.PolicyState{
		{Name: "dropper", Sources: addrList(dropper...), Destinations: []netip.Prefix{p("198.51.100.0/25")}, Mode: selector.ModeDrop, EgressIP: a("192.0.2.102")},
		{Name: "other", Sources: addrList(other...), Destinations: []netip.Prefix{p("198.51.100.128/25")}, Mode: selector.ModeReroute, EgressIP: a("192.0.2.101"), NextHop: a("192.0.2.13")},
		{Name: "web", Sources: addrList(web...), Destinations: []netip.Prefix{p("203.0.113.0/24")}, Mode: selector.ModeReroute, EgressIP: a(floatIP), NextHop: a(nodeBIP)},
	}}
}

// expectKernel reads node role's table back and checks every source set
// and the dispatch map against st.
func expectKernel(t *testing.T, l *lab, d *Dataplane, role string, st selector.NodeState) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(l.fd(role)))
	if err != nil {
		t.Fatal(err)
	}
	ks, err := tableReader{c: c, name: d.cfg.Table}.all(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, pol := range st.Policies {
		if got := elemAddrs(ks.elems[srcSetName(pol.Name)]); !slices.Equal(got, pol.Sources) {
			t.Fatalf("set of policy %s holds %v, want %v", pol.Name, got, pol.Sources)
		}
	}
	if got, want := elemJumps(ks.elems[setPreSrc]), preSrcTargets(st); !maps.Equal(got, want) || len(ks.elems[setPreSrc]) != len(want) {
		t.Fatalf("dispatch map %v (%d elements), want %v", got, len(ks.elems[setPreSrc]), want)
	}
}

// TestIncrementalSources: changes of sources alone take one transaction that
// touches only the changed elements (no chain, route or set rebuilt), leave
// the kernel exactly as a full apply would, and steer the traffic; a table
// changed behind the dataplane's back falls back to the full path.
func TestIncrementalSources(t *testing.T) {
	l := newLab(t)
	l.build()
	seen := l.server("ext", serverIP+":8080")
	da, db := l.dataplane("a"), l.dataplane("b")
	mustApply(t, db, gatewayState(podA1, podA2))
	st := threePolicies([]string{podA1}, nil, nil)
	if r := mustApply(t, da, st); len(r.ChainsRebuilt) == 0 {
		t.Fatalf("first apply rebuilt no chain: %+v", r)
	}
	expectSource(t, l, "pa2", podA2+":40031", seen, netip.MustParseAddrPort(nodeAIP+":40031"), false)

	for _, step := range []struct {
		name             string
		web, other, drop []string
		added, deleted   int
		// shared: the policies sharing a pod change, so the shared chain
		// (one rule per policy and destination) is rebuilt on the full
		// path, in one transaction all the same.
		shared bool
	}{
		// web: podA2 added (set and map).
		{"pod selected", []string{podA1, podA2}, nil, nil, 2, 0, false},
		// podA1 in two policies: its map entry now jumps to the shared chain.
		{"pod in a second policy", []string{podA1, podA2}, []string{podA1}, nil, 2, 1, true},
		// podA1 back to other's chain alone.
		{"pod leaves the first policy", []string{podA2}, []string{podA1}, nil, 1, 2, true},
		// podA2 moves from web to dropper: the map entry changes target.
		{"pod moves between policies", nil, []string{podA1}, []string{podA2}, 2, 2, false},
		{"everything deselected", nil, nil, nil, 0, 4, false},
		{"both back", []string{podA1, podA2}, nil, nil, 4, 0, false},
	} {
		want := threePolicies(step.web, step.other, step.drop)
		r := mustApply(t, da, want)
		switch {
		case step.shared:
			if r.Incremental || r.Transactions != 1 || !slices.Equal(r.ChainsRebuilt, []string{chainMulti}) || r.RoutesChanged > 0 || r.SetsCreated > 0 {
				t.Fatalf("%s: not one transaction rebuilding the shared chain: %+v", step.name, r)
			}
		case !r.Incremental || r.Transactions != 1 || len(r.ChainsRebuilt) > 0 || r.RoutesChanged > 0 || r.SetsCreated > 0 || r.IPRulesChanged > 0:
			t.Fatalf("%s: not incremental: %+v", step.name, r)
		}
		if r.ElementsAdded != step.added || r.ElementsDeleted != step.deleted {
			t.Fatalf("%s: %d elements added, %d deleted; want %d, %d", step.name, r.ElementsAdded, r.ElementsDeleted, step.added, step.deleted)
		}
		expectKernel(t, l, da, "a", want)
	}
	// The pod selected by the incremental path leaves with the floating IP.
	expectSource(t, l, "pa2", podA2+":40032", seen, netip.MustParseAddrPort(floatIP+":40032"), true)
	// Unchanged: nothing at all.
	if r := mustApply(t, da, threePolicies([]string{podA1, podA2}, nil, nil)); r.Transactions != 0 || !r.Incremental {
		t.Fatalf("unchanged state: %+v", r)
	}

	// Someone deletes podA2 from the set behind our back; the next change
	// removes it: the incremental transaction fails, the full path repairs.
	l.exec("a", "nft", "delete", "element", "ip", DefaultTable, srcSetName("web"), "{ "+podA2+" }")
	want := threePolicies([]string{podA1}, []string{podA2}, nil)
	if r := mustApply(t, da, want); r.Incremental {
		t.Fatalf("repair after drift was incremental: %+v", r)
	}
	expectKernel(t, l, da, "a", want)
	// And the next change is incremental again.
	want = threePolicies([]string{podA1}, nil, []string{podA2})
	if r := mustApply(t, da, want); !r.Incremental {
		t.Fatalf("not incremental after the repair: %+v", r)
	}
	expectKernel(t, l, da, "a", want)

	// A change of shape (a policy's next hop) takes the full path.
	want.Policies[2].NextHop = a("192.0.2.14")
	if r := mustApply(t, da, want); r.Incremental || r.RoutesChanged == 0 || len(r.ChainsRebuilt) == 0 {
		t.Fatalf("next hop change did not take the full path: %+v", r)
	}
	expectKernel(t, l, da, "a", want)
}

// TestVerify: Verify finds nothing after applies, names what someone else
// changed in the table, and the next Apply repairs it; Recheck repairs
// policy routing without a kernel read of the table.
func TestVerify(t *testing.T) {
	l := newLab(t)
	l.build()
	da := l.dataplane("a")
	if drift, err := da.Verify(ctxT(t)); drift != "" || err != nil {
		t.Fatalf("before any apply: %q, %v", drift, err)
	}
	st := threePolicies([]string{podA1}, []string{podA2}, []string{podA2})
	mustApply(t, da, st)
	st = threePolicies(nil, []string{podA2}, []string{podA1, podA2})
	if r := mustApply(t, da, st); !r.Incremental {
		t.Fatalf("not incremental: %+v", r)
	}
	verifyClean := func(when string) {
		t.Helper()
		if drift, err := da.Verify(ctxT(t)); drift != "" || err != nil {
			t.Fatalf("%s: %q, %v", when, drift, err)
		}
	}
	verifyClean("after applies")
	for _, tc := range []struct {
		name, want string
		change     []string
	}{
		{"element deleted", "elements of set " + srcSetName("dropper") + " differ",
			[]string{"delete", "element", "ip", DefaultTable, srcSetName("dropper"), "{ " + podA1 + " }"}},
		{"element added", "elements of set " + srcSetName("dropper") + " differ",
			[]string{"add", "element", "ip", DefaultTable, srcSetName("dropper"), "{ 10.244.1.99 }"}},
		{"map entry deleted", "elements of set " + setPreSrc + " differ",
			[]string{"delete", "element", "ip", DefaultTable, setPreSrc, "{ " + podA2 + " }"}},
		{"map entry with another verdict", "elements of set " + setPreSrc + " differ",
			[]string{"add", "element", "ip", DefaultTable, setPreSrc, "{ 10.244.1.99 : accept }"}},
		{"destinations changed", "elements of set " + dstSetName("web") + " differ",
			[]string{"add", "element", "ip", DefaultTable, dstSetName("web"), "{ 192.0.2.128/25 }"}},
		{"rules flushed", "rules of chain " + chainPrerouting + " differ",
			[]string{"flush", "chain", "ip", DefaultTable, chainPrerouting}},
		{"table deleted", "table " + DefaultTable + " is gone",
			[]string{"delete", "table", "ip", DefaultTable}},
	} {
		l.exec("a", append([]string{"nft"}, tc.change...)...)
		if drift, err := da.Verify(ctxT(t)); drift != tc.want || err != nil {
			t.Fatalf("%s: Verify says %q, %v; want %q", tc.name, drift, err, tc.want)
		}
		if r := mustApply(t, da, st); r.Incremental || !r.Changed() {
			t.Fatalf("%s: the apply after did not repair: %+v", tc.name, r)
		}
		expectKernel(t, l, da, "a", st)
		verifyClean(tc.name + ", repaired")
	}

	// Policy routing is outside the table: Recheck repairs it.
	l.ip("a", "rule", "del", "priority", fmt.Sprint(selector.DefaultRulePriority))
	if r := mustApply(t, da, st); r.IPRulesChanged != 0 {
		t.Fatalf("repaired without Recheck: %+v", r)
	}
	da.Recheck()
	if r := mustApply(t, da, st); r.Incremental || r.IPRulesChanged == 0 {
		t.Fatalf("Recheck did not repair the ip rule: %+v", r)
	}
	if r := mustApply(t, da, threePolicies(nil, []string{podA2}, []string{podA2})); !r.Incremental {
		t.Fatalf("not incremental after the recheck: %+v", r)
	}
}
