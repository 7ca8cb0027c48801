package api_test

import (
	"fmt"
	"strings"
	"testing"
)

const validPolicy = `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: %s
spec:
  sources:
  - namespaceSelector:
      matchLabels:
        user: alice
    podSelector:
      matchLabels:
        role: frontend
  action: SNAT
  destinations:
  - cidr: 203.0.113.0/24
  gatewayRef:
    name: default
    namespace: kube-system
`

func gatewayYAML(name, floatingIPs string) string {
	return "apiVersion: networking.gke.io/v1\nkind: NetworkGatewayGroup\nmetadata:\n  name: " + name +
		"\n  namespace: kube-system\nspec:\n" + floatingIPs
}

// policyYAML returns the valid policy with one line replaced.
func policyYAML(t *testing.T, name, old, replacement string) string {
	t.Helper()
	base := strings.Replace(validPolicy, "%s", name, 1)
	if old == "" {
		return base
	}
	if !strings.Contains(base, old) {
		t.Fatalf("test bug: %q is not in the valid policy", old)
	}
	return strings.Replace(base, old, replacement, 1)
}

// destinationsYAML returns the valid policy with these destinations.
func destinationsYAML(t *testing.T, name string, cidrs ...string) string {
	t.Helper()
	return policyYAML(t, name, "  - cidr: 203.0.113.0/24\n", "  - cidr: "+strings.Join(cidrs, "\n  - cidr: ")+"\n")
}

// distinct returns n distinct addresses (or networks) from a format with
// two octets, starting at 198.51.100.0 for "198.51.%d.%d".
func distinct(n int, format string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf(format, 100+i/256, i%256)
	}
	return out
}

// TestValidObjectsAccepted guards the rejection test below: the objects it
// mutates are themselves accepted.
func TestValidObjectsAccepted(t *testing.T) {
	for _, obj := range []string{
		gatewayYAML("valid-gw", "  floatingIPs:\n  - 192.0.2.100\n  - 192.0.2.101\n"),
		policyYAML(t, "valid-policy", "", ""),
		policyYAML(t, "valid-exprs", "      matchLabels:\n        role: frontend\n",
			"      matchExpressions:\n      - key: example.com/role\n        operator: In\n        values: [frontend, api]\n      - key: canary\n        operator: DoesNotExist\n"),
		policyYAML(t, "valid-all-namespaces", "  - namespaceSelector:\n      matchLabels:\n        user: alice\n", "  - namespaceSelector: {}\n"),
		// Every destination: the dataplane keeps cluster-internal ones out.
		policyYAML(t, "valid-default-route", "203.0.113.0/24", "0.0.0.0/0"),
		// Networks that merely contain a refused range are allowed, like
		// 0.0.0.0/0; so are unicast networks next to the refused ones.
		destinationsYAML(t, "valid-near-refused", "0.0.0.0/1", "128.0.0.0/1", "169.0.0.0/8", "1.0.0.0/8", "126.255.255.255/32",
			"128.0.0.0/8", "169.253.255.255/32", "169.255.0.0/16", "223.255.255.255/32", "192.0.0.0/3", "8.8.8.0/24", "8.8.8.8/32"),
		destinationsYAML(t, "valid-max-destinations", distinct(512, "198.51.%d.%d/32")...),
		gatewayYAML("valid-near-refused", "  floatingIPs: [1.0.0.1, 126.255.255.254, 128.0.0.1, 169.253.255.254, 169.255.0.1, 223.255.255.254, 192.0.2.100]\n"),
		gatewayYAML("valid-max-floating-ips", "  floatingIPs: ["+strings.Join(distinct(256, "198.51.%d.%d"), ", ")+"]\n"),
	} {
		if out, errOut, err := kubectl(t, obj, "apply", "-f", "-"); err != nil {
			t.Errorf("valid object rejected: %v\n%s%s\n%s", err, out, errOut, obj)
		}
	}
}

