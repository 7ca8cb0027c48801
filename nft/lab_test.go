package nft

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"
)

// The lab: network namespaces named enat-t-<id>-<role>, all removed in
// t.Cleanup. Nothing is created in the root namespace: every link is created
// with `ip -n <ns>` and moved between lab namespaces only.
//
//	sw:   bridge br0, one port per host
//	ext:  192.0.2.1/24 (the nodes' router), servers on 203.0.113.10 and 198.51.100.10
//	a:    node A 192.0.2.11, pods 10.244.1.0/24 on cni0 (10.244.1.1)
//	b:    node B 192.0.2.12, pods 10.244.2.0/24 on cni0 (10.244.2.1)
//	pa1, pa2: pods on A (10.244.1.2, 10.244.1.3); pb1: pod on B (10.244.2.2)
//
// Nodes route each other's pod subnet via the other node (host-gw) and
// masquerade pod traffic leaving the pod network with iptables-nft, as a CNI
// would.
type lab struct {
	t   testing.TB
	id  string
	nss []string
}

const (
	nodeAIP   = "192.0.2.11"
	nodeBIP   = "192.0.2.12"
	routerIP  = "192.0.2.1"
	floatIP   = "192.0.2.100"
	serverIP  = "203.0.113.10"
	server2IP = "198.51.100.10"
	podA1     = "10.244.1.2"
	podA2     = "10.244.1.3"
	podB1     = "10.244.2.2"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root, network namespaces and kernel nftables (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip")
	}
}

func newLab(t testing.TB) *lab {
	t.Helper()
	requireRoot(t)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	l := &lab{t: t, id: hex.EncodeToString(b)}
	t.Cleanup(l.destroy)
	return l
}

func (l *lab) ns(role string) string { return "enat-t-" + l.id + "-" + role }

func (l *lab) destroy() {
	for i := len(l.nss) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", l.nss[i]).CombinedOutput(); err != nil {
			l.t.Logf("ip netns del %s: %v %s", l.nss[i], err, out)
		}
	}
}

