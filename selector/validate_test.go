package selector

import (
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestUnusable(t *testing.T) {
	cases := []struct {
		ip   string
		want string
	}{
		{"192.0.2.100", ""},
		{"1.0.0.0", ""},
		{"126.255.255.255", ""},
		{"128.0.0.0", ""},
		{"169.253.255.255", ""},
		{"169.255.0.0", ""},
		{"223.255.255.255", ""},
		{"::ffff:192.0.2.7", ""},
		{"0.0.0.0", "an address of 0.0.0.0/8 (this network), not usable"},
		{"0.255.255.255", "an address of 0.0.0.0/8 (this network), not usable"},
		{"127.0.0.1", "a loopback address"},
		{"127.255.255.254", "a loopback address"},
		{"::ffff:127.0.0.1", "a loopback address"},
		{"169.254.0.1", "a link-local address (169.254.0.0/16)"},
		{"169.254.255.255", "a link-local address (169.254.0.0/16)"},
		{"224.0.0.1", "a multicast address"},
		{"239.255.255.255", "a multicast address"},
		{"240.0.0.0", "a reserved class E address (240.0.0.0/4)"},
		{"255.255.255.254", "a reserved class E address (240.0.0.0/4)"},
		{"255.255.255.255", "the limited broadcast address"},
		{"2001:db8::1", "not an IPv4 address"},
	}
	for _, tc := range cases {
		if got := Unusable(netip.MustParseAddr(tc.ip)); got != tc.want {
			t.Errorf("Unusable(%s) = %q, want %q", tc.ip, got, tc.want)
		}
	}
	if got := Unusable(netip.Addr{}); got != "not an IPv4 address" {
		t.Errorf("Unusable(invalid) = %q", got)
	}
}

func TestGatewayNamespaces(t *testing.T) {
	cases := []struct {
		flag    string
		want    []string
		wantErr string
	}{
		{"", []string{"kube-system"}, ""},
		{"kube-system", []string{"kube-system"}, ""},
		{" team-b, team-a ,,kube-system,team-b", []string{"kube-system", "team-a", "team-b"}, ""},
		{"Team-A", nil, `gateway namespace "Team-A"`},
		{"a/b", nil, `gateway namespace "a/b"`},
	}
	for _, tc := range cases {
		got, err := GatewayNamespaces(tc.flag)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("GatewayNamespaces(%q): error %v, want %q", tc.flag, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("GatewayNamespaces(%q) = %v, %v; want %v", tc.flag, got, err, tc.want)
		}
	}
}

func vAddrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, netip.MustParseAddr(x))
	}
	return out
}

func vPrefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

// vReservedStrings renders a Reserved as address → why.
func vReservedStrings(r Reserved) map[string]string {
	out := map[string]string{}
	for a, why := range r.Addrs {
		out[a.String()] = string(why.Kind) + ": " + why.String()
	}
	return out
}

