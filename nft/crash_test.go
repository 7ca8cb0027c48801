package nft

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	tinetfilter "github.com/ti-mo/netfilter"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// Crash consistency: kill -9 at any point of an Apply or a Cleanup leaves
// nothing a restart does not repair.
//
// A child process (this test binary, running TestCrashHelper) applies a
// state, or cleans up, in a network namespace "enat-crash-<id>-<case>-<k>"
// and SIGKILLs itself at kill point k:
//
//   - tx:N, right after the N-th nftables transaction the kernel committed
//     (committedHook, in kernelExec.run): every transaction of the Apply or
//     Cleanup, the last one included (for an Apply that adds floating IPs,
//     that is between the table and the address add);
//   - route-add, route-del, addr-add, addr-del: as soon as the kernel
//     reports the first route of our tables added or deleted, or a
//     floating IP added to or deleted from the uplink (a netlink
//     subscription in the child; the kill lands a few microseconds after
//     the event, which is a crash point as good as any).
//
// The number of transactions is found by running the child once without
// killing it. The parent then restarts, as an agent does: a fresh
// Dataplane applies the same state (Apply) or cleans up (Cleanup), and the
// kernel must then be what an uninterrupted run leaves (the table, ip
// rules, routes, addresses and sysctls, compared with a reference
// namespace), Verify must find no drift, a second Apply must change
// nothing, and a different state must apply as well.

const (
	crashEnvOp    = "ENAT_CRASH_OP" // apply or cleanup; unset: not a child
	crashEnvNS    = "ENAT_CRASH_NS"
	crashEnvState = "ENAT_CRASH_STATE"
	crashEnvKill  = "ENAT_CRASH_KILL" // a kill point, or "none"
	crashNSPrefix = "enat-crash-"
)

// crashPods returns n pod addresses from index from (10.244.0.0/16).
func crashPods(from, n int) []netip.Addr {
	out := make([]netip.Addr, 0, n)
	for i := from; i < from+n; i++ {
		out = append(out, netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}))
	}
	return out
}

