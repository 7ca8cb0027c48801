// Package agent is the egressnat node agent's controller: it watches
// policies, gateways, pods, namespaces and nodes, keeps this node's desired
// state with the pure selector.Tracker, and hands it to the dataplane,
// which applies it in one transaction. A pod event updates only the
// policies the pod belongs to (and the dataplane touches only their
// elements); any other change recomputes the node's state. It also renews
// the node's Lease, which registers it and carries the uplink subnets the operator
// needs.
package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/metrics"
	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
)

// Dataplane applies a node state to the kernel: *nft.Dataplane, or a fake
// in the tests.
type Dataplane interface {
	Apply(ctx context.Context, st selector.NodeState) error
	Cleanup(ctx context.Context) error
	// ReleaseFloating drops every floating IP the node recorded, keeping
	// the rest: the fence's action, before or after the first sync.
	ReleaseFloating(ctx context.Context) error
	// Release gives up some floating IPs at once (address, SNAT rules,
	// conntrack) without a full Apply: an IP moved away is released
	// before the next Apply, whatever that Apply's fate.
	Release(ctx context.Context, ips []netip.Addr) (nft.ReleaseResult, error)
	// VerifyReleased deletes the conntrack entries still translated to
	// floating IPs the node gave up and counts what remains; VerifyTaken
	// checks that the entries of the node's Gateway policies translate to
	// the floating IPs it took, and deletes those that do not.
	VerifyReleased(ctx context.Context, ips []netip.Addr) (nft.CTVerify, error)
	VerifyTaken(ctx context.Context, ips []netip.Addr) (nft.CTVerify, error)
	// KeepARP renews the kernel's ARP lease on the floating IPs held: the
	// node stops answering ARP for them when it is not renewed (the
	// agent frozen or stuck). It never waits for an Apply.
	KeepARP(ctx context.Context) error
	// Verify compares the kernel with what was applied and describes a
	// difference ("" when none).
	Verify(ctx context.Context) (drift string, err error)
	// Dump returns the counters of the policies' rules.
	Dump(ctx context.Context) ([]nft.PolicyCounters, error)
	// Recheck makes the next Apply re-apply routes, addresses and sysctls
	// even when the state did not change.
	Recheck()
	// LastResult is what the last Apply or Cleanup did.
	LastResult() nft.Result
	// Guard installs the table with only its fixed rules (the forward
	// guard) when the node has none, before the first Apply.
	Guard(ctx context.Context, internal, dests []netip.Prefix) (bool, error)
}

// PodsObserver is told this node's known pods (selector.NodeState.
// LocalPods) after each successful Apply.
type PodsObserver interface {
	SetPods(pods []netip.Addr)
}

// Config of the agent.
type Config struct {
	Clients *kube.Clients
	Node    string
	Uplink  string
	Subnets []netip.Prefix // the uplink's own addresses with their prefix
	// Gateways: the uplink's IPv4 default gateways, published on the
	// Lease (no floating IP may be one of them).
	Gateways  []netip.Addr
	Namespace string // where the agent's Lease lives
	// LeaseDuration after the last renewal the operator declares the node
	// Down; RenewInterval is how often the agent renews.
	LeaseDuration, RenewInterval time.Duration
	// ResyncPeriod re-applies the state even without events, repairing
	// drift in the kernel.
	ResyncPeriod     time.Duration
	FallbackToNodeIP bool
	// PodCIDRs and ServiceCIDRs are cluster-internal destinations the API
	// may not know (a CNI that leaves Node.spec.podCIDRs empty, an API
	// server without ServiceCIDR objects): never steered.
	PodCIDRs, ServiceCIDRs []netip.Prefix
	// MarkMask is the dataplane's mark mask (for messages).
	MarkMask uint32
	// GatewayNamespaces are the namespaces whose groups are honoured
	// (selector.GatewayNamespaces); nil means kube-system only.
	GatewayNamespaces []string
	// HealthAddr is where the operators' health probes connect.
	HealthAddr string
	// FenceAfter: a node holding floating IPs that has seen no probe of the
	// operator leader for this long and cannot reach the API server
	// releases them.
	FenceAfter time.Duration
	// ARPLease: how long the node answers ARP for its floating IPs after
	// the agent's last renewal (nft.Config.ARPLease; 0 or less: no lease).
	// A lease that ran out for want of the leader's probes makes the agent
	// confirm its IPs with the API before it renews again.
	ARPLease time.Duration
	// StateDir keeps what the agent needs before it can reach the API
	// server after a reboot (the cluster networks of the last apply, for
	// the guard table); "" keeps nothing.
	StateDir string
	// ProbeSecret names the Secret, in Namespace, with the probe key;
	// "" means probe.SecretName.
	ProbeSecret string
	// CleanupOnUninstall: when the agent stops while egressnat is being
	// uninstalled (IsUninstall: its namespace or its DaemonSet deleted),
	// it removes everything it put on the node (Uninstall). It follows its
	// namespace (Namespace) and the DaemonSet that owns its pod PodName
	// (in Namespace; "": only the namespace counts) through the API.
	CleanupOnUninstall bool
	PodName            string
	// ProcSysNet is the host's /proc/sys/net, writable, where an uninstall
	// restores the sysctls recorded in StateDir; "" restores none.
	ProcSysNet string
	// DrainTimeout: an agent told to stop (not for an uninstall) that
	// holds floating IPs asks for them to be handed over to other nodes
	// (AnnotationDraining on its Lease) and waits until it holds none, at
	// most this long; 0 stops at once.
	DrainTimeout time.Duration
	// Classifier is told this node's known pods after each successful
	// Apply (the eBPF classifier attaches to the interfaces that reach
	// them); nil: none. ClassifierInfo is the backend that runs, published
	// on the Lease (kube.AnnotationClassifier); BPFDir is where the eBPF
	// classifier pins (an uninstall removes it).
	Classifier     PodsObserver
	ClassifierInfo string
	BPFDir         string
	Dataplane      Dataplane
	Log            *zap.Logger
	// Metrics are updated when set.
	Metrics *metrics.Agent
}

// Ready reports whether the agent applies its state: caches synced, the
// last sync succeeded after a first apply, and the probe key loaded.
func (a *agent) Ready() error {
	switch {
	case !a.synced.Load():
		return errors.New("caches not synced")
	case a.syncErr.Load() != nil:
		return fmt.Errorf("last sync failed: %v", *a.syncErr.Load())
	case a.held.Load() == nil:
		// Pods that start on this node before the first apply would
		// leave with the node's address (a rebooted node).
		return errors.New("first apply not done")
	case a.fence.key.Load() == nil:
		// Without the key the agent cannot answer the operators' probes
		// (the node counts as restarting) nor tell the leader's probes.
		return errors.New("probe key not loaded")
	}
	return nil
}

