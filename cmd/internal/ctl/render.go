package ctl

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/nft"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
)

// regKind says how to print the bytes compared with a register.
type regKind int

const (
	kindRaw regKind = iota
	kindAddr
	kindMark
	kindIfname
	kindCtState
	kindCtDirection
	kindPrefix // an address masked by a netmask: data holds the prefix length
)

type regVal struct {
	text string
	kind regKind
	data []byte // immediate data
}

// RenderRule prints a rule's expressions in nft's syntax, as far as the
// expressions egressnat writes go (payload, meta, bitwise, cmp, lookup,
// counter, immediate, nat, masquerade, verdicts). Anything else is printed
// as <type>. It is pure.
func RenderRule(exprs []expr.Any) string {
	regs := map[uint32]regVal{}
	var out []string
	for _, e := range exprs {
		switch v := e.(type) {
		case *expr.Payload:
			if v.OperationType != expr.PayloadLoad {
				out = append(out, "<payload write>")
				continue
			}
			regs[v.DestRegister] = payloadVal(v)
		case *expr.Meta:
			name := metaName(v.Key)
			if v.SourceRegister {
				out = append(out, fmt.Sprintf("%s set %s", name, regs[v.Register].text))
				continue
			}
			k := kindRaw
			switch v.Key {
			case expr.MetaKeyMARK:
				k = kindMark
			case expr.MetaKeyOIFNAME, expr.MetaKeyIIFNAME:
				k = kindIfname
			}
			regs[v.Register] = regVal{text: name, kind: k}
		case *expr.Ct:
			if v.SourceRegister {
				out = append(out, fmt.Sprintf("ct %s set %s", ctKeyName(v.Key), regs[v.Register].text))
				continue
			}
			k := kindRaw
			switch v.Key {
			case expr.CtKeySTATE:
				k = kindCtState
			case expr.CtKeyDIRECTION:
				k = kindCtDirection
			}
			regs[v.Register] = regVal{text: "ct " + ctKeyName(v.Key), kind: k}
		case *expr.Bitwise:
			src := regs[v.SourceRegister]
			t := src.text
			if src.kind == kindCtState && len(v.Mask) == 4 {
				// ct state & (a|b) != 0 is what nft prints as ct state a,b.
				regs[v.DestRegister] = regVal{text: src.text, kind: kindCtState, data: v.Mask}
				continue
			}
			if ones, bits := net.IPMask(v.Mask).Size(); src.kind == kindAddr && bits == 32 && bytes.Equal(v.Xor, make([]byte, 4)) {
				// addr & netmask == network is what nft prints as addr
				// network/len.
				regs[v.DestRegister] = regVal{text: src.text, kind: kindPrefix, data: []byte{byte(ones)}}
				continue
			}
			if len(v.Mask) == 4 && len(v.Xor) == 4 {
				mask := binaryutil.NativeEndian.Uint32(v.Mask)
				xor := binaryutil.NativeEndian.Uint32(v.Xor)
				t = fmt.Sprintf("%s & 0x%08x", t, mask)
				if xor != 0 {
					t = fmt.Sprintf("%s | 0x%08x", t, xor)
				}
			} else {
				t = fmt.Sprintf("%s & 0x%s ^ 0x%s", t, hex.EncodeToString(v.Mask), hex.EncodeToString(v.Xor))
			}
			regs[v.DestRegister] = regVal{text: t, kind: src.kind}
		case *expr.Cmp:
			r := regs[v.Register]
			if r.kind == kindCtState && r.data != nil && v.Op == expr.CmpOpNeq {
				out = append(out, fmt.Sprintf("%s %s", r.text, renderData(r.data, kindCtState)))
				continue
			}
			if r.kind == kindPrefix && len(r.data) == 1 {
				if a, ok := netip.AddrFromSlice(v.Data); ok {
					out = append(out, fmt.Sprintf("%s%s %s", r.text, cmpOp(v.Op), netip.PrefixFrom(a, int(r.data[0]))))
					continue
				}
			}
			out = append(out, fmt.Sprintf("%s%s %s", r.text, cmpOp(v.Op), renderData(v.Data, r.kind)))
		case *expr.Lookup:
			op := ""
			if v.Invert {
				op = " !="
			}
			out = append(out, fmt.Sprintf("%s%s @%s", regs[v.SourceRegister].text, op, v.SetName))
		case *expr.Counter:
			out = append(out, fmt.Sprintf("counter packets %d bytes %d", v.Packets, v.Bytes))
		case *expr.Immediate:
			regs[v.Register] = regVal{data: v.Data, text: renderData(v.Data, kindRaw)}
		case *expr.NAT:
			out = append(out, renderNAT(v, regs))
		case *expr.Masq:
			out = append(out, "masquerade")
		case *expr.Verdict:
			out = append(out, renderVerdict(v))
		default:
			out = append(out, fmt.Sprintf("<%T>", e))
		}
	}
	return strings.Join(out, " ")
}

