package agent

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/selector"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	clienttesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	clocktesting "k8s.io/utils/clock/testing"
)

// TestSync: the first sync computes the node's state and applies it; a
// pod event updates only that pod (the tracker is kept); an unchanged state
// is not applied again; a node with nothing to do cleans up.
func TestSync(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if !slices.Equal(st.FloatingIPs, prefixes(fipA)) {
		t.Fatalf("floating IPs %v, want %s", st.FloatingIPs, fipA)
	}
	pa, pb := policy(t, st, "pa"), policy(t, st, "pb")
	if pa.Mode != selector.ModeGateway || pa.EgressIP != addrs(fipA)[0] || !slices.Equal(pa.Sources, addrs(web1IP.String(), web2IP.String())) {
		t.Fatalf("pa (this node holds its IP) %+v; want Gateway with every selected pod", pa)
	}
	if pb.Mode != selector.ModeReroute || pb.NextHop != n2IP || !slices.Equal(pb.Sources, addrs(web1IP.String())) {
		t.Fatalf("pb (n2 holds its IP) %+v; want Reroute to n2 with this node's pods", pb)
	}
	if !slices.Equal(pa.Destinations, []netip.Prefix{dests}) {
		t.Fatalf("pa destinations %v", pa.Destinations)
	}

	tracker := ta.tracker
	web3 := podObj("app", "web-3", node1, web3IP, webLabels)
	ta.cache(t, web3)
	ta.podChanged(web3)
	ta.mustSync(t)
	if ta.tracker != tracker {
		t.Fatal("a pod event recomputed everything")
	}
	if got := policy(t, ta.lastApplied(t), "pb").Sources; !slices.Equal(got, addrs(web1IP.String(), web3IP.String())) {
		t.Fatalf("pb sources after a pod event %v", got)
	}

	_, applied := ta.dp.counts()
	ta.mustSync(t)
	if _, n := ta.dp.counts(); n != applied {
		t.Fatal("an unchanged state was applied again")
	}

	// Every policy and gateway gone: clean up.
	for _, ix := range []cache.Indexer{ta.policies, ta.gateways} {
		for _, o := range ix.List() {
			if err := ix.Delete(o); err != nil {
				t.Fatal(err)
			}
		}
	}
	ta.recompute()
	ta.mustSync(t)
	if st := ta.lastApplied(t); len(st.Policies) != 0 || len(st.FloatingIPs) != 0 {
		t.Fatalf("after everything was deleted: %+v", st)
	}
	if ta.holding.Load() {
		t.Fatal("the agent thinks it holds floating IPs")
	}
}

// TestSyncAfterFailureStartsOver: after a failed Apply the next sync
// recomputes everything from the caches (a.full), not only the pods marked
// since, and applies even a state equal to the last one applied (the
// failed Apply may have changed part of the kernel).
func TestSyncAfterFailureStartsOver(t *testing.T) {
	t.Run("recomputes", func(t *testing.T) {
		ta := newTestAgent(t, cluster()...)
		ta.synced.Store(true)
		ta.mustSync(t)
		tracker := ta.tracker

		// A policy the incremental path cannot see (its event is lost
		// here on purpose), and a pod event for the incremental path.
		ta.cache(t, policyObj("pc", "gw-a"))
		web3 := podObj("app", "web-3", node1, web3IP, webLabels)
		ta.cache(t, web3)
		ta.podChanged(web3)
		ta.dp.fail(1)
		if err := ta.sync(context.Background()); err == nil || !strings.Contains(err.Error(), "apply: ") {
			t.Fatalf("sync with a failing Apply: %v", err)
		}

		ta.mustSync(t)
		if ta.tracker == tracker {
			t.Fatal("the sync after a failure did not recompute the state")
		}
		st := ta.lastApplied(t)
		if pc := policy(t, st, "pc"); !slices.Contains(pc.Sources, web3IP) {
			t.Fatalf("pc after the full recomputation %+v", pc)
		}
	})
	t.Run("applies an unchanged state", func(t *testing.T) {
		ta := newTestAgent(t, cluster()...)
		ta.synced.Store(true)
		ta.mustSync(t)
		first := ta.lastApplied(t)

		web3 := podObj("app", "web-3", node1, web3IP, webLabels)
		ta.cache(t, web3)
		ta.podChanged(web3)
		ta.dp.fail(1)
		if err := ta.sync(context.Background()); err == nil {
			t.Fatal("sync with a failing Apply succeeded")
		}
		// The pod goes again: the state is the one applied before the
		// failure, and must be applied again all the same.
		if err := ta.pods.Delete(web3); err != nil {
			t.Fatal(err)
		}
		ta.podChanged(web3)
		attempts, _ := ta.dp.counts()
		ta.mustSync(t)
		if n, _ := ta.dp.counts(); n != attempts+1 {
			t.Fatal("the state applied before a failed Apply was not applied again")
		}
		if !ta.lastApplied(t).Equal(first) {
			t.Fatalf("applied %+v, want %+v", ta.lastApplied(t), first)
		}
	})
}