// crashState returns the states of the crash tests, on a node 192.0.2.12
// with the uplink eth0. They are large enough that an Apply takes several
// transactions (sets are filled in bounded batches, a big change of
// sources is swapped through a copy), and hold Reroute, Gateway and Drop
// policies, overlapping destinations, a source shared by a Reroute and a
// Gateway policy, and floating IPs.
//
//	s1: web (Reroute via .11, 9000 pods), gw (Gateway .100, 6000 remote pods
//	    and 100 of web's), gw2 (Gateway .101, /32 inside gw's), deny
//	    (Drop), far (Reroute via .13); floating .100 and .101
//	s2: web's pods shifted by 8500 (a swap), gw2 and deny removed (.101
//	    given up), gw3 (Gateway .102) added, far via .14; floating .100
//	    and .102
//	s3: web removed, gw's pods changed a little, far via .13 again, deny
//	    back; floating .100 and .101
func crashState(name string) selector.NodeState {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pol := func(name string, mode selector.Mode, srcs []netip.Addr, dsts ...string) selector.PolicyState {
		var ps []netip.Prefix
		for _, d := range dsts {
			ps = append(ps, p(d))
		}
		return selector.PolicyState{Name: name, Mode: mode, Sources: srcs, Destinations: ps, Written: ps, Created: t0}
	}
	reroute := func(name, via string, srcs []netip.Addr, dsts ...string) selector.PolicyState {
		pl := pol(name, selector.ModeReroute, srcs, dsts...)
		pl.NextHop = a(via)
		return pl
	}
	gateway := func(name, egress string, srcs []netip.Addr, dsts ...string) selector.PolicyState {
		pl := pol(name, selector.ModeGateway, srcs, dsts...)
		pl.EgressIP = a(egress)
		return pl
	}
	floating := func(ips ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, ip := range ips {
			out = append(out, p(ip+"/24"))
		}
		return out
	}
	excluded := []netip.Prefix{p("10.244.0.0/16"), p("192.0.2.0/24")}
	switch name {
	case "s1":
		return selector.NodeState{
			Policies: []selector.PolicyState{
				reroute("web", "192.0.2.11", crashPods(0, 9000), "203.0.113.0/24"),
				gateway("gw", "192.0.2.100", slices.Concat(crashPods(20000, 6000), crashPods(0, 100)), "203.0.113.0/24", "198.51.100.0/24"),
				gateway("gw2", "192.0.2.101", crashPods(30000, 500), "203.0.113.10/32"),
				pol("deny", selector.ModeDrop, crashPods(40000, 300), "198.51.100.0/25"),
				reroute("far", "192.0.2.13", crashPods(41000, 200), "203.0.113.128/25"),
			},
			FloatingIPs: floating("192.0.2.100", "192.0.2.101"),
			Excluded:    excluded,
		}
	case "s2":
		return selector.NodeState{
			Policies: []selector.PolicyState{
				reroute("web", "192.0.2.11", crashPods(8500, 9000), "203.0.113.0/24"),
				gateway("gw", "192.0.2.100", slices.Concat(crashPods(20000, 6000), crashPods(8500, 100)), "203.0.113.0/24", "198.51.100.0/24"),
				gateway("gw3", "192.0.2.102", crashPods(50000, 3000), "198.51.100.128/25"),
				reroute("far", "192.0.2.14", crashPods(41000, 200), "203.0.113.128/25"),
			},
			FloatingIPs: floating("192.0.2.100", "192.0.2.102"),
			Excluded:    excluded,
		}
	case "s3":
		return selector.NodeState{
			Policies: []selector.PolicyState{
				gateway("gw", "192.0.2.100", crashPods(20010, 6000), "203.0.113.0/24", "198.51.100.0/24"),
				pol("deny", selector.ModeDrop, crashPods(40000, 300), "198.51.100.0/25"),
				reroute("far", "192.0.2.13", crashPods(41000, 250), "203.0.113.128/25"),
			},
			FloatingIPs: floating("192.0.2.100", "192.0.2.101"),
			Excluded:    excluded,
		}
	}
	panic("unknown crash state " + name)
}

var crashFloating = addrList("192.0.2.100", "192.0.2.101", "192.0.2.102")

