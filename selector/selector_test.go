package selector

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Helpers are prefixed with "sel" to stay clear of other test files of the
// package.

func selAddrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func selPrefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func selLabels(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func selMatch(kv ...string) v1.LabelSelector {
	s := v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{}}
	for i := 0; i < len(kv); i += 2 {
		s.MatchLabels[kv[i]] = v1.LabelValue(kv[i+1])
	}
	return s
}

func selExpr(key, op string, vals ...string) v1.LabelSelector {
	r := v1.LabelSelectorRequirement{Key: key, Operator: v1.LabelSelectorOperator(op)}
	for _, v := range vals {
		r.Values = append(r.Values, v1.LabelValue(v))
	}
	return v1.LabelSelector{MatchExpressions: []v1.LabelSelectorRequirement{r}}
}

func selSrc(ns, pod v1.LabelSelector) v1.EgressSource {
	return v1.EgressSource{NamespaceSelector: ns, PodSelector: pod}
}

func selPolicy(name, gw string, srcs []v1.EgressSource, cidrs ...string) *v1.EgressNATPolicy {
	p := &v1.EgressNATPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.EgressNATPolicySpec{
			Sources:    srcs,
			Action:     v1.ActionSNAT,
			GatewayRef: v1.GatewayRef{Namespace: "kube-system", Name: gw},
		},
	}
	for _, c := range cidrs {
		p.Spec.Destinations = append(p.Spec.Destinations, v1.EgressDestination{CIDR: c})
	}
	return p
}

// selGroup: floating IPs in spec order; held maps ip → node in status.
func selGroup(name string, fips []string, held ...string) *v1.NetworkGatewayGroup {
	g := &v1.NetworkGatewayGroup{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: name},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: fips},
		Status:     v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{}},
	}
	for i := 0; i < len(held); i += 2 {
		g.Status.FloatingIPs[held[i]] = held[i+1]
	}
	return g
}

func selPod(ns, name, node, ip string, kv ...string) Pod {
	p := Pod{Namespace: ns, Name: name, Node: node, Labels: selLabels(kv...)}
	if ip != "" {
		p.IP = netip.MustParseAddr(ip)
	}
	return p
}

var selAll = v1.LabelSelector{}

// selBase is a small cluster: this node is n1; n2 and n3 exist; pods of
// app=web run on n1 and n2.
func selBase() Input {
	return Input{
		Node: "n1",
		Namespaces: map[string]map[string]string{
			"prod":    selLabels("env", "prod", "team", "a"),
			"dev":     selLabels("env", "dev", "team", "a"),
			"other":   selLabels("team", "b"),
			"unlabel": nil,
		},
		Pods: []Pod{
			selPod("prod", "web-1", "n1", "10.244.1.10", "app", "web"),
			selPod("prod", "web-2", "n2", "10.244.2.10", "app", "web"),
			selPod("prod", "db-1", "n1", "10.244.1.11", "app", "db"),
			selPod("dev", "web-3", "n1", "10.244.1.12", "app", "web"),
			selPod("other", "web-4", "n2", "10.244.2.11", "app", "web"),
			selPod("unlabel", "web-5", "n1", "10.244.1.13", "app", "web"),
		},
		NodeIPs:      map[string]netip.Addr{"n1": netip.MustParseAddr("192.0.2.11"), "n2": netip.MustParseAddr("192.0.2.12"), "n3": netip.MustParseAddr("192.0.2.13")},
		LocalSubnets: selPrefixes("192.0.2.0/24"),
	}
}

// selDesired is Desired with the warnings NewTracker returns.
func selDesired(in Input) (NodeState, []string, error) {
	st, warns, _, err := desired(in)
	return st, warns, err
}