// TestLoopBackoff: a failed sync is retried after 100 ms, then 200 ms,
// doubling up to 5 s; readiness reports the failure until a sync succeeds;
// a success resets the backoff.
func TestLoopBackoff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	key := slices.Clone(probeKey)
	ta.fence.key.Store(&key)
	backoffs := []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000}
	for i := range backoffs {
		backoffs[i] *= time.Millisecond
	}
	ta.dp.fail(len(backoffs))
	done := make(chan struct{})
	go func() { ta.loop(ctx); close(done) }()
	ta.kick()

	// waitRetry checks that the attempt after attempt n waits for exactly
	// d: the loop waits on the clock (its resync timer and heartbeat
	// ticker are the other waiters) and retries once d has passed, not
	// before.
	waitRetry := func(n int, d time.Duration) {
		t.Helper()
		eventually(t, "the loop to wait for its backoff", func() bool { return ta.clk.Waiters() == 3 })
		ta.clk.Step(d - time.Millisecond)
		if a, _ := ta.dp.counts(); ta.clk.Waiters() != 3 || a != n {
			t.Fatalf("retried before the backoff of %v passed (%d attempts)", d, a)
		}
		ta.clk.Step(time.Millisecond)
		eventually(t, "the retry", func() bool { a, _ := ta.dp.counts(); return a == n+1 })
	}

	eventually(t, "the first attempt", func() bool { a, _ := ta.dp.counts(); return a == 1 })
	eventually(t, "readiness to report the failure", func() bool {
		err := ta.Ready()
		return err != nil && strings.Contains(err.Error(), "last sync failed: apply: ")
	})
	for i, d := range backoffs {
		waitRetry(i+1, d)
	}
	eventually(t, "readiness after a successful sync", func() bool { return ta.Ready() == nil })
	if _, applied := ta.dp.counts(); applied != 1 {
		t.Fatalf("%d states applied, want 1", applied)
	}

	// A success resets the backoff: the next failure waits 100 ms again.
	ta.dp.fail(1)
	ta.reapply.Store(true)
	ta.kick()
	n := len(backoffs) + 2
	eventually(t, "the failing attempt", func() bool { a, _ := ta.dp.counts(); return a == n })
	waitRetry(n, 100*time.Millisecond)
	eventually(t, "readiness after a successful sync", func() bool { return ta.Ready() == nil })

	cancel()
	<-done
}

