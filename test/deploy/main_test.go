package deploy

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/cluster"
	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
)

const systemNS = "egressnat-system"

var (
	// srv is nil under -short: the tests that need it skip (needServer).
	srv  *apiserver.Server
	root string
	// docs are the rendered manifests (kubectl kustomize manifests/).
	docs []map[string]any
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

// needServer skips t when no API server runs (go test -short).
func needServer(t *testing.T) {
	t.Helper()
	if srv == nil {
		t.Skip("needs kube-apiserver, etcd and kubectl (skipped under -short)")
	}
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var err error
	if root, err = apiserver.RepoRoot(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if testing.Short() {
		return m.Run()
	}
	srv, err = apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start api server:", err)
		return 1
	}
	defer srv.Stop()
	if err := srv.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Namespace, ServiceAccounts, RBAC and admission policy, for real.
	if err := cluster.ApplyManifests(ctx, srv, root); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if docs, err = cluster.RenderManifests(ctx, srv, root); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	needServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// rendered returns the one rendered document of kind and name.
func rendered(t *testing.T, kind, name string) map[string]any {
	t.Helper()
	needServer(t)
	var found []map[string]any
	for _, d := range docs {
		md, _ := d["metadata"].(map[string]any)
		if d["kind"] == kind && md["name"] == name {
			found = append(found, d)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d rendered %s %s, want 1", len(found), kind, name)
	}
	return found[0]
}

// decode converts a rendered document into a typed object.
func decode(t *testing.T, doc map[string]any, into runtime.Object) {
	t.Helper()
	b, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		t.Fatalf("decode %s: %v", doc["kind"], err)
	}
}

func daemonSet(t *testing.T) *appsv1.DaemonSet {
	var ds appsv1.DaemonSet
	decode(t, rendered(t, "DaemonSet", "egressnat-agent"), &ds)
	return &ds
}

func deployment(t *testing.T) *appsv1.Deployment {
	var d appsv1.Deployment
	decode(t, rendered(t, "Deployment", "egressnat-operator"), &d)
	return &d
}
