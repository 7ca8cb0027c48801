package nft

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	tinetfilter "github.com/ti-mo/netfilter"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// Pure parts of the release path.

func TestReleasedRule(t *testing.T) {
	byName := func(name string) *nftables.Set { return &nftables.Set{Name: name} }
	gw := selector.PolicyState{Name: "web", Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100")}
	for _, r := range []rule{
		{chain: chainPostrouting, kind: ruleGateway, policy: "web", comment: policyComment(gw, 0),
			src: "src-web", dst: "dst-web", oif: "eth0", egress: gw.EgressIP},
		{chain: chainPostrouting, kind: ruleGateway, policy: "web", comment: policyComment(gw, 0),
			src: "src-web", dst: "dst-web", oif: "eth0", egress: gw.EgressIP, pfx: netip.MustParsePrefix("203.0.113.0/24")},
		{chain: chainPostrouting, kind: ruleGateway, policy: "web", comment: policyComment(gw, 0),
			src: "src-web", dst: "dst-web", oif: "eth0", egress: gw.EgressIP, pfx: netip.MustParsePrefix("0.0.0.0/0")},
	} {
		spec := releasedSpec(r)
		// What the kernel gets (the kernel rule's match, then counter
		// drop) is what the cache holds.
		got, ok := releasedExprs(r.exprs(byName))
		if !ok {
			t.Fatalf("%s: no oifname match found", r)
		}
		if want := spec.exprs(byName); !reflect.DeepEqual(normalize(got), normalize(want)) {
			t.Errorf("%s:\nkernel %#v\n spec  %#v", r, got, want)
		}
		want := "ip saddr @src-web ip daddr " + r.daddr() + ` counter drop comment "policy web: drop (192.0.2.100 released)"`
		if s := spec.String(); s != want {
			t.Errorf("released rule\n got %s\nwant %s", s, want)
		}
		// Dump still names the policy, now as dropping.
		nr := &nftables.Rule{Exprs: spec.exprs(byName), UserData: spec.userData()}
		kr, ok := parseRule(nr)
		if !ok || kr.mode != selector.ModeDrop || kr.srcSet != "src-web" || commentPolicy(ruleComment(nr)) != "web" {
			t.Errorf("%s: parsed %+v %v, comment %q", spec, kr, ok, ruleComment(nr))
		}
	}
	if _, ok := releasedExprs([]expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}); ok {
		t.Error("a rule without oifname was turned into a released rule")
	}
	// Long names are cut to the comment limit, the same way from the
	// kernel's comment and from the cached rule's.
	long := strings.Repeat("x", 300)
	c := releasedComment(policyComment(selector.PolicyState{Name: long, Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100")}, 0), netip.MustParseAddr("255.255.255.255"))
	if len(c) > maxComment || !strings.HasPrefix(c, "policy xxx") || !strings.HasSuffix(c, ": drop (255.255.255.255 released)") {
		t.Fatalf("long comment %q (%d)", c, len(c))
	}
	if n := commentPolicy(c); !strings.HasPrefix(long, n) || n == "" {
		t.Fatalf("comment names %q", n)
	}
}

func TestFailClosedGateways(t *testing.T) {
	st := selector.NodeState{Policies: []selector.PolicyState{
		{Name: "a", Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100")},
		{Name: "b", Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.101")},
		{Name: "c", Mode: selector.ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.13")},
	}}
	out, names := failClosedGateways(st, []netip.Addr{netip.MustParseAddr("192.0.2.100")})
	if !slices.Equal(names, []string{"a"}) {
		t.Fatalf("names %v", names)
	}
	if out.Policies[0].Mode != selector.ModeDrop || out.Policies[1].Mode != selector.ModeGateway || out.Policies[2].Mode != selector.ModeReroute {
		t.Fatalf("modes %v %v %v", out.Policies[0].Mode, out.Policies[1].Mode, out.Policies[2].Mode)
	}
	if st.Policies[0].Mode != selector.ModeGateway {
		t.Fatal("the input state was changed")
	}
}

// The release lab: network namespaces enat-rel-<id>-<role>, links named
// enat-rel-*, all created inside lab namespaces (never in the root one) and
// removed in t.Cleanup, registered before anything is created.
//
//	sw:   bridge enat-rel-br, one port per host
//	ext:  192.0.2.1/24, servers on 203.0.113.10, 198.51.100.10, 198.18.0.10
//	gw:   the gateway node 192.0.2.12, pods 10.244.2.0/24 on enat-rel-c
//	pod:  a pod on gw, 10.244.2.2
//	peer: another host on the segment, 192.0.2.13
//
// Every host's link to the switch is enat-rel-up. The gateway masquerades
// pod traffic with iptables as a CNI would: traffic that leaves unNATed by
// us leaves with 192.0.2.12.
type relLab struct {
	t   *testing.T
	id  string
	nss []string
	// prefix of the namespaces' names: enat-rel- (newMuteLab: enat-mute-).
	prefix string
}

const (
	relUplink   = "enat-rel-up"
	relGW       = "192.0.2.12"
	relPeer     = "192.0.2.13"
	relPod      = "10.244.2.2"
	relFloat1   = "192.0.2.100"
	relFloat2   = "192.0.2.101"
	relForeign  = "192.0.2.102"
	relServer1  = "203.0.113.10"
	relServer2  = "198.51.100.10"
	relServer3  = "198.18.0.10"
	relUDPPort  = "9999"
	relWaitLeak = 700 * time.Millisecond
)

func newRelLab(t *testing.T) *relLab {
	t.Helper()
	return newRelLabNamed(t, "enat-rel-")
}

// newRelLabNamed builds the release lab in namespaces prefix<id>-<role>.
func newRelLabNamed(t *testing.T, prefix string) *relLab {
	t.Helper()
	requireRoot(t)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	l := &relLab{t: t, id: hex.EncodeToString(b), prefix: prefix}
	t.Cleanup(l.destroy)
	l.build()
	return l
}

func (l *relLab) ns(role string) string { return l.prefix + l.id + "-" + role }

func (l *relLab) destroy() {
	for i := len(l.nss) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", l.nss[i]).CombinedOutput(); err != nil {
			l.t.Logf("ip netns del %s: %v %s", l.nss[i], err, out)
		}
	}
}

func (l *relLab) run(args ...string) string {
	l.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (l *relLab) ip(role string, args ...string) string {
	l.t.Helper()
	return l.run(append([]string{"ip", "-n", l.ns(role)}, args...)...)
}

func (l *relLab) exec(role string, args ...string) string {
	l.t.Helper()
	return l.run(append([]string{"ip", "netns", "exec", l.ns(role)}, args...)...)
}

func (l *relLab) addNS(role string) {
	l.t.Helper()
	name := l.ns(role)
	l.nss = append(l.nss, name) // before it exists: a failure below still removes it
	l.run("ip", "netns", "add", name)
	l.ip(role, "link", "set", "lo", "up")
}

// host connects role's enat-rel-up to the switch.
func (l *relLab) host(role, cidr string) {
	l.t.Helper()
	l.addNS(role)
	port := "enat-rel-p" + role
	l.ip("sw", "link", "add", port, "type", "veth", "peer", "name", relUplink, "netns", l.ns(role))
	l.ip("sw", "link", "set", port, "master", "enat-rel-br", "up")
	l.ip(role, "addr", "add", cidr, "dev", relUplink)
	l.ip(role, "link", "set", relUplink, "up")
}

func (l *relLab) build() {
	l.t.Helper()
	l.addNS("sw")
	l.ip("sw", "link", "add", "enat-rel-br", "type", "bridge")
	l.ip("sw", "link", "set", "enat-rel-br", "up")
	l.host("ext", routerIP+"/24")
	for _, s := range []string{relServer1, relServer2, relServer3} {
		l.ip("ext", "addr", "add", s+"/32", "dev", "lo")
	}
	l.host("peer", relPeer+"/24")
	l.host("gw", relGW+"/24")
	l.ip("gw", "route", "add", "default", "via", routerIP)
	l.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
	l.exec("gw", "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE")
	l.addNS("pod")
	l.ip("gw", "link", "add", "enat-rel-c", "type", "veth", "peer", "name", relUplink, "netns", l.ns("pod"))
	l.ip("gw", "addr", "add", "10.244.2.1/24", "dev", "enat-rel-c")
	l.ip("gw", "link", "set", "enat-rel-c", "up")
	l.ip("pod", "addr", "add", relPod+"/24", "dev", relUplink)
	l.ip("pod", "link", "set", relUplink, "up")
	l.ip("pod", "route", "add", "default", "via", "10.244.2.1")
}

func (l *relLab) fd(role string) int {
	l.t.Helper()
	f, err := os.Open("/run/netns/" + l.ns(role))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func (l *relLab) dataplane(probeWait time.Duration) *Dataplane {
	l.t.Helper()
	d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd("gw"), Logger: zaptest.NewLogger(l.t), ARPProbeWait: probeWait})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { d.Close() })
	keepARP(l.t, d) // as the agent does
	return d
}

// inNS runs fn on a thread inside role's namespace.
func (l *relLab) inNS(role string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	target, err := netns.GetFromName(l.ns(role))
	if err != nil {
		return err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return err
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			panic(fmt.Sprintf("cannot return to the original netns: %v", err))
		}
	}()
	return fn()
}

// udpServers listen on port 9999 of every server address in ext and report
// the source of every datagram, by destination.
func (l *relLab) udpServers() map[string]chan netip.AddrPort {
	l.t.Helper()
	out := map[string]chan netip.AddrPort{}
	for _, s := range []string{relServer1, relServer2, relServer3} {
		var c *net.UDPConn
		err := l.inNS("ext", func() (err error) {
			c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s+":"+relUDPPort)))
			return err
		})
		if err != nil {
			l.t.Fatal(err)
		}
		l.t.Cleanup(func() { c.Close() })
		ch := make(chan netip.AddrPort, 64)
		out[s] = ch
		go func() {
			buf := make([]byte, 64)
			for {
				_, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				ch <- from
			}
		}()
	}
	return out
}

