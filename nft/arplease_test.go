package nft

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// Pure parts of the ARP lease.

func TestARPLeaseConfig(t *testing.T) {
	for _, c := range []struct{ in, want time.Duration }{
		{0, DefaultARPLease},
		{-1, -1},
		{time.Second, time.Second},
	} {
		cfg, err := Config{Uplink: "eth0", ARPLease: c.in}.withDefaults()
		if err != nil || cfg.ARPLease != c.want {
			t.Errorf("ARPLease %v: got %v %v, want %v", c.in, cfg.ARPLease, err, c.want)
		}
	}
	if DefaultARPLease != 300*time.Millisecond {
		t.Errorf("default lease %v", DefaultARPLease)
	}
	if (&arpLease{cfg: Config{ARPLease: -1}}).enabled() {
		t.Error("a negative lease is enabled")
	}
}

func TestARPElements(t *testing.T) {
	ips := addrList("192.0.2.100", "192.0.2.101")
	for _, c := range []struct{ in, want time.Duration }{
		{0, 0},
		{300 * time.Millisecond, 300 * time.Millisecond},
		{1500 * time.Microsecond, 2 * time.Millisecond},
		{100 * time.Microsecond, time.Millisecond},
	} {
		els := arpElements(ips, c.in)
		if len(els) != 2 || string(els[1].Key) != "\xc0\x00\x02\x65" || els[0].Timeout != c.want || els[1].Timeout != c.want {
			t.Errorf("timeout %v: %+v", c.in, els)
		}
	}
	// The rule's expressions as read back compare equal to the ones
	// written (sets named, IDs aside).
	held := &nftables.Set{Name: arpSetHeld, ID: 7}
	live := &nftables.Set{Name: arpSetLive, ID: 8}
	got := normalize(arpRuleExprs(held, live))
	want := normalize(arpRuleExprs(&nftables.Set{Name: arpSetHeld}, &nftables.Set{Name: arpSetLive}))
	if len(got) != 6 || !reflect.DeepEqual(got, want) {
		t.Fatalf("rule exprs %#v", got)
	}
	got = normalize(arpAskRuleExprs(&nftables.Set{Name: arpSetAsking, ID: 9}))
	want = normalize(arpAskRuleExprs(&nftables.Set{Name: arpSetAsking}))
	if len(got) != 6 || !reflect.DeepEqual(got, want) {
		t.Fatalf("ask rule exprs %#v", got)
	}
	// The request is op 1, big-endian, at offset 6 of the ARP header.
	if p, ok := got[0].(*expr.Payload); !ok || p.Base != expr.PayloadBaseNetworkHeader || p.Offset != 6 || p.Len != 2 {
		t.Fatalf("ask rule loads %#v", got[0])
	}
	if c, ok := got[1].(*expr.Cmp); !ok || c.Op != expr.CmpOpEq || string(c.Data) != "\x00\x01" {
		t.Fatalf("ask rule compares %#v", got[1])
	}
}

// TestARPRulesOK: the chain is ours only with both rules, in order, with
// their comments; the one rule of an older version is not.
func TestARPRulesOK(t *testing.T) {
	ask := &nftables.Rule{Exprs: arpAskRuleExprs(&nftables.Set{Name: arpSetAsking}), UserData: arpAskRuleUserData()}
	drop := &nftables.Rule{Exprs: arpRuleExprs(&nftables.Set{Name: arpSetHeld}, &nftables.Set{Name: arpSetLive}), UserData: arpRuleUserData()}
	noComment := *ask
	noComment.UserData = nil
	otherSet := &nftables.Rule{Exprs: arpAskRuleExprs(&nftables.Set{Name: arpSetLive}), UserData: arpAskRuleUserData()}
	for _, c := range []struct {
		name  string
		rules []*nftables.Rule
		want  bool
	}{
		{"both, in order", []*nftables.Rule{ask, drop}, true},
		{"an older version's", []*nftables.Rule{drop}, false},
		{"in the other order", []*nftables.Rule{drop, ask}, false},
		{"without a comment", []*nftables.Rule{&noComment, drop}, false},
		{"on another set", []*nftables.Rule{otherSet, drop}, false},
		{"one more", []*nftables.Rule{ask, drop, drop}, false},
		{"none", nil, false},
	} {
		if got := arpRulesOK(c.rules); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

// Kernel tests, in the release lab (see relLab).

const (
	arpTable = "egressnat"
	// arpSlack absorbs scheduling (the prober's and the keeper's) around
	// the lease's end.
	arpSlack = 100 * time.Millisecond
)

func arpDataplane(l *relLab, lease time.Duration) *Dataplane {
	l.t.Helper()
	d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd("gw"), Logger: zaptest.NewLogger(l.t), ARPProbeWait: -1, ARPLease: lease})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { d.Close() })
	return d
}

