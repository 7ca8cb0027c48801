package agent

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/selector"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
)

// cutOff makes the node see neither a probe nor the API server for just
// over FenceAfter, and evaluates the fence.
func (ta *testAgent) cutOff(t *testing.T) {
	t.Helper()
	ta.api.set(false)
	ta.clk.Step(ta.cfg.FenceAfter + time.Millisecond)
	ta.fence.evaluate(context.Background())
	if fenced, _ := ta.fence.state(); !fenced {
		t.Fatal("a node holding floating IPs, without probes and API server, is not fenced")
	}
}

// TestFenceEnter: a node that holds floating IPs, has seen no probe for
// more than FenceAfter and cannot reach the API server fences: it releases
// its floating IPs at once (straight through the dataplane's fast path),
// records a Fenced event on the groups it held, asks for a sync, and the
// sync applies the state without floating IPs and with its Gateway
// policies dropping their traffic.
func TestFenceEnter(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	ta.api.set(false)

	ta.clk.Step(ta.cfg.FenceAfter) // exactly FenceAfter without a probe: not yet
	ta.fence.evaluate(ctx)
	if fenced, _ := ta.fence.state(); fenced {
		t.Fatal("fenced after exactly FenceAfter without a probe")
	}
	if n := ta.api.checkCount(); n != 0 {
		t.Fatalf("asked the API server %d times while probes were recent", n)
	}

	ta.clk.Step(time.Millisecond)
	ta.fence.evaluate(ctx)
	if fenced, recovering := ta.fence.state(); !fenced || recovering {
		t.Fatalf("after FenceAfter without probe and API: fenced=%v recovering=%v, want fenced", fenced, recovering)
	}
	if n := ta.dp.releaseCount(); n != 1 {
		t.Fatalf("fenced: ReleaseFloating called %d times, want 1", n)
	}
	if !ta.kicked() {
		t.Fatal("fencing did not ask for a sync")
	}
	wantEvent := "Warning Fenced node n1 released its floating IPs (192.0.2.100): no health probe for 1.001s and the API server does not answer"
	if got := ta.events(); !slices.Equal(got, []string{wantEvent}) {
		t.Fatalf("events %q, want %q", got, wantEvent)
	}

	// Still cut off: nothing more happens.
	ta.clk.Step(time.Second)
	ta.fence.evaluate(ctx)
	if n := ta.dp.releaseCount(); n != 1 || len(ta.events()) != 0 {
		t.Fatalf("a second evaluation while fenced released again (%d) or recorded events", n)
	}

	ta.synced.Store(true)
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if len(st.FloatingIPs) != 0 {
		t.Fatalf("fenced node applies floating IPs %v", st.FloatingIPs)
	}
	if p := policy(t, st, "pa"); p.Mode != selector.ModeDrop {
		t.Fatalf("policy pa through the released IP: mode %s, want Drop", p.Mode)
	}
	if p := policy(t, st, "pb"); p.Mode != selector.ModeReroute || p.NextHop != n2IP {
		t.Fatalf("policy pb through n2: %+v, want Reroute to %s", p, n2IP)
	}
}

// TestFenceAfterFirstSync: after the first sync too, the fence releases
// through the fast path at once, before any sync, and the sync applies the
// fenced state.
func TestFenceAfterFirstSync(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.mustSync(t)
	if !ta.holding.Load() {
		t.Fatal("the agent does not know it holds a floating IP")
	}
	ta.dp.history()
	ta.cutOff(t)
	if h := ta.dp.history(); !slices.Equal(h, []string{"release-all"}) {
		t.Fatalf("fence rising: dataplane calls %q, want one release-all before any apply", h)
	}
	ta.mustSync(t)
	if st := ta.lastApplied(t); len(st.FloatingIPs) != 0 || policy(t, st, "pa").Mode != selector.ModeDrop {
		t.Fatalf("fenced sync applied %+v", st)
	}
}

