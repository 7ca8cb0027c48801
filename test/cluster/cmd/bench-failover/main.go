// Command bench-failover measures failover on the lab cluster with the real
// binaries: in each trial the node holding the egress IP dies (its switch
// port goes down and its agent is killed) while 20 long-lived TCP
// connections from pods on two other nodes each send a message every 50 ms.
// It measures, per connection, the time from the failure to the first reply
// to a message sent after it (which can only come through the new holder),
// and counts the connections that survived (no reset, no reconnect, same
// source ip:port). Then, in each of -planned trials, the holder is
// cordoned (a planned move: the IP is handed over, make before break) and
// uncordoned after; it measures, per connection, the longest a message
// sent during the move waited for its reply (the stall the move caused).
// It ends with
//
//	failover p50_ms=<n> p99_ms=<n> survived=<k>/<m>
//	planned p50_ms=<n> p99_ms=<n> survived=<k>/<m>
package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

// scenario: the seed's policy with a single floating IP.
var scenario = cluster.GatewayYAML("default", "192.0.2.100") + "---\n" + cluster.SeedPolicy

var egressIP = netip.MustParseAddr("192.0.2.100")

func main() {
	trials := flag.Int("trials", 20, "gateway node losses to measure")
	conns := flag.Int("conns", 20, "long-lived connections, spread over two pod nodes")
	interval := flag.Duration("interval", 50*time.Millisecond, "message interval of each connection")
	planned := flag.Int("planned", 20, "planned moves (cordons) to measure")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *trials, *planned, *conns, *interval); err != nil {
		fmt.Fprintln(os.Stderr, "bench-failover:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, trials, planned, conns int, interval time.Duration) (err error) {
	c, err := cluster.Start(ctx, cluster.Options{
		Prefix: "enat-bf-",
		// Pods live on the control-plane nodes; the workers take turns
		// holding the egress IP (workers are preferred).
		Nodes: []lab.NodeConfig{{Name: "cp1", ControlPlane: true}, {Name: "cp2", ControlPlane: true}, {Name: "worker1"}, {Name: "worker2"}},
		Log:   func(f string, a ...any) { fmt.Printf("# "+f+"\n", a...) },
	})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fmt.Fprintln(os.Stderr, c.Logs())
		}
		c.Close()
	}()
	if _, err := c.Kubectl(ctx, scenario, "apply", "-f", "-"); err != nil {
		return err
	}
	if err := c.EnsureNamespace(ctx, "alice", map[string]string{"user": "alice"}); err != nil {
		return err
	}
	ext := c.Lab.External("ext1")
	var streams []*cluster.Stream
	for i := range conns {
		node := []string{"cp1", "cp2"}[i%2]
		p, err := c.AddPod(ctx, node, "alice", fmt.Sprintf("web-%d", i), map[string]string{"role": "frontend"})
		if err != nil {
			return err
		}
		if _, err := c.WaitSource(ctx, p, ext, egressIP, 30*time.Second); err != nil {
			return err
		}
		s, err := cluster.StartStream(ctx, p, ext, interval)
		if err != nil {
			return err
		}
		defer s.Close()
		streams = append(streams, s)
	}
	fmt.Printf("# %d connections from cp1 and cp2 to %s, one message every %v each\n", conns, ext.TCPAddr(), interval)

	var gaps []float64
	survived, total := 0, 0
	for trial := 1; trial <= trials; trial++ {
		holder, err := statusHolder(ctx, c)
		if err != nil {
			return err
		}
		// The failure: the holder's switch port goes down (t0 is when that
		// returned), then its agent is killed.
		if err := c.Partition(holder); err != nil {
			return err
		}
		t0 := time.Now()
		if err := c.Agents[holder].Kill(); err != nil {
			return err
		}
		var trialGaps []float64
		for _, s := range streams {
			total++
			if s.Err() != nil {
				continue // broke in an earlier trial: counted as lost there and here
			}
			d, err := s.WaitRecovered(t0, 10*time.Second)
			if err != nil {
				continue
			}
			trialGaps = append(trialGaps, float64(d.Microseconds())/1000)
		}
		time.Sleep(time.Second) // a late reset would show now
		ok := 0
		for _, s := range streams {
			if s.Err() == nil {
				ok++
			}
		}
		survived += ok
		gaps = append(gaps, trialGaps...)
		newHolder, _ := statusHolder(ctx, c)
		fmt.Printf("# trial %2d: %s -> %s  survived %d/%d  first reply after %s\n", trial, holder, newHolder, ok, len(streams),
			summary(trialGaps))
		if err := c.ReviveNode(ctx, holder, 15*time.Second); err != nil {
			return err
		}
		if err := waitUp(ctx, c, holder, 15*time.Second); err != nil {
			return err
		}
	}
	for i, s := range streams {
		if err := s.Err(); err != nil {
			fmt.Printf("# connection %d from %s: %v\n", i, s.Pod.Node, err)
		}
	}
	slices.Sort(gaps)
	failover := fmt.Sprintf("failover p50_ms=%.0f p99_ms=%.0f survived=%d/%d", percentile(gaps, 50), percentile(gaps, 99), survived, total)
	fmt.Println(failover)

	var waits []float64
	survived, total = 0, 0
	for trial := 1; trial <= planned; trial++ {
		holder, err := statusHolder(ctx, c)
		if err != nil {
			return err
		}
		t0 := time.Now()
		if _, err := c.Kubectl(ctx, "", "cordon", holder); err != nil {
			return err
		}
		newHolder, err := waitMoved(ctx, c, holder, 15*time.Second)
		if err != nil {
			return err
		}
		moved := time.Since(t0)
		// A second of traffic after the switch: every message sent during
		// the move has its reply, or counts as waiting until now.
		time.Sleep(time.Second)
		var trialWaits []float64
		ok := 0
		for _, s := range streams {
			total++
			if s.Err() != nil {
				continue
			}
			ok++
			trialWaits = append(trialWaits, float64(s.MaxWait(t0, t0.Add(moved+500*time.Millisecond)).Microseconds())/1000)
		}
		survived += ok
		waits = append(waits, trialWaits...)
		reason, _ := c.Kubectl(ctx, "", "get", "ngg", "default", "-n", "kube-system", "-o", "jsonpath={.status.recentMoves[0].reason}")
		fmt.Printf("# planned %2d: %s -> %s after %s  survived %d/%d  longest wait for a reply %s  (%s)\n", trial, holder, newHolder,
			moved.Round(time.Millisecond), ok, len(streams), summary(trialWaits), reason)
		if _, err := c.Kubectl(ctx, "", "uncordon", holder); err != nil {
			return err
		}
	}
	for i, s := range streams {
		if err := s.Err(); err != nil {
			fmt.Printf("# connection %d from %s: %v\n", i, s.Pod.Node, err)
		}
	}
	slices.Sort(waits)
	fmt.Println(failover)
	fmt.Printf("planned p50_ms=%.0f p99_ms=%.0f survived=%d/%d\n", percentile(waits, 50), percentile(waits, 99), survived, total)
	return nil
}