// send sends one datagram from the pod, from port, to server.
func (l *relLab) send(port int, server string) { l.sendFrom("pod", relPod, port, server) }

// sendFrom sends one datagram from src:port in role's namespace to server.
func (l *relLab) sendFrom(role, src string, port int, server string) {
	l.t.Helper()
	err := l.inNS(role, func() error {
		c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), uint16(port))),
			net.UDPAddrFromAddrPort(netip.MustParseAddrPort(server+":"+relUDPPort)))
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("x"))
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
}

// expectFrom sends from port to server and waits for the server to see
// the datagram from want.
func (l *relLab) expectFrom(seen map[string]chan netip.AddrPort, port int, server, want string) {
	l.t.Helper()
	l.send(port, server)
	select {
	case got := <-seen[server]:
		if got.Addr() != netip.MustParseAddr(want) {
			l.t.Fatalf("%s saw the pod's datagram from %s, want %s", server, got, want)
		}
	case <-time.After(3 * time.Second):
		l.t.Fatalf("%s saw nothing from port %d, want a datagram from %s", server, port, want)
	}
}

// expectNothing sends from port to server and checks that nothing leaves:
// neither SNATed nor masqueraded nor as it is.
func (l *relLab) expectNothing(seen map[string]chan netip.AddrPort, port int, server string) {
	l.t.Helper()
	l.send(port, server)
	select {
	case got := <-seen[server]:
		l.t.Fatalf("%s saw the pod's datagram from %s: it should have been dropped", server, got)
	case <-time.After(relWaitLeak):
	}
}

