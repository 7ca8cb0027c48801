// Package floor proves the oldest Kubernetes release egressnat supports
// (apiserver.FloorKubeVersion, docs/operations.md): on that release's real
// kube-apiserver, with its kubectl, the CRDs install (the API server
// compiles their CEL rules), `kubectl apply -k manifests/` installs
// everything, the examples apply, rules of each CEL library the CRDs use
// reject bad objects, and the agents' Lease admission policy holds an
// agent to its own node's Lease.
//
// The release before the floor refuses the CRDs: an API server of release
// N compiles a new rule only with the CEL libraries of release N-1 and
// older, and the rules use the format library of 1.31.
package floor

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/cluster"
	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

const systemNS = "egressnat-system"

var (
	// srv is nil under -short: the tests then skip (see needServer).
	srv  *apiserver.Server
	root string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var err error
	if root, err = apiserver.RepoRoot(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Build (minutes on a cold cache) before the start's deadline.
	if _, _, err := apiserver.FloorBinaries(); err != nil {
		fmt.Fprintln(os.Stderr, "build the floor release:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	srv, err = apiserver.Start(ctx, apiserver.Options{Floor: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start api server:", err)
		return 1
	}
	defer srv.Stop()
	return m.Run()
}

func needServer(t *testing.T) context.Context {
	t.Helper()
	if srv == nil {
		t.Skip("needs the floor release's kube-apiserver, etcd and kubectl (skipped under -short)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func kubectl(t *testing.T, ctx context.Context, stdin string, args ...string) (string, error) {
	t.Helper()
	var in *strings.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	var out, errOut string
	var err error
	if in != nil {
		out, errOut, err = srv.Kubectl(ctx, in, args...)
	} else {
		out, errOut, err = srv.Kubectl(ctx, nil, args...)
	}
	return out + errOut, err
}

// TestFloor runs in order: the server is the floor release, the manifests
// install, the examples apply, the CEL rules reject, the admission policy
// holds.
func TestFloor(t *testing.T) {
	ctx := needServer(t)

	// The server and kubectl are the floor release.
	out, errOut, err := srv.Kubectl(ctx, nil, "version", "-o", "json")
	if err != nil {
		t.Fatalf("kubectl version: %v\n%s%s", err, out, errOut)
	}
	type info struct {
		GitVersion string `json:"gitVersion"`
	}
	var versions struct {
		Client info `json:"clientVersion"`
		Server info `json:"serverVersion"`
	}
	if err := json.Unmarshal([]byte(out), &versions); err != nil {
		t.Fatalf("kubectl version: %v\n%s", err, out)
	}
	if versions.Client.GitVersion != apiserver.FloorKubeVersion || versions.Server.GitVersion != apiserver.FloorKubeVersion {
		t.Fatalf("kubectl %s, kube-apiserver %s: want %s", versions.Client.GitVersion, versions.Server.GitVersion, apiserver.FloorKubeVersion)
	}

	t.Run("install", func(t *testing.T) {
		// The CRDs first, as kubectl apply -k orders them, then everything
		// (strict server-side field validation: a field this release does
		// not know is an error).
		if err := srv.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
			t.Fatal(err)
		}
		out, err := kubectl(t, ctx, "", "apply", "-k", filepath.Join(root, "manifests"))
		if err != nil {
			t.Fatalf("kubectl apply -k manifests/: %v\n%s", err, out)
		}
		for _, want := range []string{"daemonset.apps/egressnat-agent", "deployment.apps/egressnat-operator",
			"validatingadmissionpolicy.admissionregistration.k8s.io/egressnat-agent-own-lease", "clusterrole.rbac.authorization.k8s.io/egressnat-view"} {
			if !strings.Contains(out, want) {
				t.Errorf("kubectl apply -k manifests/ did not apply %s:\n%s", want, out)
			}
		}
		if out, err := kubectl(t, ctx, "", "apply", "--dry-run=server", "-k", filepath.Join(root, "manifests", "single-node")); err != nil {
			t.Errorf("kubectl apply --dry-run=server -k manifests/single-node/: %v\n%s", err, out)
		}
	})
	t.Run("examples", func(t *testing.T) {
		files, _ := filepath.Glob(filepath.Join(root, "manifests", "examples", "*.yaml"))
		if len(files) == 0 {
			t.Fatal("no examples")
		}
		for _, f := range files {
			if out, err := kubectl(t, ctx, "", "apply", "-f", f); err != nil {
				t.Errorf("kubectl apply -f %s: %v\n%s", filepath.Base(f), err, out)
			}
		}
	})
	t.Run("cel", func(t *testing.T) {
		gateway := func(name, ip string) string {
			return "apiVersion: networking.gke.io/v1\nkind: NetworkGatewayGroup\nmetadata: {namespace: kube-system, name: " + name +
				"}\nspec: {floatingIPs: [" + ip + "]}\n"
		}
		policy := func(name, labelKey, cidr, gateway string) string {
			return "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata: {name: " + name + "}\nspec:\n" +
				"  sources: [{namespaceSelector: {matchLabels: {'" + labelKey + "': alice}}, podSelector: {}}]\n" +
				"  action: SNAT\n  destinations: [{cidr: '" + cidr + "'}]\n  gatewayRef: {name: '" + gateway + "', namespace: kube-system}\n"
		}
		for _, c := range []struct {
			name, yaml, want string // want "" is valid
		}{
			{"valid gateway", gateway("floor-gw", "192.0.2.100"), ""},
			{"valid policy", policy("floor-ok", "user", "203.0.113.0/24", "floor-gw"), ""},
			// ip and cidr libraries (1.30): test/badinput floating-ip-127.0.0.1.
			{"loopback floating IP", gateway("floor-loop", "127.0.0.1"), "must be a unicast address a node can hold: 127.0.0.0/8 is loopback"},
			// cidr library and string functions in a messageExpression:
			// test/badinput destination-not-canonical.
			{"destination with host bits", policy("floor-canon", "user", "203.0.113.7/24", "floor-gw"),
				"must be in canonical form with the host bits zero: write 203.0.113.0/24 instead of 203.0.113.7/24"},
			// format library (1.31): test/badinput selector-bad-label-key,
			// and a gatewayRef that is no object name.
			{"bad label key", policy("floor-key", "bad key!", "203.0.113.0/24", "floor-gw"), "matchLabels keys must be valid label keys"},
			{"bad gateway name", policy("floor-name", "user", "203.0.113.0/24", "Floor_GW"), "must be a valid object name"},
		} {
			out, err := kubectl(t, ctx, c.yaml, "apply", "-f", "-")
			switch {
			case c.want == "" && err != nil:
				t.Errorf("%s: rejected: %v\n%s", c.name, err, out)
			case c.want != "" && err == nil:
				t.Errorf("%s: accepted, want %q", c.name, c.want)
			case c.want != "" && !strings.Contains(out, c.want):
				t.Errorf("%s: %s\nwant %q", c.name, out, c.want)
			}
		}
	})
	t.Run("lease-policy", func(t *testing.T) { ownLease(t, ctx) })
}

// ownLease: a token of the agents' ServiceAccount bound to a pod on node
// floor-a (the floor release puts the node's name in it) writes
// egressnat-agent-floor-a only; the operators' leader Lease is refused to
// it.
func ownLease(t *testing.T, ctx context.Context) {
	admin, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"floor-a", "floor-b"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	pod, err := admin.CoreV1().Pods(systemNS).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "egressnat-agent-floor"},
		Spec: corev1.PodSpec{NodeName: "floor-a", ServiceAccountName: "egressnat-agent", AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{{Name: "agent", Image: "registry.k8s.io/pause:3.10"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // for go test -count=2, which reuses the server
		ctx := context.Background()
		admin.CoreV1().Pods(systemNS).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))}) //nolint:errcheck
		admin.CoordinationV1().Leases(systemNS).Delete(ctx, "egressnat-agent-floor-a", metav1.DeleteOptions{})          //nolint:errcheck
	})
	token, err := cluster.MintToken(ctx, admin, systemNS, "egressnat-agent", time.Hour, &authenticationv1.BoundObjectReference{
		Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
	if err != nil {
		t.Fatal(err)
	}
	cfg := srv.Config()
	cfg.BearerToken = token
	agent, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	leases := agent.CoordinationV1().Leases(systemNS)
	lease := func(name string) *coordinationv1.Lease {
		return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To("floor-a"), LeaseDurationSeconds: ptr.To(int32(90))}}
	}
	if _, err := leases.Create(ctx, lease("egressnat-agent-floor-a"), metav1.CreateOptions{}); err != nil {
		t.Errorf("create own lease: %v", err)
	}
	for name, want := range map[string]string{
		"egressnat-agent-floor-b": "may only write the Lease of its own node: egressnat-agent-floor-a",
		"egressnat-operator":      "(the operators' leader Lease)",
	} {
		_, err := leases.Create(ctx, lease(name), metav1.CreateOptions{})
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), want) {
			t.Errorf("create lease %s: %v, want Forbidden with %q", name, err, want)
		}
	}
}
