package api_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestExamplesApply applies every example with the real kubectl (strict
// validation) and checks the objects exist afterwards.
func TestExamplesApply(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(exampleDir(), "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples in %s: %v", exampleDir(), err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			out, errOut, err := kubectl(t, "", "apply", "--validate=strict", "-f", f)
			if err != nil {
				t.Fatalf("apply %s: %v\n%s%s", f, err, out, errOut)
			}
			if !strings.Contains(out, "networking.gke.io") {
				t.Fatalf("apply printed no networking.gke.io object:\n%s", out)
			}
			out, errOut, err = kubectl(t, "", "get", "-f", f, "-o", "name")
			if err != nil {
				t.Fatalf("get %s: %v\n%s", f, err, errOut)
			}
			if n := strings.Count(out, "networking.gke.io/"); n != strings.Count(readFile(t, f), "\nkind:")+boolInt(strings.HasPrefix(readFile(t, f), "kind:")) {
				t.Fatalf("get returned %d objects:\n%s", n, out)
			}
		})
	}
}

// TestStatusRoundTrip writes the seed's status through the status
// subresource and reads it back in the same shape.
func TestStatusRoundTrip(t *testing.T) {
	f := filepath.Join(exampleDir(), "networkgatewaygroup-status.yaml")
	var want struct {
		Status map[string]any `json:"status"`
	}
	if err := yaml.Unmarshal([]byte(readFile(t, f)), &want); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := kubectl(t, "", "apply", "-f", f); err != nil {
		t.Fatalf("apply: %v: %s", err, errOut)
	}
	patch, err := yaml.YAMLToJSON([]byte(mustYAML(t, map[string]any{"status": want.Status})))
	if err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := kubectl(t, "", "patch", "ngg", "default", "-n", "kube-system", "--subresource=status", "--type=merge", "-p", string(patch)); err != nil {
		t.Fatalf("patch status: %v: %s", err, errOut)
	}
	out, errOut, err := kubectl(t, "", "get", "ngg", "default", "-n", "kube-system", "-o", "yaml")
	if err != nil {
		t.Fatalf("get: %v: %s", err, errOut)
	}
	var got struct {
		Status map[string]any `json:"status"`
	}
	if err := yaml.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Status, want.Status) {
		t.Fatalf("status read back as\n%v\nwant\n%v", got.Status, want.Status)
	}
}

// TestPrinterColumns checks what kubectl get prints for both kinds and the
// egressnat category.
func TestPrinterColumns(t *testing.T) {
	gw := gatewayYAML("columns", "  floatingIPs:\n  - 192.0.2.100\n  - 192.0.2.101\n")
	pol := strings.Replace(policyYAML(t, "columns", "", ""), "name: default", "name: columns", 1)
	for _, obj := range []string{gw, pol} {
		if _, errOut, err := kubectl(t, obj, "apply", "-f", "-"); err != nil {
			t.Fatalf("apply: %v: %s", err, errOut)
		}
	}
	for _, p := range [][]string{
		{"ngg", "columns", "-n", "kube-system", `{"status":{"assignedCount":2,"floatingIPs":{"192.0.2.100":"worker1","192.0.2.101":"worker2"},"conditions":[{"type":"Ready","status":"True","reason":"Assigned","message":"all floating IPs assigned","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}`},
		{"enp", "columns", `{"status":{"egressIP":"192.0.2.100","gatewayNode":"worker1","conditions":[{"type":"Ready","status":"True","reason":"Applied","message":"applied","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}`},
	} {
		args := append([]string{"patch"}, p[:len(p)-1]...)
		args = append(args, "--subresource=status", "--type=merge", "-p", p[len(p)-1])
		if _, errOut, err := kubectl(t, "", args...); err != nil {
			t.Fatalf("patch status: %v: %s", err, errOut)
		}
	}

	out, errOut, err := kubectl(t, "", "get", "ngg", "columns", "-n", "kube-system")
	if err != nil {
		t.Fatalf("get ngg: %v: %s", err, errOut)
	}
	assertRow(t, out, []string{"NAME", "FLOATING IPS", "ASSIGNED", "READY", "AGE"}, []string{"columns", "192.0.2.100", "192.0.2.101", "2", "True"})

	out, errOut, err = kubectl(t, "", "get", "enp", "columns")
	if err != nil {
		t.Fatalf("get enp: %v: %s", err, errOut)
	}
	assertRow(t, out, []string{"NAME", "GATEWAY", "EGRESS IP", "NODE", "READY", "AGE"}, []string{"columns", "192.0.2.100", "worker1", "True"})

	out, errOut, err = kubectl(t, "", "get", "ngg,enp", "-A")
	if err != nil {
		t.Fatalf("get ngg,enp: %v: %s", err, errOut)
	}
	for _, want := range []string{"networkgatewaygroup.networking.gke.io/columns", "egressnatpolicy.networking.gke.io/columns", "EGRESS IP", "FLOATING IPS"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get ngg,enp -A lacks %q:\n%s", want, out)
		}
	}

	out, errOut, err = kubectl(t, "", "get", "egressnat", "-A", "-o", "name")
	if err != nil {
		t.Fatalf("get egressnat: %v: %s", err, errOut)
	}
	for _, want := range []string{"networkgatewaygroup.networking.gke.io/columns", "egressnatpolicy.networking.gke.io/columns"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get egressnat (the category) lacks %q:\n%s", want, out)
		}
	}
}

// assertRow checks the header has the columns in order and that one line
// holds every cell.
func assertRow(t *testing.T, out string, header, cells []string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	pos := -1
	for _, h := range header {
		i := strings.Index(lines[0], h)
		if i <= pos {
			t.Fatalf("header lacks %q in order %v:\n%s", h, header, out)
		}
		pos = i
	}
	for _, l := range lines[1:] {
		ok := true
		for _, c := range cells {
			ok = ok && strings.Contains(l, c)
		}
		if ok {
			return
		}
	}
	t.Fatalf("no row holds %v:\n%s", cells, out)
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mustYAML(t *testing.T, v any) string {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