func (l *relLab) addrs(role string) string {
	l.t.Helper()
	return l.ip(role, "-4", "addr", "show", "dev", relUplink)
}

func (l *relLab) hasAddr(role, ip string) bool {
	l.t.Helper()
	return strings.Contains(l.addrs(role), " "+ip+"/")
}

func (l *relLab) flows(pred func(conntrack.Flow) bool) int {
	l.t.Helper()
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: l.fd("gw")})
	if err != nil {
		l.t.Fatal(err)
	}
	defer c.Close()
	flows, err := c.DumpFilter(conntrack.NewFilter().Family(tinetfilter.ProtoIPv4), nil)
	if err != nil {
		l.t.Fatal(err)
	}
	n := 0
	for _, f := range flows {
		if pred(f) {
			n++
		}
	}
	return n
}

func snatTo(ip string) func(conntrack.Flow) bool {
	return func(f conntrack.Flow) bool { return f.TupleReply.IP.DestinationAddress == netip.MustParseAddr(ip) }
}

func relGateway(name, egress, dst string) selector.PolicyState {
	return selector.PolicyState{Name: name, Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr(egress),
		Sources: []netip.Addr{netip.MustParseAddr(relPod)}, Destinations: []netip.Prefix{netip.MustParsePrefix(dst)}}
}

