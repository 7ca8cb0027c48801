package nft

import (
	"maps"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap/zaptest"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
)

// TestClassifierMode: the eBPF mode on the kernel. The program is attached
// to the gateway node's pod-facing veth; the table holds no pod address in
// pre-src nor in known-pods, yet a pod selected by a Drop policy is
// dropped (its class dispatches to the policy's chain), a pod of a chain
// without a class (more chains than the class mask holds) is dispatched by
// its address, an unknown pod is held, and a pod the agent learns (an
// incremental apply) goes on at once. The classifier's map is checked
// (Verify) and repaired; a policy replaced by another keeps its pod
// dropped throughout.
func TestClassifierMode(t *testing.T) {
	l := newRelLabNamed(t, "enat-cls-")
	seen := l.udpServers()
	const unknown = "10.244.2.7"
	l.ip("pod", "addr", "add", unknown+"/32", "dev", relUplink)

	c := l.classifier()

	// Two class bits: classes 2 and 3 go to chainMulti and pp-deny (sorted
	// order); pp-deny2 gets none.
	const mask = 0x30000
	d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd("gw"), Logger: zaptest.NewLogger(t), ARPProbeWait: -1,
		Classifier: c, ClassMask: mask})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	keepARP(t, d)

	pod, unk := netip.MustParseAddr(relPod), netip.MustParseAddr(unknown)
	web := relGateway("web", relFloat1, relServer1+"/32")
	web.Sources = nil // relPod in pp-deny alone (with web it would be shared: chainMulti)
	deny := selector.PolicyState{Name: "deny", Mode: selector.ModeDrop, Sources: []netip.Addr{pod},
		Destinations: []netip.Prefix{netip.MustParsePrefix(relServer2 + "/32")}}
	deny2 := selector.PolicyState{Name: "deny2", Mode: selector.ModeDrop,
		Destinations: []netip.Prefix{netip.MustParsePrefix(relServer3 + "/32")}}
	st := selector.NodeState{
		Policies:    []selector.PolicyState{web, deny, deny2},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		PodNetworks: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		LocalPods:   []netip.Addr{pod},
	}
	r := mustApply(t, d, st)
	mustVerify(t, d, "after apply")
	if r.ClassesWritten != 1 {
		t.Fatalf("first apply wrote %d map entries, want 1", r.ClassesWritten)
	}
	cls := func(idx int) bpf.Class { return bpf.Class{Mark: selector.MarkValue(mask, idx), Mask: mask} }
	wantEntries := func(want map[netip.Addr]bpf.Class) {
		t.Helper()
		got, err := c.Entries()
		if err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(got, want) {
			t.Fatalf("classifier map %v, want %v", got, want)
		}
	}
	wantEntries(map[netip.Addr]bpf.Class{pod: cls(3)})
	table := func() string { return l.exec("gw", "nft", "list", "table", "ip", "egressnat") }
	out := table()
	for _, want := range []string{"meta mark & 0x00030000 vmap @pre-class", "meta mark & 0x00030000 != @classes",
		"type mark : verdict", "0x00020000 : jump multi", "0x00030000 : jump pp-deny"} {
		if !strings.Contains(out, want) {
			t.Fatalf("no %q in the table:\n%s", want, out)
		}
	}
	// What `nft list` shows, `nft -f` takes back (a saved ruleset
	// restores).
	saved := l.exec("gw", "nft", "list", "table", "ip", "egressnat")
	l.exec("gw", "nft", "delete", "table", "ip", "egressnat")
	if out, err := exec.Command("ip", "netns", "exec", l.ns("gw"), "nft", "-f", "-").CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v %s", err, out)
	}
	restore := exec.Command("ip", "netns", "exec", l.ns("gw"), "nft", "-f", "-")
	restore.Stdin = strings.NewReader(saved)
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("nft -f of the listed table: %v %s\n%s", err, out, saved)
	}
	if again := l.exec("gw", "nft", "list", "table", "ip", "egressnat"); again != saved {
		t.Fatalf("restored table differs:\n%s\nwas:\n%s", again, saved)
	}
	// The restored table dispatches the classes as before: relPod's class
	// still drops its traffic to deny's destination.
	l.expectFromAddr(seen, 8299, relPod, relServer2, "")
	// nft -f writes interval sets its own way: the agent's check sees a
	// change made outside egressnat, and the next apply rewrites them.
	if _, err := d.Verify(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	mustApply(t, d, st)
	mustVerify(t, d, "after the restore")
	preSrc := l.exec("gw", "nft", "list", "map", "ip", "egressnat", "pre-src")
	if strings.Contains(preSrc, "10.244.") {
		t.Fatalf("pre-src holds pod addresses in the eBPF mode:\n%s", preSrc)
	}
	known := l.exec("gw", "nft", "list", "set", "ip", "egressnat", "known-pods")
	if strings.Contains(known, "10.244.") {
		t.Fatalf("known-pods holds pod addresses in the eBPF mode:\n%s", known)
	}

	expect := func(port int, src, server, want string) {
		t.Helper()
		l.expectFromAddr(seen, port, src, server, want)
	}
	// What comes after our prerouting (a NetworkPolicy implementation's
	// filter chains, here a counter in forward) never sees a class.
	l.exec("gw", "nft", "add", "table", "ip", "enat_cls_probe")
	l.exec("gw", "nft", "add chain ip enat_cls_probe probe { type filter hook forward priority 0 ; }")
	l.exec("gw", "nft", "add rule ip enat_cls_probe probe meta mark and 0x00030000 != 0 counter")
	expect(8300, relPod, relServer1, relGW) // known, unselected there: the CNI's masquerade
	if out := l.exec("gw", "nft", "list", "chain", "ip", "enat_cls_probe", "probe"); !strings.Contains(out, "packets 0 ") {
		t.Fatalf("a forwarded packet kept its class bits after prerouting:\n%s", out)
	}
	expect(8301, relPod, relServer2, "")  // class pp-deny: dropped
	expect(8302, unknown, relServer1, "") // unknown: held
	expect(8303, unknown, relServer2, "")

	// The agent learns the unknown pod, selected by deny2 (no class): an
	// incremental apply writes it as known and dispatches it by address.
	st.LocalPods = append(st.LocalPods, unk)
	st.Policies[2].Sources = []netip.Addr{unk}
	r = mustApply(t, d, st)
	if !r.Incremental {
		t.Fatalf("learning a pod: %+v, want an incremental apply", r)
	}
	mustVerify(t, d, "after learning a pod")
	wantEntries(map[netip.Addr]bpf.Class{pod: cls(3), unk: cls(selector.KnownClass)})
	if preSrc := l.exec("gw", "nft", "list", "map", "ip", "egressnat", "pre-src"); !strings.Contains(preSrc, unknown+" : jump pp-deny2") {
		t.Fatalf("pre-src lacks the overflow pod:\n%s", preSrc)
	}
	expect(8304, unknown, relServer3, "")    // deny2 by address: dropped
	expect(8305, unknown, relServer1, relGW) // known, unselected there: the CNI's masquerade
	expect(8306, relPod, relServer3, relGW)  // deny2 does not select relPod

	// Drift: an entry deleted behind the agent's back is found and
	// rewritten by the next apply.
	if err := c.Update(nil, []netip.Addr{pod}); err != nil {
		t.Fatal(err)
	}
	if drift, err := d.Verify(ctxT(t)); err != nil || !strings.Contains(drift, "classifier map") {
		t.Fatalf("verify after deleting a map entry: %q %v", drift, err)
	}
	expect(8307, relPod, relServer2, "") // unclassified now: held (not leaked)
	if r := mustApply(t, d, st); r.ClassesWritten != 1 {
		t.Fatalf("repair wrote %d entries, want 1", r.ClassesWritten)
	}
	mustVerify(t, d, "after the repair")
	wantEntries(map[netip.Addr]bpf.Class{pod: cls(3), unk: cls(selector.KnownClass)})

	// deny replaced by deny3 (same pod, same destination): deny's class
	// is not given to another chain in the same apply (the pod may still
	// carry it), so deny3 dispatches its pod by address; the pod stays
	// dropped. The next full apply gives the class left free to the first
	// chain without one (pp-deny2, sorted before pp-deny3): its pod's
	// pre-src element goes once the map says so.
	deny3 := deny
	deny3.Name = "deny3"
	st.Policies = []selector.PolicyState{web, deny3, st.Policies[2]}
	mustApply(t, d, st)
	mustVerify(t, d, "after replacing a policy")
	wantEntries(map[netip.Addr]bpf.Class{pod: cls(selector.KnownClass), unk: cls(selector.KnownClass)})
	preSrc = l.exec("gw", "nft", "list", "map", "ip", "egressnat", "pre-src")
	if !strings.Contains(preSrc, relPod+" : jump pp-deny3") || strings.Contains(preSrc, "jump pp-deny\n") || strings.Contains(preSrc, "jump pp-deny,") {
		t.Fatalf("pre-src after replacing the policy:\n%s", preSrc)
	}
	expect(8308, relPod, relServer2, "")
	d.Recheck()
	mustApply(t, d, st)
	mustVerify(t, d, "after the next full apply")
	wantEntries(map[netip.Addr]bpf.Class{pod: cls(selector.KnownClass), unk: cls(3)})
	if preSrc := l.exec("gw", "nft", "list", "map", "ip", "egressnat", "pre-src"); strings.Contains(preSrc, unknown) ||
		!strings.Contains(preSrc, relPod+" : jump pp-deny3") {
		t.Fatalf("pre-src after the class was given to pp-deny2:\n%s", preSrc)
	}
	expect(8309, relPod, relServer2, "")
	expect(8310, unknown, relServer3, "")

	// Without pod networks (no hold rule), every pod with a chain keeps its
	// pre-src element too.
	st.PodNetworks = nil
	mustApply(t, d, st)
	mustVerify(t, d, "without pod networks")
	if preSrc := l.exec("gw", "nft", "list", "map", "ip", "egressnat", "pre-src"); !strings.Contains(preSrc, relPod+" : jump") {
		t.Fatalf("without pod networks, pre-src lacks the pod:\n%s", preSrc)
	}
}

