package bpf

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// The lab: namespace nsHost with veth h0 toward namespace nsPod (pod0,
// addresses podA and podB; h0 10.244.9.1/24), and a bpffs of its own.
const (
	nsHost = "enat-bpf-host"
	nsPod  = "enat-bpf-pod"
	table  = "enat_bpf_test"
)

var (
	podA   = netip.MustParseAddr("10.244.9.2")
	podB   = netip.MustParseAddr("10.244.9.3")
	hostIP = netip.MustParseAddr("10.244.9.1")
)

func run(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNS runs f with the calling goroutine's thread in the named network
// namespace.
func inNS(t *testing.T, name string, f func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig) //nolint:errcheck
	f()
}

// lab builds the namespaces, the counting table and a bpffs; all of it is
// removed when the test ends.
func lab(t *testing.T) (bpffs string, ifindex int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, bpffs, BPF programs")
	}
	for _, ns := range []string{nsHost, nsPod} {
		exec.Command("ip", "netns", "del", ns).Run() //nolint:errcheck // a leftover of a killed run
		run(t, "", "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() }) //nolint:errcheck
	}
	run(t, "", "ip", "-n", nsHost, "link", "add", "h0", "type", "veth", "peer", "name", "pod0", "netns", nsPod)
	run(t, "", "ip", "-n", nsHost, "addr", "add", hostIP.String()+"/24", "dev", "h0")
	run(t, "", "ip", "-n", nsPod, "addr", "add", podA.String()+"/24", "dev", "pod0")
	run(t, "", "ip", "-n", nsPod, "addr", "add", podB.String()+"/24", "dev", "pod0")
	for _, l := range [][2]string{{nsHost, "h0"}, {nsHost, "lo"}, {nsPod, "pod0"}, {nsPod, "lo"}} {
		run(t, "", "ip", "-n", l[0], "link", "set", l[1], "up")
	}
	// The host counts, before routing, the packets of each mark.
	run(t, `table ip `+table+` {
	chain pre {
		type filter hook prerouting priority raw; policy accept;
		meta mark & 0x0000ff00 == 0x00000100 counter comment "class1"
		meta mark & 0x0000ff00 == 0x00000200 counter comment "class2"
	}
}
`, "ip", "netns", "exec", nsHost, "nft", "-f", "-")
	bpffs = t.TempDir()
	run(t, "", "mount", "-t", "bpf", "bpf", bpffs)
	t.Cleanup(func() { exec.Command("umount", bpffs).Run() }) //nolint:errcheck
	inNS(t, nsHost, func() {
		l, err := netlink.LinkByName("h0")
		if err != nil {
			t.Fatal(err)
		}
		ifindex = l.Attrs().Index
	})
	return bpffs, ifindex
}

