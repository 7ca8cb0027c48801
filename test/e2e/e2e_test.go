package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
	"sigs.k8s.io/yaml"
)

var (
	alice    = map[string]string{"user": "alice"}
	paul     = map[string]string{"user": "paul"}
	frontend = map[string]string{"role": "frontend"}
)

// 1. A selected pod on a non-gateway node and one on the gateway node itself
// reach the external server with the floating IP over TCP, UDP and ping.
func TestSelectedPodLeavesWithFloatingIP(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	remote := pod(t, "worker2", "alice", "web", frontend) // worker1 holds 192.0.2.100
	local := pod(t, "worker1", "alice", "web-gw", frontend)
	for _, p := range []*cluster.Pod{remote, local} {
		wantSource(t, p, ext1(), fip100)
		ctx := ctxT(t)
		reply, err := lab.UDPExchange(ctx, p.NetNS, ext1().UDPAddr(), "hello")
		if err != nil {
			t.Fatalf("udp from %s: %v", p.Name, err)
		}
		if ap, err := netip.ParseAddrPort(strings.TrimSpace(reply)); err != nil || ap.Addr() != fip100 {
			t.Fatalf("udp from %s on %s: external saw %q, want %s", p.Name, p.Node, reply, fip100)
		}
		id, err := lab.Ping(ctx, p.NetNS, ext1().IP)
		if err != nil {
			t.Fatalf("ping from %s: %v", p.Name, err)
		}
		src, err := ext1().ICMPSource(ctx, id)
		if err != nil || src != fip100 {
			t.Fatalf("ping from %s on %s: external saw %v (%v), want %s", p.Name, p.Node, src, err, fip100)
		}
	}
}

// 2. Unselected pods, and selected pods talking outside the destination
// CIDRs, leave with their node IP.
func TestUnselectedTrafficKeepsNodeIP(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	namespace(t, "carol", map[string]string{"user": "carol"})
	selected := pod(t, "worker2", "alice", "web", frontend)
	wrongLabel := pod(t, "worker2", "alice", "db", map[string]string{"role": "backend"})
	wrongNS := pod(t, "cp1", "carol", "web", frontend)
	wantSource(t, selected, ext1(), fip100) // the policy is in force
	keepSource(t, wrongLabel, ext1(), worker2IP)
	keepSource(t, wrongNS, ext1(), cp1IP)
	keepSource(t, selected, ext2(), worker2IP) // 198.51.100.0/24 is not a destination
}

// 3. Sources are ORed (alice and paul); selectors take any labels and
// matchExpressions.
func TestSourcesOredAndExpressions(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	namespace(t, "paul", paul)
	a := pod(t, "worker2", "alice", "web", frontend)
	p := pod(t, "cp1", "paul", "web", frontend)
	wantSource(t, a, ext1(), fip100)
	wantSource(t, p, ext1(), fip100)

	apply(t, `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: exprs
spec:
  sources:
  - namespaceSelector:
      matchExpressions:
      - key: team
        operator: In
        values: [payments, billing]
    podSelector:
      matchExpressions:
      - key: example.com/tier
        operator: Exists
      - key: canary
        operator: DoesNotExist
  action: SNAT
  destinations:
  - cidr: 198.51.100.0/24
  gatewayRef:
    name: default
    namespace: kube-system
`)
	namespace(t, "payments", map[string]string{"team": "payments"})
	namespace(t, "ops", map[string]string{"team": "ops"})
	in := pod(t, "worker2", "payments", "api", map[string]string{"example.com/tier": "api"})
	canary := pod(t, "worker2", "payments", "api-canary", map[string]string{"example.com/tier": "api", "canary": "yes"})
	otherTeam := pod(t, "worker2", "ops", "api", map[string]string{"example.com/tier": "api"})
	wantSource(t, in, ext2(), fip100)
	keepSource(t, canary, ext2(), worker2IP)
	keepSource(t, otherTeam, ext2(), worker2IP)
}