type agent struct {
	cfg Config
	// log carries the node.
	log     *zap.Logger
	clock   clock.WithTickerAndDelayedExecution
	trigger chan struct{}

	pods, namespaces, nodes, gateways, policies cache.Indexer
	last                                        *selector.NodeState
	// tracker holds the desired state between syncs. Pod events mark their
	// pod dirty; every other event asks for a full recomputation.
	tracker         *selector.Tracker
	full            atomic.Bool
	reapply         atomic.Bool // apply even when the state did not change
	dirtyMu         sync.Mutex
	dirty           map[string]time.Time // pod key -> when first marked
	fence           *fence
	recorder        record.EventRecorder
	fencedGroups    map[*corev1.ObjectReference][]string // only the fence goroutine
	holding, synced atomic.Bool
	syncErr         atomic.Pointer[string]
	// nets: cluster-internal destinations listed from the API.
	nets clusterNets
	// unroutable: the policies without a mark at the last apply (their
	// Event was recorded); foreign: wanted floating IPs something else put
	// on the uplink, published on the Lease.
	unroutable map[string]bool
	foreign    atomic.Pointer[[]netip.Addr]
	leaseKick  chan struct{}
	// prepared: the floating IPs prepared for a handover to this node
	// (added unannounced at the last apply), and draining: why the agent
	// asks for its IPs to be handed over; both published on the Lease.
	prepared atomic.Pointer[[]netip.Addr]
	draining atomic.Pointer[string]
	// beat is the heartbeat: it advances only while the sync loop makes
	// progress (every loop turn, and every second while idle); probe
	// replies carry it, and the Lease is renewed only while it moves.
	beat      atomic.Uint64
	leaseBeat uint64 // beat at the last renewal; only renewLease
	// held: the floating IPs of the last successful apply (read by the
	// fence to release them, written by the sync loop).
	held atomic.Pointer[[]netip.Addr]
	// arpTick: the clock at the last tick keepARP handled (for tests).
	arpTick atomic.Int64
	// saved: the text last written to each StateDir file, by file name
	// (only the sync loop, after guardAtStart).
	saved map[string]string
	// podsFreshUntil (unix nanoseconds): until then, after the pods'
	// watch failed or started again, every sync also reads this node's
	// pods from the API (freshLocalPods).
	podsFreshUntil atomic.Int64
	// checks: the conntrack checks running in the background.
	checks sync.WaitGroup
}

// RunWithReady runs the agent until ctx ends, handing its readiness check
// to ready first (for /readyz). It leaves the kernel as it is on return: a
// restarting agent must not disturb traffic. Told to stop (ctx ends), it
// first decides whether egressnat is being uninstalled
// (Config.CleanupOnUninstall, IsUninstall): then it removes the node's
// state, within UninstallBudget; otherwise it hands its floating IPs over
// to other nodes (drain, within Config.DrainTimeout), then stops.
func RunWithReady(ctx context.Context, cfg Config, ready func(func() error)) error {
	a := newAgent(cfg, clock.RealClock{})
	ready(a.Ready)
	return a.runUntilStopped(ctx)
}

// runUntilStopped is run, which outlives ctx: when ctx ends, the uninstall
// verdict, then an uninstall or a drain, then the end of run.
func (a *agent) runUntilStopped(ctx context.Context) error {
	runCtx, stopRun := context.WithCancel(context.WithoutCancel(ctx))
	defer stopRun()
	var w *installWatch
	if a.cfg.CleanupOnUninstall {
		// The watches outlive ctx: the verdict is taken after the stop.
		wctx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
		defer stopWatch()
		w = newInstallWatch(a.cfg.Clients, a.cfg.Namespace, a.cfg.PodName, a.log)
		go w.run(wctx)
	}
	uninstall := make(chan bool, 1)
	go func() {
		select {
		case <-runCtx.Done():
			return // run ended on its own
		case <-ctx.Done():
		}
		if w != nil {
			dctx, cancel := context.WithTimeout(context.Background(), UninstallBudget)
			ok, why := w.decide(dctx)
			cancel()
			if ok {
				a.log.Info("stopping: egressnat is being uninstalled, removing everything it put on this node", zap.String("reason", why))
				uninstall <- true
				stopRun()
				return
			}
			a.log.Info("stopping: not an uninstall, leaving the kernel as it is", zap.String("reason", why))
		}
		a.drain(runCtx, a.cfg.DrainTimeout)
		stopRun()
	}()
	err := a.run(runCtx)
	if ctx.Err() == nil {
		return err // not told to stop
	}
	select {
	case <-uninstall:
		// The sync loop has returned: no Apply races the clean-up.
		return errors.Join(err, a.uninstallNode(UninstallBudget))
	default:
		return err
	}
}

// UninstallBudget: how long an agent told to stop takes at most to decide
// whether egressnat is being uninstalled and, if so, to remove the node's
// state; below the DaemonSet's terminationGracePeriodSeconds (10).
const UninstallBudget = 7 * time.Second

// newAgent builds an agent and its fence on the clock clk.
func newAgent(cfg Config, clk clock.WithTickerAndDelayedExecution) *agent {
	a := &agent{cfg: cfg, log: cfg.Log.With(zap.String("node", cfg.Node)), clock: clk,
		trigger: make(chan struct{}, 1), leaseKick: make(chan struct{}, 1), dirty: map[string]time.Time{}}
	// Until the first sync, assume the node holds floating IPs (its kernel
	// may, from before a restart): a node that starts cut off must fence.
	a.holding.Store(true)
	a.fence = newFence(cfg, a.log, clk, a.kick, a.holding.Load)
	a.fence.event = a.fenceEvent
	a.fence.release = a.releaseAll
	a.fence.cached = a.cachedHoldings
	a.fence.beat = a.beat.Load
	return a
}

// releaseAll drops every floating IP the node holds, through the
// dataplane's fast path, when the fence rises; the sync loop then applies
// the fenced state (Gateway policies drop).
func (a *agent) releaseAll(ctx context.Context) {
	start := a.clock.Now()
	err := a.cfg.Dataplane.ReleaseFloating(ctx)
	if a.cfg.Metrics != nil {
		a.cfg.Metrics.ReleaseSeconds.Observe(a.clock.Since(start).Seconds())
	}
	if err != nil {
		a.log.Error("release floating IPs while cut off", zap.Error(err))
		return
	}
	a.held.Store(nil)
	a.log.Info("floating IPs released", zap.Duration("took", a.clock.Since(start)))
}

