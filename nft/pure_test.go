package nft

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/egressnat/egressnat/selector"
)

func TestSetKey(t *testing.T) {
	long := strings.Repeat("a", 60)
	tests := []struct {
		name, want string
	}{
		{"web", "web"},
		{"team-a.egress", "team-a.egress"},
		{strings.Repeat("x", maxSetKey), strings.Repeat("x", maxSetKey)},
	}
	for _, tt := range tests {
		if got := setKey(tt.name); got != tt.want {
			t.Errorf("setKey(%q) = %q, want %q", tt.name, got, tt.want)
		}
	}
	k := setKey(long)
	if len(k) > maxSetKey || !strings.HasPrefix(k, "aaaa") || !strings.Contains(k, "_") {
		t.Errorf("long name key %q", k)
	}
	if setKey(long) != k {
		t.Error("setKey not stable")
	}
	if setKey(long+"b") == k {
		t.Error("two long names share a key")
	}
	if got := setKey("Upper_Case"); got == "Upper_Case" || strings.ContainsAny(got, "U") {
		t.Errorf("unsafe name used as is: %q", got)
	}
	if srcSetName("web") != "src-web" || dstSetName("web") != "dst-web" {
		t.Error("set names")
	}
}

func TestCommentPolicy(t *testing.T) {
	p := selector.PolicyState{Name: "web", Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100")}
	c := policyComment(p, 0)
	if c != "policy web: snat to 192.0.2.100" || commentPolicy(c) != "web" {
		t.Fatalf("comment %q -> %q", c, commentPolicy(c))
	}
	p.Name = strings.Repeat("n", 250)
	if c := policyComment(p, 0); len(c) > maxComment {
		t.Fatalf("comment too long: %d", len(c))
	}
}

func TestPrefixRange(t *testing.T) {
	tests := []struct {
		p          string
		start, end string
		open       bool
	}{
		{"203.0.113.0/24", "203.0.113.0", "203.0.114.0", false},
		{"203.0.113.7/32", "203.0.113.7", "203.0.113.8", false},
		{"203.0.113.77/24", "203.0.113.0", "203.0.114.0", false}, // masked
		{"255.0.0.0/8", "255.0.0.0", "", true},
		{"0.0.0.0/0", "0.0.0.0", "", true},
		{"255.255.255.255/32", "255.255.255.255", "", true},
	}
	for _, tt := range tests {
		r := prefixRange(netip.MustParsePrefix(tt.p))
		if r.start != netip.MustParseAddr(tt.start) || r.open != tt.open || (!tt.open && r.end != netip.MustParseAddr(tt.end)) {
			t.Errorf("prefixRange(%s) = %+v", tt.p, r)
		}
	}
}

func rangesOf(ps ...string) []ipRange {
	var out []netip.Prefix
	for _, p := range ps {
		out = append(out, netip.MustParsePrefix(p))
	}
	return prefixRanges(out)
}

// Encoding ranges as elements and decoding them in any order is lossless,
// adjacent and open ranges included.
func TestElemRangesRoundTrip(t *testing.T) {
	rs := rangesOf("0.0.0.0/8", "10.0.0.0/24", "10.0.1.0/24", "203.0.113.0/25", "255.0.0.0/8")
	var el []nftables.SetElement
	for _, r := range rs {
		el = append(el, r.elems()...)
	}
	slices.Reverse(el) // the kernel dumps rbtree sets backwards
	got := elemRanges(el)
	if !sameRanges(got, rs) {
		t.Fatalf("got %v, want %v", got, rs)
	}
	// A lone end element (as old libnftables added) decodes to something the
	// diff deletes.
	el = append(el, nftables.SetElement{Key: []byte{1, 2, 3, 4}, IntervalEnd: true})
	added, removed := diffRanges(elemRanges(el), rs)
	if len(added) != 0 || len(removed) != 1 || len(removed[0].elemsForDelete()) != 1 || !removed[0].elemsForDelete()[0].IntervalEnd {
		t.Fatalf("lone end: added %v removed %v", added, removed)
	}
}

func TestDiffAddrs(t *testing.T) {
	have := addrList("10.244.0.1", "10.244.0.2", "10.244.0.4")
	want := addrList("10.244.0.2", "10.244.0.3", "10.244.0.4", "10.244.0.5")
	added, removed := diffAddrs(have, want)
	if !slices.Equal(added, addrList("10.244.0.3", "10.244.0.5")) || !slices.Equal(removed, addrList("10.244.0.1")) {
		t.Fatalf("added %v removed %v", added, removed)
	}
	if a, r := diffAddrs(want, want); len(a)+len(r) != 0 {
		t.Fatal("diff of equal lists")
	}
}

func TestClusterRanges(t *testing.T) {
	have := rangesOf("10.0.0.0/24", "10.0.2.0/24", "10.0.9.0/24", "10.1.0.0/16")
	want := rangesOf("10.0.0.0/23", "10.0.2.0/24", "10.0.20.0/24", "10.1.0.0/24", "10.1.1.0/24")
	added, removed := diffRanges(have, want)
	cls := clusterRanges(added, removed)
	// 10.0.0.0/24 -> /23 (mixed), 10.0.9.0/24 removed, 10.0.20.0/24 added,
	// 10.1.0.0/16 -> two /24 (mixed).
	if len(cls) != 4 {
		t.Fatalf("clusters: %+v", cls)
	}
	kinds := ""
	for _, c := range cls {
		switch {
		case len(c.added) > 0 && len(c.removed) > 0:
			kinds += "m"
		case len(c.added) > 0:
			kinds += "a"
		default:
			kinds += "d"
		}
	}
	if kinds != "mdam" {
		t.Fatalf("cluster kinds %q", kinds)
	}
	if len(cls[3].added) != 2 || cls[3].weight() != 6 {
		t.Fatalf("last cluster %+v", cls[3])
	}
}

func TestSpanSet(t *testing.T) {
	ss := newSpanSet(rangesOf("203.0.113.0/25"), rangesOf("203.0.113.128/25", "10.0.0.0/8"), rangesOf("255.255.255.0/24"))
	if len(ss) != 3 {
		t.Fatalf("spans %v", ss)
	}
	for s, want := range map[string]bool{
		"203.0.113.0": true, "203.0.113.255": true, "203.0.114.0": false, "10.9.9.9": true,
		"11.0.0.0": false, "255.255.255.255": true, "9.255.255.255": false,
	} {
		if got := ss.contains(netip.MustParseAddr(s)); got != want {
			t.Errorf("contains(%s) = %v", s, got)
		}
	}
	if newSpanSet().contains(netip.MustParseAddr("1.2.3.4")) {
		t.Error("empty set contains")
	}
}

func TestMergeOverlaps(t *testing.T) {
	got := mergeOverlaps(rangesOf("10.0.0.0/8", "10.1.0.0/16", "10.255.0.0/24", "11.0.0.0/8", "200.0.0.0/8", "0.0.0.0/0"))
	// 0.0.0.0/0 starts first and swallows everything.
	if len(got) != 1 || !got[0].open {
		t.Fatalf("got %v", got)
	}
	got = mergeOverlaps(rangesOf("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8"))
	if !sameRanges(got, rangesOf("10.0.0.0/8", "11.0.0.0/8")) {
		t.Fatalf("got %v", got)
	}
}

func TestNormalizeState(t *testing.T) {
	ok := selector.NodeState{Policies: []selector.PolicyState{{
		Name: "web", Mode: selector.ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.100"),
		Sources:      addrList("10.244.0.2", "10.244.0.1", "10.244.0.2"),
		Destinations: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("203.0.113.0/25")},
	}}}
	n, err := normalizeState(ok)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(n.sources["src-web"], addrList("10.244.0.1", "10.244.0.2")) || len(n.dests["dst-web"]) != 1 {
		t.Fatalf("normalized %+v", n)
	}
	bad := []selector.NodeState{
		{Policies: []selector.PolicyState{{Name: "", Mode: selector.ModeDrop}}},
		{Policies: []selector.PolicyState{{Name: "a", Mode: selector.ModeReroute}}},
		{Policies: []selector.PolicyState{{Name: "a", Mode: selector.ModeGateway}}},
		{Policies: []selector.PolicyState{{Name: "a", Mode: "Other"}}},
		{Policies: []selector.PolicyState{{Name: "a", Mode: selector.ModeDrop, Sources: addrList("2001:db8::1")}}},
		{Policies: []selector.PolicyState{{Name: "a", Mode: selector.ModeDrop}, {Name: "a", Mode: selector.ModeDrop}}},
		{FloatingIPs: []netip.Prefix{netip.MustParsePrefix("2001:db8::1/64")}},
	}
	for i, st := range bad {
		if _, err := normalizeState(st); err == nil {
			t.Errorf("bad state %d accepted", i)
		}
	}
}

