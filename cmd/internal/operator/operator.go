// Package operator is the egressnat operator's controller: it watches
// gateways, policies, nodes and the agents' Leases (registration, uplink
// subnets, gateways and foreign addresses; Up/Down comes from the health
// probes), judges every group with the pure selector.CheckGroups (the rule
// the agents apply too), assigns every usable floating IP to a node with
// the pure gateway.Assign, and writes the status of gateways and policies.
// Only the leader runs it.
package operator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
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
	"github.com/egressnat/egressnat/gateway"
	"github.com/egressnat/egressnat/leader/probe"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"
)

// DefaultARPLease matches the agents' default --arp-lease.
const DefaultARPLease = 300 * time.Millisecond

// DefaultLeaderLease is the operators' leader Lease.
const DefaultLeaderLease = "egressnat-operator"

// Config of the controller.
type Config struct {
	Clients *kube.Clients
	// AgentNamespace holds the agents' Leases.
	AgentNamespace string
	// FallbackToNodeIP: when no node can hold a policy's egress IP, say the
	// traffic falls back to node IPs (agents run with the same flag)
	// instead of being dropped.
	FallbackToNodeIP bool
	Log              *zap.Logger
	// Probe tunes the health probes of the agents.
	Probe ProbeConfig
	// Identity of this replica (its leader election identity), signed
	// into its probes.
	Identity string
	// ProbeSecret names the Secret, in AgentNamespace, holding the probe
	// key (created when missing); "" means probe.SecretName.
	ProbeSecret string
	// LeaderLease names the operators' leader Lease in AgentNamespace;
	// "" means egressnat-operator.
	LeaderLease string
	// ARPLease is the agents' --arp-lease: a node whose agent stopped
	// refreshing stops answering ARP for its floating IPs within it. A node
	// that went silent keeps its IPs until ARPLease plus one probe
	// interval after its agent last answered, so that its kernel has
	// surely stopped answering for them when the new holder takes them.
	// 0 means DefaultARPLease; negative, no wait.
	ARPLease time.Duration
	// Metrics are updated when set.
	Metrics *metrics.Operator
	// GatewayNamespaces: the namespaces whose NetworkGatewayGroups are
	// honoured (selector.GatewayNamespaces; nil means kube-system only).
	// The agents run with the same list.
	GatewayNamespaces []string
	// MinSubnetPrefix: advertised uplink subnets shorter than this are not
	// used for assignment; 0 means selector.DefaultMinSubnetPrefix.
	MinSubnetPrefix int
	// MarkMask is the agents' --mark-mask (how many gateway next hops they
	// can route to); 0 means selector.DefaultMarkMask.
	MarkMask uint32
	// HandoverTimeout: a planned move whose target has not reported the IP
	// prepared within it completes anyway (0 means DefaultHandoverTimeout).
	HandoverTimeout time.Duration
}

// DefaultHandoverTimeout is Config.HandoverTimeout's default: a target
// prepares within a second (an ARP probe, retried while the old holder's
// ARP lease runs out); neighbours re-check a stale entry after 5 s.
const DefaultHandoverTimeout = 3 * time.Second

// Controller reconciles the whole cluster state on every change.
type Controller struct {
	cfg      Config
	clock    clock.WithDelayedExecution
	trigger  chan struct{}
	prober   *prober
	recorder record.EventRecorder

	infs []cache.SharedIndexInformer

	nodes    cache.Indexer
	leases   cache.Indexer
	gateways cache.Indexer
	policies cache.Indexer

	synced atomic.Bool
	// probeKey signs the probes; term is set while this replica leads.
	probeKey atomic.Pointer[[]byte]
	term     atomic.Pointer[leaderTerm]

	mu sync.Mutex
	// assignment remembers what the last reconcile wrote in the groups'
	// statuses, so that an IP keeps its node while the cache does not show
	// the write yet; only the leader sets it.
	assignment map[netip.Addr]string
	// handovers: the handovers the last reconcile wrote, by group
	// ("<ns>/<name>"), for the same reason.
	handovers map[string]map[netip.Addr]gateway.Handover
	// standbys: nodes holding nothing that are probed at the fast
	// interval (setStandbys).
	standbys map[string]bool

	// recMu serializes reconciles (a lost term's Lead may still be ending
	// when the next one starts); only reconcile uses what follows.
	recMu sync.Mutex
	//
	// warned: the last Warning event recorded (or error logged) per
	// subject ("node/<name>", "lease/<node>",
	// "gateway/<ns>/<name>/<condition>", "policy/<name>/<condition>"), so
	// that a warning is recorded once per change, also while the cache
	// does not show the status written yet.
	warned map[string]string
	// goodSubnets: the last usable uplink subnets each agent advertised.
	// An advertisement that does not parse or has no usable subnet (a
	// Lease rewritten by someone else) changes nothing: the node keeps
	// the subnets it last proved, until its agent advertises usable ones
	// again. Only the leader's reconcile uses it.
	goodSubnets map[string][]netip.Prefix
	// serviceCIDRs, listed at serviceCIDRsAt (see clusterNetworks).
	serviceCIDRs   []netip.Prefix
	serviceCIDRsAt time.Time
	// overlapKey and overlaps cache gateway.Overlaps: the accepted policies
	// (the informer's objects, replaced on every change) it was computed
	// from, and its result.
	overlapKey []*v1.EgressNATPolicy
	overlaps   map[string][]gateway.PolicyOverlap
}

// New builds the controller: informers, the prober and the event recorder.
func New(cfg Config) (*Controller, error) {
	c, err := newController(cfg, clock.RealClock{})
	if err != nil {
		return nil, err
	}
	bc := record.NewBroadcaster()
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.Clients.Core.CoreV1().Events("")})
	c.recorder = bc.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "egressnat-operator"})
	return c, nil
}

