package bpf

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestPodInterfaces(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	const uplink = 2
	for _, tc := range []struct {
		name   string
		routes []Route
		pods   []netip.Addr
		want   []int
	}{
		{"routed /32s",
			[]Route{{p("0.0.0.0/0"), uplink}, {p("10.244.1.2/32"), 5}, {p("10.244.1.3/32"), 6}, {p("10.244.1.4/32"), 7}},
			[]netip.Addr{a("10.244.1.2"), a("10.244.1.3")},
			[]int{5, 6}},
		{"bridge CIDR",
			[]Route{{p("0.0.0.0/0"), uplink}, {p("10.244.0.0/24"), 3}},
			[]netip.Addr{a("10.244.0.5"), a("10.244.0.6")},
			[]int{3}},
		{"longest prefix wins",
			[]Route{{p("10.244.0.0/16"), 3}, {p("10.244.0.7/32"), 5}, {p("10.244.0.0/24"), 4}},
			[]netip.Addr{a("10.244.0.7"), a("10.244.0.8"), a("10.244.9.9")},
			[]int{3, 4, 5}},
		{"longest prefix wins, only it",
			[]Route{{p("10.244.0.0/16"), 3}, {p("10.244.0.7/32"), 5}},
			[]netip.Addr{a("10.244.0.7")},
			[]int{5}},
		{"the uplink is excluded",
			[]Route{{p("0.0.0.0/0"), uplink}, {p("10.244.0.0/24"), 3}},
			[]netip.Addr{a("10.244.0.5"), a("8.8.8.8")},
			[]int{3}},
		{"a pod behind the uplink does not fall back to a shorter route",
			[]Route{{p("0.0.0.0/0"), 9}, {p("192.168.1.0/24"), uplink}},
			[]netip.Addr{a("192.168.1.50")},
			nil},
		{"uncovered pods are skipped",
			[]Route{{p("10.244.0.0/24"), 3}},
			[]netip.Addr{a("10.245.0.1"), a("10.244.0.1")},
			[]int{3}},
		{"no interface 0",
			[]Route{{p("10.244.0.0/16"), 3}, {p("10.244.0.0/24"), 0}},
			[]netip.Addr{a("10.244.0.1")},
			nil},
		{"the first of equal prefixes wins",
			[]Route{{p("10.244.0.0/24"), 3}, {p("10.244.0.0/24"), 4}},
			[]netip.Addr{a("10.244.0.1")},
			[]int{3}},
		{"unmasked destinations, mapped pods, IPv6 skipped",
			[]Route{{p("10.244.0.1/24"), 3}, {p("::/0"), 8}, {p("::ffff:10.9.0.0/112"), 8}},
			[]netip.Addr{a("::ffff:10.244.0.9"), a("fd00::1"), a("10.9.0.1")},
			[]int{3}},
		{"nothing", nil, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := PodInterfaces(tc.routes, tc.pods, uplink)
			want := map[int]bool{}
			for _, i := range tc.want {
				want[i] = true
			}
			if got == nil || !maps.Equal(got, want) {
				t.Fatalf("PodInterfaces = %v, want %v", got, want)
			}
		})
	}
}

// fakeSub is one subscription of TestFollow's fake netlink.
type fakeSub struct {
	in     chan int      // updates to deliver
	fail   chan struct{} // the error callback, then the end
	close  chan struct{} // the end, without an error
	done   <-chan struct{}
	closed chan struct{} // closed once ch is
}

