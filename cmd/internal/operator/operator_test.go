package operator

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"
)

// condition returns the condition of type typ, failing the test without.
func condition(t *testing.T, conds []metav1.Condition, typ string) metav1.Condition {
	t.Helper()
	c := apimeta.FindStatusCondition(conds, typ)
	if c == nil {
		t.Fatalf("no %s condition in %+v", typ, conds)
	}
	return *c
}

func checkCondition(t *testing.T, what string, got metav1.Condition, status metav1.ConditionStatus, reason, message string, gen int64) {
	t.Helper()
	if got.Status != status || got.Reason != reason || got.Message != message || got.ObservedGeneration != gen {
		t.Errorf("%s: %s %s %q (generation %d), want %s %s %q (generation %d)", what,
			got.Status, got.Reason, got.Message, got.ObservedGeneration, status, reason, message, gen)
	}
}

func checkEvents(t *testing.T, got []string, want ...string) {
	t.Helper()
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("events\n%q\nwant\n%q", got, want)
	}
}

// TestReconcileStatus: the assignment lands in the group's status
// (floatingIPs, nodes, assignedCount, the Ready condition), each policy
// gets its egress IP, gateway node, whenUnavailable and conditions, and an
// unchanged status is not written again.
func TestReconcileStatus(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.setHealth("n3", true, epoch)
	c.mustReconcile(t)

	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Errorf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	// n3 has no agent: it has no subnet, so it is not a candidate at all.
	if want := map[string]v1.NodeHealth{"n1": v1.NodeUp, "n2": v1.NodeUp}; !mapsEqual(g.Status.Nodes, want) {
		t.Errorf("status.nodes %v, want %v", g.Status.Nodes, want)
	}
	if g.Status.AssignedCount != 2 || g.Status.ObservedGeneration != gwGen || len(g.Status.RecentMoves) != 0 {
		t.Errorf("assignedCount %d observedGeneration %d recentMoves %v", g.Status.AssignedCount, g.Status.ObservedGeneration, g.Status.RecentMoves)
	}
	checkCondition(t, "gateway Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionTrue, "AllAssigned",
		"all 2 floating IPs are held by Up nodes", gwGen)

	p1 := cl.policy(t, "p1")
	if p1.Status.EgressIP != fip1 || p1.Status.GatewayNode != "n1" || p1.Status.WhenUnavailable != v1.UnavailableDrop || p1.Status.ObservedGeneration != 2 {
		t.Errorf("p1 status %+v", p1.Status)
	}
	checkCondition(t, "p1 Accepted", condition(t, p1.Status.Conditions, v1.ConditionAccepted), metav1.ConditionTrue, v1.ReasonAccepted,
		"egress IP 192.0.2.100 of NetworkGatewayGroup kube-system/gw", 2)
	checkCondition(t, "p1 Ready", condition(t, p1.Status.Conditions, v1.ConditionReady), metav1.ConditionTrue, v1.ReasonApplied,
		"node n1 holds egress IP 192.0.2.100", 2)
	p2 := cl.policy(t, "p2")
	if p2.Status.EgressIP != "" || p2.Status.GatewayNode != "" || p2.Status.WhenUnavailable != v1.UnavailableDrop {
		t.Errorf("p2 status %+v", p2.Status)
	}
	checkCondition(t, "p2 Accepted", condition(t, p2.Status.Conditions, v1.ConditionAccepted), metav1.ConditionFalse, v1.ReasonGatewayNotFound,
		"NetworkGatewayGroup kube-system/missing not found", 2)
	checkCondition(t, "p2 Ready", condition(t, p2.Status.Conditions, v1.ConditionReady), metav1.ConditionFalse, v1.ReasonGatewayNotFound,
		"policy is not applied: NetworkGatewayGroup kube-system/missing not found", 2)
	// Valid groups: Accepted and FloatingIPsValid True.
	checkCondition(t, "gateway Accepted", condition(t, g.Status.Conditions, v1.ConditionAccepted), metav1.ConditionTrue, v1.ReasonAccepted,
		"namespace kube-system is a gateway namespace", gwGen)
	checkCondition(t, "gateway FloatingIPsValid", condition(t, g.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionTrue, v1.ReasonFloatingIPsValid,
		"all 2 floating IPs can be assigned", gwGen)
	if c := apimeta.FindStatusCondition(p1.Status.Conditions, v1.ConditionOverlap); c != nil {
		t.Errorf("p1 has an Overlap condition: %+v", c)
	}
	// A policy that is not accepted gets a Warning once.
	checkEvents(t, c.events(), "Normal GatewayAssigned egress IP 192.0.2.100 is held by node n1",
		"Warning GatewayNotFound NetworkGatewayGroup kube-system/missing not found")
	if n, ok := c.remembered(fip1); !ok || n != "n1" {
		t.Errorf("the controller remembers %s on %q", fip1, n)
	}

	// Nothing changed: nothing is written, no event.
	c.waitCaches(t, cl)
	writes := cl.statusWrites("")
	cl.clk.Step(time.Minute)
	c.mustReconcile(t)
	if n := cl.statusWrites("") - writes; n != 0 {
		t.Fatalf("%d status writes without a change", n)
	}
	checkEvents(t, c.events())
}

// TestReconcileUnavailable: with no Up node in their subnet the IPs are
// unassigned; the group says so, and a policy says what happens to its
// traffic (whenUnavailable NodeIP with the fallback). A node whose kubelet
// reports NotReady is Down even when it answers probes.
func TestReconcileUnavailable(t *testing.T) {
	objs := objects()
	objs[0] = nodeObj("n1", "192.0.2.11", "False")
	cl := newCluster(t, objs...)
	c := cl.controller(t, true)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", false, epoch)
	c.mustReconcile(t)

	g := cl.gateway(t, "gw")
	if len(g.Status.FloatingIPs) != 0 || g.Status.AssignedCount != 0 {
		t.Errorf("floatingIPs %v assignedCount %d, want none", g.Status.FloatingIPs, g.Status.AssignedCount)
	}
	if want := map[string]v1.NodeHealth{"n1": v1.NodeDown, "n2": v1.NodeDown}; !mapsEqual(g.Status.Nodes, want) {
		t.Errorf("status.nodes %v, want %v", g.Status.Nodes, want)
	}
	checkCondition(t, "gateway Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionFalse, "Unassigned",
		"2 of 2 floating IPs have no Up node in their subnet: 192.0.2.100, 192.0.2.101", gwGen)
	p1 := cl.policy(t, "p1")
	if p1.Status.EgressIP != fip1 || p1.Status.GatewayNode != "" || p1.Status.WhenUnavailable != v1.UnavailableNodeIP {
		t.Errorf("p1 status %+v", p1.Status)
	}
	ready := condition(t, p1.Status.Conditions, v1.ConditionReady)
	if ready.Status != metav1.ConditionFalse || ready.Reason != v1.ReasonGatewayUnavailable || !strings.Contains(ready.Message, "leaves with the node IPs") {
		t.Errorf("p1 Ready %+v", ready)
	}
}

// TestReconcileMoves: when a holder goes Down its IP moves; the group's
// status.recentMoves records the move (newest first, with the detection
// time) and a FloatingIPMoved event is recorded. The IP does not move back
// when the node returns.
func TestReconcileMoves(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	c.waitCaches(t, cl)
	c.events()

	c.setHealth("n1", false, epoch)
	cl.clk.Step(1412 * time.Millisecond)
	c.healthy("n2") // the new holder answered lately
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n2", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("after n1 went Down: floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	if g.Status.Nodes["n1"] != v1.NodeDown {
		t.Errorf("n1 is %s in the status", g.Status.Nodes["n1"])
	}
	wantMove := v1.FloatingIPMove{IP: fip1, From: "n1", To: "n2", Reason: "node n1 Down: no health probe answer for 1412ms",
		Time: metav1.NewTime(epoch.Add(1412 * time.Millisecond)).Rfc3339Copy(), DetectionMilliseconds: 1412}
	if len(g.Status.RecentMoves) != 1 || !sameMove(g.Status.RecentMoves[0], wantMove) {
		t.Fatalf("recentMoves %+v, want [%+v]", g.Status.RecentMoves, wantMove)
	}
	checkEvents(t, c.events(),
		"Warning FloatingIPMoved 192.0.2.100 moved from n1 to n2: node n1 Down: no health probe answer for 1412ms",
		"Normal GatewayAssigned egress IP 192.0.2.100 is held by node n2")
	if p1 := cl.policy(t, "p1"); p1.Status.GatewayNode != "n2" {
		t.Errorf("p1 gateway node %q, want n2", p1.Status.GatewayNode)
	}

	// n1 returns: it is Up again, the IP stays on n2.
	c.waitCaches(t, cl)
	c.setHealth("n1", true, cl.clk.Now())
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if g.Status.FloatingIPs[fip1] != "n2" || g.Status.Nodes["n1"] != v1.NodeUp || len(g.Status.RecentMoves) != 1 {
		t.Fatalf("after n1 returned: %+v", g.Status)
	}
	checkEvents(t, c.events())

	// n2 is deleted: both IPs move to n1, the newest moves first (those of
	// one reconcile in reverse spec order: each is put in front).
	c.waitCaches(t, cl)
	if err := cl.core.CoreV1().Nodes().Delete(context.Background(), "n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	var got []string
	for _, m := range g.Status.RecentMoves {
		got = append(got, m.IP+" "+m.From+">"+m.To+": "+m.Reason)
	}
	want := []string{fip2 + " n2>n1: node n2 no longer exists", fip1 + " n2>n1: node n2 no longer exists", wantMove.IP + " n1>n2: " + wantMove.Reason}
	if !slices.Equal(got, want) {
		t.Fatalf("recentMoves\n%q\nwant\n%q", got, want)
	}
}

// TestRecentMovesBounded: status.recentMoves keeps the MaxRecentMoves
// newest moves.
func TestRecentMovesBounded(t *testing.T) {
	objs := objects()
	gw := gatewayObj("gw", fip1, fip2)
	gw.Status.FloatingIPs = map[string]string{fip1: "n1", fip2: "n2"}
	for i := range v1.MaxRecentMoves {
		gw.Status.RecentMoves = append(gw.Status.RecentMoves, v1.FloatingIPMove{IP: fip2, From: "n1", To: "n2", Reason: "old " + string(rune('a'+i))})
	}
	objs[5] = gw
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.setHealth("n1", false, time.Time{})
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	moves := cl.gateway(t, "gw").Status.RecentMoves
	if len(moves) != v1.MaxRecentMoves {
		t.Fatalf("%d recent moves, want %d", len(moves), v1.MaxRecentMoves)
	}
	if moves[0].IP != fip1 || moves[0].Reason != "node n1 Down" || moves[1].Reason != "old a" || moves[len(moves)-1].Reason != "old i" {
		t.Fatalf("recentMoves %+v", moves)
	}
}

// TestReconcileStatusConflict: a status write refused with 409 Conflict
// fails the reconcile; the next one writes the right status, move included,
// and the move is recorded once.
func TestReconcileStatusConflict(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	c.waitCaches(t, cl)
	c.events()

	refused := cl.conflictOnce()
	c.setHealth("n1", false, epoch)
	cl.clk.Step(500 * time.Millisecond)
	c.healthy("n2")
	err := c.reconcile(context.Background())
	if err == nil || !strings.Contains(err.Error(), "update status of gateway kube-system/gw") || refused() != 1 {
		t.Fatalf("reconcile with a conflicting status write: %v (%d refused)", err, refused())
	}
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n1" {
		t.Fatal("the refused write changed the status")
	}

	c.waitCaches(t, cl)
	cl.clk.Step(200 * time.Millisecond)
	c.healthy("n2")
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if g.Status.FloatingIPs[fip1] != "n2" || g.Status.Nodes["n1"] != v1.NodeDown {
		t.Fatalf("after the retry: %+v", g.Status)
	}
	if len(g.Status.RecentMoves) != 1 || g.Status.RecentMoves[0].From != "n1" || g.Status.RecentMoves[0].To != "n2" {
		t.Fatalf("after the retry: recentMoves %+v, want the move n1>n2", g.Status.RecentMoves)
	}
	moved := 0
	for _, e := range c.events() {
		if strings.Contains(e, "FloatingIPMoved") {
			moved++
		}
	}
	if moved != 1 {
		t.Fatalf("%d FloatingIPMoved events, want 1", moved)
	}
}

// TestLeadRetriesConflict: the Lead loop retries a failed reconcile (200 ms
// later) until the status is written.
func TestLeadRetriesConflict(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	refused := cl.conflictOnce()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Lead(ctx, 1); close(done) }()
	eventually(t, "the refused write", func() bool { return refused() == 1 })
	eventually(t, "the retry to write the status", func() bool {
		cl.clk.Step(100 * time.Millisecond)
		return cl.gateway(t, "gw").Status.AssignedCount == 2
	})
	cancel()
	<-done
	if g := cl.gateway(t, "gw"); !mapsEqual(g.Status.FloatingIPs, map[string]string{fip1: "n1", fip2: "n2"}) {
		t.Fatalf("status after the retry %+v", g.Status)
	}
}

