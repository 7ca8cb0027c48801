package operator

import (
	"bufio"
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
	"go.uber.org/zap/zaptest"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// serve answers every connection on l with reply(probe line).
func serve(t *testing.T, reply func(line string) []byte) (port int, stop func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			line, _ := bufio.NewReader(c).ReadString('\n')
			if b := reply(line); b != nil {
				c.Write(b) //nolint:errcheck
			}
			c.Close()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port, func() { l.Close() }
}

// TestDialProbe: only an authenticated reply to this very probe is an
// answer; a refused connection is told apart; a listener that accepts and
// closes, or answers without the key, is silent (a pod or a scanner on the
// port proves nothing).
func TestDialProbe(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	pr := probe.Probe{Role: probe.RoleLeader, Identity: "op-0", Term: 1, Counter: 5, Node: lo}
	for name, tc := range map[string]struct {
		reply func(line string) []byte
		want  answer
		beat  uint64
	}{
		"agent": {func(line string) []byte {
			p, err := probe.Decode(testKey, line)
			if err != nil {
				return nil
			}
			return probe.EncodeReply(testKey, p, 9)
		}, answered, 9},
		"accepts and closes": {func(string) []byte { return nil }, silent, 0},
		"agent without key":  {func(string) []byte { return []byte(probe.NoKey) }, refused, 0},
		"echoes the probe":   {func(line string) []byte { return []byte(line) }, silent, 0},
		"other key": {func(line string) []byte {
			return probe.EncodeReply([]byte("some other key 0123"), pr, 9)
		}, silent, 0},
	} {
		t.Run(name, func(t *testing.T) {
			port, stop := serve(t, tc.reply)
			defer stop()
			if a, beat := dialProbe(context.Background(), lo, port, time.Second, pr, testKey); a != tc.want || beat != tc.beat {
				t.Fatalf("dialProbe = %v, %d; want %v, %d", a, beat, tc.want, tc.beat)
			}
		})
	}
	port, stop := serve(t, func(string) []byte { return nil })
	stop()
	if a, _ := dialProbe(context.Background(), lo, port, time.Second, pr, testKey); a != refused {
		t.Fatalf("closed port: %v, want refused", a)
	}
}

// TestProberTransitions: Down after Misses silent probes, after a refused
// agent outlives RefusedGrace, and when the agent answers with a heartbeat
// stuck for HeartbeatTimeout; Up again at the next live answer; each change
// reported once.
func TestProberTransitions(t *testing.T) {
	type step struct {
		after time.Duration // clock advance before the probe
		a     answer
		beat  uint64
		want  bool
	}
	s := time.Second
	for name, steps := range map[string][]step{
		"silence": {
			{0, answered, 1, true}, {0, silent, 0, true}, {0, silent, 0, true}, {0, answered, 2, true},
			{0, silent, 0, true}, {0, silent, 0, true}, {0, silent, 0, false}, {0, answered, 3, true},
		},
		"refused is alive for the grace only": {
			{0, answered, 1, true}, {2 * s, refused, 0, true}, {2 * s, refused, 0, true},
			{2 * s, refused, 0, false}, {s, answered, 2, true},
		},
		"refused from the first probe: grace from the start": {
			{0, refused, 0, true}, {4 * s, refused, 0, true}, {2 * s, refused, 0, false},
		},
		"stuck heartbeat": {
			{0, answered, 7, true}, {6 * s, answered, 7, true}, {5 * s, answered, 7, false},
			{s, answered, 8, true},
		},
		"heartbeat moving keeps it up": {
			{0, answered, 1, true}, {6 * s, answered, 2, true}, {6 * s, answered, 3, true}, {6 * s, answered, 4, true},
		},
	} {
		t.Run(name, func(t *testing.T) {
			var mu sync.Mutex
			changes := 0
			now := time.Unix(1000, 0)
			p := newProber(ProbeConfig{Port: 1, Interval: time.Millisecond, SlowInterval: time.Millisecond, Timeout: time.Millisecond,
				Misses: 3, RefusedGrace: 5 * s, HeartbeatTimeout: 10 * s},
				zaptest.NewLogger(t), nil, func() { mu.Lock(); changes++; mu.Unlock() })
			p.now = func() time.Time { return now }
			ip := netip.MustParseAddr("192.0.2.11")
			p.nodes["n1"] = &probeState{ip: ip, since: now}
			wantChanges, prev := 0, false
			for i, st := range steps {
				now = now.Add(st.after)
				p.record(context.Background(), "n1", ip, st.a, st.beat)
				if got, _ := p.health("n1"); got != st.want {
					t.Fatalf("step %d (%v after %v): healthy=%v, want %v", i, st.a, st.after, got, st.want)
				}
				if i == 0 || st.want != prev {
					wantChanges++
				}
				prev = st.want
			}
			mu.Lock()
			defer mu.Unlock()
			if changes != wantChanges {
				t.Fatalf("%d health changes reported, want %d", changes, wantChanges)
			}
		})
	}
}

// TestProbeSender: no key, no probe; a standby signs as standby; the
// leader signs with its term, and keeps doing so after it stepped down
// (an API server outage leaves no leader) until its Lease cache shows
// another holder or a newer term.
func TestProbeSender(t *testing.T) {
	cl := newCluster(t)
	c := cl.controllerWith(t, func(cfg *Config) { cfg.Identity = "op-1" })
	if _, _, _, _, ok := c.probeSender(); ok {
		t.Fatal("probes sent without a key")
	}
	k := append([]byte(nil), testKey...)
	c.probeKey.Store(&k)
	if _, role, id, _, ok := c.probeSender(); !ok || role != probe.RoleStandby || id != "op-1" {
		t.Fatalf("standby signs as %s %s %v", role, id, ok)
	}
	c.term.Store(&leaderTerm{term: 4})
	if _, role, _, term, _ := c.probeSender(); role != probe.RoleLeader || term != 4 {
		t.Fatalf("leader signs as %s term %d", role, term)
	}
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: agentNamespace, Name: DefaultLeaderLease},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To("op-1"), LeaseTransitions: ptr.To(int32(4))}}
	if err := c.leases.Add(lease); err != nil {
		t.Fatal(err)
	}
	if _, role, _, _, _ := c.probeSender(); role != probe.RoleLeader {
		t.Fatalf("still holding the Lease: %s", role)
	}
	other := lease.DeepCopy()
	other.Spec.HolderIdentity, other.Spec.LeaseTransitions = ptr.To("op-0"), ptr.To(int32(5))
	if err := c.leases.Update(other); err != nil {
		t.Fatal(err)
	}
	if _, role, _, _, _ := c.probeSender(); role != probe.RoleStandby {
		t.Fatalf("another replica leads: %s", role)
	}
}

