// Package operator is the egressnat operator's controller: it watches
// gateways, policies, nodes and the agents' liveness leases, assigns every
// floating IP to a node with the pure gateway.Assign, and writes the status
// of gateways and policies. Only the leader runs it.
package operator

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/gateway"
	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// Config of the controller.
type Config struct {
	Clients *kube.Clients
	// AgentNamespace holds the agents' liveness leases.
	AgentNamespace string
	// FallbackToNodeIP: when no node can hold a policy's egress IP, say the
	// traffic falls back to node IPs (agents run with the same flag)
	// instead of being dropped.
	FallbackToNodeIP bool
	Log              *zap.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// Controller reconciles the whole cluster state on every change.
type Controller struct {
	cfg     Config
	trigger chan struct{}

	nodes    cache.Indexer
	leases   cache.Indexer
	gateways cache.Indexer
	policies cache.Indexer
	// assignment remembers the last assignment so that an IP keeps its node
	// between status writes.
	assignment map[netip.Addr]string
}

// Run runs the controller until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Controller{cfg: cfg, trigger: make(chan struct{}, 1)}
	coreF := informers.NewSharedInformerFactory(cfg.Clients.Core, 0)
	leaseF := informers.NewSharedInformerFactoryWithOptions(cfg.Clients.Core, 0, informers.WithNamespace(cfg.AgentNamespace))
	dynF := dynamicinformer.NewDynamicSharedInformerFactory(cfg.Clients.Dynamic, 0)

	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.kick() },
		UpdateFunc: func(any, any) { c.kick() },
		DeleteFunc: func(any) { c.kick() },
	}
	for _, inf := range []cache.SharedIndexInformer{
		coreF.Core().V1().Nodes().Informer(),
		leaseF.Coordination().V1().Leases().Informer(),
		dynF.ForResource(kube.GatewayGVR).Informer(),
		dynF.ForResource(kube.PolicyGVR).Informer(),
	} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("add event handler: %w", err)
		}
	}
	c.nodes = coreF.Core().V1().Nodes().Informer().GetIndexer()
	c.leases = leaseF.Coordination().V1().Leases().Informer().GetIndexer()
	c.gateways = dynF.ForResource(kube.GatewayGVR).Informer().GetIndexer()
	c.policies = dynF.ForResource(kube.PolicyGVR).Informer().GetIndexer()
	coreF.Start(ctx.Done())
	leaseF.Start(ctx.Done())
	dynF.Start(ctx.Done())
	for typ, ok := range coreF.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("sync %v cache", typ)
		}
	}
	leaseF.WaitForCacheSync(ctx.Done())
	for gvr, ok := range dynF.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("sync %s cache (are the CRDs installed?)", gvr.Resource)
		}
	}
	cfg.Log.Info("operator caches synced")

	c.kick()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.trigger:
		case <-timer.C:
		}
		next, err := c.reconcile(ctx)
		if err != nil {
			cfg.Log.Warn("reconcile failed; retrying", zap.Error(err))
			next = 200 * time.Millisecond
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}

func (c *Controller) kick() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// reconcile computes the assignment and writes every status that changed.
// It returns when it wants to run again without an event (the earliest
// lease expiry).
func (c *Controller) reconcile(ctx context.Context) (time.Duration, error) {
	now := c.cfg.Now()
	nodes, next := c.currentNodes(now)
	groups, groupObjs, err := c.currentGroups()
	if err != nil {
		return 0, err
	}
	current := c.currentAssignment(groupObjs)
	assignment := gateway.Assign(groups, nodes, current)
	c.logMoves(current, assignment)
	c.assignment = assignment

	var errs []string
	byKey := make(map[string]gateway.Group, len(groups))
	for i, g := range groups {
		byKey[g.Namespace+"/"+g.Name] = g
		if err := c.writeGatewayStatus(ctx, groupObjs[i], g, nodes, assignment, now); err != nil {
			errs = append(errs, err.Error())
		}
	}
	for _, obj := range c.policies.List() {
		p, err := kube.FromUnstructured[v1.EgressNATPolicy](obj)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		if err := c.writePolicyStatus(ctx, p, byKey, assignment, now); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return 0, fmt.Errorf("write status: %s", strings.Join(errs, "; "))
	}
	return next, nil
}

