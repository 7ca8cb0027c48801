package agent

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/nft"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"
)

// TestClusterDestinationsExcluded: the state the agent applies excludes
// every cluster-internal destination it can learn: the Nodes' pod CIDRs
// and addresses, the API server's endpoints, the Service CIDRs, and the
// flags; a change of them recomputes the state.
func TestClusterDestinationsExcluded(t *testing.T) {
	n2 := nodeObj(node2, n2IP)
	n2.Spec.PodCIDRs = []string{"10.0.2.0/24"}
	n2.Status.Addresses = append(n2.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "198.51.100.7"})
	objs := slices.DeleteFunc(cluster(), func(o runtime.Object) bool {
		n, ok := o.(*corev1.Node)
		return ok && n.Name == node2
	})
	ta := newTestAgent(t, append(objs, n2)...)
	ctx := context.Background()
	if _, err := ta.core.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "kubernetes", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv4, Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"192.0.2.2"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := ta.core.NetworkingV1().ServiceCIDRs().Create(ctx, &networkingv1.ServiceCIDR{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes"}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: []string{"10.96.0.0/16"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.cfg.PodCIDRs = cidrs("10.200.0.0/16")
	if !ta.refreshClusterNets(context.Background()) {
		t.Fatal("the first listing found nothing")
	}
	ta.synced.Store(true)
	ta.mustSync(t)
	want := cidrs("10.0.2.0/24", "10.96.0.0/16", "10.200.0.0/16", n1IP.String()+"/32", n2IP.String()+"/32", "192.0.2.2/32", "198.51.100.7/32")
	slices.SortFunc(want, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
	if got := ta.lastApplied(t).Excluded; !slices.Equal(got, want) {
		t.Fatalf("excluded %v, want %v", got, want)
	}
	if ta.refreshClusterNets(context.Background()) {
		t.Fatal("an unchanged listing reported a change")
	}
	// The API server cannot be reached: the last listings are kept (an
	// outage must not let selected pods' traffic to a Service be steered).
	down := func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("dial tcp 192.0.2.2:6443: connect: connection refused")
	}
	ta.core.PrependReactor("get", "endpointslices", down)
	ta.core.PrependReactor("list", "servicecidrs", down)
	if ta.refreshClusterNets(context.Background()) {
		t.Fatalf("an unreachable API server changed the cluster networks: %v", ta.nets.get())
	}
	ta.mustSync(t)
	if got := ta.lastApplied(t).Excluded; !slices.Equal(got, want) {
		t.Fatalf("excluded during the outage %v, want %v", got, want)
	}
}

// TestClusterNetsForbidden: an agent that may not list ServiceCIDRs keeps
// working with what it can learn and its flags.
func TestClusterNetsForbidden(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.core.PrependReactor("list", "servicecidrs", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "networking.k8s.io", Resource: "servicecidrs"}, "", nil)
	})
	ta.cfg.ServiceCIDRs = cidrs("10.96.0.0/12")
	ta.refreshClusterNets(context.Background())
	ta.synced.Store(true)
	ta.mustSync(t)
	if got := ta.lastApplied(t).Excluded; !slices.Contains(got, netip.MustParsePrefix("10.96.0.0/12")) {
		t.Fatalf("excluded %v lacks the flag's Service CIDR", got)
	}
}

func cidrs(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// TestUnroutableReported: a policy the dataplane could not give a mark
// gets one OutOfMarks Warning Event while it stays so, and the agent
// publishes the wanted floating IPs something else put on the uplink.
func TestUnroutableReported(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	ta.synced.Store(true)
	ta.dp.result = nft.Result{Unroutable: []string{"pb"}, Foreign: []netip.Addr{netip.MustParseAddr("192.0.2.77")}}
	ta.mustSync(t)
	evs := ta.events()
	if len(evs) != 1 || !strings.Contains(evs[0], "OutOfMarks") {
		t.Fatalf("events %q, want one OutOfMarks", evs)
	}
	if got := *ta.foreign.Load(); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.77")}) {
		t.Fatalf("foreign %v", got)
	}
	ta.reapply.Store(true)
	ta.mustSync(t)
	if evs := ta.events(); len(evs) != 0 {
		t.Fatalf("the same condition reported again: %q", evs)
	}
	ta.dp.result = nft.Result{}
	ta.reapply.Store(true)
	ta.mustSync(t)
	ta.dp.result = nft.Result{Unroutable: []string{"pb"}}
	ta.reapply.Store(true)
	ta.mustSync(t)
	if evs := ta.events(); len(evs) != 1 {
		t.Fatalf("a new occurrence not reported: %q", evs)
	}
}

// TestNodeAddressNeverHeld: a group whose floating IP is this node's own
// address (a typo), with a status that gives it to this node, is not
// applied: the node keeps its address and the policy is not applied;
// the same for a group in a namespace that is not honoured.
func TestNodeAddressNeverHeld(t *testing.T) {
	typo := gatewayObj("gw-typo", n1IP.String(), node1)
	tenant := gatewayObj("gw-tenant", "192.0.2.150", node1)
	tenant.Namespace = "team-a"
	pt := policyObj("pt", "gw-tenant")
	pt.Spec.GatewayRef.Namespace = "team-a"
	ta := newTestAgent(t, append(cluster(), typo, policyObj("ptypo", "gw-typo"), tenant, pt)...)
	ta.synced.Store(true)
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if !slices.Equal(st.FloatingIPs, prefixes(fipA)) {
		t.Fatalf("floating IPs %v, want only %s", st.FloatingIPs, fipA)
	}
	for _, p := range st.Policies {
		if p.Name == "ptypo" || p.Name == "pt" {
			t.Fatalf("policy %s applied: %+v", p.Name, p)
		}
	}
}
