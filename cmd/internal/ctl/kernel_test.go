package ctl

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// newNetNS makes a network namespace "enat-ctl-<pid>" with a veth uplink
// eth0 192.0.2.12/24, removed when the test ends. It skips under -short
// and unless root.
func newNetNS(t *testing.T) (name string, fd int) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root, a network namespace and kernel nftables (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	name = fmt.Sprintf("enat-ctl-%d", os.Getpid())
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck // a crashed run's leftover
	run("netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() }) //nolint:errcheck
	run("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	run("-n", name, "link", "set", "eth1", "up")
	run("-n", name, "addr", "add", "192.0.2.12/24", "dev", "eth0")
	run("-n", name, "link", "set", "eth0", "up")
	run("-n", name, "link", "set", "lo", "up")
	fd, err := OpenNetNS(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeFd(fd) })
	return name, fd
}

// TestRulesetFromKernel: the agent's dataplane programs a fresh network
// namespace (one rerouted policy, one gateway policy with its floating IP);
// ruleset reads it back readably, with per-policy counters, the ip rule and
// the route; conntrack groups a flow SNATed to the floating IP.
func TestRulesetFromKernel(t *testing.T) {
	name, fd := newNetNS(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dp, err := nft.New(nft.Config{Uplink: "eth0", NetNSFd: fd})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close() //nolint:errcheck
	st := selector.NodeState{
		Policies: []selector.PolicyState{{
			Name: "egress", Mode: selector.ModeReroute,
			Sources:      []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("10.244.1.7")},
			Destinations: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
			EgressIP:     netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.13"),
		}, {
			Name: "partners", Mode: selector.ModeGateway,
			Sources:      []netip.Addr{netip.MustParseAddr("10.244.2.9")},
			Destinations: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/25"), netip.MustParsePrefix("198.51.100.128/25")},
			EgressIP:     netip.MustParseAddr("192.0.2.101"),
		}},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix("192.0.2.101/24")},
	}
	if err := dp.Apply(ctx, st); err != nil {
		t.Fatalf("apply: %v", err)
	}

	o := RulesetOptions{Table: "egressnat", RulePriority: 29000, RouteTableBase: 2700, MarkMask: 0x3f00, NetNSFd: fd}
	rs, err := ReadRuleset(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := WriteRuleset(&b, rs, 0); err != nil {
		t.Fatal(err)
	}
	text := b.String()
	for _, want := range []string{
		"nftables table ip egressnat",
		"chain prerouting (type filter hook prerouting priority mangle; policy accept)",
		"chain postrouting (type nat hook postrouting priority srcnat - 1; policy accept)",
		"ip daddr @dst-egress counter packets 0 bytes 0 meta mark set meta mark & 0xffffc0ff | 0x00000100  # policy egress: reroute via 192.0.2.13 mark 0x100",
		"ct direction reply return  # only the original direction of a connection is steered",
		"ip daddr @internal return  # cluster-internal destinations are never steered",
		`ip saddr @src-partners ip daddr @dst-partners oifname "eth0" counter packets 0 bytes 0 snat to 192.0.2.101  # policy partners: snat to 192.0.2.101`,
		"meta mark & 0x00003f00 != 0x00000000 counter packets 0 bytes 0 snat to ip saddr",
		"set src-egress (2 elements)\n    10.244.1.5, 10.244.1.7",
		"set dst-egress (interval, 1 elements)\n    203.0.113.0/24",
		"set dst-partners (interval, 2 elements)\n    198.51.100.0/25, 198.51.100.128/25",
		"set floating (1 elements)\n    192.0.2.101",
		"egress     Reroute",
		"partners   Gateway",
		"29000:\tfrom all fwmark 0x100/0x3f00 lookup 2701",
		"table 2701: default via 192.0.2.13 dev eth0",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, text)
		}
	}
	if got := rs.FloatingIPs(); len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.101") {
		t.Errorf("floating IPs: %v", got)
	}

	// A flow SNATed to the floating IP, as the gateway rule makes them.
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: fd})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f := conntrack.NewFlow(6, conntrack.StatusConfirmed|conntrack.StatusSrcNAT|conntrack.StatusSeenReply|conntrack.StatusAssured,
		netip.MustParseAddr("10.244.2.9"), netip.MustParseAddr("198.51.100.7"), 40001, 443, 120, 0)
	f.TupleReply.IP.DestinationAddress = netip.MustParseAddr("192.0.2.101")
	f.TupleReply.Proto.DestinationPort = 40001
	if err := c.Create(f); err != nil {
		t.Fatalf("create conntrack entry: %v", err)
	}
	flows, err := ReadFlows(fd)
	if err != nil {
		t.Fatal(err)
	}
	groups := GroupFlows(flows, rs.FloatingIPs())
	if len(groups) != 1 || len(groups[0].Flows) != 1 || groups[0].Flows[0].Source != netip.MustParseAddrPort("10.244.2.9:40001") ||
		groups[0].Flows[0].ReplyTo != netip.MustParseAddrPort("192.0.2.101:40001") {
		t.Fatalf("groups: %+v (flows %+v)", groups, flows)
	}

	// The command itself, by namespace name.
	var out, errOut strings.Builder
	if code := Main(ctx, "egressnatctl", []string{"conntrack", "--netns", name}, &out, &errOut); code != 0 {
		t.Fatalf("conntrack: %d %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "192.0.2.101: 1 flow\n") || !strings.Contains(out.String(), "10.244.2.9:40001   198.51.100.7:443") {
		t.Errorf("conntrack output:\n%s", out.String())
	}
	out.Reset()
	if code := Main(ctx, "egressnatctl", []string{"ruleset", "--netns", name, "-o", "json"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), `"policy": "partners"`) {
		t.Errorf("ruleset -o json: %d %s\n%s", code, errOut.String(), out.String())
	}
}

