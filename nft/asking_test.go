package nft

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A muted floating IP's own ARP requests (the asking set): the node
// answers no ARP for a muted IP, but the requests its kernel sends with it
// as sender (resolving a neighbour for traffic SNATed to it) pass while
// KeepARP runs, and stop within the lease when it stops. Kernel tests in
// the release lab, under the name enat-ask-.

const (
	// askPrefix: an on-link prefix of gw's uplink that nobody uses, so
	// that a datagram to an address of it that gw has no neighbour entry
	// for makes gw's kernel send an ARP request of its own (sender: the
	// datagram's source), never answered.
	askPrefix = "100.64.0.0/16"
	// askWait: how long a triggered request may take to show on the wire
	// (the kernel sends it at once, or at the next jiffy).
	askWait = 40 * time.Millisecond
)

func newAskLab(t *testing.T) *relLab {
	t.Helper()
	return newRelLabNamed(t, "enat-ask-")
}

// arpRequester makes gw's kernel send ARP requests of its own and watches
// for them on ext's uplink.
type arpRequester struct {
	l   *relLab
	rec *arpRecorder
	mac net.HardwareAddr // gw's
	n   int
}

func newARPRequester(l *relLab, rec *arpRecorder) *arpRequester {
	l.t.Helper()
	l.ip("gw", "route", "add", askPrefix, "dev", relUplink)
	return &arpRequester{l: l, rec: rec, mac: labMAC(l, "gw")}
}

func isRequest(sender, target netip.Addr) func(arpPacket) bool {
	return func(p arpPacket) bool { return p.op == arpRequest && p.senderIP == sender && p.targetIP == target }
}

// request sends a datagram from src (an address of gw) to the next
// address of askPrefix (of 250, in turn), and reports when, and whether
// gw's ARP request for it, with src as sender, was seen within askWait.
// The neighbour entries of askPrefix are deleted first: gw resolves anew,
// and neither retransmits requests nor keeps entries piling up (the
// neighbour table's limits are the whole host's).
func (r *arpRequester) request(src string) (time.Time, bool) {
	r.l.t.Helper()
	r.n++
	target := netip.AddrFrom4([4]byte{100, 64, 0, byte(1 + r.n%250)})
	sip := netip.MustParseAddr(src)
	r.l.ip("gw", "neigh", "flush", "to", askPrefix)
	sent := time.Now()
	r.l.sendFrom("gw", src, 0, target.String())
	seen := r.rec.waitFor(askWait, func() bool { return r.rec.count(sent, r.mac, isRequest(sip, target)) > 0 })
	return sent, seen
}

// requestFor sends requests from src every 20 ms for d.
func (r *arpRequester) requestFor(src string, d time.Duration) []arpProbe {
	var out []arpProbe
	for end := time.Now().Add(d); time.Now().Before(end); {
		at, ok := r.request(src)
		out = append(out, arpProbe{at, ok})
		time.Sleep(20 * time.Millisecond) // the pace of the requests, not a wait for a condition
	}
	return out
}

// requestsFrom counts the requests gw sent with src as sender, seen in
// [from, to).
func (r *arpRequester) requestsFrom(src string, from, to time.Time) int {
	r.rec.mu.Lock()
	defer r.rec.mu.Unlock()
	sip := netip.MustParseAddr(src)
	n := 0
	for _, f := range r.rec.frames {
		if !f.at.Before(from) && f.at.Before(to) && f.p.senderHW.String() == r.mac.String() && f.p.op == arpRequest && f.p.senderIP == sip {
			n++
		}
	}
	return n
}

// expectRequests checks that a request from src is (or is not) seen.
func (r *arpRequester) expectRequests(t *testing.T, when, src string, want bool) {
	t.Helper()
	if _, ok := r.request(src); ok != want {
		t.Fatalf("%s: gw's own ARP request with sender %s seen: %v, want %v\n%s", when, src, ok, want, arpList(r.l))
	}
}