// TestFollow: updates kick (the relevant ones), a subscription that
// breaks, with an error or without, kicks and is made again, also after
// a refused attempt, and all of it ends with the context.
func TestFollow(t *testing.T) {
	old := resubscribeMin
	resubscribeMin = time.Millisecond
	t.Cleanup(func() { resubscribeMin = old })
	subs := make(chan fakeSub, 10)
	var calls, refuse atomic.Int32
	subscribe := func(ch chan<- int, done <-chan struct{}, onErr func(error)) error {
		calls.Add(1)
		if refuse.Load() > 0 {
			refuse.Add(-1)
			return errors.New("refused")
		}
		f := fakeSub{in: make(chan int), fail: make(chan struct{}), close: make(chan struct{}), done: done, closed: make(chan struct{})}
		go func() { // as the library does: one goroutine sends, then closes ch
			defer close(f.closed)
			defer close(ch)
			for {
				select {
				case v := <-f.in:
					select {
					case ch <- v:
					case <-done:
						return
					}
				case <-f.fail:
					onErr(errors.New("receive failed"))
					return
				case <-f.close:
					return
				case <-done:
					return
				}
			}
		}()
		subs <- f
		return nil
	}
	next := func() fakeSub {
		t.Helper()
		select {
		case f := <-subs:
			return f
		case <-time.After(5 * time.Second):
			t.Fatal("no new subscription within 5s")
			return fakeSub{}
		}
	}
	var kicks atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	even := func(v int) bool { return v%2 == 0 }
	if err := follow(ctx, &wg, func() { kicks.Add(1) }, subscribe, even); err != nil {
		t.Fatal(err)
	}
	f := next()
	f.in <- 1 // not relevant
	f.in <- 2
	waitFor(t, "a kick for an update", func() bool { return kicks.Load() >= 1 })
	refuse.Store(1)
	close(f.fail)
	f = next() // after one refused attempt
	waitFor(t, "two kicks for a broken subscription", func() bool { return kicks.Load() >= 3 })
	f.in <- 4
	waitFor(t, "a kick on the new subscription", func() bool { return kicks.Load() >= 4 })
	close(f.close)
	f = next()
	waitFor(t, "two kicks for a closed subscription", func() bool { return kicks.Load() >= 6 })
	cancel()
	wg.Wait()
	select {
	case <-f.closed:
	default:
		t.Fatal("the last subscription outlived the context")
	}
	if k, c := kicks.Load(), calls.Load(); k != 6 || c != 4 {
		t.Fatalf("%d kicks and %d subscribe calls, want 6 and 4", k, c)
	}
	refuse.Store(1)
	if err := follow(ctx, &wg, func() {}, subscribe, even); err == nil {
		t.Fatal("follow: no error when subscribing fails")
	}
}

// waitFor polls cond until it holds, failing the test after 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 5s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The interface lab: namespace bwHost with an uplink (bwUplink, one end of
// a veth pair, its
// address bwUplinkIP, the default route), a bridge (bwBridge,
// 10.244.8.1/24) for bridged pods, and the pods' namespaces (enat-bw-pN)
// added by the test: routed pods have a /32 route to their host-side
// veth, bridged ones a port on the bridge. The host counts, before
// routing, the packets of marks 0x100 to 0x400 (class1 to class4).
const (
	bwHost   = "enat-bw-host"
	bwTable  = "enat_bw_test"
	bwUplink = "bwup0"
	bwBridge = "bwbr0"
)

var bwUplinkIP = netip.MustParseAddr("192.0.2.1")

