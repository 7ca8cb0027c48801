package gateway

import (
	"net/netip"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
)

func TestResolvePolicy(t *testing.T) {
	groups := map[string]Group{
		"kube-system/gw":     seedGroup,
		"kube-system/empty":  {Namespace: "kube-system", Name: "empty"},
		"kube-system/bad":    {Namespace: "kube-system", Name: "bad", FloatingIPs: []netip.Addr{{}}},
		"kube-system/v6":     {Namespace: "kube-system", Name: "v6", FloatingIPs: ips("2001:db8::1", "192.168.1.100")},
		"kube-system/mapped": {Namespace: "kube-system", Name: "mapped", FloatingIPs: []netip.Addr{netip.AddrFrom16(ip("192.168.1.100").As16())}},
	}
	held := a("192.168.1.100", "worker1")
	cases := []struct {
		name     string
		ref      v1.GatewayRef
		asg      map[netip.Addr]string
		fallback bool
		want     Resolution
	}{
		{
			name: "applied",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "gw"},
			asg:  held,
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/gw",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node worker1 holds egress IP 192.168.1.100",
				EgressIP: ip("192.168.1.100"), Node: "worker1",
			},
		},
		{
			name: "only the first floating IP counts",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "gw"},
			asg:  a("192.168.1.101", "worker2"),
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/gw",
				ReadyReason:  v1.ReasonGatewayUnavailable,
				ReadyMessage: "no node holds egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/gw (no Up node has a subnet containing it); selected traffic to the destinations is dropped",
				EgressIP:     ip("192.168.1.100"),
			},
		},
		{
			name:     "unavailable with fallback",
			ref:      v1.GatewayRef{Namespace: "kube-system", Name: "gw"},
			asg:      a(),
			fallback: true,
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/gw",
				ReadyReason:  v1.ReasonGatewayUnavailable,
				ReadyMessage: "no node holds egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/gw (no Up node has a subnet containing it); selected traffic to the destinations leaves with the node IPs (fallback to node IP is enabled)",
				EgressIP:     ip("192.168.1.100"),
			},
		},
		{
			name: "gateway not found",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "gw2"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonGatewayNotFound, AcceptedMessage: "NetworkGatewayGroup kube-system/gw2 not found",
				ReadyReason: v1.ReasonGatewayNotFound, ReadyMessage: "policy is not applied: NetworkGatewayGroup kube-system/gw2 not found",
			},
		},
		{
			name: "same name, other namespace: not found",
			ref:  v1.GatewayRef{Namespace: "default", Name: "gw"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonGatewayNotFound, AcceptedMessage: "NetworkGatewayGroup default/gw not found",
				ReadyReason: v1.ReasonGatewayNotFound, ReadyMessage: "policy is not applied: NetworkGatewayGroup default/gw not found",
			},
		},
		{
			name: "no floating IP",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "empty"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonNoFloatingIP, AcceptedMessage: "NetworkGatewayGroup kube-system/empty has no floating IPs",
				ReadyReason: v1.ReasonNoFloatingIP, ReadyMessage: "policy is not applied: NetworkGatewayGroup kube-system/empty has no floating IPs",
			},
		},
		{
			name: "invalid first floating IP",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "bad"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonNoFloatingIP, AcceptedMessage: `the first floating IP of NetworkGatewayGroup kube-system/bad, "", is not an IPv4 address`,
				ReadyReason: v1.ReasonNoFloatingIP, ReadyMessage: `policy is not applied: the first floating IP of NetworkGatewayGroup kube-system/bad, "", is not an IPv4 address`,
			},
		},
		{
			name: "IPv6 first floating IP",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "v6"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonNoFloatingIP, AcceptedMessage: `the first floating IP of NetworkGatewayGroup kube-system/v6, "2001:db8::1", is not an IPv4 address`,
				ReadyReason: v1.ReasonNoFloatingIP, ReadyMessage: `policy is not applied: the first floating IP of NetworkGatewayGroup kube-system/v6, "2001:db8::1", is not an IPv4 address`,
			},
		},
		{
			name: "IPv4-mapped first floating IP: its IPv4 form is looked up",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "mapped"},
			asg:  held,
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/mapped",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node worker1 holds egress IP 192.168.1.100",
				EgressIP: ip("192.168.1.100"), Node: "worker1",
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := ResolvePolicy(tc.ref, groups, tc.asg, tc.fallback); got != tc.want {
				t.Fatalf("ResolvePolicy:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}