func (l *lab) run(args ...string) string {
	l.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ip runs `ip -n <ns-of-role> args...`.
func (l *lab) ip(role string, args ...string) string {
	l.t.Helper()
	return l.run(append([]string{"ip", "-n", l.ns(role)}, args...)...)
}

func (l *lab) exec(role string, args ...string) string {
	l.t.Helper()
	return l.run(append([]string{"ip", "netns", "exec", l.ns(role)}, args...)...)
}

func (l *lab) addNS(role string) {
	l.t.Helper()
	name := l.ns(role)
	l.run("ip", "netns", "add", name)
	l.nss = append(l.nss, name)
	l.ip(role, "link", "set", "lo", "up")
}

func (l *lab) sysctl(role, key, val string) {
	l.t.Helper()
	l.exec(role, "sysctl", "-qw", key+"="+val)
}

// host connects role's eth0 to the switch.
func (l *lab) host(role, cidr string) {
	l.t.Helper()
	l.addNS(role)
	port := "p-" + role
	l.ip("sw", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", l.ns(role))
	l.ip("sw", "link", "set", port, "master", "br0", "up")
	l.ip(role, "addr", "add", cidr, "dev", "eth0")
	l.ip(role, "link", "set", "eth0", "up")
}

// pod creates a pod namespace attached to node's cni0 bridge.
func (l *lab) pod(node, role, ip, gw string) {
	l.t.Helper()
	l.addNS(role)
	port := "v-" + role
	l.ip(node, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", l.ns(role))
	l.ip(node, "link", "set", port, "master", "cni0", "up")
	l.ip(role, "addr", "add", ip+"/24", "dev", "eth0")
	l.ip(role, "link", "set", "eth0", "up")
	l.ip(role, "route", "add", "default", "via", gw)
}

func (l *lab) node(role, ip, podGW string) {
	l.t.Helper()
	l.host(role, ip+"/24")
	l.ip(role, "route", "add", "default", "via", routerIP)
	l.ip(role, "link", "add", "cni0", "type", "bridge")
	l.ip(role, "addr", "add", podGW+"/24", "dev", "cni0")
	l.ip(role, "link", "set", "cni0", "up")
	l.sysctl(role, "net.ipv4.ip_forward", "1")
	l.exec(role, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE")
}

// build creates the full topology.
func (l *lab) build() {
	l.t.Helper()
	l.addNS("sw")
	l.ip("sw", "link", "add", "br0", "type", "bridge")
	l.ip("sw", "link", "set", "br0", "up")
	l.host("ext", routerIP+"/24")
	l.ip("ext", "addr", "add", serverIP+"/32", "dev", "lo")
	l.ip("ext", "addr", "add", server2IP+"/32", "dev", "lo")
	l.node("a", nodeAIP, "10.244.1.1")
	l.node("b", nodeBIP, "10.244.2.1")
	l.ip("a", "route", "add", "10.244.2.0/24", "via", nodeBIP)
	l.ip("b", "route", "add", "10.244.1.0/24", "via", nodeAIP)
	l.pod("a", "pa1", podA1, "10.244.1.1")
	l.pod("a", "pa2", podA2, "10.244.1.1")
	l.pod("b", "pb1", podB1, "10.244.2.1")
}

// fd opens the namespace of role; closed in t.Cleanup.
func (l *lab) fd(role string) int {
	l.t.Helper()
	f, err := os.Open("/run/netns/" + l.ns(role))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func (l *lab) dataplane(role string) *Dataplane {
	l.t.Helper()
	d, err := New(Config{Uplink: "eth0", NetNSFd: l.fd(role), Logger: zaptest.NewLogger(l.t)})
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { d.Close() })
	keepARP(l.t, d) // as the agent does
	return d
}

// inNS runs fn on a thread inside role's namespace.
func (l *lab) inNS(role string, fn func() error) error {
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

// server listens on ip:port in role's namespace and reports the remote
// address of every connection.
func (l *lab) server(role, addr string) <-chan netip.AddrPort {
	l.t.Helper()
	var ln net.Listener
	if err := l.inNS(role, func() (err error) { ln, err = net.Listen("tcp4", addr); return }); err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { ln.Close() })
	ch := make(chan netip.AddrPort, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ch <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			_, _ = io.WriteString(c, "hello\n")
			c.Close()
		}
	}()
	return ch
}

// dial connects from role's namespace with a fixed local port and returns
// the source address the server saw.
func (l *lab) dial(role, local, remote string, seen <-chan netip.AddrPort) (netip.AddrPort, error) {
	var conn net.Conn
	err := l.inNS(role, func() error {
		la, err := net.ResolveTCPAddr("tcp4", local)
		if err != nil {
			return err
		}
		dl := net.Dialer{LocalAddr: la, Timeout: 2 * time.Second}
		conn, err = dl.Dial("tcp4", remote)
		return err
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadAll(conn); err != nil {
		return netip.AddrPort{}, err
	}
	select {
	case ap := <-seen:
		return ap, nil
	case <-time.After(2 * time.Second):
		return netip.AddrPort{}, fmt.Errorf("server saw no connection")
	}
}

// sendUDP sends one datagram from role's namespace.
func (l *lab) sendUDP(role, local, remote string) {
	l.t.Helper()
	err := l.inNS(role, func() error {
		la, err := net.ResolveUDPAddr("udp4", local)
		if err != nil {
			return err
		}
		ra, err := net.ResolveUDPAddr("udp4", remote)
		if err != nil {
			return err
		}
		c, err := net.DialUDP("udp4", la, ra)
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

// snapshot is a readable dump of everything egressnat may change in role.
func (l *lab) snapshot(role string) string {
	l.t.Helper()
	var b strings.Builder
	b.WriteString(l.exec(role, "nft", "-a", "list", "table", "ip", "egressnat"))
	b.WriteString(l.ip(role, "rule", "show"))
	b.WriteString(l.ip(role, "route", "show", "table", "all"))
	b.WriteString(l.ip(role, "-4", "addr", "show", "dev", "eth0"))
	return b.String()
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
