package deploy

import (
	"encoding/base64"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	coordinationv1client "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
)

// saClients mints a token for a manifests' ServiceAccount with
// cluster.ServiceAccountKubeconfig and returns the clients the binaries
// would build from that kubeconfig.
func saClients(t *testing.T, sa string) *clients {
	t.Helper()
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), sa+".kubeconfig")
	if err := cluster.ServiceAccountKubeconfig(ctxT(t), admin, srv.URL, systemNS, sa, path); err != nil {
		t.Fatal(err)
	}
	return newClients(t, path)
}

// fixtures creates, as admin, a node, a gateway, a policy and Secrets.
func fixtures(t *testing.T) (gw, pol *unstructured.Unstructured) {
	t.Helper()
	ctx := ctxT(t)
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	apply := func(yaml string) {
		t.Helper()
		if out, errOut, err := srv.Kubectl(ctx, strings.NewReader(yaml), "apply", "-f", "-"); err != nil {
			t.Fatalf("apply: %v\n%s%s", err, out, errOut)
		}
	}
	apply(`apiVersion: networking.gke.io/v1
kind: NetworkGatewayGroup
metadata: {namespace: kube-system, name: rbac-gw}
spec: {floatingIPs: [192.0.2.100]}
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata: {name: rbac-policy}
spec:
  sources: [{namespaceSelector: {}, podSelector: {}}]
  action: SNAT
  destinations: [{cidr: 203.0.113.0/24}]
  gatewayRef: {name: rbac-gw, namespace: kube-system}
---
apiVersion: v1
kind: Secret
metadata: {namespace: egressnat-system, name: rbac-secret}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Secret
metadata: {namespace: kube-system, name: rbac-secret}
stringData: {password: hunter2}
`)
	if _, err := admin.CoreV1().Nodes().Get(ctx, "rbac-node", metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "rbac-node"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c := newClients(t, srv.Kubeconfig)
	if gw, err = c.Dynamic.Resource(gatewayGVR).Namespace("kube-system").Get(ctx, "rbac-gw", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	if pol, err = c.Dynamic.Resource(policyGVR).Get(ctx, "rbac-policy", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	return gw, pol
}

func allowed(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Errorf("%s: want allowed, got %v", what, err)
	}
}

func forbidden(t *testing.T, what string, err error) {
	t.Helper()
	if !apierrors.IsForbidden(err) {
		t.Errorf("%s: want Forbidden, got %v", what, err)
	}
}

func withStatus(u *unstructured.Unstructured, node string) *unstructured.Unstructured {
	u = u.DeepCopy()
	u.Object["status"] = map[string]any{"gatewayNode": node, "floatingIPs": map[string]any{"192.0.2.100": node}}
	return u
}

func lease(name, holder string) *coordinationv1.Lease {
	now := metav1.NewMicroTime(time.Now())
	return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: systemNS},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(holder), LeaseDurationSeconds: ptr.To(int32(90)), RenewTime: &now}}
}

func event(ns string) *corev1.Event {
	return &corev1.Event{ObjectMeta: metav1.ObjectMeta{GenerateName: "egressnat-", Namespace: ns},
		InvolvedObject: corev1.ObjectReference{Kind: "NetworkGatewayGroup", Namespace: ns, Name: "rbac-gw", APIVersion: "networking.gke.io/v1"},
		Reason:         "Test", Message: "rbac test", Type: corev1.EventTypeNormal, Source: corev1.EventSource{Component: "egressnat-test"}}
}

