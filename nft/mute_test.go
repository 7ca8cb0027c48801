package nft

import (
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// Muted floating IPs (selector.NodeState.Muted): held on the uplink but
// neither answered for by ARP nor announced, for a make-before-break
// handover.

// Pure parts.

func TestMuteChanges(t *testing.T) {
	x, y, z := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101"), netip.MustParseAddr("192.0.2.102")
	for _, c := range []struct {
		name                string
		held, was, muted    []netip.Addr
		wantNow, wantUnmute []netip.Addr
	}{
		{"nothing muted", []netip.Addr{x, y}, nil, nil, nil, nil},
		{"muted anew", []netip.Addr{x, y}, nil, []netip.Addr{x}, []netip.Addr{x}, nil},
		{"still muted", []netip.Addr{x, y}, []netip.Addr{x}, []netip.Addr{x}, []netip.Addr{x}, nil},
		{"unmuted", []netip.Addr{x, y}, []netip.Addr{x}, nil, nil, []netip.Addr{x}},
		{"one of two unmuted", []netip.Addr{x, y, z}, []netip.Addr{x, z}, []netip.Addr{z}, []netip.Addr{z}, []netip.Addr{x}},
		// Given up (or not taken: a conflict) while muted: neither.
		{"muted, not held", []netip.Addr{y}, []netip.Addr{x}, []netip.Addr{x}, nil, nil},
		{"was muted, not held", []netip.Addr{y}, []netip.Addr{x}, nil, nil, nil},
	} {
		now, unmuted := muteChanges(c.held, c.was, c.muted)
		if !slices.Equal(now, c.wantNow) || !slices.Equal(unmuted, c.wantUnmute) {
			t.Errorf("%s: muted %v unmuted %v, want %v %v", c.name, now, unmuted, c.wantNow, c.wantUnmute)
		}
	}
}

func TestMutedOf(t *testing.T) {
	floating := []netip.Prefix{netip.MustParsePrefix("192.0.2.100/24"), netip.MustParsePrefix("192.0.2.101/24")}
	got, err := mutedOf([]netip.Addr{
		netip.MustParseAddr("::ffff:192.0.2.101"), // mapped: unmapped
		netip.MustParseAddr("192.0.2.100"),
		netip.MustParseAddr("192.0.2.101"), // twice
		netip.MustParseAddr("192.0.2.102"), // not held: left out
	}, floating)
	if err != nil || !slices.Equal(got, addrList("192.0.2.100", "192.0.2.101")) {
		t.Fatalf("mutedOf: %v %v", got, err)
	}
	if _, err := mutedOf([]netip.Addr{netip.MustParseAddr("2001:db8::1")}, floating); err == nil || !strings.Contains(err.Error(), "muted ip 2001:db8::1 is not ipv4") {
		t.Fatalf("an ipv6 muted ip: %v", err)
	}
	n, err := normalizeState(selector.NodeState{FloatingIPs: floating, Muted: addrList("192.0.2.101", "192.0.2.9")})
	if err != nil || !slices.Equal(n.muted, addrList("192.0.2.101")) {
		t.Fatalf("normalizeState: %+v %v", n, err)
	}
}

// TestMutedLeases: a muted IP's lease is in asking, never in live,
// computed as a live lease would be (a full one asked for, or what is left
// of the last full one), and kept in the lease records across the mute;
// fresh is false for it (no gratuitous ARP repeat).
func TestMutedLeases(t *testing.T) {
	const lease = 300 * time.Millisecond
	x, y := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101")
	a := &arpLease{cfg: Config{ARPLease: lease}}
	start := time.Now()
	both := []netip.Addr{x, y}
	a.leasesWritten(both, both, nil, start)
	if !a.fresh(x) || !a.fresh(y) || len(a.muted) != 0 {
		t.Fatalf("unmuted: fresh %v %v, muted %v", a.fresh(x), a.fresh(y), a.muted)
	}
	// x muted: a full lease asked for both (KeepARP) gives y one in live,
	// x one in asking.
	live, asking := a.leaseElements(both, both, []netip.Addr{x}, start)
	expectLeases(t, "KeepARP, x muted", live, asking, []leaseWant{{y, lease}}, []leaseWant{{x, lease}})
	a.leasesWritten(both, both, []netip.Addr{x}, start)
	if a.fresh(x) || !a.fresh(y) || !slices.Equal(a.muted, []netip.Addr{x}) || !slices.Equal(a.held, both) {
		t.Fatalf("%s muted: fresh %v %v, muted %v, held %v", x, a.fresh(x), a.fresh(y), a.muted, a.held)
	}
	if _, ok := a.leases[x]; !ok {
		t.Fatal("the muted IP's lease record is gone")
	}
	// What is left of a lease (no full lease asked): in asking for x.
	live, asking = a.leaseElements(both, nil, a.muted, start.Add(100*time.Millisecond))
	expectLeases(t, "what is left, x muted", live, asking, []leaseWant{{y, 200 * time.Millisecond}}, []leaseWant{{x, 200 * time.Millisecond}})
	// A write that no longer holds x forgets it was muted, and its lease.
	a.leasesWritten([]netip.Addr{y}, nil, a.muted, start)
	if _, ok := a.leases[x]; len(a.muted) != 0 || ok {
		t.Fatalf("muted %v, lease record %v after %s left held", a.muted, ok, x)
	}
	// Unmuted with a full lease: fresh again.
	a.leasesWritten(both, []netip.Addr{x}, nil, time.Now())
	if !a.fresh(x) {
		t.Fatal("unmuted with a full lease, not fresh")
	}
}

type leaseWant struct {
	ip netip.Addr
	d  time.Duration
}

func expectLeases(t *testing.T, when string, live, asking []nftables.SetElement, wantLive, wantAsking []leaseWant) {
	t.Helper()
	check := func(set string, got []nftables.SetElement, want []leaseWant) {
		t.Helper()
		ok := len(got) == len(want)
		for i := 0; ok && i < len(got); i++ {
			ok = string(got[i].Key) == string(want[i].ip.AsSlice()) && got[i].Timeout == want[i].d
		}
		if !ok {
			t.Errorf("%s: %s elements %+v, want %+v", when, set, got, want)
		}
	}
	check(arpSetLive, live, wantLive)
	check(arpSetAsking, asking, wantAsking)
}

// TestARPLeaseSplit: leaseElements puts every lease in live or, for a
// muted IP, in asking, never in both; a full lease for the IPs of full,
// what is left of the last full one for the others, none when it ran out
// or was never written: muting moves what is left to asking, unmuting
// moves it back (the Apply gives a full one then), a fresh muted IP taken
// gets a full one. With the lease disabled, the muted IPs are in asking
// without a timeout and nothing is in live.
func TestARPLeaseSplit(t *testing.T) {
	const lease = 300 * time.Millisecond
	x, y, z, w := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101"),
		netip.MustParseAddr("192.0.2.102"), netip.MustParseAddr("192.0.2.103")
	t0 := time.Now()
	ms := time.Millisecond
	a := &arpLease{cfg: Config{ARPLease: lease}, leases: map[netip.Addr]time.Time{
		x: t0, y: t0, z: t0.Add(-time.Second), // z's ran out
	}}
	all := []netip.Addr{x, y, z, w} // w: never leased
	at := t0.Add(100 * ms)
	for _, c := range []struct {
		name               string
		full, muted        []netip.Addr
		wantLive, wantAsks []leaseWant
	}{
		{"nothing muted, what is left", nil, nil,
			[]leaseWant{{x, 200 * ms}, {y, 200 * ms}}, nil},
		{"x muted: what is left moves to asking", nil, []netip.Addr{x},
			[]leaseWant{{y, 200 * ms}}, []leaseWant{{x, 200 * ms}}},
		{"all muted", nil, all,
			nil, []leaseWant{{x, 200 * ms}, {y, 200 * ms}}},
		{"a lease that ran out comes back in neither", nil, []netip.Addr{z},
			[]leaseWant{{x, 200 * ms}, {y, 200 * ms}}, nil},
		{"w taken muted: a full lease in asking", []netip.Addr{w}, []netip.Addr{w},
			[]leaseWant{{x, 200 * ms}, {y, 200 * ms}}, []leaseWant{{w, lease}}},
		{"KeepARP, x and z muted", all, []netip.Addr{x, z},
			[]leaseWant{{y, lease}, {w, lease}}, []leaseWant{{x, lease}, {z, lease}}},
		{"y unmuted: a full lease in live", []netip.Addr{y}, []netip.Addr{x},
			[]leaseWant{{y, lease}}, []leaseWant{{x, 200 * ms}}},
	} {
		live, asking := a.leaseElements(all, c.full, c.muted, at)
		expectLeases(t, c.name, live, asking, c.wantLive, c.wantAsks)
	}
	// A muted IP not held: nowhere.
	live, asking := a.leaseElements([]netip.Addr{y}, nil, []netip.Addr{x}, at)
	expectLeases(t, "muted, not held", live, asking, []leaseWant{{y, 200 * ms}}, nil)
	// All its lease ran out: none.
	live, asking = a.leaseElements(all, nil, []netip.Addr{x}, t0.Add(lease))
	expectLeases(t, "after the lease", live, asking, nil, nil)

	// Disabled: no live element, the muted IPs held in asking without a
	// timeout (what the Apply passes: hold = muted).
	off := &arpLease{cfg: Config{ARPLease: -1}, leases: a.leases}
	live, asking = off.leaseElements(all, all, []netip.Addr{x, y}, at)
	expectLeases(t, "disabled", live, asking, nil, []leaseWant{{x, 0}, {y, 0}})
	off.leasesWritten([]netip.Addr{x, y}, []netip.Addr{x, y}, []netip.Addr{x, y}, at)
	if !off.fresh(z) {
		t.Error("disabled: not fresh")
	}
}

// TestMutedShape: a change of Muted is a change of the state (the agent
// applies it) and of its shape (the full path applies it: it changes
// the arp table and the announcements).
func TestMutedShape(t *testing.T) {
	st := arpGateway()
	muted := st
	muted.Muted = addrList(relFloat1)
	if st.Equal(muted) || muted.Equal(st) {
		t.Fatal("NodeState.Equal does not see Muted")
	}
	if !muted.Equal(muted) {
		t.Fatal("a muted state differs from itself")
	}
	if sameShape(shapeOf(st), muted) || sameShape(shapeOf(muted), st) {
		t.Fatal("a change of Muted has the same shape: the incremental path would skip it")
	}
	if !sameShape(shapeOf(muted), muted) {
		t.Fatal("a muted state differs in shape from itself")
	}
}

// Kernel tests, in the release lab under the name enat-mute-.

const (
	muteZ = "192.0.2.103" // a floating IP of the peer's
	muteW = "192.0.2.104"
	// muteGrace: how long an ARP request waits for more answers after
	// the first (two hosts answering answer within microseconds).
	muteGrace = 20 * time.Millisecond
	// muteQuiet: how long an ARP request waits for an answer that
	// should not come.
	muteQuiet = 40 * time.Millisecond
)

func newMuteLab(t *testing.T) *relLab {
	t.Helper()
	return newRelLabNamed(t, "enat-mute-")
}

// muteDataplane is role's Dataplane on the lab's uplink, without KeepARP
// (see startKeeper).
func muteDataplane(l *relLab, role string, lease, probeWait time.Duration) *Dataplane {
	l.t.Helper()
	d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd(role), Logger: zaptest.NewLogger(l.t).Named(role),
		ARPLease: lease, ARPProbeWait: probeWait})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { d.Close() })
	return d
}

