package deploy

import (
	"context"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

// The controller manager runs once per server (go test -count=2 reuses it).
var (
	controllersOnce sync.Once
	controllersErr  error
)

// The users of TestUserRoles, bound to the built-in roles only.
const (
	viewer   = "egressnat-test-viewer"   // ClusterRoleBinding to view
	editor   = "egressnat-test-editor"   // ClusterRoleBinding to edit
	gwEditor = "egressnat-test-gweditor" // RoleBinding to edit in kube-system
	gwAdmin  = "egressnat-test-gwadmin"  // RoleBinding to egressnat-gateway-admin in kube-system
	nobody   = "egressnat-test-nobody"   // no binding
)

// TestUserRoles: once kube-controller-manager's clusterrole-aggregation
// controller has merged user-rbac.yaml into the built-in roles, a user
// bound to view reads gateways and policies (egressnatctl status and
// explain work) and writes nothing; edit writes policies, never their
// status; no built-in role writes gateways (they pick the addresses nodes
// announce), egressnat-gateway-admin bound in kube-system writes that
// namespace's gateways only.
func TestUserRoles(t *testing.T) {
	needServer(t)
	// Build (when not cached) before the test's deadline starts.
	if _, err := apiserver.ControllerManager(); err != nil {
		t.Fatal(err)
	}
	ctl := buildCtl(t)
	ctx := ctxT(t)
	controllersOnce.Do(func() { controllersErr = srv.StartControllers(ctx, "clusterrole-aggregation") })
	if controllersErr != nil {
		t.Fatal(controllersErr)
	}
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	waitAggregated(t, admin, "view", "list", "egressnatpolicies")
	waitAggregated(t, admin, "edit", "create", "egressnatpolicies")
	waitAggregated(t, admin, "admin", "create", "egressnatpolicies")
	bind(t, admin, "", "view", viewer)
	bind(t, admin, "", "edit", editor)
	bind(t, admin, "kube-system", "edit", gwEditor)
	bind(t, admin, "kube-system", "egressnat-gateway-admin", gwAdmin)

	const policies, gateways = "egressnatpolicies.networking.gke.io", "networkgatewaygroups.networking.gke.io"
	for _, c := range []struct {
		user string
		args []string
		want bool
	}{
		{viewer, []string{"get", policies}, true},
		{viewer, []string{"list", policies}, true},
		{viewer, []string{"watch", policies}, true},
		{viewer, []string{"get", policies, "--subresource=status"}, true},
		{viewer, []string{"list", gateways, "--all-namespaces"}, true},
		{viewer, []string{"get", gateways, "-n", "kube-system", "--subresource=status"}, true},
		{viewer, []string{"create", policies}, false},
		{viewer, []string{"update", policies}, false},
		{viewer, []string{"patch", policies}, false},
		{viewer, []string{"delete", policies}, false},
		{viewer, []string{"create", gateways, "-n", "kube-system"}, false},
		{viewer, []string{"update", policies, "--subresource=status"}, false},
		// What egressnatctl status and explain read besides; explain
		// shows the next hops only to who may get Nodes.
		{viewer, []string{"list", "pods", "--all-namespaces"}, true},
		{viewer, []string{"list", "namespaces"}, true},
		{viewer, []string{"get", "nodes"}, false},

		{editor, []string{"create", policies}, true},
		{editor, []string{"update", policies}, true},
		{editor, []string{"patch", policies}, true},
		{editor, []string{"delete", policies}, true},
		{editor, []string{"list", policies}, true},
		{editor, []string{"create", gateways, "-n", "kube-system"}, false},
		{editor, []string{"delete", gateways, "-n", "kube-system"}, false},
		{editor, []string{"update", policies, "--subresource=status"}, false},
		{editor, []string{"patch", policies, "--subresource=status"}, false},
		{editor, []string{"update", gateways, "-n", "kube-system", "--subresource=status"}, false},

		{gwEditor, []string{"create", gateways, "-n", "kube-system"}, false},
		{gwEditor, []string{"list", gateways, "-n", "kube-system"}, true},
		{gwEditor, []string{"create", policies}, false},
		{gwEditor, []string{"list", policies}, false},

		{gwAdmin, []string{"create", gateways, "-n", "kube-system"}, true},
		{gwAdmin, []string{"delete", gateways, "-n", "kube-system"}, true},
		{gwAdmin, []string{"create", gateways, "-n", "default"}, false},
		{gwAdmin, []string{"update", gateways, "-n", "kube-system", "--subresource=status"}, false},
		{gwAdmin, []string{"create", policies}, false},

		{nobody, []string{"list", policies}, false},
		{nobody, []string{"list", gateways, "--all-namespaces"}, false},
	} {
		if got := canI(t, ctx, c.user, c.args...); got != c.want {
			t.Errorf("kubectl auth can-i %s --as=%s: %v, want %v", strings.Join(c.args, " "), c.user, got, c.want)
		}
	}

	// The same through real requests.
	pol := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy",
		"metadata": map[string]any{"name": "userrbac-policy"},
		"spec": map[string]any{
			"sources":      []any{map[string]any{"namespaceSelector": map[string]any{}, "podSelector": map[string]any{}}},
			"action":       "SNAT",
			"destinations": []any{map[string]any{"cidr": "198.51.100.0/24"}},
			"gatewayRef":   map[string]any{"name": "userrbac-gw", "namespace": "kube-system"},
		},
	}}
	_, err = as(t, viewer).Resource(policyGVR).List(ctx, metav1.ListOptions{})
	allowed(t, "viewer lists policies", err)
	_, err = as(t, viewer).Resource(policyGVR).Create(ctx, pol, metav1.CreateOptions{})
	forbidden(t, "viewer creates a policy", err)
	_, err = as(t, gwEditor).Resource(policyGVR).Create(ctx, pol, metav1.CreateOptions{})
	forbidden(t, "kube-system editor creates a policy", err)
	created, err := as(t, editor).Resource(policyGVR).Create(ctx, pol, metav1.CreateOptions{})
	allowed(t, "editor creates a policy", err)
	if err == nil {
		created.Object["status"] = map[string]any{"gatewayNode": "n1"}
		_, err = as(t, editor).Resource(policyGVR).UpdateStatus(ctx, created, metav1.UpdateOptions{})
		forbidden(t, "editor writes a policy's status", err)
		allowed(t, "editor deletes a policy", as(t, editor).Resource(policyGVR).Delete(ctx, pol.GetName(), metav1.DeleteOptions{}))
	}

	// egressnatctl with view: status lists gateways, policies, namespaces
	// and pods; explain reads a pod, its namespace, gateways and policies
	// (and, refused, the holders' Nodes).
	fixtures(t)
	// A running pod with an address, as the kubelet would report it: the
	// policy rbac-policy selects every pod.
	pod, err := admin.CoreV1().Pods(systemNS).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "userrbac-pod", Labels: map[string]string{"app": "userrbac"}},
		Spec: corev1.PodSpec{NodeName: "rbac-node", ServiceAccountName: "egressnat-operator", AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		admin.CoreV1().Pods(systemNS).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))}) //nolint:errcheck
	})
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.5", PodIPs: []corev1.PodIP{{IP: "10.244.1.5"}}}
	if _, err := admin.CoreV1().Pods(systemNS).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"status"},
		{"explain", "pod", systemNS + "/userrbac-pod", "--to", "203.0.113.10"},
	} {
		out, err := runCtl(ctx, ctl, viewer, args...)
		if err != nil {
			t.Errorf("egressnatctl %s as a viewer: %v\n%s", strings.Join(args, " "), err, out)
		} else if !strings.Contains(out, "rbac-policy") {
			t.Errorf("egressnatctl %s as a viewer does not name the policy rbac-policy:\n%s", strings.Join(args, " "), out)
		}
		if out, err := runCtl(ctx, ctl, nobody, args...); err == nil || !strings.Contains(strings.ToLower(out), "forbidden") {
			t.Errorf("egressnatctl %s without a role: %v, want forbidden:\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// waitAggregated waits until the built-in ClusterRole role grants verb on
// the networking.gke.io resource: the clusterrole-aggregation controller
// copied the rules of user-rbac.yaml into it.
func waitAggregated(t *testing.T, admin kubernetes.Interface, role, verb, resource string) {
	t.Helper()
	ctx := ctxT(t)
	var rules []rbacv1.PolicyRule
	for {
		r, err := admin.RbacV1().ClusterRoles().Get(ctx, role, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rules = r.Rules
		for _, rule := range rules {
			if slices.Contains(rule.APIGroups, "networking.gke.io") && slices.Contains(rule.Resources, resource) && slices.Contains(rule.Verbs, verb) {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("ClusterRole %s never granted %s %s (see %s/kube-controller-manager.log): %+v", role, verb, resource, srv.Dir, rules)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// bind binds the ClusterRole role to user: cluster-wide when namespace is
// empty, else in that namespace.
func bind(t *testing.T, admin kubernetes.Interface, namespace, role, user string) {
	t.Helper()
	ctx := ctxT(t)
	meta := metav1.ObjectMeta{Name: user + "-" + role, Namespace: namespace}
	ref := rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role}
	subjects := []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}}
	var err error
	if namespace == "" {
		_, err = admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: meta, RoleRef: ref, Subjects: subjects}, metav1.CreateOptions{})
	} else {
		_, err = admin.RbacV1().RoleBindings(namespace).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: meta, RoleRef: ref, Subjects: subjects}, metav1.CreateOptions{})
	}
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// canI asks `kubectl auth can-i` as admin impersonating user.
func canI(t *testing.T, ctx context.Context, user string, args ...string) bool {
	t.Helper()
	out, errOut, err := srv.Kubectl(ctx, nil, append([]string{"auth", "can-i", "--as=" + user}, args...)...)
	answer := strings.TrimSpace(out)
	switch {
	case answer == "yes" && err == nil:
		return true
	case strings.HasPrefix(answer, "no"):
		return false
	}
	t.Fatalf("kubectl auth can-i %s --as=%s: %v\n%s%s", strings.Join(args, " "), user, err, out, errOut)
	return false
}

// as is a dynamic client of admin impersonating user.
func as(t *testing.T, user string) dynamic.Interface {
	t.Helper()
	cfg := srv.Config()
	cfg.Impersonate.UserName = user
	c, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// buildCtl builds egressnatctl into a temporary directory.
func buildCtl(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "egressnatctl")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/egressnatctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build egressnatctl: %v\n%s", err, out)
	}
	return bin
}

// runCtl runs egressnatctl with the admin kubeconfig impersonating user
// (--as), and returns its combined output.
func runCtl(ctx context.Context, bin, user string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig=" + srv.Kubeconfig, "--as=" + user}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