// TestCrashHelper is the child process of the crash tests (skipped
// otherwise): it runs one Apply or Cleanup in the namespace it is given
// and kills itself with SIGKILL at the kill point.
func TestCrashHelper(t *testing.T) {
	op := os.Getenv(crashEnvOp)
	if op == "" {
		t.Skip("the child process of the crash tests")
	}
	f, err := os.Open("/run/netns/" + os.Getenv(crashEnvNS))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	d, err := New(Config{Uplink: "eth0", NetNSFd: fd})
	if err != nil {
		t.Fatal(err)
	}
	kill := os.Getenv(crashEnvKill)
	die := func() {
		fmt.Printf("crash: killed at %s\n", kill)
		_ = os.Stdout.Sync()
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
	committed := 0
	txKill := -1
	if n, ok := strings.CutPrefix(kill, "tx:"); ok {
		if txKill, err = strconv.Atoi(n); err != nil {
			t.Fatal(err)
		}
	}
	committedHook = func() {
		committed++
		if committed == txKill {
			die()
		}
	}
	defer func() { committedHook = nil }()
	done := make(chan struct{})
	defer close(done)
	nsh := netns.NsHandle(fd)
	async := true
	switch kill {
	case "route-add", "route-del":
		want := uint16(unix.RTM_NEWROUTE)
		if kill == "route-del" {
			want = unix.RTM_DELROUTE
		}
		ch := make(chan netlink.RouteUpdate, 256)
		if err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: &nsh}); err != nil {
			t.Fatal(err)
		}
		go func() {
			for u := range ch {
				if _, ours := (routing{cfg: d.cfg}).ourTable(u.Table); ours && u.Type == want {
					die()
				}
			}
		}()
	case "addr-add", "addr-del":
		ch := make(chan netlink.AddrUpdate, 256)
		if err := netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: &nsh}); err != nil {
			t.Fatal(err)
		}
		go func() {
			for u := range ch {
				ip, _ := netip.AddrFromSlice(u.LinkAddress.IP.To4())
				if slices.Contains(crashFloating, ip) && u.NewAddr == (kill == "addr-add") {
					die()
				}
			}
		}()
	default:
		async = false
	}
	if async {
		// An event followed by a transaction: the kill lands before that
		// transaction for sure (the kernel is asked before each run of
		// the executor), whatever the listener's delay.
		h, err := netlink.NewHandleAt(nsh)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		start := crashKernelObjects(t, h, d.cfg)
		d.nf.exec = crashExec{inner: d.nf.exec, before: func() {
			now := crashKernelObjects(t, h, d.cfg)
			for o := range now {
				if !start[o] && (kill == "route-add" && strings.HasPrefix(o, "route ") || kill == "addr-add" && strings.HasPrefix(o, "addr ")) {
					die()
				}
			}
			for o := range start {
				if !now[o] && (kill == "route-del" && strings.HasPrefix(o, "route ") || kill == "addr-del" && strings.HasPrefix(o, "addr ")) {
					die()
				}
			}
		}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	switch op {
	case "apply":
		err = d.Apply(ctx, crashState(os.Getenv(crashEnvState)))
	case "cleanup":
		err = d.Cleanup(ctx)
	default:
		t.Fatalf("unknown op %q", op)
	}
	r := d.LastResult()
	if async {
		// The event may still be on its way: give the kill its chance.
		time.Sleep(2 * time.Second)
	}
	fmt.Printf("crash: done committed=%d transactions=%d error=%v\n", committed, r.Transactions, err)
	if err != nil {
		t.Fatal(err)
	}
}

// crashExec calls before ahead of each run of inner.
type crashExec struct {
	inner  executor
	before func()
}

func (e crashExec) run(ctx context.Context, p *Plan) (int, error) {
	e.before()
	return e.inner.run(ctx, p)
}

// crashKernelObjects lists the routes of our tables and the floating IPs
// on the uplink.
func crashKernelObjects(t *testing.T, h *netlink.Handle, cfg Config) map[string]bool {
	out := map[string]bool{}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if _, ours := (routing{cfg: cfg}).ourTable(r.Table); ours {
			out[fmt.Sprintf("route %d %s", r.Table, r)] = true
		}
	}
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, ad := range addrs {
		if ip, _ := netip.AddrFromSlice(ad.IP.To4()); slices.Contains(crashFloating, ip) {
			out["addr "+ip.String()] = true
		}
	}
	return out
}

// crashChild runs the child and reports whether it was killed, with its
// output.
func crashChild(t *testing.T, ns, op, state, kill string) (bool, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelper$", "-test.count=1", "-test.v", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), crashEnvOp+"="+op, crashEnvNS+"="+ns, crashEnvState+"="+state, crashEnvKill+"="+kill)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			if !strings.Contains(string(out), "crash: killed at "+kill) {
				t.Fatalf("child killed by someone else:\n%s", out)
			}
			return true, string(out)
		}
	}
	if err != nil {
		t.Fatalf("child %s %s (kill %s): %v\n%s", op, state, kill, err, out)
	}
	return false, string(out)
}

var committedRE = regexp.MustCompile(`crash: done committed=(\d+) transactions=(\d+) error=<nil>`)

