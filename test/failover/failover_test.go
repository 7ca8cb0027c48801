package failover

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// streamFrom starts a stream from p and closes it after the test.
func streamFrom(t *testing.T, p *cluster.Pod) *cluster.Stream {
	t.Helper()
	s, err := cluster.StartStream(ctxT(t), p, ext1(), 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if !strings.HasPrefix(s.Source(), fip100.String()+":") {
		t.Fatalf("stream source %s, want %s", s.Source(), fip100)
	}
	return s
}

// revive brings a killed node back and checks it takes nothing back.
func revive(t *testing.T, node string) {
	t.Helper()
	if err := c.ReviveNode(ctxT(t), node, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// A gateway node dies (link down, processes killed): the IP moves within a
// second, the established connection goes on with the same source, new
// connections leave with the floating IP, the status and an Event record
// the move; the node comes back without taking its IPs back.
func TestGatewayNodeLoss(t *testing.T) {
	p, holder := setup(t, scenario)
	s := streamFrom(t, p)

	t0 := time.Now()
	if err := c.KillNode(holder); err != nil {
		t.Fatal(err)
	}
	revived := false
	t.Cleanup(func() {
		// A failed test must not leave the node dead for the next ones:
		// revive it as a reboot would (its agent starts cut off).
		if !revived {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := c.ReviveNode(ctx, holder, 10*time.Second); err != nil {
				t.Logf("revive %s: %v", holder, err)
				c.Heal(holder) //nolint:errcheck
			}
		}
	})
	gap, err := s.WaitRecovered(t0, 5*time.Second)
	if err != nil {
		t.Fatalf("connection did not survive: %v", err)
	}
	t.Logf("first reply through the new holder %v after the failure", gap)
	if gap > 2*time.Second {
		t.Errorf("failover took %v", gap)
	}
	newHolder := waitHolder(t, fip100, holder, 5*time.Second)
	if src, err := c.Source(ctxT(t), p, ext1()); err != nil || src.Addr() != fip100 {
		t.Fatalf("new connection after failover: %v %v, want %s", src, err, fip100)
	}
	time.Sleep(500 * time.Millisecond)
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke after failover: %v", err)
	}

	out, err := c.Kubectl(ctxT(t), "", "get", "ngg", "default", "-n", "kube-system", "-o",
		`jsonpath={.status.nodes.`+holder+`} {.status.recentMoves[0].from}>{.status.recentMoves[0].to}: {.status.recentMoves[0].reason}`)
	if err != nil {
		t.Fatal(err)
	}
	// The reason names the failed holder; its detection time is there when
	// the leader had an answer from it before it died (not always right
	// after the lab's start).
	if !strings.HasPrefix(out, "Down "+holder+">"+newHolder+": node "+holder+" Down") {
		t.Fatalf("status after the move: %q", out)
	}
	events, err := c.Kubectl(ctxT(t), "", "get", "events", "-n", "kube-system", "--field-selector", "reason=FloatingIPMoved", "-o", "jsonpath={.items[*].message}")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(events, "192.0.2.100 moved from "+holder+" to "+newHolder) {
		t.Fatalf("no FloatingIPMoved event for 192.0.2.100: %q", events)
	}

	revived = true
	revive(t, holder)
	settleNoDuplicates(t, 10*time.Second)
	time.Sleep(2 * time.Second) // the returning node is Up again by now
	if h := holderOf(t, fip100); h != newHolder {
		t.Fatalf("192.0.2.100 moved back to %s after %s returned", h, holder)
	}
	noDuplicates(t)
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke when the node returned: %v", err)
	}
}

// A gateway cut off from everything releases its floating IPs by itself
// within the fence bound; after healing no IP is on two nodes and traffic
// keeps the floating IP.
func TestPartitionAndHeal(t *testing.T) {
	p, holder := setup(t, scenario)
	s := streamFrom(t, p)

	t0 := time.Now()
	if err := c.Partition(holder); err != nil {
		t.Fatal(err)
	}
	healed := false
	t.Cleanup(func() {
		if !healed {
			c.Heal(holder) //nolint:errcheck
		}
	})
	if _, err := s.WaitRecovered(t0, 5*time.Second); err != nil {
		t.Fatalf("connection did not survive the partition: %v", err)
	}
	newHolder := waitHolder(t, fip100, holder, 5*time.Second)
	// Self-fencing: the cut-off node drops its floating IPs (bound: probe
	// silence 1 s + API check 0.5 s; 3 s allowed here).
	deadline := t0.Add(3 * time.Second)
	for {
		held, err := c.NodeFloatingIPs(ctxT(t), holder)
		if err != nil {
			t.Fatal(err)
		}
		if len(held) == 0 {
			t.Logf("%s fenced itself %v after the partition", holder, time.Since(t0))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still holds %v %v after being cut off", holder, held, time.Since(t0))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Stay cut off long enough for the agent's API connections to die
	// (HTTP/2 health checks close them within about 2 s).
	time.Sleep(time.Until(t0.Add(6 * time.Second)))
	healAt := time.Now()
	if err := c.Heal(holder); err != nil {
		t.Fatal(err)
	}
	healed = true
	// The agent's API calls work again within 2 s of the heal: its Lease
	// renewal (retried every second while it fails) lands with a renewTime
	// (taken when the request starts) within 2 s.
	renewedAt := waitLeaseRenewal(t, holder, healAt, 10*time.Second)
	t.Logf("%s renewed its Lease %v after the heal", holder, renewedAt.Sub(healAt))
	if d := renewedAt.Sub(healAt); d > 2*time.Second {
		t.Errorf("%s reached the API server again %v after the heal, want within 2s", holder, d)
	}
	settleNoDuplicates(t, 10*time.Second)
	for range 20 { // for two seconds after healing, never two holders
		noDuplicates(t)
		time.Sleep(100 * time.Millisecond)
	}
	if h := holderOf(t, fip100); h != newHolder {
		t.Fatalf("192.0.2.100 went back to %s after healing", h)
	}
	// The fence and its end are on record as Events on the group (the one
	// raised while cut off is delivered when the API answers again).
	for _, reason := range []string{"Unfenced", "Fenced"} {
		deadline := time.Now().Add(25 * time.Second)
		for {
			out, err := c.Kubectl(ctxT(t), "", "get", "events", "-n", "kube-system", "--field-selector", "reason="+reason, "-o", "jsonpath={.items[*].message}")
			if err == nil && strings.Contains(out, "node "+holder+" ") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s event for %s: %q %v", reason, holder, out, err)
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	if src, err := c.Source(ctxT(t), p, ext1()); err != nil || src.Addr() != fip100 {
		t.Fatalf("after healing: %v %v, want %s", src, err, fip100)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke: %v", err)
	}
}

// The operator leader dies: traffic flows on, a standby takes the lease, and
// a gateway failure afterwards is still handled.
func TestOperatorLeaderLoss(t *testing.T) {
	p, holder := setup(t, scenario)
	s := streamFrom(t, p)
	leader, err := c.Leader(ctxT(t))
	if err != nil || leader == "" {
		t.Fatalf("leader: %q %v", leader, err)
	}
	idx := int(leader[len(leader)-1] - '0')
	if err := c.Operators[idx].Kill(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.StartOperator(idx) }) //nolint:errcheck
	deadline := time.Now().Add(15 * time.Second)
	for {
		l, _ := c.Leader(ctxT(t))
		if l != "" && l != leader {
			t.Logf("%s took over from %s", l, leader)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no standby took over from %s", leader)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke when the leader died: %v", err)
	}
	// The new leader still fails over.
	t0 := time.Now()
	if err := c.KillNode(holder); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { revive(t, holder) })
	if _, err := s.WaitRecovered(t0, 5*time.Second); err != nil {
		t.Fatalf("failover under the new leader: %v", err)
	}
	waitHolder(t, fip100, holder, 5*time.Second)
}

// The API server is down for 60 s: traffic flows as it was, no floating IP
// moves or disappears, new connections keep the floating IP.
func TestAPIServerOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("takes a minute")
	}
	p, holder := setup(t, scenario)
	s := streamFrom(t, p)
	before, err := c.Holders(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	c.API.StopAPIServer()
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			c.API.StartAPIServer(context.Background()) //nolint:errcheck
		}
	})
	end := time.Now().Add(60 * time.Second)
	for time.Now().Before(end) {
		time.Sleep(5 * time.Second)
		if err := s.Err(); err != nil {
			t.Fatalf("connection broke during the outage: %v", err)
		}
		if src, err := c.Source(ctxT(t), p, ext1()); err != nil || src.Addr() != fip100 {
			t.Fatalf("new connection during the outage: %v %v, want %s", src, err, fip100)
		}
		now, err := c.Holders(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(now) != len(before) || now[fip100][0] != holder {
			t.Fatalf("floating IPs changed during the outage: %v, were %v", now, before)
		}
	}
	if err := c.API.StartAPIServer(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	restarted = true
	time.Sleep(3 * time.Second)
	if h := holderOf(t, fip100); h != holder {
		t.Fatalf("192.0.2.100 moved to %s after the outage", h)
	}
	noDuplicates(t)
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke after the outage: %v", err)
	}
}

