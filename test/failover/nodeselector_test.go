package failover

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
)

// labelNode sets (value != "") or removes a label on a node, and removes it
// again after the test.
func labelNode(t *testing.T, node, key, value string) {
	t.Helper()
	arg := key + "=" + value
	if value == "" {
		arg = key + "-"
	}
	if _, err := c.Kubectl(ctxT(t), "", "label", "node", node, "--overwrite", arg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.Kubectl(ctx, "", "label", "node", node, key+"-") //nolint:errcheck
	})
}

// A gateway's spec.nodeSelector: only the selected node (worker2, although
// worker1 comes first by name) holds its IPs; when it dies, the IPs go to
// no other node (the Ready condition says why) until another node is
// labelled, which then takes them; the returning node takes nothing back.
func TestNodeSelectorHonoured(t *testing.T) {
	const key = "egressnat.io/gateway"
	labelNode(t, "worker2", key, "true")
	yaml := cluster.SeedGateway + "  nodeSelector:\n    matchLabels:\n      " + key + ": \"true\"\n---\n" + cluster.SeedPolicy
	p, holder := setup(t, yaml)
	if holder != "worker2" {
		t.Fatalf("%s held by %s, want worker2, the only node the nodeSelector selects", fip100, holder)
	}
	for _, ip := range []string{"192.0.2.101", "192.0.2.102"} {
		if h := holderOfNoFail(mustAddr(ip)); h != "worker2" {
			t.Errorf("%s held by %q, want worker2", ip, h)
		}
	}

	if err := c.KillNode("worker2"); err != nil {
		t.Fatal(err)
	}
	revived := false
	t.Cleanup(func() {
		if !revived {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := c.ReviveNode(ctx, "worker2", 10*time.Second); err != nil {
				t.Logf("revive worker2: %v", err)
				c.Heal("worker2") //nolint:errcheck
			}
		}
	})
	// The IPs leave worker2's status and go nowhere: worker1 and cp1 are
	// Up in the subnet but not selected.
	deadline := time.Now().Add(10 * time.Second)
	for holderOfNoFail(fip100) != "" {
		if time.Now().After(deadline) {
			t.Fatalf("%s still held by %s 10 s after worker2 died", fip100, holderOfNoFail(fip100))
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, err := c.Kubectl(ctxT(t), "", "get", "ngg", "default", "-n", "kube-system", "-o",
		`jsonpath={.status.conditions[?(@.type=="Ready")].message}`)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "spec.nodeSelector selects (worker2)") {
		t.Errorf("Ready message %q does not say the selected nodes are down", out)
	}
	for range 10 { // and stay nowhere, on no node's uplink either
		time.Sleep(200 * time.Millisecond)
		if h := holderOfNoFail(fip100); h != "" {
			t.Fatalf("%s given to %s, which the nodeSelector does not select", fip100, h)
		}
		holders, err := c.Holders(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range holders[fip100] {
			if n != "worker2" { // the dead node's kernel keeps its addresses
				t.Fatalf("%s on %s's uplink", fip100, n)
			}
		}
	}

	labelNode(t, "worker1", key, "true")
	if h := waitHolder(t, fip100, "", 10*time.Second); h != "worker1" {
		t.Fatalf("%s went to %s after labelling worker1", fip100, h)
	}
	if _, err := c.WaitSource(ctxT(t), p, ext1(), fip100, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	revive(t, "worker2")
	revived = true
	settleNoDuplicates(t, 10*time.Second)
	if h := holderOf(t, fip100); h != "worker1" {
		t.Fatalf("%s moved back to %s when worker2 returned", fip100, h)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
