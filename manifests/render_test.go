package manifests_test

import (
	"os/exec"
	"path"
	"slices"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/test/apiserver"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
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

// rendered is every object kustomize renders in dir, by kind, namespace
// and name.
func rendered(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	objs := map[string][]byte{}
	for _, d := range kustomize(t, dir) {
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(d, &meta); err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		key := meta.Kind + " " + path.Join(meta.Metadata.Namespace, meta.Metadata.Name)
		if _, dup := objs[key]; dup {
			t.Fatalf("%s renders %s twice", dir, key)
		}
		objs[key] = d
	}
	return objs
}

// canonical re-marshals a YAML document, so that two renderings of one
// object compare equal whatever their key order.
func canonical(t *testing.T, doc []byte) string {
	t.Helper()
	var v any
	if err := yaml.Unmarshal(doc, &v); err != nil {
		t.Fatal(err)
	}
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestEBPFOverlay: manifests/ebpf renders the objects manifests/ does
// (the same image too), and changes only the agent container of the
// DaemonSet: --classifier=ebpf with --bpf-dir in the host's bpffs and the
// class mark bits, the capability BPF added to NET_ADMIN and NET_RAW
// (drop ALL, no privilege, seccomp and AppArmor as they were), and the
// host's /sys/fs/bpf (type Directory), mounted HostToContainer (so that
// pins live on the host's bpffs and outlive the container) outside /sys
// (whose writes the runtimes' default AppArmor profile denies), where the
// agent's --bpf-dir and EGRESSNAT_BPF_DIR, egressnatctl's default, point.
func TestEBPFOverlay(t *testing.T) {
	base, ebpf := rendered(t, "."), rendered(t, "ebpf")
	const dsKey = "DaemonSet egressnat-system/egressnat-agent"
	for k, b := range base {
		e, ok := ebpf[k]
		switch {
		case !ok:
			t.Errorf("ebpf does not render %s", k)
		case k != dsKey && canonical(t, b) != canonical(t, e):
			t.Errorf("ebpf changes %s:\n--- default\n%s\n--- ebpf\n%s", k, canonical(t, b), canonical(t, e))
		}
	}
	for k := range ebpf {
		if _, ok := base[k]; !ok {
			t.Errorf("ebpf renders %s, which the default does not", k)
		}
	}
	if _, ok := base[dsKey]; !ok {
		t.Fatalf("no %s", dsKey)
	}
	var bds, eds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(base[dsKey], &bds); err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(ebpf[dsKey], &eds); err != nil {
		t.Fatal(err)
	}
	agent := func(ds *appsv1.DaemonSet) *corev1.Container {
		for i := range ds.Spec.Template.Spec.Containers {
			if c := &ds.Spec.Template.Spec.Containers[i]; c.Name == "agent" {
				return c
			}
		}
		t.Fatal("no container agent")
		return nil
	}
	bc, ec := agent(&bds), agent(&eds)

	// The flags: the default's, and the three of the classifier.
	flags := map[string]string{}
	var rest []string
	for _, a := range ec.Args {
		name, value, _ := strings.Cut(a, "=")
		switch name {
		case "--classifier", "--bpf-dir", "--class-mark-mask":
			if _, dup := flags[name]; dup {
				t.Errorf("ebpf: %s twice", name)
			}
			flags[name] = value
		default:
			rest = append(rest, a)
		}
	}
	if !slices.Equal(rest, bc.Args) {
		t.Errorf("ebpf changes the agent's other flags:\n%q\nwant\n%q", rest, bc.Args)
	}
	if flags["--classifier"] != "ebpf" || flags["--class-mark-mask"] != "0x00ff0000" {
		t.Errorf("ebpf: --classifier=%q --class-mark-mask=%q, want ebpf and 0x00ff0000", flags["--classifier"], flags["--class-mark-mask"])
	}
	bpfDir := flags["--bpf-dir"]

	// The host's bpffs, mounted from the host and back.
	var vol *corev1.Volume
	for i, v := range eds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/sys/fs/bpf" {
			vol = &eds.Spec.Template.Spec.Volumes[i]
		}
	}
	if vol == nil {
		t.Fatal("ebpf: no hostPath volume /sys/fs/bpf")
	}
	if vol.HostPath.Type == nil || *vol.HostPath.Type != corev1.HostPathDirectory {
		t.Errorf("ebpf: hostPath /sys/fs/bpf type %v, want Directory (an existing directory; the agent checks it is a bpffs)", vol.HostPath.Type)
	}
	var mount *corev1.VolumeMount
	for i, m := range ec.VolumeMounts {
		if m.Name == vol.Name {
			if mount != nil {
				t.Errorf("ebpf: %s mounted twice", vol.Name)
			}
			mount = &ec.VolumeMounts[i]
		}
	}
	if mount == nil {
		t.Fatalf("ebpf: volume %s not mounted in the agent", vol.Name)
	}
	if mount.ReadOnly || mount.SubPath != "" || mount.MountPropagation == nil || *mount.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Errorf("ebpf: bpffs mount %+v: want writable, the whole of it, mountPropagation HostToContainer", mount)
	}
	if mount.MountPath == "/sys" || strings.HasPrefix(mount.MountPath, "/sys/") {
		t.Errorf("ebpf: bpffs mounted at %s: the runtimes' default AppArmor profile denies writes under /sys/fs but cgroup", mount.MountPath)
	}
	if dir, ok := strings.CutPrefix(bpfDir, mount.MountPath+"/"); !ok || dir == "" || path.Clean(bpfDir) != bpfDir {
		t.Errorf("ebpf: --bpf-dir=%q is not a directory in the host's bpffs (mounted at %s)", bpfDir, mount.MountPath)
	}
	env := ""
	for _, e := range ec.Env {
		if e.Name == "EGRESSNAT_BPF_DIR" {
			env = e.Value
		}
	}
	if env != bpfDir {
		t.Errorf("ebpf: EGRESSNAT_BPF_DIR=%q (egressnatctl ruleset's default), want the agent's --bpf-dir %q", env, bpfDir)
	}

	// The rights: BPF added, nothing else.
	esc := ec.SecurityContext
	if esc == nil || esc.Capabilities == nil {
		t.Fatal("ebpf: no capabilities")
	}
	if got := esc.Capabilities.Add; !slices.Equal(got, []corev1.Capability{"NET_ADMIN", "NET_RAW", "BPF"}) {
		t.Errorf("ebpf: capabilities added %v, want NET_ADMIN, NET_RAW, BPF", got)
	}
	if !slices.Equal(esc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("ebpf: capabilities dropped %v, want ALL", esc.Capabilities.Drop)
	}
	if esc.Privileged == nil || *esc.Privileged || esc.AllowPrivilegeEscalation == nil || *esc.AllowPrivilegeEscalation {
		t.Errorf("ebpf: privileged %v, allowPrivilegeEscalation %v: want both false", esc.Privileged, esc.AllowPrivilegeEscalation)
	}
	if esc.SeccompProfile == nil || esc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault || esc.AppArmorProfile != nil {
		t.Errorf("ebpf: seccomp %+v, AppArmor %+v: want RuntimeDefault, unset (the runtime's default)", esc.SeccompProfile, esc.AppArmorProfile)
	}

	// Nothing else: the same DaemonSet once those are set aside.
	ec.Args = rest
	ec.Env = slices.DeleteFunc(ec.Env, func(e corev1.EnvVar) bool { return e.Name == "EGRESSNAT_BPF_DIR" })
	ec.VolumeMounts = slices.DeleteFunc(ec.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == vol.Name })
	esc.Capabilities.Add = slices.DeleteFunc(esc.Capabilities.Add, func(c corev1.Capability) bool { return c == "BPF" })
	name := vol.Name
	eds.Spec.Template.Spec.Volumes = slices.DeleteFunc(eds.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == name })
	b, _ := yaml.Marshal(bds)
	e, _ := yaml.Marshal(eds)
	if string(b) != string(e) {
		t.Errorf("ebpf changes more of the agent DaemonSet than its classifier settings:\n--- default\n%s\n--- ebpf\n%s", b, e)
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