func TestReservedFrom(t *testing.T) {
	cases := []struct {
		name  string
		nodes []NodeFacts
		want  map[string]string
	}{
		{
			name: "every fact of one node",
			nodes: []NodeFacts{{
				Name: "n1", InternalIPs: []string{"192.0.2.11", "2001:db8::11", "bogus"}, ExternalIPs: []string{"198.51.100.11"},
				Subnets: vPrefixes("192.0.2.11/24", "10.9.0.5/16"), Gateways: vAddrs("192.0.2.1"), Foreign: vAddrs("192.0.2.50"),
			}},
			want: map[string]string{
				"192.0.2.11":    "Reserved: the InternalIP of node n1",
				"198.51.100.11": "Reserved: the ExternalIP of node n1",
				"10.9.0.5":      "Reserved: the uplink address of node n1",
				"192.0.2.1":     "Reserved: the uplink default gateway of node n1",
				"192.0.2.0":     "Reserved: the network address of node n1's uplink subnet 192.0.2.0/24",
				"192.0.2.255":   "Reserved: the broadcast address of node n1's uplink subnet 192.0.2.0/24",
				"10.9.0.0":      "Reserved: the network address of node n1's uplink subnet 10.9.0.0/16",
				"10.9.255.255":  "Reserved: the broadcast address of node n1's uplink subnet 10.9.0.0/16",
				"192.0.2.50":    "InUse: already on the uplink of node n1, not added by egressnat",
			},
		},
		{
			name: "a /30 has network and broadcast addresses, a /31 and a /32 have none; mapped subnets count",
			nodes: []NodeFacts{{
				Name: "n1", Subnets: vPrefixes("192.0.2.9/30", "198.51.100.4/31", "203.0.113.7/32", "::ffff:10.1.2.3/120"),
			}},
			want: map[string]string{
				"192.0.2.9":    "Reserved: the uplink address of node n1",
				"192.0.2.8":    "Reserved: the network address of node n1's uplink subnet 192.0.2.8/30",
				"192.0.2.11":   "Reserved: the broadcast address of node n1's uplink subnet 192.0.2.8/30",
				"198.51.100.4": "Reserved: the uplink address of node n1",
				"203.0.113.7":  "Reserved: the uplink address of node n1",
				"10.1.2.3":     "Reserved: the uplink address of node n1",
				"10.1.2.0":     "Reserved: the network address of node n1's uplink subnet 10.1.2.0/24",
				"10.1.2.255":   "Reserved: the broadcast address of node n1's uplink subnet 10.1.2.0/24",
			},
		},
		{
			name: "a node address outranks another node's gateway and foreign address; names break ties",
			nodes: []NodeFacts{
				{Name: "n2", InternalIPs: []string{"192.0.2.12"}, Gateways: vAddrs("192.0.2.1"), Foreign: vAddrs("192.0.2.11")},
				{Name: "n1", InternalIPs: []string{"192.0.2.11"}, Gateways: vAddrs("192.0.2.1", "192.0.2.12")},
				{Name: "n0", Foreign: vAddrs("192.0.2.1")},
			},
			want: map[string]string{
				"192.0.2.11": "Reserved: the InternalIP of node n1",
				"192.0.2.12": "Reserved: the InternalIP of node n2",
				"192.0.2.1":  "Reserved: the uplink default gateway of node n1",
			},
		},
		{
			name: "the gateway outranks a subnet's network address",
			nodes: []NodeFacts{
				{Name: "a", Subnets: vPrefixes("192.0.2.11/24")},
				{Name: "b", Gateways: vAddrs("192.0.2.0")},
			},
			want: map[string]string{
				"192.0.2.11":  "Reserved: the uplink address of node a",
				"192.0.2.0":   "Reserved: the uplink default gateway of node b",
				"192.0.2.255": "Reserved: the broadcast address of node a's uplink subnet 192.0.2.0/24",
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := vReservedStrings(ReservedFrom(tc.nodes))
			if !maps.Equal(got, tc.want) {
				t.Fatalf("ReservedFrom:\n got %v\nwant %v", got, tc.want)
			}
			rev := slices.Clone(tc.nodes)
			slices.Reverse(rev)
			if again := vReservedStrings(ReservedFrom(rev)); !maps.Equal(again, got) {
				t.Fatalf("ReservedFrom with reversed nodes:\n got %v\nwant %v", again, got)
			}
		})
	}
}