// askCounter returns the packets counted by the rule of the output chain
// that ends in verdict (accept: the asking rule, drop: the lease's).
func askCounter(t *testing.T, l *relLab, verdict string) int {
	t.Helper()
	out := arpList(l, "chain", "arp", arpTable, arpChain)
	m := regexp.MustCompile(`counter packets (\d+) bytes \d+ ` + verdict).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %s rule with a counter:\n%s", verdict, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestMutedAsks: gw holds relFloat1 muted and relFloat2 not. It answers
// no ARP request for relFloat1 (for relFloat2 it does), but its own
// requests with relFloat1 as sender leave, as long as KeepARP runs: the
// pod's traffic SNATed to relFloat1 reaches the server at once after gw
// forgot its router's address (no retransmit time lost). With KeepARP
// stopped (a frozen agent) its requests stop within the lease, for the
// muted IP as for the other (whose lease expired: today's dead man's
// switch); no Apply brings the muted IP's lease back, KeepARP does.
// Unmuted, its lease is in live again.
func TestMutedAsks(t *testing.T) {
	l := newAskLab(t)
	seen := l.udpServers()
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	req := newARPRequester(l, rec)
	mac := labMAC(l, "gw")
	d := muteDataplane(l, "gw", 0, -1)
	lease := d.cfg.ARPLease
	k := startKeeper(t, d)

	st := arpGateway() // relFloat1, relFloat2
	mustApply(t, d, st)
	req.expectRequests(t, "held", relFloat1, true)
	muted := st
	muted.Muted = addrList(relFloat1)
	if r := mustApply(t, d, muted); !slices.Equal(r.Muted, addrList(relFloat1)) {
		t.Fatalf("mute: %+v", r)
	}
	expectARPSetsIn(t, l, "gw", "muted", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	mustVerify(t, d, "muted")
	t.Logf("arp table, %s muted:\n%s", relFloat1, arpList(l))

	// Replies: none for the muted IP, while its requests pass.
	ask.expectSilentWhileKept(t, "muted", relFloat1, k)
	ask.expectAnswers(t, "muted", relFloat2, mac)
	req.expectRequests(t, "muted", relFloat1, true)

	// The pod's traffic SNATed to the muted IP, gw's neighbour table
	// flushed: gw resolves its router with the muted IP as sender, and the
	// datagram gets out at once, not after a retransmit time.
	retrans, err := strconv.Atoi(strings.TrimSpace(l.exec("gw", "cat", "/proc/sys/net/ipv4/neigh/"+relUplink+"/retrans_time_ms")))
	if err != nil {
		t.Fatal(err)
	}
	l.ip("gw", "neigh", "flush", "dev", relUplink)
	flushed := time.Now()
	l.send(7101, relServer1)
	select {
	case got := <-seen[relServer1]:
		took := time.Since(flushed)
		t.Logf("the pod's datagram arrived from %s %v after gw's neighbour flush (retransmit time %d ms)", got, took, retrans)
		if got.Addr() != netip.MustParseAddr(relFloat1) {
			t.Fatalf("the pod's datagram came from %s, want %s", got, relFloat1)
		}
		if took >= time.Duration(retrans)*time.Millisecond/2 {
			t.Fatalf("the pod's datagram took %v after the neighbour flush (retransmit time %d ms): a request was dropped", took, retrans)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("the pod's datagram did not get out after gw's neighbour flush\n%s", arpList(l))
	}
	// The datagram may arrive before the capture reads the frames.
	if !rec.waitFor(time.Second, func() bool {
		return rec.count(flushed, mac, isRequest(netip.MustParseAddr(relFloat1), netip.MustParseAddr(routerIP))) > 0
	}) {
		t.Fatalf("no request for the router with %s as sender on the wire", relFloat1)
	}

	for cycle := range 2 {
		// Kept: every request of both IPs passes, well past the lease.
		for _, ip := range []string{relFloat1, relFloat2} {
			for _, pr := range req.requestFor(ip, 3*lease/2) {
				if !pr.answered {
					t.Fatalf("cycle %d: a request with sender %s was dropped while KeepARP runs\n%s", cycle, ip, arpList(l))
				}
			}
		}
		// Frozen: requests of both stop within the lease (asked in turn).
		last := k.pause()
		probes := map[string][]arpProbe{}
		for end := last.Add(lease + 4*arpSlack); time.Now().Before(end); {
			for _, ip := range []string{relFloat1, relFloat2} {
				at, ok := req.request(ip)
				probes[ip] = append(probes[ip], arpProbe{at, ok})
			}
			time.Sleep(10 * time.Millisecond) // the pace of the requests, not a wait for a condition
		}
		for _, ip := range []string{relFloat1, relFloat2} {
			var firstMiss time.Duration = -1
			passedLate := false
			for _, pr := range probes[ip] {
				since := pr.at.Sub(last)
				if !pr.answered && firstMiss < 0 {
					firstMiss = since
				}
				if pr.answered && since > lease+arpSlack {
					t.Errorf("cycle %d: a request with sender %s passed %v after the last KeepARP (lease %v)", cycle, ip, since, lease)
				}
				if !pr.answered && since < lease-arpSlack {
					t.Errorf("cycle %d: a request with sender %s was dropped %v after the last KeepARP, within the lease %v", cycle, ip, since, lease)
				}
				passedLate = passedLate || pr.answered && since > lease/2
			}
			t.Logf("cycle %d, sender %s: %d requests after the last KeepARP; first dropped one sent %v after it", cycle, ip, len(probes[ip]), firstMiss)
			if firstMiss < 0 {
				t.Fatalf("cycle %d: requests with sender %s still pass %v after the last KeepARP", cycle, ip, lease+4*arpSlack)
			}
			if !passedLate {
				t.Errorf("cycle %d: requests with sender %s dropped before half the lease", cycle, ip)
			}
		}
		// Nothing at all once the lease ran out.
		for _, ip := range []string{relFloat1, relFloat2} {
			if n := req.requestsFrom(ip, last.Add(lease+arpSlack), time.Now()); n != 0 {
				t.Fatalf("cycle %d: %d requests with sender %s seen after the lease ran out", cycle, n, ip)
			}
		}
		if cycle == 0 {
			// A full Apply does not bring the muted IP's lease back.
			d.Recheck()
			if r := mustApply(t, d, muted); r.Incremental {
				t.Fatalf("not a full apply: %+v", r)
			}
			req.expectRequests(t, "apply after the lease ran out", relFloat1, false)
			ask.expectAnswers(t, "apply after the lease ran out", relFloat1)
		}
		// Thawed: both pass at once.
		k.resume()
		req.expectRequests(t, "KeepARP resumed", relFloat1, true)
		req.expectRequests(t, "KeepARP resumed", relFloat2, true)
		ask.expectAnswers(t, "KeepARP resumed", relFloat1)
	}
	if n := askCounter(t, l, "accept"); n == 0 {
		t.Error("the asking rule counted nothing")
	}
	expectARPSetsIn(t, l, "gw", "muted, kept", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})

	// Released, then taken back muted with KeepARP paused: the Apply
	// that adds it gives it a full lease in asking at once.
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	k.pause()
	if r := mustApply(t, d, muted); r.AddrsAdded != 1 || !slices.Equal(r.Muted, addrList(relFloat1)) {
		t.Fatalf("taken back muted: %+v", r)
	}
	if set := arpList(l, "set", "arp", arpTable, arpSetAsking); !strings.Contains(set, relFloat1+" timeout 300ms expires ") {
		t.Fatalf("taken back muted: no full lease in asking:\n%s", set)
	}
	req.expectRequests(t, "taken back muted (KeepARP paused)", relFloat1, true)
	ask.expectAnswers(t, "taken back muted (KeepARP paused)", relFloat1)
	k.resume()

	// Unmuted: its lease in live, none in asking; answered, and its
	// requests pass.
	if r := mustApply(t, d, st); !slices.Equal(r.Unmuted, addrList(relFloat1)) {
		t.Fatalf("unmute: %+v", r)
	}
	expectARPSetsIn(t, l, "gw", "unmuted", []string{relFloat1, relFloat2}, []string{relFloat1, relFloat2}, []string{})
	ask.expectAnswers(t, "unmuted", relFloat1, mac)
	req.expectRequests(t, "unmuted", relFloat1, true)
	mustVerify(t, d, "unmuted")
}

// TestMutedAsksLeaseDisabled: with the ARP lease disabled the arp table
// exists only while an IP is muted; the muted IP is in asking without a
// timeout: its own requests pass without KeepARP, its replies do not; the
// other IP is answered for and asks as without a table.
func TestMutedAsksLeaseDisabled(t *testing.T) {
	l := newAskLab(t)
	rec := recordARP(l, "ext")
	ask := newARPAsker(l, rec)
	req := newARPRequester(l, rec)
	mac := labMAC(l, "gw")
	d := muteDataplane(l, "gw", -1, -1)
	st := arpGateway()
	mustApply(t, d, st)
	if hasARPTable(l) {
		t.Fatal("an arp table with the lease disabled and nothing muted")
	}
	muted := st
	muted.Muted = addrList(relFloat1)
	mustApply(t, d, muted)
	expectARPSetsIn(t, l, "gw", "muted", []string{relFloat1}, []string{}, []string{relFloat1})
	if set := arpList(l, "set", "arp", arpTable, arpSetAsking); strings.Contains(set, "timeout "+relFloat1) ||
		strings.Contains(set, relFloat1+" timeout") || strings.Contains(set, "expires") {
		t.Fatalf("the muted IP has a timeout in asking with the lease disabled:\n%s", set)
	}
	// Past any lease, without KeepARP: its requests pass, its replies
	// do not; the other IP's pass both.
	for _, ip := range []string{relFloat1, relFloat2} {
		for _, pr := range req.requestFor(ip, 2*DefaultARPLease) {
			if !pr.answered {
				t.Fatalf("muted: a request with sender %s was dropped with the lease disabled\n%s", ip, arpList(l))
			}
		}
	}
	ask.expectAnswers(t, "muted", relFloat1)
	ask.expectAnswers(t, "muted", relFloat2, mac)
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectARPSetsIn(t, l, "gw", "muted, KeepARP", []string{relFloat1}, []string{}, []string{relFloat1})
	if n := askCounter(t, l, "accept"); n == 0 {
		t.Error("the asking rule counted nothing")
	}

	// Released while muted: it leaves held and asking.
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	expectARPSetsIn(t, l, "gw", "released while muted", []string{}, []string{}, []string{})
	mustApply(t, d, st)
	if hasARPTable(l) {
		t.Fatalf("the arp table stayed once nothing is muted:\n%s", arpList(l))
	}
	req.expectRequests(t, "unmuted", relFloat1, true)
}

// oldARPTable is the arp table of the version before the asking set.
const oldARPTable = `table arp egressnat {
	set held {
		type ipv4_addr
		elements = { ` + relFloat1 + `, ` + relFloat2 + ` }
	}
	set live {
		type ipv4_addr
		flags timeout
		elements = { ` + relFloat2 + ` timeout 1h }
	}
	chain output {
		type filter hook output priority filter; policy accept;
		arp saddr ip @held arp saddr ip != @live counter drop comment "` + arpComment + `"
	}
}
`

// writeOldARPTable replaces gw's arp table by the previous version's.
func writeOldARPTable(t *testing.T, l *relLab) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "old.nft")
	if err := os.WriteFile(f, []byte("table arp egressnat\ndelete table arp egressnat\n"+oldARPTable), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "netns", "exec", l.ns("gw"), "nft", "-f", f).CombinedOutput(); err != nil {
		t.Fatalf("nft -f old table: %v\n%s", err, out)
	}
	if out := arpList(l); strings.Contains(out, arpSetAsking) {
		t.Fatalf("not the old table:\n%s", out)
	}
}

