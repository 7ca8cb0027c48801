// Package manifests_test checks the install manifests without a cluster:
// the kustomization lists every file, no Role grants Secrets, wildcards or
// the verbs that escalate, and the agent learns its memory limit.
// test/deploy proves the rest against a real API server.
package manifests_test

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
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
	var k struct {
		Resources []string `json:"resources"`
	}
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob("*.yaml")
	crds, _ := filepath.Glob("crds/*.yaml")
	for _, f := range append(files, crds...) {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not in kustomization.yaml", f)
		}
	}
	for _, r := range k.Resources {
		if _, err := os.Stat(r); err != nil {
			t.Errorf("kustomization.yaml lists %s: %v", r, err)
		}
	}
}

// TestLeastPrivilege: no rule reads Secrets, uses a wildcard, or grants
// escalate, bind or impersonate; the agent writes nothing of
// networking.gke.io and no status.
func TestLeastPrivilege(t *testing.T) {
	files, _ := filepath.Glob("*.yaml")
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
					t.Errorf("%s grants secrets", where)
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
	if roles != 4 {
		t.Errorf("found %d Roles and ClusterRoles, want 4", roles)
	}
}

// TestAgentMemoryLimit: the agent reads its container's memory limit
// (MEMORY_LIMIT, from the downward API) to set the Go runtime's soft
// limit below it, and that limit is set.
func TestAgentMemoryLimit(t *testing.T) {
	var ds appsv1.DaemonSet
	b, err := os.ReadFile("agent-daemonset.yaml")
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
