package operator

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

// Tests of issue #11: no NetworkGatewayGroup can make a node add or remove
// an address that is not egressnat's, and the statuses say why.

func (cl *cluster) gatewayIn(t *testing.T, ns, name string) *v1.NetworkGatewayGroup {
	t.Helper()
	u, err := cl.dyn.Resource(kube.GatewayGVR).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// groupIn is a group in namespace ns created age minutes after the epoch.
func groupIn(ns, name string, age int, fips ...string) *v1.NetworkGatewayGroup {
	g := gatewayObj(name, fips...)
	g.Namespace, g.UID = ns, types.UID("uid-"+ns+"-"+name)
	g.CreationTimestamp = metav1.NewTime(epoch.Add(time.Duration(age) * time.Minute))
	return g
}

func policyTo(name, ns, gw string, age int, dests ...string) *v1.EgressNATPolicy {
	p := policyObj(name, gw)
	p.UID = types.UID("uid-" + name)
	p.Spec.GatewayRef.Namespace = ns
	p.CreationTimestamp = metav1.NewTime(epoch.Add(time.Duration(age) * time.Minute))
	if len(dests) > 0 {
		p.Spec.Destinations = nil
		for _, d := range dests {
			p.Spec.Destinations = append(p.Spec.Destinations, v1.EgressDestination{CIDR: d})
		}
	}
	return p
}

func annotate(l *coordinationv1.Lease, kv ...string) *coordinationv1.Lease {
	for i := 0; i < len(kv); i += 2 {
		l.Annotations[kv[i]] = kv[i+1]
	}
	return l
}

// healthy makes every node answer the probes, now.
func (c *testController) healthy(nodes ...string) {
	for _, n := range nodes {
		c.setHealth(n, true, c.clock.Now())
	}
}

// quiet reconciles once more after the caches caught up and fails when it
// writes a status or records an event: a warning is recorded once.
func (c *testController) quiet(t *testing.T, cl *cluster) {
	t.Helper()
	c.waitCaches(t, cl)
	writes := cl.statusWrites("")
	cl.clk.Step(time.Second)
	c.mustReconcile(t)
	if n := cl.statusWrites("") - writes; n != 0 {
		t.Fatalf("%d status writes without a change", n)
	}
	checkEvents(t, c.events())
}

// TestFloatingIPIsNodeAddress is the issue: a group lists a worker's own
// address (a typo). It is never assigned (so no node adds or releases
// it), the group says why, a policy whose egress IP it is is not
// accepted, and the warning is recorded once.
func TestFloatingIPIsNodeAddress(t *testing.T) {
	objs := []runtime.Object{
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), leaseObj("n2", "192.0.2.12/24"),
		gatewayObj("gw", "192.0.2.12", fip1),
		policyObj("p1", "gw"),
	}
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)

	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1"}; !mapsEqual(g.Status.FloatingIPs, want) || g.Status.AssignedCount != 1 {
		t.Errorf("status.floatingIPs %v (assigned %d), want %v", g.Status.FloatingIPs, g.Status.AssignedCount, want)
	}
	checkCondition(t, "gateway Accepted", condition(t, g.Status.Conditions, v1.ConditionAccepted), metav1.ConditionTrue, v1.ReasonAccepted,
		"namespace kube-system is a gateway namespace", gwGen)
	checkCondition(t, "gateway FloatingIPsValid", condition(t, g.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionFalse,
		v1.ReasonFloatingIPRejected, "1 of 2 floating IPs are rejected and never assigned: 192.0.2.12: the InternalIP of node n2", gwGen)
	checkCondition(t, "gateway Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionFalse, v1.ReasonFloatingIPRejected,
		"1 of 2 floating IPs are rejected (see condition FloatingIPsValid); the other 1 are held by Up nodes", gwGen)

	p1 := cl.policy(t, "p1")
	if p1.Status.EgressIP != "" || p1.Status.GatewayNode != "" {
		t.Errorf("p1 status %+v", p1.Status)
	}
	msg := "egress IP 192.0.2.12 (the first floating IP of NetworkGatewayGroup kube-system/gw) is rejected and never assigned: the InternalIP of node n2"
	checkCondition(t, "p1 Accepted", condition(t, p1.Status.Conditions, v1.ConditionAccepted), metav1.ConditionFalse, v1.ReasonEgressIPRejected, msg, 2)
	checkCondition(t, "p1 Ready", condition(t, p1.Status.Conditions, v1.ConditionReady), metav1.ConditionFalse, v1.ReasonEgressIPRejected,
		"policy is not applied: "+msg, 2)
	checkEvents(t, c.events(),
		"Warning FloatingIPRejected 1 of 2 floating IPs are rejected and never assigned: 192.0.2.12: the InternalIP of node n2",
		"Warning EgressIPRejected "+msg)
	c.quiet(t, cl)
}