func TestDesired(t *testing.T) {
	prodWeb := []v1.EgressSource{selSrc(selMatch("env", "prod"), selMatch("app", "web"))}
	cases := []struct {
		name     string
		mod      func(in *Input)
		want     NodeState
		warnings []string
	}{
		{
			name: "gateway mode: this node holds the egress IP; sources from the whole cluster",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
					Sources:      selAddrs("10.244.1.10", "10.244.2.10"),
					Destinations: selPrefixes("203.0.113.0/24"),
				}},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "reroute mode: another node holds it; next hop is its IP; sources on this node only",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "p", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
		},
		{
			name: "reroute with no local pod: policy present with no sources",
			mod: func(in *Input) {
				in.Node = "n3"
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "p", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
		},
		{
			name: "drop mode: nobody holds the egress IP",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"})}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "p", Mode: ModeDrop, EgressIP: netip.MustParseAddr("192.0.2.100"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
		},
		{
			name: "drop mode: holder's node IP unknown",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n9")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "p", Mode: ModeDrop, EgressIP: netip.MustParseAddr("192.0.2.100"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
		},
		{
			name: "fallback to node IP: unheld policy omitted, held one kept",
			mod: func(in *Input) {
				in.FallbackToNodeIP = true
				in.Groups = []*v1.NetworkGatewayGroup{
					selGroup("gw", []string{"192.0.2.100"}),
					selGroup("gw2", []string{"192.0.2.101"}, "192.0.2.101", "n2"),
				}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("a", "gw", prodWeb, "203.0.113.0/24"),
					selPolicy("b", "gw2", prodWeb, "203.0.113.0/24"),
				}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "b", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.101"), NextHop: netip.MustParseAddr("192.0.2.12"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
		},
		{
			name: "egress IP is the FIRST spec floating IP; holding the second makes no gateway",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100", "192.0.2.101"}, "192.0.2.100", "n2", "192.0.2.101", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"),
					Sources:      selAddrs("10.244.1.10"),
					Destinations: selPrefixes("203.0.113.0/24"),
				}},
				FloatingIPs: selPrefixes("192.0.2.101/24"),
			},
		},
		{
			name: "gatewayRef to a missing group or a group without floating IPs: not applied",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("empty", nil)}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("missing", "nope", prodWeb, "203.0.113.0/24"),
					selPolicy("empty", "empty", prodWeb, "203.0.113.0/24"),
				}
			},
			want: NodeState{},
		},
		{
			name: "first floating IP not IPv4: policies not applied, one warning per group",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("v6", []string{"2001:db8::1", "192.0.2.100"}, "192.0.2.100", "n2")}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("a", "v6", prodWeb, "203.0.113.0/24"),
					selPolicy("b", "v6", prodWeb, "203.0.113.0/24"),
				}
			},
			want: NodeState{},
			warnings: []string{
				`the first floating IP of NetworkGatewayGroup kube-system/v6, "2001:db8::1", is not an IPv4 address`,
			},
		},
		{
			name: "group in another namespace does not match the ref",
			mod: func(in *Input) {
				g := selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")
				g.Namespace = "default"
				in.Groups = []*v1.NetworkGatewayGroup{g}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			// The policy is not applied; the IP is still held by this node.
			want: NodeState{FloatingIPs: selPrefixes("192.0.2.100/24")},
		},
		{
			name: "sources are ORed; namespace and pod selectors ANDed",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", []v1.EgressSource{
					selSrc(selMatch("env", "dev"), selMatch("app", "web")), // web-3
					selSrc(selMatch("team", "b"), selAll),                  // web-4
					selSrc(selMatch("env", "prod"), selMatch("app", "db")), // db-1
				}, "203.0.113.0/24")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
					Sources:      selAddrs("10.244.1.11", "10.244.1.12", "10.244.2.11"),
					Destinations: selPrefixes("203.0.113.0/24"),
				}},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "empty selectors select every pod of every known namespace, also unlabelled ones",
			mod: func(in *Input) {
				in.Pods = append(in.Pods, selPod("ghost", "x", "n1", "10.244.1.99", "app", "web"))
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selAll)}, "0.0.0.0/0")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
					Sources:      selAddrs("10.244.1.10", "10.244.1.11", "10.244.1.12", "10.244.1.13", "10.244.2.10", "10.244.2.11"),
					Destinations: selPrefixes("0.0.0.0/0"),
				}},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "matchExpressions In / NotIn / Exists / DoesNotExist",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("in", "gw", []v1.EgressSource{selSrc(selExpr("env", "In", "dev", "qa"), selAll)}, "203.0.113.0/24"),
					selPolicy("notin", "gw", []v1.EgressSource{selSrc(selExpr("env", "NotIn", "prod"), selExpr("app", "In", "web"))}, "203.0.113.0/24"),
					selPolicy("exists", "gw", []v1.EgressSource{selSrc(selExpr("env", "Exists"), selExpr("app", "NotIn", "web"))}, "203.0.113.0/24"),
					selPolicy("dne", "gw", []v1.EgressSource{selSrc(selExpr("team", "DoesNotExist"), selAll)}, "203.0.113.0/24"),
				}
			},
			want: NodeState{
				Policies: []PolicyState{
					{Name: "dne", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.13"), Destinations: selPrefixes("203.0.113.0/24")},
					{Name: "exists", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.11"), Destinations: selPrefixes("203.0.113.0/24")},
					{Name: "in", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.12"), Destinations: selPrefixes("203.0.113.0/24")},
					{Name: "notin", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.12", "10.244.1.13", "10.244.2.11"), Destinations: selPrefixes("203.0.113.0/24")},
				},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "namespace relabelled: its pods join the policy",
			mod: func(in *Input) {
				in.Namespaces["other"] = selLabels("team", "b", "env", "prod")
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb, "203.0.113.0/24")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
					Sources:      selAddrs("10.244.1.10", "10.244.2.10", "10.244.2.11"),
					Destinations: selPrefixes("203.0.113.0/24"),
				}},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "hostNetwork, terminated, IPv6, IP-less pods and unknown namespaces are never selected; duplicate IPs once",
			mod: func(in *Input) {
				hn := selPod("prod", "hn", "n1", "192.0.2.11", "app", "web")
				hn.HostNetwork = true
				done := selPod("prod", "done", "n1", "10.244.1.50", "app", "web")
				done.Terminated = true
				in.Pods = []Pod{
					selPod("prod", "web-1", "n1", "10.244.1.10", "app", "web"),
					selPod("prod", "web-1b", "n1", "10.244.1.10", "app", "web"), // same IP
					selPod("prod", "v6", "n1", "fd00::10", "app", "web"),
					selPod("prod", "pending", "n1", "", "app", "web"),
					selPod("gone", "web-9", "n1", "10.244.1.60", "app", "web"),
					hn, done,
				}
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selAll)}, "203.0.113.0/24")}
			},
			want: NodeState{
				Policies: []PolicyState{{
					Name: "p", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
					Sources:      selAddrs("10.244.1.10"),
					Destinations: selPrefixes("203.0.113.0/24"),
				}},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
		{
			name: "destinations sorted, contained prefixes and duplicates merged, adjacent kept, host bits cleared",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
				in.Policies = []*v1.EgressNATPolicy{selPolicy("p", "gw", prodWeb,
					"203.0.113.128/25", "10.1.2.0/24", "198.51.100.7/32", "10.1.0.0/16", "203.0.113.0/25", "198.51.100.7/32", "10.1.255.1/32", "172.16.5.9/16")}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "p", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("10.1.0.0/16", "172.16.0.0/16", "198.51.100.7/32", "203.0.113.0/25", "203.0.113.128/25"),
			}}},
		},
		{
			name: "bad specs are skipped with a warning; good policies stay",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("z-good", "gw", prodWeb, "203.0.113.0/24"),
					selPolicy("bad-cidr", "gw", prodWeb, "203.0.113.0/24", "203.0.113.300/24"),
					selPolicy("bad-ip-no-len", "gw", prodWeb, "203.0.113.7"),
					selPolicy("bad-v6", "gw", prodWeb, "2001:db8::/32"),
					selPolicy("bad-op", "gw", []v1.EgressSource{selSrc(selAll, selExpr("app", "Equals", "web"))}, "203.0.113.0/24"),
					selPolicy("bad-nodest", "gw", prodWeb),
					selPolicy("bad-missing-gw", "nope", []v1.EgressSource{selSrc(selExpr("a", "In"), selAll)}, "203.0.113.0/24"),
				}
			},
			want: NodeState{Policies: []PolicyState{{
				Name: "z-good", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"),
				Sources:      selAddrs("10.244.1.10"),
				Destinations: selPrefixes("203.0.113.0/24"),
			}}},
			warnings: []string{
				`EgressNATPolicy bad-cidr is not applied: destination "203.0.113.300/24"`,
				`EgressNATPolicy bad-ip-no-len is not applied: destination "203.0.113.7"`,
				`EgressNATPolicy bad-missing-gw is not applied: sources[0].namespaceSelector`,
				`EgressNATPolicy bad-nodest is not applied: no destinations`,
				`EgressNATPolicy bad-op is not applied: sources[0].podSelector`,
				`EgressNATPolicy bad-v6 is not applied: destination "2001:db8::/32": not an IPv4 network`,
			},
		},
		{
			name: "floating IPs: prefix of the longest local subnet, sorted, deduplicated; foreign and stale ones skipped",
			mod: func(in *Input) {
				in.LocalSubnets = selPrefixes("198.51.100.0/26", "192.0.2.0/24", "198.51.100.0/22", "2001:db8::/64")
				in.Groups = []*v1.NetworkGatewayGroup{
					selGroup("b", []string{"198.51.100.200", "192.0.2.100"}, "198.51.100.200", "n1", "192.0.2.100", "n1"),
					selGroup("a", []string{"198.51.100.5", "203.0.113.9", "192.0.2.7"}, "198.51.100.5", "n1", "203.0.113.9", "n1", "192.0.2.7", "n2",
						"192.0.2.8", "n1"), // .8 is in status only: stale
					selGroup("c", []string{"192.0.2.100"}, "192.0.2.100", "n1"), // same IP as in b
				}
			},
			want: NodeState{FloatingIPs: selPrefixes("192.0.2.100/24", "198.51.100.5/26", "198.51.100.200/22")},
			warnings: []string{
				"floating IP 203.0.113.9 of NetworkGatewayGroup kube-system/a is assigned to this node but lies in none of its subnets",
			},
		},
		{
			name: "policies sorted by name; several policies share a gateway",
			mod: func(in *Input) {
				in.Groups = []*v1.NetworkGatewayGroup{
					selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1"),
					selGroup("gw2", []string{"192.0.2.101"}, "192.0.2.101", "n3"),
				}
				in.Policies = []*v1.EgressNATPolicy{
					selPolicy("c", "gw2", prodWeb, "198.51.100.0/24"),
					selPolicy("a", "gw", prodWeb, "203.0.113.0/24"),
					selPolicy("b", "gw", []v1.EgressSource{selSrc(selAll, selMatch("app", "db"))}, "203.0.113.0/24"),
				}
			},
			want: NodeState{
				Policies: []PolicyState{
					{Name: "a", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.10", "10.244.2.10"), Destinations: selPrefixes("203.0.113.0/24")},
					{Name: "b", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"), Sources: selAddrs("10.244.1.11"), Destinations: selPrefixes("203.0.113.0/24")},
					{Name: "c", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.101"), NextHop: netip.MustParseAddr("192.0.2.13"), Sources: selAddrs("10.244.1.10"), Destinations: selPrefixes("198.51.100.0/24")},
				},
				FloatingIPs: selPrefixes("192.0.2.100/24"),
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := selBase()
			tc.mod(&in)
			got, warns, err := selDesired(in)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(unranked(got), tc.want) {
				t.Fatalf("state:\n got %+v\nwant %+v", got, tc.want)
			}
			if len(warns) != len(tc.warnings) {
				t.Fatalf("warnings = %q, want %d starting with %q", warns, len(tc.warnings), tc.warnings)
			}
			for i := range warns {
				if !strings.HasPrefix(warns[i], tc.warnings[i]) {
					t.Errorf("warning %d = %q, want prefix %q", i, warns[i], tc.warnings[i])
				}
			}
			// Determinism: shuffled input order gives the same state and warnings.
			r := rand.New(rand.NewPCG(7, 9))
			for range 5 {
				sh := in
				sh.Pods, sh.Policies, sh.Groups = slices.Clone(in.Pods), slices.Clone(in.Policies), slices.Clone(in.Groups)
				r.Shuffle(len(sh.Pods), func(i, j int) { sh.Pods[i], sh.Pods[j] = sh.Pods[j], sh.Pods[i] })
				r.Shuffle(len(sh.Policies), func(i, j int) { sh.Policies[i], sh.Policies[j] = sh.Policies[j], sh.Policies[i] })
				r.Shuffle(len(sh.Groups), func(i, j int) { sh.Groups[i], sh.Groups[j] = sh.Groups[j], sh.Groups[i] })
				again, warns2, err := selDesired(sh)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(again, got) || !slices.Equal(warns2, warns) {
					t.Fatalf("shuffled input gives another result:\n got %+v %q\nwant %+v %q", again, warns2, got, warns)
				}
			}
			// Desired is the same without warnings.
			if d, err := Desired(in); err != nil || !reflect.DeepEqual(d, got) {
				t.Fatalf("Desired = %+v, %v; want %+v", d, err, got)
			}
		})
	}
}

func TestDesiredNeedsNode(t *testing.T) {
	if _, err := Desired(Input{}); err == nil {
		t.Fatal("want an error for an Input without Node")
	}
}

func TestDesiredDuplicatePolicyName(t *testing.T) {
	in := selBase()
	in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
	in.Policies = []*v1.EgressNATPolicy{
		selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selMatch("app", "db"))}, "203.0.113.0/24"),
		selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selMatch("app", "web"))}, "198.51.100.0/24"),
	}
	got, warns, err := selDesired(in)
	if err != nil {
		t.Fatal(err)
	}
	want := []PolicyState{{Name: "p", Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.12"), Sources: selAddrs("10.244.1.11"), Destinations: selPrefixes("203.0.113.0/24")}}
	if !reflect.DeepEqual(unranked(got).Policies, want) || len(warns) != 1 || !strings.Contains(warns[0], "listed twice") {
		t.Fatalf("got %+v %q, want %+v and one 'listed twice' warning", got.Policies, warns, want)
	}
}

func TestMergePrefixes(t *testing.T) {
	cases := []struct{ in, want []string }{
		{nil, nil},
		{[]string{"10.0.0.0/24"}, []string{"10.0.0.0/24"}},
		{[]string{"10.0.1.0/24", "10.0.0.0/16"}, []string{"10.0.0.0/16"}},
		{[]string{"10.0.0.0/25", "10.0.0.128/25"}, []string{"10.0.0.0/25", "10.0.0.128/25"}},
		{[]string{"0.0.0.0/0", "10.0.0.0/8", "203.0.113.0/24"}, []string{"0.0.0.0/0"}},
		{[]string{"10.0.0.5/32", "10.0.0.5/32", "10.0.0.4/30", "9.255.255.255/32"}, []string{"9.255.255.255/32", "10.0.0.4/30"}},
		{[]string{"10.0.0.0/24", "10.0.0.0/23", "10.0.2.0/24", "10.0.0.0/22"}, []string{"10.0.0.0/22"}},
	}
	for _, tc := range cases {
		got := MergePrefixes(selPrefixes(tc.in...))
		if want := selPrefixes(tc.want...); !slices.Equal(got, want) {
			t.Errorf("MergePrefixes(%v) = %v, want %v", tc.in, got, want)
		}
	}
}

func TestSelects(t *testing.T) {
	pol := selPolicy("p", "gw", []v1.EgressSource{
		selSrc(selMatch("env", "prod"), selExpr("app", "In", "web", "api")),
		selSrc(selExpr("team", "Exists"), selExpr("canary", "DoesNotExist")),
	}, "203.0.113.0/24")
	prod := selLabels("env", "prod")
	team := selLabels("team", "x")
	hn := selPod("a", "p", "n1", "10.0.0.1", "app", "web")
	hn.HostNetwork = true
	term := selPod("a", "p", "n1", "10.0.0.1", "app", "web")
	term.Terminated = true
	cases := []struct {
		name string
		pod  Pod
		ns   map[string]string
		want bool
	}{
		{"first source", selPod("a", "p", "n1", "10.0.0.1", "app", "api"), prod, true},
		{"first source, wrong app", selPod("a", "p", "n1", "10.0.0.1", "app", "db"), prod, false},
		{"second source", selPod("a", "p", "n1", "10.0.0.1", "app", "db"), team, true},
		{"second source, canary", selPod("a", "p", "n1", "10.0.0.1", "canary", "1"), team, false},
		{"no namespace labels", selPod("a", "p", "n1", "10.0.0.1", "app", "web"), nil, false},
		{"hostNetwork", hn, prod, false},
		{"terminated", term, prod, false},
		{"no IP", selPod("a", "p", "n1", "", "app", "web"), prod, false},
		{"IPv6", selPod("a", "p", "n1", "fd00::1", "app", "web"), prod, false},
	}
	cp, err := Compile(pol)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		if got := cp.Selects(tc.pod, tc.ns); got != tc.want {
			t.Errorf("%s: Selects = %v, want %v", tc.name, got, tc.want)
		}
	}
	bad := selPolicy("bad", "gw", []v1.EgressSource{selSrc(selAll, selExpr("app", "Equals", "x"))}, "203.0.113.0/24")
	if _, err := Compile(bad); err == nil {
		t.Error("a selector with an unknown operator compiles")
	}
}

