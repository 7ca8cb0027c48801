package agent

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/egressnat/egressnat/cmd/internal/metrics"
	"github.com/egressnat/egressnat/nft/bpf"
)

// fakeProgram records what Reconcile was asked and what it holds.
type fakeProgram struct {
	mu       sync.Mutex
	attached map[int]bool
	calls    []map[int]bool
	fail     error
}

func (f *fakeProgram) Reconcile(want map[int]bool) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, maps.Clone(want))
	if f.fail != nil {
		return 0, 0, f.fail
	}
	a, d := 0, 0
	for i := range want {
		if !f.attached[i] {
			a++
		}
	}
	for i := range f.attached {
		if !want[i] {
			d++
		}
	}
	f.attached = maps.Clone(want)
	return a, d, nil
}

func (f *fakeProgram) Entries() (map[netip.Addr]bpf.Class, error) { return nil, nil }

func (f *fakeProgram) state() (map[int]bool, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.attached), len(f.calls)
}

// value reads a counter's or a gauge's value.
func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Gauge != nil {
		return m.Gauge.GetValue()
	}
	return m.Counter.GetValue()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPodClassifier: the program follows the known pods' interfaces (by
// the routes, the uplink never), from SetPods and from link and route
// changes; nothing is attached before the first Apply; a periodic check
// that has to attach again counts as drift; a failed attach is retried.
func TestPodClassifier(t *testing.T) {
	a := netip.MustParseAddr
	routes := []bpf.Route{
		{Dst: netip.MustParsePrefix("10.244.1.2/32"), LinkIndex: 5},
		{Dst: netip.MustParsePrefix("10.244.1.3/32"), LinkIndex: 6},
		{Dst: netip.MustParsePrefix("0.0.0.0/0"), LinkIndex: 2}, // the uplink
	}
	var rmu sync.Mutex
	var kick func()
	prog := &fakeProgram{attached: map[int]bool{}}
	reg := prometheus.NewRegistry()
	m := metrics.NewAgent(reg)
	p := NewPodClassifier(ClassifierConfig{
		Program: prog, Uplink: "eth0", Period: time.Hour, Metrics: m,
		Routes: func() ([]bpf.Route, error) {
			rmu.Lock()
			defer rmu.Unlock()
			return append([]bpf.Route(nil), routes...), nil
		},
		Watch: func(_ context.Context, k func()) error {
			rmu.Lock()
			kick = k
			rmu.Unlock()
			return nil
		},
		UplinkIndex: func(string) (int, error) { return 2, nil },
		Ports:       func(ifaces map[int]bool, _ int) (map[int]bool, error) { return ifaces, nil },
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	waitFor(t, "the watch", func() bool { rmu.Lock(); defer rmu.Unlock(); return kick != nil })
	kick() // no Apply yet: nothing to attach (checked below: the first call has the pods)

	p.SetPods([]netip.Addr{a("10.244.1.2"), a("192.0.2.99")}) // the second is routed by the uplink: skipped
	waitFor(t, "attach to the first pod's veth", func() bool { at, _ := prog.state(); return maps.Equal(at, map[int]bool{5: true}) })
	prog.mu.Lock()
	first := prog.calls[0]
	prog.mu.Unlock()
	if !maps.Equal(first, map[int]bool{5: true}) {
		t.Fatalf("first reconcile wanted %v: it ran before the pods were known", first)
	}
	if got := value(t, m.ClassifierInterfaces); got != 1 {
		t.Fatalf("interfaces gauge %v, want 1", got)
	}
	_, calls := prog.state()
	p.SetPods([]netip.Addr{a("10.244.1.2"), a("192.0.2.99")}) // unchanged: no work
	p.SetPods([]netip.Addr{a("10.244.1.2"), a("10.244.1.3")})
	waitFor(t, "attach to the second pod's veth", func() bool { at, _ := prog.state(); return maps.Equal(at, map[int]bool{5: true, 6: true}) })
	if _, now := prog.state(); now != calls+1 {
		t.Fatalf("%d reconciles for one change of pods, want 1", now-calls)
	}

	// A route change (a pod's veth recreated at another index) wakes it.
	rmu.Lock()
	routes[1].LinkIndex = 7
	rmu.Unlock()
	kick()
	waitFor(t, "follow the new veth", func() bool { at, _ := prog.state(); return maps.Equal(at, map[int]bool{5: true, 7: true}) })

	// Drift: detached behind its back, attached again by the periodic
	// check, counted.
	prog.mu.Lock()
	delete(prog.attached, 5)
	prog.mu.Unlock()
	drift := value(t, m.Drift)
	if err := p.reconcile(true); err != nil {
		t.Fatal(err)
	}
	if at, _ := prog.state(); !at[5] {
		t.Fatal("not attached again")
	}
	if got := value(t, m.Drift); got != drift+1 {
		t.Fatalf("drift counter %v, want %v", got, drift+1)
	}
	// A change that attaches is not drift.
	if err := p.reconcile(false); err != nil {
		t.Fatal(err)
	}
	if got := value(t, m.Drift); got != drift+1 {
		t.Fatalf("drift counter %v after a quiet reconcile, want %v", got, drift+1)
	}

	// A failed attach is retried without another event.
	prog.mu.Lock()
	prog.fail = errors.New("boom")
	prog.mu.Unlock()
	_, before := prog.state()
	p.SetPods([]netip.Addr{a("10.244.1.2")})
	waitFor(t, "a retry after the failure", func() bool { _, n := prog.state(); return n >= before+2 })
	prog.mu.Lock()
	prog.fail = nil
	prog.mu.Unlock()
	waitFor(t, "the retry to succeed", func() bool { at, _ := prog.state(); return maps.Equal(at, map[int]bool{5: true}) })
}
