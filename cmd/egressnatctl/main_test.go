package main

// The command against a real kube-apiserver (package test/apiserver): the
// objects of testdata/objects.yaml with fixed statuses, and the outputs of
// status and explain compared with golden files. Run with -update to
// rewrite them.

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/ctl"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/test/apiserver"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var srv *apiserver.Server

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("skipping: needs kube-apiserver, etcd and kubectl")
		os.Exit(0)
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var err error
	srv, err = apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start api server:", err)
		return 1
	}
	defer srv.Stop()
	root, err := apiserver.RepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := srv.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := createObjects(ctx, filepath.Join("testdata", "objects.yaml")); err != nil {
		fmt.Fprintln(os.Stderr, "create objects:", err)
		return 1
	}
	return m.Run()
}

var gvrs = map[string]schema.GroupVersionResource{
	"Namespace":           {Version: "v1", Resource: "namespaces"},
	"Node":                {Version: "v1", Resource: "nodes"},
	"Pod":                 {Version: "v1", Resource: "pods"},
	"NetworkGatewayGroup": kube.GatewayGVR,
	"EgressNATPolicy":     kube.PolicyGVR,
	"Lease":               {Group: "coordination.k8s.io", Version: "v1", Resource: "leases"},
}

// createObjects creates every object of the file, then writes its status.
// Pods get a container and their namespace a default ServiceAccount, as
// the controller manager (absent here) would create.
func createObjects(ctx context.Context, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(srv.Config())
	if err != nil {
		return err
	}
	core, err := srv.Client()
	if err != nil {
		return err
	}
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			return err
		}
		u := &unstructured.Unstructured{Object: obj}
		gvr, ok := gvrs[u.GetKind()]
		if !ok {
			return fmt.Errorf("unknown kind %s", u.GetKind())
		}
		status, hasStatus := obj["status"]
		if u.GetKind() == "Pod" {
			spec := obj["spec"].(map[string]any)
			spec["containers"] = []any{map[string]any{"name": "app", "image": "registry.k8s.io/pause:3.10"}}
			spec["automountServiceAccountToken"] = false
		}
		var ri dynamic.ResourceInterface = dyn.Resource(gvr)
		if ns := u.GetNamespace(); ns != "" {
			ri = dyn.Resource(gvr).Namespace(ns)
		}
		created, err := ri.Create(ctx, u, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create %s %s: %w", u.GetKind(), u.GetName(), err)
		}
		if u.GetKind() == "Namespace" {
			_, err := core.CoreV1().ServiceAccounts(u.GetName()).Create(ctx, &corev1.ServiceAccount{
				ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
			if err != nil && !apierrors.IsAlreadyExists(err) {
				return err
			}
		}
		if hasStatus && u.GetKind() != "Namespace" {
			created.Object["status"] = status
			if _, err := ri.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
				return fmt.Errorf("status of %s %s: %w", u.GetKind(), u.GetName(), err)
			}
		}
	}
	return nil
}

// ctlRun runs the command as the binary would, against the test server.
func ctlRun(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	code = ctl.Main(ctx, "egressnatctl", append([]string{"--kubeconfig", srv.Kubeconfig}, args...), &out, &errOut)
	return out.String(), errOut.String(), code
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from %s (go test -update rewrites it):\n--- got\n%s--- want\n%s", name, path, got, want)
	}
}

// TestGolden: status in three formats and explain for each kind of pod.
func TestGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"status", []string{"status"}},
		{"status-json", []string{"status", "-o", "json"}},
		{"status-yaml", []string{"status", "-o", "yaml"}},
		// Selected by source 0 of egress, rerouted to the holder.
		{"explain-selected", []string{"explain", "pod", "alice/web", "--to", "203.0.113.10"}},
		// Selected by egress and partners; the destination only by
		// partners, whose egress IP no node holds.
		{"explain-dropped", []string{"explain", "pod", "alice/web-gw", "--to", "198.51.100.7"}},
		// Both policies cover the destination: the longest prefix applies.
		{"explain-overlap", []string{"explain", "pod", "alice/web-gw", "--to", "203.0.113.200"}},
		// No node holds the egress IP, and status.whenUnavailable is
		// NodeIP: the traffic keeps the node IP.
		{"explain-fallback", []string{"explain", "pod", "paul/legacy", "--to", "198.51.100.7"}},
		// Selected on the holder's own node? No: paul/web on cp1 by source
		// 1; stale-ref also selects it but its gateway is gone.
		{"explain-stale-ref", []string{"explain", "--to", "192.0.2.200", "pod", "paul/web"}},
		// Not selected: namespace and pod labels fail.
		{"explain-not-selected", []string{"explain", "pod", "alice/db", "--to", "203.0.113.10"}},
		{"explain-wrong-namespace", []string{"explain", "pod", "carol/web"}},
		{"explain-host-network", []string{"explain", "pod", "carol/host"}},
		{"explain-no-ip", []string{"explain", "pod", "alice/pending"}},
		{"explain-terminated", []string{"explain", "pod", "alice/done"}},
		{"explain-json", []string{"explain", "pod", "alice/web", "--to", "203.0.113.10", "-o", "json"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := ctlRun(t, tc.args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errOut)
			}
			golden(t, tc.name, out)
		})
	}
}

// TestErrors: one clear line for a missing pod, an unreachable API server
// and missing CRDs.
func TestErrors(t *testing.T) {
	if _, errOut, code := ctlRun(t, "explain", "pod", "alice/nope"); code != 1 || errOut != "egressnatctl: pod alice/nope not found\n" {
		t.Errorf("missing pod: exit %d, %q", code, errOut)
	}

	dead := filepath.Join(t.TempDir(), "dead.kubeconfig")
	if err := apiserver.WriteKubeconfig(dead, "https://127.0.0.1:1", "x"); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code := ctl.Main(context.Background(), "egressnatctl", []string{"status", "--kubeconfig", dead}, &out, &errOut)
	if code != 1 || !strings.HasPrefix(errOut.String(), "egressnatctl: cannot reach the Kubernetes API at https://127.0.0.1:1: ") ||
		!strings.Contains(errOut.String(), "connection refused") || strings.Count(errOut.String(), "\n") != 1 {
		t.Errorf("unreachable: exit %d, %q", code, errOut.String())
	}

	t.Setenv("KUBECONFIG", dead) // the default when --kubeconfig is absent
	errOut.Reset()
	if code := ctl.Main(context.Background(), "egressnatctl", []string{"explain", "pod", "a/b"}, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), "cannot reach the Kubernetes API at https://127.0.0.1:1") {
		t.Errorf("$KUBECONFIG: exit %d, %q", code, errOut.String())
	}

	// A second API server without the CRDs.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bare, err := apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Stop()
	for _, args := range [][]string{{"status"}, {"explain", "pod", "default/x"}} {
		errOut.Reset()
		code := ctl.Main(ctx, "egressnatctl", append([]string{"--kubeconfig", bare.Kubeconfig}, args...), &out, &errOut)
		want := "egressnatctl: the networking.gke.io CRDs are not installed: kubectl apply -k manifests/\n"
		if args[0] == "explain" {
			want = "egressnatctl: pod default/x not found\n" // the pod is looked up first
		}
		if code != 1 || errOut.String() != want {
			t.Errorf("%v without CRDs: exit %d, %q, want %q", args, code, errOut.String(), want)
		}
	}
}