func mustVerify(t *testing.T, d *Dataplane, when string) {
	t.Helper()
	drift, err := d.Verify(ctxT(t))
	if err != nil || drift != "" {
		t.Fatalf("%s: verify: %q %v", when, drift, err)
	}
}

func counters(t *testing.T, d *Dataplane) map[string]PolicyCounters {
	t.Helper()
	cs, err := d.Dump(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]PolicyCounters{}
	for _, c := range cs {
		out[c.Policy+"/"+string(c.Mode)] = c
	}
	return out
}

// TestRelease: Release removes only the given IPs that egressnat added,
// turns the SNAT to any given IP into a drop in one transaction (the
// pod's traffic leaves neither SNATed, nor with the node IP, nor as it
// is), deletes the conntrack entries SNATed to them, keeps the cache true
// (Verify right after finds nothing), and the next Apply converges from
// it, whether it takes the IP back or gives it up, with the cache or
// without (a restarted agent).
func TestRelease(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	// An address someone else put on the uplink, used as an egress IP.
	l.ip("gw", "addr", "add", relForeign+"/24", "dev", relUplink)
	d := l.dataplane(0)
	st := selector.NodeState{
		Policies: []selector.PolicyState{
			relGateway("web", relFloat1, relServer1+"/32"),
			relGateway("api", relFloat2, relServer2+"/32"),
			relGateway("legacy", relForeign, relServer3+"/32"),
		},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24"), netip.MustParsePrefix(relFloat2 + "/24"), netip.MustParsePrefix(relForeign + "/24")},
	}
	r := mustApply(t, d, st)
	if !slices.Equal(r.Foreign, addrList(relForeign)) || len(r.Conflicts) != 0 {
		t.Fatalf("apply: foreign %v conflicts %v", r.Foreign, r.Conflicts)
	}
	// A pod event (sources only: the incremental path, which reads no
	// address) still reports the foreign address: the agent publishes
	// what the last Apply reports, and an empty list would let the
	// operator assign an address something else holds.
	inc := st
	inc.Policies = slices.Clone(st.Policies)
	inc.Policies[0].Sources = append(slices.Clone(inc.Policies[0].Sources), netip.MustParseAddr("10.244.1.99"))
	r = mustApply(t, d, inc)
	if r.AddrsAdded != 0 || len(r.ChainsRebuilt) != 0 || r.ElementsAdded == 0 {
		t.Fatalf("a source added did not take the incremental path: %+v", r)
	}
	if !slices.Equal(r.Foreign, addrList(relForeign)) {
		t.Fatalf("incremental apply: foreign %v, want %s", r.Foreign, relForeign)
	}
	r = mustApply(t, d, st)
	if !slices.Equal(r.Foreign, addrList(relForeign)) {
		t.Fatalf("apply back: foreign %v, want %s", r.Foreign, relForeign)
	}
	l.expectFrom(seen, 5001, relServer1, relFloat1)
	l.expectFrom(seen, 5002, relServer2, relFloat2)
	l.expectFrom(seen, 5003, relServer3, relForeign)
	if l.flows(snatTo(relFloat1)) != 1 || l.flows(snatTo(relForeign)) != 1 || l.flows(snatTo(relFloat2)) != 1 {
		t.Fatal("conntrack entries of the SNATed flows missing")
	}

	rr, err := d.Release(ctxT(t), addrList(relFloat1, relForeign))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("release: %+v", rr)
	if !slices.Equal(rr.AddrsRemoved, addrList(relFloat1)) || !slices.Equal(rr.NotOwned, addrList(relForeign)) ||
		rr.RulesChanged != 2 || !slices.Equal(rr.Unrecorded, addrList(relFloat1)) || rr.Transactions != 1 || rr.ConntrackDeleted != 2 || rr.Duration <= 0 {
		t.Fatalf("release result %+v", rr)
	}
	if !l.hasAddr("gw", relFloat2) || !l.hasAddr("gw", relForeign) || !l.hasAddr("gw", relGW) || l.hasAddr("gw", relFloat1) {
		t.Fatalf("uplink after release:\n%s", l.addrs("gw"))
	}
	if l.flows(snatTo(relFloat1)) != 0 || l.flows(snatTo(relForeign)) != 0 || l.flows(snatTo(relFloat2)) != 1 {
		t.Fatal("conntrack: the released IPs' entries must go, the others stay")
	}
	// The cached table is the kernel's.
	mustVerify(t, d, "right after release")
	post := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", chainPostrouting)
	t.Logf("postrouting after release:\n%s", post)
	for _, want := range []string{
		`ip saddr @src-web ip daddr @dst-web counter packets 0 bytes 0 drop comment "policy web: drop (192.0.2.100 released)"`,
		`ip saddr @src-legacy ip daddr @dst-legacy counter packets 0 bytes 0 drop comment "policy legacy: drop (192.0.2.102 released)"`,
		"snat to " + relFloat2,
	} {
		if !strings.Contains(post, want) {
			t.Errorf("postrouting lacks %q", want)
		}
	}
	if strings.Contains(post, "snat to "+relFloat1) || strings.Contains(post, "snat to "+relForeign) {
		t.Error("postrouting still SNATs to a released IP")
	}
	if floating := l.exec("gw", "nft", "list", "set", "ip", "egressnat", setFloating); strings.Contains(floating, relFloat1) || !strings.Contains(floating, relFloat2) {
		t.Errorf("floating record:\n%s", floating)
	}
	// Same flows again (their entries are gone, so they meet the drop
	// rule), and new ones: nothing leaves; the other policy still works.
	l.expectNothing(seen, 5001, relServer1)
	l.expectNothing(seen, 5011, relServer1)
	l.expectNothing(seen, 5003, relServer3)
	l.expectFrom(seen, 5002, relServer2, relFloat2)
	c := counters(t, d)
	if c["web/"+string(selector.ModeDrop)].Packets < 2 || c["legacy/"+string(selector.ModeDrop)].Packets < 1 {
		t.Fatalf("drop counters: %+v", c)
	}

	// The next Apply with the same state takes the IP back (probe,
	// address, SNAT) and converges.
	r = mustApply(t, d, st)
	if r.Incremental || !slices.Equal(r.Probed, addrList(relFloat1)) || !slices.Equal(r.Announced, addrList(relFloat1)) || len(r.Conflicts) != 0 {
		t.Fatalf("apply after release: %+v", r)
	}
	mustVerify(t, d, "apply after release")
	if !l.hasAddr("gw", relFloat1) {
		t.Fatal("the floating IP was not taken back")
	}
	l.expectFrom(seen, 5021, relServer1, relFloat1)
	l.expectFrom(seen, 5023, relServer3, relForeign)

	// Released again, then the IP moves away for good: the policy is
	// rerouted to the peer.
	if _, err := d.Release(ctxT(t), addrList(relFloat1)); err != nil {
		t.Fatal(err)
	}
	mustVerify(t, d, "second release")
	moved := st
	moved.Policies = slices.Clone(st.Policies)
	moved.Policies[0].Mode, moved.Policies[0].NextHop = selector.ModeReroute, netip.MustParseAddr(relPeer)
	moved.FloatingIPs = moved.FloatingIPs[1:]
	mustApply(t, d, moved)
	mustVerify(t, d, "apply after the move")
	if post := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", chainPostrouting); strings.Contains(post, "src-web") {
		t.Fatalf("postrouting keeps a rule of the moved policy:\n%s", post)
	}

	// A restarted agent (no cache) releases from what it reads, and its
	// next Apply converges too.
	d2 := l.dataplane(0)
	rr, err = d2.Release(ctxT(t), addrList(relFloat2))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rr.AddrsRemoved, addrList(relFloat2)) || rr.RulesChanged != 1 || rr.ConntrackDeleted != 1 {
		t.Fatalf("release without cache: %+v", rr)
	}
	l.expectNothing(seen, 5002, relServer2)
	gone := moved
	gone.Policies = slices.Clone(moved.Policies)
	gone.Policies[1].Mode, gone.Policies[1].NextHop = selector.ModeReroute, netip.MustParseAddr(relPeer)
	gone.FloatingIPs = gone.FloatingIPs[1:]
	mustApply(t, d2, gone)
	mustVerify(t, d2, "apply after a release without cache")
	if l.hasAddr("gw", relFloat2) || !l.hasAddr("gw", relForeign) {
		t.Fatalf("uplink:\n%s", l.addrs("gw"))
	}

	// ReleaseFloating drops every Gateway rule and keeps addresses that
	// are not ours.
	if err := d2.ReleaseFloating(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if post := l.exec("gw", "nft", "list", "chain", "ip", "egressnat", chainPostrouting); strings.Contains(post, "snat to 192.0.2.") {
		t.Fatalf("postrouting still SNATs after ReleaseFloating:\n%s", post)
	}
	if !l.hasAddr("gw", relForeign) {
		t.Fatal("ReleaseFloating removed an address that is not ours")
	}
	l.expectNothing(seen, 5033, relServer3)
	mustVerify(t, d2, "release floating")
}