// currentNodes turns Nodes and agent leases into gateway.Nodes, and returns
// the time until the earliest lease expires.
func (c *Controller) currentNodes(now time.Time) ([]gateway.Node, time.Duration) {
	next := 30 * time.Second
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
			if lease.Spec.RenewTime != nil && lease.Spec.LeaseDurationSeconds != nil {
				l.HasLease = true
				l.LeaseRenew = lease.Spec.RenewTime.Time
				l.LeaseDuration = time.Duration(*lease.Spec.LeaseDurationSeconds) * time.Second
				if left := l.LeaseRenew.Add(l.LeaseDuration).Sub(now); left > 0 && left < next {
					next = left + 10*time.Millisecond
				}
			}
			if subnets, err := kube.ParseSubnets(lease.Annotations[kube.AnnotationSubnets]); err == nil {
				gn.Subnets = subnets
			} else {
				c.cfg.Log.Warn("bad uplink-subnets annotation", zap.String("node", n.Name), zap.Error(err))
			}
		}
		gn.Up = gateway.Up(l, now)
		out = append(out, gn)
	}
	slices.SortFunc(out, func(a, b gateway.Node) int { return strings.Compare(a.Name, b.Name) })
	return out, next
}

func (c *Controller) currentGroups() ([]gateway.Group, []*v1.NetworkGatewayGroup, error) {
	var objs []*v1.NetworkGatewayGroup
	for _, obj := range c.gateways.List() {
		g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](obj)
		if err != nil {
			return nil, nil, err
		}
		objs = append(objs, g)
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
	return groups, objs, nil
}

// currentAssignment is what the statuses say, overlaid with what this
// leader decided last (its own writes may not be in the cache yet).
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

func (c *Controller) logMoves(before, after map[netip.Addr]string) {
	for ip, node := range after {
		if prev := before[ip]; prev != node {
			c.cfg.Log.Info("floating IP assigned", zap.String("ip", ip.String()), zap.String("node", node), zap.String("from", prev))
		}
	}
	for ip, node := range before {
		if _, ok := after[ip]; !ok && node != "" {
			c.cfg.Log.Warn("floating IP has no node", zap.String("ip", ip.String()), zap.String("from", node))
		}
	}
}

func (c *Controller) writeGatewayStatus(ctx context.Context, obj *v1.NetworkGatewayGroup, g gateway.Group, nodes []gateway.Node, assignment map[netip.Addr]string, now time.Time) error {
	st := obj.Status.DeepCopy()
	st.Nodes, st.FloatingIPs, st.AssignedCount = gateway.GroupStatus(g, nodes, assignment)
	st.ObservedGeneration = obj.Generation
	cond := metav1.Condition{Type: "Ready", Status: metav1.ConditionTrue, Reason: "AllAssigned",
		Message: fmt.Sprintf("all %d floating IPs are held by Up nodes", len(g.FloatingIPs)), ObservedGeneration: obj.Generation}
	if missing := unassigned(g, assignment); len(missing) > 0 {
		cond.Status, cond.Reason = metav1.ConditionFalse, "Unassigned"
		cond.Message = fmt.Sprintf("%d of %d floating IPs have no Up node in their subnet: %s", len(missing), len(g.FloatingIPs), strings.Join(missing, ", "))
	}
	setCondition(&st.Conditions, cond, now)
	if reflect.DeepEqual(normalize(*st), normalize(obj.Status)) {
		return nil
	}
	obj.Status = *st
	return c.cfg.Clients.UpdateGatewayStatus(ctx, obj)
}

func (c *Controller) writePolicyStatus(ctx context.Context, p *v1.EgressNATPolicy, groups map[string]gateway.Group, assignment map[netip.Addr]string, now time.Time) error {
	r := gateway.ResolvePolicy(p.Spec.GatewayRef, groups, assignment, c.cfg.FallbackToNodeIP)
	st := p.Status.DeepCopy()
	st.ObservedGeneration = p.Generation
	st.EgressIP, st.GatewayNode = "", r.Node
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
