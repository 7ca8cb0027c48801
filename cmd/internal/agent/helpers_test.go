package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube/kubefake"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"
)

// fakeDataplane records what the agent asks of the kernel.
type fakeDataplane struct {
	mu          sync.Mutex
	attempts    int                  // Apply and Cleanup calls, failed or not
	applied     []selector.NodeState // states applied successfully (Cleanup: the empty state)
	failNext    int                  // the next failNext Applies and Cleanups fail
	releases    int                  // ReleaseFloating calls
	released    [][]netip.Addr       // Release calls
	calls       []string             // "apply", "cleanup", "release", "release-all" in order
	rechecks    int
	block       chan struct{} // when set, Apply waits for it to close
	verified    []string      // conntrack checks: "released [ips]", "taken [ips]"
	arpRenewals int           // KeepARP calls
	drift       string        // what Verify reports
	result      nft.Result    // what LastResult reports
}

var errApply = errors.New("netlink: device busy")

func (d *fakeDataplane) Apply(_ context.Context, st selector.NodeState) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if b := d.block; b != nil {
		d.attempts++
		d.mu.Unlock()
		<-b
		d.mu.Lock()
		d.attempts--
	}
	d.attempts++
	d.calls = append(d.calls, "apply")
	if d.failNext > 0 {
		d.failNext--
		return errApply
	}
	d.applied = append(d.applied, st)
	return nil
}

func (d *fakeDataplane) Cleanup(ctx context.Context) error {
	return d.Apply(ctx, selector.NodeState{})
}

func (d *fakeDataplane) ReleaseFloating(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.releases++
	d.calls = append(d.calls, "release-all")
	return nil
}

func (d *fakeDataplane) Release(_ context.Context, ips []netip.Addr) (nft.ReleaseResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.released = append(d.released, slices.Clone(ips))
	d.calls = append(d.calls, "release")
	return nft.ReleaseResult{AddrsRemoved: ips}, nil
}

func (d *fakeDataplane) VerifyReleased(_ context.Context, ips []netip.Addr) (nft.CTVerify, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.verified = append(d.verified, "released "+fmt.Sprint(ips))
	return nft.CTVerify{}, nil
}

func (d *fakeDataplane) VerifyTaken(_ context.Context, ips []netip.Addr) (nft.CTVerify, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.verified = append(d.verified, "taken "+fmt.Sprint(ips))
	return nft.CTVerify{}, nil
}

// verifiedNow returns the conntrack checks so far.
func (d *fakeDataplane) verifiedNow() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.verified)
}

func (d *fakeDataplane) Guard(_ context.Context, internal, dests []netip.Prefix) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, "guard "+fmt.Sprint(internal)+" "+fmt.Sprint(dests))
	return len(internal) > 0, nil
}

func (d *fakeDataplane) KeepARP(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.arpRenewals++
	return nil
}

func (d *fakeDataplane) renewals() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.arpRenewals
}

// checks returns the conntrack checks so far and forgets them.
func (d *fakeDataplane) checks() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := d.verified
	d.verified = nil
	return out
}

// history returns the calls so far and forgets them.
func (d *fakeDataplane) history() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := d.calls
	d.calls = nil
	return out
}

func (d *fakeDataplane) Verify(context.Context) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.drift, nil
}

func (d *fakeDataplane) Dump(context.Context) ([]nft.PolicyCounters, error) { return nil, nil }

func (d *fakeDataplane) Recheck() {
	d.mu.Lock()
	d.rechecks++
	d.mu.Unlock()
}

func (d *fakeDataplane) LastResult() nft.Result {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.result
}

func (d *fakeDataplane) fail(n int) {
	d.mu.Lock()
	d.failNext = n
	d.mu.Unlock()
}

// counts returns the Apply attempts and the successful applies.
func (d *fakeDataplane) counts() (attempts, applied int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.attempts, len(d.applied)
}

func (d *fakeDataplane) releaseCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.releases
}

// last returns the last state applied; ok is false when none was.
func (d *fakeDataplane) last() (selector.NodeState, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.applied) == 0 {
		return selector.NodeState{}, false
	}
	return d.applied[len(d.applied)-1], true
}