// TestApplyARPConflict: a floating IP another host on the segment answers
// for is not taken (Result.Conflicts) and its policy fails closed; once
// the other host lets it go, the next Apply with the same state takes it.
func TestApplyARPConflict(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	l.ip("peer", "addr", "add", relFloat1+"/24", "dev", relUplink)
	d := l.dataplane(0)
	st := selector.NodeState{
		Policies:    []selector.PolicyState{relGateway("web", relFloat1, relServer1+"/32"), relGateway("api", relFloat2, relServer2+"/32")},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24"), netip.MustParsePrefix(relFloat2 + "/24")},
	}
	r := mustApply(t, d, st)
	if !slices.Equal(r.Conflicts, addrList(relFloat1)) || !slices.Equal(r.Probed, addrList(relFloat1, relFloat2)) {
		t.Fatalf("conflicts %v probed %v", r.Conflicts, r.Probed)
	}
	if slices.Contains(r.Announced, netip.MustParseAddr(relFloat1)) {
		t.Fatalf("announced an IP another host holds: %v", r.Announced)
	}
	if l.hasAddr("gw", relFloat1) || !l.hasAddr("gw", relFloat2) {
		t.Fatalf("uplink:\n%s", l.addrs("gw"))
	}
	if rules := l.exec("gw", "nft", "list", "table", "ip", "egressnat"); strings.Contains(rules, "snat to "+relFloat1) {
		t.Fatalf("SNAT to an IP another host holds:\n%s", rules)
	}
	mustVerify(t, d, "apply with a conflict")
	l.expectNothing(seen, 6001, relServer1)
	l.expectFrom(seen, 6002, relServer2, relFloat2)
	if c := counters(t, d); c["web/"+string(selector.ModeDrop)].Packets == 0 {
		t.Fatalf("the policy of the conflicting IP does not fail closed: %+v", c)
	}

	// Still held elsewhere: the same state probes again, still not taken.
	if r := mustApply(t, d, st); !slices.Equal(r.Conflicts, addrList(relFloat1)) || r.Incremental {
		t.Fatalf("second apply: %+v", r)
	}
	// The other host lets it go: the next Apply takes it.
	l.ip("peer", "addr", "del", relFloat1+"/24", "dev", relUplink)
	r = mustApply(t, d, st)
	if len(r.Conflicts) != 0 || !slices.Equal(r.Probed, addrList(relFloat1)) || !slices.Equal(r.Announced, addrList(relFloat1)) {
		t.Fatalf("apply once free: %+v", r)
	}
	if !l.hasAddr("gw", relFloat1) {
		t.Fatal("the free IP was not taken")
	}
	mustVerify(t, d, "apply once free")
	l.expectFrom(seen, 6003, relServer1, relFloat1)
	// And nothing more to probe.
	if r := mustApply(t, d, st); len(r.Probed) != 0 || r.Changed() {
		t.Fatalf("steady apply: %+v", r)
	}
}