// The agent on the gateway crashes: its kernel keeps forwarding, the IP
// stays, the connection goes on; the restarted agent changes nothing.
func TestAgentCrashOnGateway(t *testing.T) {
	p, holder := setup(t, scenario)
	s := streamFrom(t, p)
	if err := c.Agents[holder].Kill(); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			c.StartAgent(holder) //nolint:errcheck
		}
	})
	time.Sleep(3 * time.Second) // far beyond the failure detection time
	if h := holderOf(t, fip100); h != holder {
		t.Fatalf("192.0.2.100 moved to %s because an agent crashed", h)
	}
	if src, err := c.Source(ctxT(t), p, ext1()); err != nil || src.Addr() != fip100 {
		t.Fatalf("new connection while the agent is down: %v %v", src, err)
	}
	if err := c.StartAgent(holder); err != nil {
		t.Fatal(err)
	}
	restarted = true
	time.Sleep(2 * time.Second)
	if err := s.Err(); err != nil {
		t.Fatalf("connection broke: %v", err)
	}
	noDuplicates(t)
}

const unreachable = `apiVersion: networking.gke.io/v1
kind: NetworkGatewayGroup
metadata:
  namespace: kube-system
  name: nowhere
spec:
  floatingIPs:
  - 203.0.113.200
---
apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: nowhere
spec:
  sources:
  - namespaceSelector:
      matchLabels:
        user: bob
    podSelector: {}
  action: SNAT
  destinations:
  - cidr: 203.0.113.0/24
  gatewayRef:
    name: nowhere
    namespace: kube-system
`