// newController builds the controller on the clock clk, without its event
// recorder.
func newController(cfg Config, clk clock.WithDelayedExecution) (*Controller, error) {
	cfg.Probe.defaults()
	if cfg.ProbeSecret == "" {
		cfg.ProbeSecret = probe.SecretName
	}
	if cfg.LeaderLease == "" {
		cfg.LeaderLease = DefaultLeaderLease
	}
	if cfg.ARPLease == 0 {
		cfg.ARPLease = DefaultARPLease
	}
	if cfg.MarkMask == 0 {
		cfg.MarkMask = selector.DefaultMarkMask
	}
	if cfg.MinSubnetPrefix == 0 {
		cfg.MinSubnetPrefix = selector.DefaultMinSubnetPrefix
	}
	if cfg.HandoverTimeout == 0 {
		cfg.HandoverTimeout = DefaultHandoverTimeout
	}
	if cfg.GatewayNamespaces == nil {
		cfg.GatewayNamespaces = []string{v1.DefaultGatewayNamespace}
	}
	c := &Controller{cfg: cfg, clock: clk, trigger: make(chan struct{}, 1), warned: map[string]string{},
		goodSubnets: map[string][]netip.Prefix{}}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.kick() },
		UpdateFunc: func(any, any) { c.kick() },
		DeleteFunc: func(any) { c.kick() },
	}
	infs := []cache.SharedIndexInformer{
		cfg.Clients.NodeInformer(),
		cfg.Clients.LeaseInformer(cfg.AgentNamespace),
		cfg.Clients.DynamicInformer(kube.GatewayGVR),
		cfg.Clients.DynamicInformer(kube.PolicyGVR),
	}
	c.infs = infs
	for i, inf := range infs {
		if tf := []cache.TransformFunc{nil, nil, kube.Typed[v1.NetworkGatewayGroup], kube.Typed[v1.EgressNATPolicy]}[i]; tf != nil {
			if err := inf.SetTransform(tf); err != nil {
				return nil, fmt.Errorf("set informer transform: %w", err)
			}
		}
		h := cache.ResourceEventHandler(handler)
		if i == 1 {
			// Leases: the agents' registrations and advertisements only,
			// not their renewals nor the operators' leader Lease (renewed
			// every retry period).
			h = cache.ResourceEventHandlerFuncs{
				AddFunc:    func(obj any) { c.kickIf(leaseMatters(nil, obj)) },
				UpdateFunc: func(old, obj any) { c.kickIf(leaseMatters(old, obj)) },
				DeleteFunc: func(obj any) { c.kickIf(leaseMatters(nil, obj)) },
			}
		}
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, fmt.Errorf("add event handler: %w", err)
		}
	}
	c.nodes, c.leases, c.gateways, c.policies = infs[0].GetIndexer(), infs[1].GetIndexer(), infs[2].GetIndexer(), infs[3].GetIndexer()
	c.prober = newProber(cfg.Probe, cfg.Log, c.probeTargets, c.kick)
	c.prober.now = clk.Now
	c.prober.sender = c.probeSender
	return c, nil
}

// Start starts the informers and the health prober and waits for the
// caches. Every replica runs it; only the leader runs Lead.
func (c *Controller) Start(ctx context.Context) error {
	kube.RunInformers(ctx, c.infs...)
	if !kube.WaitForSync(ctx, c.infs[0], c.infs[1]) {
		return fmt.Errorf("sync node and lease caches: %w", ctx.Err())
	}
	go c.keepProbeKey(ctx)
	go c.prober.run(ctx)
	if !kube.WaitForSync(ctx, c.infs...) {
		return fmt.Errorf("sync gateway and policy caches (are the CRDs installed?): %w", ctx.Err())
	}
	c.cfg.Log.Info("operator caches synced")
	c.synced.Store(true)
	return nil
}

// Ready reports whether the caches are synced (for /readyz).
func (c *Controller) Ready() error {
	if !c.synced.Load() {
		return errors.New("caches not synced")
	}
	return nil
}

// Lead reconciles until ctx ends (leadership lost). term is the leader
// Lease's term (leader.Config.OnLeading): this replica's probes carry it,
// and only then hold the agents' fences down.
func (c *Controller) Lead(ctx context.Context, term int64) {
	// The term outlives the leadership: see probeSender.
	c.term.Store(&leaderTerm{term: term})
	c.mu.Lock()
	c.assignment, c.handovers = nil, nil // a new term starts from the statuses
	c.mu.Unlock()
	if m := c.cfg.Metrics; m != nil {
		m.Leader.Set(1)
		defer m.Leader.Set(0)
	}
	c.kick()
	timer := c.clock.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.trigger:
		case <-timer.C():
		}
		start := c.clock.Now()
		err := c.reconcile(ctx)
		if c.cfg.Metrics != nil {
			c.cfg.Metrics.ReconcileDuration.Observe(c.clock.Since(start).Seconds())
		}
		// Reconcile again every second without an event, after 200 ms when
		// it failed.
		next := time.Second
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.cfg.Log.Warn("reconcile failed; retrying", zap.Error(err))
			next = 200 * time.Millisecond
		}
		if !timer.Stop() {
			select {
			case <-timer.C():
			default:
			}
		}
		timer.Reset(next)
	}
}

// assignFresh is gateway.Assign, except that no node is given a new IP
// while its last probe went unanswered: a node that holds nothing is
// probed at the slow interval (unless it is a standby, setStandbys) and
// takes Misses seconds to be found Down; it may be dead already. Such a
// node is probed at once (fast until it answers, and its answer asks for
// another reconcile), and the IP stays where it was meanwhile: on its old
// holder (the move is recorded when it happens), or nowhere.
//
// base is current with the handovers' targets (gateway.Overlay): a
// suspect target is dropped, its IP stays on its current holder.
func (c *Controller) assignFresh(groups []gateway.Group, nodes []gateway.Node, base, current map[netip.Addr]string) map[netip.Addr]string {
	assignment := gateway.Assign(groups, nodes, base)
	for ip, n := range assignment {
		if current[ip] == n || !c.prober.suspect(n) {
			continue
		}
		c.prober.hurry(n)
		if old, ok := current[ip]; ok {
			assignment[ip] = old
		} else {
			delete(assignment, ip)
		}
	}
	return assignment
}

// maxStandbys: at most this many nodes that hold nothing are probed at the
// fast interval as standbys (besides the holders).
const maxStandbys = 8

// setStandbys chooses the nodes probed at the fast interval although they
// hold nothing: those the assignment would choose if every holder failed
// (at most maxStandbys). A holder's failure then finds its successor with
// a fresh answer, and the move does not wait for a probe.
func (c *Controller) setStandbys(groups []gateway.Group, nodes []gateway.Node, assignment map[netip.Addr]string) {
	holding := map[string]bool{}
	for _, n := range assignment {
		holding[n] = true
	}
	alt := slices.Clone(nodes)
	for i := range alt {
		alt[i].Stale = false // a candidate waiting for its probe is one
		if holding[alt[i].Name] {
			alt[i].Up = false
		}
	}
	standbys := map[string]bool{}
	next := gateway.Assign(groups, alt, nil)
	for _, ip := range slices.SortedFunc(maps.Keys(next), netip.Addr.Compare) {
		if len(standbys) == maxStandbys {
			break
		}
		standbys[next[ip]] = true
	}
	c.mu.Lock()
	c.standbys = standbys
	c.mu.Unlock()
}