// TestLeaderChange: a replica that led before and leads again starts its
// term from the statuses, not from what it decided in its last term: it
// does not move back an IP that the leader in between moved and wrote.
func TestLeaderChange(t *testing.T) {
	cl := newCluster(t, objects()...)
	a, b := cl.controller(t, false), cl.controller(t, false)
	for _, c := range []*testController{a, b} {
		c.setHealth("n1", true, epoch)
		c.setHealth("n2", true, epoch)
	}
	// b leads first: fip1 on n1.
	b.mustReconcile(t)
	a.waitCaches(t, cl)

	// a leads while n1 is Down (for a): fip1 moves to n2.
	a.setHealth("n1", false, epoch)
	cl.clk.Step(time.Second)
	a.healthy("n2")
	a.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n2" || g.Status.Nodes["n1"] != v1.NodeDown {
		t.Fatalf("a did not move %s: %+v", fip1, g.Status)
	}

	// b leads again; n1 is Up (for b), which its first reconcile writes.
	b.waitCaches(t, cl)
	b.events()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Lead(ctx, 2); close(done) }()
	eventually(t, "b's first status write of its new term", func() bool { return cl.gateway(t, "gw").Status.Nodes["n1"] == v1.NodeUp })
	cancel()
	<-done
	g := cl.gateway(t, "gw")
	if g.Status.FloatingIPs[fip1] != "n2" || len(g.Status.RecentMoves) != 1 {
		t.Fatalf("b's new term moved %s back: %+v", fip1, g.Status)
	}
	for _, e := range b.events() {
		if strings.Contains(e, "FloatingIPMoved") {
			t.Fatalf("b's new term moved an IP: %s", e)
		}
	}
}