// loadProbeKeyOnce runs the replica's probe key loop until its first load
// or failure.
func loadProbeKeyOnce(c *testController) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := c.probeKeyLoop()
	var err error
	loaded, failed := l.Loaded, l.Failed
	l.Loaded = func(k []byte, created bool) { loaded(k, created); cancel() }
	l.Failed = func(e error) { failed(e); err = e; cancel() }
	kube.KeepProbeKey(ctx, l)
	return err
}

// TestProbeKey: the first replica creates the Secret with a random key, the
// others load the same key; a key too short is refused (no probes).
func TestProbeKey(t *testing.T) {
	cl := newCluster(t)
	a := cl.controllerWith(t, func(cfg *Config) { cfg.Identity = "op-0" })
	b := cl.controllerWith(t, func(cfg *Config) { cfg.Identity = "op-1" })
	ctx := context.Background()
	for _, c := range []*testController{a, b} {
		if err := loadProbeKeyOnce(c); err != nil {
			t.Fatal(err)
		}
	}
	ka, kb := *a.probeKey.Load(), *b.probeKey.Load()
	if len(ka) < probe.MinKeyLen || string(ka) != string(kb) {
		t.Fatalf("keys %x and %x: want one shared random key", ka, kb)
	}
	s, err := cl.core.CoreV1().Secrets(agentNamespace).Get(ctx, probe.SecretName, metav1.GetOptions{})
	if err != nil || string(s.Data[probe.SecretKey]) != string(ka) {
		t.Fatalf("secret: %v %v", s, err)
	}
	s.Data[probe.SecretKey] = []byte("short")
	if _, err := cl.core.CoreV1().Secrets(agentNamespace).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c := cl.controllerWith(t, func(cfg *Config) { cfg.Identity = "op-2" })
	if err := loadProbeKeyOnce(c); err == nil || c.probeKey.Load() != nil {
		t.Fatalf("short key accepted: %v", err)
	}
}