func TestUsableSubnets(t *testing.T) {
	type ign = IgnoredSubnet
	cases := []struct {
		name        string
		node        NodeFacts
		min         int
		wantUsable  []netip.Prefix
		wantIgnored []IgnoredSubnet
	}{
		{
			name:       "the node's subnet, as advertised",
			node:       NodeFacts{InternalIPs: []string{"192.0.2.11"}, Subnets: vPrefixes("192.0.2.11/24")},
			min:        16,
			wantUsable: vPrefixes("192.0.2.11/24"),
		},
		{
			name:       "exactly the minimum prefix",
			node:       NodeFacts{InternalIPs: []string{"10.1.2.3"}, Subnets: vPrefixes("10.1.2.3/16")},
			min:        16,
			wantUsable: vPrefixes("10.1.2.3/16"),
		},
		{
			name:        "shorter than the minimum",
			node:        NodeFacts{InternalIPs: []string{"10.1.2.3"}, Subnets: vPrefixes("10.1.2.3/15")},
			min:         16,
			wantIgnored: []ign{{netip.MustParsePrefix("10.1.2.3/15"), "shorter than the minimum prefix /16 (--min-subnet-prefix)"}},
		},
		{
			name: "a subnet without the InternalIP is ignored, the other kept; any InternalIP counts",
			node: NodeFacts{InternalIPs: []string{"2001:db8::1", "192.0.2.11", "198.51.100.7"},
				Subnets: vPrefixes("203.0.113.5/24", "192.0.2.11/24", "198.51.100.7/24")},
			min:         16,
			wantUsable:  vPrefixes("192.0.2.11/24", "198.51.100.7/24"),
			wantIgnored: []ign{{netip.MustParsePrefix("203.0.113.5/24"), "does not contain the node's InternalIP 192.0.2.11"}},
		},
		{
			name:        "no IPv4 InternalIP: nothing usable",
			node:        NodeFacts{InternalIPs: []string{"2001:db8::1"}, Subnets: vPrefixes("192.0.2.11/24")},
			min:         16,
			wantIgnored: []ign{{netip.MustParsePrefix("192.0.2.11/24"), "the node has no IPv4 InternalIP"}},
		},
		{
			name:        "IPv6 subnet ignored, mapped IPv4 kept, a repeat used once",
			node:        NodeFacts{InternalIPs: []string{"192.0.2.11"}, Subnets: vPrefixes("2001:db8::1/64", "::ffff:192.0.2.11/120", "192.0.2.11/24")},
			min:         16,
			wantUsable:  vPrefixes("::ffff:192.0.2.11/120"),
			wantIgnored: []ign{{netip.MustParsePrefix("2001:db8::1/64"), "not an IPv4 subnet"}},
		},
		{
			name:       "a lower minimum admits a /8",
			node:       NodeFacts{InternalIPs: []string{"10.1.2.3"}, Subnets: vPrefixes("10.1.2.3/8")},
			min:        8,
			wantUsable: vPrefixes("10.1.2.3/8"),
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			u, ig := UsableSubnets(tc.node, tc.min)
			if !slices.Equal(u, tc.wantUsable) || !slices.Equal(ig, tc.wantIgnored) {
				t.Fatalf("UsableSubnets:\n got %v %v\nwant %v %v", u, ig, tc.wantUsable, tc.wantIgnored)
			}
		})
	}
}

var vEpoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func vGroup(ns, name string, age int, ips ...string) *v1.NetworkGatewayGroup {
	return &v1.NetworkGatewayGroup{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.NewTime(vEpoch.Add(time.Duration(age) * time.Minute))},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: ips},
	}
}