// 4. Relabeling pods and namespaces, adding and deleting pods, and editing a
// policy take effect without restarts.
func TestChangesTakeEffect(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)
	ctx := ctxT(t)

	// The pod loses its label: new connections use the node IP.
	if err := c.SetPodLabels(ctx, p, map[string]string{"role": "other"}); err != nil {
		t.Fatal(err)
	}
	wantSource(t, p, ext1(), worker2IP)
	if err := c.SetPodLabels(ctx, p, frontend); err != nil {
		t.Fatal(err)
	}
	wantSource(t, p, ext1(), fip100)

	// The namespace loses its label.
	if err := c.EnsureNamespace(ctx, "alice", map[string]string{"user": "mallory"}); err != nil {
		t.Fatal(err)
	}
	wantSource(t, p, ext1(), worker2IP)
	if err := c.EnsureNamespace(ctx, "alice", alice); err != nil {
		t.Fatal(err)
	}
	wantSource(t, p, ext1(), fip100)

	// A new pod is selected; a deleted pod's IP leaves the sets.
	q := pod(t, "cp1", "alice", "web2", frontend)
	wantSource(t, q, ext1(), fip100)
	if err := c.DeletePod(ctx, q); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "deleted pod's IP gone from the gateway's source set", func() bool {
		return !strings.Contains(nodeExec(t, "worker1", "nft", "list", "table", "ip", "egressnat"), q.IP.String())
	})

	// Editing the policy's destinations moves the traffic.
	if _, err := c.Kubectl(ctx, "", "patch", "enp", "egress", "--type=json", "-p",
		`[{"op":"replace","path":"/spec/destinations","value":[{"cidr":"198.51.100.0/24"}]}]`); err != nil {
		t.Fatal(err)
	}
	wantSource(t, p, ext1(), worker2IP)
	wantSource(t, p, ext2(), fip100)
}

// 5. An invalid gatewayRef leaves the policy unapplied with a readable
// condition; fixing it applies it.
func TestInvalidGatewayRef(t *testing.T) {
	apply(t, strings.Replace(seedPolicy, "name: default", "name: missing", 1))
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	waitFor(t, 15*time.Second, "GatewayNotFound condition", func() bool {
		cond := condition(t, "enp", "egress", "Accepted")
		return cond["status"] == "False" && cond["reason"] == "GatewayNotFound" &&
			strings.Contains(fmt.Sprint(cond["message"]), "kube-system/missing")
	})
	keepSource(t, p, ext1(), worker2IP)
	for _, n := range []string{"cp1", "worker1", "worker2"} {
		if out, _ := c.Lab.Exec(ctxT(t), c.Lab.Node(n).NetNS, "nft", "list", "table", "ip", "egressnat"); strings.Contains(string(out), "egress") && strings.Contains(string(out), p.IP.String()) {
			t.Fatalf("node %s applies the unaccepted policy:\n%s", n, out)
		}
	}

	apply(t, strings.Replace(seedGateway, "name: default", "name: missing", 1))
	wantSource(t, p, ext1(), fip100)
	waitFor(t, 15*time.Second, "Accepted and Ready", func() bool {
		return condition(t, "enp", "egress", "Accepted")["status"] == "True" &&
			condition(t, "enp", "egress", "Ready")["status"] == "True"
	})
}

// 6. Three gateways with three policies: each policy's pods leave with
// their own gateway's IP.
func TestThreeGateways(t *testing.T) {
	var objs []string
	for i, ip := range []string{"192.0.2.100", "192.0.2.101", "192.0.2.102"} {
		objs = append(objs, fmt.Sprintf(`apiVersion: networking.gke.io/v1
kind: NetworkGatewayGroup
metadata:
  namespace: kube-system
  name: gateway%d
spec:
  floatingIPs:
  - %s
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: egresspolicy%d
spec:
  sources:
  - namespaceSelector:
      matchLabels:
        user: team%d
    podSelector:
      matchLabels:
        role: frontend
  action: SNAT
  destinations:
  - cidr: 203.0.113.0/24
  gatewayRef:
    name: gateway%d
    namespace: kube-system
`, i+1, ip, i+1, i+1, i+1))
	}
	apply(t, strings.Join(objs, "---\n"))
	want := []netip.Addr{fip100, fip101, fip102}
	for i := range 3 {
		ns := fmt.Sprintf("team%d", i+1)
		namespace(t, ns, map[string]string{"user": ns})
		p := pod(t, "worker2", ns, "web", frontend)
		wantSource(t, p, ext1(), want[i])
	}
}

