package failover

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/chaos"
	"github.com/egressnat/egressnat/test/cluster"
)

// Planned moves, make before break: a cordon, the maintenance label, an
// explicit request (egressnat.io/move-request) and an agent stopping
// (SIGTERM with the DaemonSet's drain) each hand the egress IP over to
// another Up node while long-lived TCP connections (from cp1 and from the
// holder itself) and UDP senders run. Every connection survives with its
// source ip:port, no datagram leaves with a wrong source, no two nodes
// answer ARP for one IP at any time, and status.recentMoves says why, with
// the new node prepared before the switch.
func TestPlannedMoves(t *testing.T) {
	ctx := ctxT(t)
	p, holder := setup(t, scenario)
	other := map[string]string{"worker1": "worker2", "worker2": "worker1"}

	// Connections from cp1 and from both workers (one of them the holder:
	// its pods' flows were SNATed locally and are rerouted after).
	pods := []*cluster.Pod{p}
	for _, n := range []string{"worker1", "worker2"} {
		wp, err := c.AddPod(ctx, n, "alice", fmt.Sprintf("planned-%s", n), map[string]string{"role": "frontend"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.DeletePod(context.Background(), wp) }) //nolint:errcheck
		if _, err := c.WaitSource(ctx, wp, ext1(), fip100, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		pods = append(pods, wp)
	}
	unsel, err := c.AddPod(ctx, "cp1", "alice", "planned-db", map[string]string{"role": "backend"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.DeletePod(context.Background(), unsel) }) //nolint:errcheck

	var streams []*cluster.Stream
	for _, sp := range pods {
		s, err := cluster.StartStream(ctx, sp, ext1(), 20*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		streams = append(streams, s)
	}
	src, err := chaos.StartSource(chaos.SourceConfig{ListenNS: ext1().NetNS, Listen: netip.AddrPortFrom(ext1().IP, 9300), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Stop()
	for _, sp := range pods {
		if err := src.Add(chaos.Pod{Name: sp.Namespace + "/" + sp.Name, NetNS: sp.NetNS, Node: sp.Node, IP: sp.IP,
			Expect: chaos.Expect{Selected: true, Policy: "egress", Source: fip100}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.Add(chaos.Pod{Name: "alice/planned-db", NetNS: unsel.NetNS, Node: "cp1", IP: unsel.IP,
		Expect: chaos.Expect{Source: cp1IP}}); err != nil {
		t.Fatal(err)
	}
	arp, err := chaos.StartARP(chaos.ARPConfig{NetNS: c.Lab.RouterNS(), Dev: "eth0", SenderIP: netip.MustParseAddr("192.0.2.254"),
		IPs: []netip.Addr{fip100, mustAddr("192.0.2.101"), mustAddr("192.0.2.102")}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer arp.Stop()
	// Warm-up: every sender's datagrams arrive with the right source.
	if err := cluster.Poll(10*time.Second, 50*time.Millisecond, func() error {
		if probs := src.Problems(500 * time.Millisecond); len(probs) > 0 {
			return fmt.Errorf("%s", strings.Join(probs, "; "))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	src.Reset()
	arp.Reset()

	// move runs one planned move of the egress IP off from and checks it.
	move := func(name, from, reason string, do, undo func()) string {
		t.Helper()
		t0 := time.Now()
		do()
		to := waitHolder(t, fip100, from, 15*time.Second)
		took := time.Since(t0)
		if to == "" || to == from {
			t.Fatalf("%s: %s still on %s", name, fip100, from)
		}
		m := lastMove(t, fip100)
		if !strings.HasPrefix(m, "planned: ") || !strings.Contains(m, reason) {
			t.Errorf("%s: the move's reason is %q, want a planned move because %s", name, m, reason)
		}
		if strings.Contains(m, "did not report it prepared") {
			t.Errorf("%s: the switch came before %s was prepared: %q", name, to, m)
		}
		// The connections outlive the move: a second of traffic after it.
		settle := time.Now()
		for _, s := range streams {
			if _, err := s.WaitRecovered(settle, 5*time.Second); err != nil {
				t.Errorf("%s: connection from %s: %v", name, s.Pod.Node, err)
			}
		}
		var worst time.Duration
		var waits []string
		for _, s := range streams {
			if err := s.Err(); err != nil {
				t.Errorf("%s: connection from %s did not survive: %v", name, s.Pod.Node, err)
			}
			w := s.MaxWait(t0, settle)
			worst = max(worst, w)
			waits = append(waits, fmt.Sprintf("%s %s", s.Pod.Node, w.Round(time.Millisecond)))
		}
		st := src.Stats()
		if st.Wrong > 0 || st.Violations > 0 {
			t.Errorf("%s: %d datagrams left with a wrong source (%d episodes)", name, st.Wrong, st.Violations)
		}
		if a := arp.Stats(); a.Violations > 0 {
			t.Errorf("%s: two nodes answered ARP for %s for %s", name, a.MaxDualIP, a.MaxDual)
		}
		t.Logf("%s: %s -> %s after %s; longest wait for a reply %s (%s); longest UDP outage %s (%s); reason %q", name, from, to,
			took.Round(time.Millisecond), worst.Round(time.Millisecond), strings.Join(waits, ", "), st.MaxSelected.Duration.Round(time.Millisecond), st.MaxSelected.Pod, m)
		src.Reset()
		if undo != nil {
			undo()
		}
		return to
	}

	kubectl := func(args ...string) func() {
		return func() {
			if out, err := c.Kubectl(ctxT(t), "", args...); err != nil {
				t.Fatalf("kubectl %v: %v: %s", args, err, out)
			}
		}
	}
	// 1. A cordon.
	at := move("cordon", holder, "node "+holder+" cordoned", kubectl("cordon", holder), kubectl("uncordon", holder))
	// 2. The maintenance label.
	at = move("maintenance", at, "labelled egressnat.io/maintenance=true", kubectl("label", "node", at, "egressnat.io/maintenance=true"),
		kubectl("label", "node", at, "egressnat.io/maintenance-"))
	// 3. An explicit request: to the other worker.
	req := fmt.Sprintf("%s=%s;t%d", fip100, other[at], time.Now().UnixNano())
	at = move("request", at, "requested", kubectl("annotate", "ngg", "default", "-n", "kube-system", "--overwrite",
		"egressnat.io/move-request="+req), nil)
	out, err := c.Kubectl(ctxT(t), "", "get", "ngg", "default", "-n", "kube-system", "-o",
		`jsonpath={.status.observedMoveRequest}{"|"}{.status.moveRequestMessage}`)
	if err != nil {
		t.Fatal(err)
	}
	if want := req + "|moving " + fip100.String(); !strings.HasPrefix(out, want) {
		t.Errorf("status after the request: %q, want it to begin with %q", out, want)
	}
	// 4. The holder's agent stopping (SIGTERM), with the DaemonSet's
	// drain: it hands the IPs over before it exits.
	if err := c.Agents[at].Stop(); err != nil { // lab default: no drain, the IPs stay
		t.Logf("stop agent %s: %v", at, err)
	}
	started := time.Now()
	if err := c.StartAgent(at, "--drain-timeout=5s"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Agents[at].Stop() //nolint:errcheck
		if err := c.StartAgent(at); err != nil {
			t.Errorf("start agent %s: %v", at, err)
		}
	})
	if err := c.WaitAgentReady(ctxT(t), at, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	waitAgentLease(t, at, started)
	drained := at
	at = move("agent stopping", at, "draining: agent stopping", func() {
		if err := c.Agents[drained].Stop(); err != nil {
			t.Errorf("stop agent %s: %v", drained, err)
		}
	}, nil)
	// The stopped agent's node gets nothing while it is away, and the
	// agent that starts again takes its drain request back.
	started = time.Now()
	if err := c.StartAgent(drained, "--drain-timeout=5s"); err != nil {
		t.Fatal(err)
	}
	waitAgentLease(t, drained, started)
	if h := holderOf(t, fip100); h != at {
		t.Errorf("%s moved to %s after %s's agent returned", fip100, h, drained)
	}
}

// lastMove returns the reason of the newest status.recentMoves entry of
// ip in the seed's group.
func lastMove(t *testing.T, ip netip.Addr) string {
	t.Helper()
	out, err := c.Kubectl(ctxT(t), "", "get", "ngg", "default", "-n", "kube-system", "-o",
		`jsonpath={range .status.recentMoves[?(@.ip=="`+ip.String()+`")]}{.reason}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	first, _, _ := strings.Cut(out, "\n")
	return first
}

// waitAgentLease waits until node's agent, started at since, wrote its
// Lease, without a drain request (a started agent takes it back).
func waitAgentLease(t *testing.T, node string, since time.Time) {
	t.Helper()
	if err := cluster.Poll(20*time.Second, 50*time.Millisecond, func() error {
		out, err := c.Kubectl(ctxT(t), "", "get", "lease", "-n", cluster.SystemNamespace, "egressnat-agent-"+node, "-o",
			`jsonpath={.metadata.annotations.egressnat\.io/draining}{"|"}{.spec.renewTime}`)
		if err != nil {
			return err
		}
		d, renewed, _ := strings.Cut(out, "|")
		at, err := time.Parse(time.RFC3339Nano, renewed)
		if err != nil || at.Before(since) {
			return fmt.Errorf("lease of %s not renewed since the agent started at %s: %q", node, since.Format(time.RFC3339Nano), renewed)
		}
		if d != "" {
			return fmt.Errorf("lease of %s still asks for a drain: %q", node, d)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
