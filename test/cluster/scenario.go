package cluster

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// GatewayYAML is a NetworkGatewayGroup in kube-system with floatingIPs.
func GatewayYAML(name string, floatingIPs ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: networking.gke.io/v1\nkind: NetworkGatewayGroup\nmetadata:\n  namespace: kube-system\n  name: %s\nspec:\n  floatingIPs:\n", name)
	for _, ip := range floatingIPs {
		fmt.Fprintf(&b, "  - %s\n", ip)
	}
	return b.String()
}

// SeedGateway is the seed's NetworkGatewayGroup on the lab's node subnet.
var SeedGateway = GatewayYAML("default", "192.0.2.100", "192.0.2.101", "192.0.2.102")

// SeedPolicy is the seed's EgressNATPolicy (alice's and paul's frontends)
// toward the lab's external range 203.0.113.0/24.
const SeedPolicy = `apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: egress
spec:
  sources:
  - namespaceSelector:
      matchLabels:
        user: alice
    podSelector:
      matchLabels:
        role: frontend
  - namespaceSelector:
      matchLabels:
        user: paul
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

// SeedScenario is the seed's gateway and policy in one document.
var SeedScenario = SeedGateway + "---\n" + SeedPolicy

// TestMain runs a test package against one lab cluster: it starts the
// cluster into *c, runs the tests, prints the binaries' logs when a test
// failed, and tears everything down. It returns the exit code.
func TestMain(m *testing.M, prefix string, c **Cluster) int {
	return TestMainOptions(m, Options{Prefix: prefix}, c)
}

// TestMainOptions is TestMain with options (Log is set here).
func TestMainOptions(m *testing.M, opts Options, c **Cluster) int {
	prefix := opts.Prefix
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, prefix+": needs root for network namespaces")
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	opts.Log = func(f string, a ...any) {
		fmt.Fprintf(os.Stderr, prefix+": "+f+"\n", a...)
	}
	cl, err := Start(ctx, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, prefix+": start cluster:", err)
		return 1
	}
	*c = cl
	code := m.Run()
	if code != 0 || os.Getenv("EGRESSNAT_TEST_LOGS") != "" {
		fmt.Fprintln(os.Stderr, cl.Logs())
	}
	if err := cl.Close(); err != nil {
		fmt.Fprintln(os.Stderr, prefix+": close cluster:", err)
		return 1
	}
	return code
}
