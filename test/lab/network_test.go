package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPodNetworkConfig(t *testing.T) {
	var zero Config
	if err := zero.defaults(); err != nil {
		t.Fatal(err)
	}
	if zero.PodNetwork != PodNetworkRouted || zero.RPFilter != RPFilterLoose || zero.Masquerade != MasqueradeIPTablesNFT ||
		zero.UplinkMTU != 1500 || zero.PodMTU != 1500 {
		t.Fatalf("zero config defaults: %+v", zero)
	}
	for _, tc := range []struct {
		cfg          Config
		uplink, pods int
		name         string
	}{
		{Config{}, 1500, 1500, "routed/loose/iptables-nft"},
		{Config{PodNetwork: PodNetworkOverlay}, 1500, 1450, "overlay/loose/iptables-nft"},
		{Config{PodNetwork: PodNetworkOverlay, UplinkMTU: 1450, RPFilter: RPFilterStrict, Masquerade: MasqueradeIPTablesLegacy},
			1450, 1400, "overlay/strict/iptables-legacy/mtu1450"},
		{Config{UplinkMTU: 1450}, 1450, 1500, "routed/loose/iptables-nft/mtu1450"},
		{Config{PodMTU: 1400, RPFilter: RPFilterOff, Masquerade: MasqueradeNone}, 1500, 1400, "routed/off/none/podmtu1400"},
		{Config{PodNetwork: PodNetworkOverlay, PodMTU: 1500, Masquerade: MasqueradeNFT}, 1500, 1500, "overlay/loose/nft/podmtu1500"},
	} {
		c := tc.cfg
		if err := c.defaults(); err != nil {
			t.Errorf("%+v: %v", tc.cfg, err)
			continue
		}
		if c.UplinkMTU != tc.uplink || c.PodMTU != tc.pods {
			t.Errorf("%s: MTUs uplink %d pods %d, want %d %d", tc.name, c.UplinkMTU, c.PodMTU, tc.uplink, tc.pods)
		}
		if got := tc.cfg.ModeName(); got != tc.name {
			t.Errorf("ModeName %q, want %q", got, tc.name)
		}
		if got := c.ModeName(); got != tc.name {
			t.Errorf("ModeName after defaults %q, want %q", got, tc.name)
		}
		back, err := ParseModeName(tc.name)
		if err != nil {
			t.Errorf("ParseModeName(%q): %v", tc.name, err)
		} else if back.ModeName() != tc.name {
			t.Errorf("ParseModeName(%q) reads back as %q", tc.name, back.ModeName())
		}
	}
	for _, bad := range []string{"ipip", "routed/mtu", "overlay/podmtux", "routed/strict/iptables", "mtu100"} {
		if _, err := ParseModeName(bad); err == nil {
			t.Errorf("ParseModeName(%q) accepted", bad)
		}
	}
	for _, bad := range []Config{
		{PodNetwork: "ipip"}, {PodNetwork: "Routed"}, {RPFilter: "2"}, {RPFilter: "strict "},
		{Masquerade: "iptables"}, {Masquerade: "nftables"}, {UplinkMTU: -1}, {UplinkMTU: 100}, {UplinkMTU: 9001},
		{PodMTU: 575}, {PodMTU: -1500}, {PodNetwork: PodNetworkOverlay, UplinkMTU: 600},
	} {
		c := bad
		if err := c.defaults(); err == nil {
			t.Errorf("accepted %+v", bad)
		} else {
			t.Logf("%+v: %v", bad, err)
		}
	}
}

// netCase is one pod network configuration of TestPodNetwork.
type netCase struct {
	prefix string
	cfg    Config
}