func payloadVal(p *expr.Payload) regVal {
	if p.Base == expr.PayloadBaseNetworkHeader && p.Len == 4 {
		switch p.Offset {
		case 12:
			return regVal{text: "ip saddr", kind: kindAddr}
		case 16:
			return regVal{text: "ip daddr", kind: kindAddr}
		}
	}
	base := map[expr.PayloadBase]string{
		expr.PayloadBaseLLHeader: "ll", expr.PayloadBaseNetworkHeader: "nh", expr.PayloadBaseTransportHeader: "th",
	}[p.Base]
	return regVal{text: fmt.Sprintf("@%s,%d,%d", base, p.Offset*8, p.Len*8)}
}

func metaName(k expr.MetaKey) string {
	switch k {
	case expr.MetaKeyMARK:
		return "meta mark"
	case expr.MetaKeyOIFNAME:
		return "oifname"
	case expr.MetaKeyIIFNAME:
		return "iifname"
	case expr.MetaKeyOIF:
		return "oif"
	case expr.MetaKeyIIF:
		return "iif"
	case expr.MetaKeyL4PROTO:
		return "meta l4proto"
	case expr.MetaKeyNFPROTO:
		return "meta nfproto"
	}
	return fmt.Sprintf("meta key %d", k)
}

func ctKeyName(k expr.CtKey) string {
	switch k {
	case expr.CtKeySTATE:
		return "state"
	case expr.CtKeyMARK:
		return "mark"
	case expr.CtKeySTATUS:
		return "status"
	case expr.CtKeyDIRECTION:
		return "direction"
	}
	return fmt.Sprintf("key%d", k)
}

// ctStates names the bits of a ct state value as nft does.
func ctStates(v uint32) string {
	names := []struct {
		bit  uint32
		name string
	}{{1, "invalid"}, {2, "established"}, {4, "related"}, {8, "new"}, {64, "untracked"}}
	var out []string
	for _, n := range names {
		if v&n.bit != 0 {
			out = append(out, n.name)
			v &^= n.bit
		}
	}
	if v != 0 || len(out) == 0 {
		out = append(out, fmt.Sprintf("0x%08x", v))
	}
	return strings.Join(out, ",")
}

func cmpOp(op expr.CmpOp) string {
	switch op {
	case expr.CmpOpEq:
		return ""
	case expr.CmpOpNeq:
		return " !="
	case expr.CmpOpLt:
		return " <"
	case expr.CmpOpLte:
		return " <="
	case expr.CmpOpGt:
		return " >"
	case expr.CmpOpGte:
		return " >="
	}
	return fmt.Sprintf(" op%d", op)
}

func renderData(b []byte, k regKind) string {
	switch k {
	case kindAddr:
		if a, ok := netip.AddrFromSlice(b); ok {
			return a.String()
		}
	case kindMark:
		if len(b) == 4 {
			return fmt.Sprintf("0x%08x", binaryutil.NativeEndian.Uint32(b))
		}
	case kindIfname:
		return fmt.Sprintf("%q", string(bytes.TrimRight(b, "\x00")))
	case kindCtState:
		if len(b) == 4 {
			return ctStates(binaryutil.NativeEndian.Uint32(b))
		}
	case kindCtDirection:
		if len(b) == 1 && b[0] <= 1 {
			return []string{"original", "reply"}[b[0]]
		}
	}
	return "0x" + hex.EncodeToString(b)
}

func renderNAT(n *expr.NAT, regs map[uint32]regVal) string {
	kind := "snat"
	if n.Type == expr.NATTypeDestNAT {
		kind = "dnat"
	}
	var to string
	if n.RegAddrMin != 0 {
		r := regs[n.RegAddrMin]
		if r.data != nil {
			to = renderData(r.data, kindAddr)
		} else {
			to = r.text
		}
	}
	s := kind
	if to != "" {
		s += " to " + to
	}
	var flags []string
	if n.Random {
		flags = append(flags, "random")
	}
	if n.FullyRandom {
		flags = append(flags, "fully-random")
	}
	if n.Persistent {
		flags = append(flags, "persistent")
	}
	if len(flags) > 0 {
		s += " " + strings.Join(flags, ",")
	}
	return s
}

