package operator

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
)

// updateNode changes a Node in the API and waits for the caches.
func (cl *cluster) updateNode(t *testing.T, c *testController, name string, change func(*corev1.Node)) {
	t.Helper()
	n, err := cl.core.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	change(n)
	if _, err := cl.core.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
}

// annotateLease sets (value "" removes) an annotation of node's agent
// Lease and waits for the caches.
func (cl *cluster) annotateLease(t *testing.T, c *testController, node, key, value string) {
	t.Helper()
	leases := cl.core.CoordinationV1().Leases(agentNamespace)
	l, err := leases.Get(context.Background(), kube.AgentLeasePrefix+node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if value == "" {
		delete(l.Annotations, key)
	} else {
		l.Annotations[key] = value
	}
	if _, err := leases.Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
}

// annotateGateway sets an annotation of the group gw and waits for the
// caches.
func (cl *cluster) annotateGateway(t *testing.T, c *testController, key, value string) {
	t.Helper()
	g := cl.gateway(t, "gw")
	if g.Annotations == nil {
		g.Annotations = map[string]string{}
	}
	g.Annotations[key] = value
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(g)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetGroupVersionKind(v1.GroupVersion.WithKind("NetworkGatewayGroup"))
	if _, err := cl.dyn.Resource(kube.GatewayGVR).Namespace(g.Namespace).Update(context.Background(), u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
}

func handovers(g *v1.NetworkGatewayGroup) []string {
	var out []string
	for _, h := range g.Status.Handovers {
		out = append(out, h.IP+" "+h.From+"->"+h.To+": "+h.Reason)
	}
	return out
}

// TestPlannedMove: a cordoned holder keeps its IP while the handover to
// another node runs (status.handovers), and gives it up only when the
// target's agent reports the IP prepared; the move is recorded as
// planned. Without the report the handover completes after
// HandoverTimeout; a holder that goes Down meanwhile loses the IP at once.
func TestPlannedMove(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	if g, want := cl.gateway(t, "gw"), map[string]string{fip1: "n1", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	c.events()

	// Cordoned: the handover starts, n1 still holds fip1.
	cl.updateNode(t, c, "n1", func(n *corev1.Node) { n.Spec.Unschedulable = true })
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("during the handover: status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	want := fip1 + " n1->n2: node n1 cordoned (spec.unschedulable)"
	if got := handovers(g); len(got) != 1 || got[0] != want {
		t.Fatalf("status.handovers %v, want [%s]", got, want)
	}
	if ev := c.events(); len(ev) != 1 || !strings.Contains(ev[0], "Normal FloatingIPHandover handing "+fip1+" over from n1 to n2") {
		t.Fatalf("events %v, want one FloatingIPHandover", ev)
	}
	// Not prepared yet: nothing changes, however often it reconciles.
	cl.clk.Step(time.Second)
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n1" || len(g.Status.Handovers) != 1 {
		t.Fatalf("before n2 is prepared: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}
	// n1's own report does not count: only the target's.
	cl.annotateLease(t, c, "n1", kube.AnnotationPrepared, fip1)
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n1" {
		t.Fatalf("switched on the old holder's report: floatingIPs %v", g.Status.FloatingIPs)
	}
	// n2 prepared: the switch.
	cl.annotateLease(t, c, "n2", kube.AnnotationPrepared, fip1)
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n2", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) || len(g.Status.Handovers) != 0 {
		t.Fatalf("after n2 prepared: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}
	if m := g.Status.RecentMoves[0]; m.IP != fip1 || m.From != "n1" || m.To != "n2" || m.Reason != "planned: node n1 cordoned (spec.unschedulable)" {
		t.Fatalf("recentMoves[0] %+v", m)
	}
	if ev := c.events(); !slices.ContainsFunc(ev, func(e string) bool { return strings.HasPrefix(e, "Normal FloatingIPMoved") }) {
		t.Fatalf("events %v, want a Normal FloatingIPMoved", ev)
	}

	// Back: uncordoned, nothing moves (stability first).
	cl.updateNode(t, c, "n1", func(n *corev1.Node) { n.Spec.Unschedulable = false })
	cl.annotateLease(t, c, "n1", kube.AnnotationPrepared, "")
	cl.annotateLease(t, c, "n2", kube.AnnotationPrepared, "")
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n2" || len(g.Status.Handovers) != 0 {
		t.Fatalf("after the uncordon: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}

	// n2's agent stopping: both IPs are handed to n1; n1 never reports,
	// the timeout completes them.
	cl.annotateLease(t, c, "n2", kube.AnnotationDraining, "agent stopping (pod a-1)")
	c.mustReconcile(t)
	if got := handovers(cl.gateway(t, "gw")); len(got) != 2 || !strings.Contains(got[0], "n2->n1: node n2 draining: agent stopping (pod a-1)") {
		t.Fatalf("status.handovers %v", got)
	}
	cl.clk.Step(DefaultHandoverTimeout)
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1", fip2: "n1"}; !mapsEqual(g.Status.FloatingIPs, want) || len(g.Status.Handovers) != 0 {
		t.Fatalf("after the timeout: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}
	if r := g.Status.RecentMoves[0].Reason; !strings.Contains(r, "n1 did not report it prepared within 3s") {
		t.Fatalf("recentMoves[0].reason %q", r)
	}
	// The drained node gets nothing new while its Lease asks for the
	// drain; a holder going Down during a handover loses its IP at once.
	cl.updateNode(t, c, "n1", func(n *corev1.Node) { n.Labels = map[string]string{v1.LabelMaintenance: ""} })
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); len(g.Status.Handovers) != 0 || g.Status.FloatingIPs[fip1] != "n1" {
		t.Fatalf("the only other node is draining: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}
	cl.annotateLease(t, c, "n2", kube.AnnotationDraining, "")
	c.mustReconcile(t)
	if got := handovers(cl.gateway(t, "gw")); len(got) != 2 || !strings.Contains(got[0], "n1->n2: node n1 labelled egressnat.io/maintenance=") {
		t.Fatalf("status.handovers %v", got)
	}
	cl.clk.Step(time.Second)
	c.setHealth("n1", false, cl.clk.Now().Add(-400*time.Millisecond))
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n2", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) || len(g.Status.Handovers) != 0 {
		t.Fatalf("holder Down during the handover: floatingIPs %v handovers %v", g.Status.FloatingIPs, handovers(g))
	}
	if r := g.Status.RecentMoves[0].Reason; !strings.HasPrefix(r, "node n1 Down") {
		t.Fatalf("recentMoves[0].reason %q, want a failover", r)
	}
}

// TestMoveRequest: the annotation egressnat.io/move-request starts a
// handover once per value, and the status says what was done.
func TestMoveRequest(t *testing.T) {
	cl := newCluster(t, objects()...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)

	cl.annotateGateway(t, c, v1.AnnotationMoveRequest, fip1+"=n2;a")
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if g.Status.ObservedMoveRequest != fip1+"=n2;a" || g.Status.MoveRequestMessage != "moving "+fip1+" from n1 to n2" {
		t.Fatalf("observed %q message %q", g.Status.ObservedMoveRequest, g.Status.MoveRequestMessage)
	}
	if got := handovers(g); len(got) != 1 || got[0] != fip1+" n1->n2: requested (egressnat.io/move-request)" {
		t.Fatalf("status.handovers %v", got)
	}
	cl.annotateLease(t, c, "n2", kube.AnnotationPrepared, fip1)
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); g.Status.FloatingIPs[fip1] != "n2" || g.Status.RecentMoves[0].Reason != "planned: requested (egressnat.io/move-request)" {
		t.Fatalf("floatingIPs %v recentMoves %+v", g.Status.FloatingIPs, g.Status.RecentMoves)
	}
	// Observed: the same value does nothing more, a rebalance puts fip1
	// back on n1 (n2 holds both, n1 none).
	c.mustReconcile(t)
	if g := cl.gateway(t, "gw"); len(g.Status.Handovers) != 0 {
		t.Fatalf("an observed request acted on again: %v", handovers(g))
	}
	cl.annotateGateway(t, c, v1.AnnotationMoveRequest, "*;b")
	c.mustReconcile(t)
	if got := handovers(cl.gateway(t, "gw")); len(got) != 1 || !strings.HasPrefix(got[0], fip1+" n2->n1") {
		t.Fatalf("rebalance: status.handovers %v", got)
	}
	// Refusals are said, and move nothing.
	for _, tc := range []struct{ req, msg string }{
		{"nonsense;c", `refused: "nonsense": not an IPv4 address`},
		{fip2 + "=n3;d", fip2 + " cannot go to n3: node n3 is Down"},
		{fip2 + "=n9;e", fip2 + ": node n9 does not exist"},
	} {
		cl.annotateGateway(t, c, v1.AnnotationMoveRequest, tc.req)
		c.mustReconcile(t)
		g := cl.gateway(t, "gw")
		if g.Status.ObservedMoveRequest != tc.req || !strings.Contains(g.Status.MoveRequestMessage, tc.msg) {
			t.Errorf("%s: observed %q message %q, want %q", tc.req, g.Status.ObservedMoveRequest, g.Status.MoveRequestMessage, tc.msg)
		}
		if len(g.Status.Handovers) != 1 {
			t.Errorf("%s: handovers %v", tc.req, handovers(g))
		}
	}
}