// TestLoopResync: every ResyncPeriod the loop recomputes everything and
// re-applies the state, asking the dataplane to recheck routes and
// addresses.
func TestLoopResync(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	done := make(chan struct{})
	go func() { ta.loop(ctx); close(done) }()
	ta.kick()
	eventually(t, "the first apply", func() bool { _, n := ta.dp.counts(); return n == 1 })
	tracker := ta.tracker
	eventually(t, "the resync timer and the heartbeat ticker", func() bool { return ta.clk.Waiters() == 2 })
	ta.clk.Step(ta.cfg.ResyncPeriod * 3 / 2) // the first tick comes within 1.5 periods
	eventually(t, "the resync", func() bool { _, n := ta.dp.counts(); return n == 2 })
	cancel()
	<-done
	if ta.tracker == tracker {
		t.Fatal("the resync did not recompute the state")
	}
	ta.dp.mu.Lock()
	defer ta.dp.mu.Unlock()
	if ta.dp.rechecks != 1 {
		t.Fatalf("%d rechecks, want 1", ta.dp.rechecks)
	}
}

// TestVerifyDrift: a drift found by Verify re-applies the same state.
func TestVerifyDrift(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ta := newTestAgent(t, cluster()...)
	ta.dp.drift = "set pa-src: 1 element missing"
	go ta.verify(ctx)
	eventually(t, "the verify timer", func() bool { return ta.clk.Waiters() == 1 })
	ta.clk.Step(ta.cfg.ResyncPeriod * 3 / 2)
	eventually(t, "a re-apply", func() bool { return ta.reapply.Load() })
	if !ta.kicked() {
		t.Fatal("a drift did not ask for a sync")
	}
}

// TestRenewLease: the agent creates its liveness Lease with the uplink
// subnets, then renews it.
func TestRenewLease(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t)
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	ta.clk.Step(10 * time.Second)
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := ta.core.CoordinationV1().Leases("egressnat-system").Get(ctx, kube.AgentLeasePrefix+node1, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Annotations[kube.AnnotationSubnets] != "192.0.2.11/24" || l.Annotations[kube.AnnotationUplink] != "eth0" ||
		l.Labels[kube.LabelComponent] != "agent" {
		t.Fatalf("lease metadata %v %v", l.Annotations, l.Labels)
	}
	if *l.Spec.HolderIdentity != node1 || *l.Spec.LeaseDurationSeconds != 30 ||
		!l.Spec.RenewTime.Time.Equal(epoch.Add(10*time.Second)) || !l.Spec.AcquireTime.Time.Equal(epoch) {
		t.Fatalf("lease spec %+v", l.Spec)
	}
	if _, ok := l.Annotations[kube.AnnotationForeignAddresses]; ok {
		t.Fatalf("foreign addresses published with none found: %v", l.Annotations)
	}
	// The uplink's router and the addresses something else put on it are
	// published for the operator, which then never assigns them.
	ta.cfg.Gateways = addrs("192.0.2.1")
	foreign := addrs("192.0.2.77", "192.0.2.78")
	ta.foreign.Store(&foreign)
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	l, err = ta.core.CoordinationV1().Leases("egressnat-system").Get(ctx, kube.AgentLeasePrefix+node1, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Annotations[kube.AnnotationUplinkGateway] != "192.0.2.1" || l.Annotations[kube.AnnotationForeignAddresses] != "192.0.2.77,192.0.2.78" {
		t.Fatalf("lease annotations %v", l.Annotations)
	}
}

// TestRunAgainstFakeCluster runs the whole agent (informers, handlers,
// sync loop, lease) against fake clientsets: it applies the cluster's
// state once its caches synced, follows a pod created later through the
// incremental path, and a floating IP the operator gives it.
func TestRunAgainstFakeCluster(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clients, core, dyn := fakeClients(t, append(cluster(), probeSecret())...)
	dp := &fakeDataplane{}
	a := newAgent(testConfig(t, clients, dp), clocktesting.NewFakeClock(epoch))
	a.fence.readyz = (&fakeAPI{up: true}).readyz
	done := make(chan error, 1)
	go func() { done <- a.run(ctx) }()

	applied := func(cond func(st selector.NodeState) bool) func() bool {
		return func() bool { st, ok := dp.last(); return ok && cond(st) }
	}
	sourcesOf := func(st selector.NodeState, name string) []netip.Addr {
		for _, p := range st.Policies {
			if p.Name == name {
				return p.Sources
			}
		}
		return nil
	}
	eventually(t, "the cluster's state", applied(func(st selector.NodeState) bool {
		return len(st.Policies) == 2 && slices.Equal(st.FloatingIPs, prefixes(fipA)) &&
			slices.Equal(sourcesOf(st, "pb"), addrs(web1IP.String()))
	}))
	eventually(t, "readiness", func() bool { return a.Ready() == nil })
	eventually(t, "the liveness lease", func() bool {
		l, err := core.CoordinationV1().Leases("egressnat-system").Get(ctx, kube.AgentLeasePrefix+node1, metav1.GetOptions{})
		return err == nil && l.Annotations[kube.AnnotationSubnets] == "192.0.2.11/24"
	})

	if _, err := core.CoreV1().Pods("app").Create(ctx, podObj("app", "web-3", node1, web3IP, webLabels), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new pod in pb's sources", applied(func(st selector.NodeState) bool {
		return slices.Equal(sourcesOf(st, "pb"), addrs(web1IP.String(), web3IP.String()))
	}))

	// The operator moves gw-b's IP to this node.
	gw := unstructuredOf(t, gatewayObj("gw-b", fipB, node1))
	if _, err := dyn.Resource(kube.GatewayGVR).Namespace("kube-system").UpdateStatus(ctx, gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "gw-b's IP on this node", applied(func(st selector.NodeState) bool {
		for _, p := range st.Policies {
			if p.Name == "pb" && p.Mode != selector.ModeGateway {
				return false
			}
		}
		return slices.Equal(st.FloatingIPs, prefixes(fipA, fipB))
	}))

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
}