// TestLeaderChangeStaleCache: a new leader whose cache has not yet seen the
// old leader's last write (a move) finds nothing to write in the stale
// status. Once its cache catches up it must start from the status the old
// leader wrote, not from what it decided from the stale one: the IP stays
// where the old leader moved it. The fake API refuses writes from stale
// caches (resourceVersion), as an API server does.
func TestLeaderChangeStaleCache(t *testing.T) {
	cl := newCluster(t, objects()...)
	cl.optimisticConcurrency(t)
	a, b := cl.controller(t, false), cl.controller(t, false)
	for _, c := range []*testController{a, b} {
		c.setHealth("n1", true, epoch)
		c.setHealth("n2", true, epoch)
	}
	a.mustReconcile(t)
	a.waitCaches(t, cl)
	b.waitCaches(t, cl)
	stale := cl.gateway(t, "gw")

	// a moves fip1 away from n1, which it sees Down, and loses the lead.
	a.setHealth("n1", false, epoch)
	cl.clk.Step(time.Second)
	a.healthy("n2")
	a.mustReconcile(t)
	b.waitCaches(t, cl)
	moved := cl.gateway(t, "gw")
	if moved.Status.FloatingIPs[fip1] != "n2" {
		t.Fatalf("a did not move %s: %+v", fip1, moved.Status)
	}

	// b leads, its watch lagging: its cache still shows the status before
	// the move, which is what b would write (n1 is Up for b).
	if err := b.gateways.Update(stale); err != nil {
		t.Fatal(err)
	}
	writes := cl.statusWrites("networkgatewaygroups")
	b.mustReconcile(t)
	if n := cl.statusWrites("networkgatewaygroups") - writes; n != 0 {
		t.Fatalf("b wrote %d gateway statuses from a status it has no change to", n)
	}

	// b's watch catches up; b reconciles again.
	if err := b.gateways.Update(moved); err != nil {
		t.Fatal(err)
	}
	b.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if g.Status.FloatingIPs[fip1] != "n2" || len(g.Status.RecentMoves) != 1 {
		t.Fatalf("b moved %s back to n1 (a decision from its stale cache): %+v", fip1, g.Status)
	}
}

