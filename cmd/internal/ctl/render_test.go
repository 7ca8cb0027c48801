package ctl

import (
	"encoding/binary"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

func loadAddr(off uint32) *expr.Payload {
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4}
}

func matchSets(src, dst string) []expr.Any {
	return []expr.Any{
		loadAddr(12), &expr.Lookup{SourceRegister: 1, SetName: src},
		loadAddr(16), &expr.Lookup{SourceRegister: 1, SetName: dst},
	}
}

func ifname(s string) []byte {
	b := make([]byte, 16)
	copy(b, s)
	return b
}

// TestRenderRule: the four rules the agent writes print as nft prints them.
func TestRenderRule(t *testing.T) {
	ne := binaryutil.NativeEndian.PutUint32
	for _, tc := range []struct {
		name  string
		exprs []expr.Any
		want  string
	}{{
		name: "reroute",
		exprs: append(matchSets("src-web", "dst-web"),
			&expr.Counter{Packets: 12, Bytes: 1008},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(^uint32(0x3f00)), Xor: ne(0x100)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}),
		want: "ip saddr @src-web ip daddr @dst-web counter packets 12 bytes 1008 meta mark set meta mark & 0xffffc0ff | 0x00000100",
	}, {
		name:  "drop",
		exprs: append(matchSets("src-web", "dst-web"), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}),
		want:  "ip saddr @src-web ip daddr @dst-web counter packets 0 bytes 0 drop",
	}, {
		name: "gateway",
		exprs: append(matchSets("src-web", "dst-web"),
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("eth0")},
			&expr.Counter{Packets: 3, Bytes: 180},
			&expr.Immediate{Register: 1, Data: []byte{192, 0, 2, 100}},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1}),
		want: `ip saddr @src-web ip daddr @dst-web oifname "eth0" counter packets 3 bytes 180 snat to 192.0.2.100`,
	}, {
		name: "null binding",
		exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(0x3f00), Xor: ne(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ne(0)},
			&expr.Counter{},
			loadAddr(12),
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		},
		want: "meta mark & 0x00003f00 != 0x00000000 counter packets 0 bytes 0 snat to ip saddr",
	}, {
		name: "floating guard",
		exprs: []expr.Any{
			loadAddr(16), &expr.Lookup{SourceRegister: 1, SetName: "floating"},
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ne(8)},
			&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop},
		},
		want: "ip daddr @floating ct state new counter packets 0 bytes 0 drop",
	}, {
		name: "ct state mask",
		exprs: []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: ne(2 | 4), Xor: ne(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ne(0)},
			&expr.Verdict{Kind: expr.VerdictAccept},
		},
		want: "ct state established,related accept",
	}, {
		name: "others",
		exprs: []expr.Any{
			loadAddr(16), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{203, 0, 113, 7}},
			&expr.Lookup{SourceRegister: 1, SetName: "x", Invert: true},
			&expr.Masq{}, &expr.Verdict{Kind: expr.VerdictJump, Chain: "c"}, &expr.Log{},
		},
		want: "ip daddr 203.0.113.7 ip daddr != @x masquerade jump c <*expr.Log>",
	}} {
		if got := RenderRule(tc.exprs); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

func el(s string, end bool) nftables.SetElement {
	a := netip.MustParseAddr(s).As4()
	return nftables.SetElement{Key: a[:], IntervalEnd: end}
}

// TestRenderElements: interval sets print as CIDRs (or ranges), in any
// element order, with adjacent and open intervals; plain sets sorted.
func TestRenderElements(t *testing.T) {
	got := RenderElements([]nftables.SetElement{
		el("203.0.114.0", true), el("203.0.113.0", false), // 203.0.113.0/24
		el("0.0.0.0", true),                                 // nft's leading end
		el("198.51.100.8", true), el("198.51.100.0", false), // adjacent /29s
		el("198.51.100.16", true), el("198.51.100.8", false),
		el("10.0.0.5", false), el("10.0.0.8", true), // not a prefix
		el("240.0.0.0", false), // open to the end
	}, true)
	want := []string{"10.0.0.5-10.0.0.7", "198.51.100.0/29", "198.51.100.8/29", "203.0.113.0/24", "240.0.0.0/4"}
	if !slices.Equal(got, want) {
		t.Errorf("intervals: got %v, want %v", got, want)
	}
	got = RenderElements([]nftables.SetElement{el("10.244.2.5", false), el("10.244.1.3", false), el("10.244.0.9", false)}, false)
	if want := []string{"10.244.0.9", "10.244.1.3", "10.244.2.5"}; !slices.Equal(got, want) {
		t.Errorf("addresses: got %v, want %v", got, want)
	}
	if got := RenderElements([]nftables.SetElement{el("192.0.2.7", false), el("192.0.2.8", true)}, true); !slices.Equal(got, []string{"192.0.2.7"}) {
		t.Errorf("single address interval: %v", got)
	}
}

func TestPriorityName(t *testing.T) {
	for _, tc := range []struct {
		hook string
		prio int32
		want string
	}{
		{"prerouting", -150, "mangle"},
		{"postrouting", 99, "srcnat - 1"},
		{"postrouting", 100, "srcnat"},
		{"prerouting", -100, "dstnat"},
		{"input", 5, "filter + 5"},
		{"input", 1000, "1000"},
	} {
		if got := PriorityName(tc.hook, tc.prio); got != tc.want {
			t.Errorf("PriorityName(%s, %d) = %q, want %q", tc.hook, tc.prio, got, tc.want)
		}
	}
}

func TestPolicyOfComment(t *testing.T) {
	for _, tc := range []struct{ comment, policy, mode string }{
		{"policy web: reroute via 192.0.2.12 mark 0x100", "web", "Reroute"},
		{"policy a: b: drop", "a: b", "Drop"},
		{"policy egress: snat to 192.0.2.100", "egress", "Gateway"},
		{"marked by egressnat: keep from masquerade", "", ""},
	} {
		p, m, ok := PolicyOfComment(tc.comment)
		if p != tc.policy || m != tc.mode || ok != (tc.policy != "") {
			t.Errorf("PolicyOfComment(%q) = %q %q %v", tc.comment, p, m, ok)
		}
	}
}

// TestRenderRankedRules: the rules of overlapping policies and the returns
// before the dispatch read as nft prints them.
func TestRenderRankedRules(t *testing.T) {
	for _, tc := range []struct {
		exprs []expr.Any
		want  string
	}{
		{[]expr.Any{&expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}}, &expr.Verdict{Kind: expr.VerdictReturn}},
			"ct direction reply return"},
		{[]expr.Any{&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: net.CIDRMask(25, 32), Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{203, 0, 113, 128}}, &expr.Verdict{Kind: expr.VerdictReturn}},
			"ip daddr 203.0.113.128/25 return"},
	} {
		if got := RenderRule(tc.exprs); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func TestRenderMarkElements(t *testing.T) {
	key := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	got := RenderMarkElements([]nftables.SetElement{
		{Key: key(0x30000), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: "pp-deny"}},
		{Key: key(0x20000), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: "multi"}},
		{Key: key(0x10000)},
	})
	want := []string{"0x00010000", "0x00020000 : jump multi", "0x00030000 : jump pp-deny"}
	if !slices.Equal(got, want) {
		t.Fatalf("RenderMarkElements = %q, want %q", got, want)
	}
}