var counterRE = regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "(\w+)"`)

// counts returns the host's counters by comment.
func counts(t *testing.T) map[string]int {
	t.Helper()
	out := run(t, "", "ip", "netns", "exec", nsHost, "nft", "list", "table", "ip", table)
	m := map[string]int{}
	for _, g := range counterRE.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(g[1])
		m[g[2]] = n
	}
	return m
}

// send sends n datagrams from src (in the pod) to the host; each passes
// the host's prerouting once, synchronously with the veth transmit.
func send(t *testing.T, src netip.Addr, n int) {
	t.Helper()
	inNS(t, nsPod, func() {
		// Unconnected: the host's port unreachable answers fail no write.
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for range n {
			if _, err := c.WriteToUDPAddrPort([]byte("x"), netip.AddrPortFrom(hostIP, 9)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// loadAttached loads the classifier from dir and attaches it to ifindex
// with attach, in the host namespace.
func loadAttached(t *testing.T, dir string, attach func(*Classifier) error) *Classifier {
	t.Helper()
	var c *Classifier
	inNS(t, nsHost, func() {
		var err error
		if c, err = Load(dir); err != nil {
			t.Fatal(err)
		}
		if err := attach(c); err != nil {
			t.Fatal(err)
		}
	})
	return c
}

// attachAny attaches as the agent would: tcx, or the clsact fallback.
func attachAny(ifindex int) func(*Classifier) error {
	return func(c *Classifier) error {
		_, err := c.Attach(ifindex)
		return err
	}
}

// TestClassify: the program marks the packets of the pods in its map,
// with their class's mark, and no other; the map
// follows Sync; the map and the attachment outlive the process's handles
// (an agent restart), and Remove plus Detach take everything away.
func TestClassify(t *testing.T) {
	bpffs, ifindex := lab(t)
	dir := filepath.Join(bpffs, "egressnat")
	c := loadAttached(t, dir, attachAny(ifindex))
	if w, d, err := c.Sync(map[netip.Addr]Class{podA: {Mark: 0x100, Mask: 0xff00}}); err != nil || w != 1 || d != 0 {
		t.Fatalf("sync: %d written, %d deleted, %v", w, d, err)
	}
	before := counts(t)
	send(t, podA, 5)
	send(t, podB, 3)
	got := counts(t)
	if got["class1"]-before["class1"] != 5 || got["class2"] != before["class2"] {
		t.Fatalf("after podA 5, podB 3: counters %v (before %v), want 5 more marked 0x100 and none 0x200", got, before)
	}
	// Sync replaces: podA leaves, podB comes with another class.
	if w, d, err := c.Sync(map[netip.Addr]Class{podB: {Mark: 0x200, Mask: 0xff00}}); err != nil || w != 1 || d != 1 {
		t.Fatalf("sync: %d written, %d deleted, %v", w, d, err)
	}
	before = got
	send(t, podA, 2)
	send(t, podB, 4)
	got = counts(t)
	if got["class1"] != before["class1"] || got["class2"]-before["class2"] != 4 {
		t.Fatalf("after the second sync: counters %v (before %v)", got, before)
	}
	// The agent stops: the pinned map and link keep classifying.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	before = got
	send(t, podB, 3)
	if got = counts(t); got["class2"]-before["class2"] != 3 {
		t.Fatalf("with the agent gone: counters %v (before %v)", got, before)
	}
	// A new agent finds the map and the link.
	c = loadAttached(t, dir, attachAny(ifindex))
	if e, err := c.Entries(); err != nil || len(e) != 1 || e[podB] != (Class{Mark: 0x200, Mask: 0xff00}) {
		t.Fatalf("entries after a reload: %v %v", e, err)
	}
	// Removed: nothing is marked any more, nothing is pinned.
	inNS(t, nsHost, func() {
		if err := c.Detach(ifindex); err != nil {
			t.Fatal(err)
		}
	})
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	before = counts(t)
	send(t, podB, 3)
	if got = counts(t); got["class2"] != before["class2"] {
		t.Fatalf("after Remove: counters %v (before %v)", got, before)
	}
	if left, err := os.ReadDir(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("left pinned under %s: %v %v", dir, left, err)
	}
}

// TestClassifyTC: the fallback for kernels without tcx, a clsact qdisc and
// a direct-action filter, marks the same way, and Detach removes the
// filter.
func TestClassifyTC(t *testing.T) {
	bpffs, ifindex := lab(t)
	dir := filepath.Join(bpffs, "egressnat")
	c := loadAttached(t, dir, func(c *Classifier) error { return c.attachTC(ifindex) })
	defer func() {
		c.Close()   //nolint:errcheck
		Remove(dir) //nolint:errcheck
	}()
	if _, _, err := c.Sync(map[netip.Addr]Class{podA: {Mark: 0x100, Mask: 0xff00}}); err != nil {
		t.Fatal(err)
	}
	before := counts(t)
	send(t, podA, 4)
	send(t, podB, 2)
	if got := counts(t); got["class1"]-before["class1"] != 4 {
		t.Fatalf("tc filter: counters %v (before %v), want 4 more marked", got, before)
	}
	inNS(t, nsHost, func() {
		if err := c.Detach(ifindex); err != nil {
			t.Fatal(err)
		}
	})
	before = counts(t)
	send(t, podA, 3)
	if got := counts(t); got["class1"] != before["class1"] {
		t.Fatalf("after Detach: counters %v (before %v)", got, before)
	}
}