func renderVerdict(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictContinue:
		return "continue"
	case expr.VerdictJump:
		return "jump " + v.Chain
	case expr.VerdictGoto:
		return "goto " + v.Chain
	}
	return fmt.Sprintf("verdict %d", v.Kind)
}

// RenderElements prints a set's elements: addresses sorted, or for an
// interval set its intervals as CIDRs where they are aligned (else
// first-last). It is pure.
func RenderElements(elems []nftables.SetElement, interval bool) []string {
	if !interval {
		var addrs []netip.Addr
		var other []string
		for _, e := range elems {
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				addrs = append(addrs, a)
			} else {
				other = append(other, "0x"+hex.EncodeToString(e.Key))
			}
		}
		slices.SortFunc(addrs, netip.Addr.Compare)
		out := make([]string, 0, len(addrs)+len(other))
		for _, a := range addrs {
			out = append(out, a.String())
		}
		return append(out, other...)
	}
	var out []string
	for _, r := range nft.Intervals(elems) {
		out = append(out, renderRange(r[0], r[1]))
	}
	return out
}

// RenderMarkElements renders the elements of a set keyed by marks (the
// eBPF classifier's classes, nft.MarkKeyed) as nft lists them: the mark in
// hex, then " : jump <chain>" for a verdict map's element; sorted.
func RenderMarkElements(elems []nftables.SetElement) []string {
	out := make([]string, 0, len(elems))
	for _, e := range elems {
		if len(e.Key) != 4 {
			out = append(out, "0x"+hex.EncodeToString(e.Key))
			continue
		}
		s := fmt.Sprintf("0x%08x", binary.NativeEndian.Uint32(e.Key))
		if v := e.VerdictData; v != nil && v.Chain != "" {
			s += " : jump " + v.Chain
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// renderRange prints [first, last] as one CIDR when it is one, else as
// first-last.
func renderRange(first, last netip.Addr) string {
	for bits := 0; bits <= 32; bits++ {
		p := netip.PrefixFrom(first, bits)
		if p.Masked().Addr() != first {
			continue
		}
		if lastOf(p) == last {
			if bits == 32 {
				return first.String()
			}
			return p.String()
		}
	}
	return first.String() + "-" + last.String()
}

func lastOf(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n |= uint32(uint64(1)<<(32-p.Bits()) - 1)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
}

// PriorityName prints a chain priority as nft does for the standard ones
// (e.g. -150 "mangle", 99 "srcnat - 1" on postrouting).
func PriorityName(hook string, prio int32) string {
	names := []struct {
		name string
		val  int32
	}{{"raw", -300}, {"mangle", -150}, {"filter", 0}, {"security", 50}}
	switch hook {
	case "prerouting":
		names = append(names, struct {
			name string
			val  int32
		}{"dstnat", -100})
	case "postrouting":
		names = append(names, struct {
			name string
			val  int32
		}{"srcnat", 100})
	}
	best, bestD := "", int32(11)
	for _, n := range names {
		d := prio - n.val
		if d >= -10 && d <= 10 && abs32(d) < abs32(bestD) {
			best, bestD = n.name, d
		}
	}
	switch {
	case best == "":
		return fmt.Sprint(prio)
	case bestD == 0:
		return best
	case bestD > 0:
		return fmt.Sprintf("%s + %d", best, bestD)
	}
	return fmt.Sprintf("%s - %d", best, -bestD)
}

func abs32(v int32) int32 {
	if v < 0 {
		return -v
	}
	return v
}

// PolicyOfComment extracts the policy name and mode from a rule comment
// the agent writes ("policy <name>: reroute via ...", "...: drop",
// "...: snat to ..."). ok is false for other comments.
func PolicyOfComment(comment string) (policy, mode string, ok bool) {
	s, found := strings.CutPrefix(comment, "policy ")
	if !found {
		return "", "", false
	}
	i := strings.LastIndex(s, ": ")
	if i < 0 {
		return "", "", false
	}
	policy, what := s[:i], s[i+2:]
	switch {
	case strings.HasPrefix(what, "reroute"):
		mode = "Reroute"
	case strings.HasPrefix(what, "drop"):
		mode = "Drop"
	case strings.HasPrefix(what, "snat"):
		mode = "Gateway"
	default:
		return "", "", false
	}
	return policy, mode, true
}