func TestPodNetwork(t *testing.T) {
	SkipUnlessRoot(t)
	t.Parallel()
	strict := RPFilterStrict
	cases := []netCase{
		// Pods 1500 behind 1450 uplinks: path MTU discovery on every
		// way out of a pod.
		{"enatnw-", Config{PodNetwork: PodNetworkRouted, RPFilter: strict, Masquerade: MasqueradeIPTablesLegacy, UplinkMTU: 1450}},
		{"enatnx-", Config{PodNetwork: PodNetworkRouted, RPFilter: strict, Masquerade: MasqueradeIPTablesNFT}},
		{"enatny-", Config{PodNetwork: PodNetworkRouted, RPFilter: strict, Masquerade: MasqueradeNFT}},
		// The overlay's defaults: pods 1450, uplink 1500.
		{"enatnz-", Config{PodNetwork: PodNetworkOverlay, RPFilter: strict, Masquerade: MasqueradeIPTablesLegacy}},
		{"enatnv-", Config{PodNetwork: PodNetworkOverlay, RPFilter: strict, Masquerade: MasqueradeIPTablesNFT}},
		// Pods 1500 on a 1450 overlay: path MTU discovery towards other
		// nodes' pods.
		{"enatnu-", Config{PodNetwork: PodNetworkOverlay, RPFilter: strict, Masquerade: MasqueradeNFT, PodMTU: 1500}},
		{"enatnt-", Config{RPFilter: RPFilterOff, Masquerade: MasqueradeNone}},
	}
	for _, tc := range cases {
		t.Run(tc.cfg.ModeName(), func(t *testing.T) {
			t.Parallel()
			testPodNetwork(t, tc)
		})
	}
}