// fakeAPI is the API server's /readyz as the fence sees it.
type fakeAPI struct {
	mu     sync.Mutex
	up     bool
	checks int
}

func (f *fakeAPI) readyz(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.checks++
	if !f.up {
		return errors.New("dial tcp 10.96.0.1:443: i/o timeout")
	}
	return nil
}

func (f *fakeAPI) set(up bool) {
	f.mu.Lock()
	f.up = up
	f.mu.Unlock()
}

func (f *fakeAPI) checkCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.checks
}

// eventually: see kubefake.Eventually.
var eventually = kubefake.Eventually

// fakeClients: see kubefake.Clients.
var fakeClients = kubefake.Clients

// unstructuredOf converts a gateway or policy for the dynamic client.
func unstructuredOf(t *testing.T, obj runtime.Object) *unstructured.Unstructured {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(v1.GroupVersion.String())
	switch obj.(type) {
	case *v1.NetworkGatewayGroup:
		u.SetKind("NetworkGatewayGroup")
	case *v1.EgressNATPolicy:
		u.SetKind("EgressNATPolicy")
	default:
		t.Fatalf("not an egressnat object: %T", obj)
	}
	return u
}

// The test cluster: this agent runs on n1; gateway gw-a's IP is held by
// n1, gw-b's by n2; policies pa and pb send pods labelled app=web in
// namespaces labelled team=a through them.
const (
	node1, node2 = "n1", "n2"
	fipA, fipB   = "192.0.2.100", "192.0.2.101"
)

var (
	n1IP   = netip.MustParseAddr("192.0.2.11")
	n2IP   = netip.MustParseAddr("192.0.2.12")
	web1IP = netip.MustParseAddr("10.0.1.1") // on n1
	web2IP = netip.MustParseAddr("10.0.2.1") // on n2
	web3IP = netip.MustParseAddr("10.0.1.2") // on n1, created by the tests
	dests  = netip.MustParsePrefix("203.0.113.0/24")
)

func nodeObj(name string, ip netip.Addr) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip.String()}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}},
	}
}

func namespaceObj(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func podObj(ns, name, node string, ip netip.Addr, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "img"}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String()},
	}
}

func gatewayObj(name string, fip, holder string) *v1.NetworkGatewayGroup {
	g := &v1.NetworkGatewayGroup{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: name, UID: types.UID("uid-" + name)},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: []string{fip}},
	}
	if holder != "" {
		g.Status.FloatingIPs = map[string]string{fip: holder}
	}
	return g
}

func policyObj(name, gateway string) *v1.EgressNATPolicy {
	return &v1.EgressNATPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.EgressNATPolicySpec{
			Sources: []v1.EgressSource{{
				NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"team": "a"}},
				PodSelector:       v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"app": "web"}},
			}},
			Action:       v1.ActionSNAT,
			Destinations: []v1.EgressDestination{{CIDR: dests.String()}},
			GatewayRef:   v1.GatewayRef{Namespace: "kube-system", Name: gateway},
		},
	}
}

var webLabels = map[string]string{"app": "web"}

// cluster returns the test cluster's objects.
func cluster() []runtime.Object {
	return []runtime.Object{
		nodeObj(node1, n1IP), nodeObj(node2, n2IP),
		namespaceObj("app", map[string]string{"team": "a"}),
		podObj("app", "web-1", node1, web1IP, webLabels),
		podObj("app", "web-2", node2, web2IP, webLabels),
		gatewayObj("gw-a", fipA, node1), gatewayObj("gw-b", fipB, node2),
		policyObj("pa", "gw-a"), policyObj("pb", "gw-b"),
	}
}

// probeSecret is the probe key's Secret, as the operator creates it.
func probeSecret() *corev1.Secret {
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "egressnat-system", Name: probe.SecretName},
		Data: map[string][]byte{probe.SecretKey: probeKey}}
}