func labMAC(l *relLab, role string) net.HardwareAddr {
	l.t.Helper()
	mac, err := net.ParseMAC(strings.TrimSpace(l.exec(role, "cat", "/sys/class/net/"+relUplink+"/address")))
	if err != nil {
		l.t.Fatal(err)
	}
	return mac
}

// arpSetIn returns the IPs of an arp set in role (nil: no table).
func arpSetIn(l *relLab, role, name string) []string {
	l.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", l.ns(role), "nft", "list", "set", "arp", arpTable, name).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No such file or directory") {
			return nil
		}
		l.t.Fatalf("nft list set arp %s %s in %s: %v\n%s", arpTable, name, role, err, out)
	}
	m := setElements.FindStringSubmatch(string(out))
	if m == nil {
		return []string{}
	}
	var ips []string
	for _, e := range strings.Split(m[1], ",") {
		if f := strings.Fields(e); len(f) > 0 {
			ips = append(ips, f[0])
		}
	}
	slices.Sort(ips)
	return ips
}

func expectARPSetsIn(t *testing.T, l *relLab, role, when string, held, live, asking []string) {
	t.Helper()
	if got := arpSetIn(l, role, arpSetHeld); !slices.Equal(got, held) {
		t.Fatalf("%s: %s: held %v, want %v", when, role, got, held)
	}
	if got := arpSetIn(l, role, arpSetLive); !slices.Equal(got, live) {
		t.Fatalf("%s: %s: live %v, want %v", when, role, got, live)
	}
	if got := arpSetIn(l, role, arpSetAsking); !slices.Equal(got, asking) {
		t.Fatalf("%s: %s: asking %v, want %v", when, role, got, asking)
	}
}