// probeTargets: every node with an InternalIP; holders of floating IPs and
// standbys (setStandbys) are probed at the fast interval.
func (c *Controller) probeTargets() []probeTarget {
	holders := map[string]bool{}
	for _, obj := range c.gateways.List() {
		for _, n := range obj.(*v1.NetworkGatewayGroup).Status.FloatingIPs {
			holders[n] = true
		}
	}
	c.mu.Lock()
	for _, n := range c.assignment {
		holders[n] = true
	}
	for n := range c.standbys {
		holders[n] = true
	}
	for _, hs := range c.handovers {
		for _, h := range hs {
			holders[h.To] = true
		}
	}
	c.mu.Unlock()
	var out []probeTarget
	for _, obj := range c.nodes.List() {
		n := obj.(*corev1.Node)
		if ip, ok := kube.NodeInternalIP(n); ok {
			out = append(out, probeTarget{name: n.Name, ip: ip, fast: holders[n.Name]})
		}
	}
	return out
}

func (c *Controller) kickIf(b bool) {
	if b {
		c.kick()
	}
}

// leaseMatters reports whether a Lease event changes what reconcile
// reads: an agent's Lease appearing, going, or changing its annotations
// (old nil for an add or a delete). Anything that is not a Lease (a
// deleted object whose final state is unknown) matters.
func leaseMatters(old, obj any) bool {
	l, ok := obj.(*coordinationv1.Lease)
	if !ok {
		return true
	}
	if !strings.HasPrefix(l.Name, kube.AgentLeasePrefix) {
		return false
	}
	o, ok := old.(*coordinationv1.Lease)
	return !ok || !maps.Equal(o.Annotations, l.Annotations)
}

func (c *Controller) kick() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// reconcile computes the assignment and writes every status that changed.
func (c *Controller) reconcile(ctx context.Context) error {
	c.recMu.Lock()
	defer c.recMu.Unlock()
	now := c.clock.Now()
	seen := map[string]bool{} // subjects of c.warned still around
	nodes, facts := c.currentNodes(seen)
	objs := c.groupObjects(ctx)
	checks := selector.CheckGroups(objs, c.cfg.GatewayNamespaces, selector.ReservedFrom(facts))
	groups, groupObjs := c.currentGroups(objs, checks)
	current := c.currentAssignment(groupObjs, checks)
	handovers := c.currentHandovers(groupObjs, current)
	target := c.assignFresh(groups, nodes, gateway.Overlay(current, handovers), current)
	requested, requests := c.moveRequests(groups, groupObjs, nodes, current, target)
	maps.Copy(target, requested)
	plan := gateway.Plan(gateway.PlanInput{Current: current, Handovers: handovers, Target: target, Nodes: nodes,
		Prepared: c.prepared, Reason: c.planReason(groups, nodes, requested), Now: now, Timeout: c.cfg.HandoverTimeout})
	assignment := plan.Assignment
	c.setStandbys(groups, nodes, assignment)
	moves := c.moves(current, plan, nodes, now)

	var errs []string
	// Only what was written is remembered. A status refused (409 from a
	// stale cache) or left as it was stays the truth for the next
	// reconcile, which decides again from it (and records the moves then).
	written := map[netip.Addr]string{}
	writtenHandovers := map[string]map[netip.Addr]gateway.Handover{}
	// published: the holders as the groups' statuses say them after the
	// writes, which the policies' statuses must agree with.
	published := maps.Clone(assignment)
	byKey := make(map[string]*v1.NetworkGatewayGroup, len(groups))
	for i, g := range groups {
		key := g.Namespace + "/" + g.Name
		byKey[key] = groupObjs[i]
		seen["gateway/"+key+"/"+v1.ConditionAccepted], seen["gateway/"+key+"/"+v1.ConditionFloatingIPsValid] = true, true
		ok, err := c.writeGatewayStatus(ctx, groupObjs[i], g, checks[key], nodes, assignment, plan.Handovers, moves, requests[key], now)
		if err != nil {
			errs = append(errs, err.Error())
			// The group's status still says what it said: so do its
			// policies' (never a holder the group does not name yet).
			for _, ip := range g.FloatingIPs {
				if n, ok := current[ip]; ok {
					published[ip] = n
				} else {
					delete(published, ip)
				}
			}
			continue
		}
		if ok {
			hs := map[netip.Addr]gateway.Handover{}
			for _, ip := range g.FloatingIPs {
				if n, assigned := assignment[ip]; assigned {
					written[ip] = n
				}
				if h, ok := plan.Handovers[ip]; ok {
					hs[ip] = h
				}
			}
			writtenHandovers[key] = hs
		}
	}
	c.mu.Lock()
	c.assignment, c.handovers = written, writtenHandovers
	c.mu.Unlock()

	pols := c.policyObjects(ctx)
	slices.SortFunc(pols, func(a, b *v1.EgressNATPolicy) int { return strings.Compare(a.Name, b.Name) })
	res := make([]gateway.Resolution, len(pols))
	var accepted []*v1.EgressNATPolicy
	for i, p := range pols {
		res[i] = gateway.ResolvePolicy(p.Spec.GatewayRef, byKey, checks, published, c.cfg.FallbackToNodeIP)
		if res[i].Accepted {
			accepted = append(accepted, p)
		}
	}
	overlaps := c.policyOverlaps(accepted)
	internal := c.clusterNetworks(ctx, now)
	holding := map[string]bool{}
	for _, r := range res {
		if r.Ready {
			holding[r.Node] = true
		}
	}
	holders := map[string]netip.Addr{}
	for _, n := range nodes {
		if holding[n.Name] {
			holders[n.Name] = n.IP
		}
	}
	unroutable := map[string]bool{}
	for _, n := range selector.UnroutableHolders(c.cfg.MarkMask, holders) {
		unroutable[n] = true
	}
	for i, p := range pols {
		seen["policy/"+p.Name+"/"+v1.ConditionAccepted], seen["policy/"+p.Name+"/"+v1.ConditionOverlap] = true, true
		seen["policy/"+p.Name+"/"+v1.ConditionClusterInternal] = true
		inside := selector.InternalDestinations(p.Spec.Destinations, internal)
		seen["policy/"+p.Name+"/"+v1.ConditionOutOfMarks] = true
		outOfMarks := ""
		if unroutable[res[i].Node] {
			outOfMarks = fmt.Sprintf("%d nodes hold egress IPs, the agents' mark mask %#x routes to %d: nodes that route to all of them have no mark for %s and drop this policy's traffic (OutOfMarks Events name them); widen --mark-mask",
				len(holders), c.cfg.MarkMask, selector.MarkCapacity(c.cfg.MarkMask), res[i].Node)
		}
		if err := c.writePolicyStatus(ctx, p.DeepCopy(), res[i], overlaps[p.Name], inside, outOfMarks, now); err != nil {
			errs = append(errs, err.Error())
		}
	}
	for k := range c.warned {
		if !seen[k] {
			delete(c.warned, k)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("write status: %s", strings.Join(errs, "; "))
	}
	return nil
}

// policyOverlaps returns gateway.Overlaps of the accepted policies, from
// the cache when they did not change.
func (c *Controller) policyOverlaps(accepted []*v1.EgressNATPolicy) map[string][]gateway.PolicyOverlap {
	if c.overlaps == nil || !slices.Equal(c.overlapKey, accepted) {
		c.overlapKey, c.overlaps = accepted, gateway.Overlaps(accepted)
	}
	return c.overlaps
}

// currentNodes turns Nodes, agent leases and probe results into
// gateway.Nodes, sorted by name, and returns the facts every node gives
// about its addresses (selector.ReservedFrom). A node's advertised subnets
// that selector.UsableSubnets ignores are not used, and a Warning event on
// the Node says so (once per change); seen collects the subjects warned.
func (c *Controller) currentNodes(seen map[string]bool) ([]gateway.Node, []selector.NodeFacts) {
	var out []gateway.Node
	var facts []selector.NodeFacts
	for _, obj := range c.nodes.List() {
		n := obj.(*corev1.Node)
		gn := gateway.Node{Name: n.Name}
		_, gn.ControlPlane = n.Labels[kube.LabelControlPlane]
		gn.IP, _ = kube.NodeInternalIP(n)
		f := selector.NodeFacts{Name: n.Name}
		for _, a := range n.Status.Addresses {
			f.AddNodeAddress(string(a.Type), a.Address)
		}
		var l gateway.Liveness
		l.NodeReady, l.NodeReadyKnown = kube.NodeReady(n)
		var agentLease *coordinationv1.Lease
		if lobj, ok, _ := c.leases.GetByKey(c.cfg.AgentNamespace + "/" + kube.AgentLeasePrefix + n.Name); ok {
			lease := lobj.(*coordinationv1.Lease)
			agentLease = lease
			gn.Stale = leaseStale(lease, c.clock.Now())
			if err := kube.LeaseNodeFacts(lease.Annotations, &f); err != nil {
				// Logged once per change: reconcile runs every second.
				subject := "lease/" + n.Name
				seen[subject] = true
				if c.warned[subject] != err.Error() {
					c.warned[subject] = err.Error()
					c.cfg.Log.Warn("bad annotation on the agent's lease", zap.String("node", n.Name), zap.Error(err))
					ref := &corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}
					c.recorder.Eventf(ref, corev1.EventTypeWarning, "BadAgentLease",
						"the Lease of the node's agent does not parse (%v); the node keeps the uplink subnets its agent last advertised", err)
				}
			}
			if len(f.Subnets) > 0 {
				var ignored []selector.IgnoredSubnet
				gn.Subnets, ignored = selector.UsableSubnets(f, c.cfg.MinSubnetPrefix)
				l.Registered = true
				c.warnSubnets(n, ignored, seen)
			}
		}
		switch good, ok := c.goodSubnets[n.Name]; {
		case len(gn.Subnets) > 0:
			c.goodSubnets[n.Name] = gn.Subnets
		case ok:
			// A spoofed or broken advertisement neither takes the node's
			// IPs away nor gives it others.
			gn.Subnets, l.Registered = good, true
		}
		facts = append(facts, f)
		gn.Draining = draining(n, agentLease)
		l.ProbeHealthy, _ = c.prober.health(n.Name)
		gn.Up = gateway.Up(l)
		// Only the probes (not the Node's own record) may say it is down.
		probesDecide := l.Registered && !(l.NodeReadyKnown && !l.NodeReady)
		if !gn.Up && !c.prober.known(n.Name) && probesDecide {
			// Not probed to a conclusion yet (this replica just started,
			// or the node just appeared): unknown is not Down. It keeps
			// its IPs and gets no new one until the probes tell (within
			// Misses probe intervals; the prober then asks for a
			// reconcile).
			gn.Up, gn.Stale = true, true
		}
		if until := c.arpHold(n.Name); !gn.Up && !until.IsZero() && probesDecide {
			// Silent, but its kernel may still answer ARP for its IPs
			// (its agent frozen): it keeps them, and gets no new one,
			// until its ARP lease has surely run out.
			gn.Up, gn.Stale = true, true
			c.clock.AfterFunc(until.Sub(c.clock.Now()), c.kick)
		}
		out = append(out, gn)
	}
	slices.SortFunc(out, func(a, b gateway.Node) int { return strings.Compare(a.Name, b.Name) })
	return out, facts
}

