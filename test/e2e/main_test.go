// Package e2e runs the seed's packet flow end to end on one machine: the lab
// network in network namespaces, a real kube-apiserver with etcd, the real
// kubectl, and the real egressnat-operator and egressnat-agent binaries.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

var c *cluster.Cluster

// Lab addresses (see package lab): nodes and the floating IPs of the seed.
var (
	cp1IP     = netip.MustParseAddr("192.0.2.11")
	worker1IP = netip.MustParseAddr("192.0.2.12")
	worker2IP = netip.MustParseAddr("192.0.2.13")
	fip100    = netip.MustParseAddr("192.0.2.100")
	fip101    = netip.MustParseAddr("192.0.2.101")
	fip102    = netip.MustParseAddr("192.0.2.102")
)

// ModeEnv chooses the lab's pod network, reverse-path filtering, CNI
// masquerade, MTUs and kube-proxy mode (cluster.ParseMode), e.g.
// EGRESSNAT_E2E_MODE=overlay/strict/iptables-nft/kp-iptables. `make test`
// runs the suite once per mode of its matrix (E2E_MATRIX in the
// Makefile); unset, the default lab: routed/loose/iptables-nft, kube-proxy
// in nftables mode.
const ModeEnv = "EGRESSNAT_E2E_MODE"

// The agents check their table every 3 s (TestDriftRepaired). Under
// -short nothing runs: every test needs the lab cluster. A real kube-proxy
// runs on every node (TestServices), and a real NetworkPolicy
// implementation (TestNetworkPolicyDropsFirst).
func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("skipping: needs root, network namespaces, etcd and kube-apiserver (the lab cluster)")
		os.Exit(0)
	}
	network, kp, err := cluster.ParseMode(os.Getenv(ModeEnv))
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", ModeEnv, err)
		os.Exit(2)
	}
	os.Exit(cluster.TestMainOptions(m, cluster.Options{Prefix: "enat-e2e-", AgentArgs: []string{"--resync=3s"},
		KubeProxy: true, KubeProxyMode: kp, Network: network, NetworkPolicy: true,
		Classifier: cluster.ModeClassifier(os.Getenv(ModeEnv))}, &c))
}

func ext1() *lab.External { return c.Lab.External("ext1") } // 203.0.113.10
func ext2() *lab.External { return c.Lab.External("ext2") } // 198.51.100.10

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// apply applies YAML with the real kubectl and deletes it when the test ends.
func apply(t *testing.T, yaml string) {
	t.Helper()
	ctx := ctxT(t)
	if _, err := c.Kubectl(ctx, yaml, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := c.Kubectl(ctx, yaml, "delete", "--ignore-not-found", "--wait=false", "-f", "-"); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// namespace creates a namespace with labels and deletes it after the test.
func namespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	ctx := ctxT(t)
	if err := c.EnsureNamespace(ctx, name, labels); err != nil {
		t.Fatal(err)
	}
}

// pod creates a pod and removes it after the test.
func pod(t *testing.T, node, ns, name string, labels map[string]string) *cluster.Pod {
	t.Helper()
	ctx := ctxT(t)
	p, err := c.AddPod(ctx, node, ns, name, labels)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.DeletePod(context.Background(), p); err != nil {
			t.Errorf("cleanup pod: %v", err)
		}
	})
	return p
}

// wantSource waits until new TCP connections from p to ext leave with ip.
func wantSource(t *testing.T, p *cluster.Pod, ext *lab.External, ip netip.Addr) {
	t.Helper()
	if got, err := c.WaitSource(ctxT(t), p, ext, ip, 15*time.Second); err != nil {
		t.Fatalf("pod %s on %s -> %s: saw source %v, want %s: %v", p.Name, p.Node, ext.IP, got, ip, err)
	}
}

// keepSource checks that, for a while, new connections keep leaving with ip
// (guards against a check that passes before the agents act).
func keepSource(t *testing.T, p *cluster.Pod, ext *lab.External, ip netip.Addr) {
	t.Helper()
	wantSource(t, p, ext, ip)
	for range 5 {
		time.Sleep(200 * time.Millisecond)
		src, err := c.Source(ctxT(t), p, ext)
		if err != nil {
			t.Fatalf("pod %s -> %s: %v", p.Name, ext.IP, err)
		}
		if src.Addr() != ip {
			t.Fatalf("pod %s -> %s: source changed to %s, want %s", p.Name, ext.IP, src.Addr(), ip)
		}
	}
}

func nodeExec(t *testing.T, node string, argv ...string) string {
	t.Helper()
	out, err := c.Lab.Exec(ctxT(t), c.Lab.Node(node).NetNS, argv...)
	if err != nil {
		t.Fatalf("%s on %s: %v\n%s", strings.Join(argv, " "), node, err, out)
	}
	return string(out)
}

var (
	seedGateway = cluster.SeedGateway
	seedPolicy  = cluster.SeedPolicy
)
