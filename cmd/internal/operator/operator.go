// Package operator is the egressnat operator's controller: it watches
// gateways, policies, nodes and the agents' Leases (registration and uplink
// subnets; Up/Down comes from the health probes), assigns every
// floating IP to a node with the pure gateway.Assign, and writes the status
// of gateways and policies. Only the leader runs it.
package operator

import (
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
	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"
)

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
	// Metrics are updated when set.
	Metrics *metrics.Operator
}

// Controller reconciles the whole cluster state on every change.
type Controller struct {
	cfg      Config
	clock    clock.Clock
	trigger  chan struct{}
	prober   *prober
	recorder record.EventRecorder

	infs []cache.SharedIndexInformer

	nodes    cache.Indexer
	leases   cache.Indexer
	gateways cache.Indexer
	policies cache.Indexer

	synced atomic.Bool

	mu sync.Mutex
	// assignment remembers what the last reconcile wrote in the groups'
	// statuses, so that an IP keeps its node while the cache does not show
	// the write yet; only the leader sets it.
	assignment map[netip.Addr]string
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
func newController(cfg Config, clk clock.Clock) (*Controller, error) {
	if cfg.Probe.Port == 0 {
		cfg.Probe = DefaultProbeConfig
	}
	c := &Controller{cfg: cfg, clock: clk, trigger: make(chan struct{}, 1)}
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
		if _, err := inf.AddEventHandler(handler); err != nil {
			return nil, fmt.Errorf("add event handler: %w", err)
		}
	}
	c.nodes, c.leases, c.gateways, c.policies = infs[0].GetIndexer(), infs[1].GetIndexer(), infs[2].GetIndexer(), infs[3].GetIndexer()
	c.prober = newProber(cfg.Probe, cfg.Log, c.probeTargets, c.kick)
	c.prober.now = clk.Now
	return c, nil
}