// arpHold returns until when a node that went silent keeps its floating
// IPs (zero when it does not: it answers, or it is Down for another
// reason, or the wait is over).
func (c *Controller) arpHold(node string) time.Time {
	if c.cfg.ARPLease < 0 {
		return time.Time{}
	}
	last := c.prober.silentSince(node)
	if last.IsZero() {
		return time.Time{}
	}
	// The agent answered at last; it froze before the next probe (one
	// interval later), so its last renewal came before last + interval.
	until := last.Add(c.cfg.ARPLease + c.cfg.Probe.Interval)
	if !c.clock.Now().Before(until) {
		return time.Time{}
	}
	return until
}

// leaseStale reports whether an agent's Lease was not renewed within its
// duration (the agent renews only while its sync loop makes progress).
func leaseStale(l *coordinationv1.Lease, now time.Time) bool {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return false
	}
	return now.After(l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second))
}

// clusterNetworks returns the cluster's own networks, whose traffic the
// agents never steer: every Node's pod CIDRs and addresses, and the
// Service CIDRs (ServiceCIDR objects, listed at most every 30 s; an API
// server without them, or RBAC refusing, leaves them out).
func (c *Controller) clusterNetworks(ctx context.Context, now time.Time) []selector.ClusterNetwork {
	var out []selector.ClusterNetwork
	for _, obj := range c.nodes.List() {
		n := obj.(*corev1.Node)
		cidrs := n.Spec.PodCIDRs
		if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
			cidrs = []string{n.Spec.PodCIDR}
		}
		for _, s := range cidrs {
			if p, err := netip.ParsePrefix(s); err == nil {
				out = append(out, selector.ClusterNetwork{Prefix: p.Masked(), What: "pod CIDR of node " + n.Name})
			}
		}
		for _, a := range n.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil && (a.Type == corev1.NodeInternalIP || a.Type == corev1.NodeExternalIP) {
				out = append(out, selector.ClusterNetwork{Prefix: netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()), What: string(a.Type) + " of node " + n.Name})
			}
		}
	}
	if now.Sub(c.serviceCIDRsAt) > 30*time.Second {
		c.serviceCIDRsAt = now
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		list, err := c.cfg.Clients.Core.NetworkingV1().ServiceCIDRs().List(lctx, metav1.ListOptions{})
		cancel()
		if err == nil {
			c.serviceCIDRs = nil
			for _, sc := range list.Items {
				for _, s := range sc.Spec.CIDRs {
					if p, err := netip.ParsePrefix(s); err == nil {
						c.serviceCIDRs = append(c.serviceCIDRs, p.Masked())
					}
				}
			}
		}
	}
	for _, p := range c.serviceCIDRs {
		out = append(out, selector.ClusterNetwork{Prefix: p, What: "Service CIDR"})
	}
	// A fixed order, so that a condition's message changes only when the
	// networks do.
	slices.SortFunc(out, func(a, b selector.ClusterNetwork) int {
		return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()), strings.Compare(a.What, b.What))
	})
	return out
}

