package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"
)

// unNetNS makes a network namespace "un-agent-<pid>-<n>" (the uninstall
// tests' prefix) with a veth pair eth0 192.0.2.12/24 (the uplink, default
// route via 192.0.2.1) and eth1, removed when the test ends; it returns
// its name and an open handle. It skips under -short and unless root.
func unNetNS(t *testing.T, n int) (string, int) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root, a network namespace and kernel nftables (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	name := fmt.Sprintf("un-agent-%d-%d", os.Getpid(), n)
	exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck // a crashed run's leftover
	ip(t, "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() }) //nolint:errcheck
	for _, args := range [][]string{
		{"link", "add", "eth0", "type", "veth", "peer", "name", "eth1"},
		{"link", "set", "eth1", "up"}, {"link", "set", "lo", "up"},
		{"addr", "add", "192.0.2.12/24", "dev", "eth0"}, {"link", "set", "eth0", "up"},
		{"route", "add", "default", "via", "192.0.2.1", "dev", "eth0"},
	} {
		ip(t, append([]string{"-n", name}, args...)...)
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return name, int(h)
}

func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// inNetNS runs fn on an OS thread in the namespace fd: /proc/sys/net is
// that namespace's there.
func inNetNS(t *testing.T, fd int, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(netns.NsHandle(fd)); err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer func() {
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread() // else the thread dies with the goroutine
		}
	}()
	fn()
}

// kernelSysctls are the sysctls egressnat changes in the namespace (the
// uplink eth0, the other interface eth1), under /proc/sys/net.
var kernelSysctls = []string{
	"ipv4/conf/all/send_redirects", "ipv4/conf/default/send_redirects", "ipv4/conf/eth0/send_redirects",
	"ipv4/conf/eth1/send_redirects", "ipv4/conf/lo/send_redirects", "ipv4/conf/eth0/src_valid_mark",
	"netfilter/nf_conntrack_tcp_be_liberal",
}

func readSysctls(t *testing.T, name string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, p := range kernelSysctls {
		b, err := exec.Command("ip", "netns", "exec", name, "cat", filepath.Join("/proc/sys/net", p)).CombinedOutput()
		if err != nil {
			t.Fatalf("read %s: %v %s", p, err, b)
		}
		out[p] = strings.TrimSpace(string(b))
	}
	return out
}

// leftovers lists what of egressnat the namespace still holds: nftables
// tables, ip rules and routes of its tables, the floating IP.
func leftovers(t *testing.T, name string) []string {
	t.Helper()
	var out []string
	rs, err := exec.Command("ip", "netns", "exec", name, "nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v %s", err, rs)
	}
	if s := strings.TrimSpace(string(rs)); s != "" {
		out = append(out, "nft: "+s)
	}
	for _, l := range strings.Split(ip(t, "-n", name, "-4", "rule"), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "0:") && !strings.HasPrefix(l, "32766:") && !strings.HasPrefix(l, "32767:") {
			out = append(out, "ip rule: "+l)
		}
	}
	for _, l := range strings.Split(ip(t, "-n", name, "-4", "route", "show", "table", "all"), "\n") {
		if strings.Contains(l, "table 27") {
			out = append(out, "route: "+l)
		}
	}
	if a := ip(t, "-n", name, "-4", "addr", "show", "dev", "eth0"); strings.Contains(a, "192.0.2.101") {
		out = append(out, "address: "+a)
	}
	return out
}