// TestARPProbeWindow: an IP nobody answers for is added after one window
// (the probes of all new IPs share it); an Apply with no new IP does not
// probe, and a negative window disables the probe.
func TestARPProbeWindow(t *testing.T) {
	l := newRelLab(t)
	const window = 300 * time.Millisecond
	d := l.dataplane(window)
	if d.cfg.ARPProbeWait != window {
		t.Fatalf("probe wait %v", d.cfg.ARPProbeWait)
	}
	st := selector.NodeState{
		Policies:    []selector.PolicyState{relGateway("web", relFloat1, relServer1+"/32"), relGateway("api", relFloat2, relServer2+"/32")},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24"), netip.MustParsePrefix(relFloat2 + "/24")},
	}
	start := time.Now()
	r := mustApply(t, d, st)
	took := time.Since(start)
	t.Logf("apply with two new IPs: %v, probe window %v", took, r.ProbeWait)
	if !slices.Equal(r.Probed, addrList(relFloat1, relFloat2)) || len(r.Conflicts) != 0 || r.AddrsAdded != 2 {
		t.Fatalf("apply: %+v", r)
	}
	// One window for both IPs, waited out in full (nobody answered), and
	// no more: bounded by the configuration (the slack only absorbs
	// scheduling).
	if r.ProbeWait < window || r.ProbeWait > window+time.Second {
		t.Fatalf("probe window %v, configured %v", r.ProbeWait, window)
	}
	if r := mustApply(t, d, st); len(r.Probed) != 0 || r.ProbeWait != 0 {
		t.Fatalf("no new IP, yet probed: %+v", r)
	}
	// Disabled: the IP is added without a probe.
	d2 := l.dataplane(-1)
	st.FloatingIPs = append(st.FloatingIPs, netip.MustParsePrefix("192.0.2.103/24"))
	r = mustApply(t, d2, st)
	if len(r.Probed) != 0 || r.ProbeWait != 0 || r.AddrsAdded != 1 {
		t.Fatalf("probe disabled: %+v", r)
	}
}