// arpList lists the arp table in gw; "" when there is none.
func arpList(l *relLab, what ...string) string {
	l.t.Helper()
	args := append([]string{"ip", "netns", "exec", l.ns("gw"), "nft", "list"}, what...)
	if len(what) == 0 {
		args = append(args, "table", "arp", arpTable)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No such file or directory") {
			return ""
		}
		l.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

var setElements = regexp.MustCompile(`elements = \{([^}]*)\}`)

// arpSet returns the IPs of an arp set in gw (nil: no table).
func arpSet(l *relLab, name string) []string {
	l.t.Helper()
	return arpSetIn(l, "gw", name)
}

// expectARPSets checks held and live in gw, and that asking is empty
// (nothing muted).
func expectARPSets(t *testing.T, l *relLab, when string, held, live []string) {
	t.Helper()
	if got := arpSet(l, arpSetHeld); !slices.Equal(got, held) {
		t.Fatalf("%s: held %v, want %v\n%s", when, got, held, arpList(l))
	}
	if got := arpSet(l, arpSetLive); !slices.Equal(got, live) {
		t.Fatalf("%s: live %v, want %v\n%s", when, got, live, arpList(l))
	}
	if got := arpSet(l, arpSetAsking); len(got) != 0 {
		t.Fatalf("%s: asking %v, want none\n%s", when, got, arpList(l))
	}
}

func hasARPTable(l *relLab) bool {
	l.t.Helper()
	return strings.Contains(arpList(l, "tables", "arp"), "table arp "+arpTable)
}

// arpProber asks, from peer, who has an IP, and waits for gw's answer.
// Each request has its own sender IP (192.0.2.200-249), so that a late
// answer is never taken for another request's.
type arpProber struct {
	l       *relLab
	fd      int
	ifindex int
	mac     net.HardwareAddr
	gwMAC   net.HardwareAddr
	capture *arpCapture
	n       int
}

func newARPProber(l *relLab) *arpProber {
	l.t.Helper()
	p := &arpProber{l: l, capture: l.captureARP("peer")}
	var err error
	if p.gwMAC, err = net.ParseMAC(strings.TrimSpace(l.exec("gw", "cat", "/sys/class/net/"+relUplink+"/address"))); err != nil {
		l.t.Fatal(err)
	}
	err = l.inNS("peer", func() error {
		ifi, err := net.InterfaceByName(relUplink)
		if err != nil {
			return err
		}
		p.ifindex, p.mac = ifi.Index, ifi.HardwareAddr
		p.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { unix.Close(p.fd) })
	return p
}

// ask sends one request for target and reports when, and whether gw
// answered within wait.
func (p *arpProber) ask(target string, wait time.Duration) (time.Time, bool) {
	p.l.t.Helper()
	tip := netip.MustParseAddr(target)
	sip := netip.AddrFrom4([4]byte{192, 0, 2, byte(200 + p.n%50)})
	p.n++
	sent := time.Now()
	if err := unix.Sendto(p.fd, arpFrame(p.mac, sip, tip), 0, broadcastTo(p.ifindex)); err != nil {
		p.l.t.Fatal(err)
	}
	timeout := time.After(wait)
	for {
		select {
		case f := <-p.capture.frames:
			if f.op == arpReply && f.senderIP == tip && f.targetIP == sip && f.senderHW.String() == p.gwMAC.String() {
				return sent, true
			}
		case <-timeout:
			return sent, false
		}
	}
}

type arpProbe struct {
	at       time.Time
	answered bool
}

// probeFor asks for target every 20 ms for d.
func (p *arpProber) probeFor(target string, d time.Duration) []arpProbe {
	var out []arpProbe
	for end := time.Now().Add(d); time.Now().Before(end); {
		at, ok := p.ask(target, 40*time.Millisecond)
		out = append(out, arpProbe{at, ok})
		time.Sleep(20 * time.Millisecond)
	}
	return out
}

// arpKeeper calls KeepARP every 100 ms, as the agent does, while on.
type arpKeeper struct {
	t    *testing.T
	d    *Dataplane
	mu   sync.Mutex // held during a call: pause waits for the one in flight
	on   bool
	last time.Time // when the last successful call returned
	took []time.Duration
	done chan struct{}
}

func startKeeper(t *testing.T, d *Dataplane) *arpKeeper {
	k := &arpKeeper{t: t, d: d, on: true, done: make(chan struct{})}
	stopped := make(chan struct{})
	t.Cleanup(func() { close(k.done); <-stopped })
	go func() {
		defer close(stopped)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			k.mu.Lock()
			if k.on {
				start := time.Now()
				if err := d.KeepARP(ctxT(t)); err != nil {
					t.Errorf("KeepARP: %v", err)
				} else {
					k.last = time.Now()
					k.took = append(k.took, k.last.Sub(start))
				}
			}
			k.mu.Unlock()
			select {
			case <-k.done:
				return
			case <-tick.C:
			}
		}
	}()
	return k
}

// pause stops the calls (a frozen agent) and returns when the last one
// returned.
func (k *arpKeeper) pause() time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.on = false
	return k.last
}