func bwLab(t *testing.T) (bpffs string, uplink, bridge int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, bpffs, BPF programs")
	}
	newNS(t, bwHost)
	run(t, "", "ip", "-n", bwHost, "link", "set", "lo", "up")
	run(t, "", "ip", "-n", bwHost, "link", "add", bwUplink, "type", "veth", "peer", "name", bwUplink+"p") // no dummy here
	run(t, "", "ip", "-n", bwHost, "addr", "add", bwUplinkIP.String()+"/24", "dev", bwUplink)
	run(t, "", "ip", "-n", bwHost, "link", "set", bwUplink, "up")
	run(t, "", "ip", "-n", bwHost, "route", "add", "default", "via", "192.0.2.254", "dev", bwUplink)
	run(t, "", "ip", "-n", bwHost, "link", "add", bwBridge, "type", "bridge")
	run(t, "", "ip", "-n", bwHost, "addr", "add", "10.244.8.1/24", "dev", bwBridge)
	run(t, "", "ip", "-n", bwHost, "link", "set", bwBridge, "up")
	rules := ""
	for i := 1; i <= 4; i++ {
		rules += fmt.Sprintf("\t\tmeta mark & 0x0000ff00 == 0x%08x counter comment \"class%d\"\n", i<<8, i)
	}
	run(t, "table ip "+bwTable+" {\n\tchain pre {\n\t\ttype filter hook prerouting priority raw; policy accept;\n"+rules+"\t}\n}\n",
		"ip", "netns", "exec", bwHost, "nft", "-f", "-")
	bpffs = t.TempDir()
	run(t, "", "mount", "-t", "bpf", "bpf", bpffs)
	t.Cleanup(func() { exec.Command("umount", bpffs).Run() }) //nolint:errcheck
	return bpffs, ifindexOf(t, bwUplink), ifindexOf(t, bwBridge)
}

