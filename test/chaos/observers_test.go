package chaos

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/lab"
	"golang.org/x/sys/unix"
)

// logs collects what the observers report.
type logs struct {
	t  *testing.T
	mu sync.Mutex
	l  []string
}

func (l *logs) logf(format string, args ...any) {
	l.t.Helper()
	s := strings.TrimSpace(sprintf(format, args...))
	l.t.Log(s)
	l.mu.Lock()
	l.l = append(l.l, s)
	l.mu.Unlock()
}

func (l *logs) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.l {
		if strings.Contains(s, sub) {
			n++
		}
	}
	return n
}

// The observers must be able to fail: the same IP on two hosts is a dual
// holder, a datagram with the wrong source is a violation, a pulled cable
// is an outage (unless excused), and a switch partition does not hide a
// holder from the ARP observer.
func TestObserversCanFail(t *testing.T) {
	l := lab.NewT(t, lab.Config{
		Prefix:    "enat-chaost-",
		Nodes:     []lab.NodeConfig{{Name: "node1"}, {Name: "node2"}},
		Externals: []lab.ExternalConfig{{Name: "ext1", Addr: netip.MustParsePrefix("203.0.113.10/24")}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n1, n2 := l.Node("node1"), l.Node("node2")
	mac1, err := l.LinkMAC(n1.NetNS, n1.Uplink)
	if err != nil {
		t.Fatal(err)
	}
	mac2, err := l.LinkMAC(n2.NetNS, n2.Uplink)
	if err != nil {
		t.Fatal(err)
	}
	exec := func(ns string, args ...string) {
		t.Helper()
		if out, err := l.Exec(ctx, ns, args...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	fip, free := netip.MustParseAddr("192.0.2.150"), netip.MustParseAddr("192.0.2.151")
	observerIP := netip.MustParseAddr("192.0.2.254")
	lg := &logs{t: t}

	exec(n1.NetNS, "ip", "addr", "add", fip.String()+"/24", "dev", n1.Uplink)
	arp, err := StartARP(ARPConfig{NetNS: l.RouterNS(), Dev: "eth0", SenderIP: observerIP, IPs: []netip.Addr{fip, free},
		Names: map[string]string{mac1.String(): "node1", mac2.String(): "node2"}, Logf: lg.logf})
	if err != nil {
		t.Fatal(err)
	}
	defer arp.Stop()
	holders := func(want ...string) {
		t.Helper()
		slices.Sort(want)
		var got []string
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			h, _ := arp.Holders()
			if got = h[fip]; slices.Equal(got, want) && len(h[free]) == 0 {
				return
			}
		}
		t.Fatalf("holders of %s: %v, want %v", fip, got, want)
	}
	holders(mac1.String())
	if s := arp.Stats(); s.Violations != 0 || s.Rounds == 0 {
		t.Fatalf("one holder: %+v", s)
	}
	// What a node sees of the observer must not look like a host taking
	// or probing the watched addresses (RFC 5227): a node that probes
	// before taking a floating IP would back off.
	for _, f := range capture(t, n2.NetNS, 300*time.Millisecond) {
		if len(f) < 42 || string(f[6:11]) != string(ObserverMACBase[:5]) {
			continue
		}
		sender := netip.AddrFrom4([4]byte(f[28:32]))
		if sender != observerIP {
			t.Fatalf("observer frame with sender IP %s: % x", sender, f)
		}
	}
	// Partitions made in the switch leave the observer's probes alone.
	if err := l.SetSwitchFilter(ctx, "enat_chaost", append(SwitchExemptRules(observerIP), `iifname "n0" drop`, `oifname "n0" drop`)); err != nil {
		t.Fatal(err)
	}
	defer l.DeleteSwitchFilter(context.Background(), "enat_chaost") //nolint:errcheck
	time.Sleep(150 * time.Millisecond)
	holders(mac1.String())
	exec(n2.NetNS, "ip", "addr", "add", fip.String()+"/24", "dev", n2.Uplink)
	holders(mac1.String(), mac2.String())
	time.Sleep(200 * time.Millisecond)
	exec(n1.NetNS, "ip", "addr", "del", fip.String()+"/24", "dev", n1.Uplink)
	holders(mac2.String())
	s := arp.Stats()
	if s.Violations != 1 || s.MaxDual < 200*time.Millisecond || s.MaxDualIP != fip {
		t.Fatalf("after a dual holder: %+v", s)
	}
	if lg.count("VIOLATION dual holder: 192.0.2.150 answered by node1(") != 1 {
		t.Fatalf("dual holder not reported as such")
	}
	if err := l.DeleteSwitchFilter(ctx, "enat_chaost"); err != nil {
		t.Fatal(err)
	}

	// Sources: node1 masquerades its pods; "bad" claims to be selected.
	good, err := l.AddPod("node1", "good")
	if err != nil {
		t.Fatal(err)
	}
	bad, err := l.AddPod("node1", "bad")
	if err != nil {
		t.Fatal(err)
	}
	var excused atomic.Bool
	src, err := StartSource(SourceConfig{ListenNS: l.External("ext1").NetNS, Listen: netip.MustParseAddrPort("203.0.113.10:9000"),
		Logf: lg.logf, Excused: func(Pod) bool { return excused.Load() },
		Describe: func(a netip.Addr) string {
			if a == n1.IP {
				return "node node1"
			}
			return ""
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Stop()
	if err := src.Add(Pod{Name: "t/good", NetNS: good.NetNS, Node: "node1", IP: good.IP, Expect: Expect{Source: n1.IP}}); err != nil {
		t.Fatal(err)
	}
	if err := src.Add(Pod{Name: "t/bad", NetNS: bad.NetNS, Node: "node1", IP: bad.IP,
		Expect: Expect{Selected: true, Policy: "p", Source: fip}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1200 * time.Millisecond) // a fresh flow or two
	ss := src.Stats()
	if ss.Violations != 2 || ss.Wrong < 50 || ss.Received < 100 {
		t.Fatalf("wrong sources: %+v (want 2 episodes: each flow of t/bad)", ss)
	}
	if lg.count("VIOLATION source: pod t/bad (") != 2 || lg.count("VIOLATION source: pod t/good") != 0 {
		t.Fatal("violations reported for the wrong pod")
	}
	p := src.Problems(300 * time.Millisecond)
	if len(p) != 4 || !strings.Contains(strings.Join(p, "\n"), "still leaving with 192.0.2.11 (node node1)") {
		t.Fatalf("problems: %q", p)
	}
	// Now "bad" is not selected after all: after the transition, no problems.
	src.SetExpect("t/bad", Expect{Source: n1.IP})
	src.SettleExpect("t/bad", 0)
	time.Sleep(300 * time.Millisecond)
	if p := src.Problems(200 * time.Millisecond); len(p) != 0 {
		t.Fatalf("problems after the change: %q", p)
	}
	// An excused cut is no outage; an unexcused one is.
	src.Reset()
	excused.Store(true)
	cut := func() {
		if err := l.SetLinkDown("node1"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(700 * time.Millisecond)
		if err := l.SetLinkUp("node1"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	cut()
	excused.Store(false)
	if ss := src.Stats(); ss.MaxUnselected.Duration > 300*time.Millisecond || ss.Violations != 0 {
		t.Fatalf("excused cut: %+v", ss)
	}
	cut()
	if ss := src.Stats(); ss.MaxUnselected.Duration < 650*time.Millisecond || ss.Violations != 0 {
		t.Fatalf("cut: %+v", ss)
	}
}

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// capture returns the ARP frames that arrive in namespace ns during d.
func capture(t *testing.T, ns string, d time.Duration) [][]byte {
	t.Helper()
	fd := -1
	if err := lab.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(ethPARP)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	buf := make([]byte, 1600)
	for end := time.Now().Add(d); time.Now().Before(end); {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == nil {
			out = append(out, append([]byte(nil), buf[:n]...))
		}
	}
	if len(out) == 0 {
		t.Fatalf("no ARP frame seen in %s in %v", ns, d)
	}
	return out
}
