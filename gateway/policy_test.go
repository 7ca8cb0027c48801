package gateway

import (
	"net/netip"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestResolvePolicy(t *testing.T) {
	group := func(ns, name string, fips ...string) *v1.NetworkGatewayGroup {
		return &v1.NetworkGatewayGroup{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: v1.NetworkGatewayGroupSpec{FloatingIPs: fips}}
	}
	groups := map[string]*v1.NetworkGatewayGroup{
		"kube-system/gw":       group("kube-system", "gw", "192.168.1.100", "192.168.1.101", "192.168.1.102"),
		"kube-system/empty":    group("kube-system", "empty"),
		"kube-system/bad":      group("kube-system", "bad", ""),
		"kube-system/v6":       group("kube-system", "v6", "2001:db8::1", "192.168.1.100"),
		"kube-system/mapped":   group("kube-system", "mapped", "::ffff:192.168.1.100"),
		"kube-system/typo":     group("kube-system", "typo", "192.168.1.11", "192.168.1.100"),
		"kube-system/second":   group("kube-system", "second", "192.168.1.100", "192.168.1.11"),
		"team-a/gw":            group("team-a", "gw", "192.168.1.100"),
		"kube-system/younger":  group("kube-system", "younger", "192.168.1.100"),
		"kube-system/unlisted": group("kube-system", "unlisted", "192.168.1.100"),
	}
	checks := map[string]selector.GroupCheck{
		"kube-system/gw":      {Usable: ips("192.168.1.100", "192.168.1.101", "192.168.1.102")},
		"kube-system/typo":    {Usable: ips("192.168.1.100"), EgressRejected: "the InternalIP of node worker1"},
		"kube-system/second":  {Usable: ips("192.168.1.100")},
		"team-a/gw":           {Ignored: "namespace team-a is not a gateway namespace"},
		"kube-system/younger": {EgressRejected: "also listed by NetworkGatewayGroup kube-system/gw, which is older and keeps it"},
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
			name: "first floating IP rejected (a node's address): not accepted, even when held",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "typo"},
			asg:  a("192.168.1.11", "worker1", "192.168.1.100", "worker2"),
			want: Resolution{
				AcceptedReason:  v1.ReasonEgressIPRejected,
				AcceptedMessage: "egress IP 192.168.1.11 (the first floating IP of NetworkGatewayGroup kube-system/typo) is rejected and never assigned: the InternalIP of node worker1",
				ReadyReason:     v1.ReasonEgressIPRejected,
				ReadyMessage:    "policy is not applied: egress IP 192.168.1.11 (the first floating IP of NetworkGatewayGroup kube-system/typo) is rejected and never assigned: the InternalIP of node worker1",
			},
		},
		{
			name: "a rejected second floating IP does not matter to the policy",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "second"},
			asg:  held,
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/second",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node worker1 holds egress IP 192.168.1.100",
				EgressIP: ip("192.168.1.100"), Node: "worker1",
			},
		},
		{
			name: "egress IP kept by an older group",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "younger"},
			asg:  held,
			want: Resolution{
				AcceptedReason:  v1.ReasonEgressIPRejected,
				AcceptedMessage: "egress IP 192.168.1.100 (the first floating IP of NetworkGatewayGroup kube-system/younger) is rejected and never assigned: also listed by NetworkGatewayGroup kube-system/gw, which is older and keeps it",
				ReadyReason:     v1.ReasonEgressIPRejected,
				ReadyMessage:    "policy is not applied: egress IP 192.168.1.100 (the first floating IP of NetworkGatewayGroup kube-system/younger) is rejected and never assigned: also listed by NetworkGatewayGroup kube-system/gw, which is older and keeps it",
			},
		},
		{
			name: "gateway ignored (namespace not honoured)",
			ref:  v1.GatewayRef{Namespace: "team-a", Name: "gw"},
			asg:  held,
			want: Resolution{
				AcceptedReason: v1.ReasonGatewayIgnored, AcceptedMessage: "NetworkGatewayGroup team-a/gw is ignored: namespace team-a is not a gateway namespace",
				ReadyReason: v1.ReasonGatewayIgnored, ReadyMessage: "policy is not applied: NetworkGatewayGroup team-a/gw is ignored: namespace team-a is not a gateway namespace",
			},
		},
		{
			name: "a group without a check has no problem",
			ref:  v1.GatewayRef{Namespace: "kube-system", Name: "unlisted"},
			asg:  held,
			want: Resolution{
				Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.168.1.100 of NetworkGatewayGroup kube-system/unlisted",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node worker1 holds egress IP 192.168.1.100",
				EgressIP: ip("192.168.1.100"), Node: "worker1",
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
			if got := ResolvePolicy(tc.ref, groups, checks, tc.asg, tc.fallback); got != tc.want {
				t.Fatalf("ResolvePolicy:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}