// Start starts the informers and the health prober and waits for the
// caches. Every replica runs it; only the leader runs Lead.
func (c *Controller) Start(ctx context.Context) error {
	kube.RunInformers(ctx, c.infs...)
	if !kube.WaitForSync(ctx, c.infs[0], c.infs[1]) {
		return fmt.Errorf("sync node and lease caches: %w", ctx.Err())
	}
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

// Lead reconciles until ctx ends (leadership lost).
func (c *Controller) Lead(ctx context.Context) {
	c.mu.Lock()
	c.assignment = nil // a new term starts from the statuses
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

// probeTargets: every node with an InternalIP; holders of floating IPs are
// probed at the fast interval.
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

func (c *Controller) kick() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// reconcile computes the assignment and writes every status that changed.
func (c *Controller) reconcile(ctx context.Context) error {
	now := c.clock.Now()
	nodes := c.currentNodes()
	groups, groupObjs := c.currentGroups()
	current := c.currentAssignment(groupObjs)
	assignment := gateway.Assign(groups, nodes, current)
	moves := c.moves(current, assignment, nodes, now)

	var errs []string
	// Only what was written is remembered. A status refused (409 from a
	// stale cache) or left as it was stays the truth for the next
	// reconcile, which decides again from it (and records the moves then).
	written := map[netip.Addr]string{}
	byKey := make(map[string]gateway.Group, len(groups))
	for i, g := range groups {
		byKey[g.Namespace+"/"+g.Name] = g
		ok, err := c.writeGatewayStatus(ctx, groupObjs[i], g, nodes, assignment, moves, now)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		if ok {
			for _, ip := range g.FloatingIPs {
				if n, assigned := assignment[ip]; assigned {
					written[ip] = n
				}
			}
		}
	}
	c.mu.Lock()
	c.assignment = written
	c.mu.Unlock()
	for _, obj := range c.policies.List() {
		p := obj.(*v1.EgressNATPolicy).DeepCopy()
		if err := c.writePolicyStatus(ctx, p, byKey, assignment, now); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("write status: %s", strings.Join(errs, "; "))
	}
	return nil
}

// currentNodes turns Nodes, agent leases and probe results into
// gateway.Nodes, sorted by name.
func (c *Controller) currentNodes() []gateway.Node {
	var out []gateway.Node
	for _, obj := range c.nodes.List() {
		n := obj.(*corev1.Node)
		gn := gateway.Node{Name: n.Name}
		_, gn.ControlPlane = n.Labels[kube.LabelControlPlane]
		gn.IP, _ = kube.NodeInternalIP(n)
		var l gateway.Liveness
		l.NodeReady, l.NodeReadyKnown = kube.NodeReady(n)
		if lobj, ok, _ := c.leases.GetByKey(c.cfg.AgentNamespace + "/" + kube.AgentLeasePrefix + n.Name); ok {
			lease := lobj.(*coordinationv1.Lease)
			if subnets, err := kube.ParseSubnets(lease.Annotations[kube.AnnotationSubnets]); err == nil && len(subnets) > 0 {
				gn.Subnets, l.Registered = subnets, true
			} else if err != nil {
				c.cfg.Log.Warn("bad uplink-subnets annotation", zap.String("node", n.Name), zap.Error(err))
			}
		}
		l.ProbeHealthy, _ = c.prober.health(n.Name)
		gn.Up = gateway.Up(l)
		out = append(out, gn)
	}
	slices.SortFunc(out, func(a, b gateway.Node) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// currentGroups returns the groups, sorted by namespace/name, and copies
// of their objects in the same order.
func (c *Controller) currentGroups() ([]gateway.Group, []*v1.NetworkGatewayGroup) {
	var objs []*v1.NetworkGatewayGroup
	for _, obj := range c.gateways.List() {
		objs = append(objs, obj.(*v1.NetworkGatewayGroup).DeepCopy())
	}
	slices.SortFunc(objs, func(a, b *v1.NetworkGatewayGroup) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	groups := make([]gateway.Group, len(objs))
	for i, g := range objs {
		groups[i] = gateway.Group{Namespace: g.Namespace, Name: g.Name}
		for _, s := range g.Spec.FloatingIPs {
			if ip, err := netip.ParseAddr(s); err == nil {
				groups[i].FloatingIPs = append(groups[i].FloatingIPs, ip)
			}
		}
	}
	return groups, objs
}

// currentAssignment is what the statuses say, overlaid with what this
// leader wrote last (its own writes may not be in the cache yet).
func (c *Controller) currentAssignment(groups []*v1.NetworkGatewayGroup) map[netip.Addr]string {
	out := map[netip.Addr]string{}
	for _, g := range groups {
		for ipStr, node := range g.Status.FloatingIPs {
			if ip, err := netip.ParseAddr(ipStr); err == nil {
				out[ip] = node
			}
		}
	}
	maps.Copy(out, c.assignment)
	return out
}

// moves lists the floating IPs that changed node, with the reason, logs
// them and records an Event on their group.
func (c *Controller) moves(before, after map[netip.Addr]string, nodes []gateway.Node, now time.Time) map[netip.Addr]v1.FloatingIPMove {
	byName := make(map[string]gateway.Node, len(nodes))
	for _, n := range nodes {
		byName[n.Name] = n
	}
	out := map[netip.Addr]v1.FloatingIPMove{}
	for ip, to := range after {
		from := before[ip]
		if from == to || from == "" {
			if from == "" {
				c.cfg.Log.Info("floating IP assigned", zap.String("ip", ip.String()), zap.String("node", to))
			}
			continue
		}
		m := v1.FloatingIPMove{IP: ip.String(), From: from, To: to, Time: metav1.NewTime(now)}
		_, lastAlive := c.prober.health(from)
		switch n, ok := byName[from]; {
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
// reports whether it did.
func (c *Controller) writeGatewayStatus(ctx context.Context, obj *v1.NetworkGatewayGroup, g gateway.Group, nodes []gateway.Node, assignment map[netip.Addr]string, moves map[netip.Addr]v1.FloatingIPMove, now time.Time) (bool, error) {
	st := obj.Status.DeepCopy()
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
	cond := metav1.Condition{Type: "Ready", Status: metav1.ConditionTrue, Reason: "AllAssigned",
		Message: fmt.Sprintf("all %d floating IPs are held by Up nodes", len(g.FloatingIPs)), ObservedGeneration: obj.Generation}
	missing := unassigned(g, assignment)
	if c.cfg.Metrics != nil {
		c.cfg.Metrics.UnassignedIPs.WithLabelValues(obj.Namespace + "/" + obj.Name).Set(float64(len(missing)))
	}
	if len(missing) > 0 {
		cond.Status, cond.Reason = metav1.ConditionFalse, "Unassigned"
		cond.Message = fmt.Sprintf("%d of %d floating IPs have no Up node in their subnet: %s", len(missing), len(g.FloatingIPs), strings.Join(missing, ", "))
	}
	setCondition(&st.Conditions, cond, now)
	if reflect.DeepEqual(normalize(*st), normalize(obj.Status)) {
		return false, nil
	}
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
		c.recorder.Eventf(ref, corev1.EventTypeWarning, "FloatingIPMoved", "%s moved from %s to %s: %s", m.IP, m.From, m.To, m.Reason)
	}
	return true, nil
}

func (c *Controller) writePolicyStatus(ctx context.Context, p *v1.EgressNATPolicy, groups map[string]gateway.Group, assignment map[netip.Addr]string, now time.Time) error {
	r := gateway.ResolvePolicy(p.Spec.GatewayRef, groups, assignment, c.cfg.FallbackToNodeIP)
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
	if reflect.DeepEqual(*st, p.Status) {
		return nil
	}
	if p.Status.GatewayNode != st.GatewayNode || p.Status.EgressIP != st.EgressIP {
		c.cfg.Log.Info("policy gateway changed", zap.String("policy", p.Name), zap.String("ip", st.EgressIP),
			zap.String("gateway", st.GatewayNode), zap.String("reason", r.ReadyReason))
		ref := &corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "EgressNATPolicy", Name: p.Name, UID: p.UID}
		switch {
		case !r.Accepted:
			c.recorder.Event(ref, corev1.EventTypeWarning, r.AcceptedReason, r.AcceptedMessage)
		case !r.Ready:
			c.recorder.Event(ref, corev1.EventTypeWarning, r.ReadyReason, r.ReadyMessage)
		default:
			c.recorder.Eventf(ref, corev1.EventTypeNormal, "GatewayAssigned", "egress IP %s is held by node %s", st.EgressIP, st.GatewayNode)
		}
	}
	p.Status = *st
	return c.cfg.Clients.UpdatePolicyStatus(ctx, p)
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
	return s
}