// warnSubnets logs and records a Warning event on the Node when the
// subnets its agent advertises that are ignored change.
func (c *Controller) warnSubnets(n *corev1.Node, ignored []selector.IgnoredSubnet, seen map[string]bool) {
	if len(ignored) == 0 {
		return
	}
	var parts []string
	for _, s := range ignored {
		parts = append(parts, fmt.Sprintf("%s (%s)", s.Subnet, s.Reason))
	}
	msg := fmt.Sprintf("uplink subnets advertised by the agent are ignored, no floating IP is assigned to this node in them: %s", strings.Join(parts, ", "))
	subject := "node/" + n.Name
	seen[subject] = true
	if c.warned[subject] == msg {
		return
	}
	c.warned[subject] = msg
	c.cfg.Log.Warn("uplink subnets ignored", zap.String("node", n.Name), zap.String("why", msg))
	ref := &corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}
	c.recorder.Event(ref, corev1.EventTypeWarning, "UplinkSubnetIgnored", msg)
}

// groupObjects returns the groups from the cache; from the API server
// while the cache may be behind it (its watch failed or ended and has not
// started again: client-go waits up to 30 s before it lists again after
// API server restarts). Deciding from a stale cache, the leader would
// write nothing where the status it last wrote differs from the cache, or
// be refused (409) where it writes: a node's status would stay Down, an
// IP on its old holder, until the watch came back.
func (c *Controller) groupObjects(ctx context.Context) []*v1.NetworkGatewayGroup {
	return decideFrom[v1.NetworkGatewayGroup](ctx, c, kube.GatewayGVR, c.gateways)
}

// policyObjects returns the policies as groupObjects the groups.
func (c *Controller) policyObjects(ctx context.Context) []*v1.EgressNATPolicy {
	return decideFrom[v1.EgressNATPolicy](ctx, c, kube.PolicyGVR, c.policies)
}

// decideFrom returns the objects of gvr from the informer's cache, or from
// the API server while that cache may be behind it.
func decideFrom[T any](ctx context.Context, c *Controller, gvr schema.GroupVersionResource, cached cache.Store) []*T {
	if stale, _ := c.cfg.Clients.Watches.Stale(gvr.Resource); stale {
		objs, err := kube.ListFresh[T](ctx, c.cfg.Clients, gvr)
		if err == nil {
			return objs
		}
		c.cfg.Log.Debug("read from the API while its watch is down", zap.String("resource", gvr.Resource), zap.Error(err))
	}
	var objs []*T
	for _, obj := range cached.List() {
		objs = append(objs, obj.(*T))
	}
	return objs
}

