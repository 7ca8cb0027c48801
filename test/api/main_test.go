// Package api_test proves the networking.gke.io/v1 CRDs against a real
// kube-apiserver with etcd and the real kubectl: they install, the seed's
// examples apply, bad objects are rejected with readable messages, and
// kubectl prints the columns.
package api_test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
)

// srv is nil under -short: the tests then skip (see needServer).
var srv *apiserver.Server

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
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
	srv, err = apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start api server:", err)
		return 1
	}
	defer srv.Stop()
	if err := srv.InstallCRDs(ctx, crdDir()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

func crdDir() string     { return filepath.Join(repoRoot(), "manifests", "crds") }
func exampleDir() string { return filepath.Join(repoRoot(), "manifests", "examples") }

func repoRoot() string {
	root, err := apiserver.RepoRoot()
	if err != nil {
		panic(err)
	}
	return root
}

// kubectl runs kubectl with stdin and fails the test on a context timeout.
func kubectl(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	needServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var in *strings.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	if in == nil {
		return srv.Kubectl(ctx, nil, args...)
	}
	return srv.Kubectl(ctx, in, args...)
}
