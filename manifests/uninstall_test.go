package manifests_test

import (
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// TestAgentSeesUninstall: what the agent needs to clean its node up on an
// uninstall (cmd/internal/agent, IsUninstall and Uninstall): its pod's
// name from the downward API (the pod's owner is its DaemonSet), RBAC to
// read and watch that DaemonSet and its namespace by name, the host's
// /proc/sys/net writable at its --proc-sys-net, the sysctls' values before
// recorded by the init container in the agent's --state-dir, and a grace
// period longer than the agent's budget (7 s).
func TestAgentSeesUninstall(t *testing.T) {
	b, err := os.ReadFile("base/agent-daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	c, _ := workload(t, "base/agent-daemonset.yaml")
	fieldEnv := func(c corev1.Container, name string) string {
		for _, e := range c.Env {
			if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
				return e.ValueFrom.FieldRef.FieldPath
			}
		}
		return ""
	}
	if got := fieldEnv(c, "POD_NAME"); got != "metadata.name" {
		t.Errorf("agent: POD_NAME from %q, want metadata.name", got)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g <= 7 {
		t.Errorf("terminationGracePeriodSeconds %v: want more than the agent's 7 s uninstall budget", g)
	}
	hostPath := map[string]string{} // volume -> host path
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPath[v.Name] = v.HostPath.Path
		}
	}
	arg := func(c corev1.Container, flag string) string {
		for _, a := range slices.Concat(c.Command, c.Args) {
			if v, ok := strings.CutPrefix(a, "--"+flag+"="); ok {
				return v
			}
		}
		return ""
	}
	mountOf := func(c corev1.Container, path string) (corev1.VolumeMount, bool) {
		for _, m := range c.VolumeMounts {
			if m.MountPath == path {
				return m, true
			}
		}
		return corev1.VolumeMount{}, false
	}
	procSysNet := arg(c, "proc-sys-net")
	if m, ok := mountOf(c, procSysNet); procSysNet == "" || !ok || m.ReadOnly || hostPath[m.Name] != "/proc/sys/net" {
		t.Errorf("agent: --proc-sys-net=%q must be the host's /proc/sys/net, mounted writable (mount %+v)", procSysNet, m)
	}
	stateDir := arg(c, "state-dir")
	stateMount, ok := mountOf(c, stateDir)
	if stateDir == "" || !ok {
		t.Fatalf("agent: --state-dir=%q is not mounted", stateDir)
	}
	recorded := false
	for _, ic := range spec.InitContainers {
		if !slices.Contains(ic.Command, "prepare-node") {
			continue
		}
		for _, e := range ic.Env {
			if e.Name == "EGRESSNAT_STATE_DIR" {
				m, ok := mountOf(ic, e.Value)
				recorded = e.Value == stateDir && ok && !m.ReadOnly && hostPath[m.Name] == hostPath[stateMount.Name]
			}
		}
	}
	if !recorded {
		t.Errorf("the prepare-node init container does not record the sysctls in the agent's state directory %s (EGRESSNAT_STATE_DIR, mounted from the same host path)", stateDir)
	}

	// RBAC: the DaemonSet in its namespace, and the namespace, by name.
	dsRule, nsRule := false, false
	for _, d := range docs(t, "base/agent-rbac.yaml") {
		var r struct {
			Kind     string              `json:"kind"`
			Metadata metav1.ObjectMeta   `json:"metadata"`
			Rules    []rbacv1.PolicyRule `json:"rules"`
		}
		if err := yaml.Unmarshal(d, &r); err != nil {
			t.Fatal(err)
		}
		for _, rule := range r.Rules {
			reads := slices.Contains(rule.Verbs, "get") && slices.Contains(rule.Verbs, "list") && slices.Contains(rule.Verbs, "watch")
			switch {
			case r.Kind == "Role" && r.Metadata.Namespace == ds.Namespace && slices.Contains(rule.APIGroups, "apps") &&
				slices.Equal(rule.Resources, []string{"daemonsets"}):
				if !reads || !slices.Equal(rule.ResourceNames, []string{ds.Name}) {
					t.Errorf("Role %s: daemonsets rule %+v: want get, list, watch of %s only", r.Metadata.Name, rule, ds.Name)
				}
				dsRule = true
			case r.Kind == "ClusterRole" && slices.Equal(rule.Resources, []string{"namespaces"}) && len(rule.ResourceNames) > 0:
				nsRule = reads && slices.Equal(rule.ResourceNames, []string{ds.Namespace})
			}
		}
	}
	if !dsRule || !nsRule {
		t.Errorf("agent RBAC: reads its DaemonSet by name %v, its namespace by name %v", dsRule, nsRule)
	}
}