// resume calls KeepARP at once and then every 100 ms again, and returns
// when the first call returned.
func (k *arpKeeper) resume() time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.on = true
	if err := k.d.KeepARP(ctxT(k.t)); err != nil {
		k.t.Fatalf("KeepARP: %v", err)
	}
	k.last = time.Now()
	return k.last
}

func (k *arpKeeper) durations() []time.Duration {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.took)
}

// keepARP calls d.KeepARP every 100 ms until the test ends, as the agent
// does: the labs' Dataplanes are an agent's, and without it the node
// stops answering ARP for its floating IPs a lease after each Apply.
func keepARP(t testing.TB, d *Dataplane) {
	done, stopped := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() { close(done); <-stopped })
	go func() {
		defer close(stopped)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if err := d.KeepARP(context.Background()); err != nil {
				t.Errorf("KeepARP: %v", err)
			}
		}
	}()
}

func arpGateway() selector.NodeState {
	return selector.NodeState{
		Policies:    []selector.PolicyState{relGateway("web", relFloat1, relServer1+"/32"), relGateway("api", relFloat2, relServer2+"/32")},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24"), netip.MustParsePrefix(relFloat2 + "/24")},
	}
}

// TestARPLease: a node answers ARP for its floating IP from the moment
// Apply adds it, as long as KeepARP renews the lease every 100 ms; once
// the calls stop (a frozen agent) it stops answering within the lease,
// before the set's garbage collection could have removed the element (it
// runs every second), and it answers again as soon as KeepARP is called
// again. Its own IP is never affected.
func TestARPLease(t *testing.T) {
	l := newRelLab(t)
	d := arpDataplane(l, 0)
	lease := d.cfg.ARPLease
	p := newARPProber(l)
	r := mustApply(t, d, arpGateway())
	if r.AddrsAdded != 2 {
		t.Fatalf("apply: %+v", r)
	}
	if _, ok := p.ask(relFloat1, time.Second); !ok {
		t.Fatal("no ARP answer right after Apply")
	}
	k := startKeeper(t, d)
	table := arpList(l)
	t.Logf("arp table after apply:\n%s", table)
	expectARPSets(t, l, "apply", []string{relFloat1, relFloat2}, []string{relFloat1, relFloat2})
	for _, want := range []string{
		"set held {\n\t\ttype ipv4_addr\n\t\telements = { ",
		"set live {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t\telements = { ",
		"set asking {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}",
		relFloat1 + " timeout 300ms expires ",
		relFloat2 + " timeout 300ms expires ",
		"type filter hook output priority filter; policy accept;\n\t\t" +
			`arp operation request arp saddr ip @asking counter packets 0 bytes 0 accept comment "` + arpAskComment + `"` + "\n\t\t" +
			`arp saddr ip @held arp saddr ip != @live counter packets 0 bytes 0 drop comment "` + arpComment + `"`,
	} {
		if !strings.Contains(table, want) {
			t.Errorf("arp table lacks %q", want)
		}
	}
	mustVerify(t, d, "apply")

	for cycle := range 3 {
		// Kept: every request is answered, well past the lease.
		for _, pr := range p.probeFor(relFloat1, 3*lease) {
			if !pr.answered {
				t.Fatalf("cycle %d: a request was not answered while KeepARP runs", cycle)
			}
		}
		// Frozen.
		last := k.pause()
		probes := p.probeFor(relFloat1, lease+4*arpSlack)
		var firstMiss time.Duration = -1
		answeredLate := false
		for _, pr := range probes {
			since := pr.at.Sub(last)
			if !pr.answered && firstMiss < 0 {
				firstMiss = since
			}
			if pr.answered && since > lease+arpSlack {
				t.Errorf("cycle %d: answered a request sent %v after the last KeepARP (lease %v)", cycle, since, lease)
			}
			if !pr.answered && since < lease-arpSlack {
				t.Errorf("cycle %d: no answer to a request sent %v after the last KeepARP, within the lease %v", cycle, since, lease)
			}
			answeredLate = answeredLate || pr.answered && since > lease/2
		}
		t.Logf("cycle %d: %d requests after the last KeepARP; first unanswered one sent %v after it", cycle, len(probes), firstMiss)
		if firstMiss < 0 {
			t.Fatalf("cycle %d: still answering %v after the last KeepARP", cycle, lease+4*arpSlack)
		}
		if !answeredLate {
			t.Errorf("cycle %d: stopped answering before half the lease", cycle)
		}
		// The node's own address is answered all the same.
		if _, ok := p.ask(relGW, time.Second); !ok {
			t.Fatalf("cycle %d: the node's own IP is not answered", cycle)
		}
		// Thawed: answered again at once.
		k.resume()
		if _, ok := p.ask(relFloat1, time.Second); !ok {
			t.Fatalf("cycle %d: not answered after KeepARP resumed", cycle)
		}
	}
	out := arpList(l, "chain", "arp", arpTable, arpChain)
	if m := regexp.MustCompile(`counter packets (\d+) bytes \d+ drop`).FindStringSubmatch(out); m == nil || m[1] == "0" {
		t.Errorf("the drop rule counted nothing:\n%s", out)
	}
	took := k.durations()
	slices.Sort(took)
	if len(took) > 0 {
		t.Logf("KeepARP: %d calls, median %v, max %v", len(took), took[len(took)/2], took[len(took)-1])
	}

	// KeepARP never waits for the Dataplane's lock (an Apply in progress).
	d.mu.Lock()
	done := make(chan error, 1)
	go func() { done <- d.KeepARP(ctxT(t)) }()
	select {
	case err := <-done:
		d.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		d.mu.Unlock()
		t.Fatal("KeepARP waited for the Dataplane's lock")
	}
}