// 7. NetworkPolicy first: an egress NetworkPolicy that denies a selected
// pod's traffic to the policy's destinations wins over egressnat, enforced
// by a real implementation (kube-router's firewall, iptables and ipset, in
// the pod's node's forward path): nothing reaches the outside, neither
// with the floating IP nor with the node's, and the gateway never sees the
// traffic. What the NetworkPolicy allows still leaves.
func TestNetworkPolicyDropsFirst(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)

	apply(t, `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: no-partner
  namespace: alice
spec:
  podSelector:
    matchLabels:
      role: frontend
  policyTypes:
  - Egress
  egress:
  - to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except:
        - 203.0.113.0/24
`)
	// Until kube-router enforces it (its watch, then its iptables sync).
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := c.Source(ctxT(t), p, ext1()); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the NetworkPolicy was not enforced within 30 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	nodeExec(t, "worker1", "conntrack", "-F")
	for range 3 {
		if src, err := c.Source(ctxT(t), p, ext1()); err == nil {
			t.Fatalf("denied traffic reached the external server from %s", src)
		}
	}
	out, _ := c.Lab.Exec(ctxT(t), c.Lab.Node("worker1").NetNS, "conntrack", "-L", "-s", p.IP.String())
	if strings.Contains(string(out), p.IP.String()) {
		t.Fatalf("the gateway saw denied traffic:\n%s", out)
	}
	// Allowed by the NetworkPolicy, not a policy destination: the node IP.
	keepSource(t, p, ext2(), worker2IP)
}

// 8. The group's status has the seed's shape: two workers and three IPs
// spread as in the seed.
func TestGatewayStatusShape(t *testing.T) {
	apply(t, seedGateway)
	var st map[string]any
	waitFor(t, 15*time.Second, "status assigns all three IPs", func() bool {
		st = status(t, "ngg", "default", "-n", "kube-system")
		ips, _ := st["floatingIPs"].(map[string]any)
		return len(ips) == 3
	})
	wantIPs := map[string]any{"192.0.2.100": "worker1", "192.0.2.101": "worker2", "192.0.2.102": "worker1"}
	if fmt.Sprint(st["floatingIPs"]) != fmt.Sprint(wantIPs) {
		t.Fatalf("status.floatingIPs = %v, want %v", st["floatingIPs"], wantIPs)
	}
	nodes, _ := st["nodes"].(map[string]any)
	for _, n := range []string{"worker1", "worker2"} {
		if nodes[n] != "Up" {
			t.Fatalf("status.nodes[%s] = %v, want Up (nodes: %v)", n, nodes[n], nodes)
		}
	}
	for n, h := range nodes {
		if h != "Up" && h != "Down" {
			t.Fatalf("status.nodes[%s] = %v, want Up or Down", n, h)
		}
	}
	// The holders really hold the addresses (each adds its own after an
	// ARP probe of 100 ms, once it read the status).
	for ip, node := range wantIPs {
		waitFor(t, 5*time.Second, node.(string)+" holds "+ip, func() bool {
			return strings.Contains(nodeExec(t, node.(string), "ip", "-4", "addr", "show", "dev", "eth0"), ip+"/24")
		})
	}
}