// arpRenewal: how often the ARP lease is renewed; arpStuck: a sync loop
// that made no progress for this long stops renewing it (the operator
// declares the node Down after --heartbeat-timeout, 10 s by default: by
// then its kernel no longer answers ARP for the IPs that move).
//
// arpProbeWindow: the lease is renewed only while the operator leader's
// probes keep coming (at most this long apart: its 100 ms interval, with
// room for jitter). The leader moves the IPs of a node it cannot reach
// ARPLease plus one probe interval after its last answer; a node that no
// longer hears the leader stops answering ARP before that: after at most
// arpProbeWindow plus the lease. Without a leader (while a new one is
// elected, a few seconds) no lease is renewed: neighbours keep their
// cached entries meanwhile.
const (
	arpRenewal     = 100 * time.Millisecond
	arpStuck       = 5 * time.Second
	arpProbeWindow = 120 * time.Millisecond
)

// keepARP renews the ARP lease every arpRenewal until ctx ends: from the
// first apply on, while the sync loop makes progress, the fence is down
// and the node is not recovering.
func (a *agent) keepARP(ctx context.Context) {
	t := a.clock.NewTicker(arpRenewal)
	defer t.Stop()
	lastBeat, beatAt := a.beat.Load(), a.clock.Now()
	failing, stuck := false, false
	// lastRenew: the last renewal; lapsed: the lease ran out for want of
	// the leader's probes (see fence.leaseLapsed).
	var lastRenew time.Time
	lapsed := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		now := a.clock.Now()
		if b := a.beat.Load(); b != lastBeat {
			lastBeat, beatAt = b, now
		}
		held := a.held.Load()
		if held == nil {
			// Not before the first apply: the IPs the kernel still holds
			// from before a restart may have moved meanwhile (the lease
			// ran out while no agent renewed it).
			a.arpTick.Store(now.UnixNano())
			continue
		}
		if len(*held) == 0 {
			// Nothing held, no lease to keep (nor to run out: the next
			// IP taken gets its lease from the apply that adds it).
			lastRenew, lapsed = time.Time{}, false
			a.arpTick.Store(now.UnixNano())
			continue
		}
		if a.synced.Load() && now.Sub(beatAt) > arpStuck {
			if !stuck {
				a.log.Error("sync loop stuck: no longer answering ARP for the floating IPs", zap.Duration("stuckFor", now.Sub(beatAt)))
			}
			stuck = true
			a.arpTick.Store(now.UnixNano())
			continue
		}
		stuck = false
		a.fence.checkStall()
		// The lease ran out, by the agent's own clock: for want of the
		// leader's probes, or because the agent itself did not run (stopped,
		// starved of CPU; also shorter than a stall), when the probes queued
		// meanwhile, handled before this tick, say nothing about now.
		if a.cfg.ARPLease > 0 && !lastRenew.IsZero() && now.Sub(lastRenew) >= a.cfg.ARPLease {
			lapsed = true
		}
		if a.fence.sinceProbe() > arpProbeWindow {
			a.arpTick.Store(now.UnixNano())
			continue
		}
		if lapsed {
			// The leader's probes are back after the lease ran out: it
			// may have moved the IPs meanwhile.
			lapsed, lastRenew = false, time.Time{}
			a.fence.leaseLapsed()
			a.arpTick.Store(now.UnixNano())
			continue
		}
		// Fenced: nothing held. Recovering (after a heal or a stall):
		// the IPs may have moved; the sync releases those a fresh read
		// does not confirm, and the lease is renewed again once the
		// caches agree with the API.
		if fenced, recovering := a.fence.state(); fenced || recovering {
			a.arpTick.Store(now.UnixNano())
			continue
		}
		err := a.cfg.Dataplane.KeepARP(ctx)
		if err == nil {
			lastRenew = now
		}
		switch {
		case err != nil && !failing && ctx.Err() == nil:
			a.log.Warn("renew the ARP lease", zap.Error(err))
		case err == nil && failing:
			a.log.Info("ARP lease renewed again")
		}
		failing = err != nil
		a.arpTick.Store(now.UnixNano())
	}
}

// cachedHoldings returns the floating IPs the watch cache's group statuses
// give to this node.
func (a *agent) cachedHoldings() map[netip.Addr]bool {
	if a.gateways == nil {
		return map[netip.Addr]bool{}
	}
	var groups []*v1.NetworkGatewayGroup
	for _, obj := range a.gateways.List() {
		if g, ok := obj.(*v1.NetworkGatewayGroup); ok {
			groups = append(groups, g)
		}
	}
	return holdingsOf(groups, a.cfg.Node)
}

func (a *agent) run(ctx context.Context) error {
	cfg := a.cfg
	// First of all, before the API server is reached: a rebooted node
	// drops the traffic still rerouted to it until its first apply.
	a.guardAtStart(ctx)
	if cfg.Metrics != nil {
		go a.scrapeCounters(ctx)
	}
	bc := record.NewBroadcaster()
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.Clients.Core.CoreV1().Events("")})
	defer bc.Shutdown()
	a.recorder = bc.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "egressnat-agent", Host: cfg.Node})
	l, err := net.Listen("tcp", cfg.HealthAddr)
	if err != nil {
		return fmt.Errorf("listen for health probes: %w", err)
	}
	go a.keepProbeKey(ctx)

	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { a.recompute() },
		UpdateFunc: func(any, any) { a.recompute() },
		DeleteFunc: func(any) { a.recompute() },
	}
	podHandler := cache.ResourceEventHandlerFuncs{
		AddFunc:    a.podChanged,
		UpdateFunc: func(_, obj any) { a.podChanged(obj) },
		DeleteFunc: a.podChanged,
	}
	infs := []cache.SharedIndexInformer{
		cfg.Clients.SlimPodInformer(kube.SlimPod),
		cfg.Clients.NamespaceInformer(),
		cfg.Clients.NodeInformer(),
		cfg.Clients.DynamicInformer(kube.GatewayGVR),
		cfg.Clients.DynamicInformer(kube.PolicyGVR),
	}
	// Store only what the agent reads: typed gateways and policies
	// (converted once per change, not on every sync) and slim pods (the
	// pod informer slims each page of its list and each watch event).
	transforms := []cache.TransformFunc{nil, nil, nil, kube.Typed[v1.NetworkGatewayGroup], kube.Typed[v1.EgressNATPolicy]}
	for i, inf := range infs {
		if transforms[i] != nil {
			if err := inf.SetTransform(transforms[i]); err != nil {
				return fmt.Errorf("set informer transform: %w", err)
			}
		}
		h := handler
		if i == 0 {
			h = podHandler
		}
		if _, err := inf.AddEventHandler(h); err != nil {
			return fmt.Errorf("add event handler: %w", err)
		}
	}
	a.pods, a.namespaces, a.nodes = infs[0].GetIndexer(), infs[1].GetIndexer(), infs[2].GetIndexer()
	a.gateways, a.policies = infs[3].GetIndexer(), infs[4].GetIndexer()
	// The fence runs from the start, before the caches sync: a node that
	// starts cut off must release its floating IPs.
	if w := cfg.Clients.Watches; w != nil {
		w.OnChange = a.watchChanged
	}
	go a.refreshWhileStale(ctx)
	go a.fence.serveProbes(ctx, l)
	go a.fence.watch(ctx)
	go a.keepARP(ctx)
	go a.renewLease(ctx)
	kube.RunInformers(ctx, infs...)
	// The cluster-internal destinations before the first apply, so that
	// it never steers them.
	a.refreshClusterNets(ctx)
	go a.watchClusterNets(ctx)
	// Nothing is applied before every cache is complete: an agent that
	// restarts must not act on a partial view and remove working state.
	if !kube.WaitForSync(ctx, infs...) {
		return fmt.Errorf("sync caches (are the CRDs installed?): %w", ctx.Err())
	}
	a.log.Info("agent caches synced")
	a.synced.Store(true)

	a.kick()
	go a.verify(ctx)
	a.loop(ctx)
	return nil
}

