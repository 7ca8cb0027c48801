package deploy

import (
	"slices"
	"strings"
	"testing"
)

// TestApplyDryRun: `kubectl apply --dry-run=server -k manifests/` succeeds
// against the real API server: every object is valid (strict field
// validation, the CRDs' schemas, RBAC and admission policy types), not just
// well-formed YAML.
func TestApplyDryRun(t *testing.T) {
	out, errOut, err := srv.Kubectl(ctxT(t), nil, "apply", "--dry-run=server", "-k", root+"/manifests")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -k manifests/: %v\n%s%s", err, out, errOut)
	}
	for _, want := range []string{
		"customresourcedefinition.apiextensions.k8s.io/networkgatewaygroups.networking.gke.io",
		"customresourcedefinition.apiextensions.k8s.io/egressnatpolicies.networking.gke.io",
		"namespace/egressnat-system",
		"serviceaccount/egressnat-agent", "serviceaccount/egressnat-operator",
		"clusterrole.rbac.authorization.k8s.io/egressnat-agent", "clusterrole.rbac.authorization.k8s.io/egressnat-operator",
		"clusterrole.rbac.authorization.k8s.io/egressnat-view", "clusterrole.rbac.authorization.k8s.io/egressnat-edit",
		"role.rbac.authorization.k8s.io/egressnat-agent", "role.rbac.authorization.k8s.io/egressnat-operator",
		"validatingadmissionpolicy.admissionregistration.k8s.io/egressnat-agent-own-lease",
		"daemonset.apps/egressnat-agent", "deployment.apps/egressnat-operator",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run did not cover %s:\n%s", want, out)
		}
	}
	if strings.Contains(errOut, "Error") {
		t.Errorf("dry run printed errors:\n%s", errOut)
	}
}

// TestKustomization: the kustomization renders the expected objects,
// everything lands in egressnat-system or is cluster-scoped, and every
// image is the one image at one tag.
func TestKustomization(t *testing.T) {
	kinds := map[string]int{}
	images := map[string]bool{}
	for _, d := range docs {
		kind := d["kind"].(string)
		kinds[kind]++
		md := d["metadata"].(map[string]any)
		ns, _ := md["namespace"].(string)
		clusterScoped := slices.Contains([]string{"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
			"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}, kind)
		// The agent may read the API server's EndpointSlice, in default.
		apiserverEndpoints := md["name"] == "egressnat-agent-apiserver-endpoints" && ns == "default"
		if clusterScoped != (ns == "") || (!clusterScoped && ns != systemNS && !apiserverEndpoints) {
			t.Errorf("%s %s in namespace %q", kind, md["name"], ns)
		}
	}
	for _, c := range append(daemonSet(t).Spec.Template.Spec.Containers, daemonSet(t).Spec.Template.Spec.InitContainers...) {
		images[c.Image] = true
	}
	for _, c := range deployment(t).Spec.Template.Spec.Containers {
		images[c.Image] = true
	}
	if len(images) != 1 {
		t.Errorf("images: %v, want one", images)
	}
	for img := range images {
		if !strings.HasPrefix(img, "ghcr.io/egressnat/egressnat:v") {
			t.Errorf("image %s, want ghcr.io/egressnat/egressnat:<version>", img)
		}
	}
	want := map[string]int{"CustomResourceDefinition": 2, "Namespace": 1, "ServiceAccount": 2, "ClusterRole": 5,
		"ClusterRoleBinding": 2, "Role": 3, "RoleBinding": 3, "ValidatingAdmissionPolicy": 1,
		"ValidatingAdmissionPolicyBinding": 1, "DaemonSet": 1, "Deployment": 1}
	for k, n := range want {
		if kinds[k] != n {
			t.Errorf("%d %s, want %d", kinds[k], k, n)
		}
	}
	for k := range kinds {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected kind %s", k)
		}
	}
}

// TestSingleNodeDryRun: the single-node overlay (one operator replica, see
// manifests/render_test.go) applies too: the patched Deployment is valid.
func TestSingleNodeDryRun(t *testing.T) {
	out, errOut, err := srv.Kubectl(ctxT(t), nil, "apply", "--dry-run=server", "-k", root+"/manifests/single-node")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -k manifests/single-node/: %v\n%s%s", err, out, errOut)
	}
	if !strings.Contains(out, "deployment.apps/egressnat-operator") {
		t.Errorf("dry run did not cover the operator Deployment:\n%s", out)
	}
}

// TestEBPFDryRun: the ebpf overlay (the agent with --classifier=ebpf, see
// manifests/render_test.go) applies too: the patched DaemonSet, its
// capability BPF and its bpffs hostPath mounted HostToContainer, is valid.
func TestEBPFDryRun(t *testing.T) {
	out, errOut, err := srv.Kubectl(ctxT(t), nil, "apply", "--dry-run=server", "-k", root+"/manifests/ebpf")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -k manifests/ebpf/: %v\n%s%s", err, out, errOut)
	}
	if !strings.Contains(out, "daemonset.apps/egressnat-agent") {
		t.Errorf("dry run did not cover the agent DaemonSet:\n%s", out)
	}
}