// TestStaleGroupsReadFromAPI: while the groups' watch is down (client-go
// waits up to 30 s before it lists again), the agent reads the groups from
// the API every staleRefresh, so that it takes a floating IP the operator
// gave it meanwhile at once; once the watch is back, its cache serves.
func TestStaleGroupsReadFromAPI(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clients, _, dyn := fakeClients(t, cluster()...)
	clients.Watches = &kube.WatchHealth{}
	var mu sync.Mutex
	var first *watch.FakeWatcher
	down := true
	dyn.PrependWatchReactor("networkgatewaygroups", func(clienttesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = watch.NewFake()
			return true, first, nil
		}
		if down {
			return true, nil, errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
		}
		return true, watch.NewFake(), nil
	})
	// The informer's lists fail too while the watch is down; the agent's
	// own reads answer (the API server came back, the reflector waits).
	dyn.PrependReactor("list", "networkgatewaygroups", func(clienttesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if down && first != nil && first.IsStopped() {
			return true, nil, errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
		}
		return false, nil, nil
	})
	dp := &fakeDataplane{}
	clk := clocktesting.NewFakeClock(epoch)
	a := newAgent(testConfig(t, clients, dp), clk)
	a.fence.readyz = (&fakeAPI{up: true}).readyz
	a.fence.readGroups = func(context.Context) ([]*v1.NetworkGatewayGroup, error) {
		var out []*v1.NetworkGatewayGroup
		for _, name := range []string{"gw-a", "gw-b"} {
			obj, err := dyn.Tracker().Get(kube.GatewayGVR, "kube-system", name)
			if err != nil {
				return nil, err
			}
			g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](obj)
			if err != nil {
				return nil, err
			}
			out = append(out, g)
		}
		return out, nil
	}
	done := make(chan error, 1)
	go func() { done <- a.run(ctx) }()
	holds := func(ips ...string) func() bool {
		return func() bool { st, ok := dp.last(); return ok && slices.Equal(st.FloatingIPs, prefixes(ips...)) }
	}
	eventually(t, "gw-a's IP applied", holds(fipA))
	stale := func() bool { s, _ := clients.Watches.Stale(kube.GatewayGVR.Resource); return s }
	if stale() {
		t.Fatal("groups stale while watching")
	}

	// The API server goes away: the watch ends and cannot start again.
	mu.Lock()
	first.Stop()
	mu.Unlock()
	eventually(t, "the groups' cache stale", stale)
	// The operator gives gw-b's IP to this node: the cache cannot know.
	gw := unstructuredOf(t, gatewayObj("gw-b", fipB, node1))
	if _, err := dyn.Resource(kube.GatewayGVR).Namespace("kube-system").UpdateStatus(ctx, gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if cached := a.cachedHoldings(); cached[netip.MustParseAddr(fipB)] {
		t.Fatal("the cache saw the change without a watch")
	}
	eventually(t, "gw-b's IP taken from a fresh read", func() bool {
		clk.Step(staleRefresh)
		return holds(fipA, fipB)()
	})

	// The watch is back: the cache catches up and serves again.
	mu.Lock()
	down = false
	mu.Unlock()
	eventually(t, "the groups' cache current", func() bool { return !stale() })
	eventually(t, "the cache holds gw-b's IP", func() bool { return a.cachedHoldings()[netip.MustParseAddr(fipB)] })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
}

