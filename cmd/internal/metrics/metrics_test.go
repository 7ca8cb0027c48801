package metrics

import (
	"context"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestHandler: /metrics shows every agent and operator metric with its
// labels, /healthz is 200, /readyz follows ready().
func TestHandler(t *testing.T) {
	reg := NewRegistry()
	a := NewAgent(reg)
	o := NewOperator(reg)
	a.SyncDuration.Observe(0.003)
	a.SyncErrors.Inc()
	a.SetSetSizes([]SetSize{{Policy: "egress", Sources: 3, Destinations: 1}})
	a.FloatingIPs.Set(2)
	a.GARPsSent.Add(3)
	a.ConntrackFlushed.Add(7)
	a.ObserveConntrackCheck(SideTaken, ConntrackCheck{Translated: 4, Wrong: 2, Flushed: 2}, nil)
	a.ReleaseSeconds.Observe(0.004)
	a.SetPolicyCounters([]PolicyCounter{{Policy: "egress", Mode: "Reroute", Packets: 10, Bytes: 840}})
	o.ReconcileDuration.Observe(0.01)
	o.IPMoves.WithLabelValues("kube-system/default").Inc()
	o.FailoverDuration.Observe(3.2)
	o.Leader.Set(1)
	o.UnassignedIPs.WithLabelValues("kube-system/default").Set(0)

	var notReady error = errString("caches not synced")
	srv := httptest.NewServer(Handler(reg, func() error { return notReady }))
	defer srv.Close()

	code, body := get(t, srv.URL+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	for _, want := range []string{
		`egressnat_agent_sync_duration_seconds_count 1`,
		`egressnat_agent_sync_errors_total 1`,
		`egressnat_agent_set_elements{kind="src",policy="egress"} 3`,
		`egressnat_agent_set_elements{kind="dst",policy="egress"} 1`,
		`egressnat_agent_floating_ips 2`,
		`egressnat_agent_gratuitous_arps_total 3`,
		`egressnat_agent_conntrack_entries_flushed_total 7`,
		`egressnat_agent_conntrack_verified_entries_total{result="ok",side="taken"} 4`,
		`egressnat_agent_conntrack_verified_entries_total{result="wrong",side="taken"} 2`,
		`egressnat_agent_conntrack_verified_entries_total{result="remaining",side="released"} 0`,
		`egressnat_agent_conntrack_checks_total{result="flushed",side="taken"} 1`,
		`egressnat_agent_release_seconds_bucket{le="0.005"} 1`,
		`egressnat_agent_policy_packets{mode="Reroute",policy="egress"} 10`,
		`egressnat_agent_policy_bytes{mode="Reroute",policy="egress"} 840`,
		`egressnat_operator_reconcile_duration_seconds_count 1`,
		`egressnat_operator_floating_ip_moves_total{gateway="kube-system/default"} 1`,
		`egressnat_operator_failover_duration_seconds_bucket{le="4"} 1`,
		`egressnat_operator_leader 1`,
		`egressnat_operator_unassigned_floating_ips{gateway="kube-system/default"} 0`,
		`go_goroutines`,
		`process_start_time_seconds`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	if code, body := get(t, srv.URL+"/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := get(t, srv.URL+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "caches not synced") {
		t.Errorf("/readyz while not ready: %d %q", code, body)
	}
	notReady = nil
	if code, body := get(t, srv.URL+"/readyz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/readyz when ready: %d %q", code, body)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// TestPolicyCountersReplace: a policy that disappears from the counters
// disappears from /metrics; counters of one policy and mode add up.
func TestPolicyCountersReplace(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := NewAgent(reg)
	a.SetPolicyCounters([]PolicyCounter{{Policy: "old", Mode: "Gateway", Packets: 1, Bytes: 60}})
	a.SetSetSizes([]SetSize{{Policy: "old", Sources: 1, Destinations: 1}})
	a.SetPolicyCounters([]PolicyCounter{
		{Policy: "new", Mode: "Gateway", Packets: 2, Bytes: 100},
		{Policy: "new", Mode: "Gateway", Packets: 3, Bytes: 50},
	})
	a.SetSetSizes([]SetSize{{Policy: "new", Sources: 4, Destinations: 2}})
	srv := httptest.NewServer(Handler(reg, nil))
	defer srv.Close()
	_, body := get(t, srv.URL+"/metrics")
	if strings.Contains(body, `policy="old"`) {
		t.Errorf("removed policy still exported:\n%s", body)
	}
	for _, want := range []string{
		`egressnat_agent_policy_packets{mode="Gateway",policy="new"} 5`,
		`egressnat_agent_policy_bytes{mode="Gateway",policy="new"} 150`,
		`egressnat_agent_set_elements{kind="src",policy="new"} 4`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
	if code, _ := get(t, srv.URL+"/readyz"); code != 200 {
		t.Errorf("/readyz with nil ready: %d", code)
	}
}

// TestServeStopsWithContext: ServeListener serves until the context ends
// and then returns nil; a busy address is an error.
func TestServeStopsWithContext(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeListener(ctx, l, NewRegistry(), func() error { return nil }) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := ServeRegistry(context.Background(), addr, NewRegistry(), nil); err == nil || !strings.Contains(err.Error(), "listen on") {
		t.Errorf("second server on a busy address: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}

// TestServeDefaultRegistry: Serve exposes the package Registry, on which
// NewAgent(nil) and NewOperator(nil) register.
func TestServeDefaultRegistry(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	NewAgent(nil).GARPsSent.Inc()
	NewOperator(nil).Leader.Set(1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, addr, nil) }()
	var body string
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(body, "egressnat_agent_gratuitous_arps_total 1") || !strings.Contains(body, "egressnat_operator_leader 1") {
		t.Errorf("default registry:\n%s", body)
	}
}

// TestDocumented: docs/metrics.md names every egressnat metric with its
// labels, and nothing that does not exist.
func TestDocumented(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := NewAgent(reg)
	o := NewOperator(reg)
	// Vectors appear in Gather only with a child.
	a.SetElements.WithLabelValues("p", "src")
	a.PolicyPackets.WithLabelValues("p", "Gateway")
	a.PolicyBytes.WithLabelValues("p", "Gateway")
	o.IPMoves.WithLabelValues("g")
	o.UnassignedIPs.WithLabelValues("g")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "..", "docs", "metrics.md"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		name := mf.GetName()
		names = append(names, name)
		var labels []string
		for _, lp := range mf.GetMetric()[0].GetLabel() {
			labels = append(labels, lp.GetName())
		}
		row := regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(name) + "` \\|[^|]*\\|([^|]*)\\|")
		m := row.FindStringSubmatch(string(doc))
		if m == nil {
			t.Errorf("docs/metrics.md has no table row for %s", name)
			continue
		}
		for _, l := range labels {
			if !strings.Contains(m[1], "`"+l+"`") {
				t.Errorf("docs/metrics.md: %s lacks label %s in %q", name, l, m[1])
			}
		}
	}
	for _, m := range regexp.MustCompile("(?m)^\\| `(egressnat_[a-z_]+)`").FindAllStringSubmatch(string(doc), -1) {
		if !slices.Contains(names, m[1]) {
			t.Errorf("docs/metrics.md documents %s, which does not exist", m[1])
		}
	}
}

// TestSetSetSizes: values follow the last call; policies no longer listed
// disappear.
func TestSetSetSizes(t *testing.T) {
	a := NewAgent(prometheus.NewRegistry())
	a.SetSetSizes([]SetSize{{Policy: "egress", Sources: 3, Destinations: 1}, {Policy: "web", Sources: 1, Destinations: 2}})
	a.SetSetSizes([]SetSize{{Policy: "web", Sources: 5, Destinations: 2}, {Policy: "new", Sources: 0, Destinations: 1}})
	got := map[string]float64{}
	ch := make(chan prometheus.Metric, 16)
	a.SetElements.Collect(ch)
	close(ch)
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		var policy, kind string
		for _, l := range pb.GetLabel() {
			switch l.GetName() {
			case "policy":
				policy = l.GetValue()
			case "kind":
				kind = l.GetValue()
			}
		}
		got[policy+"/"+kind] = pb.GetGauge().GetValue()
	}
	want := map[string]float64{"web/src": 5, "web/dst": 2, "new/src": 0, "new/dst": 1}
	if !maps.Equal(got, want) {
		t.Fatalf("set sizes %v, want %v", got, want)
	}
}

// counterValues returns the values of a counter vector by "side/result".
func counterValues(t *testing.T, v *prometheus.CounterVec) map[string]float64 {
	t.Helper()
	got := map[string]float64{}
	ch := make(chan prometheus.Metric, 32)
	v.Collect(ch)
	close(ch)
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		var side, result string
		for _, l := range pb.GetLabel() {
			switch l.GetName() {
			case "side":
				side = l.GetValue()
			case "result":
				result = l.GetValue()
			}
		}
		got[side+"/"+result] = pb.GetCounter().GetValue()
	}
	return got
}

// TestObserveConntrackCheck: every series exists at 0 before the first
// check; a check adds its entries by result and counts once, as ok,
// flushed, remaining or error; the released side has no ok nor wrong
// entries.
func TestObserveConntrackCheck(t *testing.T) {
	a := NewAgent(prometheus.NewRegistry())
	entries := counterValues(t, a.ConntrackVerified)
	wantEntries := map[string]float64{
		"released/flushed": 0, "released/remaining": 0,
		"taken/ok": 0, "taken/wrong": 0, "taken/flushed": 0, "taken/remaining": 0,
	}
	if !maps.Equal(entries, wantEntries) {
		t.Fatalf("entries before any check: %v, want %v", entries, wantEntries)
	}
	if checks := counterValues(t, a.ConntrackChecks); len(checks) != 8 {
		t.Fatalf("checks before any check: %v", checks)
	}

	a.ObserveConntrackCheck(SideReleased, ConntrackCheck{}, nil)
	a.ObserveConntrackCheck(SideReleased, ConntrackCheck{Flushed: 3}, nil)
	a.ObserveConntrackCheck(SideReleased, ConntrackCheck{Flushed: 1, Remaining: 2, Translated: 9, Wrong: 9}, nil)
	a.ObserveConntrackCheck(SideTaken, ConntrackCheck{Translated: 5}, nil)
	a.ObserveConntrackCheck(SideTaken, ConntrackCheck{Translated: 1, Wrong: 2, Flushed: 2}, nil)
	a.ObserveConntrackCheck(SideTaken, ConntrackCheck{Wrong: 1}, errString("conntrack dump: boom"))

	wantEntries = map[string]float64{
		"released/flushed": 4, "released/remaining": 2,
		"taken/ok": 6, "taken/wrong": 3, "taken/flushed": 2, "taken/remaining": 0,
	}
	if got := counterValues(t, a.ConntrackVerified); !maps.Equal(got, wantEntries) {
		t.Errorf("entries: %v, want %v", got, wantEntries)
	}
	wantChecks := map[string]float64{
		"released/ok": 1, "released/flushed": 1, "released/remaining": 1, "released/error": 0,
		"taken/ok": 1, "taken/flushed": 1, "taken/remaining": 0, "taken/error": 1,
	}
	if got := counterValues(t, a.ConntrackChecks); !maps.Equal(got, wantChecks) {
		t.Errorf("checks: %v, want %v", got, wantChecks)
	}
}
