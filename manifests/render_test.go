package manifests_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/test/apiserver"
	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// kustomize renders the kustomization in dir with the tests' kubectl
// (test/apiserver builds and caches it), as `kubectl apply -k` would.
// Skipped under -short, which needs no kubectl.
func kustomize(t *testing.T, dir string) [][]byte {
	t.Helper()
	if testing.Short() {
		t.Skip("needs kubectl (skipped under -short)")
	}
	_, kubectl, err := apiserver.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(kubectl, "kustomize", dir).Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, msg)
	}
	var docs [][]byte
	for _, d := range strings.Split("\n"+string(out), "\n---") {
		if strings.TrimSpace(d) != "" {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

// operatorDeployment is the rendered operator Deployment of dir.
func operatorDeployment(t *testing.T, dir string) appsv1.Deployment {
	t.Helper()
	var found []appsv1.Deployment
	for _, d := range kustomize(t, dir) {
		var dep appsv1.Deployment
		if err := yaml.Unmarshal(d, &dep); err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		if dep.Kind == "Deployment" && dep.Name == "egressnat-operator" {
			found = append(found, dep)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s renders %d Deployments egressnat-operator, want 1", dir, len(found))
	}
	return found[0]
}

// replicas is the Deployment's replica count (1 when unset, as the API
// server defaults it).
func replicas(d appsv1.Deployment) int32 {
	if d.Spec.Replicas == nil {
		return 1
	}
	return *d.Spec.Replicas
}

// TestSingleNodeOverlay: the default install runs two operator replicas
// that must land on different nodes (required anti-affinity on the node's
// hostname); manifests/single-node runs one, whose anti-affinity is only
// preferred, so that it schedules on a one-node cluster, and changes
// nothing else of the Deployment.
func TestSingleNodeOverlay(t *testing.T) {
	base := operatorDeployment(t, ".")
	single := operatorDeployment(t, "single-node")

	if r := replicas(base); r != 2 {
		t.Errorf("default: replicas %d, want 2", r)
	}
	aa := base.Spec.Template.Spec.Affinity
	if aa == nil || aa.PodAntiAffinity == nil || len(aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 1 ||
		aa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].TopologyKey != "kubernetes.io/hostname" {
		t.Errorf("default: want one required pod anti-affinity on kubernetes.io/hostname, got %+v", aa)
	}

	if r := replicas(single); r != 1 {
		t.Errorf("single-node: replicas %d, want 1", r)
	}
	sa := single.Spec.Template.Spec.Affinity
	if sa != nil && sa.PodAntiAffinity != nil && len(sa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) > 0 {
		t.Errorf("single-node: required pod anti-affinity left: %+v", sa.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution)
	}
	if sa != nil && sa.NodeAffinity != nil && sa.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		t.Errorf("single-node: required node affinity: %+v", sa.NodeAffinity)
	}

	// Nothing else changes: the same Deployment once replicas and the
	// anti-affinity are set aside.
	base.Spec.Replicas, single.Spec.Replicas = nil, nil
	base.Spec.Template.Spec.Affinity, single.Spec.Template.Spec.Affinity = nil, nil
	b, _ := yaml.Marshal(base)
	s, _ := yaml.Marshal(single)
	if string(b) != string(s) {
		t.Errorf("single-node changes more than replicas and anti-affinity:\n--- default\n%s\n--- single-node\n%s", b, s)
	}
}

// TestUserRoles: user-rbac.yaml aggregates reading the networking.gke.io
// resources into the built-in view, edit and admin roles, and writing
// policies into edit and admin; writing gateways only through
// egressnat-gateway-admin, which aggregates nowhere; no user role writes
// status, and nothing else is granted. test/deploy proves the aggregation on a real cluster.
func TestUserRoles(t *testing.T) {
	want := map[string]struct {
		labels []string
		rules  []rbacv1.PolicyRule
	}{
		"egressnat-view": {
			labels: []string{"view", "edit", "admin"},
			rules: []rbacv1.PolicyRule{{APIGroups: []string{"networking.gke.io"},
				Resources: []string{"egressnatpolicies", "networkgatewaygroups", "egressnatpolicies/status", "networkgatewaygroups/status"},
				Verbs:     []string{"get", "list", "watch"}}},
		},
		"egressnat-edit": {
			labels: []string{"edit", "admin"},
			rules: []rbacv1.PolicyRule{{APIGroups: []string{"networking.gke.io"},
				Resources: []string{"egressnatpolicies"},
				Verbs:     []string{"create", "update", "patch", "delete"}}},
		},
		// Gateways pick the addresses nodes announce: bound explicitly,
		// never aggregated.
		"egressnat-gateway-admin": {
			rules: []rbacv1.PolicyRule{{APIGroups: []string{"networking.gke.io"},
				Resources: []string{"networkgatewaygroups"},
				Verbs:     []string{"get", "list", "watch", "create", "update", "patch", "delete"}}},
		},
	}
	seen := 0
	for _, d := range docs(t, "base/user-rbac.yaml") {
		var r rbacv1.ClusterRole
		if err := yaml.UnmarshalStrict(d, &r); err != nil {
			t.Fatal(err)
		}
		w, ok := want[r.Name]
		if r.Kind != "ClusterRole" || !ok {
			t.Errorf("user-rbac.yaml: unexpected %s %s", r.Kind, r.Name)
			continue
		}
		seen++
		var labels []string
		for k, v := range r.Labels {
			role, ok := strings.CutPrefix(k, "rbac.authorization.k8s.io/aggregate-to-")
			if !ok || v != "true" {
				t.Errorf("%s: label %s=%s", r.Name, k, v)
				continue
			}
			labels = append(labels, role)
		}
		slices.Sort(labels)
		wantLabels := slices.Sorted(slices.Values(w.labels))
		if !slices.Equal(labels, wantLabels) {
			t.Errorf("%s aggregates to %v, want %v", r.Name, labels, wantLabels)
		}
		if r.AggregationRule != nil {
			t.Errorf("%s: an aggregation rule", r.Name)
		}
		gotRules, _ := yaml.Marshal(r.Rules)
		wantRules, _ := yaml.Marshal(w.rules)
		if string(gotRules) != string(wantRules) {
			t.Errorf("%s rules:\n%s\nwant:\n%s", r.Name, gotRules, wantRules)
		}
	}
	if seen != len(want) {
		t.Errorf("user-rbac.yaml: %d of the %d user roles", seen, len(want))
	}
}
