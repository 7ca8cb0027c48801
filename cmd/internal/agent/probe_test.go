package agent

import (
	"bufio"
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
	"github.com/egressnat/egressnat/nft"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var probeKey = []byte("0123456789abcdef0123456789abcdef")

// TestProbeServer: on a real socket, only an authenticated probe sent to
// this node's address is answered; only the current leader's fresh probes
// hold the fence down; a standby's, a deposed leader's, a replayed one, a
// scanner's or one signed with another key do not.
func TestProbeServer(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.beat.Store(41)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go ta.fence.serveProbes(ctx, l)
	lo := netip.MustParseAddr("127.0.0.1")

	// send writes line and returns the reply ("" when closed without one).
	send := func(line []byte) string {
		t.Helper()
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(line); err != nil {
			t.Fatal(err)
		}
		r, _ := bufio.NewReader(c).ReadString('\n')
		return r
	}
	lastProbe := func() time.Time {
		ta.fence.mu.Lock()
		defer ta.fence.mu.Unlock()
		return ta.fence.lastProbe
	}
	leader := func(id string, term int64, counter uint64) probe.Probe {
		return probe.Probe{Role: probe.RoleLeader, Identity: id, Term: term, Counter: counter, Node: lo}
	}
	// Without the key yet, the agent says so and nothing counts.
	before := lastProbe()
	if r := send(leader("op-0", 3, 1).Encode(probeKey)); r != probe.NoKey || lastProbe() != before {
		t.Fatalf("without a key: reply %q, counted %v", r, lastProbe() != before)
	}
	k := append([]byte(nil), probeKey...)
	ta.fence.key.Store(&k)
	for _, tc := range []struct {
		name    string
		p       probe.Probe
		key     []byte
		raw     string
		answers bool
		counts  bool
	}{
		{name: "a scanner", raw: "GET / HTTP/1.0\r\n\r\n"},
		{name: "another key", p: leader("op-0", 3, 100), key: []byte("some other key of 32 bytes......")},
		{name: "sent to another address", p: probe.Probe{Role: probe.RoleLeader, Identity: "op-0", Term: 3, Counter: 100, Node: n2IP}, key: probeKey},
		{name: "a standby", p: probe.Probe{Role: probe.RoleStandby, Identity: "op-1", Counter: 5, Node: lo}, key: probeKey, answers: true},
		{name: "the leader", p: leader("op-0", 3, 100), key: probeKey, answers: true, counts: true},
		{name: "the leader again", p: leader("op-0", 3, 101), key: probeKey, answers: true, counts: true},
		{name: "a replay", p: leader("op-0", 3, 101), key: probeKey, answers: true},
		{name: "a new leader", p: leader("op-1", 4, 7), key: probeKey, answers: true, counts: true},
		{name: "the deposed leader", p: leader("op-0", 3, 102), key: probeKey, answers: true},
	} {
		ta.clk.Step(time.Second)
		before := lastProbe()
		line := []byte(tc.raw)
		if tc.raw == "" {
			line = tc.p.Encode(tc.key)
		}
		reply := send(line)
		if got := reply != ""; got != tc.answers {
			t.Fatalf("%s: answered %v (%q), want %v", tc.name, got, reply, tc.answers)
		}
		if tc.answers {
			r, err := probe.DecodeReply(probeKey, tc.p, reply)
			if err != nil || r.Heartbeat != 41 {
				t.Fatalf("%s: reply %q: %+v %v, want heartbeat 41", tc.name, reply, r, err)
			}
		}
		// The probe was handled before its reply was written; a probe
		// without reply is handled before the connection closes.
		if counted := lastProbe() != before; counted != tc.counts {
			t.Fatalf("%s: held the fence down %v, want %v", tc.name, counted, tc.counts)
		}
	}
}

// TestReleaseOnMove: when the operator moves a floating IP away, the agent
// gives it up through the dataplane's fast path before the Apply of the new
// state, and releases nothing when nothing moved.
func TestReleaseOnMove(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.mustSync(t)
	ta.dp.history()
	ta.reapply.Store(true)
	ta.mustSync(t)
	if h := ta.dp.history(); !slices.Equal(h, []string{"apply"}) {
		t.Fatalf("nothing moved: dataplane calls %q, want one apply", h)
	}

	ta.cache(t, gatewayObj("gw-a", fipA, node2))
	ta.recompute()
	ta.mustSync(t)
	if h := ta.dp.history(); !slices.Equal(h, []string{"release", "apply"}) {
		t.Fatalf("IP moved away: dataplane calls %q, want release then apply", h)
	}
	ta.dp.mu.Lock()
	got := ta.dp.released
	ta.dp.mu.Unlock()
	if len(got) != 1 || !slices.Equal(got[0], addrs(fipA)) {
		t.Fatalf("released %v, want [%s]", got, fipA)
	}
	// A failing Apply does not hold the release back: it happened first.
	ta.cache(t, gatewayObj("gw-a", fipA, node1))
	ta.recompute()
	ta.mustSync(t)
	ta.dp.history()
	ta.dp.fail(1)
	ta.cache(t, gatewayObj("gw-a", fipA, node2))
	ta.recompute()
	if err := ta.sync(context.Background()); err == nil {
		t.Fatal("the apply did not fail")
	}
	if h := ta.dp.history(); !slices.Equal(h, []string{"release", "apply"}) {
		t.Fatalf("failing apply: dataplane calls %q, want release then apply", h)
	}
}

// TestConflictRetry: an IP someone else still answers for is not taken by
// the dataplane (nft.Result.Conflicts); the agent applies again soon to
// probe again, without any event.
func TestConflictRetry(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.dp.result = nft.Result{Conflicts: addrs(fipA)}
	ta.mustSync(t)
	ta.kicked()
	ta.clk.Step(conflictRetry - time.Millisecond)
	if ta.kicked() {
		t.Fatal("retried before conflictRetry")
	}
	ta.clk.Step(time.Millisecond)
	if !ta.kicked() || !ta.reapply.Load() {
		t.Fatal("no retry after a conflict")
	}
	ta.dp.result = nft.Result{}
	ta.dp.history()
	ta.mustSync(t)
	if h := ta.dp.history(); !slices.Equal(h, []string{"apply"}) {
		t.Fatalf("retry: dataplane calls %q, want an apply of the same state", h)
	}
}

// TestLeaseRenewedOnlyWhileProgressing: once synced, the agent renews its
// Lease only when its heartbeat moved since the last renewal.
func TestLeaseRenewedOnlyWhileProgressing(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	renewTime := func() time.Time {
		l, err := ta.core.CoordinationV1().Leases("egressnat-system").Get(ctx, "egressnat-agent-"+node1, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return l.Spec.RenewTime.Time
	}
	if err := ta.renewIfProgressing(ctx); err != nil {
		t.Fatalf("first renewal, before the first sync: %v", err)
	}
	ta.synced.Store(true)
	ta.beat.Add(1)
	ta.clk.Step(time.Second)
	if err := ta.renewIfProgressing(ctx); err != nil {
		t.Fatal(err)
	}
	first := renewTime()
	ta.clk.Step(10 * time.Second)
	if err := ta.renewIfProgressing(ctx); err == nil {
		t.Fatal("renewed while the heartbeat stood still")
	}
	if renewTime() != first {
		t.Fatal("the Lease moved while the heartbeat stood still")
	}
	ta.beat.Add(1)
	if err := ta.renewIfProgressing(ctx); err != nil || !renewTime().After(first) {
		t.Fatalf("heartbeat moved: renewal %v, renewTime %v after %v", err, renewTime(), first)
	}
}

// TestHeartbeat: the heartbeat advances every second while the sync loop
// is idle and at every sync, and stands still while a sync is stuck.
func TestHeartbeat(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	done := make(chan struct{})
	go func() { ta.loop(ctx); close(done) }()
	eventually(t, "the loop to wait", func() bool { return ta.clk.Waiters() == 2 })
	b := ta.beat.Load()
	ta.clk.Step(time.Second)
	eventually(t, "the idle heartbeat", func() bool { return ta.beat.Load() > b })

	block := make(chan struct{})
	ta.dp.mu.Lock()
	ta.dp.block = block
	ta.dp.mu.Unlock()
	ta.kick()
	eventually(t, "the sync to start", func() bool { a, _ := ta.dp.counts(); return a == 1 })
	b = ta.beat.Load()
	for range 5 {
		ta.clk.Step(time.Second)
	}
	if ta.beat.Load() != b {
		t.Fatal("the heartbeat moved while the sync was stuck")
	}
	close(block)
	eventually(t, "the heartbeat after the sync", func() bool { return ta.beat.Load() > b })
	cancel()
	<-done
}

// TestConntrackChecks: the first apply checks every floating IP of the
// cluster (held ones as taken, the others as released: a restart may follow
// a crash mid-apply); a move checks the IP given up once, and an IP taken
// later is checked as taken; an apply that changes no holding checks
// nothing.
func TestConntrackChecks(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.mustSync(t)
	want := []string{"released [" + fipB + "]", "taken [" + fipA + "]"}
	eventually(t, "the first checks", func() bool { return len(ta.dp.verifiedNow()) == 2 })
	if got := ta.dp.checks(); !slices.Equal(got, want) {
		t.Fatalf("first apply: checks %q, want %q", got, want)
	}
	ta.reapply.Store(true)
	ta.mustSync(t)

	ta.cache(t, gatewayObj("gw-a", fipA, node2))
	ta.recompute()
	ta.mustSync(t)
	eventually(t, "the release check", func() bool { return len(ta.dp.verifiedNow()) >= 1 })
	ta.cache(t, gatewayObj("gw-b", fipB, node1))
	ta.recompute()
	ta.mustSync(t)
	eventually(t, "the taken check", func() bool { return len(ta.dp.verifiedNow()) >= 2 })
	if got, want := ta.dp.checks(), []string{"released [" + fipA + "]", "taken [" + fipB + "]"}; !slices.Equal(got, want) {
		t.Fatalf("after a move away and a take: checks %q, want %q", got, want)
	}
}

// TestFenceAfterStall: an agent that did not run for seconds (stopped,
// starved of CPU) does not fence the moment it runs again for the probes it
// could not see; if it is really cut off, it fences FenceAfter later.
func TestFenceAfterStall(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.api.set(false)
	done := make(chan struct{})
	go func() { ta.fence.watch(ctx); close(done) }()
	eventually(t, "the fence ticker", func() bool { return ta.clk.HasWaiters() })
	// tick advances the clock by d and waits for the watch to evaluate.
	tick := func(d time.Duration) {
		ta.clk.Step(d)
		eventually(t, "the fence tick", func() bool {
			ta.fence.mu.Lock()
			defer ta.fence.mu.Unlock()
			return ta.fence.lastTick.Equal(ta.clk.Now())
		})
	}
	tick(5 * time.Second) // the agent was stopped for 5 s
	if fenced, recovering := ta.fence.state(); fenced || !recovering {
		t.Fatalf("after a stall: fenced=%v recovering=%v; want recovering (its IPs may have moved), not fenced", fenced, recovering)
	}
	for range 10 {
		tick(100 * time.Millisecond)
	}
	if fenced, _ := ta.fence.state(); fenced {
		t.Fatal("fenced within FenceAfter of the stall")
	}
	tick(100 * time.Millisecond)
	if fenced, _ := ta.fence.state(); !fenced {
		t.Fatal("cut off: not fenced FenceAfter after the stall")
	}
	cancel()
	<-done
}

// TestKeepARP: the ARP lease is renewed every 100 ms from the first apply
// on, while the leader's probes come, and not while the agent's loop made
// no progress for arpStuck, while it recovers or while it is fenced.
func TestKeepARP(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.cfg.ARPLease = 300 * time.Millisecond
	done := make(chan struct{})
	go func() { ta.keepARP(ctx); close(done) }()
	eventually(t, "the ARP ticker", func() bool { return ta.clk.HasWaiters() })
	leaderProbes := true
	step := func(n int) int {
		before := ta.dp.renewals()
		for range n {
			ta.clk.Step(arpRenewal)
			if leaderProbes {
				ta.fence.probed()
			}
			eventually(t, "the ARP tick", func() bool { return ta.arpTick.Load() == ta.clk.Now().UnixNano() })
		}
		return ta.dp.renewals() - before
	}
	if n := step(3); n != 0 {
		t.Fatalf("before the first apply: %d renewals in 3 ticks, want none (the kernel's IPs may have moved)", n)
	}
	ta.synced.Store(true)
	ta.mustSync(t)
	ta.beat.Add(1)
	if n := step(3); n != 3 {
		t.Fatalf("loop progressing: %d renewals in 3 ticks, want 3", n)
	}
	step(int(arpStuck/arpRenewal) + 1) // the loop stands still past arpStuck
	if n := step(3); n != 0 {
		t.Fatalf("loop stuck: %d renewals, want none", n)
	}
	ta.beat.Add(1)
	// The lease ran out while the loop stood still: renewed again only
	// after a fresh read confirmed the IPs.
	if n := step(3); n != 0 {
		t.Fatalf("loop progressing again after the lease ran out: %d renewals before a fresh read", n)
	}
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("loop progressing again after the lease ran out: no recovery")
	}
	ta.mustSync(t)
	ta.beat.Add(1)
	if n := step(3); n == 0 {
		t.Fatal("loop progressing again: no renewal")
	}
	leaderProbes = false
	step(1)
	if n := step(1); n != 0 {
		t.Fatalf("no leader probe for over %v: %d renewals, want none", arpProbeWindow, n)
	}
	leaderProbes = true
	if n := step(3); n == 0 {
		t.Fatal("leader probes again within the lease: no renewal")
	}
	if _, recovering := ta.fence.state(); recovering {
		t.Fatal("a gap shorter than the lease started a recovery")
	}
	// A gap longer than the lease: the leader may have moved the IPs; the
	// lease is renewed again once a fresh read confirmed them.
	leaderProbes = false
	step(1) // the last probe 100 ms ago: renewed
	if n := step(4); n != 0 {
		t.Fatalf("no leader probe for 500 ms: %d renewals, want none", n)
	}
	leaderProbes = true
	if n := step(3); n != 0 {
		t.Fatalf("leader probes again after the lease ran out: %d renewals before a fresh read, want none", n)
	}
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("the lease ran out: no recovery")
	}
	ta.mustSync(t) // the fresh read agrees with the cache: recovery over
	if n := step(3); n == 0 {
		t.Fatal("recovered: no renewal")
	}
	// The agent itself did not run for longer than the lease (SIGSTOP, CPU
	// starvation; shorter than a stall), and the probes queued meanwhile
	// were handled before its next tick: its own clock says the lease ran
	// out, the leader may have moved the IPs; no renewal before a fresh read.
	ta.fence.mu.Lock()
	ta.fence.lastProbe = ta.clk.Now().Add(400 * time.Millisecond)
	ta.fence.mu.Unlock()
	before := ta.dp.renewals()
	ta.clk.Step(400 * time.Millisecond)
	eventually(t, "the ARP tick after the pause", func() bool { return ta.arpTick.Load() == ta.clk.Now().UnixNano() })
	if n := ta.dp.renewals() - before; n != 0 {
		t.Fatalf("lease ran out while the agent did not run: %d renewals before a fresh read, want none", n)
	}
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("the lease ran out while the agent did not run: no recovery")
	}
	ta.mustSync(t)
	if n := step(3); n == 0 {
		t.Fatal("recovered after the pause: no renewal")
	}
	ta.fence.mu.Lock()
	ta.fence.recovering = true
	ta.fence.mu.Unlock()
	if n := step(3); n != 0 {
		t.Fatalf("recovering: %d renewals, want none", n)
	}
	ta.fence.mu.Lock()
	ta.fence.recovering = false
	ta.fence.mu.Unlock()
	ta.cutOff(t)
	if n := step(3); n != 0 {
		t.Fatalf("fenced: %d renewals, want none", n)
	}
	cancel()
	<-done
}