// currentGroups returns the groups, sorted by namespace/name, each with the
// floating IPs its check allows, and copies of their objects in the same
// order.
func (c *Controller) currentGroups(from []*v1.NetworkGatewayGroup, checks map[string]selector.GroupCheck) ([]gateway.Group, []*v1.NetworkGatewayGroup) {
	var objs []*v1.NetworkGatewayGroup
	for _, g := range from {
		objs = append(objs, g.DeepCopy())
	}
	slices.SortFunc(objs, func(a, b *v1.NetworkGatewayGroup) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	groups := make([]gateway.Group, len(objs))
	for i, g := range objs {
		groups[i] = gateway.Group{Namespace: g.Namespace, Name: g.Name, FloatingIPs: checks[g.Namespace+"/"+g.Name].Usable,
			Nodes: c.selectedNodes(g)}
	}
	return groups, objs
}

// selectedNodes is the set of Nodes g's spec.nodeSelector matches, nil
// without a selector (every node may hold its IPs). A selector that does
// not parse (the CRD's validation refuses those) selects no node.
func (c *Controller) selectedNodes(g *v1.NetworkGatewayGroup) map[string]bool {
	if g.Spec.NodeSelector == nil {
		return nil
	}
	out := map[string]bool{}
	sel, err := g.Spec.NodeSelector.AsSelector()
	if err != nil {
		c.cfg.Log.Warn("gateway nodeSelector does not parse: no node may hold its floating IPs",
			zap.String("gateway", g.Namespace+"/"+g.Name), zap.Error(err))
		return out
	}
	for _, obj := range c.nodes.List() {
		if n := obj.(*corev1.Node); sel.Matches(labels.Set(n.Labels)) {
			out[n.Name] = true
		}
	}
	return out
}

// currentAssignment is what the statuses say (of each group, the IPs its
// check allows), overlaid with what this leader wrote last (its own writes
// may not be in the cache yet).
func (c *Controller) currentAssignment(groups []*v1.NetworkGatewayGroup, checks map[string]selector.GroupCheck) map[netip.Addr]string {
	out := map[netip.Addr]string{}
	for _, g := range groups {
		check := checks[g.Namespace+"/"+g.Name]
		for ipStr, node := range g.Status.FloatingIPs {
			if ip, err := netip.ParseAddr(ipStr); err == nil && check.Allows(ip) {
				out[ip] = node
			}
		}
	}
	maps.Copy(out, c.assignment)
	return out
}

// moves lists the floating IPs that changed node, with the reason, logs
// them and records an Event on their group.
func (c *Controller) moves(before map[netip.Addr]string, plan gateway.PlanResult, nodes []gateway.Node, now time.Time) map[netip.Addr]v1.FloatingIPMove {
	after := plan.Assignment
	byName := make(map[string]gateway.Node, len(nodes))
	for _, n := range nodes {
		byName[n.Name] = n
	}
	for ip, to := range after {
		if before[ip] == "" {
			c.cfg.Log.Info("floating IP assigned", zap.String("ip", ip.String()), zap.String("node", to))
		}
	}
	out := map[netip.Addr]v1.FloatingIPMove{}
	for _, pm := range plan.Moves {
		ip, from, to := pm.IP, pm.From, pm.To
		m := v1.FloatingIPMove{IP: ip.String(), From: from, To: to, Time: metav1.NewTime(now)}
		_, lastAlive := c.prober.health(from)
		switch n, ok := byName[from]; {
		case pm.Planned:
			m.Reason = "planned: " + pm.Reason
			if pm.Unprepared {
				m.Reason += fmt.Sprintf("; %s did not report it prepared within %s", to, c.cfg.HandoverTimeout)
			}
		case !ok:
			m.Reason = fmt.Sprintf("node %s no longer exists", from)
		case !n.Up && !lastAlive.IsZero():
			m.DetectionMilliseconds = now.Sub(lastAlive).Milliseconds()
			m.Reason = fmt.Sprintf("node %s Down: no health probe answer for %dms", from, m.DetectionMilliseconds)
		case !n.Up:
			m.Reason = fmt.Sprintf("node %s Down", from)
		default:
			m.Reason = fmt.Sprintf("node %s can no longer hold %s (not in its subnets)", from, ip)
		}
		out[ip] = m
		c.cfg.Log.Warn("floating IP moved", zap.String("ip", ip.String()), zap.String("node", to), zap.String("from", from),
			zap.String("reason", m.Reason), zap.Int64("detectionMs", m.DetectionMilliseconds))
	}
	for ip, node := range before {
		if _, ok := after[ip]; !ok && node != "" {
			c.cfg.Log.Warn("floating IP has no node", zap.String("ip", ip.String()), zap.String("from", node))
		}
	}
	return out
}

// writeGatewayStatus writes the group's status when it changed, and
// reports whether it did. g holds the floating IPs check allows.
func (c *Controller) writeGatewayStatus(ctx context.Context, obj *v1.NetworkGatewayGroup, g gateway.Group, check selector.GroupCheck, nodes []gateway.Node, assignment map[netip.Addr]string, handovers map[netip.Addr]gateway.Handover, moves map[netip.Addr]v1.FloatingIPMove, req *moveRequest, now time.Time) (bool, error) {
	st := obj.Status.DeepCopy()
	st.Handovers = nil
	var started []v1.FloatingIPHandover
	for _, ip := range g.FloatingIPs {
		if h, ok := handovers[ip]; ok {
			vh := v1.FloatingIPHandover{IP: ip.String(), From: h.From, To: h.To, Reason: h.Reason, Since: metav1.NewMicroTime(h.Since)}
			st.Handovers = append(st.Handovers, vh)
			if !slices.ContainsFunc(obj.Status.Handovers, func(o v1.FloatingIPHandover) bool { return o.IP == vh.IP && o.To == vh.To }) {
				started = append(started, vh)
			}
		}
	}
	if req != nil {
		st.ObservedMoveRequest, st.MoveRequestMessage = req.value, req.message
	}
	var moved []v1.FloatingIPMove
	for _, ip := range g.FloatingIPs {
		if m, ok := moves[ip]; ok {
			st.RecentMoves = append([]v1.FloatingIPMove{m}, st.RecentMoves...)
			moved = append(moved, m)
		}
	}
	if len(st.RecentMoves) > v1.MaxRecentMoves {
		st.RecentMoves = st.RecentMoves[:v1.MaxRecentMoves]
	}
	st.Nodes, st.FloatingIPs, st.AssignedCount = gateway.GroupStatus(g, nodes, assignment)
	st.ObservedGeneration = obj.Generation
	missing := unassigned(g, assignment)
	if c.cfg.Metrics != nil {
		c.cfg.Metrics.UnassignedIPs.WithLabelValues(obj.Namespace + "/" + obj.Name).Set(float64(len(missing)))
	}
	for _, cond := range groupConditions(obj, check, len(g.FloatingIPs), missing, g.Nodes) {
		setCondition(&st.Conditions, cond, now)
	}
	if check.Ignored != "" {
		apimeta.RemoveStatusCondition(&st.Conditions, v1.ConditionFloatingIPsValid)
	}
	if reflect.DeepEqual(normalize(*st), normalize(obj.Status)) {
		return false, nil
	}
	prev := obj.Status.Conditions
	obj.Status = *st
	if err := c.cfg.Clients.UpdateGatewayStatus(ctx, obj); err != nil {
		return false, err
	}
	// The moves are recorded once the status holds them: a refused write
	// decides them again.
	ref := &corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "NetworkGatewayGroup", Namespace: obj.Namespace, Name: obj.Name, UID: obj.UID}
	for _, m := range moved {
		if om := c.cfg.Metrics; om != nil {
			om.IPMoves.WithLabelValues(obj.Namespace + "/" + obj.Name).Inc()
			if m.DetectionMilliseconds > 0 {
				om.FailoverDuration.Observe(float64(m.DetectionMilliseconds) / 1000)
			}
		}
		typ := corev1.EventTypeWarning
		if strings.HasPrefix(m.Reason, "planned: ") {
			typ = corev1.EventTypeNormal
		}
		c.recorder.Eventf(ref, typ, "FloatingIPMoved", "%s moved from %s to %s: %s", m.IP, m.From, m.To, m.Reason)
	}
	for _, h := range started {
		c.cfg.Log.Info("floating IP handover started", zap.String("ip", h.IP), zap.String("node", h.To), zap.String("from", h.From),
			zap.String("reason", h.Reason))
		c.recorder.Eventf(ref, corev1.EventTypeNormal, "FloatingIPHandover", "handing %s over from %s to %s: %s", h.IP, h.From, h.To, h.Reason)
	}
	if req != nil {
		c.cfg.Log.Info("move request", zap.String("gateway", obj.Namespace+"/"+obj.Name), zap.String("request", req.value),
			zap.String("result", req.message))
		c.recorder.Eventf(ref, corev1.EventTypeNormal, "MoveRequest", "%s: %s", req.value, req.message)
	}
	subject := "gateway/" + obj.Namespace + "/" + obj.Name + "/"
	for _, typ := range []string{v1.ConditionAccepted, v1.ConditionFloatingIPsValid} {
		c.warnCondition(subject+typ, ref, prev, st.Conditions, typ)
	}
	return true, nil
}