func TestGARPFrame(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
	f := garpFrame(mac, netip.MustParseAddr("192.0.2.100"))
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 0x0b, 0x08, 0x06, // ethernet
		0, 1, 8, 0, 6, 4, 0, 1, // ARP request
		2, 0, 0, 0, 0, 0x0b, 192, 0, 2, 100, // sender
		0, 0, 0, 0, 0, 0, 192, 0, 2, 100, // target: same IP
	}
	if !bytes.Equal(f, want) {
		t.Fatalf("frame %x\nwant  %x", f, want)
	}
}

func TestBatching(t *testing.T) {
	addrs := make([]netip.Addr, 2500)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)})
	}
	steps := elemSteps(setDef{name: "src-x"}, addrElements(addrs), false)
	if len(steps) != 3 || steps[0].elems != maxMsgElements || steps[2].elems != 2500-2*maxMsgElements {
		t.Fatalf("steps %+v", steps)
	}
	// Steps share a transaction up to the bounds, and one step is never
	// split.
	big := elemSteps(setDef{name: "src-x"}, addrElements(make([]netip.Addr, 3*maxBatchElements)), false)
	tx := transactions(&Plan{steps: big})
	if len(tx) != 3*maxBatchElements/(maxBatchElements/maxMsgElements*maxMsgElements)+1 && len(tx) < 3 {
		t.Fatalf("%d transactions", len(tx))
	}
	for _, steps := range tx {
		n := 0
		for _, s := range steps {
			n += s.elems
		}
		if n > maxBatchElements {
			t.Fatalf("a transaction carries %d elements", n)
		}
	}
	joined := join(big[:9]...)
	if got := transactions(&Plan{steps: []step{joined}}); len(got) != 1 {
		t.Fatalf("a joined step split over %d transactions", len(got))
	}
}

func TestConfigDefaults(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("no uplink accepted")
	}
	d, err := New(Config{Uplink: "eth0"})
	if err != nil {
		t.Fatal(err)
	}
	c := d.cfg
	if c.Table != "egressnat" || c.MarkMask != 0x3f00 || c.RouteTableBase != 2700 || c.RulePriority != 29000 || !c.inCurrentNetNS() {
		t.Fatalf("defaults %+v", c)
	}
	if c.MarkMask&(0x4000|0x8000|0xffff0000) != 0 {
		t.Fatal("default mask collides with kube-proxy or Calico")
	}
}