// TestLocalPodsReadWhileWatchLags: after the pods' watch failed, a watch
// that starts again may still not deliver (seen for seconds after API
// server restarts). For a while every sync reads this node's pods from the
// API: a label change that makes a pod unselected reaches the node's rules
// although the cache has not seen it.
func TestLocalPodsReadWhileWatchLags(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clients, core, _ := fakeClients(t, cluster()...)
	clients.Watches = &kube.WatchHealth{}
	podsGVR := corev1.SchemeGroupVersion.WithResource("pods")
	var mu sync.Mutex
	lagging, failures := false, 0
	var live []watch.Interface
	core.PrependWatchReactor("pods", func(a clienttesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		defer mu.Unlock()
		if lagging {
			if failures < 2 {
				failures++
				return true, nil, errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
			}
			return true, watch.NewFake(), nil // started, never delivers
		}
		w, err := core.Tracker().Watch(podsGVR, a.GetNamespace())
		live = append(live, w)
		return true, w, err
	})
	dp := &fakeDataplane{}
	clk := clocktesting.NewFakeClock(epoch)
	a := newAgent(testConfig(t, clients, dp), clk)
	a.fence.readyz = (&fakeAPI{up: true}).readyz
	done := make(chan error, 1)
	go func() { done <- a.run(ctx) }()
	source := func(ip netip.Addr) bool {
		st, ok := dp.last()
		if !ok {
			return false
		}
		for _, p := range st.Policies {
			if slices.Contains(p.Sources, ip) {
				return true
			}
		}
		return false
	}
	eventually(t, "web-1 selected", func() bool { return source(web1IP) })

	// The API server restarts: the watch ends, fails, and starts again,
	// lagging.
	mu.Lock()
	lagging = true
	for _, w := range live {
		w.Stop()
	}
	mu.Unlock()
	eventually(t, "the pods' watch started again", func() bool {
		stale, _ := clients.Watches.Stale("pods")
		return !stale && a.podsFresh()
	})
	pod, err := core.CoreV1().Pods("app").Get(ctx, "web-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Labels = map[string]string{"app": "db"}
	if _, err := core.CoreV1().Pods("app").Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if obj, ok, _ := a.pods.GetByKey("app/web-1"); !ok || obj.(*corev1.Pod).Labels["app"] != "web" {
		t.Fatal("the cache saw the change without a watch")
	}
	eventually(t, "web-1 unselected from a fresh read", func() bool {
		clk.Step(staleRefresh)
		return !source(web1IP)
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
}