// arpRecorder keeps every ARP frame seen on a host's uplink, with the time
// it was read.
type arpRecorder struct {
	mu      sync.Mutex
	frames  []recordedARP
	changed chan struct{} // closed (and replaced) at every frame
}

type recordedARP struct {
	at time.Time
	p  arpPacket
}

func recordARP(l *relLab, role string) *arpRecorder {
	l.t.Helper()
	c := l.captureARP(role)
	r := &arpRecorder{changed: make(chan struct{})}
	done, stopped := make(chan struct{}), make(chan struct{})
	l.t.Cleanup(func() { close(done); <-stopped }) // before the capture's
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			case p := <-c.frames:
				r.mu.Lock()
				r.frames = append(r.frames, recordedARP{time.Now(), p})
				close(r.changed)
				r.changed = make(chan struct{})
				r.mu.Unlock()
			}
		}
	}()
	return r
}

// count counts the frames read since since, from mac, that pred accepts.
func (r *arpRecorder) count(since time.Time, mac net.HardwareAddr, pred func(arpPacket) bool) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, f := range r.frames {
		if !f.at.Before(since) && f.p.senderHW.String() == mac.String() && pred(f.p) {
			n++
		}
	}
	return n
}

// waitFor waits until cond holds (checked at every frame) or timeout has
// passed, and reports whether it holds.
func (r *arpRecorder) waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		ch := r.changed
		r.mu.Unlock()
		if cond() {
			return true
		}
		select {
		case <-ch:
		case <-deadline.C:
			return cond()
		}
	}
}