// expectNewARPTable checks the table's layout (the asking set and rule
// before the drop).
func expectNewARPTable(t *testing.T, l *relLab, when string) {
	t.Helper()
	out := normalizeListing(arpList(l))
	for _, want := range []string{
		"set asking {\n\t\ttype ipv4_addr\n\t\tflags timeout\n",
		"policy accept;\n\t\t" +
			`arp operation request arp saddr ip @asking counter accept comment "` + arpAskComment + `"` + "\n\t\t" +
			`arp saddr ip @held arp saddr ip != @live counter drop comment "` + arpComment + `"` + "\n\t}",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("%s: the arp table lacks %q:\n%s", when, want, out)
		}
	}
}

// TestARPTableUpgrade: the previous version's arp table (no asking set,
// one rule) is rewritten in the new layout by the first full Apply, or by
// KeepARP (its write fails on the missing set); Verify accepts the
// result, and the muted IP's requests pass.
func TestARPTableUpgrade(t *testing.T) {
	l := newAskLab(t)
	rec := recordARP(l, "ext")
	req := newARPRequester(l, rec)
	st := arpGateway()
	muted := st
	muted.Muted = addrList(relFloat1)
	old := muteDataplane(l, "gw", 0, -1)
	mustApply(t, old, muted) // the addresses on the uplink, labelled
	old.Close()

	// The upgraded agent's first Apply.
	writeOldARPTable(t, l)
	d := muteDataplane(l, "gw", 0, -1)
	mustApply(t, d, muted)
	expectNewARPTable(t, l, "first apply")
	mustVerify(t, d, "first apply")
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectARPSetsIn(t, l, "gw", "first apply, KeepARP", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	req.expectRequests(t, "first apply, KeepARP", relFloat1, true)

	// KeepARP on an old table.
	writeOldARPTable(t, l)
	req.expectRequests(t, "old table", relFloat1, false)
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	expectNewARPTable(t, l, "KeepARP")
	expectARPSetsIn(t, l, "gw", "KeepARP", []string{relFloat1, relFloat2}, []string{relFloat2}, []string{relFloat1})
	req.expectRequests(t, "KeepARP", relFloat1, true)
	mustVerify(t, d, "KeepARP")

	// A table otherwise ours with the asking rule gone: the next full
	// Apply puts it back.
	l.exec("gw", "nft", "flush", "chain", "arp", arpTable, arpChain)
	l.exec("gw", "nft", "add", "rule", "arp", arpTable, arpChain,
		"arp", "saddr", "ip", "@held", "arp", "saddr", "ip", "!=", "@live", "counter", "drop", "comment", `"`+arpComment+`"`)
	d.Recheck()
	mustApply(t, d, muted)
	expectNewARPTable(t, l, "apply after the asking rule went")
	if err := d.KeepARP(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	req.expectRequests(t, "apply after the asking rule went", relFloat1, true)
}