// loop syncs on every kick and every ResyncPeriod (jittered) until ctx
// ends. A failed sync is retried after a backoff: 100 ms, doubling up to 5 s.
func (a *agent) loop(ctx context.Context) {
	resync := a.clock.NewTimer(firstTick(a.cfg.ResyncPeriod))
	defer resync.Stop()
	beat := a.clock.NewTicker(time.Second)
	defer beat.Stop()
	backoff := time.Duration(0)
	for {
		a.beat.Add(1)
		select {
		case <-ctx.Done():
			return
		case <-beat.C():
			continue // idle: the heartbeat advances, nothing to sync
		case <-a.trigger:
		case <-resync.C():
			resync.Reset(nextTick(a.cfg.ResyncPeriod))
			// Recompute everything and re-apply routes, addresses and
			// sysctls; the table itself is checked by verify, in the
			// background.
			a.last = nil
			a.full.Store(true)
			a.cfg.Dataplane.Recheck()
		}
		if backoff > 0 {
			select {
			case <-ctx.Done():
				return
			case <-a.clock.After(backoff):
			}
		}
		start := a.clock.Now()
		err := a.sync(ctx)
		if a.cfg.Metrics != nil {
			a.cfg.Metrics.SyncDuration.Observe(a.clock.Since(start).Seconds())
		}
		if err != nil {
			msg := err.Error()
			a.syncErr.Store(&msg)
			if a.cfg.Metrics != nil {
				a.cfg.Metrics.SyncErrors.Inc()
			}
			backoff = min(max(2*backoff, 100*time.Millisecond), 5*time.Second)
			a.log.Error("sync failed; retrying", zap.Duration("backoff", backoff), zap.Error(err))
			a.kick()
			continue
		}
		a.syncErr.Store(nil)
		backoff = 0
	}
}

// verify compares the kernel's table with what was applied every
// ResyncPeriod, without holding up the sync loop; on a difference (someone
// else changed the table) the next sync reads the kernel back and repairs.
func (a *agent) verify(ctx context.Context) {
	t := a.clock.NewTimer(firstTick(a.cfg.ResyncPeriod))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
			t.Reset(nextTick(a.cfg.ResyncPeriod))
		}
		drift, err := a.cfg.Dataplane.Verify(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			a.log.Warn("verify the nftables table", zap.Error(err))
		case drift != "":
			a.log.Warn("nftables table changed outside egressnat; repairing", zap.String("drift", drift))
			if a.cfg.Metrics != nil {
				a.cfg.Metrics.Drift.Inc()
			}
			// The state did not change, the kernel did: apply it again
			// (the dataplane dropped its cache and reads the kernel back).
			a.reapply.Store(true)
			a.kick()
		}
	}
}

// firstTick and nextTick jitter periodic work, so that agents started
// together (a DaemonSet rollout) do not do it at the same moment: the first
// tick comes after 0.5 to 1.5 periods, the next ones after 0.9 to 1.1.
func firstTick(period time.Duration) time.Duration {
	return period/2 + rand.N(period)
}

func nextTick(period time.Duration) time.Duration {
	return period*9/10 + rand.N(period/5+1)
}

// fenceEvent records a Fenced Event on every gateway group with a floating
// IP the status gives to this node, and an Unfenced Event on the same groups
// when the fence lifts. Events raised while cut off reach the API server
// when it answers again (the broadcaster retries).
func (a *agent) fenceEvent(fenced bool, detail string) {
	reason, typ, what := "Unfenced", corev1.EventTypeNormal, "holds its floating IPs again as the API confirms"
	if fenced {
		reason, typ, what = "Fenced", corev1.EventTypeWarning, "released its floating IPs"
		a.fencedGroups = a.heldGroups()
	}
	for ref, held := range a.fencedGroups {
		a.recorder.Eventf(ref, typ, reason, "node %s %s (%s): %s", a.cfg.Node, what, strings.Join(held, ", "), detail)
	}
	if !fenced {
		a.fencedGroups = nil
		// Back in touch: renew the Lease now, not at the next interval.
		a.kickLease()
	}
}

// heldGroups returns the groups whose status gives floating IPs to this
// node, with those IPs.
func (a *agent) heldGroups() map[*corev1.ObjectReference][]string {
	out := map[*corev1.ObjectReference][]string{}
	if a.gateways == nil {
		return out
	}
	for _, obj := range a.gateways.List() {
		g, ok := obj.(*v1.NetworkGatewayGroup)
		if !ok {
			continue
		}
		var held []string
		for ip, node := range g.Status.FloatingIPs {
			if node == a.cfg.Node {
				held = append(held, ip)
			}
		}
		if len(held) > 0 {
			slices.Sort(held)
			out[&corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "NetworkGatewayGroup", Namespace: g.Namespace, Name: g.Name, UID: g.UID}] = held
		}
	}
	return out
}

// scrapeCounters copies the policies' nftables counters into the metrics.
func (a *agent) scrapeCounters(ctx context.Context) {
	t := a.clock.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		counters, err := a.cfg.Dataplane.Dump(ctx)
		if err != nil {
			continue // no table yet, or a transient error: next tick
		}
		out := make([]metrics.PolicyCounter, len(counters))
		for i, c := range counters {
			out[i] = metrics.PolicyCounter{Policy: c.Policy, Mode: string(c.Mode), Packets: c.Packets, Bytes: c.Bytes}
		}
		a.cfg.Metrics.SetPolicyCounters(out)
	}
}