func isProbe(ip string) func(arpPacket) bool {
	return func(p arpPacket) bool {
		return p.op == arpRequest && p.senderIP.IsUnspecified() && p.targetIP == netip.MustParseAddr(ip)
	}
}

// waitGARPs waits until n gratuitous ARPs for ip from mac were seen since
// since.
func waitGARPs(t *testing.T, r *arpRecorder, since time.Time, mac net.HardwareAddr, ip string, n int) {
	t.Helper()
	if !r.waitFor(garpSchedule[len(garpSchedule)-1]+3*time.Second, func() bool { return r.count(since, mac, isGARP(ip)) >= n }) {
		t.Fatalf("%d gratuitous ARPs for %s from %s seen, want %d", r.count(since, mac, isGARP(ip)), ip, mac, n)
	}
}

// arpAsker asks, from ext, who has an IP: every request has its own
// sender IP (192.0.2.160-199), so that a late answer is never taken for
// another request's.
type arpAsker struct {
	l       *relLab
	rec     *arpRecorder
	fd      int
	ifindex int
	mac     net.HardwareAddr
	n       int
}

func newARPAsker(l *relLab, rec *arpRecorder) *arpAsker {
	l.t.Helper()
	a := &arpAsker{l: l, rec: rec}
	err := l.inNS("ext", func() error {
		ifi, err := net.InterfaceByName(relUplink)
		if err != nil {
			return err
		}
		a.ifindex, a.mac = ifi.Index, ifi.HardwareAddr
		a.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { unix.Close(a.fd) })
	return a
}

// ask sends one request for target and returns the MACs that answered
// within wait (and muteGrace after the first answer), sorted.
func (a *arpAsker) ask(target string, wait time.Duration) []string {
	a.l.t.Helper()
	tip := netip.MustParseAddr(target)
	sip := netip.AddrFrom4([4]byte{192, 0, 2, byte(160 + a.n%40)})
	a.n++
	sent := time.Now()
	if err := unix.Sendto(a.fd, arpFrame(a.mac, sip, tip), 0, broadcastTo(a.ifindex)); err != nil {
		a.l.t.Fatal(err)
	}
	answers := func() []string {
		a.rec.mu.Lock()
		defer a.rec.mu.Unlock()
		var out []string
		for _, f := range a.rec.frames {
			if !f.at.Before(sent) && f.p.op == arpReply && f.p.senderIP == tip && f.p.targetIP == sip {
				out = append(out, f.p.senderHW.String())
			}
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	if a.rec.waitFor(wait, func() bool { return len(answers()) > 0 }) {
		a.rec.waitFor(muteGrace, func() bool { return false })
	}
	return answers()
}

// expectAnswers asks for target and checks who answered.
func (a *arpAsker) expectAnswers(t *testing.T, when, target string, macs ...net.HardwareAddr) {
	t.Helper()
	var want []string
	for _, m := range macs {
		want = append(want, m.String())
	}
	slices.Sort(want)
	wait := time.Second
	if len(want) == 0 {
		wait = muteQuiet
	}
	if got := a.ask(target, wait); !slices.Equal(got, want) {
		t.Fatalf("%s: ARP for %s answered by %v, want %v", when, target, got, want)
	}
}

// expectSilentWhileKept asks for target again and again until each keeper
// renewed its leases five more times: nobody answers.
func (a *arpAsker) expectSilentWhileKept(t *testing.T, when, target string, keepers ...*arpKeeper) {
	t.Helper()
	start := make([]int, len(keepers))
	for i, k := range keepers {
		start[i] = len(k.durations())
	}
	kept := func() bool {
		for i, k := range keepers {
			if len(k.durations()) < start[i]+5 {
				return false
			}
		}
		return true
	}
	asked := 0
	for deadline := time.Now().Add(10 * time.Second); !kept(); asked++ {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the keepers did not renew five times within 10 s", when)
		}
		if got := a.ask(target, muteQuiet); len(got) > 0 {
			t.Fatalf("%s: ARP for %s answered by %v (request %d, while KeepARP runs)", when, target, got, asked)
		}
	}
	t.Logf("%s: %d requests for %s unanswered over five renewals", when, asked, target)
}

func muteFloating(ips ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, ip := range ips {
		out = append(out, netip.MustParsePrefix(ip+"/24"))
	}
	return out
}

// TestMutedTaken: the handover of relFloat1 from gw (A) to peer (B). While
// A answers for it, B's probe finds it and B does not take it, muted or
// not. Once A muted it (A stops answering at once), B's probe finds it
// free and B adds it muted: nobody answers ARP for it, and B does not
// announce it. The switch: B holds it unmuted; it answers at once (its
// keeper paused: the Apply gave the lease) and announces it, without a
// new probe; then A gives it up as usual.
func TestMutedTaken(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, 200 * time.Millisecond, 400 * time.Millisecond, 600 * time.Millisecond}

	l := newMuteLab(t)
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	macA, macB := labMAC(l, "gw"), labMAC(l, "peer")
	a := muteDataplane(l, "gw", 0, 0)
	ka := startKeeper(t, a)
	b := muteDataplane(l, "peer", 0, 0)
	kb := startKeeper(t, b)

	stA := arpGateway() // relFloat1, relFloat2
	mustApply(t, a, stA)
	ask.expectAnswers(t, "A holds it", relFloat1, macA)

	// B prepares too early: A answers its probe.
	stB := selector.NodeState{FloatingIPs: muteFloating(relFloat1, muteZ), Muted: addrList(relFloat1)}
	r := mustApply(t, b, stB)
	if !slices.Equal(r.Conflicts, addrList(relFloat1)) || !slices.Equal(r.Probed, addrList(relFloat1, muteZ)) ||
		len(r.Muted) != 0 || !slices.Equal(r.Announced, addrList(muteZ)) {
		t.Fatalf("B while A answers: %+v", r)
	}
	if l.hasAddr("peer", relFloat1) {
		t.Fatal("B took an IP A answers for")
	}

	// A mutes it: no answer from then on.
	stA.Muted = addrList(relFloat1)
	if r := mustApply(t, a, stA); !slices.Equal(r.Muted, addrList(relFloat1)) || len(r.Announced) != 0 {
		t.Fatalf("A mutes: %+v", r)
	}
	ask.expectAnswers(t, "A muted it", relFloat1)

	// B prepares: probed, free, added muted (with another IP, muteW,
	// taken unmuted in the same Apply: its announcements show how long
	// those of relFloat1 would have lasted).
	stB.FloatingIPs = muteFloating(relFloat1, muteZ, muteW)
	prepared := time.Now()
	r = mustApply(t, b, stB)
	t.Logf("B prepares: %+v", r)
	if len(r.Conflicts) != 0 || !slices.Equal(r.Probed, addrList(relFloat1, muteW)) || !slices.Equal(r.Muted, addrList(relFloat1)) ||
		!slices.Equal(r.Announced, addrList(muteW)) || r.AddrsAdded != 2 {
		t.Fatalf("B prepares: %+v", r)
	}
	if !l.hasAddr("peer", relFloat1) || !l.hasAddr("gw", relFloat1) {
		t.Fatalf("both must hold it:\nA %s\nB %s", l.addrs("gw"), l.addrs("peer"))
	}
	if n := rec.count(prepared, macB, isProbe(relFloat1)); n == 0 {
		t.Fatal("B took the muted IP without an ARP probe")
	}
	expectARPSetsIn(t, l, "peer", "B prepared", []string{relFloat1, muteZ, muteW}, []string{muteZ, muteW}, []string{relFloat1})
	mustVerify(t, b, "B prepared")
	ask.expectSilentWhileKept(t, "prepared", relFloat1, ka, kb)
	ask.expectAnswers(t, "prepared", muteW, macB)
	waitGARPs(t, rec, prepared, macB, muteW, len(garpSchedule))
	if n := rec.count(prepared, macB, isGARP(relFloat1)); n != 0 {
		t.Fatalf("B announced the muted IP %d times", n)
	}

	// The switch.
	stB.Muted = nil
	kb.pause()
	switched := time.Now()
	r = mustApply(t, b, stB)
	ask.expectAnswers(t, "switched (B's KeepARP paused)", relFloat1, macB)
	t.Logf("switch: %+v; answered %v after the Apply began", r, time.Since(switched))
	kb.resume()
	if !slices.Equal(r.Unmuted, addrList(relFloat1)) || len(r.Muted) != 0 || !slices.Equal(r.Announced, addrList(relFloat1)) ||
		len(r.Probed) != 0 || r.ProbeWait != 0 || r.AddrsAdded != 0 {
		t.Fatalf("switch: %+v", r)
	}
	waitGARPs(t, rec, switched, macB, relFloat1, len(garpSchedule))
	if n := rec.count(switched, macB, isProbe(relFloat1)); n != 0 {
		t.Fatalf("%d ARP probes for %s at the switch", n, relFloat1)
	}
	mustVerify(t, b, "switched")

	// A gives it up as usual.
	stA = arpGateway()
	stA.Policies, stA.FloatingIPs = stA.Policies[1:], stA.FloatingIPs[1:]
	if r := mustApply(t, a, stA); r.AddrsDeleted != 1 || len(r.Muted) != 0 || len(r.Unmuted) != 0 {
		t.Fatalf("A gives it up: %+v", r)
	}
	if l.hasAddr("gw", relFloat1) {
		t.Fatal("A still holds it")
	}
	expectARPSetsIn(t, l, "gw", "A gave it up", []string{relFloat2}, []string{relFloat2}, []string{})
	mustVerify(t, a, "A gave it up")
	ask.expectAnswers(t, "handed over", relFloat1, macB)
}

// TestMuteHeld: an IP held and answered for, then muted by an Apply, is
// answered no more at once (its lease would last 3 s) and KeepARP does
// not bring the answers back; its announcements stop, while those of the
// other IP go on. It stays held: address, record, SNAT rule and conntrack
// entries. An incremental Apply reports it muted still. Released, it is
// removed like any; taken back muted, it is probed first.
func TestMuteHeld(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, time.Second, 1500 * time.Millisecond, 2 * time.Second}
	const lease = 3 * time.Second

	l := newMuteLab(t)
	seen := l.udpServers()
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	mac := labMAC(l, "gw")
	d := muteDataplane(l, "gw", lease, 0)
	k := startKeeper(t, d)

	st := arpGateway() // relFloat1, relFloat2
	start := time.Now()
	mustApply(t, d, st)
	ask.expectAnswers(t, "held", relFloat1, mac)
	l.expectFrom(seen, 7001, relServer1, relFloat1)
	if n := l.flows(snatTo(relFloat1)); n != 1 {
		t.Fatalf("%d conntrack entries SNATed to %s", n, relFloat1)
	}
	// The first announcements went out; the next ones are due in a second.
	waitGARPs(t, rec, start, mac, relFloat1, 1)
	waitGARPs(t, rec, start, mac, relFloat2, 1)

	muted := st
	muted.Muted = addrList(relFloat1)
	mutedAt := time.Now()
	r := mustApply(t, d, muted)
	ask.expectAnswers(t, "muted", relFloat1)
	t.Logf("mute: %+v; unanswered %v after the Apply began (lease %v)", r, time.Since(mutedAt), lease)
	if !slices.Equal(r.Muted, addrList(relFloat1)) || len(r.Unmuted) != 0 || len(r.Announced) != 0 || len(r.Probed) != 0 ||
		r.AddrsAdded != 0 || r.AddrsDeleted != 0 || r.ConntrackDeleted != 0 || r.Incremental {
		t.Fatalf("mute: %+v", r)
	}
	expectARPSetsIn(t, l, "gw", "muted", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	mustVerify(t, d, "muted")
	if !l.hasAddr("gw", relFloat1) {
		t.Fatal("the muted IP left the uplink")
	}
	if post := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", chainPostrouting); !strings.Contains(post, "snat to "+relFloat1) {
		t.Fatalf("the SNAT rule of the muted IP is gone:\n%s", post)
	}
	if floating := l.exec("gw", "nft", "list", "set", "ip", "egressnat", setFloating); !strings.Contains(floating, relFloat1) {
		t.Fatalf("the muted IP left the floating record:\n%s", floating)
	}
	if n := l.flows(snatTo(relFloat1)); n != 1 {
		t.Fatalf("%d conntrack entries SNATed to the muted IP, want 1", n)
	}
	l.expectFrom(seen, 7001, relServer1, relFloat1) // the same flow, still SNATed

	ask.expectSilentWhileKept(t, "muted", relFloat1, k)
	ask.expectAnswers(t, "muted", relFloat2, mac)
	expectARPSetsIn(t, l, "gw", "muted, kept", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	// The other IP's announcements went on to the end of the schedule;
	// the muted one's stopped.
	waitGARPs(t, rec, start, mac, relFloat2, len(garpSchedule))
	if n := rec.count(mutedAt, mac, isGARP(relFloat1)); n != 0 {
		t.Fatalf("%d announcements of the muted IP after the Apply that muted it", n)
	}

	// Only sources change: the incremental path, the IP muted still.
	more := muted
	more.Policies = slices.Clone(muted.Policies)
	more.Policies[0].Sources = addrList(relPod, "10.244.2.3")
	if r := mustApply(t, d, more); !r.Incremental || !slices.Equal(r.Muted, addrList(relFloat1)) {
		t.Fatalf("incremental apply: %+v", r)
	}
	ask.expectAnswers(t, "incremental apply", relFloat1)

	// Released: removed like any.
	rr, err := d.Release(ctxT(t), addrList(relFloat1))
	if err != nil || !slices.Equal(rr.AddrsRemoved, addrList(relFloat1)) || rr.RulesChanged != 1 {
		t.Fatalf("release: %+v %v", rr, err)
	}
	expectARPSetsIn(t, l, "gw", "released", []string{relFloat2}, []string{relFloat2}, []string{})
	mustVerify(t, d, "released")
	// Taken back muted: probed first, added, still silent.
	taken := time.Now()
	r = mustApply(t, d, muted)
	if !slices.Equal(r.Probed, addrList(relFloat1)) || !slices.Equal(r.Muted, addrList(relFloat1)) || len(r.Announced) != 0 ||
		r.AddrsAdded != 1 || len(r.Conflicts) != 0 {
		t.Fatalf("taken back muted: %+v", r)
	}
	if n := rec.count(taken, mac, isProbe(relFloat1)); n == 0 {
		t.Fatal("taken back without an ARP probe")
	}
	expectARPSetsIn(t, l, "gw", "taken back muted", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	mustVerify(t, d, "taken back muted")
	ask.expectSilentWhileKept(t, "taken back muted", relFloat1, k)
}

// TestUnmute: the Apply that holds a muted IP unmuted answers for it at
// once (with KeepARP paused: the Apply gave it a full lease) and
// announces it anew, without an ARP probe.
func TestUnmute(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, 200 * time.Millisecond, 400 * time.Millisecond, 600 * time.Millisecond}
	const lease = 3 * time.Second

	l := newMuteLab(t)
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	mac := labMAC(l, "gw")
	d := muteDataplane(l, "gw", lease, 0)
	k := startKeeper(t, d)
	st := arpGateway()
	muted := st
	muted.Muted = addrList(relFloat1)
	mustApply(t, d, muted)
	ask.expectSilentWhileKept(t, "muted", relFloat1, k)

	k.pause()
	unmuted := time.Now()
	r := mustApply(t, d, st)
	ask.expectAnswers(t, "unmuted (KeepARP paused)", relFloat1, mac)
	t.Logf("unmute: %+v; answered %v after the Apply began", r, time.Since(unmuted))
	if !slices.Equal(r.Unmuted, addrList(relFloat1)) || len(r.Muted) != 0 || !slices.Equal(r.Announced, addrList(relFloat1)) ||
		len(r.Probed) != 0 || r.ProbeWait != 0 || r.AddrsAdded != 0 {
		t.Fatalf("unmute: %+v", r)
	}
	if live := arpList(l, "set", "arp", arpTable, arpSetLive); !strings.Contains(live, relFloat1+" timeout 3s expires ") {
		t.Fatalf("no full lease for the unmuted IP:\n%s", live)
	}
	k.resume()
	waitGARPs(t, rec, unmuted, mac, relFloat1, len(garpSchedule))
	if n := rec.count(unmuted, mac, isProbe(relFloat1)); n != 0 {
		t.Fatalf("%d ARP probes for the unmuted IP", n)
	}
	mustVerify(t, d, "unmuted")
	// The next Apply of the same state unmutes nothing more.
	if r := mustApply(t, d, st); len(r.Unmuted) != 0 || len(r.Announced) != 0 {
		t.Fatalf("steady apply: %+v", r)
	}
}

// TestMutedLeaseDisabled: with the ARP lease disabled the node answers
// for its floating IPs without an arp table; a muted IP is the exception:
// the table holds it alone, without a lease, while it is muted. Its
// announcements stop (here no lease gates their repeats).
func TestMutedLeaseDisabled(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, 500 * time.Millisecond, time.Second, 1500 * time.Millisecond}

	l := newMuteLab(t)
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	mac := labMAC(l, "gw")
	d := muteDataplane(l, "gw", -1, -1)
	st := arpGateway()
	start := time.Now()
	mustApply(t, d, st)
	if hasARPTable(l) {
		t.Fatal("an arp table with the lease disabled and nothing muted")
	}
	ask.expectAnswers(t, "held", relFloat1, mac)
	waitGARPs(t, rec, start, mac, relFloat1, 1)

	muted := st
	muted.Muted = addrList(relFloat1)
	mutedAt := time.Now()
	if r := mustApply(t, d, muted); !slices.Equal(r.Muted, addrList(relFloat1)) || len(r.Announced) != 0 {
		t.Fatalf("mute: %+v", r)
	}
	ask.expectAnswers(t, "muted", relFloat1)
	ask.expectAnswers(t, "muted", relFloat2, mac)
	waitGARPs(t, rec, start, mac, relFloat2, len(garpSchedule))
	if n := rec.count(mutedAt, mac, isGARP(relFloat1)); n != 0 {
		t.Fatalf("%d announcements of the muted IP after the Apply that muted it", n)
	}
	expectARPSetsIn(t, l, "gw", "muted", []string{relFloat1}, []string{}, []string{relFloat1})
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	ask.expectAnswers(t, "muted, KeepARP", relFloat1)

	if r := mustApply(t, d, st); !slices.Equal(r.Unmuted, addrList(relFloat1)) || !slices.Equal(r.Announced, addrList(relFloat1)) {
		t.Fatalf("unmute: %+v", r)
	}
	ask.expectAnswers(t, "unmuted", relFloat1, mac)
	if hasARPTable(l) {
		t.Fatalf("the arp table stayed once nothing is muted:\n%s", arpList(l))
	}

	// Released while muted: it leaves the table.
	mustApply(t, d, muted)
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	expectARPSetsIn(t, l, "gw", "released while muted", []string{}, []string{}, []string{})
	mustVerify(t, d, "released while muted")
}