func TestCheckGroups(t *testing.T) {
	// The cluster of the issue: n1 and n2 in 192.0.2.0/24, gateway .1, n2
	// found 192.0.2.50 on its uplink.
	reserved := ReservedFrom([]NodeFacts{
		{Name: "n1", InternalIPs: []string{"192.0.2.11"}, ExternalIPs: []string{"198.51.100.11"}, Subnets: vPrefixes("192.0.2.11/24"), Gateways: vAddrs("192.0.2.1")},
		{Name: "n2", InternalIPs: []string{"192.0.2.12"}, Subnets: vPrefixes("192.0.2.12/24"), Gateways: vAddrs("192.0.2.1"), Foreign: vAddrs("192.0.2.50")},
	})
	ks := "kube-system"
	rej := func(ip string, kind RejectKind, reason string) RejectedIP {
		return RejectedIP{IP: ip, Kind: kind, Reason: reason}
	}
	conflict := func(ip, owner string) RejectedIP {
		return RejectedIP{IP: ip, Kind: RejectConflict, Reason: "also listed by NetworkGatewayGroup " + owner + ", which is older and keeps it", KeptBy: owner}
	}
	ignored := "namespace team-a is not a gateway namespace (gateway namespaces: kube-system; the flag --gateway-namespaces of the operator and the agents adds more)"
	cases := []struct {
		name    string
		groups  []*v1.NetworkGatewayGroup
		allowed []string
		want    map[string]GroupCheck
	}{
		{
			name:   "valid group: every IP usable, in spec order",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "192.0.2.102", "192.0.2.100", "192.0.2.101")},
			want:   map[string]GroupCheck{"kube-system/gw": {Usable: vAddrs("192.0.2.102", "192.0.2.100", "192.0.2.101")}},
		},
		{
			name:   "the issue: a node's InternalIP (first entry) is rejected, the others stay",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "192.0.2.11", "192.0.2.100")},
			want: map[string]GroupCheck{"kube-system/gw": {
				Usable:         vAddrs("192.0.2.100"),
				Rejected:       []RejectedIP{rej("192.0.2.11", RejectReserved, "the InternalIP of node n1")},
				EgressRejected: "the InternalIP of node n1",
			}},
		},
		{
			name: "each reservation and each unusable value",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "192.0.2.100", "198.51.100.11", "192.0.2.0", "192.0.2.255", "192.0.2.1",
				"192.0.2.50", "192.0.2.12", "0.0.0.0", "127.0.0.1", "224.0.0.5", "169.254.1.1", "255.255.255.255", "240.1.2.3", "2001:db8::1", "nonsense")},
			want: map[string]GroupCheck{"kube-system/gw": {
				Usable: vAddrs("192.0.2.100"),
				Rejected: []RejectedIP{
					rej("198.51.100.11", RejectReserved, "the ExternalIP of node n1"),
					rej("192.0.2.0", RejectReserved, "the network address of node n1's uplink subnet 192.0.2.0/24"),
					rej("192.0.2.255", RejectReserved, "the broadcast address of node n1's uplink subnet 192.0.2.0/24"),
					rej("192.0.2.1", RejectReserved, "the uplink default gateway of node n1"),
					rej("192.0.2.50", RejectInUse, "already on the uplink of node n2, not added by egressnat"),
					rej("192.0.2.12", RejectReserved, "the InternalIP of node n2"),
					rej("0.0.0.0", RejectInvalid, "an address of 0.0.0.0/8 (this network), not usable"),
					rej("127.0.0.1", RejectInvalid, "a loopback address"),
					rej("224.0.0.5", RejectInvalid, "a multicast address"),
					rej("169.254.1.1", RejectInvalid, "a link-local address (169.254.0.0/16)"),
					rej("255.255.255.255", RejectInvalid, "the limited broadcast address"),
					rej("240.1.2.3", RejectInvalid, "a reserved class E address (240.0.0.0/4)"),
					rej("2001:db8::1", RejectInvalid, "not an IPv4 address"),
					rej("nonsense", RejectInvalid, "not an IPv4 address"),
				},
			}},
		},
		{
			name:   "an unparsable first entry is the egress IP's problem too",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "nonsense", "192.0.2.100")},
			want: map[string]GroupCheck{"kube-system/gw": {
				Usable: vAddrs("192.0.2.100"), Rejected: []RejectedIP{rej("nonsense", RejectInvalid, "not an IPv4 address")}, EgressRejected: "not an IPv4 address",
			}},
		},
		{
			name: "one IP in two groups: the older keeps it, whatever the names",
			groups: []*v1.NetworkGatewayGroup{
				vGroup(ks, "a-young", 5, "192.0.2.100", "192.0.2.101"),
				vGroup(ks, "z-old", 1, "192.0.2.102", "192.0.2.100"),
			},
			want: map[string]GroupCheck{
				"kube-system/z-old":   {Usable: vAddrs("192.0.2.102", "192.0.2.100")},
				"kube-system/a-young": {Usable: vAddrs("192.0.2.101"), Rejected: []RejectedIP{conflict("192.0.2.100", "kube-system/z-old")}, EgressRejected: "also listed by NetworkGatewayGroup kube-system/z-old, which is older and keeps it"},
			},
		},
		{
			name: "same age: namespace, then name decides; spellings of one IP are one IP",
			groups: []*v1.NetworkGatewayGroup{
				vGroup("team-b", "a", 0, "192.0.2.100"),
				vGroup(ks, "b", 0, "::ffff:192.0.2.100"),
				vGroup(ks, "a", 0, "192.0.2.101", "192.0.2.100"),
			},
			allowed: []string{ks, "team-b"},
			want: map[string]GroupCheck{
				"kube-system/a": {Usable: vAddrs("192.0.2.101", "192.0.2.100")},
				"kube-system/b": {Rejected: []RejectedIP{conflict("::ffff:192.0.2.100", "kube-system/a")}, EgressRejected: "also listed by NetworkGatewayGroup kube-system/a, which is older and keeps it"},
				"team-b/a":      {Rejected: []RejectedIP{conflict("192.0.2.100", "kube-system/a")}, EgressRejected: "also listed by NetworkGatewayGroup kube-system/a, which is older and keeps it"},
			},
		},
		{
			name: "a group outside the gateway namespaces is ignored and claims nothing, even when older",
			groups: []*v1.NetworkGatewayGroup{
				vGroup("team-a", "gw", 0, "192.0.2.100", "192.0.2.11"),
				vGroup(ks, "gw", 9, "192.0.2.100"),
			},
			want: map[string]GroupCheck{
				"team-a/gw":      {Ignored: ignored},
				"kube-system/gw": {Usable: vAddrs("192.0.2.100")},
			},
		},
		{
			name:    "--gateway-namespaces honours more namespaces",
			groups:  []*v1.NetworkGatewayGroup{vGroup("team-a", "gw", 0, "192.0.2.100")},
			allowed: []string{ks, "team-a"},
			want:    map[string]GroupCheck{"team-a/gw": {Usable: vAddrs("192.0.2.100")}},
		},
		{
			name:    "allowed namespaces replace the default: kube-system is not implied",
			groups:  []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "192.0.2.100")},
			allowed: []string{"team-a"},
			want: map[string]GroupCheck{"kube-system/gw": {
				Ignored: "namespace kube-system is not a gateway namespace (gateway namespaces: team-a; the flag --gateway-namespaces of the operator and the agents adds more)"}},
		},
		{
			name:   "an IP listed twice in a group is usable once; a rejected IP claims nothing for a younger group",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "a", 0, "192.0.2.100", "192.0.2.100", "192.0.2.11"), vGroup(ks, "b", 1, "192.0.2.11", "192.0.2.101"), nil},
			want: map[string]GroupCheck{
				"kube-system/a": {Usable: vAddrs("192.0.2.100"), Rejected: []RejectedIP{rej("192.0.2.11", RejectReserved, "the InternalIP of node n1")}},
				"kube-system/b": {Usable: vAddrs("192.0.2.101"), Rejected: []RejectedIP{rej("192.0.2.11", RejectReserved, "the InternalIP of node n1")}, EgressRejected: "the InternalIP of node n1"},
			},
		},
		{
			name:   "no facts: only unusable values are rejected",
			groups: []*v1.NetworkGatewayGroup{vGroup(ks, "gw", 0, "192.0.2.11", "127.0.0.1")},
			want: map[string]GroupCheck{"kube-system/gw": {
				Usable: vAddrs("192.0.2.11"), Rejected: []RejectedIP{rej("127.0.0.1", RejectInvalid, "a loopback address")},
			}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := reserved
			if strings.HasPrefix(tc.name, "no facts") {
				res = Reserved{}
			}
			got := CheckGroups(tc.groups, tc.allowed, res)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("CheckGroups:\n got %+v\nwant %+v", got, tc.want)
			}
			// The order of groups does not matter.
			for r := range len(tc.groups) {
				perm := append(slices.Clone(tc.groups[r:]), tc.groups[:r]...)
				slices.Reverse(perm)
				if again := CheckGroups(perm, tc.allowed, res); !reflect.DeepEqual(again, got) {
					t.Fatalf("CheckGroups with groups in another order:\n got %+v\nwant %+v", again, got)
				}
			}
		})
	}
}