// TestRulesetBPFFromKernel: the eBPF classifier attached to eth1 of a
// fresh network namespace and pinned on a bpffs of its own; ruleset
// --netns --bpf-dir reads it back from outside that namespace: the
// interface by its name there, and the map's entry. A --bpf-dir with
// nothing pinned gives one line.
func TestRulesetBPFFromKernel(t *testing.T) {
	name, fd := newNetNS(t)
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Skipf("mount a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) }) //nolint:errcheck
	pins := dir + "/egressnat"
	var ifindex int
	var mode string
	err := inNetNS(fd, func() error {
		l, err := netlink.LinkByName("eth1")
		if err != nil {
			return err
		}
		ifindex = l.Attrs().Index
		c, err := bpf.Load(pins)
		if err != nil {
			return err
		}
		defer c.Close() //nolint:errcheck // what is pinned stays
		if mode, err = c.Attach(ifindex); err != nil {
			return err
		}
		_, _, err = c.Sync(map[netip.Addr]bpf.Class{netip.MustParseAddr("10.244.1.5"): {Mark: 0x00010000, Mask: 0x00ff0000}})
		return err
	})
	if err != nil {
		t.Skipf("BPF classifier unavailable here: %v", err)
	}
	t.Cleanup(func() { inNetNS(fd, func() error { return bpf.Remove(pins) }) }) //nolint:errcheck

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut strings.Builder
	if code := Main(ctx, "egressnatctl", []string{"ruleset", "--netns", name, "--bpf-dir", pins}, &out, &errOut); code != 0 {
		t.Fatalf("ruleset: %d %s", code, errOut.String())
	}
	for _, want := range []string{
		"BPF classifier pinned under " + pins + "\n",
		fmt.Sprintf("  attached to 1 interface\n    eth1 (index %d): %s\n", ifindex, mode),
		"  map pods (1 entry: pod IP -> mark/mask)\n    10.244.1.5 -> 0x00010000/0x00ff0000\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("ruleset lacks %q:\n%s", want, out.String())
		}
	}

	out.Reset()
	if code := Main(ctx, "egressnatctl", []string{"ruleset", "--netns", name, "--bpf-dir", dir + "/nothing"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "BPF classifier: nothing pinned under "+dir+"/nothing (") {
		t.Errorf("nothing pinned: %d %s\n%s", code, errOut.String(), out.String())
	}
}
