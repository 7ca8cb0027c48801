package operator

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube/kubefake"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"go.uber.org/zap/zaptest"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"
)

const agentNamespace = "egressnat-system"

var epoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// eventually: see kubefake.Eventually.
var eventually = kubefake.Eventually

// cluster is a fake API server: client-go's fake clientsets.
type cluster struct {
	clients *kube.Clients
	core    *k8sfake.Clientset
	dyn     *dynamicfake.FakeDynamicClient
	clk     *clocktesting.FakeClock
}

func newCluster(t *testing.T, objs ...runtime.Object) *cluster {
	t.Helper()
	clients, cs, dyn := kubefake.Clients(t, objs...)
	return &cluster{clients: clients, core: cs, dyn: dyn, clk: clocktesting.NewFakeClock(epoch)}
}

// The test cluster: n1 and n2 run agents in 192.0.2.0/24; n3 has no agent
// (no lease). Gateway gw has two floating IPs; policy p1 uses gw, p2 a
// gateway that does not exist.
const (
	fip1, fip2 = "192.0.2.100", "192.0.2.101"
	gwGen      = 3
)

func nodeObj(name, ip string, ready corev1.ConditionStatus) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: ready}}},
	}
}

func leaseObj(node, subnets string) *coordinationv1.Lease {
	return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: agentNamespace, Name: kube.AgentLeasePrefix + node,
		Annotations: map[string]string{kube.AnnotationSubnets: subnets}}}
}

func gatewayObj(name string, fips ...string) *v1.NetworkGatewayGroup {
	return &v1.NetworkGatewayGroup{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: name, UID: types.UID("uid-" + name), Generation: gwGen},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: fips},
	}
}

func policyObj(name, gateway string) *v1.EgressNATPolicy {
	return &v1.EgressNATPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 2},
		Spec: v1.EgressNATPolicySpec{
			Sources:      []v1.EgressSource{{}},
			Action:       v1.ActionSNAT,
			Destinations: []v1.EgressDestination{{CIDR: "203.0.113.0/24"}},
			GatewayRef:   v1.GatewayRef{Namespace: "kube-system", Name: gateway},
		},
	}
}

func objects() []runtime.Object {
	return []runtime.Object{
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		nodeObj("n3", "192.0.2.13", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), leaseObj("n2", "192.0.2.12/24"),
		gatewayObj("gw", fip1, fip2),
		policyObj("p1", "gw"), policyObj("p2", "missing"),
	}
}

// testController is a controller on the cluster's fake clock, with its
// informers running and synced, and its events recorded.
type testController struct {
	*Controller
	rec *record.FakeRecorder
}

func (cl *cluster) controller(t *testing.T, fallback bool) *testController {
	t.Helper()
	return cl.controllerWith(t, func(cfg *Config) { cfg.FallbackToNodeIP = fallback })
}

// controllerWith is controller with the configuration changed by configure.
func (cl *cluster) controllerWith(t *testing.T, configure func(*Config)) *testController {
	t.Helper()
	cfg := Config{Clients: cl.clients, AgentNamespace: agentNamespace, Log: zaptest.NewLogger(t)}
	configure(&cfg)
	c, err := newController(cfg, cl.clk)
	if err != nil {
		t.Fatal(err)
	}
	tc := &testController{Controller: c, rec: record.NewFakeRecorder(100)}
	c.recorder = tc.rec
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	kube.RunInformers(ctx, c.infs...)
	if !kube.WaitForSync(ctx, c.infs...) {
		t.Fatal("caches did not sync")
	}
	return tc
}

// setHealth sets what the controller's prober knows of a node (the prober
// itself does not run in the tests).
func (c *testController) setHealth(node string, healthy bool, lastAlive time.Time) {
	c.prober.mu.Lock()
	defer c.prober.mu.Unlock()
	c.prober.nodes[node] = &probeState{known: true, healthy: healthy, lastAlive: lastAlive}
}