func testPodNetwork(t *testing.T, tc netCase) {
	cfg := tc.cfg
	cfg.Prefix = tc.prefix
	cfg.EchoServer = echoBin
	cfg.Nodes = []NodeConfig{{Name: "n1"}, {Name: "n2"}}
	cfg.Externals = []ExternalConfig{{Name: "ext1", Addr: netip.MustParsePrefix("203.0.113.10/24")}}
	l := NewT(t, cfg)
	c := l.Config()
	if c.ModeName() != tc.cfg.ModeName() || c.Prefix != tc.prefix {
		t.Fatalf("Config() %s %q, want %s", c.ModeName(), c.Prefix, tc.cfg.ModeName())
	}
	n1, n2 := l.Node("n1"), l.Node("n2")
	ext1 := l.External("ext1")
	a, err := l.AddPod("n1", "a")
	if err != nil {
		t.Fatal(err)
	}
	a2, err := l.AddPod("n1", "a2")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddPod("n2", "b")
	if err != nil {
		t.Fatal(err)
	}
	overlay := c.PodNetwork == PodNetworkOverlay

	t.Run("RPFilter", func(t *testing.T) {
		want := map[string]string{RPFilterLoose: "2", RPFilterStrict: "1", RPFilterOff: "0"}[c.RPFilter]
		for _, n := range l.Nodes() {
			for _, key := range []string{"net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter", "net.ipv4.conf.eth0.rp_filter"} {
				if got := sysctlValue(t, l, n.NetNS, key); got != want {
					t.Errorf("%s %s = %s, want %s", n.Name, key, got, want)
				}
			}
		}
		if got := sysctlValue(t, l, l.RouterNS(), "net.ipv4.conf.all.rp_filter"); got != "2" {
			t.Errorf("router rp_filter %s, want 2", got)
		}
	})

	t.Run("MTU", func(t *testing.T) {
		want := []struct {
			ns, dev string
			mtu     int
		}{
			{n1.NetNS, Uplink, c.UplinkMTU}, {n2.NetNS, Uplink, c.UplinkMTU},
			{l.SwitchNS(), n1.SwitchPort, c.UplinkMTU}, {l.SwitchNS(), n2.SwitchPort, c.UplinkMTU},
			{l.RouterNS(), "eth0", c.UplinkMTU}, {l.SwitchNS(), "rtr", c.UplinkMTU}, {l.SwitchNS(), "br0", c.UplinkMTU},
			{a.NetNS, "eth0", c.PodMTU}, {n1.NetNS, a.HostVeth, c.PodMTU},
			{b.NetNS, "eth0", c.PodMTU}, {n2.NetNS, b.HostVeth, c.PodMTU},
		}
		if overlay {
			want = append(want, struct {
				ns, dev string
				mtu     int
			}{n1.NetNS, PodBridge, c.PodMTU}, struct {
				ns, dev string
				mtu     int
			}{n1.NetNS, OverlayDev, c.UplinkMTU - VXLANOverhead})
		}
		for _, w := range want {
			if got := linkMTU(t, w.ns, w.dev); got != w.mtu {
				t.Errorf("MTU of %s in %s: %d, want %d", w.dev, w.ns, got, w.mtu)
			}
		}
	})

	t.Run("Topology", func(t *testing.T) {
		for _, n := range []*Node{n1, n2} {
			o := n1
			if n == n1 {
				o = n2
			}
			viaEth0 := ipOut(t, l, n.NetNS, "-4", "route", "show", "dev", Uplink)
			other := ipOut(t, l, n.NetNS, "-4", "route", "show", o.PodCIDR.String())
			get := ipOut(t, l, n.NetNS, "route", "get", o.PodCIDR.Addr().Next().Next().String())
			links := ipOut(t, l, n.NetNS, "-d", "link", "show")
			if !overlay {
				if want := o.PodCIDR.String() + " via " + o.IP.String() + " dev eth0"; !strings.Contains(viaEth0+other, want) {
					t.Errorf("%s: no %q in\n%s", n.Name, want, other)
				}
				if strings.Contains(links, PodBridge) || strings.Contains(links, "vxlan") || n.PodBridge != "" || n.OverlayDev != "" {
					t.Errorf("%s: overlay devices in routed mode (%q %q):\n%s", n.Name, n.PodBridge, n.OverlayDev, links)
				}
				continue
			}
			if strings.Contains(viaEth0, "10.244.") {
				t.Errorf("%s: pod routes via %s in overlay mode:\n%s", n.Name, Uplink, viaEth0)
			}
			want := o.PodCIDR.String() + " via " + o.PodCIDR.Addr().String() + " dev " + OverlayDev + " onlink"
			if strings.TrimSpace(other) != want {
				t.Errorf("%s: route to %s is %q, want %q", n.Name, o.PodCIDR, strings.TrimSpace(other), want)
			}
			if !strings.Contains(get, "dev "+OverlayDev) {
				t.Errorf("%s: route get into %s: %s", n.Name, o.PodCIDR, get)
			}
			vx := ipOut(t, l, n.NetNS, "-d", "link", "show", OverlayDev)
			for _, w := range []string{"vxlan id 1 ", "local " + n.IP.String(), "dev " + Uplink, "dstport 8472", "nolearning", n.OverlayMAC.String()} {
				if !strings.Contains(vx, w) {
					t.Errorf("%s: %s lacks %q:\n%s", n.Name, OverlayDev, w, vx)
				}
			}
			if br := ipOut(t, l, n.NetNS, "-d", "link", "show", PodBridge); !strings.Contains(br, "bridge") {
				t.Errorf("%s: %s is no bridge:\n%s", n.Name, PodBridge, br)
			}
			if n.PodBridge != PodBridge || n.OverlayDev != OverlayDev {
				t.Errorf("%s: Node fields %q %q", n.Name, n.PodBridge, n.OverlayDev)
			}
		}
		// Pods: address and the device they hang off.
		for _, p := range []*Pod{a, a2, b} {
			n := l.Node(p.Node)
			addr := ipOut(t, l, p.NetNS, "-4", "-o", "addr", "show", "dev", "eth0")
			bits := 32
			wantDev := p.HostVeth
			if overlay {
				bits, wantDev = 24, PodBridge
			}
			if !strings.Contains(addr, netip.PrefixFrom(p.IP, bits).String()) {
				t.Errorf("pod %s address: %s", p.Name, addr)
			}
			if p.NodeDev != wantDev || p.HostVeth == "" {
				t.Errorf("pod %s: NodeDev %q HostVeth %q, want NodeDev %q", p.Name, p.NodeDev, p.HostVeth, wantDev)
			}
			get := ipOut(t, l, n.NetNS, "route", "get", p.IP.String())
			if !strings.Contains(get, "dev "+wantDev+" ") {
				t.Errorf("node %s: route to pod %s: %s", n.Name, p.Name, get)
			}
			if overlay {
				if veth := ipOut(t, l, n.NetNS, "-d", "link", "show", p.HostVeth); !strings.Contains(veth, "master "+PodBridge) {
					t.Errorf("pod %s: host veth not on %s:\n%s", p.Name, PodBridge, veth)
				}
			}
		}
	})

	t.Run("MasqueradeRules", func(t *testing.T) {
		for _, n := range []*Node{n1, n2} {
			legacy := execOut(t, l, n.NetNS, "iptables-legacy-save", "-t", "nat")
			ruleset := execOut(t, l, n.NetNS, "nft", "list", "ruleset")
			hasLegacy := strings.Contains(legacy, "-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE")
			hasIPTNFT := strings.Contains(ruleset, "table ip nat") && strings.Contains(strings.ToLower(ruleset), "masquerade")
			hasNFT := strings.Contains(ruleset, "table ip "+MasqueradeTable) &&
				strings.Contains(ruleset, "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade")
			want := [3]bool{c.Masquerade == MasqueradeIPTablesLegacy, c.Masquerade == MasqueradeIPTablesNFT, c.Masquerade == MasqueradeNFT}
			if got := [3]bool{hasLegacy, hasIPTNFT, hasNFT}; got != want {
				t.Errorf("%s: masquerade (legacy, iptables-nft, nft) = %v, want %v\nlegacy:\n%s\nnft:\n%s", n.Name, got, want, legacy, ruleset)
			}
		}
	})

	t.Run("PodToPod", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		for _, pair := range [][2]*Pod{{a, b}, {b, a}, {a, a2}} {
			from, to := pair[0], pair[1]
			addr := netip.AddrPortFrom(to.IP, 9000).String()
			srv := startEchoServer(t, to.NetNS, addr)
			ans, err := EchoTCP(ctx, from.NetNS, addr)
			if err != nil {
				t.Fatalf("%s -> %s: %v", from.Name, to.Name, err)
			}
			if ans != "hello" {
				t.Fatalf("%s -> %s: answer %q", from.Name, to.Name, ans)
			}
			if src := <-srv.peers; src.Addr() != from.IP {
				t.Errorf("%s -> %s: seen from %s, want the pod IP %s", from.Name, to.Name, src, from.IP)
			}
			srv.ln.Close()
		}
	})

	t.Run("External", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		for _, p := range []*Pod{a, b} {
			n := l.Node(p.Node)
			if c.Masquerade == MasqueradeNone {
				if ans, err := EchoTCP(ctxT(t, 1500*time.Millisecond), p.NetNS, ext1.TCPAddr()); err == nil {
					t.Errorf("pod %s reached ext1 without masquerade (seen as %s)", p.Name, ans)
				}
				continue
			}
			ans, err := EchoTCP(ctx, p.NetNS, ext1.TCPAddr())
			if err != nil {
				t.Fatalf("pod %s -> ext1: %v", p.Name, err)
			}
			if got := srcIP(t, ans); got != n.IP {
				t.Errorf("pod %s seen by ext1 as %s, want its node's IP %s", p.Name, got, n.IP)
			}
		}
	})

	// Path MTUs: pod to pod on another node and pod to external.
	podPath := min(c.PodMTU, c.UplinkMTU)
	if overlay {
		podPath = min(c.PodMTU, c.UplinkMTU-VXLANOverhead)
	}
	extPath := min(c.PodMTU, c.UplinkMTU)

	t.Run("Bulk", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		const size = 1 << 20
		addr := netip.AddrPortFrom(b.IP, 9001).String()
		srv := startEchoServer(t, b.NetNS, addr)
		if err := bulkEcho(ctx, a.NetNS, addr, size); err != nil {
			t.Fatalf("pod a -> pod b, 1 MiB echoed: %v", err)
		}
		if src := <-srv.peers; src.Addr() != a.IP {
			t.Errorf("bulk seen from %s, want %s", src, a.IP)
		}
		checkPMTU(t, l, a, b.IP, podPath)
		if c.Masquerade == MasqueradeNone {
			return
		}
		addr = netip.AddrPortFrom(ext1.IP, 9001).String()
		srv = startEchoServer(t, ext1.NetNS, addr)
		if err := bulkEcho(ctx, a.NetNS, addr, size); err != nil {
			t.Fatalf("pod a -> ext1, 1 MiB echoed: %v", err)
		}
		if src := <-srv.peers; src.Addr() != n1.IP {
			t.Errorf("bulk to ext1 seen from %s, want node IP %s", src, n1.IP)
		}
		checkPMTU(t, l, a, ext1.IP, extPath)
	})

	t.Run("DontFragment", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		// A datagram of exactly the path MTU with DF set crosses to the
		// other node's pod; one byte more does not.
		addr := netip.AddrPortFrom(b.IP, 9002).String()
		pc, err := ListenUDP(b.NetNS, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		got := make(chan int, 10)
		go func() {
			buf := make([]byte, 10000)
			for {
				n, _, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				got <- n
			}
		}()
		conn, err := DialUDP(ctx, a.NetNS, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if err := setDF(conn); err != nil {
			t.Fatal(err)
		}
		fits := podPath - 28 // IPv4 and UDP headers
		if !sendUntil(conn, make([]byte, fits), got, 5*time.Second) {
			t.Fatalf("no %d-byte DF datagram (path MTU %d) arrived", fits, podPath)
		}
		if sendUntil(conn, make([]byte, fits+1), got, 600*time.Millisecond) {
			t.Fatalf("a %d-byte DF datagram arrived over a path MTU of %d", fits+1, podPath)
		}
	})

	t.Run("RemovePod", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		if err := l.RemovePod("a2"); err != nil {
			t.Fatal(err)
		}
		if links := ipOut(t, l, n1.NetNS, "link", "show"); strings.Contains(links, a2.HostVeth+"@") {
			t.Fatalf("host veth %s left:\n%s", a2.HostVeth, links)
		}
		p, err := l.AddPod("n1", "a3")
		if err != nil {
			t.Fatal(err)
		}
		addr := netip.AddrPortFrom(p.IP, 9003).String()
		srv := startEchoServer(t, p.NetNS, addr)
		if _, err := EchoTCP(ctx, b.NetNS, addr); err != nil {
			t.Fatalf("pod b -> new pod a3: %v", err)
		}
		<-srv.peers
	})
}