// TestRejectedIPLeavesStatus: a status written before (by an older
// operator) that gives a now rejected IP to a node loses it: the holder
// releases it (it added it), and the IP is not kept by stability.
func TestRejectedIPLeavesStatus(t *testing.T) {
	gw := gatewayObj("gw", fip1, fip2)
	gw.Status.FloatingIPs = map[string]string{fip1: "n1", fip2: "n2"}
	cl := newCluster(t,
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), annotate(leaseObj("n2", "192.0.2.12/24"), kube.AnnotationForeignAddresses, fip2), gw)
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	if _, ok := c.remembered(fip2); ok {
		t.Errorf("the controller remembers the rejected %s", fip2)
	}
	checkCondition(t, "gateway FloatingIPsValid", condition(t, g.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionFalse,
		v1.ReasonFloatingIPRejected, "1 of 2 floating IPs are rejected and never assigned: 192.0.2.101: already on the uplink of node n2, not added by egressnat", gwGen)

	// The foreign address goes away: the IP is usable again, the group
	// valid, and no warning is recorded for the recovery.
	c.waitCaches(t, cl)
	c.events()
	if _, err := cl.core.CoordinationV1().Leases(agentNamespace).Update(context.Background(), leaseObj("n2", "192.0.2.12/24"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the lease update in the cache", func() bool {
		o, _, _ := c.leases.GetByKey(agentNamespace + "/" + kube.AgentLeasePrefix + "n2")
		return o != nil && o.(*coordinationv1.Lease).Annotations[kube.AnnotationForeignAddresses] == ""
	})
	c.mustReconcile(t)
	g = cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1", fip2: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Fatalf("after the foreign address left: status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	checkCondition(t, "gateway FloatingIPsValid", condition(t, g.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionTrue,
		v1.ReasonFloatingIPsValid, "all 2 floating IPs can be assigned", gwGen)
	checkEvents(t, c.events())
}

// TestReservedFromLeases: every fact an agent advertises, and every Node
// address, reserves addresses; the message says which and why.
func TestReservedFromLeases(t *testing.T) {
	n1 := nodeObj("n1", "192.0.2.11", corev1.ConditionTrue)
	n1.Status.Addresses = append(n1.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "192.0.2.250"})
	cl := newCluster(t, n1, nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		annotate(leaseObj("n1", "192.0.2.11/24"), kube.AnnotationUplinkGateway, "192.0.2.1"),
		annotate(leaseObj("n2", "192.0.2.12/24,192.0.2.41/29"), kube.AnnotationUplinkGateway, "192.0.2.1", kube.AnnotationForeignAddresses, "192.0.2.77,192.0.2.78"),
		gatewayObj("gw", fip1, "192.0.2.1", "192.0.2.0", "192.0.2.255", "192.0.2.250", "192.0.2.78", "192.0.2.40", "192.0.2.47", "192.0.2.11"))
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n1"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Errorf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	checkCondition(t, "gateway FloatingIPsValid", condition(t, g.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionFalse,
		v1.ReasonFloatingIPRejected, "8 of 9 floating IPs are rejected and never assigned: "+
			"192.0.2.1: the uplink default gateway of node n1; "+
			"192.0.2.0: the network address of node n1's uplink subnet 192.0.2.0/24; "+
			"192.0.2.255: the broadcast address of node n1's uplink subnet 192.0.2.0/24; "+
			"192.0.2.250: the ExternalIP of node n1; "+
			"192.0.2.78: already on the uplink of node n2, not added by egressnat; "+
			"192.0.2.40: the network address of node n2's uplink subnet 192.0.2.40/29; "+
			"192.0.2.47: the broadcast address of node n2's uplink subnet 192.0.2.40/29; "+
			"192.0.2.11: the InternalIP of node n1", gwGen)
}