// observe records what one apply did.
func (a *agent) observe(st selector.NodeState) {
	r := a.cfg.Dataplane.LastResult()
	a.reportUnroutable(r.Unroutable)
	if old := a.foreign.Swap(&r.Foreign); old == nil || !slices.Equal(*old, r.Foreign) {
		// The operator must learn of an address something else holds
		// now, not at the next renewal.
		a.kickLease()
	}
	// Muted IPs on the uplink that the status does not give to this node
	// are prepared for a handover to it: the operator completes the
	// handover when it reads them.
	holds := a.cachedHoldings()
	prepared := slices.DeleteFunc(slices.Clone(r.Muted), func(ip netip.Addr) bool { return holds[ip] })
	if old := a.prepared.Swap(&prepared); (old == nil && len(prepared) > 0) || (old != nil && !slices.Equal(*old, prepared)) {
		a.log.Info("floating IPs prepared for a handover", zap.Strings("ips", addrList(prepared)))
		a.kickLease()
	}
	m := a.cfg.Metrics
	if m == nil {
		return
	}
	m.UnroutablePolicies.Set(float64(len(r.Unroutable)))
	m.FloatingIPs.Set(float64(len(st.FloatingIPs)))
	sizes := make([]metrics.SetSize, len(st.Policies))
	for i, p := range st.Policies {
		sizes[i] = metrics.SetSize{Policy: p.Name, Sources: len(p.Sources), Destinations: len(p.Destinations)}
	}
	m.SetSetSizes(sizes)
	m.GARPsSent.Add(float64(len(r.Announced) * nft.GratuitousARPs()))
	m.ConntrackFlushed.Add(float64(r.ConntrackDeleted))
}

// staleRefresh: how often the groups are read from the API while their
// cache may be behind it.
const staleRefresh = 500 * time.Millisecond

// freshCustom reads the groups, and the policies, from the API when their
// cache may be behind it (its watch failed or ended and has not started
// again: client-go waits up to 30 s before it lists again after repeated
// failures, for example after API server restarts). A node must learn at
// once that it holds a floating IP, or no longer does. It returns nil for
// what is current in the cache or could not be read (the cache is then the
// best there is).
func (a *agent) freshCustom(ctx context.Context) (groups []*v1.NetworkGatewayGroup, policies []*v1.EgressNATPolicy) {
	if stale, _ := a.cfg.Clients.Watches.Stale(kube.GatewayGVR.Resource); stale {
		var err error
		if groups, err = a.fence.readGroups(ctx); err != nil {
			a.log.Debug("gateway groups from the API", zap.Error(err))
		}
	}
	if stale, _ := a.cfg.Clients.Watches.Stale(kube.PolicyGVR.Resource); stale {
		var err error
		if policies, err = kube.ListFresh[v1.EgressNATPolicy](ctx, a.cfg.Clients, kube.PolicyGVR); err != nil {
			a.log.Debug("policies from the API", zap.Error(err))
		}
	}
	return groups, policies
}

// staleCustom reports whether the groups' or the policies' cache may be
// behind the API.
func (a *agent) staleCustom() bool {
	g, _ := a.cfg.Clients.Watches.Stale(kube.GatewayGVR.Resource)
	p, _ := a.cfg.Clients.Watches.Stale(kube.PolicyGVR.Resource)
	return g || p
}

// refreshWhileStale asks for a sync every staleRefresh while the groups'
// or the policies' cache may be behind the API, until ctx ends.
func (a *agent) refreshWhileStale(ctx context.Context) {
	a.every(ctx, staleRefresh, func() {
		switch {
		case !a.synced.Load():
		case a.staleCustom():
			a.recompute()
		case a.podsFresh():
			a.kick() // the sync reads this node's pods from the API
		}
	})
}

// every calls fn every period until ctx ends.
func (a *agent) every(ctx context.Context, period time.Duration, fn func()) {
	t := a.clock.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		fn()
	}
}

// watchChanged logs an informer turning stale or current, and recomputes
// once it is current: its cache now has what was missed. A watch that the
// API server ends at its timeout (every few minutes) is only debugged.
func (a *agent) watchChanged(informer string, stale bool, err error, since time.Time) {
	quiet := errors.Is(err, kube.ErrWatchEnded)
	switch {
	case stale && quiet:
		a.log.Debug("watch ended; its cache may be behind the API until it watches again", zap.String("informer", informer))
	case stale:
		a.log.Warn("watch failing; its cache may be behind the API until it watches again", zap.String("informer", informer), zap.Error(err))
	case quiet:
		a.log.Debug("watching again", zap.String("informer", informer))
	default:
		a.log.Info("watching again", zap.String("informer", informer), zap.Duration("after", time.Since(since)))
	}
	if informer == "pods" && !quiet {
		// A watch started again after a failure may still not deliver
		// (seen for seconds after API server restarts): this node's own
		// pods are read from the API for a while.
		a.podsFreshUntil.Store(a.clock.Now().Add(podsFreshWindow).UnixNano())
	}
	if !stale && a.synced.Load() {
		a.recompute()
	}
}

// podsFreshWindow: how long after the pods' watch failed or started again
// every sync also reads this node's pods from the API.
const podsFreshWindow = 30 * time.Second

// podsFresh reports whether syncs read this node's pods from the API.
func (a *agent) podsFresh() bool {
	stale, _ := a.cfg.Clients.Watches.Stale("pods")
	return stale || a.clock.Now().UnixNano() < a.podsFreshUntil.Load()
}

// freshLocalPods reads this node's pods from the API and gives the
// tracker those the cache has otherwise (labels, address, phase) or not
// at all, and drops from it the node's pods the API no longer has: a label
// change must reach the node's own rules even while the pods' cache lags
// (a pod made unselected would go on leaving with the floating IP, one
// made selected with the node's address). The cache takes over again once
// it has the same.
func (a *agent) freshLocalPods(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	list, err := a.cfg.Clients.Core.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + a.cfg.Node})
	if err != nil {
		a.log.Debug("this node's pods from the API", zap.Error(err))
		return
	}
	fresh := map[string]bool{}
	for i := range list.Items {
		p := &list.Items[i]
		key := p.Namespace + "/" + p.Name
		fresh[key] = true
		want := selectorPod(p)
		if obj, ok, _ := a.pods.GetByKey(key); ok {
			if c, isPod := obj.(*corev1.Pod); isPod && reflect.DeepEqual(selectorPod(c), want) {
				continue
			}
		}
		a.tracker.SetPod(want)
	}
	for _, obj := range a.pods.List() {
		if p, ok := obj.(*corev1.Pod); ok && p.Spec.NodeName == a.cfg.Node && !fresh[p.Namespace+"/"+p.Name] {
			a.tracker.DeletePod(p.Namespace, p.Name)
		}
	}
}