// No node can hold the policy's IP (it lies in no node's subnet): selected
// traffic is dropped, and the status says so; with --fallback-to-node-ip it
// leaves with the node IP, and the status says that.
func TestNoNodeAvailable(t *testing.T) {
	ctx := ctxT(t)
	if _, err := c.Kubectl(ctx, unreachable, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Kubectl(context.Background(), unreachable, "delete", "--ignore-not-found", "-f", "-") }) //nolint:errcheck
	if err := c.EnsureNamespace(ctx, "bob", map[string]string{"user": "bob"}); err != nil {
		t.Fatal(err)
	}
	p, err := c.AddPod(ctx, "cp1", "bob", "app", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.DeletePod(context.Background(), p) }) //nolint:errcheck

	waitStatus(t, "Drop", "GatewayUnavailable", "dropped")
	for range 3 {
		if src, err := c.Source(ctx, p, ext1()); err == nil {
			t.Fatalf("fail closed: traffic left with %s", src)
		}
	}
	if err := c.RestartOperators("--fallback-to-node-ip"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.RestartOperators() }) //nolint:errcheck
	waitStatus(t, "NodeIP", "GatewayUnavailable", "node IP")
	if _, err := c.WaitSource(ctx, p, ext1(), cp1IP, 15*time.Second); err != nil {
		t.Fatal(err)
	}
}