// TestFloatingIPConflict: one IP in two groups is kept by the older; the
// younger says so, its policy is not accepted, and the IP is assigned once.
// When the older group goes, the younger gets the IP.
func TestFloatingIPConflict(t *testing.T) {
	cl := newCluster(t,
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), leaseObj("n2", "192.0.2.12/24"),
		groupIn("kube-system", "a-young", 10, fip1, "192.0.2.102"), groupIn("kube-system", "z-old", 1, fip2, fip1),
		policyTo("p-young", "kube-system", "a-young", 0), policyTo("p-old", "kube-system", "z-old", 0, "198.51.100.0/24"))
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)

	young, old := cl.gateway(t, "a-young"), cl.gateway(t, "z-old")
	if want := map[string]string{"192.0.2.102": "n1"}; !mapsEqual(young.Status.FloatingIPs, want) {
		t.Errorf("a-young status.floatingIPs %v, want %v", young.Status.FloatingIPs, want)
	}
	if want := map[string]string{fip2: "n2", fip1: "n1"}; !mapsEqual(old.Status.FloatingIPs, want) {
		t.Errorf("z-old status.floatingIPs %v, want %v", old.Status.FloatingIPs, want)
	}
	conflict := "1 of 2 floating IPs are rejected and never assigned: 192.0.2.100: also listed by NetworkGatewayGroup kube-system/z-old, which is older and keeps it"
	checkCondition(t, "a-young FloatingIPsValid", condition(t, young.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionFalse,
		v1.ReasonFloatingIPConflict, conflict, gwGen)
	checkCondition(t, "z-old FloatingIPsValid", condition(t, old.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionTrue,
		v1.ReasonFloatingIPsValid, "all 2 floating IPs can be assigned", gwGen)
	acc := condition(t, cl.policy(t, "p-young").Status.Conditions, v1.ConditionAccepted)
	if acc.Status != metav1.ConditionFalse || acc.Reason != v1.ReasonEgressIPRejected || !strings.Contains(acc.Message, "kube-system/z-old, which is older") {
		t.Errorf("p-young Accepted %+v", acc)
	}
	if p := cl.policy(t, "p-old"); p.Status.EgressIP != fip2 || p.Status.GatewayNode != "n2" {
		t.Errorf("p-old status %+v", p.Status)
	}
	events := c.events()
	if !slices.Contains(events, "Warning FloatingIPConflict "+conflict) {
		t.Errorf("no conflict warning in %q", events)
	}
	c.quiet(t, cl)

	// The older group goes: the younger gets its IP, and its policy.
	if err := cl.dyn.Resource(kube.GatewayGVR).Namespace("kube-system").Delete(context.Background(), "z-old", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
	c.healthy("n1", "n2") // fresh answers: candidates for the freed IP
	c.mustReconcile(t)
	young = cl.gateway(t, "a-young")
	if young.Status.FloatingIPs[fip1] == "" || young.Status.AssignedCount != 2 {
		t.Errorf("after z-old left: a-young status %+v", young.Status)
	}
	checkCondition(t, "a-young FloatingIPsValid", condition(t, young.Status.Conditions, v1.ConditionFloatingIPsValid), metav1.ConditionTrue,
		v1.ReasonFloatingIPsValid, "all 2 floating IPs can be assigned", gwGen)
	if p := cl.policy(t, "p-young"); p.Status.EgressIP != fip1 || condition(t, p.Status.Conditions, v1.ConditionAccepted).Status != metav1.ConditionTrue {
		t.Errorf("p-young status %+v", p.Status)
	}
}

// TestGatewayNamespaces: a group outside the gateway namespaces is ignored:
// none of its IPs is assigned (not even when it is older than a group of
// kube-system listing the same IP), its policies are not accepted; the
// flag makes its namespace a gateway namespace.
func TestGatewayNamespaces(t *testing.T) {
	objs := func() []runtime.Object {
		return []runtime.Object{
			nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), leaseObj("n1", "192.0.2.11/24"),
			groupIn("team-a", "gw", 0, fip1, fip2), groupIn("kube-system", "gw", 5, fip2),
			policyTo("pa", "team-a", "gw", 0),
		}
	}
	t.Run("default: kube-system only", func(t *testing.T) {
		cl := newCluster(t, objs()...)
		c := cl.controller(t, false)
		c.healthy("n1")
		c.mustReconcile(t)
		g := cl.gatewayIn(t, "team-a", "gw")
		if len(g.Status.FloatingIPs) != 0 || len(g.Status.Nodes) != 0 || g.Status.AssignedCount != 0 {
			t.Errorf("the ignored group's status %+v", g.Status)
		}
		why := "the group is ignored and its floating IPs are not assigned: namespace team-a is not a gateway namespace " +
			"(gateway namespaces: kube-system; the flag --gateway-namespaces of the operator and the agents adds more)"
		checkCondition(t, "team-a/gw Accepted", condition(t, g.Status.Conditions, v1.ConditionAccepted), metav1.ConditionFalse,
			v1.ReasonNamespaceNotAllowed, why, gwGen)
		checkCondition(t, "team-a/gw Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionFalse, v1.ReasonNamespaceNotAllowed, why, gwGen)
		if apimeta.FindStatusCondition(g.Status.Conditions, v1.ConditionFloatingIPsValid) != nil {
			t.Errorf("an ignored group has a FloatingIPsValid condition: %+v", g.Status.Conditions)
		}
		if ks := cl.gateway(t, "gw"); !mapsEqual(ks.Status.FloatingIPs, map[string]string{fip2: "n1"}) {
			t.Errorf("kube-system/gw status.floatingIPs %v", ks.Status.FloatingIPs)
		}
		pa := cl.policy(t, "pa")
		checkCondition(t, "pa Accepted", condition(t, pa.Status.Conditions, v1.ConditionAccepted), metav1.ConditionFalse, v1.ReasonGatewayIgnored,
			"NetworkGatewayGroup team-a/gw is ignored: namespace team-a is not a gateway namespace "+
				"(gateway namespaces: kube-system; the flag --gateway-namespaces of the operator and the agents adds more)", 2)
		events := c.events()
		if !slices.Contains(events, "Warning NamespaceNotAllowed "+why) {
			t.Errorf("no NamespaceNotAllowed warning in %q", events)
		}
		c.quiet(t, cl)
	})
	t.Run("--gateway-namespaces team-a: honoured, and older", func(t *testing.T) {
		cl := newCluster(t, objs()...)
		c := cl.controllerWith(t, func(cfg *Config) { cfg.GatewayNamespaces = []string{"kube-system", "team-a"} })
		c.healthy("n1")
		c.mustReconcile(t)
		if g := cl.gatewayIn(t, "team-a", "gw"); !mapsEqual(g.Status.FloatingIPs, map[string]string{fip1: "n1", fip2: "n1"}) {
			t.Errorf("team-a/gw status.floatingIPs %v", g.Status.FloatingIPs)
		}
		if ks := cl.gateway(t, "gw"); len(ks.Status.FloatingIPs) != 0 ||
			condition(t, ks.Status.Conditions, v1.ConditionFloatingIPsValid).Reason != v1.ReasonFloatingIPConflict {
			t.Errorf("kube-system/gw status %+v", ks.Status)
		}
		if pa := cl.policy(t, "pa"); pa.Status.EgressIP != fip1 || pa.Status.GatewayNode != "n1" {
			t.Errorf("pa status %+v", pa.Status)
		}

		// The operator restarts without the flag: team-a/gw is ignored, its
		// IPs leave its status and it has no FloatingIPsValid any more.
		c.waitCaches(t, cl)
		d := cl.controller(t, false)
		d.healthy("n1")
		d.mustReconcile(t)
		g := cl.gatewayIn(t, "team-a", "gw")
		if len(g.Status.FloatingIPs) != 0 || apimeta.FindStatusCondition(g.Status.Conditions, v1.ConditionFloatingIPsValid) != nil ||
			condition(t, g.Status.Conditions, v1.ConditionAccepted).Reason != v1.ReasonNamespaceNotAllowed {
			t.Errorf("team-a/gw status once ignored %+v", g.Status)
		}
		if ks := cl.gateway(t, "gw"); !mapsEqual(ks.Status.FloatingIPs, map[string]string{fip2: "n1"}) {
			t.Errorf("kube-system/gw status.floatingIPs %v once team-a/gw is ignored", ks.Status.FloatingIPs)
		}
	})
}

// TestSubnetsIgnored: an advertised subnet shorter than the minimum prefix,
// or without the node's InternalIP, is not used: no floating IP is assigned
// to the node in it, a Warning on the Node says so once; a lower minimum
// admits the short subnet.
func TestSubnetsIgnored(t *testing.T) {
	objs := func() []runtime.Object {
		return []runtime.Object{
			nodeObj("n1", "10.1.2.3", corev1.ConditionTrue), leaseObj("n1", "10.1.2.3/8"),
			nodeObj("n2", "192.0.2.12", corev1.ConditionTrue), leaseObj("n2", "198.51.100.12/24,192.0.2.12/24"),
			gatewayObj("gw", "10.9.9.9", "198.51.100.100", fip1),
		}
	}
	cl := newCluster(t, objs()...)
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	g := cl.gateway(t, "gw")
	if want := map[string]string{fip1: "n2"}; !mapsEqual(g.Status.FloatingIPs, want) {
		t.Errorf("status.floatingIPs %v, want %v", g.Status.FloatingIPs, want)
	}
	checkCondition(t, "gateway Ready", condition(t, g.Status.Conditions, "Ready"), metav1.ConditionFalse, v1.ReasonUnassigned,
		"2 of 3 floating IPs have no Up node in their subnet: 10.9.9.9, 198.51.100.100", gwGen)
	checkEvents(t, c.events(),
		"Warning UplinkSubnetIgnored uplink subnets advertised by the agent are ignored, no floating IP is assigned to this node in them: 10.1.2.3/8 (shorter than the minimum prefix /16 (--min-subnet-prefix))",
		"Warning UplinkSubnetIgnored uplink subnets advertised by the agent are ignored, no floating IP is assigned to this node in them: 198.51.100.12/24 (does not contain the node's InternalIP 192.0.2.12)")
	c.quiet(t, cl)

	cl = newCluster(t, objs()...)
	c = cl.controllerWith(t, func(cfg *Config) { cfg.MinSubnetPrefix = 8 })
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	if want := map[string]string{"10.9.9.9": "n1", fip1: "n2"}; !mapsEqual(cl.gateway(t, "gw").Status.FloatingIPs, want) {
		t.Errorf("with --min-subnet-prefix 8: status.floatingIPs %v, want %v", cl.gateway(t, "gw").Status.FloatingIPs, want)
	}
}

// TestPolicyOverlap: accepted policies whose destinations overlap and
// whose sources can select the same pods get an Overlap condition naming
// each other and the winner, with one Warning each; a policy that does not
// overlap, or is not accepted, has none; the condition goes when the
// overlap does.
func TestPolicyOverlap(t *testing.T) {
	narrow := policyTo("narrow", "kube-system", "gw", 5, "203.0.113.0/25")
	other := policyTo("other-team", "kube-system", "gw", 0, "203.0.113.0/24")
	other.Spec.Sources = []v1.EgressSource{{NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"team": "b"}}}}
	wide := policyTo("wide", "kube-system", "gw", 1, "203.0.113.0/24")
	wide.Spec.Sources = []v1.EgressSource{{NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"team": "a"}}}}
	cl := newCluster(t,
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), leaseObj("n1", "192.0.2.11/24"),
		gatewayObj("gw", fip1), narrow, wide, other, policyTo("ghost", "kube-system", "missing", 0, "203.0.113.0/24"))
	c := cl.controller(t, false)
	c.healthy("n1")
	c.mustReconcile(t)

	// narrow (all pods) overlaps wide and other-team; wide (team a) and
	// other-team (team b) select no common namespace. ghost is not accepted.
	want := map[string]string{
		"narrow": "its destinations overlap those of 2 other policies that can select the same pods: " +
			"other-team on 203.0.113.0/25 (narrow wins there: longest prefix); wide on 203.0.113.0/25 (narrow wins there: longest prefix)",
		"wide":       "its destinations overlap those of 1 other policy that can select the same pods: narrow on 203.0.113.0/25 (narrow wins there: longest prefix)",
		"other-team": "its destinations overlap those of 1 other policy that can select the same pods: narrow on 203.0.113.0/25 (narrow wins there: longest prefix)",
	}
	var wantEvents []string
	for name, msg := range want {
		checkCondition(t, name+" Overlap", condition(t, cl.policy(t, name).Status.Conditions, v1.ConditionOverlap), metav1.ConditionTrue,
			v1.ReasonOverlappingPolicies, msg, 2)
		wantEvents = append(wantEvents, "Warning OverlappingPolicies "+msg)
	}
	if cnd := apimeta.FindStatusCondition(cl.policy(t, "ghost").Status.Conditions, v1.ConditionOverlap); cnd != nil {
		t.Errorf("ghost (not accepted) has an Overlap condition %+v", cnd)
	}
	var got []string
	for _, e := range c.events() {
		if strings.Contains(e, "Overlapping") {
			got = append(got, e)
		}
	}
	checkEvents(t, got, wantEvents...)
	c.quiet(t, cl)

	// narrow goes: nothing overlaps any more.
	if err := cl.dyn.Resource(kube.PolicyGVR).Delete(context.Background(), "narrow", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.waitCaches(t, cl)
	c.mustReconcile(t)
	for _, name := range []string{"wide", "other-team"} {
		if cnd := apimeta.FindStatusCondition(cl.policy(t, name).Status.Conditions, v1.ConditionOverlap); cnd != nil {
			t.Errorf("%s keeps an Overlap condition %+v", name, cnd)
		}
	}
	checkEvents(t, c.events())
}