// TestDesiredMatchesPodSelected checks the indexed evaluation against
// CompiledPolicy.Selects, pod by pod, on random clusters large enough to use the label indexes.
func TestDesiredMatchesPodSelected(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	vals := []string{"a", "b", "c"}
	keys := []string{"app", "tier", "x"}
	randSel := func() v1.LabelSelector {
		var s v1.LabelSelector
		for range r.IntN(3) {
			k := keys[r.IntN(len(keys))]
			switch r.IntN(5) {
			case 0:
				if s.MatchLabels == nil {
					s.MatchLabels = map[string]v1.LabelValue{}
				}
				s.MatchLabels[k] = v1.LabelValue(vals[r.IntN(3)])
			case 1:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "In", Values: []v1.LabelValue{v1.LabelValue(vals[r.IntN(3)]), v1.LabelValue(vals[r.IntN(3)])}})
			case 2:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "NotIn", Values: []v1.LabelValue{v1.LabelValue(vals[r.IntN(3)])}})
			case 3:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "Exists"})
			case 4:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "DoesNotExist"})
			}
		}
		return s
	}
	randLabels := func() map[string]string {
		m := map[string]string{}
		for _, k := range keys {
			if r.IntN(3) > 0 {
				m[k] = vals[r.IntN(3)]
			}
		}
		return m
	}
	for iter := range 30 {
		in := Input{Node: "n1", Namespaces: map[string]map[string]string{}, NodeIPs: map[string]netip.Addr{"n2": netip.MustParseAddr("192.0.2.2")}}
		for i := range 12 {
			in.Namespaces[fmt.Sprintf("ns%d", i)] = randLabels()
		}
		for i := range 400 {
			p := Pod{Namespace: fmt.Sprintf("ns%d", r.IntN(14)), Name: fmt.Sprint(i), Node: fmt.Sprintf("n%d", 1+r.IntN(3)),
				IP: netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}), Labels: randLabels(), HostNetwork: r.IntN(20) == 0, Terminated: r.IntN(20) == 0}
			in.Pods = append(in.Pods, p)
		}
		in.Groups = []*v1.NetworkGatewayGroup{
			selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1"),
			selGroup("gw2", []string{"192.0.2.101"}, "192.0.2.101", "n2"),
		}
		for i := range 20 {
			var srcs []v1.EgressSource
			for range 1 + r.IntN(3) {
				srcs = append(srcs, selSrc(randSel(), randSel()))
			}
			in.Policies = append(in.Policies, selPolicy(fmt.Sprintf("p%02d", i), []string{"gw", "gw2"}[i%2], srcs, "203.0.113.0/24"))
		}
		got, err := Desired(in)
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Policies) != 20 {
			t.Fatalf("iteration %d: %d policies, want 20", iter, len(got.Policies))
		}
		for i, ps := range got.Policies {
			pol := in.Policies[i]
			cp, err := Compile(pol)
			if err != nil {
				t.Fatal(err)
			}
			var want []netip.Addr
			for _, p := range in.Pods {
				nsl, ok := in.Namespaces[p.Namespace]
				if ok && (ps.Mode == ModeGateway || p.Node == "n1") && cp.Selects(p, nsl) {
					want = append(want, p.IP)
				}
			}
			slices.SortFunc(want, func(a, b netip.Addr) int { return a.Compare(b) })
			if !slices.Equal(ps.Sources, want) {
				t.Fatalf("iteration %d policy %s (%s, %+v):\n got %v\nwant %v", iter, ps.Name, ps.Mode, pol.Spec.Sources, ps.Sources, want)
			}
		}
	}
}

