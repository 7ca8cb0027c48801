package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/nft"
)

// leaseAnnotations reads the agent's Lease annotations from the API.
func (ta *testAgent) leaseAnnotations(t *testing.T) map[string]string {
	t.Helper()
	l, err := ta.core.CoordinationV1().Leases("egressnat-system").Get(context.Background(), kube.AgentLeasePrefix+node1, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l.Annotations
}

// TestPreparedReported: a handover to this node makes it add the IP muted;
// the IPs the Apply left muted on the uplink that the status does not give
// to this node are published on the Lease as prepared (those it holds, as
// the old holder of a handover, are not), and the Lease is written at once.
func TestPreparedReported(t *testing.T) {
	ctx := context.Background()
	g := gatewayObj("gw", "192.0.2.150", node2)
	g.Status.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.150", From: node2, To: node1, Reason: "node n2 cordoned"}}
	held := gatewayObj("own", "192.0.2.151", node1)
	held.Status.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.151", From: node1, To: node2, Reason: "requested"}}
	ta := newTestAgent(t, append(cluster(), g, held)...)
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if got := addrList(st.Muted); len(got) != 2 || got[0] != "192.0.2.150" || got[1] != "192.0.2.151" {
		t.Fatalf("applied Muted %v, want both handover IPs", got)
	}
	ta.dp.mu.Lock()
	ta.dp.result = nft.Result{Muted: addrs("192.0.2.150", "192.0.2.151")}
	ta.dp.mu.Unlock()
	ta.observe(st)
	select {
	case <-ta.leaseKick:
	default:
		t.Fatal("prepared IPs did not ask for a Lease write")
	}
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := ta.leaseAnnotations(t)[kube.AnnotationPrepared]; got != "192.0.2.150" {
		t.Fatalf("prepared annotation %q, want only the IP handed over to this node", got)
	}
	// The switch: the IP is this node's, no longer prepared.
	ta.dp.mu.Lock()
	ta.dp.result = nft.Result{}
	ta.dp.mu.Unlock()
	ta.observe(st)
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got, ok := ta.leaseAnnotations(t)[kube.AnnotationPrepared]; ok {
		t.Fatalf("prepared annotation %q left after the switch", got)
	}
}

// TestDrain: an agent told to stop while holding floating IPs asks for
// them to be handed over (AnnotationDraining on its Lease) and returns
// once it holds none; one holding nothing returns at once; the wait ends
// at the timeout.
func TestDrain(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, cluster()...)
	ta.cfg.PodName = "egressnat-agent-x1"
	ta.drain(ctx, 5*time.Second) // holds nothing
	if ta.draining.Load() != nil || len(ta.leaseKick) > 0 {
		t.Fatal("a drain with nothing held asked for a handover")
	}

	held := addrs("192.0.2.150")
	ta.held.Store(&held)
	done := make(chan struct{})
	go func() {
		defer close(done)
		ta.drain(ctx, 5*time.Second)
	}()
	eventually(t, "the drain request", func() bool { return ta.draining.Load() != nil })
	select {
	case <-ta.leaseKick:
	case <-time.After(5 * time.Second):
		t.Fatal("the drain did not ask for a Lease write")
	}
	if err := ta.renewOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := ta.leaseAnnotations(t)[kube.AnnotationDraining]; got != "agent stopping (pod egressnat-agent-x1)" {
		t.Fatalf("draining annotation %q", got)
	}
	select {
	case <-done:
		t.Fatal("the drain returned while the node still holds an IP")
	default:
	}
	none := []netip.Addr{}
	ta.held.Store(&none) // the operator moved it: the next apply holds none
	for {
		ta.clk.Step(drainPoll)
		select {
		case <-done:
			// The next agent on the node takes the request back.
			next := newAgent(testConfig(t, ta.cfg.Clients, ta.dp), ta.clk)
			if err := next.renewOnce(ctx); err != nil {
				t.Fatal(err)
			}
			if got, ok := ta.leaseAnnotations(t)[kube.AnnotationDraining]; ok {
				t.Fatalf("the next agent left the drain request %q", got)
			}
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestDrainTimeout: an IP nobody takes keeps the agent no longer than
// the timeout.
func TestDrainTimeout(t *testing.T) {
	ta := newTestAgent(t, cluster()...)
	held := addrs("192.0.2.150")
	ta.held.Store(&held)
	done := make(chan struct{})
	go func() {
		defer close(done)
		ta.drain(context.Background(), 5*time.Second)
	}()
	eventually(t, "the drain request", func() bool { return ta.draining.Load() != nil })
	for {
		select {
		case <-done:
			if ta.clk.Since(epoch) < 5*time.Second {
				t.Fatalf("the drain ended after %s, before its timeout", ta.clk.Since(epoch))
			}
			return
		case <-time.After(10 * time.Millisecond):
			ta.clk.Step(drainPoll)
		}
	}
}