// TestAgentRBAC: with a token of the manifests' egressnat-agent
// ServiceAccount, the agent reads what it watches and keeps its Lease, and
// is refused status writes, spec writes, Secrets and other Leases.
func TestAgentRBAC(t *testing.T) {
	gw, pol := fixtures(t)
	c := saClients(t, "egressnat-agent")
	ctx := ctxT(t)
	all := metav1.ListOptions{}

	_, err := c.Core.CoreV1().Pods("").List(ctx, all)
	allowed(t, "list pods", err)
	w, err := c.Core.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{TimeoutSeconds: ptr.To(int64(1))})
	allowed(t, "watch pods", err)
	if w != nil {
		w.Stop()
	}
	_, err = c.Core.CoreV1().Namespaces().List(ctx, all)
	allowed(t, "list namespaces", err)
	_, err = c.Core.CoreV1().Nodes().Get(ctx, "rbac-node", metav1.GetOptions{})
	allowed(t, "get node", err)
	_, err = c.Dynamic.Resource(gatewayGVR).List(ctx, all)
	allowed(t, "list gateways", err)
	_, err = c.Dynamic.Resource(policyGVR).List(ctx, all)
	allowed(t, "list policies", err)
	// Cluster-internal destinations: the Service CIDRs, and the API
	// server's own EndpointSlice, that one only.
	_, err = c.Core.NetworkingV1().ServiceCIDRs().List(ctx, all)
	allowed(t, "list servicecidrs", err)
	_, err = c.Core.DiscoveryV1().EndpointSlices("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) { // the lab's API server keeps no endpoints
		allowed(t, "get the kubernetes EndpointSlice", err)
	}
	_, err = c.Core.DiscoveryV1().EndpointSlices("default").Get(ctx, "other", metav1.GetOptions{})
	forbidden(t, "get another EndpointSlice", err)
	_, err = c.Core.DiscoveryV1().EndpointSlices("default").List(ctx, all)
	forbidden(t, "list EndpointSlices", err)
	// To tell an uninstall: its own DaemonSet and namespace, by name (as
	// its watches ask: a field selector on the name), nothing else.
	byName := func(name string) metav1.ListOptions {
		return metav1.ListOptions{FieldSelector: "metadata.name=" + name, TimeoutSeconds: ptr.To(int64(1))}
	}
	daemonSets := c.Core.AppsV1().DaemonSets(systemNS)
	_, err = daemonSets.Get(ctx, "egressnat-agent", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) { // applied without the workloads
		allowed(t, "get its DaemonSet", err)
	}
	_, err = daemonSets.List(ctx, byName("egressnat-agent"))
	allowed(t, "list its DaemonSet by name", err)
	if w, err := daemonSets.Watch(ctx, byName("egressnat-agent")); err != nil {
		allowed(t, "watch its DaemonSet by name", err)
	} else {
		w.Stop()
	}
	_, err = daemonSets.List(ctx, all)
	forbidden(t, "list DaemonSets", err)
	_, err = daemonSets.Get(ctx, "other", metav1.GetOptions{})
	forbidden(t, "get another DaemonSet", err)
	_, err = c.Core.AppsV1().DaemonSets("kube-system").List(ctx, byName("egressnat-agent"))
	forbidden(t, "list a DaemonSet of that name in kube-system", err)
	_, err = c.Core.CoreV1().Namespaces().Get(ctx, systemNS, metav1.GetOptions{})
	allowed(t, "get its namespace", err)
	if w, err := c.Core.CoreV1().Namespaces().Watch(ctx, byName(systemNS)); err != nil {
		allowed(t, "watch its namespace by name", err)
	} else {
		w.Stop()
	}

	leases := c.Core.CoordinationV1().Leases(systemNS)
	l, err := leases.Create(ctx, lease("egressnat-agent-rbac-node", "rbac-node"), metav1.CreateOptions{})
	allowed(t, "create own lease", err)
	if err == nil {
		l, err = leases.Get(ctx, l.Name, metav1.GetOptions{})
		allowed(t, "get own lease", err)
		l.Spec.RenewTime = ptr.To(metav1.NewMicroTime(time.Now()))
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		allowed(t, "update own lease", err)
		forbidden(t, "delete lease", leases.Delete(ctx, l.Name, metav1.DeleteOptions{}))
	}
	_, err = leases.List(ctx, all)
	forbidden(t, "list leases", err)
	_, err = c.Core.CoordinationV1().Leases("kube-system").Create(ctx, lease("x", "y"), metav1.CreateOptions{})
	forbidden(t, "create lease in kube-system", err)
	// The operators' leader Lease and any Lease not named
	// egressnat-agent-*: refused by the admission policy, even with this
	// token that is bound to no pod (and so names no node).
	agentCannotLead(t, leases)
	_, err = leases.Create(ctx, lease("some-other-lease", "rbac-node"), metav1.CreateOptions{})
	refusedByPolicy(t, "create a lease not named egressnat-agent-*", err, "not egressnat-system/some-other-lease")
	_, err = c.Core.CoreV1().Events("kube-system").Create(ctx, event("kube-system"), metav1.CreateOptions{})
	allowed(t, "create event", err)

	// Only the operator writes status.
	_, err = c.Dynamic.Resource(gatewayGVR).Namespace("kube-system").UpdateStatus(ctx, withStatus(gw, "rbac-node"), metav1.UpdateOptions{})
	forbidden(t, "update gateway status", err)
	_, err = c.Dynamic.Resource(policyGVR).UpdateStatus(ctx, withStatus(pol, "rbac-node"), metav1.UpdateOptions{})
	forbidden(t, "update policy status", err)
	_, err = c.Dynamic.Resource(gatewayGVR).Namespace("kube-system").Update(ctx, gw, metav1.UpdateOptions{})
	forbidden(t, "update gateway spec", err)
	forbidden(t, "delete policy", c.Dynamic.Resource(policyGVR).Delete(ctx, pol.GetName(), metav1.DeleteOptions{}))
	// The agent reads the probe key, no other Secret, and cannot write it.
	probeKey := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "egressnat-probe-key", Namespace: systemNS},
		Data: map[string][]byte{"key": []byte("0123456789abcdef0123456789abcdef")}}
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Secrets(systemNS).Create(ctx, probeKey, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	_, err = c.Core.CoreV1().Secrets(systemNS).Get(ctx, "egressnat-probe-key", metav1.GetOptions{})
	allowed(t, "get the probe key", err)
	_, err = c.Core.CoreV1().Secrets(systemNS).Update(ctx, probeKey, metav1.UpdateOptions{})
	forbidden(t, "update the probe key", err)
	_, err = c.Core.CoreV1().Secrets(systemNS).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "agent-made", Namespace: systemNS}}, metav1.CreateOptions{})
	forbidden(t, "create a secret", err)
	_, err = c.Core.CoreV1().Secrets(systemNS).Get(ctx, "rbac-secret", metav1.GetOptions{})
	forbidden(t, "get secret in egressnat-system", err)
	_, err = c.Core.CoreV1().Secrets("kube-system").List(ctx, all)
	forbidden(t, "list secrets", err)
	_, err = c.Core.CoreV1().Pods("default").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, metav1.CreateOptions{})
	forbidden(t, "create pod", err)
	_, err = c.Core.CoreV1().ServiceAccounts(systemNS).CreateToken(ctx, "egressnat-agent", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	forbidden(t, "mint a token", err)
}