func sysctlValue(t *testing.T, l *Lab, ns, key string) string {
	t.Helper()
	out, err := l.Exec(ctxT(t, 5*time.Second), ns, "sysctl", "-n", key)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func ipOut(t *testing.T, l *Lab, ns string, args ...string) string {
	t.Helper()
	return execOut(t, l, ns, append([]string{"ip"}, args...)...)
}

func execOut(t *testing.T, l *Lab, ns string, argv ...string) string {
	t.Helper()
	out, err := l.Exec(ctxT(t, 5*time.Second), ns, argv...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func linkMTU(t *testing.T, ns, dev string) int {
	t.Helper()
	mtu := 0
	if err := Do(ns, func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		mtu = ifi.MTU
		return nil
	}); err != nil {
		t.Fatalf("%s in %s: %v", dev, ns, err)
	}
	return mtu
}

// checkPMTU checks that pod p learnt the path MTU want towards dst by path
// MTU discovery when its own MTU is larger (a route cache entry), and that
// it needed none otherwise.
func checkPMTU(t *testing.T, l *Lab, p *Pod, dst netip.Addr, want int) {
	t.Helper()
	get := ipOut(t, l, p.NetNS, "route", "get", dst.String())
	cached := strings.Contains(get, " mtu "+strconv.Itoa(want))
	if l.Config().PodMTU > want && !cached {
		t.Errorf("pod %s learnt no path MTU %d to %s:\n%s", p.Name, want, dst, get)
	}
	if l.Config().PodMTU <= want && strings.Contains(get, " mtu ") {
		t.Errorf("pod %s has a path MTU to %s though none is below its own:\n%s", p.Name, dst, get)
	}
}

type echoSrv struct {
	ln    net.Listener
	peers chan netip.AddrPort
}

// startEchoServer listens on addr in ns and echoes every connection back
// (closing its write side at EOF), reporting each peer on peers.
func startEchoServer(t *testing.T, ns, addr string) *echoSrv {
	t.Helper()
	ln, err := ListenTCP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s := &echoSrv{ln: ln, peers: make(chan netip.AddrPort, 10)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return s
}

// bulkEcho sends size random bytes to the echo server at addr from ns and
// checks that they all come back.
func bulkEcho(ctx context.Context, ns, addr string, size int) error {
	c, err := DialTCP(ctx, ns, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	data := make([]byte, size)
	rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	back, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(back), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(back, data) {
		return fmt.Errorf("got %d bytes back, not the %d sent", len(back), len(data))
	}
	return nil
}

// setDF makes the kernel set DF on every datagram of c and never fragment
// it locally (IP_PMTUDISC_PROBE: the device MTU, not a cached path MTU,
// limits what is sent, and a larger datagram fails with EMSGSIZE).
func setDF(c net.Conn) error {
	rc, err := c.(*net.UDPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_MTU_DISCOVER, syscall.IP_PMTUDISC_PROBE)
	}); err != nil {
		return err
	}
	return serr
}

// sendUntil sends payload every 100 ms until a datagram of its size
// arrives on got (true) or d passes (false).
func sendUntil(c net.Conn, payload []byte, got <-chan int, d time.Duration) bool {
	deadline := time.After(d)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := c.Write(payload); err != nil && !errors.Is(err, syscall.EMSGSIZE) && !errors.Is(err, syscall.ECONNREFUSED) {
			return false
		}
		select {
		case n := <-got:
			if n == len(payload) {
				return true
			}
		case <-tick.C:
		case <-deadline:
			return false
		}
	}
}