// TestLeaseAnnotations: the annotations' format round-trips, and a bad
// one is an error that leaves the other facts.
func TestLeaseAnnotations(t *testing.T) {
	addrs, err := kube.ParseAddresses(" 192.0.2.1,,::ffff:192.0.2.2 ")
	if err != nil || kube.FormatAddresses(addrs) != "192.0.2.1,192.0.2.2" {
		t.Fatalf("ParseAddresses: %v %v", addrs, err)
	}
	if got := kube.FormatAddresses(append(addrs, addrs[0])); got != "192.0.2.1,192.0.2.2" {
		t.Errorf("FormatAddresses with a duplicate: %q", got)
	}
	for _, bad := range []string{"192.0.2.1,nonsense", "2001:db8::1"} {
		if _, err := kube.ParseAddresses(bad); err == nil {
			t.Errorf("ParseAddresses(%q) accepted it", bad)
		}
	}
}

// TestConflictStaleStatus: the statuses of two groups listing one IP both
// give it a node (written before the IP was in both). Only the status of
// the group that keeps the IP counts for stability: the IP stays where the
// older group has it.
func TestConflictStaleStatus(t *testing.T) {
	old, young := groupIn("kube-system", "a-old", 1, fip1), groupIn("kube-system", "z-young", 9, fip1)
	old.Status.FloatingIPs = map[string]string{fip1: "n1"}
	young.Status.FloatingIPs = map[string]string{fip1: "n2"}
	cl := newCluster(t,
		nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), leaseObj("n2", "192.0.2.12/24"), old, young)
	c := cl.controller(t, false)
	c.healthy("n1", "n2")
	c.mustReconcile(t)
	if got := cl.gateway(t, "a-old").Status.FloatingIPs; !mapsEqual(got, map[string]string{fip1: "n1"}) {
		t.Errorf("a-old status.floatingIPs %v, want %s on n1", got, fip1)
	}
	if got := cl.gateway(t, "z-young").Status.FloatingIPs; len(got) != 0 {
		t.Errorf("z-young status.floatingIPs %v, want none", got)
	}
}

