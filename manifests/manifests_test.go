// Package manifests_test checks the install manifests without a cluster:
// the kustomization lists every file, no Role grants Secrets, wildcards or
// the verbs that escalate, the agent learns its memory limit, and the
// metrics and health servers listen on the node's IP only.
// test/deploy proves the rest against a real API server.
package manifests_test

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

func docs(t *testing.T, file string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), b...), []byte("\n---")) {
		if len(bytes.TrimSpace(d)) > 0 {
			out = append(out, d)
		}
	}
	return out
}

// TestKustomizationListsEveryFile: no manifest is forgotten and none is
// missing.
func TestKustomizationListsEveryFile(t *testing.T) {
	// Each kustomization lists every YAML file of its directory (crds and
	// base); the top one, single-node and ebpf take those two directories.
	for dir, wantAll := range map[string]bool{".": true, "crds": true, "base": true, "single-node": false, "ebpf": false} {
		var k struct {
			Resources []string `json:"resources"`
		}
		b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(b, &k); err != nil {
			t.Fatal(err)
		}
		files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
		for _, f := range files {
			if base := filepath.Base(f); wantAll && base != "kustomization.yaml" && !slices.Contains(k.Resources, base) {
				t.Errorf("%s is not in %s/kustomization.yaml", f, dir)
			}
		}
		for _, r := range k.Resources {
			if _, err := os.Stat(filepath.Join(dir, r)); err != nil {
				t.Errorf("%s/kustomization.yaml lists %s: %v", dir, r, err)
			}
		}
	}
}

// TestLeastPrivilege: no rule reads a Secret but the probe key (only in a
// namespaced Role, by name; the operator may create Secrets), uses a wildcard, or grants
// escalate, bind or impersonate; the agent writes nothing of
// networking.gke.io and no status.
func TestLeastPrivilege(t *testing.T) {
	files, _ := filepath.Glob("base/*.yaml")
	roles := 0
	for _, f := range files {
		for _, d := range docs(t, f) {
			var meta struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal(d, &meta); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if meta.Kind != "Role" && meta.Kind != "ClusterRole" {
				continue
			}
			roles++
			var r rbacv1.ClusterRole
			if err := yaml.UnmarshalStrict(d, &r); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			for _, rule := range r.Rules {
				where := meta.Kind + " " + meta.Metadata.Name
				for _, list := range [][]string{rule.APIGroups, rule.Resources, rule.Verbs} {
					if slices.Contains(list, "*") {
						t.Errorf("%s: wildcard in %+v", where, rule)
					}
				}
				if slices.Contains(rule.Resources, "secrets") {
					byName := slices.Equal(rule.ResourceNames, []string{"egressnat-probe-key"}) && slices.Equal(rule.Verbs, []string{"get"})
					create := meta.Metadata.Name == "egressnat-operator" && slices.Equal(rule.Verbs, []string{"create"})
					if meta.Kind != "Role" || !(byName || create) {
						t.Errorf("%s grants secrets: %+v", where, rule)
					}
				}
				for _, v := range []string{"escalate", "bind", "impersonate"} {
					if slices.Contains(rule.Verbs, v) {
						t.Errorf("%s grants %s", where, v)
					}
				}
				if strings.HasPrefix(meta.Metadata.Name, "egressnat-agent") {
					for _, res := range rule.Resources {
						if strings.HasSuffix(res, "/status") {
							t.Errorf("%s grants %s", where, res)
						}
					}
					if slices.Contains(rule.APIGroups, "networking.gke.io") && !slices.Equal(rule.Verbs, []string{"get", "list", "watch"}) {
						t.Errorf("%s: networking.gke.io verbs %v, want get, list, watch", where, rule.Verbs)
					}
				}
			}
		}
	}
	if roles != 8 {
		t.Errorf("found %d Roles and ClusterRoles, want 8", roles)
	}
}

// TestAgentMemoryLimit: the agent reads its container's memory limit
// (MEMORY_LIMIT, from the downward API) to set the Go runtime's soft
// limit below it, and that limit is set.
func TestAgentMemoryLimit(t *testing.T) {
	var ds appsv1.DaemonSet
	b, err := os.ReadFile("base/agent-daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != "agent" {
			continue
		}
		if c.Resources.Limits.Memory().IsZero() {
			t.Error("agent: no memory limit")
		}
		for _, e := range c.Env {
			if e.Name == "MEMORY_LIMIT" {
				if e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" ||
					!e.ValueFrom.ResourceFieldRef.Divisor.IsZero() && e.ValueFrom.ResourceFieldRef.Divisor.Value() != 1 {
					t.Errorf("agent: MEMORY_LIMIT must be the container's limits.memory in bytes, got %+v", e.ValueFrom)
				}
				return
			}
		}
		t.Fatal("agent: no MEMORY_LIMIT env")
	}
	t.Fatal("no container named agent")
}

