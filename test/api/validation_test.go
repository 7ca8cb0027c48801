package api_test

import (
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

// TestValidObjectsAccepted guards the rejection test below: the objects it
// mutates are themselves accepted.
func TestValidObjectsAccepted(t *testing.T) {
	for _, obj := range []string{
		gatewayYAML("valid-gw", "  floatingIPs:\n  - 192.0.2.100\n  - 192.0.2.101\n"),
		policyYAML(t, "valid-policy", "", ""),
		policyYAML(t, "valid-exprs", "      matchLabels:\n        role: frontend\n",
			"      matchExpressions:\n      - key: example.com/role\n        operator: In\n        values: [frontend, api]\n      - key: canary\n        operator: DoesNotExist\n"),
		policyYAML(t, "valid-all-namespaces", "  - namespaceSelector:\n      matchLabels:\n        user: alice\n", "  - namespaceSelector: {}\n"),
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
