package selector

import (
	"net/netip"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestDecide(t *testing.T) {
	egress := netip.MustParseAddr("192.0.2.100")
	n2 := netip.MustParseAddr("198.51.100.2")
	// facts: gateway kube-system/gw with floating IPs 192.0.2.100 (held by
	// holder) and 192.0.2.101 (held by n1), decided on n1 with n2's IP known.
	facts := func(holder string) PolicyFacts {
		f := PolicyFacts{Gateway: "kube-system/gw", GatewayFound: true,
			FloatingIPs: []string{"192.0.2.100", "192.0.2.101"},
			Holders:     map[string]string{"192.0.2.101": "n1"},
			Node:        "n1", NodeIPs: map[string]netip.Addr{"n2": n2}, NodeIPsKnown: true}
		if holder != "" {
			f.Holders["192.0.2.100"] = holder
		}
		return f
	}
	accepted := Decision{Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.0.2.100 of NetworkGatewayGroup kube-system/gw", EgressIP: egress}
	held := func(d Decision, node string) Decision {
		d.Ready, d.ReadyReason, d.ReadyMessage, d.Holder = true, v1.ReasonApplied, "node "+node+" holds egress IP 192.0.2.100", node
		return d
	}
	unheld := func(d Decision, consequence string) Decision {
		d.ReadyReason = v1.ReasonGatewayUnavailable
		d.ReadyMessage = "no node holds egress IP 192.0.2.100 of NetworkGatewayGroup kube-system/gw (no Up node has a subnet containing it); selected traffic to the destinations " + consequence
		return d
	}
	with := func(d Decision, change func(*Decision)) Decision { change(&d); return d }
	cases := []struct {
		name string
		f    func(*PolicyFacts)
		want Decision
	}{
		{
			name: "this node holds the egress IP: Gateway",
			f:    func(f *PolicyFacts) { *f = facts("n1") },
			want: with(held(accepted, "n1"), func(d *Decision) { d.Applied, d.Mode = true, ModeGateway }),
		},
		{
			name: "another node holds it: Reroute to its IP",
			f:    func(f *PolicyFacts) { *f = facts("n2") },
			want: with(held(accepted, "n2"), func(d *Decision) { d.Applied, d.Mode, d.NextHop = true, ModeReroute, n2 }),
		},
		{
			name: "IPv4-mapped next hop is unmapped",
			f: func(f *PolicyFacts) {
				*f = facts("n2")
				f.NodeIPs["n2"] = netip.AddrFrom16(n2.As16())
			},
			want: with(held(accepted, "n2"), func(d *Decision) { d.Applied, d.Mode, d.NextHop = true, ModeReroute, n2 }),
		},
		{
			name: "next hops unknown (operator, egressnatctl): Reroute without next hop",
			f: func(f *PolicyFacts) {
				*f = facts("n3")
				f.NodeIPs, f.NodeIPsKnown = nil, false
			},
			want: with(held(accepted, "n3"), func(d *Decision) { d.Applied, d.Mode = true, ModeReroute }),
		},
		{
			name: "view from no node: Reroute",
			f: func(f *PolicyFacts) {
				*f = facts("n1")
				f.Node, f.NodeIPs, f.NodeIPsKnown = "", nil, false
			},
			want: with(held(accepted, "n1"), func(d *Decision) { d.Applied, d.Mode = true, ModeReroute }),
		},
		{
			name: "the holder's IP is unknown to this node: Drop",
			f:    func(f *PolicyFacts) { *f = facts("n9") },
			want: with(held(accepted, "n9"), func(d *Decision) { d.Applied, d.Mode = true, ModeDrop }),
		},
		{
			name: "the holder's IP is unknown, agent falls back: left out",
			f: func(f *PolicyFacts) {
				*f = facts("n9")
				f.FallbackToNodeIP = true
			},
			want: with(held(accepted, "n9"), func(d *Decision) { d.Fallback = true }),
		},
		{
			name: "nobody holds it: Drop",
			f:    func(f *PolicyFacts) { *f = facts("") },
			want: with(unheld(accepted, "is dropped"), func(d *Decision) { d.Applied, d.Mode = true, ModeDrop }),
		},
		{
			name: "nobody holds it, status.whenUnavailable Drop: Drop",
			f: func(f *PolicyFacts) {
				*f = facts("")
				f.WhenUnavailable = v1.UnavailableDrop
			},
			want: with(unheld(accepted, "is dropped"), func(d *Decision) { d.Applied, d.Mode = true, ModeDrop }),
		},
		{
			name: "nobody holds it, flag FallbackToNodeIP: left out",
			f: func(f *PolicyFacts) {
				*f = facts("")
				f.FallbackToNodeIP = true
			},
			want: with(unheld(accepted, "leaves with the node IPs (fallback to node IP is enabled)"), func(d *Decision) { d.Fallback = true }),
		},
		{
			name: "nobody holds it, status.whenUnavailable NodeIP: left out",
			f: func(f *PolicyFacts) {
				*f = facts("")
				f.WhenUnavailable = v1.UnavailableNodeIP
			},
			want: with(unheld(accepted, "leaves with the node IPs (status.whenUnavailable is NodeIP)"), func(d *Decision) { d.Fallback = true }),
		},
		{
			name: "fallback does not matter while a reachable node holds it",
			f: func(f *PolicyFacts) {
				*f = facts("n2")
				f.FallbackToNodeIP, f.WhenUnavailable = true, v1.UnavailableNodeIP
			},
			want: with(held(accepted, "n2"), func(d *Decision) { d.Applied, d.Mode, d.NextHop = true, ModeReroute, n2 }),
		},
		{
			name: "only the first floating IP counts",
			f: func(f *PolicyFacts) {
				*f = facts("")
				f.Holders = map[string]string{"192.0.2.101": "n1"}
			},
			want: with(unheld(accepted, "is dropped"), func(d *Decision) { d.Applied, d.Mode = true, ModeDrop }),
		},
		{
			name: "gateway not found",
			f:    func(f *PolicyFacts) { *f = PolicyFacts{Gateway: "kube-system/gw", Node: "n1"} },
			want: Decision{AcceptedReason: v1.ReasonGatewayNotFound, AcceptedMessage: "NetworkGatewayGroup kube-system/gw not found",
				ReadyReason: v1.ReasonGatewayNotFound, ReadyMessage: "policy is not applied: NetworkGatewayGroup kube-system/gw not found"},
		},
		{
			name: "gateway not found, whatever the fallback",
			f: func(f *PolicyFacts) {
				*f = PolicyFacts{Gateway: "kube-system/gw", Node: "n1", FallbackToNodeIP: true, WhenUnavailable: v1.UnavailableNodeIP}
			},
			want: Decision{AcceptedReason: v1.ReasonGatewayNotFound, AcceptedMessage: "NetworkGatewayGroup kube-system/gw not found",
				ReadyReason: v1.ReasonGatewayNotFound, ReadyMessage: "policy is not applied: NetworkGatewayGroup kube-system/gw not found"},
		},
		{
			name: "no floating IPs",
			f: func(f *PolicyFacts) {
				*f = facts("n1")
				f.FloatingIPs = nil
			},
			want: Decision{AcceptedReason: v1.ReasonNoFloatingIP, AcceptedMessage: "NetworkGatewayGroup kube-system/gw has no floating IPs",
				ReadyReason: v1.ReasonNoFloatingIP, ReadyMessage: "policy is not applied: NetworkGatewayGroup kube-system/gw has no floating IPs"},
		},
		{
			name: "first floating IP is IPv6",
			f: func(f *PolicyFacts) {
				*f = facts("n1")
				f.FloatingIPs = []string{"2001:db8::1", "192.0.2.100"}
			},
			want: Decision{AcceptedReason: v1.ReasonNoFloatingIP, AcceptedMessage: `the first floating IP of NetworkGatewayGroup kube-system/gw, "2001:db8::1", is not an IPv4 address`,
				ReadyReason: v1.ReasonNoFloatingIP, ReadyMessage: `policy is not applied: the first floating IP of NetworkGatewayGroup kube-system/gw, "2001:db8::1", is not an IPv4 address`},
		},
		{
			name: "spaces and IPv4-mapped form: the canonical address",
			f: func(f *PolicyFacts) {
				*f = facts("n1")
				f.FloatingIPs = []string{" ::ffff:192.0.2.100 "}
			},
			want: with(held(accepted, "n1"), func(d *Decision) { d.Applied, d.Mode = true, ModeGateway }),
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var f PolicyFacts
			tc.f(&f)
			if got := Decide(f); got != tc.want {
				t.Fatalf("Decide:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestFactsOf(t *testing.T) {
	pol := &v1.EgressNATPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p"},
		Spec:   v1.EgressNATPolicySpec{GatewayRef: v1.GatewayRef{Namespace: "kube-system", Name: "gw"}},
		Status: v1.EgressNATPolicyStatus{WhenUnavailable: v1.UnavailableNodeIP}}
	f := FactsOf(pol, nil)
	if f.Gateway != "kube-system/gw" || f.GatewayFound || f.WhenUnavailable != v1.UnavailableNodeIP {
		t.Fatalf("without a group: %+v", f)
	}
	g := selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")
	f = FactsOf(pol, g)
	if !f.GatewayFound || len(f.FloatingIPs) != 1 || f.FloatingIPs[0] != "192.0.2.100" || f.Holders["192.0.2.100"] != "n2" {
		t.Fatalf("with a group: %+v", f)
	}
}