// arpCapture records the ARP frames seen on role's uplink until stopped.
type arpCapture struct {
	fd     int
	frames chan arpPacket
}

func (l *relLab) captureARP(role string) *arpCapture {
	l.t.Helper()
	c := &arpCapture{frames: make(chan arpPacket, 256)}
	err := l.inNS(role, func() error {
		ifi, err := net.InterfaceByName(relUplink)
		if err != nil {
			return err
		}
		c.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(ethPARP)))
		if err != nil {
			return err
		}
		tv := unix.Timeval{Usec: 100_000}
		if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		return unix.Bind(c.fd, &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: ifi.Index})
	})
	if err != nil {
		l.t.Fatal(err)
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	l.t.Cleanup(func() {
		close(done)
		<-stopped
		unix.Close(c.fd)
	})
	go func() {
		defer close(stopped)
		buf := make([]byte, 256)
		for {
			select {
			case <-done:
				return
			default:
			}
			n, _, err := unix.Recvfrom(c.fd, buf, 0)
			if err != nil {
				continue
			}
			if p, ok := parseARP(buf[:n]); ok {
				select {
				case c.frames <- p:
				default:
				}
			}
		}
	}()
	return c
}

// collect returns the frames seen within d.
func (c *arpCapture) collect(d time.Duration) []arpPacket {
	var out []arpPacket
	timeout := time.After(d)
	for {
		select {
		case p := <-c.frames:
			out = append(out, p)
		case <-timeout:
			return out
		}
	}
}

func countARP(ps []arpPacket, mac net.HardwareAddr, pred func(arpPacket) bool) int {
	n := 0
	for _, p := range ps {
		if p.senderHW.String() == mac.String() && pred(p) {
			n++
		}
	}
	return n
}

func isGARP(ip string) func(arpPacket) bool {
	return func(p arpPacket) bool {
		return p.op == arpRequest && p.senderIP == netip.MustParseAddr(ip) && p.targetIP == p.senderIP
	}
}

