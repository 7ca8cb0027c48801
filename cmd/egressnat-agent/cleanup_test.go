package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"github.com/vishvananda/netns"
)

// TestCleanupFlag runs the agent's executable as an operator runs it on a
// node whose agent is gone (docs/operations.md, Uninstall): `egressnat-agent
// --cleanup --state-dir=DIR`, as root in the node's network namespace (a
// namespace "un-cli-<pid>"), with no other flag: the uplink is the one
// saved in the state directory. Everything egressnat put there goes: the
// table, the ip rules and routes, the floating IP, the sysctls (back to
// their values before) and the state files.
func TestCleanupFlag(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, a network namespace and kernel nftables (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "egressnat-agent")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	name := fmt.Sprintf("un-cli-%d", os.Getpid())
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	exec.Command("ip", "netns", "del", name).Run() //nolint:errcheck // a crashed run's leftover
	run("ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() }) //nolint:errcheck
	for _, args := range [][]string{
		{"link", "add", "eth0", "type", "veth", "peer", "name", "eth1"}, {"link", "set", "eth1", "up"},
		{"addr", "add", "192.0.2.12/24", "dev", "eth0"}, {"link", "set", "eth0", "up"},
	} {
		run(append([]string{"ip", "-n", name}, args...)...)
	}
	sysctl := func(p string) string {
		return strings.TrimSpace(run("ip", "netns", "exec", name, "cat", filepath.Join("/proc/sys/net", p)))
	}
	const redirects = "ipv4/conf/all/send_redirects"
	before := sysctl(redirects)
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()

	// A gateway's state, its sysctls recorded (SysctlRecordDir), and the
	// files the agent keeps.
	state := t.TempDir()
	dp, err := nft.New(nft.Config{Uplink: "eth0", NetNSFd: int(h), ARPProbeWait: -1, SysctlRecordDir: state})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close() //nolint:errcheck
	if err := dp.Apply(ctx, selector.NodeState{
		Policies: []selector.PolicyState{{Name: "partners", Mode: selector.ModeGateway, Sources: []netip.Addr{netip.MustParseAddr("10.244.2.9")},
			Destinations: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}, EgressIP: netip.MustParseAddr("192.0.2.101")}},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix("192.0.2.101/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}); err != nil {
		t.Fatalf("apply: %v", err)
	}
	for f, text := range map[string]string{"uplink": "eth0\n", "cluster-networks": "10.244.0.0/16\n", "egressnat-agent": "#!/bin/true\n"} {
		if err := os.WriteFile(filepath.Join(state, f), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if sysctl(redirects) == before || !strings.Contains(run("ip", "netns", "exec", name, "nft", "list", "ruleset"), "table ip egressnat") ||
		!strings.Contains(run("ip", "-n", name, "addr"), "192.0.2.101/24") || !strings.Contains(run("ip", "-n", name, "rule"), "lookup 2763") {
		t.Fatal("the gateway's state is not in place: the test shows nothing")
	}

	out := run("ip", "netns", "exec", name, bin, "--cleanup", "--state-dir="+state, "--log-format=console")
	t.Logf("egressnat-agent --cleanup:\n%s", out)
	if rs := strings.TrimSpace(run("ip", "netns", "exec", name, "nft", "list", "ruleset")); rs != "" {
		t.Errorf("nftables left:\n%s", rs)
	}
	if a := run("ip", "-n", name, "addr"); strings.Contains(a, "192.0.2.101") {
		t.Errorf("floating IP left:\n%s", a)
	}
	if r := run("ip", "-n", name, "rule"); strings.Contains(r, "lookup 27") {
		t.Errorf("ip rules left:\n%s", r)
	}
	if r := run("ip", "-n", name, "route", "show", "table", "all"); strings.Contains(r, "table 27") {
		t.Errorf("routes left:\n%s", r)
	}
	if got := sysctl(redirects); got != before {
		t.Errorf("%s = %s after the cleanup, want %s as before", redirects, got, before)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(state)
		t.Errorf("state directory left: %v %v", entries, err)
	}
	// Nothing left to do: a second run succeeds and changes nothing.
	run("ip", "netns", "exec", name, bin, "--cleanup", "--state-dir="+state, "--uplink=eth0", "--log-format=console")
}