// groupConditions are the Accepted, FloatingIPsValid (for an honoured
// group) and Ready conditions of a group: usable is how many of its
// floating IPs its check allows, missing those of them no node holds,
// selected the nodes its nodeSelector selects (nil: no selector).
func groupConditions(obj *v1.NetworkGatewayGroup, check selector.GroupCheck, usable int, missing []string, selected map[string]bool) []metav1.Condition {
	gen := obj.Generation
	if check.Ignored != "" {
		msg := fmt.Sprintf("the group is ignored and its floating IPs are not assigned: %s", check.Ignored)
		return []metav1.Condition{
			{Type: v1.ConditionAccepted, Status: metav1.ConditionFalse, Reason: v1.ReasonNamespaceNotAllowed, Message: msg, ObservedGeneration: gen},
			{Type: "Ready", Status: metav1.ConditionFalse, Reason: v1.ReasonNamespaceNotAllowed, Message: msg, ObservedGeneration: gen},
		}
	}
	total := len(obj.Spec.FloatingIPs)
	accepted := metav1.Condition{Type: v1.ConditionAccepted, Status: metav1.ConditionTrue, Reason: v1.ReasonAccepted,
		Message: fmt.Sprintf("namespace %s is a gateway namespace", obj.Namespace), ObservedGeneration: gen}
	valid := metav1.Condition{Type: v1.ConditionFloatingIPsValid, Status: metav1.ConditionTrue, Reason: v1.ReasonFloatingIPsValid,
		Message: fmt.Sprintf("all %d floating IPs can be assigned", usable), ObservedGeneration: gen}
	ready := metav1.Condition{Type: "Ready", Status: metav1.ConditionTrue, Reason: v1.ReasonAllAssigned,
		Message: fmt.Sprintf("all %d floating IPs are held by Up nodes", usable), ObservedGeneration: gen}
	if n := len(check.Rejected); n > 0 {
		valid.Status, valid.Reason = metav1.ConditionFalse, v1.ReasonFloatingIPRejected
		if check.OnlyConflicts() {
			valid.Reason = v1.ReasonFloatingIPConflict
		}
		valid.Message = fmt.Sprintf("%d of %d floating IPs are rejected and never assigned: %s", n, total, check.Message())
		ready.Status, ready.Reason = metav1.ConditionFalse, valid.Reason
		ready.Message = fmt.Sprintf("%d of %d floating IPs are rejected (see condition %s); the other %d are held by Up nodes", n, total, v1.ConditionFloatingIPsValid, usable)
	}
	if len(missing) > 0 {
		ready.Status, ready.Reason = metav1.ConditionFalse, v1.ReasonUnassigned
		ready.Message = fmt.Sprintf("%d of %d floating IPs have no Up node in their subnet: %s", len(missing), usable, strings.Join(missing, ", "))
		if selected != nil {
			names := slices.Sorted(maps.Keys(selected))
			if len(names) > 5 {
				names = append(names[:5], "...")
			}
			ready.Message = fmt.Sprintf("%d of %d floating IPs have no Up node among the %d spec.nodeSelector selects (%s) in their subnet: %s",
				len(missing), usable, len(selected), strings.Join(names, ", "), strings.Join(missing, ", "))
		}
		if n := len(check.Rejected); n > 0 {
			ready.Message += fmt.Sprintf("; %d more are rejected (see condition %s)", n, v1.ConditionFloatingIPsValid)
		}
	}
	return []metav1.Condition{accepted, valid, ready}
}

// warnCondition records a Warning event on ref when the condition typ of
// now is False and differs from the one of before, and the warning was not
// already recorded for subject (a write the cache does not show yet).
func (c *Controller) warnCondition(subject string, ref *corev1.ObjectReference, before, now []metav1.Condition, typ string) {
	cur := apimeta.FindStatusCondition(now, typ)
	if cur == nil || cur.Status != metav1.ConditionFalse {
		delete(c.warned, subject)
		return
	}
	if old := apimeta.FindStatusCondition(before, typ); old != nil && old.Status == cur.Status && old.Reason == cur.Reason && old.Message == cur.Message {
		return
	}
	msg := cur.Reason + ": " + cur.Message
	if c.warned[subject] == msg {
		return
	}
	c.warned[subject] = msg
	c.recorder.Event(ref, corev1.EventTypeWarning, cur.Reason, cur.Message)
}

// writePolicyStatus writes the policy's status when it changed: r is how its
// gatewayRef resolves, overlaps the other policies it overlaps.
func (c *Controller) writePolicyStatus(ctx context.Context, p *v1.EgressNATPolicy, r gateway.Resolution, overlaps []gateway.PolicyOverlap, inside, outOfMarks string, now time.Time) error {
	st := p.Status.DeepCopy()
	st.ObservedGeneration = p.Generation
	st.EgressIP, st.GatewayNode = "", r.Node
	st.WhenUnavailable = v1.UnavailableDrop
	if c.cfg.FallbackToNodeIP {
		st.WhenUnavailable = v1.UnavailableNodeIP
	}
	if r.EgressIP.IsValid() {
		st.EgressIP = r.EgressIP.String()
	}
	setCondition(&st.Conditions, metav1.Condition{Type: v1.ConditionAccepted, Status: condStatus(r.Accepted),
		Reason: r.AcceptedReason, Message: r.AcceptedMessage, ObservedGeneration: p.Generation}, now)
	setCondition(&st.Conditions, metav1.Condition{Type: v1.ConditionReady, Status: condStatus(r.Ready),
		Reason: r.ReadyReason, Message: r.ReadyMessage, ObservedGeneration: p.Generation}, now)
	if len(overlaps) > 0 {
		setCondition(&st.Conditions, metav1.Condition{Type: v1.ConditionOverlap, Status: metav1.ConditionTrue,
			Reason: v1.ReasonOverlappingPolicies, Message: gateway.OverlapMessage(overlaps), ObservedGeneration: p.Generation}, now)
	} else {
		apimeta.RemoveStatusCondition(&st.Conditions, v1.ConditionOverlap)
	}
	if outOfMarks != "" {
		setCondition(&st.Conditions, metav1.Condition{Type: v1.ConditionOutOfMarks, Status: metav1.ConditionTrue,
			Reason: v1.ReasonTooManyGateways, Message: outOfMarks, ObservedGeneration: p.Generation}, now)
	} else {
		apimeta.RemoveStatusCondition(&st.Conditions, v1.ConditionOutOfMarks)
	}
	if inside != "" {
		setCondition(&st.Conditions, metav1.Condition{Type: v1.ConditionClusterInternal, Status: metav1.ConditionTrue,
			Reason: v1.ReasonClusterInternal, Message: inside, ObservedGeneration: p.Generation}, now)
	} else {
		apimeta.RemoveStatusCondition(&st.Conditions, v1.ConditionClusterInternal)
	}
	if reflect.DeepEqual(*st, p.Status) {
		return nil
	}
	ref := &corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "EgressNATPolicy", Name: p.Name, UID: p.UID}
	var events []func()
	if p.Status.GatewayNode != st.GatewayNode || p.Status.EgressIP != st.EgressIP {
		c.cfg.Log.Info("policy gateway changed", zap.String("policy", p.Name), zap.String("ip", st.EgressIP),
			zap.String("gateway", st.GatewayNode), zap.String("reason", r.ReadyReason))
		switch {
		case !r.Accepted:
			// warnCondition below.
		case !r.Ready:
			events = append(events, func() { c.recorder.Event(ref, corev1.EventTypeWarning, r.ReadyReason, r.ReadyMessage) })
		default:
			events = append(events, func() {
				c.recorder.Eventf(ref, corev1.EventTypeNormal, "GatewayAssigned", "egress IP %s is held by node %s", st.EgressIP, st.GatewayNode)
			})
		}
	}
	prev := p.Status.Conditions
	p.Status = *st
	if err := c.cfg.Clients.UpdatePolicyStatus(ctx, p); err != nil {
		return err
	}
	for _, e := range events {
		e()
	}
	c.warnCondition("policy/"+p.Name+"/"+v1.ConditionAccepted, ref, prev, st.Conditions, v1.ConditionAccepted)
	c.warnOverlap("policy/"+p.Name+"/"+v1.ConditionOverlap, ref, prev, st.Conditions, v1.ConditionOverlap)
	c.warnOverlap("policy/"+p.Name+"/"+v1.ConditionClusterInternal, ref, prev, st.Conditions, v1.ConditionClusterInternal)
	c.warnOverlap("policy/"+p.Name+"/"+v1.ConditionOutOfMarks, ref, prev, st.Conditions, v1.ConditionOutOfMarks)
	return nil
}