// recompute asks the sync loop for a full recomputation of the state.
func (a *agent) recompute() {
	a.full.Store(true)
	a.kick()
}

// podChanged marks a pod for the sync loop, which reads it from the cache.
func (a *agent) podChanged(obj any) {
	if !a.synced.Load() {
		return // the initial list: the first sync computes everything
	}
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		a.recompute()
		return
	}
	a.dirtyMu.Lock()
	if _, ok := a.dirty[key]; !ok {
		a.dirty[key] = a.clock.Now()
	}
	a.dirtyMu.Unlock()
	a.kick()
}

// takeDirty returns the pods changed since the last call.
func (a *agent) takeDirty() map[string]time.Time {
	a.dirtyMu.Lock()
	defer a.dirtyMu.Unlock()
	out := a.dirty
	a.dirty = map[string]time.Time{}
	return out
}

func (a *agent) kick() {
	select {
	case a.trigger <- struct{}{}:
	default:
	}
}

// sync brings the desired state up to date and applies it when it
// changed: the changed pods only, or everything after any other change.
// After a failed sync the next one starts over: it recomputes everything
// from the caches and applies even a state equal to the last one applied
// (a failed Apply may have left the kernel anywhere in between).
func (a *agent) sync(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			a.full.Store(true)
			a.last = nil
		}
	}()
	// Taken before the caches are read: a pod changing meanwhile is marked
	// again and handled next time.
	dirty := a.takeDirty()
	if a.reapply.Swap(false) {
		a.last = nil
	}
	if a.full.Swap(false) || a.tracker == nil {
		in := a.input()
		// A cache that may be behind is replaced by a fresh read, and the
		// next sync recomputes again (from a fresh read while the cache is
		// stale, from the cache once it is current).
		if groups, policies := a.freshCustom(ctx); groups != nil || policies != nil {
			if groups != nil {
				in.Groups = groups
			}
			if policies != nil {
				in.Policies = policies
			}
			a.full.Store(true)
		}
		tr, warnings, err := selector.NewTracker(in)
		if err != nil {
			return fmt.Errorf("compute desired state: %w", err)
		}
		for _, w := range warnings {
			a.log.Warn(w)
		}
		a.tracker = tr
	} else {
		for key := range dirty {
			a.updatePod(key)
		}
	}
	if a.podsFresh() {
		a.freshLocalPods(ctx)
	}
	st := a.tracker.State()
	a.holding.Store(len(st.FloatingIPs) > 0)
	st = a.fence.restrict(ctx, st)
	if a.last != nil && a.last.Equal(st) {
		a.observePods(dirty)
		return nil
	}
	// Floating IPs that moved away (or that the fence takes) are released
	// first, on their own: the Apply that follows may fail and back off.
	a.releaseMoved(ctx, st)
	start := a.clock.Now()
	if len(st.Policies) == 0 && len(st.FloatingIPs) == 0 {
		err = a.cfg.Dataplane.Cleanup(ctx)
	} else {
		err = a.cfg.Dataplane.Apply(ctx, st)
	}
	if err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	a.logChanges(st, a.clock.Since(start))
	if len(st.Policies) == 0 && len(st.FloatingIPs) == 0 {
		a.saveState(nil) // cleaned up: nothing to guard
	} else {
		a.saveState(&st)
	}
	a.observe(st)
	a.observePods(dirty)
	if a.cfg.Classifier != nil {
		a.cfg.Classifier.SetPods(st.LocalPods)
	}
	a.last = &st
	held := make([]netip.Addr, 0, len(st.FloatingIPs))
	for _, p := range st.FloatingIPs {
		held = append(held, p.Addr())
	}
	prev := a.held.Swap(&held)
	a.verifyConntrack(ctx, prev, held, st.ClusterFloatingIPs)
	if c := a.cfg.Dataplane.LastResult().Conflicts; len(c) > 0 {
		// Someone else still answers for them: probe again soon.
		a.log.Warn("floating IPs still answered for by another host; not taken, retrying", zap.Strings("ips", addrList(c)))
		a.clock.AfterFunc(conflictRetry, func() {
			a.reapply.Store(true)
			a.kick()
		})
	}
	return nil
}

// verifyConntrack checks conntrack after an apply changed what the node
// holds (the design card: verify and flush on failover), in the
// background: the floating IPs it took (their Gateway policies' entries
// must translate to them) and the ones it gave up (no entry may still
// translate to them). After the first apply (prev is nil: a start or a
// restart, maybe after a crash mid-apply) it checks every floating IP of
// the cluster: held ones as taken, the others as released.
func (a *agent) verifyConntrack(ctx context.Context, prev *[]netip.Addr, held []netip.Addr, cluster []netip.Addr) {
	var taken, released []netip.Addr
	if prev == nil {
		taken = held
		for _, ip := range cluster {
			if !slices.Contains(held, ip.Unmap()) {
				released = append(released, ip.Unmap())
			}
		}
	} else {
		for _, ip := range held {
			if !slices.Contains(*prev, ip) {
				taken = append(taken, ip)
			}
		}
		for _, ip := range *prev {
			if !slices.Contains(held, ip) {
				released = append(released, ip)
			}
		}
	}
	if len(taken) == 0 && len(released) == 0 {
		return
	}
	a.checks.Add(1)
	go func() {
		defer a.checks.Done()
		if len(released) > 0 {
			r, err := a.cfg.Dataplane.VerifyReleased(ctx, released)
			a.reportConntrack(metrics.SideReleased, released, r, err)
		}
		if len(taken) > 0 {
			r, err := a.cfg.Dataplane.VerifyTaken(ctx, taken)
			a.reportConntrack(metrics.SideTaken, taken, r, err)
		}
	}()
}

// reportConntrack logs and counts one conntrack check.
func (a *agent) reportConntrack(side string, ips []netip.Addr, r nft.CTVerify, err error) {
	if a.cfg.Metrics != nil {
		a.cfg.Metrics.ObserveConntrackCheck(side, metrics.ConntrackCheck{Flushed: r.Flushed, Remaining: r.Remaining, Translated: r.Translated, Wrong: r.Wrong}, err)
	}
	fields := []zap.Field{zap.String("side", side), zap.Strings("ips", addrList(ips)), zap.Int("translated", r.Translated),
		zap.Int("wrong", r.Wrong), zap.Int("flushed", r.Flushed), zap.Int("remaining", r.Remaining)}
	switch {
	case err != nil:
		a.log.Warn("conntrack check failed", append(fields, zap.Error(err))...)
	case r.Remaining > 0:
		a.log.Warn("conntrack entries still wrong after the flush", fields...)
	case r.Flushed > 0 || r.Wrong > 0:
		a.log.Info("conntrack entries flushed", fields...)
	default:
		a.log.Debug("conntrack checked", fields...)
	}
}

