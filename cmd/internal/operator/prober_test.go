package operator

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// TestDialProbe: an accepted connection and a refused one both count as
// alive (the kernel refuses while the agent restarts).
func TestDialProbe(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	lo := netip.MustParseAddr("127.0.0.1")
	if !dialProbe(context.Background(), lo, port, time.Second) {
		t.Fatal("accepted probe counted as a miss")
	}
	l.Close()
	if !dialProbe(context.Background(), lo, port, time.Second) {
		t.Fatal("refused probe (agent down, node up) counted as a miss")
	}
}

// TestProberTransitions: healthy after one answer, Down only after Misses
// silent probes in a row, healthy again at the next answer; each change is
// reported once.
func TestProberTransitions(t *testing.T) {
	var mu sync.Mutex
	answers := []bool{true, false, false, true, false, false, false, true}
	i := 0
	changes := 0
	p := newProber(ProbeConfig{Port: 1, Interval: time.Millisecond, SlowInterval: time.Millisecond, Timeout: time.Millisecond, Misses: 3},
		zaptest.NewLogger(t), func() []probeTarget {
			return []probeTarget{{name: "n1", ip: netip.MustParseAddr("192.0.2.11"), fast: true}}
		},
		func() { mu.Lock(); changes++; mu.Unlock() })
	p.dial = func(context.Context, netip.Addr, int, time.Duration) bool {
		mu.Lock()
		defer mu.Unlock()
		a := answers[i]
		i++
		return a
	}
	ip := netip.MustParseAddr("192.0.2.11")
	p.nodes["n1"] = &probeState{ip: ip}
	// answers:     up    miss  miss  up    miss  miss  miss   up
	want := []bool{true, true, true, true, true, true, false, true}
	for step, w := range want {
		p.probe(context.Background(), "n1", ip)
		if got, _ := p.health("n1"); got != w {
			t.Fatalf("after probe %d (answer %v): healthy=%v, want %v", step, answers[step], got, w)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if changes != 3 {
		t.Fatalf("%d health changes reported, want 3 (Up, Down, Up)", changes)
	}
}