// TestInvalidObjectsRejected applies bad objects with the real kubectl and
// asserts the API server's message for each.
func TestInvalidObjectsRejected(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		// NetworkGatewayGroup
		{"empty floating IP list", gatewayYAML("g1", "  floatingIPs: []\n"), "spec.floatingIPs in body should have at least 1 items"},
		{"missing floating IPs", gatewayYAML("g2", "  {}\n"), "spec.floatingIPs: Required value"},
		{"missing spec", strings.TrimSuffix(gatewayYAML("g3", ""), "spec:\n"), "spec: Required value"},
		{"octet out of range", gatewayYAML("g4", "  floatingIPs:\n  - 192.168.1.300\n"), "must be an IPv4 address such as 192.0.2.100"},
		{"not an IP", gatewayYAML("g5", "  floatingIPs:\n  - gateway.example.com\n"), "must be an IPv4 address such as 192.0.2.100"},
		{"IPv6 floating IP", gatewayYAML("g6", "  floatingIPs:\n  - 2001:db8::10\n"), "IPv6 addresses are not supported: the egress gateway is IPv4-only"},
		{"duplicate floating IP", gatewayYAML("g7", "  floatingIPs:\n  - 192.0.2.100\n  - 192.0.2.100\n"), `Duplicate value: "192.0.2.100"`},
		{"unspecified address", gatewayYAML("g8", "  floatingIPs:\n  - 0.0.0.0\n"), "must be a unicast address a node can hold"},
		{"broadcast address", gatewayYAML("g9", "  floatingIPs:\n  - 255.255.255.255\n"), "must be a unicast address a node can hold"},
		{"unknown gateway field", gatewayYAML("g10", "  floatingIP:\n  - 192.0.2.100\n"), `unknown field "spec.floatingIP"`},
		// Addresses a node cannot hold (issue #11): each range its message.
		{"floating IP in 0.0.0.0/8", gatewayYAML("g11", "  floatingIPs: [192.0.2.100, 0.1.2.3]\n"), "must be a unicast address a node can hold: 0.0.0.0/8 means this host on this network"},
		{"unspecified floating IP", gatewayYAML("g12", "  floatingIPs: [0.0.0.0]\n"), "must be a unicast address a node can hold: 0.0.0.0/8 means this host on this network"},
		{"loopback floating IP", gatewayYAML("g13", "  floatingIPs: [127.0.0.1]\n"), "must be a unicast address a node can hold: 127.0.0.0/8 is loopback"},
		{"loopback floating IP, top of the range", gatewayYAML("g14", "  floatingIPs: [127.255.255.254]\n"), "127.0.0.0/8 is loopback"},
		{"metadata address as floating IP", gatewayYAML("g15", "  floatingIPs: [169.254.169.254]\n"), "must be a unicast address a node can hold: 169.254.0.0/16 is link-local"},
		{"multicast floating IP", gatewayYAML("g16", "  floatingIPs: [224.0.0.1]\n"), "must be a unicast address a node can hold: 224.0.0.0/4 is multicast"},
		{"SSDP multicast floating IP", gatewayYAML("g17", "  floatingIPs: [239.255.255.250]\n"), "224.0.0.0/4 is multicast"},
		{"class E floating IP", gatewayYAML("g18", "  floatingIPs: [240.0.0.1]\n"), "240.0.0.0/4 reserved (class E)"},
		{"class E floating IP, top", gatewayYAML("g19", "  floatingIPs: [255.255.255.254]\n"), "240.0.0.0/4 reserved (class E)"},
		{"broadcast floating IP", gatewayYAML("g20", "  floatingIPs: [255.255.255.255]\n"), "255.255.255.255 broadcast"},
		{"hostile IP after valid ones", gatewayYAML("g21", "  floatingIPs: [192.0.2.100, 192.0.2.101, 127.0.0.1]\n"), "spec.floatingIPs[2]: Invalid value"},
		{"257 floating IPs", gatewayYAML("g22", "  floatingIPs: ["+strings.Join(distinct(257, "198.51.%d.%d"), ", ")+"]\n"), "must have at most 256 items"},
		{"duplicate among many floating IPs", gatewayYAML("g23", "  floatingIPs: ["+strings.Join(append(distinct(20, "198.51.%d.%d"), "198.51.100.7"), ", ")+"]\n"), `Duplicate value: "198.51.100.7"`},
		{"leading zero in floating IP", gatewayYAML("g24", "  floatingIPs: [192.0.2.010]\n"), "must be an IPv4 address such as 192.0.2.100"},
		{"IPv4-mapped IPv6 floating IP", gatewayYAML("g25", "  floatingIPs: ['::ffff:192.0.2.100']\n"), "must be an IPv4 address such as 192.0.2.100"},
		// EgressNATPolicy
		{"empty sources", policyYAML(t, "p1", "  sources:\n  - namespaceSelector:\n      matchLabels:\n        user: alice\n    podSelector:\n      matchLabels:\n        role: frontend\n", "  sources: []\n"), "spec.sources in body should have at least 1 items"},
		{"empty destinations", policyYAML(t, "p2", "  destinations:\n  - cidr: 203.0.113.0/24\n", "  destinations: []\n"), "spec.destinations in body should have at least 1 items"},
		{"host bits set", policyYAML(t, "p3", "203.0.113.0/24", "8.8.8.1/24"), "must be in canonical form with the host bits zero: write 8.8.8.0/24 instead of 8.8.8.1/24"},
		{"prefix /33", policyYAML(t, "p4", "203.0.113.0/24", "203.0.113.0/33"), "must be an IPv4 CIDR such as 203.0.113.0/24"},
		{"octet out of range in CIDR", policyYAML(t, "p5", "203.0.113.0/24", "192.168.1.300/32"), "must be an IPv4 CIDR such as 203.0.113.0/24"},
		{"IPv6 destination", policyYAML(t, "p6", "203.0.113.0/24", "2001:db8::/32"), "IPv6 destinations are not supported: the egress gateway is IPv4-only"},
		{"address without prefix", policyYAML(t, "p7", "203.0.113.0/24", "203.0.113.7"), "write 203.0.113.7/32 for a single address"},
		{"unknown action", policyYAML(t, "p8", "action: SNAT", "action: DNAT"), `Unsupported value: "DNAT": supported values: "SNAT"`},
		{"missing action", policyYAML(t, "p9", "  action: SNAT\n", ""), "spec.action: Required value"},
		{"missing gatewayRef", policyYAML(t, "p10", "  gatewayRef:\n    name: default\n    namespace: kube-system\n", ""), "spec.gatewayRef: Required value"},
		{"gatewayRef without namespace", policyYAML(t, "p11", "    namespace: kube-system\n", ""), "spec.gatewayRef.namespace: Required value"},
		{"gatewayRef bad name", policyYAML(t, "p12", "name: default", "name: Default_GW"), "must be a valid object name"},
		{"malformed label key", policyYAML(t, "p13", "        user: alice", "        \"bad key!\": alice"), "matchLabels keys must be valid label keys"},
		{"malformed label value", policyYAML(t, "p14", "        role: frontend", "        role: -frontend-"), `matchLabels[role]: Invalid value: "-frontend-": must be a valid label value`},
		{"bad selector operator", policyYAML(t, "p15", "      matchLabels:\n        role: frontend\n", "      matchExpressions:\n      - key: role\n        operator: Equals\n        values: [frontend]\n"), `Unsupported value: "Equals": supported values: "In", "NotIn", "Exists", "DoesNotExist"`},
		{"In without values", policyYAML(t, "p16", "      matchLabels:\n        role: frontend\n", "      matchExpressions:\n      - key: role\n        operator: In\n"), "values must be non-empty when operator is In or NotIn"},
		{"Exists with values", policyYAML(t, "p17", "      matchLabels:\n        role: frontend\n", "      matchExpressions:\n      - key: role\n        operator: Exists\n        values: [frontend]\n"), "values must be empty when operator is Exists or DoesNotExist"},
		{"bad expression key", policyYAML(t, "p18", "      matchLabels:\n        role: frontend\n", "      matchExpressions:\n      - key: -role\n        operator: Exists\n"), "must be a valid label key such as app or example.com/app"},
		{"missing podSelector", policyYAML(t, "p19", "    podSelector:\n      matchLabels:\n        role: frontend\n", ""), "podSelector: Required value"},
		{"unknown source field", policyYAML(t, "p20", "    podSelector:", "    podSelectors:"), `unknown field "spec.sources[0].podSelectors"`},
		// Destinations no gateway may serve (issue #11).
		{"destination 0.0.0.0/8", policyYAML(t, "p21", "203.0.113.0/24", "0.0.0.0/8"), "must not lie within 0.0.0.0/8 (this host on this network): write 0.0.0.0/0 for every destination"},
		{"destination 0.0.0.0/32", policyYAML(t, "p22", "203.0.113.0/24", "0.0.0.0/32"), "must not lie within 0.0.0.0/8"},
		{"loopback destination", policyYAML(t, "p23", "203.0.113.0/24", "127.0.0.0/8"), "must not lie within 127.0.0.0/8: loopback traffic never leaves a node"},
		{"loopback host destination", policyYAML(t, "p24", "203.0.113.0/24", "127.0.0.53/32"), "must not lie within 127.0.0.0/8"},
		{"metadata service destination", policyYAML(t, "p25", "203.0.113.0/24", "169.254.169.254/32"), "must not lie within 169.254.0.0/16: link-local traffic (such as a metadata service at 169.254.169.254) stays on its link"},
		{"link-local destination", policyYAML(t, "p26", "203.0.113.0/24", "169.254.0.0/16"), "must not lie within 169.254.0.0/16"},
		{"multicast destination", policyYAML(t, "p27", "203.0.113.0/24", "224.0.0.0/4"), "must not lie within 224.0.0.0/4 (multicast) or 240.0.0.0/4 (reserved, broadcast): only unicast traffic can leave through a gateway"},
		{"mDNS destination", policyYAML(t, "p28", "203.0.113.0/24", "224.0.0.251/32"), "must not lie within 224.0.0.0/4 (multicast)"},
		{"class E destination", policyYAML(t, "p29", "203.0.113.0/24", "240.0.0.0/4"), "must not lie within 224.0.0.0/4 (multicast) or 240.0.0.0/4"},
		{"broadcast destination", policyYAML(t, "p30", "203.0.113.0/24", "255.255.255.255/32"), "must not lie within 224.0.0.0/4 (multicast) or 240.0.0.0/4"},
		{"multicast and class E together", policyYAML(t, "p31", "203.0.113.0/24", "224.0.0.0/3"), "must not lie within 224.0.0.0/4 (multicast) or 240.0.0.0/4"},
		{"refused destination after valid ones", destinationsYAML(t, "p32", "0.0.0.0/0", "8.8.8.0/24", "169.254.169.254/32"), "spec.destinations[2].cidr: Invalid value"},
		{"duplicate destination", destinationsYAML(t, "p33", "203.0.113.0/24", "8.8.8.0/24", "203.0.113.0/24"), `spec.destinations[2]: Duplicate value: {"cidr":"203.0.113.0/24"}`},
		{"duplicate default route", destinationsYAML(t, "p34", "0.0.0.0/0", "0.0.0.0/0"), `spec.destinations[1]: Duplicate value: {"cidr":"0.0.0.0/0"}`},
		{"duplicate among many destinations", destinationsYAML(t, "p35", append(distinct(511, "198.51.%d.%d/32"), "198.51.100.7/32")...), `spec.destinations[511]: Duplicate value: {"cidr":"198.51.100.7/32"}`},
		{"513 destinations", destinationsYAML(t, "p36", distinct(513, "198.51.%d.%d/32")...), "must have at most 512 items"},
	}
	if len(cases) < 20 {
		t.Fatalf("only %d bad objects; the issue asks for at least 20", len(cases))
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, err := kubectl(t, tc.yaml, "apply", "--validate=strict", "-f", "-")
			if err == nil {
				t.Fatalf("accepted, want rejection with %q\n%s\n%s", tc.want, out, tc.yaml)
			}
			if !strings.Contains(errOut, tc.want) {
				t.Fatalf("rejected with\n%s\nwant the message to contain %q", errOut, tc.want)
			}
		})
	}
}