// conflictRetry: how soon an Apply probes again for floating IPs another
// host answered for.
const conflictRetry = 250 * time.Millisecond

// releaseMoved releases, through the dataplane's fast path, the floating
// IPs the node held at its last apply that st no longer gives it.
func (a *agent) releaseMoved(ctx context.Context, st selector.NodeState) {
	prev := a.held.Load()
	if prev == nil {
		return
	}
	keep := map[netip.Addr]bool{}
	for _, p := range st.FloatingIPs {
		keep[p.Addr()] = true
	}
	var gone []netip.Addr
	for _, ip := range *prev {
		if !keep[ip] {
			gone = append(gone, ip)
		}
	}
	if len(gone) == 0 {
		return
	}
	start := a.clock.Now()
	res, err := a.cfg.Dataplane.Release(ctx, gone)
	if a.cfg.Metrics != nil {
		a.cfg.Metrics.ReleaseSeconds.Observe(a.clock.Since(start).Seconds())
	}
	if err != nil {
		// The Apply that follows removes them too.
		a.log.Error("release floating IPs", zap.Strings("ips", addrList(gone)), zap.Error(err))
		return
	}
	rest := slices.DeleteFunc(slices.Clone(*prev), func(ip netip.Addr) bool { return !keep[ip] })
	a.held.Store(&rest)
	a.checks.Add(1)
	go func() {
		defer a.checks.Done()
		r, err := a.cfg.Dataplane.VerifyReleased(ctx, gone)
		a.reportConntrack(metrics.SideReleased, gone, r, err)
	}()
	a.log.Info("floating IPs released", zap.Strings("ips", addrList(gone)), zap.Duration("took", a.clock.Since(start)),
		zap.Int("conntrackDeleted", res.ConntrackDeleted))
}

func addrList(ips []netip.Addr) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}

// reportUnroutable records a Warning Event on each policy that newly has
// no mark on this node (more gateway next hops than the mark mask holds).
func (a *agent) reportUnroutable(names []string) {
	now := map[string]bool{}
	for _, name := range names {
		now[name] = true
		if a.unroutable[name] {
			continue
		}
		ref := &corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "EgressNATPolicy", Name: name}
		if obj, ok, _ := a.policies.GetByKey(name); ok {
			ref.UID = obj.(*v1.EgressNATPolicy).UID
		}
		a.recorder.Eventf(ref, corev1.EventTypeWarning, "OutOfMarks",
			"node %s has more gateway next hops than its mark mask holds (%d): this policy drops its traffic there; widen --mark-mask or use fewer gateway nodes",
			a.cfg.Node, selector.MarkCapacity(a.cfg.MarkMask))
	}
	a.unroutable = now
}

// observePods records, for each pod event handled, the time from the event
// reaching the agent to the kernel holding its change.
func (a *agent) observePods(dirty map[string]time.Time) {
	if a.cfg.Metrics == nil {
		return
	}
	for _, t := range dirty {
		a.cfg.Metrics.PodProgramming.Observe(a.clock.Since(t).Seconds())
	}
}

func (a *agent) logChanges(st selector.NodeState, took time.Duration) {
	prev := map[string]selector.PolicyState{}
	if a.last != nil {
		for _, p := range a.last.Policies {
			prev[p.Name] = p
		}
	}
	for _, p := range st.Policies {
		old, ok := prev[p.Name]
		if !ok || old.Mode != p.Mode || old.NextHop != p.NextHop || old.EgressIP != p.EgressIP || len(old.Sources) != len(p.Sources) {
			a.log.Info("policy applied", zap.String("policy", p.Name),
				zap.String("mode", string(p.Mode)), zap.String("ip", p.EgressIP.String()),
				zap.String("gateway", p.NextHop.String()), zap.Int("sources", len(p.Sources)))
		}
		delete(prev, p.Name)
	}
	for name := range prev {
		a.log.Info("policy removed", zap.String("policy", name))
	}
	a.log.Debug("synced", zap.Duration("took", took),
		zap.Int("policies", len(st.Policies)), zap.Int("floatingIPs", len(st.FloatingIPs)))
}

// updatePod hands one pod, as the cache has it now, to the tracker.
func (a *agent) updatePod(key string) {
	obj, exists, err := a.pods.GetByKey(key)
	if err == nil && exists {
		if p, ok := obj.(*corev1.Pod); ok {
			a.tracker.SetPod(selectorPod(p))
			return
		}
	}
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return
	}
	a.tracker.DeletePod(ns, name)
}

// input gathers the caches into the selector's input.
func (a *agent) input() selector.Input {
	in := selector.Input{
		Node:             a.cfg.Node,
		Namespaces:       map[string]map[string]string{},
		NodeIPs:          map[string]netip.Addr{},
		LocalSubnets:     a.cfg.Subnets,
		FallbackToNodeIP: a.cfg.FallbackToNodeIP,
		ClusterNetworks:  slices.Concat(a.cfg.PodCIDRs, a.cfg.ServiceCIDRs, a.nets.get()),
		PodCIDRs:         map[string][]netip.Prefix{},
		ExtraPodCIDRs:    a.cfg.PodCIDRs,
		// Groups are checked as the operator checks them, so that this
		// node never holds a floating IP that is a node's address, its
		// router, or another group's, whatever a status says.
		GatewayNamespaces: a.cfg.GatewayNamespaces,
	}
	if in.GatewayNamespaces == nil {
		in.GatewayNamespaces = []string{v1.DefaultGatewayNamespace}
	}
	var facts []selector.NodeFacts
	for _, obj := range a.policies.List() {
		in.Policies = append(in.Policies, obj.(*v1.EgressNATPolicy))
	}
	for _, obj := range a.gateways.List() {
		in.Groups = append(in.Groups, obj.(*v1.NetworkGatewayGroup))
	}
	for _, obj := range a.namespaces.List() {
		ns := obj.(*corev1.Namespace)
		in.Namespaces[ns.Name] = ns.Labels
	}
	for _, obj := range a.nodes.List() {
		n := obj.(*corev1.Node)
		if ip, ok := kube.NodeInternalIP(n); ok {
			in.NodeIPs[n.Name] = ip
		}
		in.ClusterNetworks = append(in.ClusterNetworks, nodeNetworks(n)...)
		in.PodCIDRs[n.Name] = nodePodCIDRs(n)
		f := selector.NodeFacts{Name: n.Name}
		for _, addr := range n.Status.Addresses {
			f.AddNodeAddress(string(addr.Type), addr.Address)
		}
		if n.Name == a.cfg.Node {
			// This node's own uplink: its subnets and routers.
			f.Subnets, f.Gateways = a.cfg.Subnets, a.cfg.Gateways
		}
		facts = append(facts, f)
	}
	in.Reserved = selector.ReservedFrom(facts)
	// No sorting: selector.Desired is independent of the input order.
	pods := a.pods.List()
	in.Pods = make([]selector.Pod, 0, len(pods))
	for _, obj := range pods {
		in.Pods = append(in.Pods, selectorPod(obj.(*corev1.Pod)))
	}
	return in
}

