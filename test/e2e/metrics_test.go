package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

// get fetches a URL path from a server inside a lab host's namespace.
func get(t *testing.T, ns string, port int, path string) (int, string) {
	t.Helper()
	code, body, err := tryGet(ns, port, path)
	if err != nil {
		t.Fatal(err)
	}
	return code, body
}

// tryGet is get for a server that may not listen yet.
func tryGet(ns string, port int, path string) (int, string, error) {
	hc := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return lab.DialTCP(ctx, ns, addr)
		},
	}}
	resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	if err != nil {
		return 0, "", fmt.Errorf("GET %s in %s: %w", path, ns, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// metric returns the value of the first sample whose line matches re.
func metric(body, re string) (float64, bool) {
	m := regexp.MustCompile(`(?m)^` + re + ` ([0-9.e+-]+)$`).FindStringSubmatch(body)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, err == nil
}

// The agents and the operators serve Prometheus metrics and health during
// a real run: syncs, set sizes, floating IPs, per-policy counters from the
// nftables rules, and which operator leads.
func TestMetricsAndHealth(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "web", frontend)
	wantSource(t, p, ext1(), fip100)

	gw := c.Lab.Node("worker1").NetNS
	if code, body := get(t, gw, cluster.AgentHealthPort, "/readyz"); code != http.StatusOK {
		t.Fatalf("agent /readyz: %d %s", code, body)
	}
	if code, _ := get(t, gw, cluster.AgentHealthPort, "/healthz"); code != http.StatusOK {
		t.Fatalf("agent /healthz: %d", code)
	}
	want := map[string]float64{
		`egressnat_agent_policy_packets\{mode="Gateway",policy="egress"\}`: 1,
		`egressnat_agent_policy_bytes\{mode="Gateway",policy="egress"\}`:   1,
		`egressnat_agent_sync_duration_seconds_count`:                      1,
		`egressnat_agent_floating_ips`:                                     2, // 192.0.2.100 and .102
		`egressnat_agent_set_elements\{kind="src",policy="egress"\}`:       1,
		`egressnat_agent_set_elements\{kind="dst",policy="egress"\}`:       1,
		`egressnat_agent_gratuitous_arps_total`:                            1,
	}
	// The counters are scraped from nftables every 5 s; poll until every
	// value is there.
	var missing []string
	deadline := time.Now().Add(15 * time.Second)
	for {
		c.Source(ctxT(t), p, ext1()) //nolint:errcheck // more traffic
		_, body := get(t, gw, cluster.AgentHealthPort, "/metrics")
		missing = missing[:0]
		for re, min := range want {
			if v, ok := metric(body, re); !ok || v < min {
				missing = append(missing, fmt.Sprintf("gateway %s = %v (present %v), want at least %v", re, v, ok, min))
			}
		}
		// The source node scrapes its own counters on its own 5 s tick.
		_, src := get(t, c.Lab.Node("worker2").NetNS, cluster.AgentHealthPort, "/metrics")
		re := `egressnat_agent_policy_packets\{mode="Reroute",policy="egress"\}`
		if v, ok := metric(src, re); !ok || v <= 0 {
			missing = append(missing, fmt.Sprintf("source %s = %v (present %v), want above 0", re, v, ok))
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent metrics:\n%s\n\ngateway:\n%s\n\nsource:\n%s", strings.Join(missing, "\n"), body, src)
		}
		time.Sleep(250 * time.Millisecond)
	}

	cp := c.Lab.Node("cp1").NetNS
	leaders := 0.0
	for i := range c.Operators {
		code, body := get(t, cp, cluster.OperatorHealthPort(i), "/metrics")
		if code != http.StatusOK {
			t.Fatalf("operator %d /metrics: %d", i, code)
		}
		v, _ := metric(body, `egressnat_operator_leader`)
		leaders += v
		if code, body := get(t, cp, cluster.OperatorHealthPort(i), "/readyz"); code != http.StatusOK {
			t.Fatalf("operator %d /readyz: %d %s", i, code, body)
		}
	}
	if leaders != 1 {
		t.Fatalf("%v operator replicas report leading, want 1", leaders)
	}
}