// newNS adds the network namespace name, deleted when the test ends.
func newNS(t *testing.T, name string) {
	t.Helper()
	exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck // a leftover of a killed run
	run(t, "", "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() }) //nolint:errcheck
}

func ifindexOf(t *testing.T, name string) (idx int) {
	t.Helper()
	inNS(t, bwHost, func() {
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		idx = l.Attrs().Index
	})
	return idx
}

// bwPod is a pod of the interface lab.
type bwPod struct {
	ns      string
	ip      netip.Addr
	hostIf  string
	ifindex int // of hostIf
}

// routedPod adds pod n, 10.244.7.n, behind the host-side veth bwv<n> (of
// index index, when not 0) and a /32 route, as routing CNIs do.
func routedPod(t *testing.T, n, index int) bwPod {
	t.Helper()
	p := bwPod{ns: fmt.Sprintf("enat-bw-p%d", n), ip: netip.AddrFrom4([4]byte{10, 244, 7, byte(n)}), hostIf: fmt.Sprintf("bwv%d", n)}
	newNS(t, p.ns)
	mac := fmt.Sprintf("02:00:00:00:07:%02x", n)
	args := []string{"ip", "-n", bwHost, "link", "add", p.hostIf}
	if index != 0 {
		args = append(args, "index", strconv.Itoa(index))
	}
	run(t, "", append(args, "address", mac, "type", "veth", "peer", "name", "eth0", "netns", p.ns)...)
	run(t, "", "ip", "-n", bwHost, "link", "set", p.hostIf, "up")
	run(t, "", "ip", "-n", p.ns, "link", "set", "lo", "up")
	run(t, "", "ip", "-n", p.ns, "link", "set", "eth0", "up")
	run(t, "", "ip", "-n", p.ns, "addr", "add", p.ip.String()+"/32", "dev", "eth0")
	run(t, "", "ip", "-n", p.ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
	run(t, "", "ip", "-n", p.ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	run(t, "", "ip", "-n", p.ns, "neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
	run(t, "", "ip", "-n", bwHost, "route", "add", p.ip.String()+"/32", "dev", p.hostIf)
	p.ifindex = ifindexOf(t, p.hostIf)
	return p
}

// bridgedPod adds pod n, 10.244.8.n, on a port (bwp<n>) of the bridge, as
// the bridge CNI does.
func bridgedPod(t *testing.T, n int) bwPod {
	t.Helper()
	p := bwPod{ns: fmt.Sprintf("enat-bw-p%d", n), ip: netip.AddrFrom4([4]byte{10, 244, 8, byte(n)}), hostIf: fmt.Sprintf("bwp%d", n)}
	newNS(t, p.ns)
	run(t, "", "ip", "-n", bwHost, "link", "add", p.hostIf, "master", bwBridge, "type", "veth", "peer", "name", "eth0", "netns", p.ns)
	run(t, "", "ip", "-n", bwHost, "link", "set", p.hostIf, "up")
	run(t, "", "ip", "-n", p.ns, "link", "set", "lo", "up")
	run(t, "", "ip", "-n", p.ns, "link", "set", "eth0", "up")
	run(t, "", "ip", "-n", p.ns, "addr", "add", p.ip.String()+"/24", "dev", "eth0")
	run(t, "", "ip", "-n", p.ns, "route", "add", "default", "via", "10.244.8.1", "dev", "eth0")
	p.ifindex = ifindexOf(t, p.hostIf)
	return p
}

// send sends n datagrams from the pod to the host's uplink address; each
// passes the host's prerouting once, synchronously with the transmit.
func (p bwPod) send(t *testing.T, n int) {
	t.Helper()
	inNS(t, p.ns, func() {
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.ip, 0)))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for range n {
			if _, err := c.WriteToUDPAddrPort([]byte("x"), netip.AddrPortFrom(bwUplinkIP, 9)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// marked returns how many of n datagrams from the pod the host counted
// with the mark of class (1 to 4).
func (p bwPod) marked(t *testing.T, class, n int) int {
	t.Helper()
	key := fmt.Sprintf("class%d", class)
	before := bwCounts(t)[key]
	p.send(t, n)
	return bwCounts(t)[key] - before
}

func bwCounts(t *testing.T) map[string]int {
	t.Helper()
	out := run(t, "", "ip", "netns", "exec", bwHost, "nft", "list", "table", "ip", bwTable)
	m := map[string]int{}
	for _, g := range counterRE.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(g[1])
		m[g[2]] = n
	}
	return m
}

func set(idx ...int) map[int]bool {
	m := map[int]bool{}
	for _, i := range idx {
		m[i] = true
	}
	return m
}

func class(n int) Class { return Class{Mark: uint32(n) << 8, Mask: 0xff00} }

// TestInterfaceLifecycle follows pods coming and going as the agent
// would: Watch kicks on a new veth and a new route, Reconcile attaches
// the program to the interfaces PodInterfaces(MainRoutes()) gives
// (routed veths, the bridge), with WithBridgePorts the bridge's ports,
// and detaches it from the others, also when
// a veth was deleted and its index reused; Attached and Inspect agree
// with what marks packets; Remove leaves no pin and no filter.
func TestInterfaceLifecycle(t *testing.T) {
	bpffs, uplink, bridge := bwLab(t)
	dir := filepath.Join(bpffs, "egressnat")
	var c *Classifier
	var kicks atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	inNS(t, bwHost, func() {
		var err error
		if c, err = Load(dir); err != nil {
			t.Fatal(err)
		}
		if err := Watch(ctx, func() { kicks.Add(1) }); err != nil {
			t.Fatal(err)
		}
	})
	closed := false
	t.Cleanup(func() {
		cancel()
		if !closed {
			c.Close() //nolint:errcheck
		}
	})
	host := func(f func()) { t.Helper(); inNS(t, bwHost, f) }
	podIfaces := func(pods ...bwPod) map[int]bool {
		t.Helper()
		ips := []netip.Addr{netip.MustParseAddr("10.9.9.9")} // behind the uplink
		for _, p := range pods {
			ips = append(ips, p.ip)
		}
		var routes []Route
		host(func() {
			var err error
			if routes, err = MainRoutes(); err != nil {
				t.Fatal(err)
			}
		})
		return PodInterfaces(routes, ips, uplink)
	}
	withPorts := func(ifaces map[int]bool) (m map[int]bool) {
		t.Helper()
		host(func() {
			var err error
			if m, err = WithBridgePorts(ifaces, uplink); err != nil {
				t.Fatal(err)
			}
		})
		return m
	}
	reconcile := func(want map[int]bool, wantAttached, wantDetached int) {
		t.Helper()
		host(func() {
			a, d, err := c.Reconcile(want)
			if err != nil || a != wantAttached || d != wantDetached {
				t.Fatalf("Reconcile(%v): %d attached, %d detached, %v; want %d, %d", want, a, d, err, wantAttached, wantDetached)
			}
		})
	}
	attached := func() (m map[int]bool) {
		t.Helper()
		host(func() {
			var err error
			if m, err = c.Attached(); err != nil {
				t.Fatal(err)
			}
		})
		return m
	}
	wantAttached := func(want map[int]bool) {
		t.Helper()
		if got := attached(); !maps.Equal(got, want) {
			t.Fatalf("Attached = %v, want %v", got, want)
		}
	}
	pinned := func(idx int) bool {
		_, err := os.Stat(filepath.Join(dir, pinLinks, strconv.Itoa(idx)))
		return err == nil
	}

	// Watch: a new veth kicks (nothing changed in the namespace since
	// Watch subscribed, so the kick is the veth's).
	p1 := routedPod(t, 1, 0)
	waitFor(t, "kick for a new veth", func() bool { return kicks.Load() > 0 })
	p3 := bridgedPod(t, 3)
	pods := []bwPod{p1, p3}
	want := podIfaces(pods...)
	if !maps.Equal(want, set(p1.ifindex, bridge)) {
		t.Fatalf("PodInterfaces(MainRoutes()) = %v, want %s %d and %s %d", want, p1.hostIf, p1.ifindex, bwBridge, bridge)
	}
	if len(attached()) != 0 {
		t.Fatal("attached before Reconcile")
	}
	reconcile(want, 2, 0)
	reconcile(want, 0, 0)
	wantAttached(want)
	host(func() {
		if got, err := WithBridgePorts(set(bridge, p1.ifindex), p3.ifindex); err != nil || !maps.Equal(got, set(bridge, p1.ifindex)) {
			t.Fatalf("WithBridgePorts excluding %s: %v, %v", p3.hostIf, got, err)
		}
	})
	host(func() {
		if got, err := BridgePorts(want, uplink); err != nil || !maps.Equal(got, set(p1.ifindex, p3.ifindex)) {
			t.Fatalf("BridgePorts(%v) = %v, %v; want %s %d and the bridge's port %s %d", want, got, err, p1.hostIf, p1.ifindex, p3.hostIf, p3.ifindex)
		}
	})
	want = withPorts(want)
	if !maps.Equal(want, set(p1.ifindex, bridge, p3.ifindex)) {
		t.Fatalf("WithBridgePorts = %v, want %s %d, %s %d and its port %s %d", want, p1.hostIf, p1.ifindex, bwBridge, bridge, p3.hostIf, p3.ifindex)
	}
	host(func() {
		if _, _, err := c.Sync(map[netip.Addr]Class{p1.ip: class(1), p3.ip: class(3),
			netip.MustParseAddr("10.244.7.2"): class(2), netip.MustParseAddr("10.244.7.4"): class(4)}); err != nil {
			t.Fatal(err)
		}
	})
	if n := p1.marked(t, 1, 3); n != 3 {
		t.Fatalf("routed pod: %d of 3 marked", n)
	}
	// On the bridge only, the program marks a bridged pod's packets too
	// late for prerouting where br_netfilter runs it (see WithBridgePorts).
	if brnf := run(t, "", "ip", "netns", "exec", bwHost, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"); brnf == "1\n" {
		if n := p3.marked(t, 3, 3); n != 0 {
			t.Fatalf("bridged pod, the bridge alone attached, br_netfilter on: %d of 3 marked; WithBridgePorts's doc is wrong", n)
		}
	}
	reconcile(want, 1, 0) // the bridge's port
	wantAttached(want)
	if n := p3.marked(t, 3, 3); n != 3 {
		t.Fatalf("bridged pod: %d of 3 marked", n)
	}

	// A new pod: its veth is not classified until Reconcile.
	p2 := routedPod(t, 2, 0)
	pods = append(pods, p2)
	if n := p2.marked(t, 2, 2); n != 0 {
		t.Fatalf("new pod before Reconcile: %d of 2 marked", n)
	}
	want = withPorts(podIfaces(pods...))
	reconcile(want, 1, 0)
	wantAttached(set(p1.ifindex, p2.ifindex, bridge, p3.ifindex))
	if n := p2.marked(t, 2, 2); n != 2 {
		t.Fatalf("new pod after Reconcile: %d of 2 marked", n)
	}

	// Watch: a new route kicks.
	before := kicks.Load()
	run(t, "", "ip", "-n", bwHost, "route", "add", "10.244.7.99/32", "dev", p2.hostIf)
	waitFor(t, "kick for a new route", func() bool { return kicks.Load() > before })

	// p1's veth goes, and its index comes back on p4's: the pinned link
	// of p1 is defunct, and no attachment of p4's veth.
	before = kicks.Load()
	run(t, "", "ip", "-n", bwHost, "link", "del", p1.hostIf)
	waitFor(t, "kick for a deleted veth", func() bool { return kicks.Load() > before })
	wantAttached(set(p2.ifindex, bridge, p3.ifindex))
	if !pinned(p1.ifindex) {
		t.Fatal("the defunct link's pin is already gone")
	}
	p4 := routedPod(t, 4, p1.ifindex)
	if p4.ifindex != p1.ifindex {
		t.Fatalf("%s got index %d, not %d", p4.hostIf, p4.ifindex, p1.ifindex)
	}
	wantAttached(set(p2.ifindex, bridge, p3.ifindex))
	if n := p4.marked(t, 4, 2); n != 0 {
		t.Fatalf("reused index before Reconcile: %d of 2 marked", n)
	}
	pods = []bwPod{p2, p3, p4}
	want = withPorts(podIfaces(pods...))
	if !maps.Equal(want, set(p2.ifindex, p4.ifindex, bridge, p3.ifindex)) {
		t.Fatalf("PodInterfaces(MainRoutes()) = %v", want)
	}
	reconcile(want, 1, 1) // the defunct link unpinned, p4 attached
	wantAttached(want)
	if n := p4.marked(t, 4, 2); n != 2 {
		t.Fatalf("reused index after Reconcile: %d of 2 marked", n)
	}

	// A veth deleted while nothing is watching: Reconcile unpins its link.
	run(t, "", "ip", "-n", bwHost, "link", "del", p4.hostIf)
	want = withPorts(podIfaces(p2, p3))
	reconcile(want, 0, 1)
	if pinned(p4.ifindex) {
		t.Fatal("the deleted veth's link is still pinned")
	}
	wantAttached(set(p2.ifindex, bridge, p3.ifindex))

	// Not wanted any more: detached, unpinned, not classified.
	reconcile(set(p2.ifindex), 0, 2)
	wantAttached(set(p2.ifindex))
	if pinned(bridge) || pinned(p3.ifindex) {
		t.Fatal("the bridge's or its port's link is still pinned")
	}
	if n := p3.marked(t, 3, 2); n != 0 {
		t.Fatalf("bridged pod after its detach: %d of 2 marked", n)
	}

	// Detach agrees with Attached.
	host(func() {
		if err := c.Detach(p2.ifindex); err != nil {
			t.Fatal(err)
		}
	})
	wantAttached(set())
	if n := p2.marked(t, 2, 2); n != 0 {
		t.Fatalf("after Detach: %d of 2 marked", n)
	}

	// The tc fallback: a clsact filter on the bridge's port counts as
	// attached, Reconcile keeps it when wanted and deletes it when not;
	// another filter on the same qdisc stays.
	port := p3.ifindex
	foreign := foreignFilter(t, port)
	host(func() {
		if err := c.attachTC(port); err != nil {
			t.Fatal(err)
		}
	})
	wantAttached(set(port))
	reconcile(set(port, p2.ifindex), 1, 0) // p2 by tcx, the filter kept
	wantAttached(set(port, p2.ifindex))
	if n := p3.marked(t, 3, 2); n != 2 {
		t.Fatalf("bridged pod by the tc filter: %d of 2 marked", n)
	}
	reconcile(set(p2.ifindex), 0, 1)
	wantAttached(set(p2.ifindex))
	if n := p3.marked(t, 3, 2); n != 0 {
		t.Fatalf("bridged pod after the tc filter's removal: %d of 2 marked", n)
	}
	host(func() {
		if err := c.attachTC(port); err != nil {
			t.Fatal(err)
		}
	})

	// Inspect, without the program: entries and attachments.
	var snap Snapshot
	host(func() {
		var err error
		if snap, err = Inspect(dir); err != nil {
			t.Fatal(err)
		}
	})
	wantEntries := map[netip.Addr]Class{netip.MustParseAddr("10.244.7.1"): class(1), netip.MustParseAddr("10.244.7.2"): class(2),
		netip.MustParseAddr("10.244.8.3"): class(3), netip.MustParseAddr("10.244.7.4"): class(4)}
	if !maps.Equal(snap.Entries, wantEntries) {
		t.Fatalf("Inspect: entries %v, want %v", snap.Entries, wantEntries)
	}
	wantIfs := []AttachedInterface{{p2.ifindex, p2.hostIf, "tcx"}, {port, p3.hostIf, "tc"}}
	if port < p2.ifindex {
		wantIfs[0], wantIfs[1] = wantIfs[1], wantIfs[0]
	}
	if fmt.Sprint(snap.Interfaces) != fmt.Sprint(wantIfs) {
		t.Fatalf("Inspect: interfaces %v, want %v", snap.Interfaces, wantIfs)
	}

	// Remove, the agent gone: no pin, no filter of ours, nothing marked;
	// the other filter and the clsact qdisc stay.
	cancel()
	closed = true
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	host(func() {
		if err := Remove(dir); err != nil {
			t.Fatal(err)
		}
		if s, err := Inspect(dir); err != nil || len(s.Entries) != 0 || len(s.Interfaces) != 0 {
			t.Fatalf("Inspect after Remove: %+v, %v", s, err)
		}
		if fs, err := tcFilters(); err != nil || len(fs) != 0 {
			t.Fatalf("filters after Remove: %v, %v", fs, err)
		}
		fs, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: port}}, netlink.HANDLE_MIN_INGRESS)
		if err != nil || len(fs) != 1 || nameOf(fs[0]) != foreign {
			t.Fatalf("filters on %s after Remove: %v, %v; want only %q", p3.hostIf, fs, err, foreign)
		}
	})
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after Remove: %v", dir, err)
	}
	if n := p2.marked(t, 2, 2) + p3.marked(t, 3, 2); n != 0 {
		t.Fatalf("after Remove: %d of 4 marked", n)
	}
}

// foreignFilter adds to the ingress of ifindex, in the lab's host, a
// filter that is not egressnat's (a program that does nothing, another
// name and priority) and returns its name.
func foreignFilter(t *testing.T, ifindex int) string {
	t.Helper()
	const name = "someone-else"
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}}) // TC_ACT_UNSPEC
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close() // the filter holds it
	inNS(t, bwHost, func() {
		qd := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0),
			Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
		if err := netlink.QdiscReplace(qd); err != nil {
			t.Fatal(err)
		}
		f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: 9, Protocol: unix.ETH_P_ALL, Priority: 9}, Fd: prog.FD(), Name: name, DirectAction: true}
		if err := netlink.FilterAdd(f); err != nil {
			t.Fatal(err)
		}
	})
	return name
}

// TestInspectMissing: a directory that does not exist is an empty
// snapshot.
func TestInspectMissing(t *testing.T) {
	s, err := Inspect(filepath.Join(t.TempDir(), "none"))
	if err != nil || len(s.Entries) != 0 || len(s.Interfaces) != 0 {
		t.Fatalf("Inspect of a missing directory: %+v, %v", s, err)
	}
}