// TestUninstallKernel: on a node holding everything egressnat puts in a
// kernel (the guard table it starts from, then a gateway with a floating
// IP and its ARP lease, a rerouted policy with its ip rule and route
// table, the reverse-path and reply tables, a flow SNATed to the floating
// IP, the sysctls changed by prepare-node and by the agent, the state
// files), Uninstall leaves nothing of egressnat: no nftables table, no ip
// rule or route of its tables, no floating IP, no such flow, every sysctl
// as it was before, and no state file. A node with only the boot guard's
// table is cleaned the same.
func TestUninstallKernel(t *testing.T) {
	t.Run("gateway", func(t *testing.T) {
		name, fd := unNetNS(t, 1)
		state := t.TempDir()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		before := readSysctls(t, name)

		// prepare-node (the init container): every interface's
		// send_redirects, recorded first (cmd/internal/ctl
		// PrepareNodeRecording does the same through a mount).
		inNetNS(t, fd, func() {
			var changes []nft.SysctlChange
			for _, p := range []string{"ipv4/conf/default/send_redirects", "ipv4/conf/eth1/send_redirects", "ipv4/conf/lo/send_redirects"} {
				changes = append(changes, nft.SysctlChange{Path: p, Before: before[p], Set: "0"})
			}
			if err := nft.RecordSysctls(state, "/proc/sys/net", changes); err != nil {
				t.Fatal(err)
			}
			for _, c := range changes {
				if err := os.WriteFile(filepath.Join("/proc/sys/net", c.Path), []byte(c.Set), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		})

		dp, err := nft.New(nft.Config{Uplink: "eth0", NetNSFd: fd, ARPProbeWait: -1, SysctlRecordDir: state, Logger: zaptest.NewLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close() //nolint:errcheck
		internal := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12")}
		dests := []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}
		if installed, err := dp.Guard(ctx, internal, dests); err != nil || !installed {
			t.Fatalf("guard table: %v %v", installed, err)
		}
		st := selector.NodeState{
			Policies: []selector.PolicyState{{
				Name: "egress", Mode: selector.ModeReroute, Sources: []netip.Addr{netip.MustParseAddr("10.244.1.5")},
				Destinations: dests, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.13"),
			}, {
				Name: "partners", Mode: selector.ModeGateway, Sources: []netip.Addr{netip.MustParseAddr("10.244.2.9")},
				Destinations: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}, EgressIP: netip.MustParseAddr("192.0.2.101"),
			}},
			FloatingIPs:  []netip.Prefix{netip.MustParsePrefix("192.0.2.101/24")},
			Excluded:     internal,
			PodNetworks:  []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")},
			LocalPods:    []netip.Addr{netip.MustParseAddr("10.244.1.5")},
			ReturnRoutes: []selector.ReturnRoute{{Dst: netip.MustParsePrefix("10.244.2.0/24"), Via: netip.MustParseAddr("192.0.2.13")}},
		}
		if err := dp.Apply(ctx, st); err != nil {
			t.Fatalf("apply: %v", err)
		}
		if err := dp.KeepARP(ctx); err != nil {
			t.Fatalf("arp lease: %v", err)
		}
		// What the agent saves, and the boot unit's copy of the agent.
		a := &agent{cfg: Config{StateDir: state, Uplink: "eth0"}, log: zaptest.NewLogger(t)}
		a.saveState(&st)
		if err := os.WriteFile(filepath.Join(state, BootBinary), []byte("#!/bin/true\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		// A flow SNATed to the floating IP.
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

		// Everything is there.
		have := strings.Join(leftovers(t, name), "\n")
		for _, want := range []string{"table ip egressnat", "table arp egressnat", "lookup 2701", "lookup 2762", "lookup 2763",
			"default via 192.0.2.13 dev eth0 table 2701", "table 2762", "table 2763", "192.0.2.101/24"} {
			if !strings.Contains(have, want) {
				t.Errorf("before the uninstall, no %q in:\n%s", want, have)
			}
		}
		changed := readSysctls(t, name)
		for _, p := range kernelSysctls {
			if changed[p] == before[p] {
				t.Errorf("sysctl %s not changed (%s): the test shows nothing", p, before[p])
			}
		}
		if t.Failed() {
			t.FailNow()
		}

		// The uninstall, as the agent runs it on SIGTERM (with the host's
		// /proc/sys/net: here the namespace's).
		inNetNS(t, fd, func() {
			err = Uninstall(ctx, UninstallConfig{Dataplane: dp, StateDir: state, ProcSysNet: "/proc/sys/net", Log: zaptest.NewLogger(t)})
		})
		if err != nil {
			t.Fatalf("uninstall: %v", err)
		}
		if left := leftovers(t, name); len(left) > 0 {
			t.Errorf("left after the uninstall:\n%s", strings.Join(left, "\n"))
		}
		if after := readSysctls(t, name); fmt.Sprint(after) != fmt.Sprint(before) {
			t.Errorf("sysctls after the uninstall:\n%v\nwant as before:\n%v", after, before)
		}
		flows, err := c.Dump(nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, fl := range flows {
			if fl.TupleReply.IP.DestinationAddress == netip.MustParseAddr("192.0.2.101") {
				t.Errorf("flow SNATed to the floating IP left: %+v", fl)
			}
		}
		if _, err := os.Stat(state); !os.IsNotExist(err) {
			entries, _ := os.ReadDir(state)
			t.Errorf("state directory left: %v %v", entries, err)
		}
	})
	t.Run("boot guard only", func(t *testing.T) {
		name, fd := unNetNS(t, 2)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dp, err := nft.New(nft.Config{Uplink: "eth0", NetNSFd: fd, Logger: zaptest.NewLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close() //nolint:errcheck
		if installed, err := dp.Guard(ctx, []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}, nil); err != nil || !installed {
			t.Fatalf("guard table: %v %v", installed, err)
		}
		if left := leftovers(t, name); len(left) == 0 {
			t.Fatal("no guard table")
		}
		if err := Uninstall(ctx, UninstallConfig{Dataplane: dp, Log: zaptest.NewLogger(t)}); err != nil {
			t.Fatal(err)
		}
		if left := leftovers(t, name); len(left) > 0 {
			t.Errorf("left after the uninstall:\n%s", strings.Join(left, "\n"))
		}
	})
}