// events returns the events recorded since the last call.
func (c *testController) events() []string {
	var out []string
	for {
		select {
		case e := <-c.rec.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

// remembered returns what the controller remembers of ip's node.
func (c *testController) remembered(ip string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.assignment == nil {
		return "", false
	}
	n, ok := c.assignment[netip.MustParseAddr(ip)]
	return n, ok
}

func (c *testController) mustReconcile(t *testing.T) {
	t.Helper()
	if err := c.reconcile(context.Background()); err != nil {
		t.Fatalf("reconcile: %v", err)
	}
}

// waitCaches waits until the controller's caches hold what the API holds.
func (c *testController) waitCaches(t *testing.T, cl *cluster) {
	t.Helper()
	eventually(t, "the caches to catch up with the API", func() bool { return c.cachesCurrent(t, cl) == nil })
}

func (c *testController) cachesCurrent(t *testing.T, cl *cluster) error {
	ctx := context.Background()
	want := map[string]any{}
	nodes, err := cl.core.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range nodes.Items {
		want["node/"+nodes.Items[i].Name] = &nodes.Items[i]
	}
	gws, err := cl.dyn.Resource(kube.GatewayGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range gws.Items {
		g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](&gws.Items[i])
		if err != nil {
			t.Fatal(err)
		}
		want["gateway/"+g.Namespace+"/"+g.Name] = g
	}
	pols, err := cl.dyn.Resource(kube.PolicyGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pols.Items {
		p, err := kube.FromUnstructured[v1.EgressNATPolicy](&pols.Items[i])
		if err != nil {
			t.Fatal(err)
		}
		want["policy/"+p.Name] = p
	}

	leases, err := cl.core.CoordinationV1().Leases(agentNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range leases.Items {
		want["lease/"+leases.Items[i].Name] = &leases.Items[i]
	}

	have := map[string]any{}
	for _, o := range c.leases.List() {
		if l := o.(*coordinationv1.Lease); l.Namespace == agentNamespace {
			have["lease/"+l.Name] = o
		}
	}
	for _, o := range c.nodes.List() {
		have["node/"+o.(*corev1.Node).Name] = o
	}
	for _, o := range c.gateways.List() {
		g := o.(*v1.NetworkGatewayGroup)
		have["gateway/"+g.Namespace+"/"+g.Name] = o
	}
	for _, o := range c.policies.List() {
		have["policy/"+o.(*v1.EgressNATPolicy).Name] = o
	}
	if len(have) != len(want) {
		return fmt.Errorf("cache holds %d objects, the API %d", len(have), len(want))
	}
	for k, w := range want {
		if !reflect.DeepEqual(have[k], w) {
			return fmt.Errorf("%s differs", k)
		}
	}
	return nil
}

func (cl *cluster) gateway(t *testing.T, name string) *v1.NetworkGatewayGroup {
	t.Helper()
	u, err := cl.dyn.Resource(kube.GatewayGVR).Namespace("kube-system").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func (cl *cluster) policy(t *testing.T, name string) *v1.EgressNATPolicy {
	t.Helper()
	u, err := cl.dyn.Resource(kube.PolicyGVR).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := kube.FromUnstructured[v1.EgressNATPolicy](u)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// statusWrites counts the status updates of resource (any when empty)
// sent to the API so far.
func (cl *cluster) statusWrites(resource string) int {
	n := 0
	for _, a := range cl.dyn.Actions() {
		if a.GetVerb() == "update" && a.GetSubresource() == "status" && (resource == "" || a.GetResource().Resource == resource) {
			n++
		}
	}
	return n
}

// conflictOnce makes the next status update of a gateway fail with 409
// Conflict; the returned function reports how many were refused.
func (cl *cluster) conflictOnce() func() int {
	var mu sync.Mutex
	refused := 0
	cl.dyn.PrependReactor("update", "networkgatewaygroups", func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if a.GetSubresource() != "status" || refused > 0 {
			return false, nil, nil
		}
		refused++
		return true, nil, apierrors.NewConflict(kube.GatewayGVR.GroupResource(), "gw", errors.New("the object has been modified"))
	})
	return func() int { mu.Lock(); defer mu.Unlock(); return refused }
}

// optimisticConcurrency makes gateway updates behave as on an API server:
// every write gets a new resourceVersion, and a write carrying another
// resourceVersion than the stored one (written from a stale cache) fails
// with 409 Conflict.
func (cl *cluster) optimisticConcurrency(t *testing.T) {
	var mu sync.Mutex
	version := 100
	tracker := cl.dyn.Tracker()
	cl.dyn.PrependReactor("update", "networkgatewaygroups", func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		u := a.(k8stesting.UpdateAction).GetObject().(*unstructured.Unstructured).DeepCopy()
		cur, err := tracker.Get(kube.GatewayGVR, u.GetNamespace(), u.GetName())
		if err != nil {
			return true, nil, err
		}
		if rv := cur.(*unstructured.Unstructured).GetResourceVersion(); rv != u.GetResourceVersion() {
			return true, nil, apierrors.NewConflict(kube.GatewayGVR.GroupResource(), u.GetName(),
				fmt.Errorf("resourceVersion %q, stored %q", u.GetResourceVersion(), rv))
		}
		version++
		u.SetResourceVersion(strconv.Itoa(version))
		if err := tracker.Update(kube.GatewayGVR, u, u.GetNamespace()); err != nil {
			t.Errorf("tracker update: %v", err)
			return true, nil, err
		}
		return true, u, nil
	})
}