// TestARPLeaseRelease: IPs released or given up leave held and live; an IP
// taken back comes back; Cleanup deletes the arp table, and KeepARP
// after it does not bring it back.
func TestARPLeaseRelease(t *testing.T) {
	l := newRelLab(t)
	d := arpDataplane(l, 0)
	st := arpGateway()
	mustApply(t, d, st)
	expectARPSets(t, l, "apply", []string{relFloat1, relFloat2}, []string{relFloat1, relFloat2})

	rr, err := d.Release(ctxT(t), addrList(relFloat1))
	if err != nil || !slices.Equal(rr.AddrsRemoved, addrList(relFloat1)) {
		t.Fatalf("release: %+v %v", rr, err)
	}
	expectARPSets(t, l, "release", []string{relFloat2}, []string{relFloat2})
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectARPSets(t, l, "keep after release", []string{relFloat2}, []string{relFloat2})

	// Taken back, then the other one given up by an Apply.
	mustApply(t, d, st)
	expectARPSets(t, l, "taken back", []string{relFloat1, relFloat2}, []string{relFloat1, relFloat2})
	moved := st
	moved.Policies = slices.Clone(st.Policies)
	moved.Policies[1].Mode, moved.Policies[1].NextHop = selector.ModeReroute, netip.MustParseAddr(relPeer)
	moved.FloatingIPs = moved.FloatingIPs[:1]
	if r := mustApply(t, d, moved); r.AddrsDeleted != 1 {
		t.Fatalf("apply giving %s up: %+v", relFloat2, r)
	}
	expectARPSets(t, l, "given up", []string{relFloat1}, []string{relFloat1})

	// A restarted agent (a new Dataplane) releases everything.
	d2 := arpDataplane(l, 0)
	if err := d2.ReleaseFloating(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectARPSets(t, l, "release floating", nil, nil)
	if !hasARPTable(l) {
		t.Fatal("the arp table went with ReleaseFloating")
	}

	if err := d2.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if hasARPTable(l) {
		t.Fatalf("arp table after Cleanup:\n%s", arpList(l))
	}
	if err := d2.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if hasARPTable(l) {
		t.Fatal("KeepARP after Cleanup brought the arp table back")
	}
	// Cleanup again: nothing to delete.
	if err := d2.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

// TestARPLeaseRepair: KeepARP rewrites an arp table flushed away (nft
// flush ruleset, delete table) or refills its sets; the next full Apply
// repairs anything else (a flushed chain, an element that is not ours);
// a restarted agent renews what its predecessor held before its first
// Apply.
func TestARPLeaseRepair(t *testing.T) {
	l := newRelLab(t)
	d := arpDataplane(l, 0)
	p := newARPProber(l)
	st := arpGateway()
	mustApply(t, d, st)
	both := []string{relFloat1, relFloat2}
	want := arpList(l)
	rules := `arp operation request arp saddr ip @asking counter accept comment "` + arpAskComment + `"` + "\n\t\t" +
		`arp saddr ip @held arp saddr ip != @live counter drop comment "` + arpComment + `"`
	check := func(when string) {
		t.Helper()
		expectARPSets(t, l, when, both, both)
		if out := normalizeListing(arpList(l)); !strings.Contains(out, rules) || strings.Count(out, "arp saddr ip") != 3 {
			t.Fatalf("%s: rules missing:\n%s", when, out)
		}
		if _, ok := p.ask(relFloat1, time.Second); !ok {
			t.Fatalf("%s: not answered", when)
		}
	}
	check("apply")

	for _, damage := range [][]string{
		{"flush", "ruleset"},
		{"delete", "table", "arp", arpTable},
		{"flush", "set", "arp", arpTable, arpSetHeld},
		{"flush", "set", "arp", arpTable, arpSetLive},
	} {
		_, _ = exec.Command("ip", append([]string{"netns", "exec", l.ns("gw"), "nft"}, damage...)...).CombinedOutput()
		if err := d.KeepARP(ctxT(t)); err != nil {
			t.Fatalf("KeepARP after nft %s: %v", strings.Join(damage, " "), err)
		}
		check("KeepARP after nft " + strings.Join(damage, " "))
	}
	if got := arpList(l); normalizeListing(got) != normalizeListing(want) {
		t.Errorf("table rewritten differs:\n%s\nwant\n%s", got, want)
	}
	// The ip table went with the ruleset: Verify sees it, the next Apply
	// puts it back.
	if drift, err := d.Verify(ctxT(t)); err != nil || drift == "" {
		t.Fatalf("verify after nft flush ruleset: %q %v", drift, err)
	}
	mustApply(t, d, st)
	mustVerify(t, d, "apply after the flush")

	// What KeepARP does not see, a full Apply repairs.
	l.exec("gw", "nft", "flush", "chain", "arp", arpTable, arpChain)
	l.exec("gw", "nft", "add", "element", "arp", arpTable, arpSetHeld, "{ 192.0.2.150 }")
	d.Recheck()
	mustApply(t, d, st)
	check("apply after a flushed chain")
	l.exec("gw", "nft", "add", "element", "arp", arpTable, arpSetHeld, "{ 192.0.2.150 }")
	l.exec("gw", "nft", "add", "set", "arp", arpTable, "extra", "{ type ipv4_addr; }")
	d.Recheck()
	mustApply(t, d, st)
	check("apply after foreign additions")
	if out := arpList(l); strings.Contains(out, "192.0.2.150") || strings.Contains(out, "extra") {
		t.Fatalf("foreign additions kept:\n%s", out)
	}

	// A restarted agent renews the leases before its first Apply.
	l.exec("gw", "nft", "flush", "set", "arp", arpTable, arpSetLive)
	if _, ok := p.ask(relFloat1, 200*time.Millisecond); ok {
		t.Fatal("answered without a lease")
	}
	d2 := arpDataplane(l, 0)
	if err := d2.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	check("KeepARP of a restarted agent")
}

var (
	listedExpires  = regexp.MustCompile(` expires [0-9a-z]+`)
	listedCounters = regexp.MustCompile(`counter packets \d+ bytes \d+`)
)

// normalizeListing drops what changes by itself from an nft listing:
// expiry times and counters.
func normalizeListing(s string) string {
	return listedCounters.ReplaceAllString(listedExpires.ReplaceAllString(s, ""), "counter")
}

// TestARPLeaseDisabled: with a negative lease there is no arp table (one
// left by a run with the lease is deleted by the next full Apply) and the
// node answers ARP for its floating IPs without KeepARP.
func TestARPLeaseDisabled(t *testing.T) {
	l := newRelLab(t)
	p := newARPProber(l)
	d := arpDataplane(l, -1)
	st := arpGateway()
	mustApply(t, d, st)
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if hasARPTable(l) {
		t.Fatalf("arp table with the lease disabled:\n%s", arpList(l))
	}
	time.Sleep(DefaultARPLease + arpSlack)
	if _, ok := p.ask(relFloat1, time.Second); !ok {
		t.Fatal("not answered with the lease disabled")
	}
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	if hasARPTable(l) {
		t.Fatal("Release created an arp table")
	}

	// Enabled by another Dataplane, then disabled again.
	on := arpDataplane(l, 0)
	mustApply(t, on, st)
	if !hasARPTable(l) {
		t.Fatal("no arp table with the lease enabled")
	}
	d.Recheck()
	mustApply(t, d, st)
	if hasARPTable(l) {
		t.Fatalf("the arp table stayed with the lease disabled:\n%s", arpList(l))
	}
	time.Sleep(DefaultARPLease + arpSlack)
	if _, ok := p.ask(relFloat1, time.Second); !ok {
		t.Fatal("not answered once the lease is disabled")
	}
}

// TestKeepARPCost measures one KeepARP call (two floating IPs held).
func TestKeepARPCost(t *testing.T) {
	l := newRelLab(t)
	d := arpDataplane(l, time.Second)
	mustApply(t, d, arpGateway())
	const n = 200
	start := time.Now()
	for range n {
		if err := d.KeepARP(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("KeepARP: %v per call (%d calls)", time.Since(start)/n, n)
	expectARPSets(t, l, "after keeping", []string{relFloat1, relFloat2}, []string{relFloat1, relFloat2})
}

// TestARPLeaseNotRevived: only KeepARP renews the lease of an IP already
// held. After the lease ran out (the agent stopped), neither the release of
// another IP (which rewrites the arp table) nor an Apply brings it back:
// the IP may have moved meanwhile. An IP an Apply adds gets its lease at
// once; KeepARP renews the others.
func TestARPLeaseNotRevived(t *testing.T) {
	l := newRelLab(t)
	d := arpDataplane(l, 0)
	lease := d.cfg.ARPLease
	p := newARPProber(l)
	st := arpGateway() // relFloat1 and relFloat2
	mustApply(t, d, st)
	for _, ip := range []string{relFloat1, relFloat2} {
		if _, ok := p.ask(ip, time.Second); !ok {
			t.Fatalf("%s not answered right after the Apply", ip)
		}
	}
	// The agent stops: no KeepARP; the leases run out.
	time.Sleep(lease + arpSlack)
	if _, ok := p.ask(relFloat2, 2*arpSlack); ok {
		t.Fatal("answered after the lease ran out")
	}
	// It resumes and releases relFloat1 first (it moved): relFloat2's
	// lease stays out.
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	if _, ok := p.ask(relFloat2, 2*arpSlack); ok {
		t.Fatal("the release of another IP brought the lease back")
	}
	// An Apply that still holds relFloat2 and takes relFloat1 back: the
	// taken IP is answered, the kept one not until KeepARP.
	mustApply(t, d, st)
	if _, ok := p.ask(relFloat1, time.Second); !ok {
		t.Fatal("an IP the Apply added is not answered")
	}
	if _, ok := p.ask(relFloat2, 2*arpSlack); ok {
		t.Fatal("an Apply brought back a lease that ran out")
	}
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if _, ok := p.ask(relFloat2, time.Second); !ok {
		t.Fatal("not answered after KeepARP")
	}
}