// waitMoved waits until the group's status gives the egress IP to a node
// other than from.
func waitMoved(ctx context.Context, c *cluster.Cluster, from string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		h, err := statusHolder(ctx, c)
		if err == nil && h != from {
			return h, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s still on %s after %v (%v)", egressIP, from, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func statusHolder(ctx context.Context, c *cluster.Cluster) (string, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := c.Kubectl(ctx, "", "get", "ngg", "default", "-n", "kube-system", "-o", `jsonpath={.status.floatingIPs.192\.0\.2\.100}`)
		if err == nil && out != "" {
			return out, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no holder of %s: %q %v", egressIP, out, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitUp waits until the group's status shows the node Up again.
func waitUp(ctx context.Context, c *cluster.Cluster, node string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		out, err := c.Kubectl(ctx, "", "get", "ngg", "default", "-n", "kube-system", "-o", "jsonpath={.status.nodes."+node+"}")
		if err == nil && out == "Up" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not Up again after %v: %q %v", node, timeout, out, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func summary(g []float64) string {
	if len(g) == 0 {
		return "none"
	}
	s := slices.Clone(g)
	slices.Sort(s)
	return strings.TrimSpace(fmt.Sprintf("min %.0fms p50 %.0fms max %.0fms", s[0], percentile(s, 50), s[len(s)-1]))
}