// TestFenceNeedsBothSignals: a node fences only when probes stopped AND the
// API server does not answer AND it holds floating IPs; a node holding
// nothing does not even ask the API server.
func TestFenceNeedsBothSignals(t *testing.T) {
	ctx := context.Background()
	t.Run("API answers", func(t *testing.T) {
		ta := newTestAgent(t, cluster()...)
		ta.clk.Step(5 * time.Second)
		ta.fence.evaluate(ctx)
		if fenced, _ := ta.fence.state(); fenced {
			t.Fatal("fenced while the API server answers")
		}
		if ta.api.checkCount() != 1 {
			t.Fatal("the API server was not asked")
		}
	})
	t.Run("probes arrive", func(t *testing.T) {
		ta := newTestAgent(t, cluster()...)
		ta.api.set(false)
		for range 10 {
			ta.clk.Step(ta.cfg.FenceAfter / 2)
			ta.fence.probed()
			ta.fence.evaluate(ctx)
		}
		if fenced, _ := ta.fence.state(); fenced {
			t.Fatal("fenced while probed")
		}
		if n := ta.api.checkCount(); n != 0 {
			t.Fatalf("asked the API server %d times while probed", n)
		}
	})
	t.Run("holds nothing", func(t *testing.T) {
		ta := newTestAgent(t, cluster()...)
		ta.holding.Store(false)
		ta.api.set(false)
		ta.clk.Step(5 * time.Second)
		ta.fence.evaluate(ctx)
		if fenced, _ := ta.fence.state(); fenced {
			t.Fatal("fenced a node that holds nothing")
		}
		if n := ta.api.checkCount(); n != 0 {
			t.Fatalf("a node holding nothing asked the API server %d times", n)
		}
	})
}

// TestFenceExitOnProbe: the leader's probe lifts the fence at once; the
// node then recovers, asking for a sync every 500 ms, for as long as its
// caches disagree with a fresh read of the API (time alone never ends it).
func TestFenceExitOnProbe(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	ta.cutOff(t)
	ta.kicked()
	ta.events()

	ta.clk.Step(5 * time.Second)
	ta.fence.probed()
	ta.fence.evaluate(ctx)
	if fenced, recovering := ta.fence.state(); fenced || !recovering {
		t.Fatalf("after a probe: fenced=%v recovering=%v, want recovering", fenced, recovering)
	}
	if !ta.kicked() {
		t.Fatal("lifting the fence did not ask for a sync")
	}
	want := "Normal Unfenced node n1 holds its floating IPs again as the API confirms (192.0.2.100): the operator leader's probes are back after 5s"
	if got := ta.events(); !slices.Equal(got, []string{want}) {
		t.Fatalf("events %q, want %q", got, want)
	}
	for range 3 {
		ta.clk.Step(499 * time.Millisecond)
		ta.fence.probed()
		ta.fence.evaluate(ctx)
		if ta.kicked() {
			t.Fatal("asked for a sync within 500 ms of the last")
		}
		ta.clk.Step(time.Millisecond)
		ta.fence.evaluate(ctx)
		if !ta.kicked() {
			t.Fatal("recovering: no sync asked for after 500 ms")
		}
	}
	ta.clk.Step(time.Hour)
	ta.fence.probed()
	ta.fence.evaluate(ctx)
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("recovery ended with time, without a fresh read")
	}
}

// TestFenceExitOnAPI: the API server answering again lifts the fence too,
// once the cached answer (300 ms) expires.
func TestFenceExitOnAPI(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	ta.cutOff(t)
	checks := ta.api.checkCount()

	ta.api.set(true)
	ta.clk.Step(299 * time.Millisecond)
	ta.fence.evaluate(ctx)
	if fenced, _ := ta.fence.state(); !fenced {
		t.Fatal("lifted within 300 ms of the last API check")
	}
	if ta.api.checkCount() != checks {
		t.Fatal("asked the API server again within 300 ms")
	}
	ta.clk.Step(time.Millisecond)
	ta.fence.evaluate(ctx)
	if fenced, recovering := ta.fence.state(); fenced || !recovering {
		t.Fatalf("API answers: fenced=%v recovering=%v, want recovering", fenced, recovering)
	}
	if got := ta.events(); len(got) != 2 || !strings.Contains(got[1], "Unfenced") || !strings.Contains(got[1], "the API server answers again after 300ms") {
		t.Fatalf("events %q", got)
	}
}

