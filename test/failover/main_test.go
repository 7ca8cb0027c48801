// Package failover proves failover on the lab cluster with the real
// binaries: a gateway node's death, a partition and its healing, a returning
// node, the operator leader's death, an API server outage, an agent crash,
// and no node available. Each test asserts the source IP the external server
// sees and that no two nodes hold one IP.
package failover

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

var (
	fip100 = netip.MustParseAddr("192.0.2.100")
	cp1IP  = netip.MustParseAddr("192.0.2.11")
)

// TestMain starts the lab cluster; under -short nothing runs, as every
// test needs it.
func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("skipping: needs root, network namespaces, etcd and kube-apiserver (the lab cluster)")
		os.Exit(0)
	}
	os.Exit(cluster.TestMain(m, "enat-fo-", &c))
}

func ext1() *lab.External { return c.Lab.External("ext1") }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

var scenario = cluster.SeedScenario

// setup applies the scenario and returns a selected pod on cp1 whose
// traffic leaves with 192.0.2.100, and the node holding it.
func setup(t *testing.T, yaml string) (*cluster.Pod, string) {
	t.Helper()
	ctx := ctxT(t)
	if _, err := c.Kubectl(ctx, yaml, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.Kubectl(ctx, yaml, "delete", "--ignore-not-found", "-f", "-") //nolint:errcheck
		// Wait until no node holds a floating IP, for the next test.
		for range 100 {
			if h, err := c.Holders(ctx); err == nil && len(h) == 0 {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	if err := c.EnsureNamespace(ctx, "alice", map[string]string{"user": "alice"}); err != nil {
		t.Fatal(err)
	}
	p, err := c.AddPod(ctx, "cp1", "alice", fmt.Sprintf("web-%d", time.Now().UnixNano()%100000), map[string]string{"role": "frontend"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.DeletePod(context.Background(), p) }) //nolint:errcheck
	if _, err := c.WaitSource(ctx, p, ext1(), fip100, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	holder := holderOf(t, fip100)
	if holder == "cp1" {
		// The control plane (API server, operators) runs on cp1: the
		// tests fail the holder, never the control plane. Workers come
		// before control-plane nodes, so a worker must hold it.
		t.Fatalf("%s held by cp1, not by a worker", fip100)
	}
	return p, holder
}

// holderOf returns the node whose status holds ip, failing when none does.
func holderOf(t *testing.T, ip netip.Addr) string {
	t.Helper()
	out, err := c.Kubectl(ctxT(t), "", "get", "ngg", "-A", "-o", `jsonpath={range .items[*]}{.status.floatingIPs}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	key := `"` + ip.String() + `":"`
	if i := strings.Index(out, key); i >= 0 {
		rest := out[i+len(key):]
		return rest[:strings.Index(rest, `"`)]
	}
	t.Fatalf("no status holds %s: %s", ip, out)
	return ""
}

// waitHolder waits until the status gives ip to a node other than not.
func waitHolder(t *testing.T, ip netip.Addr, not string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if h := holderOfNoFail(ip); h != "" && h != not {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still on %s after %v", ip, not, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func holderOfNoFail(ip netip.Addr) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := c.Kubectl(ctx, "", "get", "ngg", "-A", "-o", `jsonpath={range .items[*]}{.status.floatingIPs}{"\n"}{end}`)
	if err != nil {
		return ""
	}
	key := `"` + ip.String() + `":"`
	if i := strings.Index(out, key); i >= 0 {
		rest := out[i+len(key):]
		return rest[:strings.Index(rest, `"`)]
	}
	return ""
}

// noDuplicates asserts that no floating IP is on two nodes, and that each
// is on the node the status names.
func noDuplicates(t *testing.T) {
	t.Helper()
	holders, err := c.Holders(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for ip, nodes := range holders {
		if len(nodes) != 1 {
			t.Fatalf("%s is held by %v", ip, nodes)
		}
		if want := holderOfNoFail(ip); want != "" && want != nodes[0] {
			t.Fatalf("%s is on %s, status says %s", ip, nodes[0], want)
		}
	}
}

// settleNoDuplicates waits for the state to converge, then asserts.
func settleNoDuplicates(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		holders, err := c.Holders(ctxT(t))
		ok := err == nil
		for ip, nodes := range holders {
			ok = ok && len(nodes) == 1 && holderOfNoFail(ip) == nodes[0]
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			noDuplicates(t)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
