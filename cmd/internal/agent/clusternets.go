package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Cluster-internal destinations are never steered (see
// selector.NodeState.Excluded). The Nodes give pod CIDRs and node
// addresses; flags add CIDRs the API does not know; the API server's own
// addresses (EndpointSlices of default/kubernetes) and the Service CIDRs
// (ServiceCIDR objects, served from Kubernetes 1.33) are listed by
// clusterNets.

// nodePodCIDRs returns a Node's pod CIDRs (spec.podCIDRs and podCIDR).
func nodePodCIDRs(n *corev1.Node) []netip.Prefix {
	var out []netip.Prefix
	for _, c := range append(slices.Clone(n.Spec.PodCIDRs), n.Spec.PodCIDR) {
		if p, err := netip.ParsePrefix(c); err == nil {
			out = append(out, p.Masked())
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return slices.Compact(out)
}

// nodeNetworks returns a Node's pod CIDRs and its addresses as /32s.
func nodeNetworks(n *corev1.Node) []netip.Prefix {
	out := nodePodCIDRs(n)
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			out = append(out, netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()))
		}
	}
	return out
}

// clusterNets keeps the cluster-internal destinations read from the API
// beyond the Nodes, re-listed every period.
type clusterNets struct {
	mu     sync.Mutex
	nets   []netip.Prefix
	failed map[string]bool // what could not be listed, logged once
	// last: what each listing last returned, kept while a listing fails
	// for want of the API server (an outage must not make the agent
	// steer traffic to the Service CIDRs or the API server).
	last map[string][]netip.Prefix
}

func (c *clusterNets) get() []netip.Prefix {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nets
}

// refresh lists the API server's endpoints and the Service CIDRs and
// reports whether they changed. What cannot be listed (an API server
// without ServiceCIDRs, RBAC) is logged once and left out; the flags
// --service-cidrs and --pod-cidrs cover it.
func (a *agent) refreshClusterNets(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	const epsWhat, cidrsWhat = "the API server's EndpointSlice (default/kubernetes)", "ServiceCIDRs"
	var fromEPs, fromCIDRs []netip.Prefix
	// The API server's EndpointSlice reconciler names its slice after the
	// Service: one get, which RBAC can allow by name.
	eps, epsErr := a.cfg.Clients.Core.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if epsErr != nil {
		if !apierrors.IsNotFound(epsErr) {
			a.logListFailure(epsWhat, epsErr)
		}
	} else {
		for _, e := range eps.Endpoints {
			for _, addr := range e.Addresses {
				if ip, err := netip.ParseAddr(addr); err == nil {
					fromEPs = append(fromEPs, netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()))
				}
			}
		}
	}
	cidrs, cidrsErr := a.cfg.Clients.Core.NetworkingV1().ServiceCIDRs().List(ctx, metav1.ListOptions{})
	if cidrsErr != nil {
		a.logListFailure(cidrsWhat, cidrsErr)
	} else {
		for _, sc := range cidrs.Items {
			for _, c := range sc.Spec.CIDRs {
				if p, err := netip.ParsePrefix(c); err == nil {
					fromCIDRs = append(fromCIDRs, p.Masked())
				}
			}
		}
	}
	a.nets.mu.Lock()
	defer a.nets.mu.Unlock()
	if a.nets.last == nil {
		a.nets.last = map[string][]netip.Prefix{}
	}
	// A listing the API server answered replaces the last one (also with
	// nothing: NotFound, Forbidden); one that could not reach it keeps it.
	keep := func(what string, nets []netip.Prefix, err error) {
		if err == nil || apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
			a.nets.last[what] = nets
		}
	}
	keep(epsWhat, fromEPs, epsErr)
	keep(cidrsWhat, fromCIDRs, cidrsErr)
	nets := slices.Concat(a.nets.last[epsWhat], a.nets.last[cidrsWhat])
	sortPrefixes(nets)
	if slices.Equal(a.nets.nets, nets) {
		return false
	}
	a.nets.nets = nets
	return true
}

// logListFailure logs, once per kind, what could not be listed.
func (a *agent) logListFailure(what string, err error) {
	a.nets.mu.Lock()
	seen := a.nets.failed[what]
	if a.nets.failed == nil {
		a.nets.failed = map[string]bool{}
	}
	a.nets.failed[what] = true
	a.nets.mu.Unlock()
	if seen {
		return
	}
	hint := ""
	if apierrors.IsForbidden(err) || apierrors.IsNotFound(err) {
		hint = "; name them with --service-cidrs and --pod-cidrs"
	}
	a.log.Warn(fmt.Sprintf("cannot list %s: cluster-internal destinations from it are not excluded%s", what, hint), zap.Error(err))
}

// watchClusterNets re-lists the cluster networks every period until ctx
// ends; a change asks for a recomputation.
func (a *agent) watchClusterNets(ctx context.Context) {
	a.every(ctx, a.cfg.ResyncPeriod, func() {
		if a.refreshClusterNets(ctx) {
			a.log.Info("cluster-internal destinations changed", zap.Int("count", len(a.nets.get())))
			a.recompute()
		}
	})
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(x, y netip.Prefix) int {
		if c := x.Addr().Compare(y.Addr()); c != 0 {
			return c
		}
		return x.Bits() - y.Bits()
	})
}