// TestRecoveryConfirmsHoldings: while recovering the node holds only the
// floating IPs that a fresh list of the groups gives it, whatever its
// (possibly stale) cache says; a policy whose IP is not confirmed drops
// its traffic. A failed list confirms nothing. Recovery ends when the
// cache gives the node what a fresh read gives it; then the cache decides
// and the API is not read again.
func TestRecoveryConfirmsHoldings(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	// While n1 was cut off the operator gave gw-b's IP to n1 and the
	// caches show it, but it moved on to n2 since: the API says so.
	ta.cache(t, gatewayObj("gw-b", fipB, node1))
	ta.synced.Store(true)
	ta.mustSync(t)
	if st := ta.lastApplied(t); !slices.Equal(st.FloatingIPs, prefixes(fipA, fipB)) {
		t.Fatalf("not fenced: floating IPs %v, want both", st.FloatingIPs)
	}

	ta.cutOff(t)
	ta.fence.probed()
	ta.fence.evaluate(ctx)
	lists := func() int {
		n := 0
		for _, a := range ta.dyn.Actions() {
			if a.GetVerb() == "list" && a.GetResource().Resource == "networkgatewaygroups" {
				n++
			}
		}
		return n
	}

	ta.dp.history()
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if !slices.Equal(st.FloatingIPs, prefixes(fipA)) {
		t.Fatalf("recovering: floating IPs %v, want only the confirmed %s", st.FloatingIPs, fipA)
	}
	if pa, pb := policy(t, st, "pa"), policy(t, st, "pb"); pa.Mode != selector.ModeGateway || pb.Mode != selector.ModeDrop {
		t.Fatalf("recovering: pa %s, pb %s; want Gateway (confirmed) and Drop (not confirmed)", pa.Mode, pb.Mode)
	}
	if lists() != 1 {
		t.Fatalf("%d fresh lists of the groups, want 1", lists())
	}

	// The API server fails the list: nothing is confirmed.
	ta.dyn.PrependReactor("list", "networkgatewaygroups", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("etcdserver: request timed out")
	})
	ta.reapply.Store(true)
	ta.mustSync(t)
	st = ta.lastApplied(t)
	if len(st.FloatingIPs) != 0 || policy(t, st, "pa").Mode != selector.ModeDrop || policy(t, st, "pb").Mode != selector.ModeDrop {
		t.Fatalf("recovering without a fresh list: %+v; want no floating IP and both policies Drop", st)
	}
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("recovery ended without a fresh read")
	}
	ta.dyn.ReactionChain = ta.dyn.ReactionChain[1:]

	// The cache catches up with the API (gw-b on n2): recovery over, the
	// cache decides, and the API is not read again.
	ta.cache(t, gatewayObj("gw-b", fipB, node2))
	ta.recompute()
	ta.mustSync(t)
	if _, recovering := ta.fence.state(); recovering {
		t.Fatal("still recovering though the cache agrees with a fresh read")
	}
	st = ta.lastApplied(t)
	if !slices.Equal(st.FloatingIPs, prefixes(fipA)) || policy(t, st, "pa").Mode != selector.ModeGateway || policy(t, st, "pb").Mode != selector.ModeReroute {
		t.Fatalf("after recovery: %+v; want what the cache says", st)
	}
	before := lists()
	ta.reapply.Store(true)
	ta.mustSync(t)
	if lists() != before {
		t.Fatal("the API was read after the recovery")
	}
}