// TestClassifierSwitch: an agent of the nftables mode replaced by one of
// the eBPF mode (and back) on a live table: the pod selected by a Drop
// policy is dropped throughout; each mode's table is what it should be.
func TestClassifierSwitch(t *testing.T) {
	l := newRelLabNamed(t, "enat-csw-")
	seen := l.udpServers()
	c := l.classifier()
	pod := netip.MustParseAddr(relPod)
	st := selector.NodeState{
		Policies: []selector.PolicyState{{Name: "deny", Mode: selector.ModeDrop, Sources: []netip.Addr{pod},
			Destinations: []netip.Prefix{netip.MustParsePrefix(relServer2 + "/32")}}},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		PodNetworks: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		LocalPods:   []netip.Addr{pod},
	}
	dataplane := func(classifier PodClassifier) *Dataplane {
		t.Helper()
		d, err := New(Config{Uplink: relUplink, NetNSFd: l.fd("gw"), Logger: zaptest.NewLogger(t), ARPProbeWait: -1, Classifier: classifier})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	list := func(what, name string) string { return l.exec("gw", "nft", "list", what, "ip", "egressnat", name) }
	port := 8400
	dropped := func(when string) {
		t.Helper()
		t.Logf("%s: the pod's traffic to deny's destination is dropped, elsewhere not", when)
		port++
		l.expectFromAddr(seen, port, relPod, relServer2, "")
		l.expectFromAddr(seen, port+100, relPod, relServer1, relGW) // not selected there: the CNI's masquerade
	}

	mustApply(t, dataplane(nil), st)
	if !strings.Contains(list("map", "pre-src"), relPod) || !strings.Contains(list("set", "known-pods"), relPod) {
		t.Fatalf("nftables mode: the pod is not in pre-src and known-pods")
	}
	dropped("nftables mode")

	d := dataplane(c)
	mustApply(t, d, st)
	mustVerify(t, d, "eBPF mode after nftables mode")
	if strings.Contains(list("map", "pre-src"), relPod) || strings.Contains(list("set", "known-pods"), relPod) {
		t.Fatalf("eBPF mode: the pod is still in pre-src or known-pods:\n%s\n%s", list("map", "pre-src"), list("set", "known-pods"))
	}
	if r := d.LastResult(); r.ClassesWritten != 1 {
		t.Fatalf("eBPF mode: %d map entries written, want 1", r.ClassesWritten)
	}
	dropped("eBPF mode")

	mustApply(t, dataplane(nil), st)
	if !strings.Contains(list("map", "pre-src"), relPod) {
		t.Fatalf("back to the nftables mode: the pod is not in pre-src")
	}
	if out := l.exec("gw", "nft", "list", "table", "ip", "egressnat"); strings.Contains(out, "pre-class") || strings.Contains(out, "class-clear") {
		t.Fatalf("back to the nftables mode: the eBPF mode's objects are left:\n%s", out)
	}
	dropped("back to the nftables mode")
}

// classifier loads the eBPF classifier in a bpffs of the test's own and
// attaches it to the gateway's pod-facing veth; all of it goes with the
// test.
func (l *relLab) classifier() *bpf.Classifier {
	l.t.Helper()
	fs := l.t.TempDir()
	if out, err := exec.Command("mount", "-t", "bpf", "bpf", fs).CombinedOutput(); err != nil {
		l.t.Fatalf("mount bpffs: %v %s", err, out)
	}
	l.t.Cleanup(func() { exec.Command("umount", fs).Run() }) //nolint:errcheck
	c, err := bpf.Load(fs + "/egressnat")
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	if err := l.inNS("gw", func() error {
		link, err := netlink.LinkByName("enat-rel-c")
		if err != nil {
			return err
		}
		_, err = c.Attach(link.Attrs().Index)
		return err
	}); err != nil {
		l.t.Fatal(err)
	}
	return c
}