// TestReadyAfterFirstApply: the agent is ready only once its first apply
// is done: pods on a rebooted node must not start while their traffic
// would leave with the node's address.
func TestReadyAfterFirstApply(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	if err := ta.Ready(); err == nil || err.Error() != "first apply not done" {
		t.Fatalf("before the first apply: Ready() = %v", err)
	}
	ta.mustSync(t)
	if err := ta.Ready(); err == nil || err.Error() != "probe key not loaded" {
		t.Fatalf("after the first apply, without the probe key: Ready() = %v", err)
	}
	k := slices.Clone(probeKey)
	ta.fence.key.Store(&k)
	if err := ta.Ready(); err != nil {
		t.Fatalf("after the first apply, with the probe key: Ready() = %v", err)
	}
}

// TestStallSeenBySync: when the sync runs first after the agent resumes
// (before the fence's ticker), it sees the stall itself: it holds only
// what a fresh read confirms.
func TestStallSeenBySync(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.mustSync(t)
	ta.fence.mu.Lock()
	ta.fence.lastTick = ta.clk.Now()
	ta.fence.mu.Unlock()
	ta.clk.Step(3 * time.Second) // stopped; meanwhile gw-a's IP moved to n2
	if _, err := ta.dyn.Resource(kube.GatewayGVR).Namespace("kube-system").UpdateStatus(context.Background(),
		unstructuredOf(t, gatewayObj("gw-a", fipA, node2)), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.reapply.Store(true)
	ta.mustSync(t)
	if _, recovering := ta.fence.state(); !recovering {
		t.Fatal("the sync did not see the stall")
	}
	if st := ta.lastApplied(t); len(st.FloatingIPs) != 0 {
		t.Fatalf("after a stall the sync applied floating IPs %v the API no longer gives", st.FloatingIPs)
	}
}