// TestDesiredExcluded: the cluster-internal destinations are IPv4,
// merged and sorted, whatever the input order.
func TestDesiredExcluded(t *testing.T) {
	in := selBase()
	in.ClusterNetworks = selPrefixes("10.96.0.0/12", "192.0.2.11/32", "10.244.0.0/16", "10.244.1.0/24", "192.0.2.11/32")
	in.ClusterNetworks = append(in.ClusterNetworks, netip.MustParsePrefix("2001:db8::/64"))
	got, err := Desired(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := selPrefixes("10.96.0.0/12", "10.244.0.0/16", "192.0.2.11/32"); !reflect.DeepEqual(got.Excluded, want) {
		t.Fatalf("Excluded = %v, want %v", got.Excluded, want)
	}
}

// TestDesiredFollowsPolicyFallback: a policy whose status says NodeIP (the
// operator runs with --fallback-to-node-ip) is left out while no node holds
// its egress IP; without it the policy drops.
func TestDesiredFollowsPolicyFallback(t *testing.T) {
	for _, action := range []v1.UnavailableAction{"", v1.UnavailableDrop, v1.UnavailableNodeIP} {
		in := selBase()
		in.Groups = []*v1.NetworkGatewayGroup{selGroup("default", []string{"192.0.2.100"})}
		pol := selPolicy("p", "default", []v1.EgressSource{selSrc(selMatch("env", "prod"), selMatch("app", "web"))}, "203.0.113.0/24")
		pol.Status.WhenUnavailable = action
		in.Policies = []*v1.EgressNATPolicy{pol}
		got, err := Desired(in)
		if err != nil {
			t.Fatal(err)
		}
		if action == v1.UnavailableNodeIP {
			if len(got.Policies) != 0 {
				t.Fatalf("%s: policies %+v, want none", action, got.Policies)
			}
			continue
		}
		if len(got.Policies) == 0 {
			t.Fatalf("%q: no policy, want Drop", action)
		}
		for _, p := range got.Policies {
			if p.Mode != ModeDrop {
				t.Fatalf("%q: policy %s mode %s, want Drop", action, p.Name, p.Mode)
			}
		}
	}
}

// unranked drops what ranks overlapping policies (see TestDesiredRanks)
// the cluster's floating IPs (TestDesiredClusterFloating) and the local
// pods (TestLocalPodsAndPodNetworks), so that
// state tables need not repeat them.
func unranked(st NodeState) NodeState {
	st.ClusterFloatingIPs = nil
	st.LocalPods = nil // TestLocalPodsAndPodNetworks
	st.Policies = slices.Clone(st.Policies)
	for i := range st.Policies {
		st.Policies[i].Written, st.Policies[i].Created = nil, time.Time{}
	}
	return st
}

// TestDesiredRanks: each policy carries its destinations as written (not
// merged, sorted, without duplicates) and its creation time.
func TestDesiredRanks(t *testing.T) {
	in := selBase()
	pol := selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selMatch("app", "web"))}, "10.1.0.0/16", "10.1.2.0/24", "10.1.0.0/16", "10.0.0.0/8")
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	pol.CreationTimestamp = metav1.NewTime(created)
	in.Policies = []*v1.EgressNATPolicy{pol}
	in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2")}
	got, err := Desired(in)
	if err != nil || len(got.Policies) != 1 {
		t.Fatalf("%+v %v", got, err)
	}
	p := got.Policies[0]
	if want := selPrefixes("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"); !reflect.DeepEqual(p.Written, want) || !p.Created.Equal(created) {
		t.Fatalf("written %v created %v, want %v and %v", p.Written, p.Created, want, created)
	}
	if want := selPrefixes("10.0.0.0/8"); !reflect.DeepEqual(p.Destinations, want) {
		t.Fatalf("destinations %v, want %v (merged)", p.Destinations, want)
	}
}