// TestWarningsOnceWithStaleCache: a reconcile that sees its own status
// write not yet in the cache writes again, but records no warning again.
func TestWarningsOnceWithStaleCache(t *testing.T) {
	cl := newCluster(t, nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), leaseObj("n1", "192.0.2.11/24"),
		gatewayObj("gw", "192.0.2.11", fip1), groupIn("team-a", "gw", 0, fip2), policyObj("p1", "gw"),
		gatewayObj("gw2", "192.0.2.102"), policyTo("q1", "kube-system", "gw2", 0), policyTo("q2", "kube-system", "gw2", 1))
	c := cl.controller(t, false)
	c.healthy("n1")
	stale := []any{}
	for _, o := range c.gateways.List() {
		stale = append(stale, o)
	}
	for _, o := range c.policies.List() {
		stale = append(stale, o)
	}
	c.mustReconcile(t)
	if n := len(warnings(c.events())); n != 5 {
		t.Fatalf("%d warnings, want 5 (FloatingIPRejected, NamespaceNotAllowed, EgressIPRejected, OverlappingPolicies twice)", n)
	}
	c.waitCaches(t, cl)
	for _, o := range stale {
		var err error
		switch o := o.(type) {
		case *v1.NetworkGatewayGroup:
			err = c.gateways.Update(o)
		case *v1.EgressNATPolicy:
			err = c.policies.Update(o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	writes := cl.statusWrites("")
	c.mustReconcile(t)
	if cl.statusWrites("") == writes {
		t.Fatal("the stale cache did not make the controller write again")
	}
	// (GatewayAssigned, a Normal event, is recorded again: it follows the
	// status seen.)
	checkEvents(t, warnings(c.events()))
}

func warnings(events []string) []string {
	var out []string
	for _, e := range events {
		if strings.HasPrefix(e, "Warning ") {
			out = append(out, e)
		}
	}
	return out
}

// TestWarningsOnceAcrossLeaders: a new leader (a new process, nothing
// remembered) that writes a group's status for another reason does not
// record again the warning the status already holds.
func TestWarningsOnceAcrossLeaders(t *testing.T) {
	cl := newCluster(t, nodeObj("n1", "192.0.2.11", corev1.ConditionTrue), nodeObj("n2", "192.0.2.12", corev1.ConditionTrue),
		leaseObj("n1", "192.0.2.11/24"), leaseObj("n2", "192.0.2.12/24"), gatewayObj("gw", fip1, "192.0.2.11"))
	a := cl.controller(t, false)
	a.healthy("n1", "n2")
	a.mustReconcile(t)
	if events := a.events(); len(events) != 1 || !strings.HasPrefix(events[0], "Warning FloatingIPRejected") {
		t.Fatalf("events %q, want one FloatingIPRejected warning", events)
	}
	b := cl.controller(t, false)
	b.waitCaches(t, cl)
	b.healthy("n1")
	b.setHealth("n2", false, epoch) // n2 Down for b: the status changes
	writes := cl.statusWrites("networkgatewaygroups")
	b.mustReconcile(t)
	if cl.statusWrites("networkgatewaygroups") == writes {
		t.Fatal("b wrote no status")
	}
	if g := cl.gateway(t, "gw"); g.Status.Nodes["n2"] != v1.NodeDown {
		t.Fatalf("status %+v", g.Status)
	}
	checkEvents(t, b.events())
}

// TestBadLeaseAnnotation: a lease annotation that does not parse is logged
// once (not every second), and the other annotations still count: the
// node stays registered with its subnets.
func TestBadLeaseAnnotation(t *testing.T) {
	cl := newCluster(t, nodeObj("n1", "192.0.2.11", corev1.ConditionTrue),
		annotate(leaseObj("n1", "192.0.2.11/24"), kube.AnnotationUplinkGateway, "not-an-address", kube.AnnotationForeignAddresses, "192.0.2.101"),
		gatewayObj("gw", fip1, fip2))
	core, logs := observer.New(zap.WarnLevel)
	c := cl.controllerWith(t, func(cfg *Config) { cfg.Log = zap.New(core) })
	c.healthy("n1")
	c.mustReconcile(t)
	c.waitCaches(t, cl)
	cl.clk.Step(time.Second)
	c.mustReconcile(t)
	if n := logs.FilterMessage("bad annotation on the agent's lease").Len(); n != 1 {
		t.Errorf("the bad annotation was logged %d times, want once", n)
	}
	g := cl.gateway(t, "gw")
	if !mapsEqual(g.Status.FloatingIPs, map[string]string{fip1: "n1"}) {
		t.Errorf("status.floatingIPs %v, want %s on n1 (and %s rejected: foreign)", g.Status.FloatingIPs, fip1, fip2)
	}
}

// TestSpoofedAdvertisementChangesNothing: a node's Lease rewritten by
// someone else, with a subnet that does not contain the node's InternalIP
// or with garbage, neither takes the node's IPs away nor makes it Down:
// the node keeps the subnets its agent last proved.
func TestSpoofedAdvertisementChangesNothing(t *testing.T) {
	for _, spoof := range []string{"198.51.100.13/24", "not a subnet"} {
		t.Run(spoof, func(t *testing.T) {
			cl := newCluster(t, objects()...)
			c := cl.controller(t, false)
			c.setHealth("n1", true, epoch)
			c.setHealth("n2", true, epoch)
			c.mustReconcile(t)
			before := cl.gateway(t, "gw").Status
			ctx := context.Background()
			l, err := cl.core.CoordinationV1().Leases(agentNamespace).Get(ctx, kube.AgentLeasePrefix+"n1", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			l.Annotations[kube.AnnotationSubnets] = spoof
			if _, err := cl.core.CoordinationV1().Leases(agentNamespace).Update(ctx, l, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the lease cache to hold the spoofed lease", func() bool {
				obj, ok, _ := c.leases.GetByKey(agentNamespace + "/" + kube.AgentLeasePrefix + "n1")
				return ok && obj.(*coordinationv1.Lease).Annotations[kube.AnnotationSubnets] == spoof
			})
			c.mustReconcile(t)
			after := cl.gateway(t, "gw").Status
			if spoof == "not a subnet" && !slices.ContainsFunc(c.events(), func(e string) bool { return strings.Contains(e, "BadAgentLease") }) {
				t.Fatalf("no BadAgentLease event for a Lease that does not parse: %q", c.events())
			}
			if !mapsEqual(after.FloatingIPs, before.FloatingIPs) || !mapsEqual(after.Nodes, before.Nodes) || len(after.RecentMoves) != 0 {
				t.Fatalf("after the spoofed advertisement: floating IPs %v nodes %v moves %v; before %v %v",
					after.FloatingIPs, after.Nodes, after.RecentMoves, before.FloatingIPs, before.Nodes)
			}
		})
	}
}

// TestClusterInternalDestinations: a policy whose destinations overlap the
// cluster's own networks (a node's pod CIDR, a node address) is told so in
// a ClusterInternal condition and one Warning Event; the others are not.
func TestClusterInternalDestinations(t *testing.T) {
	objs := objects()
	n1 := nodeObj("n1", "192.0.2.11", corev1.ConditionTrue)
	n1.Spec.PodCIDRs = []string{"10.244.1.0/24"}
	objs[0] = n1
	wide := policyObj("wide", "gw")
	wide.Spec.Destinations = []v1.EgressDestination{{CIDR: "0.0.0.0/0"}}
	objs = append(objs, wide)
	cl := newCluster(t, objs...)
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	got := apimeta.FindStatusCondition(cl.policy(t, "wide").Status.Conditions, v1.ConditionClusterInternal)
	if got == nil || got.Status != metav1.ConditionTrue || !strings.Contains(got.Message, "10.244.1.0/24 (pod CIDR of node n1)") ||
		!strings.Contains(got.Message, "192.0.2.11/32 (InternalIP of node n1)") {
		t.Fatalf("wide: ClusterInternal %+v", got)
	}
	if c := apimeta.FindStatusCondition(cl.policy(t, "p1").Status.Conditions, v1.ConditionClusterInternal); c != nil {
		t.Fatalf("p1 (203.0.113.0/24): ClusterInternal %+v", c)
	}
	n := 0
	for _, e := range c.events() {
		if strings.Contains(e, v1.ReasonClusterInternal) {
			n++
		}
	}
	c.mustReconcile(t)
	for _, e := range c.events() {
		if strings.Contains(e, v1.ReasonClusterInternal) {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d ClusterInternal events, want 1", n)
	}
}

// TestOutOfMarksCondition: with more nodes holding egress IPs than the
// agents' mark mask routes to, the policies of the holders beyond (the
// highest addresses, as an agent without marks keeps the lowest) get an
// OutOfMarks condition; the others do not.
func TestOutOfMarksCondition(t *testing.T) {
	gw2 := gatewayObj("gw2", "192.0.2.102")
	gw2.Spec.FloatingIPs = []string{"192.0.2.102"}
	objs := append(objects(), gw2, policyObj("p3", "gw2"))
	// n1 holds fip1 and fip2 can only go to n2: make n2 hold gw2's IP
	// by giving gw the one IP n1 holds.
	objs[5] = gatewayObj("gw", fip1)
	cl := newCluster(t, objs...)
	c := cl.controllerWith(t, func(cfg *Config) { cfg.MarkMask = 0x1 }) // one next hop
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	c.mustReconcile(t)
	p1, p3 := cl.policy(t, "p1"), cl.policy(t, "p3")
	if p1.Status.GatewayNode == p3.Status.GatewayNode || p1.Status.GatewayNode == "" || p3.Status.GatewayNode == "" {
		t.Fatalf("the test needs two holders: p1 on %q, p3 on %q", p1.Status.GatewayNode, p3.Status.GatewayNode)
	}
	high := p3
	low := p1
	if p1.Status.GatewayNode == "n2" { // n2 192.0.2.12 > n1 192.0.2.11
		high, low = p1, p3
	}
	if c := apimeta.FindStatusCondition(high.Status.Conditions, v1.ConditionOutOfMarks); c == nil || c.Status != metav1.ConditionTrue {
		t.Fatalf("%s (held by %s): OutOfMarks %+v", high.Name, high.Status.GatewayNode, c)
	}
	if c := apimeta.FindStatusCondition(low.Status.Conditions, v1.ConditionOutOfMarks); c != nil {
		t.Fatalf("%s (held by %s): OutOfMarks %+v", low.Name, low.Status.GatewayNode, c)
	}
}

// TestPolicyNeverAheadOfGroup: when a group's status write is refused, the
// policies' statuses do not name a holder the group's status does not
// (agents act on the group's; a client waiting for the policy must find
// the group agreeing); the retry writes both.
func TestPolicyNeverAheadOfGroup(t *testing.T) {
	cl := newCluster(t, objects()...)
	refused := cl.conflictOnce()
	c := cl.controller(t, false)
	c.setHealth("n1", true, epoch)
	c.setHealth("n2", true, epoch)
	if err := c.reconcile(context.Background()); err == nil || refused() != 1 {
		t.Fatalf("reconcile: %v, %d refused", err, refused())
	}
	if p := cl.policy(t, "p1"); p.Status.GatewayNode != "" || p.Status.EgressIP != fip1 {
		t.Fatalf("p1 names holder %q while the group's status names none", p.Status.GatewayNode)
	}
	c.waitCaches(t, cl)
	c.mustReconcile(t)
	if g, p := cl.gateway(t, "gw"), cl.policy(t, "p1"); p.Status.GatewayNode == "" || g.Status.FloatingIPs[fip1] != p.Status.GatewayNode {
		t.Fatalf("after the retry: group %v, policy holder %q", g.Status.FloatingIPs, p.Status.GatewayNode)
	}
}

// TestLeaseMatters: only an agent's Lease appearing, going or changing
// its annotations wakes reconcile; renewals and the leader Lease do not.
func TestLeaseMatters(t *testing.T) {
	agent := leaseObj("n1", "192.0.2.11/24")
	renewed := agent.DeepCopy()
	renewed.Spec.RenewTime = &metav1.MicroTime{Time: epoch}
	moved := agent.DeepCopy()
	moved.Annotations[kube.AnnotationSubnets] = "192.0.2.11/25"
	leader := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: agentNamespace, Name: "egressnat-operator"}}
	for _, tc := range []struct {
		name     string
		old, obj any
		want     bool
	}{
		{"agent lease added", nil, agent, true},
		{"agent lease renewed", agent, renewed, false},
		{"agent lease advertises another subnet", agent, moved, true},
		{"leader lease renewed", leader, leader.DeepCopy(), false},
		{"leader lease added", nil, leader, false},
		{"unknown final state", nil, cache.DeletedFinalStateUnknown{Key: "x"}, true},
	} {
		if got := leaseMatters(tc.old, tc.obj); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