func waitStatus(t *testing.T, action, reason, msg string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var out string
	for time.Now().Before(deadline) {
		out, _ = c.Kubectl(ctxT(t), "", "get", "enp", "nowhere", "-o",
			`jsonpath={.status.whenUnavailable}|{.status.conditions[?(@.type=="Ready")].reason}|{.status.conditions[?(@.type=="Ready")].message}`)
		parts := strings.SplitN(out, "|", 3)
		if len(parts) == 3 && parts[0] == action && parts[1] == reason && strings.Contains(parts[2], msg) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("policy status %q, want %s/%s mentioning %q", out, action, reason, msg)
}

// waitLeaseRenewal waits for the node's agent Lease to carry a renewTime
// after since, and returns it.
func waitLeaseRenewal(t *testing.T, node string, since time.Time, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		l, err := c.Client.CoordinationV1().Leases(cluster.SystemNamespace).Get(ctxT(t), "egressnat-agent-"+node, metav1.GetOptions{})
		if err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(since) {
			return l.Spec.RenewTime.Time
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not renew its Lease within %v of %v: %v", node, timeout, since, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A gateway reboots while the API server is down: its IPs cannot move and
// its agent cannot learn them again. Until it can, the traffic the source
// node still reroutes to it is dropped by the guard table the agent
// installs at its start, never masqueraded to the node's own address; once
// the API server is back the node takes its IP again.
func TestGatewayRebootDuringAPIOutage(t *testing.T) {
	p, holder := setup(t, scenario)
	holderIP := c.Lab.Node(holder).IP
	c.API.StopAPIServer()
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			c.API.StartAPIServer(context.Background()) //nolint:errcheck
		}
	})
	// The reboot: the agent dies, the kernel's state is gone, the agent
	// starts again and cannot reach the API server.
	if err := c.Agents[holder].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := c.WipeNodeState(ctxT(t), holder); err != nil {
		t.Fatal(err)
	}
	if err := c.StartAgent(holder); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok, err := c.NodeHasTable(ctxT(t), holder)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("no guard table on %s 10 s after its agent started", holder)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i := range 3 {
		src, err := c.Source(ctxT(t), p, ext1())
		if err == nil {
			t.Fatalf("new connection %d during the outage left with %s (the node is %s): want it dropped", i, src, holderIP)
		}
	}
	apiBack(t, p, &restarted)
}

// A gateway reboots and its network comes back before its agent (as on a
// real node: the network starts long before the kubelet starts pods), with
// the API server down so its IPs cannot move. Without the boot unit the
// traffic still rerouted to it leaves with the node's address the moment
// the link is up; with the boot unit (egressnat-agent --boot-guard, run
// before the network starts, from the state the agent saved) it is dropped
// from the first packet, until the agent runs and the API server is back.
func TestBootGuardBeforeNetwork(t *testing.T) {
	p, holder := setup(t, scenario)
	holderIP := c.Lab.Node(holder).IP
	c.API.StopAPIServer()
	restarted, cut := false, false
	t.Cleanup(func() {
		if cut {
			c.Heal(holder) //nolint:errcheck
		}
		if !restarted {
			c.API.StartAPIServer(context.Background()) //nolint:errcheck
		}
		if !c.Agents[holder].Running() {
			c.StartAgent(holder) //nolint:errcheck
		}
	})
	reboot := func() {
		t.Helper()
		if err := c.Partition(holder); err != nil {
			t.Fatal(err)
		}
		cut = true
		if c.Agents[holder].Running() {
			if err := c.Agents[holder].Kill(); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.WipeNodeState(ctxT(t), holder); err != nil {
			t.Fatal(err)
		}
	}
	up := func() {
		t.Helper()
		if err := c.Heal(holder); err != nil {
			t.Fatal(err)
		}
		cut = false
	}
	// Without the boot unit: the lab reproduces the leak.
	reboot()
	up()
	src, err := c.Source(ctxT(t), p, ext1())
	if err != nil || src.Addr() != holderIP {
		t.Fatalf("without the boot guard the connection went %v %v: want it to leave with %s (the lab no longer shows the window this test closes)", src, err, holderIP)
	}
	// With it: run before the link comes up.
	reboot()
	if err := c.BootGuard(ctxT(t), holder); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.NodeHasTable(ctxT(t), holder); err != nil || !ok {
		t.Fatalf("no table on %s after the boot guard: %v", holder, err)
	}
	up()
	for i := range 2 {
		if src, err := c.Source(ctxT(t), p, ext1()); err == nil {
			t.Fatalf("connection %d after the boot guard left with %s (the node is %s): want it dropped", i, src, holderIP)
		}
	}
	// The agent starts, still without the API server: the table stays.
	if err := c.StartAgent(holder); err != nil {
		t.Fatal(err)
	}
	if src, err := c.Source(ctxT(t), p, ext1()); err == nil {
		t.Fatalf("connection with the agent started during the outage left with %s: want it dropped", src)
	}
	apiBack(t, p, &restarted)
}

// apiBack starts the API server again after an outage (restarted records
// it for the test's cleanup) and waits until the pod's new connections
// leave with the floating IP again and every IP has one holder.
func apiBack(t *testing.T, p *cluster.Pod, restarted *bool) {
	t.Helper()
	if err := c.API.StartAPIServer(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	*restarted = true
	if _, err := c.WaitSource(ctxT(t), p, ext1(), fip100, 30*time.Second); err != nil {
		t.Fatalf("after the outage: %v", err)
	}
	settleNoDuplicates(t, 10*time.Second)
}