// TestRepeatedGARP: a peer sees the probes, then every announcement of the
// schedule; announcements stop at once when the IP is released.
func TestRepeatedGARP(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, 100 * time.Millisecond, 250 * time.Millisecond, 450 * time.Millisecond}

	l := newRelLab(t)
	d := l.dataplane(0)
	mac, err := net.ParseMAC(strings.TrimSpace(l.exec("gw", "cat", "/sys/class/net/"+relUplink+"/address")))
	if err != nil {
		t.Fatal(err)
	}
	capture := l.captureARP("peer")
	st := selector.NodeState{
		Policies:    []selector.PolicyState{relGateway("web", relFloat1, relServer1+"/32")},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
	}
	r := mustApply(t, d, st)
	if !slices.Equal(r.Announced, addrList(relFloat1)) {
		t.Fatalf("announced %v", r.Announced)
	}
	seen := capture.collect(garpSchedule[len(garpSchedule)-1] + 600*time.Millisecond)
	probes := countARP(seen, mac, func(p arpPacket) bool {
		return p.op == arpRequest && p.senderIP.IsUnspecified() && p.targetIP == netip.MustParseAddr(relFloat1)
	})
	garps := countARP(seen, mac, isGARP(relFloat1))
	t.Logf("peer saw %d probes, %d announcements (%d ARP frames)", probes, garps, len(seen))
	if probes != arpProbes {
		t.Errorf("probes seen %d, want %d", probes, arpProbes)
	}
	if garps != GratuitousARPs() || GratuitousARPs() != 4 {
		t.Errorf("announcements seen %d, want %d", garps, GratuitousARPs())
	}
	// The probes come before the first announcement.
	for i, p := range seen {
		if isGARP(relFloat1)(p) {
			if later := countARP(seen[i:], mac, func(p arpPacket) bool { return p.senderIP.IsUnspecified() }); later != 0 {
				t.Errorf("%d probes after the first announcement", later)
			}
			break
		}
	}

	// Released while announcing: no announcement after Release returns.
	garpSchedule = []time.Duration{0, 300 * time.Millisecond, 600 * time.Millisecond, 900 * time.Millisecond}
	st.Policies = append(st.Policies, relGateway("api", relFloat2, relServer2+"/32"))
	st.FloatingIPs = append(st.FloatingIPs, netip.MustParsePrefix(relFloat2+"/24"))
	mustApply(t, d, st)
	if _, err := d.Release(ctxT(t), addrList(relFloat2)); err != nil {
		t.Fatal(err)
	}
	before := countARP(capture.collect(100*time.Millisecond), mac, isGARP(relFloat2))
	after := countARP(capture.collect(garpSchedule[len(garpSchedule)-1]+300*time.Millisecond), mac, isGARP(relFloat2))
	t.Logf("announcements of the released IP: %d up to release, %d after", before, after)
	if before != 1 || after != 0 {
		t.Fatalf("announcements of a released IP: %d up to the release, %d after it (want 1, 0)", before, after)
	}
}

// TestGARPOnlyWithLiveLease: gratuitous ARP leaves by a packet socket,
// past the arp table's lease; a repeat goes out only while the IP's lease
// is live. An agent that did not run for longer than the lease (stopped,
// starved) must not announce, when it resumes, an IP that may have moved
// meanwhile.
func TestGARPOnlyWithLiveLease(t *testing.T) {
	saved := garpSchedule
	t.Cleanup(func() { garpSchedule = saved })
	garpSchedule = []time.Duration{0, 100 * time.Millisecond, 600 * time.Millisecond, 900 * time.Millisecond}

	l := newRelLab(t)
	// No KeepARP: the lease written by the Apply runs out after 300 ms.
	d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd("gw"), Logger: zaptest.NewLogger(t), ARPProbeWait: -1, ARPLease: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	mac, err := net.ParseMAC(strings.TrimSpace(l.exec("gw", "cat", "/sys/class/net/"+relUplink+"/address")))
	if err != nil {
		t.Fatal(err)
	}
	capture := l.captureARP("peer")
	mustApply(t, d, selector.NodeState{
		Policies:    []selector.PolicyState{relGateway("web", relFloat1, relServer1+"/32")},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
	})
	seen := capture.collect(garpSchedule[len(garpSchedule)-1] + 400*time.Millisecond)
	if garps := countARP(seen, mac, isGARP(relFloat1)); garps != 2 {
		t.Fatalf("announcements seen %d, want 2 (at once and after 100 ms, within the lease; none at 600 and 900 ms, after it ran out)", garps)
	}
}