func selectorPod(p *corev1.Pod) selector.Pod {
	return selector.Pod{
		Namespace: p.Namespace, Name: p.Name, Node: p.Spec.NodeName, Labels: p.Labels,
		HostNetwork: p.Spec.HostNetwork,
		Terminated:  p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed,
		IP:          podIPv4(p),
	}
}

func podIPv4(p *corev1.Pod) netip.Addr {
	for _, s := range append([]corev1.PodIP{{IP: p.Status.PodIP}}, p.Status.PodIPs...) {
		if ip, err := netip.ParseAddr(s.IP); err == nil && ip.Is4() {
			return ip
		}
	}
	return netip.Addr{}
}

// renewLease keeps the node's Lease (its registration and uplink subnets)
// fresh while the sync loop makes progress: a stuck agent stops renewing.
// The operator's health probes decide Up and Down; the Lease's renewTime
// tells it which nodes may be given new floating IPs. A failed renewal is
// retried after a second.
func (a *agent) renewLease(ctx context.Context) {
	t := a.clock.NewTicker(a.cfg.RenewInterval)
	defer t.Stop()
	for {
		retry := (<-chan time.Time)(nil)
		if err := a.renewIfProgressing(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("renew agent lease", zap.Error(err))
			retry = a.clock.After(time.Second)
		}
		select {
		case <-retry:
		case <-ctx.Done():
			return
		case <-t.C():
		case <-a.leaseKick:
			// Something the operator must learn now (prepared IPs, a
			// drain, foreign addresses, the end of a fence): written at
			// once, whatever the heartbeat.
			if err := a.renewOnce(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("update agent lease", zap.Error(err))
				a.kickLeaseAfter(200 * time.Millisecond)
			}
			continue
		}
	}
}

// renewIfProgressing renews the Lease unless the heartbeat stood still
// since the last renewal (before the first sync it always renews: the
// operator needs the registration).
func (a *agent) renewIfProgressing(ctx context.Context) error {
	b := a.beat.Load()
	if a.synced.Load() && b == a.leaseBeat && b != 0 {
		return fmt.Errorf("sync loop made no progress since the last renewal: not renewing")
	}
	if err := a.renewOnce(ctx); err != nil {
		return err
	}
	a.leaseBeat = b
	return nil
}

func (a *agent) renewOnce(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RenewInterval)
	defer cancel()
	leases := a.cfg.Clients.Core.CoordinationV1().Leases(a.cfg.Namespace)
	name := kube.AgentLeasePrefix + a.cfg.Node
	now := metav1.NewMicroTime(a.clock.Now())
	annotations := map[string]string{
		kube.AnnotationSubnets: kube.FormatSubnets(a.cfg.Subnets),
		kube.AnnotationUplink:  a.cfg.Uplink,
	}
	if len(a.cfg.Gateways) > 0 {
		annotations[kube.AnnotationUplinkGateway] = kube.FormatAddresses(a.cfg.Gateways)
	}
	if f := a.foreign.Load(); f != nil && len(*f) > 0 {
		annotations[kube.AnnotationForeignAddresses] = kube.FormatAddresses(*f)
	}
	if p := a.prepared.Load(); p != nil && len(*p) > 0 {
		annotations[kube.AnnotationPrepared] = kube.FormatAddresses(*p)
	}
	if d := a.draining.Load(); d != nil {
		annotations[kube.AnnotationDraining] = *d
	}
	if a.cfg.ClassifierInfo != "" {
		annotations[kube.AnnotationClassifier] = a.cfg.ClassifierInfo
	}
	lease, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: a.cfg.Namespace, Annotations: annotations,
				Labels: map[string]string{kube.LabelComponent: "agent"}},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(a.cfg.Node),
				LeaseDurationSeconds: ptr.To(int32(a.cfg.LeaseDuration / time.Second)),
				AcquireTime:          &now, RenewTime: &now,
			},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Annotations = annotations
	lease.Spec.HolderIdentity = ptr.To(a.cfg.Node)
	lease.Spec.LeaseDurationSeconds = ptr.To(int32(a.cfg.LeaseDuration / time.Second))
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

// kickLease asks renewLease to write the Lease now.
func (a *agent) kickLease() {
	select {
	case a.leaseKick <- struct{}{}:
	default:
	}
}

// kickLeaseAfter kicks the Lease after d (a failed write).
func (a *agent) kickLeaseAfter(d time.Duration) {
	a.clock.AfterFunc(d, a.kickLease)
}

// holdsAny reports whether the last apply left floating IPs on the node
// (held, or prepared for a handover to it).
func (a *agent) holdsAny() bool {
	h := a.held.Load()
	return h != nil && len(*h) > 0
}

// drainPoll: how often drain checks whether the node still holds IPs.
const drainPoll = 50 * time.Millisecond

// drain hands the node's floating IPs over before the agent stops: it
// asks for it on its Lease (AnnotationDraining: the operator hands each
// IP over to another node, make before break) and waits until the node
// holds none, at most timeout. A node holding nothing stops at once; an
// IP no other node can take stays (the wait ends at timeout).
func (a *agent) drain(ctx context.Context, timeout time.Duration) {
	if timeout <= 0 || !a.holdsAny() {
		return
	}
	why := "agent stopping"
	if a.cfg.PodName != "" {
		why += " (pod " + a.cfg.PodName + ")"
	}
	a.draining.Store(&why)
	a.kickLease()
	start := a.clock.Now()
	a.log.Info("stopping: handing the floating IPs over to other nodes first", zap.Duration("timeout", timeout))
	deadline := a.clock.After(timeout)
	t := a.clock.NewTicker(drainPoll)
	defer t.Stop()
	for a.holdsAny() {
		select {
		case <-ctx.Done():
			return
		case <-deadline:
			h := a.held.Load()
			a.log.Warn("stopping with floating IPs still held: no handover within the drain timeout",
				zap.Strings("ips", addrList(*h)), zap.Duration("timeout", timeout))
			return
		case <-t.C():
		}
	}
	a.log.Info("floating IPs handed over", zap.Duration("took", a.clock.Since(start)))
}