func TestGroupCheckHelpers(t *testing.T) {
	c := GroupCheck{
		Usable: vAddrs("192.0.2.100"),
		Rejected: []RejectedIP{
			{IP: "192.0.2.11", Kind: RejectReserved, Reason: "the InternalIP of node n1"},
			{IP: "192.0.2.101", Kind: RejectConflict, Reason: "also listed by NetworkGatewayGroup kube-system/old, which is older and keeps it", KeptBy: "kube-system/old"},
		},
	}
	if !c.Allows(netip.MustParseAddr("192.0.2.100")) || !c.Allows(netip.MustParseAddr("::ffff:192.0.2.100")) {
		t.Error("a usable IP is not allowed")
	}
	if c.Allows(netip.MustParseAddr("192.0.2.11")) || c.Allows(netip.MustParseAddr("192.0.2.101")) || (GroupCheck{}).Allows(netip.MustParseAddr("192.0.2.100")) {
		t.Error("a rejected or unknown IP is allowed")
	}
	if got, want := c.Message(), "192.0.2.11: the InternalIP of node n1; 192.0.2.101: also listed by NetworkGatewayGroup kube-system/old, which is older and keeps it"; got != want {
		t.Errorf("Message() = %q, want %q", got, want)
	}
	if c.OnlyConflicts() {
		t.Error("OnlyConflicts with a reserved IP")
	}
	c.Rejected = c.Rejected[1:]
	if !c.OnlyConflicts() {
		t.Error("not OnlyConflicts with only a conflict")
	}
	if (GroupCheck{}).OnlyConflicts() || (GroupCheck{}).Message() != "" {
		t.Error("a group without rejections has conflicts or a message")
	}
}