// 9. Restarting agents while a pod streams data changes no source and loses
// no connection, and leaves the kernel as it was.
func TestAgentRestartIsInvisible(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)
	before := map[string]string{}
	for _, n := range []string{"worker1", "worker2"} {
		before[n] = settledState(t, n)
	}

	ctx := ctxT(t)
	conn, err := lab.DialTCP(ctx, p.NetNS, ext1().TCPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first, err := lab.EchoLine(ctx, conn, "0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(first, fip100.String()+":") {
		t.Fatalf("stream source %s, want %s", first, fip100)
	}
	done := make(chan error, 1)
	go func() {
		for i := 1; i <= 60; i++ {
			got, err := lab.EchoLine(ctx, conn, fmt.Sprint(i))
			if err != nil {
				done <- fmt.Errorf("message %d: %w", i, err)
				return
			}
			if got != first {
				done <- fmt.Errorf("message %d: source %s, was %s", i, got, first)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		done <- nil
	}()
	for _, n := range []string{"worker1", "worker2"} {
		if err := c.Agents[n].Stop(); err != nil {
			t.Logf("stop agent %s: %v", n, err)
		}
		if err := c.StartAgent(n); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // the restarted agents have synced and applied
	for _, n := range []string{"worker1", "worker2"} {
		if after := kernelState(t, n); after != before[n] {
			t.Fatalf("restart changed the kernel of %s:\nbefore:\n%s\nafter:\n%s", n, before[n], after)
		}
	}
}

// TestDriftRepaired: rules someone else deletes from the table come back
// within the resync period (3 s here), and the kernel is as before. The
// agent's drift counter shows the repair was its periodic check's (a
// repair may come before the test can look at the flushed table).
func TestDriftRepaired(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)
	before := settledState(t, p.Node)
	ns := c.Lab.Node(p.Node).NetNS
	repairs := func() float64 {
		_, body := get(t, ns, cluster.AgentHealthPort, "/metrics")
		v, ok := metric(body, `egressnat_agent_drift_repairs_total`)
		if !ok {
			t.Fatalf("no egressnat_agent_drift_repairs_total in the agent's metrics of %s", p.Node)
		}
		return v
	}
	n0 := repairs()
	nodeExec(t, p.Node, "nft", "flush", "chain", "ip", "egressnat", "prerouting")
	nodeExec(t, p.Node, "nft", "flush", "chain", "ip", "egressnat", "postrouting")
	waitFor(t, 15*time.Second, "the agent's drift repair", func() bool { return repairs() > n0 })
	wantSource(t, p, ext1(), fip100)
	if after := settledState(t, p.Node); after != before {
		t.Fatalf("the kernel of %s after the repair:\n%s\nbefore:\n%s", p.Node, after, before)
	}
}

// 10. Deleting every policy and group leaves no egressnat state in any
// node's kernel.
func TestNothingLeftBehind(t *testing.T) {
	ctx := ctxT(t)
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)
	for _, kind := range []string{"enp", "ngg"} {
		if _, err := c.Kubectl(ctx, "", "delete", kind, "--all", "-A", "--wait=true"); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"cp1", "worker1", "worker2"} {
		waitFor(t, 15*time.Second, "no egressnat state on "+n, func() bool {
			return leftovers(t, n) == ""
		})
	}
	keepSource(t, p, ext1(), worker2IP)
}

// leftovers lists the egressnat state in a node's kernel: the table, ip
// rules at the agent's priority, routes in its tables, floating IPs.
func leftovers(t *testing.T, node string) string {
	var found []string
	ns := c.Lab.Node(node).NetNS
	if out, err := c.Lab.Exec(ctxT(t), ns, "nft", "list", "table", "ip", "egressnat"); err == nil {
		found = append(found, "table:\n"+string(out))
	}
	for _, l := range strings.Split(nodeExec(t, node, "ip", "rule", "show"), "\n") {
		if strings.HasPrefix(l, "29000:") {
			found = append(found, "rule: "+l)
		}
	}
	if out := strings.TrimSpace(nodeExec(t, node, "ip", "route", "show", "table", "all")); strings.Contains(out, "table 27") {
		found = append(found, "routes:\n"+out)
	}
	if out := nodeExec(t, node, "ip", "-4", "addr", "show"); strings.Contains(out, "192.0.2.10") {
		found = append(found, "addresses:\n"+out)
	}
	return strings.Join(found, "\n")
}

// settledState waits until the node's egressnat state stays the same for a
// second (earlier tests' changes have been applied) and returns it.
func settledState(t *testing.T, node string) string {
	t.Helper()
	prev := kernelState(t, node)
	for range 30 {
		time.Sleep(time.Second)
		cur := kernelState(t, node)
		if cur == prev {
			return cur
		}
		prev = cur
	}
	t.Fatalf("the kernel state of %s keeps changing", node)
	return ""
}

// kernelState is the node's egressnat state without counters.
func kernelState(t *testing.T, node string) string {
	table := nodeExec(t, node, "nft", "list", "table", "ip", "egressnat")
	var lines []string
	for _, l := range strings.Split(table, "\n") {
		if i := strings.Index(l, "counter packets"); i >= 0 {
			l = l[:i] + "counter"
		}
		lines = append(lines, l)
	}
	// IPv4 only: egressnat has no IPv6 state, and pods' IPv6 link-local
	// routes come and go on their own.
	return strings.Join(lines, "\n") + nodeExec(t, node, "ip", "-4", "rule", "show") +
		nodeExec(t, node, "ip", "-4", "route", "show", "table", "all") + nodeExec(t, node, "ip", "-4", "addr", "show", "dev", "eth0")
}

func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// status returns an object's status as kubectl prints it.
func status(t *testing.T, args ...string) map[string]any {
	t.Helper()
	out, err := c.Kubectl(ctxT(t), "", append([]string{"get", "-o", "yaml"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	var obj struct {
		Status map[string]any `json:"status"`
	}
	if err := yaml.Unmarshal([]byte(out), &obj); err != nil {
		t.Fatal(err)
	}
	return obj.Status
}

func condition(t *testing.T, kind, name, typ string) map[string]any {
	conds, _ := status(t, kind, name)["conditions"].([]any)
	for _, ci := range conds {
		if cm, ok := ci.(map[string]any); ok && cm["type"] == typ {
			return cm
		}
	}
	return map[string]any{}
}