// workload returns the first container and the pod spec of a DaemonSet or
// Deployment manifest.
func workload(t *testing.T, file string) (corev1.Container, corev1.PodSpec) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var w struct {
		Spec struct {
			Template corev1.PodTemplateSpec `json:"template"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &w); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	spec := w.Spec.Template.Spec
	if len(spec.Containers) == 0 {
		t.Fatalf("%s: no container", file)
	}
	return spec.Containers[0], spec
}

// TestBindAddresses: both workloads share the node's network namespace
// (hostNetwork), where ":port" or 0.0.0.0 would listen on every address of
// the node, the floating IPs it holds included. Every --*-addr flag listens
// on the node's own IP, HOST_IP from the downward API (status.hostIP), on a
// declared port; the kubelet's probes use the metrics and health port; the
// operators probe the port the agents listen on.
func TestBindAddresses(t *testing.T) {
	ports := map[string]map[string]int{} // file -> flag -> port
	for _, f := range []string{"base/agent-daemonset.yaml", "base/operator-deployment.yaml"} {
		c, spec := workload(t, f)
		if !spec.HostNetwork {
			t.Errorf("%s: not hostNetwork; this test assumes it", f)
		}
		hostIP := false
		for _, e := range c.Env {
			if e.Name == "HOST_IP" {
				hostIP = e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
			}
		}
		if !hostIP {
			t.Errorf("%s: no env HOST_IP from fieldRef status.hostIP", f)
		}
		ports[f] = map[string]int{}
		for _, a := range c.Args {
			flag, value, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if !ok {
				continue
			}
			if flag == "probe-port" {
				ports[f][flag], _ = strconv.Atoi(value)
			}
			if !strings.HasSuffix(flag, "-addr") {
				continue
			}
			host, port, err := net.SplitHostPort(value)
			if err != nil {
				t.Errorf("%s: --%s=%s: %v", f, flag, value, err)
				continue
			}
			if host != "$(HOST_IP)" {
				t.Errorf("%s: --%s listens on %q, want $(HOST_IP) (the node's IP only)", f, flag, host)
			}
			n, _ := strconv.Atoi(port)
			ports[f][flag] = n
			if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return int(p.ContainerPort) == n }) {
				t.Errorf("%s: --%s port %d is not a declared containerPort", f, flag, n)
			}
		}
		health, ok := ports[f]["health-addr"]
		if !ok {
			t.Errorf("%s: no --health-addr", f)
		}
		for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
			if p == nil || p.HTTPGet == nil {
				t.Errorf("%s: no HTTP %s probe", f, name)
				continue
			}
			if p.HTTPGet.Host != "" {
				t.Errorf("%s: %s probe host %q: the kubelet must dial the pod IP (the node IP), where the server listens", f, name, p.HTTPGet.Host)
			}
			port := p.HTTPGet.Port.IntValue()
			for _, cp := range c.Ports {
				if cp.Name == p.HTTPGet.Port.StrVal && p.HTTPGet.Port.StrVal != "" {
					port = int(cp.ContainerPort)
				}
			}
			if port != health {
				t.Errorf("%s: %s probe port %d, want the --health-addr port %d", f, name, port, health)
			}
		}
	}
	agentProbe, opProbe := ports["base/agent-daemonset.yaml"]["health-probe-addr"], ports["base/operator-deployment.yaml"]["probe-port"]
	if agentProbe == 0 || agentProbe != opProbe {
		t.Errorf("the operator probes port %d, the agents listen for probes on %d", opProbe, agentProbe)
	}
}

// TestBootUnit: the boot unit (host/egressnat-boot-guard.service) runs the
// copy the DaemonSet's agent keeps in its state directory, on the host path
// that directory is, with the same --state-dir.
func TestBootUnit(t *testing.T) {
	b, err := os.ReadFile("host/egressnat-boot-guard.service")
	if err != nil {
		t.Fatal(err)
	}
	var exec []string
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			exec = strings.Fields(v)
		}
	}
	if len(exec) == 0 || !slices.Contains(exec, "--boot-guard") {
		t.Fatalf("ExecStart %q does not run --boot-guard", exec)
	}
	c, spec := workload(t, "base/agent-daemonset.yaml")
	if slices.Contains(c.Args, "--boot-binary=false") {
		t.Fatal("the agent does not keep the boot unit's binary")
	}
	var mount string
	for _, m := range c.VolumeMounts {
		if m.Name == "state" {
			mount = m.MountPath
		}
	}
	var hostDir string
	for _, v := range spec.Volumes {
		if v.Name == "state" && v.HostPath != nil {
			hostDir = v.HostPath.Path
		}
	}
	if mount == "" || hostDir == "" || !slices.Contains(c.Args, "--state-dir="+mount) {
		t.Fatalf("agent state: mount %q host path %q args %q", mount, hostDir, c.Args)
	}
	if exec[0] != filepath.Join(hostDir, "egressnat-agent") || !slices.Contains(exec, "--state-dir="+hostDir) {
		t.Fatalf("ExecStart %q: want %s/egressnat-agent with --state-dir=%s", exec, hostDir, hostDir)
	}
}