// TestDesiredClusterFloating: every floating IP of every group's spec,
// held or not, sorted and without duplicates.
func TestDesiredClusterFloating(t *testing.T) {
	in := selBase()
	in.Groups = []*v1.NetworkGatewayGroup{
		selGroup("a", []string{"192.0.2.102", "192.0.2.100", "bad"}, "192.0.2.100", "n1"),
		selGroup("b", []string{"192.0.2.101", "192.0.2.102"}),
	}
	got, err := Desired(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := selAddrs("192.0.2.100", "192.0.2.101", "192.0.2.102"); !reflect.DeepEqual(got.ClusterFloatingIPs, want) {
		t.Fatalf("ClusterFloatingIPs = %v, want %v", got.ClusterFloatingIPs, want)
	}
}

// TestDesiredChecksGroups: with the groups checked as the operator checks
// them, a node never holds a rejected floating IP (a node's own address,
// the router), even when a status names it, and a policy whose gateway is
// in a namespace not honoured, or whose egress IP is rejected, is not
// applied.
func TestDesiredChecksGroups(t *testing.T) {
	in := selBase()
	n1 := NodeFacts{Name: "n1", Subnets: selPrefixes("192.0.2.11/24"), Gateways: selAddrs("192.0.2.1")}
	n1.AddNodeAddress("InternalIP", "192.0.2.11")
	n2 := NodeFacts{Name: "n2"}
	n2.AddNodeAddress("InternalIP", "192.0.2.12")
	in.Reserved = ReservedFrom([]NodeFacts{n1, n2})
	in.GatewayNamespaces = []string{"kube-system"}
	tenant := selGroup("tenant", []string{"192.0.2.103"}, "192.0.2.103", "n1")
	tenant.Namespace = "team-a"
	in.Groups = []*v1.NetworkGatewayGroup{
		// The typo: n2's own address, which a stale status gives to n1.
		selGroup("typo", []string{"192.0.2.12"}, "192.0.2.12", "n1"),
		selGroup("router", []string{"192.0.2.101", "192.0.2.1"}, "192.0.2.101", "n1", "192.0.2.1", "n1"),
		tenant,
	}
	web := []v1.EgressSource{selSrc(selAll, selMatch("app", "web"))}
	in.Policies = []*v1.EgressNATPolicy{
		selPolicy("p-typo", "typo", web, "203.0.113.0/24"),
		selPolicy("p-router", "router", web, "203.0.113.0/24"),
		{ObjectMeta: metav1.ObjectMeta{Name: "p-tenant"}, Spec: v1.EgressNATPolicySpec{Sources: web, Action: v1.ActionSNAT,
			Destinations: []v1.EgressDestination{{CIDR: "198.51.100.0/24"}}, GatewayRef: v1.GatewayRef{Namespace: "team-a", Name: "tenant"}}},
	}
	got, warns, err := selDesired(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := selPrefixes("192.0.2.101/24"); !reflect.DeepEqual(got.FloatingIPs, want) {
		t.Fatalf("held %v, want only %v (warnings %q)", got.FloatingIPs, want, warns)
	}
	var names []string
	for _, p := range got.Policies {
		names = append(names, p.Name)
	}
	if !slices.Equal(names, []string{"p-router"}) {
		t.Fatalf("applied %v, want only p-router (warnings %q)", names, warns)
	}
	// Without the checks (egressnatctl, older callers) the status decides.
	in.GatewayNamespaces = nil
	if got, err := Desired(in); err != nil || len(got.FloatingIPs) != 4 {
		t.Fatalf("unchecked: %v %v", got.FloatingIPs, err)
	}
}

// TestLocalPodsAndPodNetworks: the node's known pods (not host-network,
// not terminated, with an IPv4 address), the merged pod networks, and on a
// gateway only the routes back to the other nodes' pod CIDRs (a CIDR two
// nodes claim is routed to neither).
func TestLocalPodsAndPodNetworks(t *testing.T) {
	base := func() Input {
		return Input{Node: "n1",
			NodeIPs: map[string]netip.Addr{"n1": netip.MustParseAddr("192.0.2.1"), "n2": netip.MustParseAddr("192.0.2.2"), "n3": netip.MustParseAddr("192.0.2.3"),
				"n5": netip.MustParseAddr("198.51.100.5")},
			LocalSubnets: selPrefixes("192.0.2.0/24"),
			Namespaces:   map[string]map[string]string{"a": {}},
			PodCIDRs: map[string][]netip.Prefix{
				"n1": selPrefixes("10.244.0.0/24"), "n2": selPrefixes("10.244.1.0/24", "fd00::/64"),
				"n3": selPrefixes("10.244.2.0/24"), "n4": selPrefixes("10.244.3.0/24"), // n4: no address
				"n5": selPrefixes("10.244.5.0/24"), // n5: beyond a router
			},
			ExtraPodCIDRs: selPrefixes("10.244.0.0/16", "10.250.0.0/24"),
			Pods: []Pod{
				{Namespace: "a", Name: "p1", Node: "n1", IP: netip.MustParseAddr("10.244.0.9")},
				{Namespace: "a", Name: "p2", Node: "n1", IP: netip.MustParseAddr("10.244.0.3")},
				{Namespace: "a", Name: "same-ip", Node: "n1", IP: netip.MustParseAddr("10.244.0.3")},
				{Namespace: "a", Name: "host", Node: "n1", IP: netip.MustParseAddr("192.0.2.1"), HostNetwork: true},
				{Namespace: "a", Name: "done", Node: "n1", IP: netip.MustParseAddr("10.244.0.7"), Terminated: true},
				{Namespace: "a", Name: "pending", Node: "n1"},
				{Namespace: "a", Name: "v6", Node: "n1", IP: netip.MustParseAddr("fd00::5")},
				{Namespace: "a", Name: "other", Node: "n2", IP: netip.MustParseAddr("10.244.1.4")},
			},
		}
	}
	in := base()
	st, err := Desired(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := selAddrs("10.244.0.3", "10.244.0.9"); !slices.Equal(st.LocalPods, want) {
		t.Errorf("local pods %v, want %v", st.LocalPods, want)
	}
	if want := selPrefixes("10.244.0.0/16", "10.250.0.0/24"); !slices.Equal(st.PodNetworks, want) {
		t.Errorf("pod networks %v, want %v", st.PodNetworks, want)
	}
	if st.ReturnRoutes != nil {
		t.Errorf("not a gateway, yet return routes %v", st.ReturnRoutes)
	}

	// A gateway: routes to n2 and n3, none to itself, to n4 nor to n5.
	in = base()
	in.Groups = []*v1.NetworkGatewayGroup{selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1")}
	in.Policies = []*v1.EgressNATPolicy{selPolicy("web", "gw", []v1.EgressSource{selSrc(v1.LabelSelector{}, v1.LabelSelector{})}, "203.0.113.0/24")}
	if st, err = Desired(in); err != nil {
		t.Fatal(err)
	}
	want := []ReturnRoute{
		{Dst: netip.MustParsePrefix("10.244.1.0/24"), Via: netip.MustParseAddr("192.0.2.2")},
		{Dst: netip.MustParsePrefix("10.244.2.0/24"), Via: netip.MustParseAddr("192.0.2.3")},
	}
	if len(st.Policies) != 1 || st.Policies[0].Mode != ModeGateway || !slices.Equal(st.ReturnRoutes, want) {
		t.Errorf("gateway: policies %+v return routes %v, want %v", st.Policies, st.ReturnRoutes, want)
	}
	// n3 claims n2's CIDR too: neither is trusted with it.
	in.PodCIDRs["n3"] = selPrefixes("10.244.1.0/24")
	if st, err = Desired(in); err != nil {
		t.Fatal(err)
	}
	if st.ReturnRoutes != nil {
		t.Errorf("a CIDR two nodes claim is routed: %v", st.ReturnRoutes)
	}
}

// A handover under way (status.handovers): its target adds the IP muted
// (prepared, policies still rerouted to the holder), its old holder keeps
// it muted with its SNAT; a third node does nothing; a handover the
// status no longer backs (the holder is not its From) is ignored.
func TestDesiredHandover(t *testing.T) {
	g := selGroup("gw", []string{"192.0.2.100", "192.0.2.101"}, "192.0.2.100", "n1", "192.0.2.101", "n3")
	g.Status.Handovers = []v1.FloatingIPHandover{
		{IP: "192.0.2.100", From: "n1", To: "n2", Reason: "node n1 cordoned"},
		{IP: "192.0.2.101", From: "n2", To: "n1", Reason: "stale"},
	}
	pol := selPolicy("p", "gw", []v1.EgressSource{selSrc(selAll, selMatch("app", "web"))}, "203.0.113.0/24")
	for _, tc := range []struct {
		node        string
		held, muted []string
		mode        Mode
	}{
		{node: "n1", held: []string{"192.0.2.100/24"}, muted: []string{"192.0.2.100"}, mode: ModeGateway},
		{node: "n2", held: []string{"192.0.2.100/24"}, muted: []string{"192.0.2.100"}, mode: ModeReroute},
		{node: "n3", held: []string{"192.0.2.101/24"}, mode: ModeReroute},
	} {
		in := selBase()
		in.Node, in.Groups, in.Policies = tc.node, []*v1.NetworkGatewayGroup{g}, []*v1.EgressNATPolicy{pol}
		st, _, err := selDesired(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.FloatingIPs; !slices.Equal(got, selPrefixes(tc.held...)) {
			t.Errorf("%s: FloatingIPs %v, want %v", tc.node, got, tc.held)
		}
		if got := st.Muted; !slices.Equal(got, selAddrs(tc.muted...)) {
			t.Errorf("%s: Muted %v, want %v", tc.node, got, tc.muted)
		}
		if len(st.Policies) != 1 || st.Policies[0].Mode != tc.mode {
			t.Errorf("%s: policies %+v, want one in mode %s (the holder decides, not the handover)", tc.node, st.Policies, tc.mode)
		}
	}
}