// TestProberHurry: a hurried node is probed at the next round, and its
// next answer asks for a reconcile even though its health did not change;
// a node whose last probe went unanswered is suspect until it answers.
func TestProberHurry(t *testing.T) {
	changes := 0
	now := time.Unix(1000, 0)
	p := newProber(DefaultProbeConfig, zaptest.NewLogger(t), nil, func() { changes++ })
	p.now = func() time.Time { return now }
	ip := netip.MustParseAddr("192.0.2.11")
	p.nodes["n1"] = &probeState{ip: ip, since: now, known: true, healthy: true, lastAlive: now, next: now.Add(time.Second)}
	p.record(context.Background(), "n1", ip, answered, 1)
	if changes != 0 || p.suspect("n1") {
		t.Fatalf("an unhurried answer: %d reconciles, suspect %v", changes, p.suspect("n1"))
	}
	p.record(context.Background(), "n1", ip, silent, 0)
	if !p.suspect("n1") {
		t.Fatal("a node whose last probe went unanswered is not suspect")
	}
	p.hurry("n1")
	if s := p.nodes["n1"]; !s.urgent || !s.next.IsZero() {
		t.Fatalf("hurried: %+v", s)
	}
	p.record(context.Background(), "n1", ip, silent, 0)
	if changes != 0 {
		t.Fatal("a silent probe of a hurried node asked for a reconcile")
	}
	p.record(context.Background(), "n1", ip, answered, 1)
	p.record(context.Background(), "n1", ip, answered, 1)
	if changes != 1 || p.suspect("n1") {
		t.Fatalf("%d reconciles after the hurried node answered (want 1), suspect %v", changes, p.suspect("n1"))
	}
}

// TestProberNewHolderProbedFast: a node probed at the slow interval that
// becomes a holder is probed at once, not at the end of its slow interval.
func TestProberNewHolderProbedFast(t *testing.T) {
	now := time.Unix(1000, 0)
	ip := netip.MustParseAddr("192.0.2.11")
	fast := false
	p := newProber(DefaultProbeConfig, zaptest.NewLogger(t), func() []probeTarget {
		return []probeTarget{{name: "n1", ip: ip, fast: fast}}
	}, func() {})
	p.now = func() time.Time { return now }
	var mu sync.Mutex
	probes := 0
	p.dial = func(context.Context, netip.Addr, int, time.Duration, probe.Probe, []byte) (answer, uint64) {
		mu.Lock()
		probes++
		mu.Unlock()
		return answered, 1
	}
	p.sender = func() ([]byte, string, string, int64, bool) { return testKey, probe.RoleLeader, "op-0", 1, true }
	count := func() int { mu.Lock(); defer mu.Unlock(); return probes }
	// Healthy, probed at the slow interval: its next probe is 1 s away.
	p.nodes["n1"] = &probeState{ip: ip, since: now, known: true, healthy: true, lastAlive: now, next: now.Add(time.Second)}
	now = now.Add(100 * time.Millisecond)
	p.round(context.Background())
	if count() != 0 {
		t.Fatal("a slow-probed node probed before its slow interval")
	}
	fast = true // it became a holder
	p.round(context.Background())
	eventually(t, "the new holder probed at once", func() bool { return count() == 1 })
}

// TestProberLateProbeIsNoMiss: a probe that came back silent long after its
// timeout (this replica did not run in time; the agent's reply may have
// been waiting unread) is neither a miss nor an answer: a node answering
// the leader's probes is not declared Down because the leader was starved.
// A silent probe on time is a miss.
func TestProberLateProbeIsNoMiss(t *testing.T) {
	now := time.Unix(1000, 0)
	ip := netip.MustParseAddr("192.0.2.11")
	p := newProber(DefaultProbeConfig, zaptest.NewLogger(t), func() []probeTarget {
		return []probeTarget{{name: "n1", ip: ip, fast: true}}
	}, func() {})
	var mu sync.Mutex
	p.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	took := 3 * DefaultProbeConfig.Timeout
	p.dial = func(context.Context, netip.Addr, int, time.Duration, probe.Probe, []byte) (answer, uint64) {
		mu.Lock()
		now = now.Add(took)
		mu.Unlock()
		return silent, 0
	}
	p.sender = func() ([]byte, string, string, int64, bool) { return testKey, probe.RoleLeader, "op-0", 1, true }
	p.nodes["n1"] = &probeState{ip: ip, since: now, known: true, healthy: true, lastAlive: now, fast: true}
	for range DefaultProbeConfig.Misses + 2 {
		p.probe(context.Background(), "n1", ip)
	}
	p.mu.Lock()
	misses := p.nodes["n1"].misses
	p.mu.Unlock()
	if h, _ := p.health("n1"); !h || misses != 0 {
		t.Fatalf("late probes counted as misses: healthy %v, %d misses", h, misses)
	}
	took = DefaultProbeConfig.Timeout
	for range DefaultProbeConfig.Misses {
		p.probe(context.Background(), "n1", ip)
	}
	if h, _ := p.health("n1"); h {
		t.Fatal("silent probes on time did not make the node Down")
	}
}