// warnOverlap records a Warning event when the policy's Overlap condition
// appears or changes.
func (c *Controller) warnOverlap(subject string, ref *corev1.ObjectReference, before, now []metav1.Condition, typ string) {
	cur := apimeta.FindStatusCondition(now, typ)
	if cur == nil {
		delete(c.warned, subject)
		return
	}
	if old := apimeta.FindStatusCondition(before, typ); (old != nil && old.Message == cur.Message) || c.warned[subject] == cur.Message {
		return
	}
	c.warned[subject] = cur.Message
	c.recorder.Event(ref, corev1.EventTypeWarning, cur.Reason, cur.Message)
}

func unassigned(g gateway.Group, assignment map[netip.Addr]string) []string {
	var out []string
	for _, ip := range g.FloatingIPs {
		if _, ok := assignment[ip]; !ok {
			out = append(out, ip.String())
		}
	}
	return out
}

func condStatus(b bool) metav1.ConditionStatus {
	if b {
		return metav1.ConditionTrue
	}
	return metav1.ConditionFalse
}

// setCondition sets c, keeping the transition time when the status did not
// change.
func setCondition(conds *[]metav1.Condition, c metav1.Condition, now time.Time) {
	c.LastTransitionTime = metav1.NewTime(now)
	apimeta.SetStatusCondition(conds, c)
}

// normalize makes nil and empty maps compare equal.
func normalize(s v1.NetworkGatewayGroupStatus) v1.NetworkGatewayGroupStatus {
	if len(s.Nodes) == 0 {
		s.Nodes = nil
	}
	if len(s.FloatingIPs) == 0 {
		s.FloatingIPs = nil
	}
	// Handovers' times as the API stores them (microseconds, no
	// monotonic clock, one location).
	hs := slices.Clone(s.Handovers)
	for i := range hs {
		hs[i].Since.Time = hs[i].Since.UTC().Truncate(time.Microsecond)
	}
	if len(hs) == 0 {
		hs = nil
	}
	s.Handovers = hs
	return s
}

// currentHandovers is what the statuses say of the handovers under way
// (of each IP still held by the handover's old holder), with this
// leader's last writes in place of its groups' statuses (the cache may
// not show them yet).
func (c *Controller) currentHandovers(groups []*v1.NetworkGatewayGroup, current map[netip.Addr]string) map[netip.Addr]gateway.Handover {
	out := map[netip.Addr]gateway.Handover{}
	c.mu.Lock()
	written := c.handovers
	c.mu.Unlock()
	for _, g := range groups {
		if hs, ok := written[g.Namespace+"/"+g.Name]; ok {
			for ip, h := range hs {
				if current[ip] == h.From {
					out[ip] = h
				}
			}
			continue
		}
		for _, h := range g.Status.Handovers {
			ip, err := netip.ParseAddr(h.IP)
			if err != nil || current[ip] != h.From || h.To == "" {
				continue
			}
			out[ip] = gateway.Handover{From: h.From, To: h.To, Reason: h.Reason, Since: h.Since.Time}
		}
	}
	return out
}

// moveRequest is what reconcile did with a group's new move request.
type moveRequest struct{ value, message string }

// moveRequests decides the groups' new move requests (annotation
// egressnat.io/move-request with a value their status has not observed):
// the targets they set (IP → node) and, by group, what was done.
func (c *Controller) moveRequests(groups []gateway.Group, objs []*v1.NetworkGatewayGroup, nodes []gateway.Node, current, target map[netip.Addr]string) (map[netip.Addr]string, map[string]*moveRequest) {
	targets := map[netip.Addr]string{}
	done := map[string]*moveRequest{}
	for i, obj := range objs {
		value, ok := obj.Annotations[v1.AnnotationMoveRequest]
		if !ok || value == obj.Status.ObservedMoveRequest {
			continue
		}
		key := obj.Namespace + "/" + obj.Name
		req, err := gateway.ParseMoveRequest(value)
		if err != nil {
			done[key] = &moveRequest{value: value, message: "refused: " + err.Error()}
			continue
		}
		t, msg := gateway.Requested(groups, i, req, nodes, current, target)
		maps.Copy(targets, t)
		done[key] = &moveRequest{value: value, message: msg}
	}
	return targets, done
}

// planReason says why an IP goes from one Up node to another (a planned
// move): a request, its node draining, its node no longer selected or no
// longer in its subnet.
func (c *Controller) planReason(groups []gateway.Group, nodes []gateway.Node, requested map[netip.Addr]string) func(ip netip.Addr, from, to string) string {
	return func(ip netip.Addr, from, to string) string {
		if requested[ip] == to {
			return "requested (" + v1.AnnotationMoveRequest + ")"
		}
		for _, n := range nodes {
			if n.Name != from {
				continue
			}
			if n.Draining != "" {
				return fmt.Sprintf("node %s %s", from, n.Draining)
			}
			for _, g := range groups {
				if slices.Contains(g.FloatingIPs, ip) {
					if why := gateway.WhyNot(g, ip, gateway.Node{Name: n.Name, Up: true, Subnets: n.Subnets}); why != "" {
						return why
					}
				}
			}
		}
		return fmt.Sprintf("%s goes to %s", ip, to)
	}
}

// prepared reports whether node's agent listed ip in its Lease as
// prepared for a handover.
func (c *Controller) prepared(node string, ip netip.Addr) bool {
	obj, ok, _ := c.leases.GetByKey(c.cfg.AgentNamespace + "/" + kube.AgentLeasePrefix + node)
	if !ok {
		return false
	}
	ips, err := kube.ParseAddresses(obj.(*coordinationv1.Lease).Annotations[kube.AnnotationPrepared])
	return err == nil && slices.Contains(ips, ip)
}

// draining says why node n is to give its floating IPs up ("" when it
// is not): cordoned, labelled for maintenance, or its agent stopping.
func draining(n *corev1.Node, lease *coordinationv1.Lease) string {
	switch {
	case n.Spec.Unschedulable:
		return "cordoned (spec.unschedulable)"
	case maintenance(n.Labels):
		return "labelled " + v1.LabelMaintenance + "=" + n.Labels[v1.LabelMaintenance]
	case lease != nil && lease.Annotations[kube.AnnotationDraining] != "":
		return "draining: " + lease.Annotations[kube.AnnotationDraining]
	}
	return ""
}

// maintenance reports whether a Node's labels ask for maintenance: the
// label egressnat.io/maintenance with any value but "false".
func maintenance(labels map[string]string) bool {
	v, ok := labels[v1.LabelMaintenance]
	return ok && v != "false"
}