// refusedByPolicy: err is the admission policy's Forbidden with want in its
// message.
func refusedByPolicy(t *testing.T, what string, err error, want string) {
	t.Helper()
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: want Forbidden with %q, got %v", what, want, err)
	}
}

// agentCannotLead: with the agent's leases client, creating the operators'
// leader Lease, and renewing or taking it over once an operator holds it,
// are all refused; the Lease is left as the operator wrote it, and removed
// afterwards (TestOperatorRBAC creates it).
func agentCannotLead(t *testing.T, leases coordinationv1client.LeaseInterface) {
	t.Helper()
	ctx := ctxT(t)
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	adminLeases := admin.CoordinationV1().Leases(systemNS)
	remove := func() {
		if err := adminLeases.Delete(ctx, "egressnat-operator", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	remove()
	t.Cleanup(remove)
	const msg = "not egressnat-system/egressnat-operator (the operators' leader Lease)"
	_, err = leases.Create(ctx, lease("egressnat-operator", "agent"), metav1.CreateOptions{})
	refusedByPolicy(t, "agent creates the leader lease", err, msg)

	held, err := adminLeases.Create(ctx, lease("egressnat-operator", "operator-0"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := leases.Get(ctx, "egressnat-operator", metav1.GetOptions{})
	allowed(t, "agent reads the leader lease", err)
	if err != nil {
		l = held
	}
	takeover := l.DeepCopy()
	takeover.Spec.HolderIdentity = ptr.To("agent")
	takeover.Spec.LeaseTransitions = ptr.To(int32(1))
	_, err = leases.Update(ctx, takeover, metav1.UpdateOptions{})
	refusedByPolicy(t, "agent takes over the leader lease", err, msg)
	renew := l.DeepCopy()
	renew.Spec.RenewTime = ptr.To(metav1.NewMicroTime(time.Now().Add(time.Hour)))
	_, err = leases.Update(ctx, renew, metav1.UpdateOptions{})
	refusedByPolicy(t, "agent renews the leader lease", err, msg)
	forbidden(t, "agent deletes the leader lease", leases.Delete(ctx, "egressnat-operator", metav1.DeleteOptions{}))

	after, err := adminLeases.Get(ctx, "egressnat-operator", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if after.Spec.HolderIdentity == nil || *after.Spec.HolderIdentity != "operator-0" || after.ResourceVersion != held.ResourceVersion {
		t.Errorf("the leader lease changed under the agent's writes: holder %v, resourceVersion %s (was %s)",
			after.Spec.HolderIdentity, after.ResourceVersion, held.ResourceVersion)
	}
}

// TestOperatorRBAC: with a token of egressnat-operator, the operator
// writes gateway and policy status, keeps the leader Lease and reads the
// agents' Leases, and is refused spec writes, agents' Leases and Secrets.
func TestOperatorRBAC(t *testing.T) {
	gw, pol := fixtures(t)
	c := saClients(t, "egressnat-operator")
	ctx := ctxT(t)
	all := metav1.ListOptions{}

	_, err := c.Core.CoreV1().Nodes().List(ctx, all)
	allowed(t, "list nodes", err)
	_, err = c.Dynamic.Resource(gatewayGVR).List(ctx, all)
	allowed(t, "list gateways", err)
	_, err = c.Dynamic.Resource(policyGVR).List(ctx, all)
	allowed(t, "list policies", err)
	_, err = c.Dynamic.Resource(gatewayGVR).Namespace("kube-system").UpdateStatus(ctx, withStatus(gw, "n1"), metav1.UpdateOptions{})
	allowed(t, "update gateway status", err)
	_, err = c.Dynamic.Resource(policyGVR).UpdateStatus(ctx, withStatus(pol, "n1"), metav1.UpdateOptions{})
	allowed(t, "update policy status", err)
	_, err = c.Dynamic.Resource(gatewayGVR).Namespace("kube-system").Update(ctx, gw, metav1.UpdateOptions{})
	forbidden(t, "update gateway spec", err)

	leases := c.Core.CoordinationV1().Leases(systemNS)
	_, err = leases.List(ctx, all)
	allowed(t, "list leases", err)
	l, err := leases.Create(ctx, lease("egressnat-operator", "operator-0"), metav1.CreateOptions{})
	allowed(t, "create leader lease", err)
	if err == nil {
		l.Spec.HolderIdentity = ptr.To("operator-1")
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		allowed(t, "update leader lease", err)
	}
	// An agent's Lease (created by admin): the operator reads it only.
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoordinationV1().Leases(systemNS).Create(ctx, lease("egressnat-agent-op-test", "op-test"), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	al, err := leases.Get(ctx, "egressnat-agent-op-test", metav1.GetOptions{})
	allowed(t, "get agent lease", err)
	if err == nil {
		_, err = leases.Update(ctx, al, metav1.UpdateOptions{})
		forbidden(t, "update agent lease", err)
	}
	_, err = c.Core.CoreV1().Events("kube-system").Create(ctx, event("kube-system"), metav1.CreateOptions{})
	allowed(t, "create event", err)
	// The probe key: created when missing, read by name; no other Secret.
	_, err = c.Core.CoreV1().Secrets(systemNS).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "egressnat-probe-key", Namespace: systemNS},
		Data: map[string][]byte{"key": []byte("0123456789abcdef0123456789abcdef")}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		allowed(t, "create the probe key", err)
	}
	_, err = c.Core.CoreV1().Secrets(systemNS).Get(ctx, "egressnat-probe-key", metav1.GetOptions{})
	allowed(t, "get the probe key", err)
	_, err = c.Core.CoreV1().Secrets("kube-system").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "op-made", Namespace: "kube-system"}}, metav1.CreateOptions{})
	forbidden(t, "create a secret in kube-system", err)
	_, err = c.Core.CoreV1().Secrets(systemNS).Get(ctx, "rbac-secret", metav1.GetOptions{})
	forbidden(t, "get secret", err)
	_, err = c.Core.CoreV1().Secrets("").List(ctx, all)
	forbidden(t, "list secrets", err)
	_, err = c.Core.CoreV1().Pods("").List(ctx, all)
	forbidden(t, "list pods", err)
}

// TestAgentOnlyOwnLease: the ValidatingAdmissionPolicy lets an agent whose
// token is bound to its pod (so it names the pod's node) write only
// egressnat-agent-<its node>, which RBAC alone cannot express.
func TestAgentOnlyOwnLease(t *testing.T) {
	ctx := ctxT(t)
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"vap-a", "vap-b"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	pod, err := admin.CoreV1().Pods(systemNS).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "egressnat-agent-vap"},
		Spec: corev1.PodSpec{NodeName: "vap-a", ServiceAccountName: "egressnat-agent", AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{{Name: "agent", Image: "registry.k8s.io/pause:3.10"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	token, err := cluster.MintToken(ctx, admin, systemNS, "egressnat-agent", time.Hour, &authenticationv1.BoundObjectReference{
		Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
	if err != nil {
		t.Fatal(err)
	}
	if node := tokenNode(t, token); node != "vap-a" {
		t.Fatalf("the pod-bound token names node %q, want vap-a (ServiceAccountTokenPodNodeInfo)", node)
	}
	cfg := srv.Config()
	cfg.BearerToken = token
	agent, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	leases := agent.CoordinationV1().Leases(systemNS)
	own, err := leases.Create(ctx, lease("egressnat-agent-vap-a", "vap-a"), metav1.CreateOptions{})
	allowed(t, "create own lease with a pod-bound token", err)
	if err == nil {
		own.Spec.RenewTime = ptr.To(metav1.NewMicroTime(time.Now()))
		_, err = leases.Update(ctx, own, metav1.UpdateOptions{})
		allowed(t, "renew own lease with a pod-bound token", err)
	}
	_, err = leases.Create(ctx, lease("egressnat-agent-vap-b", "vap-b"), metav1.CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), "only write the Lease of its own node: egressnat-agent-vap-a") {
		t.Errorf("create another node's lease with a pod-bound token: %v", err)
	}
	// Another node's existing Lease cannot be renewed either.
	other, err := admin.CoordinationV1().Leases(systemNS).Create(ctx, lease("egressnat-agent-vap-c", "vap-c"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = leases.Update(ctx, other, metav1.UpdateOptions{})
	if err == nil || !strings.Contains(err.Error(), "only write the Lease of its own node") {
		t.Errorf("renew another node's lease with a pod-bound token: %v", err)
	}
	// Nor the operators' leader Lease.
	agentCannotLead(t, leases)
}

// tokenNode returns the node name a ServiceAccount token carries.
func tokenNode(t *testing.T, token string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token is not a JWT")
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		K8s struct {
			Node struct {
				Name string `json:"name"`
			} `json:"node"`
		} `json:"kubernetes.io"`
	}
	if err := json.Unmarshal(b, &claims); err != nil {
		t.Fatal(err)
	}
	return claims.K8s.Node.Name
}

// The binaries' clients, as cmd/internal/kube builds them from a kubeconfig.
type clients struct {
	Core    kubernetes.Interface
	Dynamic dynamic.Interface
}

var (
	gatewayGVR = schema.GroupVersionResource{Group: "networking.gke.io", Version: "v1", Resource: "networkgatewaygroups"}
	policyGVR  = schema.GroupVersionResource{Group: "networking.gke.io", Version: "v1", Resource: "egressnatpolicies"}
)

func newClients(t *testing.T, kubeconfig string) *clients {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	core, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &clients{Core: core, Dynamic: dyn}
}