// crashNS creates a namespace with the uplink eth0 192.0.2.12/24 (a veth
// whose peer stays in the namespace), deleted when the test ends.
func crashNS(t *testing.T, name string) string {
	t.Helper()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v %s", name, err, out)
		}
	})
	run("-n", name, "link", "set", "lo", "up")
	run("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	run("-n", name, "link", "set", "eth1", "up")
	run("-n", name, "addr", "add", "192.0.2.12/24", "dev", "eth0")
	run("-n", name, "link", "set", "eth0", "up")
	return name
}

// crashDataplane returns a fresh Dataplane on ns, as a restarted agent
// makes one.
func crashDataplane(t *testing.T, ns string) *Dataplane {
	t.Helper()
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	d, err := New(Config{Uplink: "eth0", NetNSFd: int(f.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func crashApply(t *testing.T, d *Dataplane, state string) Result {
	t.Helper()
	if err := d.Apply(ctxT(t), crashState(state)); err != nil {
		t.Fatalf("apply %s: %v", state, err)
	}
	return d.LastResult()
}

// crashSnapshot is everything egressnat may change in ns, normalized so
// that two namespaces that hold the same compare equal whatever the order
// things were added in: the table (sets and chains sorted by name, set
// elements sorted; rule order kept, it matters), ip rules, routes of every
// table, the uplink's IPv4 addresses with their labels, and the gateway
// sysctls.
func crashSnapshot(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "ip", DefaultTable).CombinedOutput()
	if err != nil {
		if !strings.Contains(string(out), "No such file or directory") {
			t.Fatalf("nft list table: %v\n%s", err, out)
		}
		b.WriteString("no table\n")
	} else {
		b.WriteString(normalizeNFT(string(out)))
	}
	ip := func(args ...string) []string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		slices.Sort(lines)
		return lines
	}
	b.WriteString("ip rules:\n" + strings.Join(ip("-4", "rule", "show"), "\n") + "\n")
	b.WriteString("routes:\n" + strings.Join(ip("-4", "route", "show", "table", "all"), "\n") + "\n")
	b.WriteString("addresses:\n")
	for _, l := range ip("-4", "-o", "addr", "show", "dev", "eth0") {
		// 2: eth0    inet 192.0.2.100/24 scope global secondary eth0:enat\       valid_lft ...
		l, _, _ = strings.Cut(l, `\`)
		f := strings.Fields(l)
		if i := slices.Index(f, "inet"); i >= 0 && i+1 < len(f) {
			b.WriteString("  " + f[i+1] + " label " + f[len(f)-1] + "\n")
		}
	}
	for _, path := range []string{"ipv4/conf/all/send_redirects", "ipv4/conf/eth0/send_redirects", "netfilter/nf_conntrack_tcp_be_liberal"} {
		out, err := exec.Command("ip", "netns", "exec", ns, "cat", "/proc/sys/net/"+path).CombinedOutput()
		if err != nil {
			t.Fatalf("read %s: %v %s", path, err, out)
		}
		fmt.Fprintf(&b, "%s = %s\n", path, strings.TrimSpace(string(out)))
	}
	return b.String()
}

// normalizeNFT sorts the blocks (sets, maps, chains) of `nft list table`
// by their heading and the elements of each set.
func normalizeNFT(text string) string {
	var head []string
	var blocks []string
	var cur []string
	for _, line := range strings.Split(text, "\n") {
		switch {
		case cur == nil && strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, "\t\t") && strings.HasSuffix(line, "{"):
			cur = []string{line}
		case cur != nil && line == "\t}":
			blocks = append(blocks, normalizeBlock(cur))
			cur = nil
		case cur != nil:
			cur = append(cur, line)
		case strings.TrimSpace(line) != "" && line != "}":
			head = append(head, line)
		}
	}
	slices.Sort(blocks)
	return strings.Join(head, "\n") + "\n" + strings.Join(blocks, "\n") + "\n"
}

func normalizeBlock(lines []string) string {
	joined := strings.Join(lines, "\n")
	start := strings.Index(joined, "elements = {")
	if start < 0 {
		return joined
	}
	rest := joined[start+len("elements = {"):]
	end := strings.Index(rest, "}")
	if end < 0 {
		return joined
	}
	var elems []string
	for _, e := range strings.Split(rest[:end], ",") {
		if e = strings.Join(strings.Fields(e), " "); e != "" {
			elems = append(elems, e)
		}
	}
	slices.Sort(elems)
	return joined[:start] + fmt.Sprintf("elements (%d) = { %s }", len(elems), strings.Join(elems, ", ")) + rest[end+1:]
}

// crashDiff describes the first difference of two snapshots.
func crashDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Sprintf("line %d:\n  got:  %.300s\n  want: %.300s", i+1, gl, wl)
		}
	}
	return "equal"
}

// crashRefs applies s1, s2 and s3 in a reference namespace without
// crashing, and cleans up: the snapshot after each.
func crashRefs(t *testing.T, id string) map[string]string {
	t.Helper()
	ns := crashNS(t, crashNSPrefix+id+"-ref")
	refs := map[string]string{}
	crashApply(t, crashDataplane(t, ns), "s1")
	refs["s1"] = crashSnapshot(t, ns)
	d := crashDataplane(t, ns)
	crashApply(t, d, "s2")
	refs["s2"] = crashSnapshot(t, ns)
	crashApply(t, d, "s3")
	refs["s3"] = crashSnapshot(t, ns)
	if err := crashDataplane(t, ns).Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	refs["clean"] = crashSnapshot(t, ns)
	return refs
}

// crashCase is one Apply or Cleanup killed at every point.
type crashCase struct {
	name   string
	op     string   // apply or cleanup
	before []string // states applied first, each by a fresh Dataplane
	state  string   // apply: the state applied (and repaired)
	next   string   // apply: a different state applied after the repair
	async  []string // kill points by kernel event
	// flows: conntrack entries created before the child runs, and whether
	// the uninterrupted Apply deletes each.
	flows []crashFlow
}

// crashFlow is a conntrack entry of a crash case.
type crashFlow struct {
	src, dst, replyTo netip.Addr
	flushed           bool // by the uninterrupted Apply
}

var crashCases = []crashCase{
	{name: "initial", op: "apply", state: "s1", next: "s2", async: []string{"route-add", "addr-add"}},
	{name: "change", op: "apply", before: []string{"s1"}, state: "s2", next: "s3", async: []string{"route-add", "addr-add", "addr-del", "route-del"},
		flows: []crashFlow{
			// gw2's, SNATed to .101, which s2 gives up.
			{src: crashPods(30000, 1)[0], dst: a("203.0.113.10"), replyTo: a("192.0.2.101"), flushed: true},
			// gw3's (new in s2), masqueraded before this node served it.
			{src: crashPods(50000, 1)[0], dst: a("198.51.100.200"), replyTo: a("192.0.2.12"), flushed: true},
			// gw's, SNATed to .100, unchanged.
			{src: crashPods(20000, 1)[0], dst: a("203.0.113.5"), replyTo: a("192.0.2.100")},
		}},
	{name: "cleanup", op: "cleanup", before: []string{"s1", "s2"}, async: []string{"addr-del", "route-del"}},
}

// TestCrash: see the top of this file.
func TestCrash(t *testing.T) {
	requireRoot(t)
	if os.Getenv(crashEnvOp) != "" {
		t.Skip("in the child")
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	refs := crashRefs(t, id)
	if !strings.Contains(refs["clean"], "no table") || strings.Contains(refs["clean"], "label eth0:enat") {
		t.Fatalf("reference cleanup left state:\n%s", refs["clean"])
	}
	for _, c := range crashCases {
		t.Run(c.name, func(t *testing.T) {
			prepare := func(t *testing.T, k string) string {
				t.Helper()
				ns := crashNS(t, crashNSPrefix+id+"-"+c.name[:2]+"-"+strings.ReplaceAll(k, ":", ""))
				for _, st := range c.before {
					crashApply(t, crashDataplane(t, ns), st)
				}
				return ns
			}
			// The transactions of an uninterrupted run.
			ns := prepare(t, "count")
			crashCreateFlows(t, ns, c.flows)
			killed, out := crashChild(t, ns, c.op, c.state, "none")
			for i, f := range c.flows {
				if crashHasFlow(t, ns, f) == f.flushed {
					t.Fatalf("uninterrupted run: flow %d (%s -> %s, replies to %s) flushed %v, want %v", i, f.src, f.dst, f.replyTo, !f.flushed, f.flushed)
				}
			}
			m := committedRE.FindStringSubmatch(out)
			if killed || m == nil {
				t.Fatalf("uninterrupted run:\n%s", out)
			}
			n, _ := strconv.Atoi(m[1])
			if m[1] != m[2] {
				t.Fatalf("the hook saw %s transactions, the result says %s", m[1], m[2])
			}
			if c.op == "apply" && n < 3 {
				t.Fatalf("only %d transactions: the states are too small to test crashes between transactions", n)
			}
			t.Logf("%s: %d transactions", c.name, n)
			points := c.async
			for k := 1; k <= n; k++ {
				points = append(points, fmt.Sprintf("tx:%d", k))
			}
			for _, k := range points {
				t.Run(k, func(t *testing.T) {
					t.Parallel() // each in its own namespace
					ns := prepare(t, k)
					crashCreateFlows(t, ns, c.flows)
					if killed, out := crashChild(t, ns, c.op, c.state, k); !killed {
						t.Fatalf("the child was not killed at %s:\n%s", k, out)
					}
					if c.op == "cleanup" {
						crashCheckCleanup(t, ns, refs["clean"])
						return
					}
					crashCheckApply(t, ns, c, refs)
				})
			}
		})
	}
}

// crashCheckApply restarts after a crashed Apply of c.state: the same
// state applies and leaves what an uninterrupted run leaves, Verify finds
// nothing, a second Apply changes nothing, and c.next applies too.
func crashCheckApply(t *testing.T, ns string, c crashCase, refs map[string]string) {
	t.Helper()
	d := crashDataplane(t, ns)
	crashApply(t, d, c.state)
	if got := crashSnapshot(t, ns); got != refs[c.state] {
		t.Fatalf("after the restart, %s applied: the kernel differs from an uninterrupted run: %s", c.state, crashDiff(got, refs[c.state]))
	}
	if drift, err := d.Verify(ctxT(t)); drift != "" || err != nil {
		t.Fatalf("verify after the restart: %q %v", drift, err)
	}
	crashCheckConntrack(t, ns, d, c)
	if r := crashApply(t, crashDataplane(t, ns), c.state); r.Changed() {
		t.Fatalf("a second restart changed something: %+v", r)
	}
	crashApply(t, d, c.next)
	if got := crashSnapshot(t, ns); got != refs[c.next] {
		t.Fatalf("%s after %s: the kernel differs from an uninterrupted run: %s", c.next, c.state, crashDiff(got, refs[c.next]))
	}
	if drift, err := d.Verify(ctxT(t)); drift != "" || err != nil {
		t.Fatalf("verify after %s: %q %v", c.next, drift, err)
	}
}

// crashCheckCleanup restarts after a crashed Cleanup: Cleanup leaves
// nothing of egressnat.
func crashCheckCleanup(t *testing.T, ns, clean string) {
	t.Helper()
	if err := crashDataplane(t, ns).Cleanup(ctxT(t)); err != nil {
		t.Fatalf("cleanup after the restart: %v", err)
	}
	got := crashSnapshot(t, ns)
	if got != clean {
		t.Fatalf("after the restart's cleanup: %s", crashDiff(got, clean))
	}
	rules, _ := exec.Command("ip", "-n", ns, "rule", "show").CombinedOutput()
	routes, _ := exec.Command("ip", "-n", ns, "route", "show", "table", "all").CombinedOutput()
	switch {
	case !strings.Contains(got, "no table"):
		t.Fatal("the table is left")
	case strings.Contains(string(rules), fmt.Sprintf("%d:", selector.DefaultRulePriority)):
		t.Fatalf("ip rules left:\n%s", rules)
	case regexp.MustCompile(`table 27\d\d`).Match(routes):
		t.Fatalf("routes left:\n%s", routes)
	case strings.Contains(got, "label "+Label("eth0")):
		t.Fatalf("floating IPs left:\n%s", got)
	}
}

func crashNSFd(t *testing.T, ns string) int {
	t.Helper()
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func crashCreateFlows(t *testing.T, ns string, flows []crashFlow) {
	t.Helper()
	if len(flows) == 0 {
		return
	}
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: crashNSFd(t, ns)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, f := range flows {
		cf := conntrack.NewFlow(6, conntrack.StatusConfirmed|conntrack.StatusSeenReply|conntrack.StatusAssured|conntrack.StatusSrcNAT,
			f.src, f.dst, uint16(41000+i), 443, 600, 0)
		cf.TupleReply.IP.DestinationAddress = f.replyTo
		if err := c.Create(cf); err != nil {
			t.Fatalf("create conntrack entry %s -> %s: %v", f.src, f.dst, err)
		}
	}
}

func crashHasFlow(t *testing.T, ns string, f crashFlow) bool {
	t.Helper()
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: crashNSFd(t, ns)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	flows, err := c.DumpFilter(conntrack.NewFilter().Family(tinetfilter.ProtoIPv4), nil)
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(flows, func(x conntrack.Flow) bool {
		return x.TupleOrig.IP.SourceAddress == f.src && x.TupleOrig.IP.DestinationAddress == f.dst
	})
}

// crashCheckConntrack: after the restart's Apply, the conntrack entries the
// uninterrupted Apply deletes may still be there (the restart finds no
// change in the table, so it deletes nothing: the clean-up of conntrack
// is derived from the change and is lost with the process). The
// verification of the failover (VerifyReleased for the IPs the state gave
// up, VerifyTaken for those it holds) repairs that: then exactly the
// entries the uninterrupted Apply deletes are gone.
func crashCheckConntrack(t *testing.T, ns string, d *Dataplane, c crashCase) {
	t.Helper()
	if len(c.flows) == 0 {
		return
	}
	var left []string
	for _, f := range c.flows {
		if f.flushed && crashHasFlow(t, ns, f) {
			left = append(left, fmt.Sprintf("%s -> %s (replies to %s)", f.src, f.dst, f.replyTo))
		}
	}
	if len(left) > 0 {
		t.Logf("KNOWN GAP: the restart's Apply left the conntrack entries the crashed Apply was to delete: %s", strings.Join(left, "; "))
	}
	st := crashState(c.state)
	var held []netip.Addr
	for _, f := range st.FloatingIPs {
		held = append(held, f.Addr())
	}
	var released []netip.Addr
	for _, ip := range crashFloating {
		if !slices.Contains(held, ip) {
			released = append(released, ip)
		}
	}
	v, err := d.VerifyReleased(ctxT(t), released)
	if err != nil || v.Remaining != 0 {
		t.Fatalf("verify released %v: %+v %v", released, v, err)
	}
	v, err = d.VerifyTaken(ctxT(t), held)
	if err != nil || v.Remaining != 0 {
		t.Fatalf("verify taken %v: %+v %v", held, v, err)
	}
	for i, f := range c.flows {
		if crashHasFlow(t, ns, f) == f.flushed {
			t.Fatalf("after the verification: flow %d (%s -> %s, replies to %s) flushed %v, want %v", i, f.src, f.dst, f.replyTo, !f.flushed, f.flushed)
		}
	}
}