// TestDecideGatewayProblems: a policy whose gateway is ignored, or whose
// egress IP is rejected, is neither accepted nor applied; SetGatewayCheck
// brings CheckGroups' verdict to the facts, and zero values change nothing.
func TestDecideGatewayProblems(t *testing.T) {
	base := PolicyFacts{Gateway: "kube-system/gw", GatewayFound: true, FloatingIPs: []string{"192.0.2.11", "192.0.2.100"},
		Holders: map[string]string{"192.0.2.11": "n1"}, Node: "n1", NodeIPsKnown: true}
	notApplied := func(reason, msg string) Decision {
		return Decision{AcceptedReason: reason, AcceptedMessage: msg, ReadyReason: reason, ReadyMessage: "policy is not applied: " + msg}
	}
	cases := []struct {
		name   string
		checks map[string]GroupCheck
		facts  func(*PolicyFacts)
		want   Decision
	}{
		{
			name: "no checks: as before",
			want: Decision{Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.0.2.11 of NetworkGatewayGroup kube-system/gw",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node n1 holds egress IP 192.0.2.11", EgressIP: netip.MustParseAddr("192.0.2.11"),
				Holder: "n1", Applied: true, Mode: ModeGateway},
		},
		{
			name:   "the check of another group does not count",
			checks: map[string]GroupCheck{"kube-system/other": {Ignored: "x", EgressRejected: "y"}},
			want: Decision{Accepted: true, AcceptedReason: v1.ReasonAccepted, AcceptedMessage: "egress IP 192.0.2.11 of NetworkGatewayGroup kube-system/gw",
				Ready: true, ReadyReason: v1.ReasonApplied, ReadyMessage: "node n1 holds egress IP 192.0.2.11", EgressIP: netip.MustParseAddr("192.0.2.11"),
				Holder: "n1", Applied: true, Mode: ModeGateway},
		},
		{
			name:   "egress IP rejected",
			checks: map[string]GroupCheck{"kube-system/gw": {EgressRejected: "the InternalIP of node n1", Usable: vAddrs("192.0.2.100")}},
			want: notApplied(v1.ReasonEgressIPRejected,
				"egress IP 192.0.2.11 (the first floating IP of NetworkGatewayGroup kube-system/gw) is rejected and never assigned: the InternalIP of node n1"),
		},
		{
			name:   "gateway ignored",
			checks: map[string]GroupCheck{"kube-system/gw": {Ignored: "namespace kube-system is not a gateway namespace"}},
			want:   notApplied(v1.ReasonGatewayIgnored, "NetworkGatewayGroup kube-system/gw is ignored: namespace kube-system is not a gateway namespace"),
		},
		{
			name:   "ignored comes before an empty group",
			checks: map[string]GroupCheck{"kube-system/gw": {Ignored: "elsewhere"}},
			facts:  func(f *PolicyFacts) { f.FloatingIPs = nil },
			want:   notApplied(v1.ReasonGatewayIgnored, "NetworkGatewayGroup kube-system/gw is ignored: elsewhere"),
		},
		{
			name:   "not found comes first",
			checks: map[string]GroupCheck{"kube-system/gw": {Ignored: "elsewhere"}},
			facts:  func(f *PolicyFacts) { f.GatewayFound = false },
			want:   notApplied(v1.ReasonGatewayNotFound, "NetworkGatewayGroup kube-system/gw not found"),
		},
		{
			name:   "a first entry that is not IPv4 keeps its reason",
			checks: map[string]GroupCheck{"kube-system/gw": {EgressRejected: "not an IPv4 address"}},
			facts:  func(f *PolicyFacts) { f.FloatingIPs = []string{"nonsense"} },
			want:   notApplied(v1.ReasonNoFloatingIP, `the first floating IP of NetworkGatewayGroup kube-system/gw, "nonsense", is not an IPv4 address`),
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := base
			f.Holders = maps.Clone(base.Holders)
			if tc.facts != nil {
				tc.facts(&f)
			}
			f.SetGatewayCheck(tc.checks)
			if got := Decide(f); got != tc.want {
				t.Fatalf("Decide:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestAddNodeAddress(t *testing.T) {
	var f NodeFacts
	for _, a := range [][2]string{{"InternalIP", "192.0.2.11"}, {"Hostname", "n1"}, {"ExternalIP", "198.51.100.11"}, {"InternalIP", "2001:db8::11"}, {"InternalDNS", "n1.example"}} {
		f.AddNodeAddress(a[0], a[1])
	}
	if !slices.Equal(f.InternalIPs, []string{"192.0.2.11", "2001:db8::11"}) || !slices.Equal(f.ExternalIPs, []string{"198.51.100.11"}) {
		t.Fatalf("facts %+v", f)
	}
}