// testAgent is an agent on a fake clock, a fake dataplane and fake
// clientsets, with caches the test fills instead of informers.
type testAgent struct {
	*agent
	clk  *clocktesting.FakeClock
	dp   *fakeDataplane
	api  *fakeAPI
	rec  *record.FakeRecorder
	core *k8sfake.Clientset
	dyn  *dynamicfake.FakeDynamicClient
}

var epoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func testConfig(t *testing.T, clients *kube.Clients, dp Dataplane) Config {
	return Config{
		Clients: clients, Node: node1, Uplink: "eth0", Subnets: []netip.Prefix{netip.PrefixFrom(n1IP, 24)},
		Namespace: "egressnat-system", LeaseDuration: 30 * time.Second, RenewInterval: 10 * time.Second,
		ResyncPeriod: time.Hour, HealthAddr: "127.0.0.1:0", FenceAfter: time.Second,
		Dataplane: dp, Log: zaptest.NewLogger(t),
	}
}

// newTestAgent builds an agent whose caches and API both hold objs.
func newTestAgent(t *testing.T, objs ...runtime.Object) *testAgent {
	t.Helper()
	clients, core, dyn := fakeClients(t, objs...)
	ta := &testAgent{clk: clocktesting.NewFakeClock(epoch), dp: &fakeDataplane{}, api: &fakeAPI{up: true},
		rec: record.NewFakeRecorder(100), core: core, dyn: dyn}
	ta.agent = newAgent(testConfig(t, clients, ta.dp), ta.clk)
	t.Cleanup(ta.checks.Wait) // background conntrack checks log through t
	ta.recorder = ta.rec
	ta.fence.readyz = ta.api.readyz
	newIndexer := func() cache.Indexer {
		return cache.NewIndexer(cache.DeletionHandlingMetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	}
	ta.pods, ta.namespaces, ta.nodes, ta.gateways, ta.policies = newIndexer(), newIndexer(), newIndexer(), newIndexer(), newIndexer()
	for _, o := range objs {
		ta.cache(t, o)
	}
	return ta
}

// cache puts obj in the agent's cache, as an informer event would (without
// the event).
func (ta *testAgent) cache(t *testing.T, obj runtime.Object) {
	t.Helper()
	var err error
	switch o := obj.(type) {
	case *corev1.Pod:
		err = ta.pods.Update(o)
	case *corev1.Namespace:
		err = ta.namespaces.Update(o)
	case *corev1.Node:
		err = ta.nodes.Update(o)
	case *v1.NetworkGatewayGroup:
		err = ta.gateways.Update(o)
	case *v1.EgressNATPolicy:
		err = ta.policies.Update(o)
	default:
		err = fmt.Errorf("unexpected %T", obj)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// kicked reports whether a sync was asked for since the last call.
func (ta *testAgent) kicked() bool {
	select {
	case <-ta.trigger:
		return true
	default:
		return false
	}
}

// events returns the events recorded since the last call.
func (ta *testAgent) events() []string {
	var out []string
	for {
		select {
		case e := <-ta.rec.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

// mustSync runs one sync and fails the test on an error.
func (ta *testAgent) mustSync(t *testing.T) {
	t.Helper()
	if err := ta.sync(context.Background()); err != nil {
		t.Fatalf("sync: %v", err)
	}
}

// lastApplied returns the last state applied.
func (ta *testAgent) lastApplied(t *testing.T) selector.NodeState {
	t.Helper()
	st, ok := ta.dp.last()
	if !ok {
		t.Fatal("nothing applied")
	}
	return st
}

// policy returns the policy named name in st.
func policy(t *testing.T, st selector.NodeState, name string) selector.PolicyState {
	t.Helper()
	for _, p := range st.Policies {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("policy %s not applied; state %+v", name, st)
	return selector.PolicyState{}
}

func prefixes(ips ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, ip := range ips {
		out = append(out, netip.PrefixFrom(netip.MustParseAddr(ip), 24))
	}
	return out
}

func addrs(ips ...string) []netip.Addr {
	var out []netip.Addr
	for _, ip := range ips {
		out = append(out, netip.MustParseAddr(ip))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// sorted returns a sorted copy.
func sorted(ips []netip.Addr) []netip.Addr {
	out := slices.Clone(ips)
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}