func sameMove(a, b v1.FloatingIPMove) bool {
	return a.IP == b.IP && a.From == b.From && a.To == b.To && a.Reason == b.Reason &&
		a.Time.Equal(&b.Time) && a.DetectionMilliseconds == b.DetectionMilliseconds
}

func mapsEqual[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestStaleLeaseGetsNoNewIP: a node whose agent stopped renewing its Lease
// (its sync loop is stuck) keeps the IP it holds while it answers probes,
// but is given no new one.
func TestStaleLeaseGetsNoNewIP(t *testing.T) {
	renewed := func(node string, at time.Time) *coordinationv1.Lease {
		l := leaseObj(node, "192.0.2.0/24")
		l.Spec.RenewTime = &metav1.MicroTime{Time: at}
		l.Spec.LeaseDurationSeconds = ptr.To(int32(30))
		return l
	}
	objs := []runtime.Object{
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		renewed("n1", epoch.Add(-31*time.Second)), renewed("n2", epoch.Add(-29*time.Second)),
		gatewayObj("gw", fip1, fip2),
	}
	g := gatewayObj("gw", fip1, fip2)
	g.Status.FloatingIPs = map[string]string{fip1: "n1"}
	objs[len(objs)-1] = g
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	got := cl.gateway(t, "gw").Status.FloatingIPs
	if want := map[string]string{fip1: "n1", fip2: "n2"}; !mapsEqual(got, want) {
		t.Fatalf("status.floatingIPs %v, want %v: stale n1 keeps %s and gets nothing new", got, want, fip1)
	}
	if !leaseStale(renewed("n1", epoch.Add(-31*time.Second)), epoch) || leaseStale(renewed("n2", epoch.Add(-29*time.Second)), epoch) {
		t.Fatal("leaseStale: renewed 31 s ago with a 30 s duration is stale, 29 s ago is not")
	}
	if leaseStale(leaseObj("n3", "192.0.2.0/24"), epoch) {
		t.Fatal("a Lease without renewTime is not stale (the agent registered)")
	}
}

// TestSilentHolderKeepsIPsForARPLease: a holder that went silent keeps its
// floating IPs until its ARP lease has surely run out (its kernel may still
// answer ARP for them while its agent is frozen), then they move; a node
// Down for another reason (a refusing agent) moves at once.
func TestSilentHolderKeepsIPsForARPLease(t *testing.T) {
	g := gatewayObj("gw", fip1, fip2)
	g.Status.FloatingIPs = map[string]string{fip1: "n1", fip2: "n2"}
	objs := objects()
	for i, o := range objs {
		if gg, ok := o.(*v1.NetworkGatewayGroup); ok && gg.Name == "gw" {
			objs[i] = g
		}
	}
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.setHealth("n2", true, epoch)
	c.setHealth("n3", true, epoch)
	c.prober.mu.Lock()
	c.prober.nodes["n1"] = &probeState{known: true, healthy: false, misses: 3, lastAlive: epoch}
	c.prober.mu.Unlock()
	hold := DefaultARPLease + DefaultProbeConfig.Interval

	cl.clk.SetTime(epoch.Add(hold - time.Millisecond))
	c.mustReconcile(t)
	if got := cl.gateway(t, "gw").Status.FloatingIPs[fip1]; got != "n1" {
		t.Fatalf("within the ARP lease of its last answer: %s on %s, want n1", fip1, got)
	}
	cl.clk.SetTime(epoch.Add(hold))
	c.mustReconcile(t)
	if got := cl.gateway(t, "gw").Status.FloatingIPs[fip1]; got != "n2" {
		t.Fatalf("after the ARP lease: %s on %s, want n2", fip1, got)
	}

	// A refusing agent past its grace: Down, not silent: no wait.
	c.prober.mu.Lock()
	c.prober.nodes["n2"] = &probeState{known: true, healthy: false, lastAlive: cl.clk.Now()}
	c.prober.mu.Unlock()
	c.mustReconcile(t)
	if got := cl.gateway(t, "gw").Status.FloatingIPs[fip1]; got == "n2" {
		t.Fatalf("a refusing agent's node kept %s", fip1)
	}
}

// TestUnprobedNodesKeepTheirIPs: a replica that just started (or just
// took the lead) has not probed the nodes to a conclusion yet: unknown is
// not Down, a holder keeps its IPs and no node gets a new one. Once the
// probes say the holder is Down, its IPs move.
func TestUnprobedNodesKeepTheirIPs(t *testing.T) {
	cl := newCluster(t, objects()...)
	first := cl.controller(t, false)
	first.setHealth("n1", true, epoch)
	first.setHealth("n2", true, epoch)
	first.mustReconcile(t)
	g := cl.gateway(t, "gw")
	holders := maps.Clone(g.Status.FloatingIPs)
	if len(holders) != 2 {
		t.Fatalf("first leader's assignment: %v", holders)
	}

	// A new replica leads before any probe of it finished.
	next := cl.controller(t, false)
	next.waitCaches(t, cl)
	next.events()
	cl.clk.Step(time.Second)
	next.mustReconcile(t)
	if g := cl.gateway(t, "gw"); !mapsEqual(g.Status.FloatingIPs, holders) || len(g.Status.RecentMoves) != 0 {
		t.Fatalf("a leader without probe results moved IPs: %v (were %v), moves %+v", g.Status.FloatingIPs, holders, g.Status.RecentMoves)
	}
	for _, e := range next.events() {
		if strings.Contains(e, "FloatingIPMoved") || strings.Contains(e, "no node") {
			t.Fatalf("a leader without probe results: %s", e)
		}
	}

	// Its probes conclude: fip1's holder is Down, the other node Up.
	down := holders[fip1]
	up := map[string]string{"n1": "n2", "n2": "n1"}[down]
	next.setHealth(down, false, epoch)
	next.setHealth(up, true, cl.clk.Now())
	next.waitCaches(t, cl)
	next.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != up {
		t.Fatalf("after the probes: %s on %s, want %s", fip1, g.Status.FloatingIPs[fip1], up)
	}
}

// TestStaleCandidateProbedFirst: a node that holds nothing is probed at
// the slow interval, so it takes seconds to be found Down. When its last
// probe went unanswered and an IP needs a holder, it is not given the IP
// (it may be dead already): it is probed at once, and gets the IP when it
// answers; the IP stays on its old holder meanwhile.
func TestStaleCandidateProbedFirst(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	c.waitCaches(t, cl)
	g := cl.gateway(t, "gw")
	holder := g.Status.FloatingIPs[fip1]
	other := map[string]string{"n1": "n2", "n2": "n1"}[holder]

	cl.clk.Step(time.Second)
	c.setHealth(holder, false, epoch)
	c.prober.mu.Lock()
	c.prober.nodes[other].misses = 1 // its last (slow) probe went unanswered
	c.prober.mu.Unlock()
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != holder {
		t.Fatalf("%s on %q while %s is probed, want it kept on %s until then", fip1, g.Status.FloatingIPs[fip1], other, holder)
	}
	c.prober.mu.Lock()
	urgent := c.prober.nodes[other].urgent && c.prober.nodes[other].next.IsZero()
	c.prober.mu.Unlock()
	if !urgent {
		t.Fatalf("%s not probed at once", other)
	}

	// Its answer: fresh, the IP moves.
	c.waitCaches(t, cl)
	c.healthy(other)
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if g.Status.FloatingIPs[fip1] != other || len(g.Status.RecentMoves) == 0 || g.Status.RecentMoves[0].From != holder {
		t.Fatalf("after %s answered: %s on %q, moves %+v", other, fip1, g.Status.FloatingIPs[fip1], g.Status.RecentMoves)
	}
}

// TestStandbysProbedFast: besides the holders, up to two nodes per group
// that could hold its IPs are probed at the fast interval.
func TestStandbysProbedFast(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", false, epoch)
	c.mustReconcile(t)
	c.waitCaches(t, cl)
	fast := func() map[string]bool {
		out := map[string]bool{}
		for _, p := range c.probeTargets() {
			out[p.name] = p.fast
		}
		return out
	}
	if f := fast(); !f["n1"] || f["n2"] {
		t.Fatalf("n1 holds, n2 is Down: fast %v", f)
	}
	c.healthy("n2")
	c.mustReconcile(t)
	if f := fast(); !f["n1"] || !f["n2"] {
		t.Fatalf("n2 Up, a standby: fast %v", f)
	}
}

// TestStaleWatchDecidesFromAPI: after an API server restart the groups'
// watch fails and client-go waits (up to 30 s) before it lists again; the
// status in the API meanwhile says a live node is Down (written while the
// node's agent restarted), the stale cache still says Up. The leader reads
// the groups from the API while the watch is down and writes the node Up;
// from the cache it would find nothing to change.
func TestStaleWatchDecidesFromAPI(t *testing.T) {
	cl := newCluster(t, objects()...)
	cl.optimisticConcurrency(t)
	cl.clients.Watches = &kube.WatchHealth{}
	var mu sync.Mutex
	down := false
	var live []watch.Interface
	cl.dyn.PrependWatchReactor("networkgatewaygroups", func(a k8stesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		defer mu.Unlock()
		if down {
			return true, nil, errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
		}
		w, err := cl.dyn.Tracker().Watch(kube.GatewayGVR, a.GetNamespace())
		live = append(live, w)
		return true, w, err
	})
	// The reflector's lists (from a resourceVersion) keep failing while
	// the watch is down, so that its cache stays behind; a plain read (the
	// leader's own) answers: the API server is back, client-go waits.
	cl.dyn.PrependReactor("list", "networkgatewaygroups", func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		l, ok := a.(interface{ GetListOptions() metav1.ListOptions })
		if down && ok && l.GetListOptions().ResourceVersion != "" {
			return true, nil, errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
		}
		return false, nil, nil
	})
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.Nodes["n1"] != v1.NodeUp {
		t.Fatalf("n1 not Up: %+v", g.Status)
	}
	// The API server restarts: the watch ends and cannot start again.
	c.waitCaches(t, cl)
	mu.Lock()
	down = true
	for _, w := range live {
		w.Stop()
	}
	mu.Unlock()
	eventually(t, "the groups' watch found down", func() bool {
		stale, _ := cl.clients.Watches.Stale(kube.GatewayGVR.Resource)
		return stale
	})
	// In the API (not in the cache): n1 Down.
	g := cl.gateway(t, "gw")
	g.Status.Nodes["n1"] = v1.NodeDown
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(g)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetGroupVersionKind(v1.GroupVersion.WithKind("NetworkGatewayGroup"))
	if _, err := cl.dyn.Resource(kube.GatewayGVR).Namespace(g.Namespace).UpdateStatus(context.Background(), u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The API answers reads again (the reflector still waits).
	for _, obj := range c.gateways.List() {
		if cached := obj.(*v1.NetworkGatewayGroup); cached.Status.Nodes["n1"] != v1.NodeUp {
			t.Fatalf("the cache caught up (n1 %q): the test would prove nothing", cached.Status.Nodes["n1"])
		}
	}
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.Nodes["n1"] != v1.NodeUp {
		t.Fatalf("the leader decided from its stale cache: n1 still %q in the API", g.Status.Nodes["n1"])
	}
}

// TestNodeSelector: only the nodes a group's spec.nodeSelector selects
// hold its IPs (here n2, although n1 comes first by name); when they are
// all Down the IPs are held by none and Ready says the selector's nodes
// have no Up node; a node labelled to match takes them.
func TestNodeSelector(t *testing.T) {
	objs := objects()
	n2 := nodeObj("n2", "192.0.2.12", corev1.ConditionTrue)
	n2.Labels = map[string]string{"egress": "yes"}
	objs[1] = n2
	gw := gatewayObj("gw", fip1, fip2)
	gw.Spec.NodeSelector = &v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"egress": "yes"}}
	objs[5] = gw
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	if g, want := cl.gateway(t, "gw"), map[string]string{fip1: "n2", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}

	// n2 Down: n1 is Up in the subnet but not selected.
	cl.clk.Step(time.Second)
	c.setHealth("n2", false, cl.clk.Now())
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if len(g.Status.FloatingIPs) != 0 {
		t.Fatalf("status.floatingIPs %v, want none (no selected node is Up)", g.Status.FloatingIPs)
	}
	checkCondition(t, "gateway Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionFalse, "Unassigned",
		"2 of 2 floating IPs have no Up node among the 1 spec.nodeSelector selects (n2) in their subnet: 192.0.2.100, 192.0.2.101", gwGen)

	// n1 labelled: it is selected, and takes the IPs.
	n1, err := cl.core.CoreV1().Nodes().Get(context.Background(), "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n1.Labels = map[string]string{"egress": "yes"}
	if _, err := cl.core.CoreV1().Nodes().Update(context.Background(), n1, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
	cl.clk.Step(time.Second)
	c.mustReconcile(t)
	if g, want := cl.gateway(t, "gw"), map[string]string{fip1: "n1", fip2: "n1"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("after labelling n1: status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
}
