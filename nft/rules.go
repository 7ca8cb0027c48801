package nft

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// Names of the objects in our table.
const (
	chainPrerouting  = "prerouting"
	chainPostrouting = "postrouting"
	setFloating      = "floating"
	srcPrefix        = "src-"
	dstPrefix        = "dst-"
	// setPreSrc maps each source address of this node's Reroute and Drop
	// policies to the chain that handles it: the policy's own chain, or
	// chainMulti for an address several policies select. One hash lookup
	// per packet, whatever the number of policies and pods.
	setPreSrc = "pre-src"
	// chainMulti holds, in policy order, the rules of every Reroute and
	// Drop policy, for addresses several policies select.
	chainMulti = "multi"
	// policyChainPrefix names the chain of one Reroute or Drop policy.
	policyChainPrefix = "pp-"

	// maxSetKey bounds the policy part of a set name; longer names are
	// shortened to a prefix plus a hash of the full name.
	maxSetKey = 48
	// maxComment is libnftnl's comment limit.
	maxComment = 128
)

// setKey is the policy-specific part of the set names: the policy name when
// it is short and made of safe characters, otherwise a readable prefix plus a
// hash of the full name. It is a pure function of the name.
func setKey(policy string) string {
	// Kubernetes names are lowercase alphanumerics, '-' and '.', so a name
	// that fits is used as it is; '_' never occurs in one and separates the
	// hash of a shortened name, keeping the two forms apart.
	safe := policy != "" && len(policy) <= maxSetKey
	for _, r := range policy {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.') {
			safe = false
			break
		}
	}
	if safe {
		return policy
	}
	sum := sha256.Sum256([]byte(policy))
	h := hex.EncodeToString(sum[:])[:10]
	var b strings.Builder
	for _, r := range policy {
		if b.Len() >= maxSetKey-len(h)-1 {
			break
		}
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	return b.String() + "_" + h
}

func srcSetName(policy string) string { return srcPrefix + setKey(policy) }

// policyChainName is the chain of one Reroute or Drop policy.
func policyChainName(policy string) string { return policyChainPrefix + setKey(policy) }

// preSrcTargets maps every source address of the Reroute and Drop policies
// to the chain its packets jump to.
func preSrcTargets(st selector.NodeState) map[netip.Addr]string {
	out := map[netip.Addr]string{}
	for _, p := range st.Policies {
		if p.Mode != selector.ModeReroute && p.Mode != selector.ModeDrop {
			continue
		}
		for _, a := range p.Sources {
			if _, dup := out[a]; dup {
				out[a] = chainMulti
			} else {
				out[a] = policyChainName(p.Name)
			}
		}
	}
	return out
}
func dstSetName(policy string) string { return dstPrefix + setKey(policy) }

// policyComment is the readable rule comment naming the policy.
func policyComment(p selector.PolicyState, mark uint32) string {
	var what string
	switch p.Mode {
	case selector.ModeReroute:
		what = fmt.Sprintf("reroute via %s mark %#x", p.NextHop, mark)
	case selector.ModeDrop:
		what = "drop"
	case selector.ModeGateway:
		what = fmt.Sprintf("snat to %s", p.EgressIP)
	}
	name := p.Name
	if room := maxComment - len("policy : ") - len(what); len(name) > room {
		name = name[:room]
	}
	return fmt.Sprintf("policy %s: %s", name, what)
}

const nullBindingComment = "marked by egressnat: keep from masquerade"

const floatingGuardComment = "floating IPs are egress-only: no new inbound flows"

// ctStateNew is the ct state bit of a packet that opens a connection.
const ctStateNew = 1 << 3

// floatingGuardRule: ip daddr @floating ct state new counter drop.
//
// Replies to SNATed flows reach a floating IP in the reply direction. A
// packet that opens a flow toward a floating IP is either a probe from
// outside or, right after a failover, a server's retransmission that reached
// the new holder before the pod's next packet re-created the conntrack entry
// there; answering it locally would reset the connection, dropping it lets
// the pod's own retransmission restore the flow.
func floatingGuardRule(floating *nftables.Set) []expr.Any {
	return []expr.Any{
		loadAddr(16),
		&expr.Lookup{SourceRegister: 1, SetName: floating.Name, SetID: floating.ID},
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(ctStateNew)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}

// ruleSpec is one desired rule.
type ruleSpec struct {
	policy  string // empty for the shared null-binding rule
	comment string
	exprs   []expr.Any
}

func (r ruleSpec) userData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, r.comment)
}

func loadAddr(offset uint32) *expr.Payload {
	return &expr.Payload{
		OperationType: expr.PayloadLoad,
		DestRegister:  1,
		Base:          expr.PayloadBaseNetworkHeader,
		Offset:        offset,
		Len:           4,
	}
}

// matchSets: ip saddr @src ip daddr @dst; without src (a policy's own
// chain, reached for its sources only) just ip daddr @dst.
func matchSets(src, dst *nftables.Set) []expr.Any {
	var out []expr.Any
	if src != nil {
		out = append(out, loadAddr(12), &expr.Lookup{SourceRegister: 1, SetName: src.Name, SetID: src.ID})
	}
	return append(out, loadAddr(16), &expr.Lookup{SourceRegister: 1, SetName: dst.Name, SetID: dst.ID})
}

func ifname(name string) []byte {
	b := make([]byte, 16)
	copy(b, name)
	return b
}

// rerouteRule: ip saddr @src ip daddr @dst counter
// meta mark set meta mark & ~mask | value.
func rerouteRule(src, dst *nftables.Set, mask, value uint32) []expr.Any {
	return append(matchSets(src, dst),
		&expr.Counter{},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{
			SourceRegister: 1,
			DestRegister:   1,
			Len:            4,
			Mask:           binaryutil.NativeEndian.PutUint32(^mask),
			Xor:            binaryutil.NativeEndian.PutUint32(value & mask),
		},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	)
}

// dropRule: ip saddr @src ip daddr @dst counter drop.
func dropRule(src, dst *nftables.Set) []expr.Any {
	return append(matchSets(src, dst),
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
}

// gatewayRule: ip saddr @src ip daddr @dst oifname <uplink> counter snat to <egress>.
//
// No NAT flag is set: the kernel adds NF_NAT_RANGE_MAP_IPS itself when an
// address register is given, and without NF_NAT_RANGE_PROTO_SPECIFIED (or the
// random flags) get_unique_tuple keeps the source port when it is free. This
// is what `nft add rule ... snat to 192.0.2.10` sends, too.
func gatewayRule(src, dst *nftables.Set, uplink string, egress netip.Addr) []expr.Any {
	ip := egress.As4()
	return append(matchSets(src, dst),
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(uplink)},
		&expr.Counter{},
		&expr.Immediate{Register: 1, Data: ip[:]},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	)
}

// nullBindingRule: meta mark & mask != 0 counter snat to ip saddr. The NAT
// core stops at the first binding, so the CNI's masquerade at srcnat (100)
// is skipped for traffic we reroute.
func nullBindingRule(mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{
			SourceRegister: 1,
			DestRegister:   1,
			Len:            4,
			Mask:           binaryutil.NativeEndian.PutUint32(mask),
			Xor:            binaryutil.NativeEndian.PutUint32(0),
		},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Counter{},
		loadAddr(12),
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

// desiredRules builds every chain's rules, in policy order: the base
// chains, one chain per Reroute or Drop policy, and chainMulti.
func desiredRules(cfg Config, st selector.NodeState, marks map[netip.Addr]int, sets map[string]*nftables.Set) map[string][]ruleSpec {
	out := map[string][]ruleSpec{chainPrerouting: nil, chainPostrouting: nil, chainMulti: nil}
	if f := sets[setFloating]; f != nil {
		out[chainPrerouting] = append(out[chainPrerouting], ruleSpec{comment: floatingGuardComment, exprs: floatingGuardRule(f)})
	}
	if m := sets[setPreSrc]; m != nil {
		out[chainPrerouting] = append(out[chainPrerouting], ruleSpec{comment: dispatchComment, exprs: dispatchRule(m)})
	}
	for _, p := range st.Policies {
		src, dst := sets[srcSetName(p.Name)], sets[dstSetName(p.Name)]
		switch p.Mode {
		case selector.ModeReroute:
			mark := selector.MarkValue(cfg.MarkMask, marks[p.NextHop])
			c := policyComment(p, mark)
			out[policyChainName(p.Name)] = []ruleSpec{{policy: p.Name, comment: c, exprs: rerouteRule(nil, dst, cfg.MarkMask, mark)}}
			out[chainMulti] = append(out[chainMulti], ruleSpec{policy: p.Name, comment: c, exprs: rerouteRule(src, dst, cfg.MarkMask, mark)})
		case selector.ModeDrop:
			c := policyComment(p, 0)
			out[policyChainName(p.Name)] = []ruleSpec{{policy: p.Name, comment: c, exprs: dropRule(nil, dst)}}
			out[chainMulti] = append(out[chainMulti], ruleSpec{policy: p.Name, comment: c, exprs: dropRule(src, dst)})
		case selector.ModeGateway:
			out[chainPostrouting] = append(out[chainPostrouting], ruleSpec{policy: p.Name, comment: policyComment(p, 0), exprs: gatewayRule(src, dst, cfg.Uplink, p.EgressIP)})
		}
	}
	out[chainPostrouting] = append(out[chainPostrouting], ruleSpec{comment: nullBindingComment, exprs: nullBindingRule(cfg.MarkMask)})
	return out
}

const dispatchComment = "sources of reroute and drop policies: jump to their chain"

// dispatchRule: ip saddr vmap @pre-src.
func dispatchRule(m *nftables.Set) []expr.Any {
	return []expr.Any{
		loadAddr(12),
		&expr.Lookup{SourceRegister: 1, DestRegister: 0, IsDestRegSet: true, SetName: m.Name, SetID: m.ID},
	}
}

// normalize returns a copy of exprs comparable with what the kernel returns:
// counters zeroed, set IDs dropped, NAT max registers defaulted.
func normalize(exprs []expr.Any) []expr.Any {
	out := make([]expr.Any, len(exprs))
	for i, e := range exprs {
		switch v := e.(type) {
		case *expr.Counter:
			out[i] = &expr.Counter{}
		case *expr.Lookup:
			c := *v
			c.SetID = 0
			out[i] = &c
		case *expr.NAT:
			// The kernel reports an unset max register as the min one.
			c := *v
			if c.RegAddrMax == 0 {
				c.RegAddrMax = c.RegAddrMin
			}
			if c.RegProtoMax == 0 {
				c.RegProtoMax = c.RegProtoMin
			}
			out[i] = &c
		default:
			out[i] = e
		}
	}
	return out
}

// sameRules reports whether a chain of ks holds exactly want. Rules we
// wrote ourselves are compared by what determines them: the comment (policy,
// mode, next hop, mark, egress IP) and the sets they look up; a kernel read
// is compared expression by expression.
func sameRules(ks *nftState, chain string, want []ruleSpec) bool {
	have := ks.rules[chain]
	if !ks.ours {
		return rulesMatch(have, want)
	}
	if len(have) != len(want) {
		return false
	}
	for i := range want {
		if string(have[i].UserData) != string(want[i].userData()) || !slices.Equal(lookupSets(have[i].Exprs), lookupSets(want[i].exprs)) {
			return false
		}
	}
	return true
}

func lookupSets(exprs []expr.Any) []string {
	var out []string
	for _, e := range exprs {
		if l, ok := e.(*expr.Lookup); ok {
			out = append(out, l.SetName)
		}
	}
	return out
}

// rulesMatch reports whether the kernel rules of a chain are exactly want.
func rulesMatch(have []*nftables.Rule, want []ruleSpec) bool {
	if len(have) != len(want) {
		return false
	}
	for i := range want {
		if string(have[i].UserData) != string(want[i].userData()) {
			return false
		}
		if !reflect.DeepEqual(normalize(have[i].Exprs), normalize(want[i].exprs)) {
			return false
		}
	}
	return true
}

// kernelRule is what we learn back from one of our rules.
type kernelRule struct {
	srcSet, dstSet string
	mode           selector.Mode
	egress         netip.Addr // ModeGateway
	mark           uint32     // ModeReroute
	counter        expr.Counter
}

// parseRule decodes a rule written by desiredRules. ok is false for rules it
// does not recognise (the null-binding rule included).
func parseRule(r *nftables.Rule) (kr kernelRule, ok bool) {
	var lookups []string
	var imm []byte
	for _, e := range r.Exprs {
		switch v := e.(type) {
		case *expr.Lookup:
			lookups = append(lookups, v.SetName)
		case *expr.Counter:
			kr.counter = *v
		case *expr.Immediate:
			imm = v.Data
		case *expr.NAT:
			if a, ok := netip.AddrFromSlice(imm); ok && a.Is4() {
				kr.mode, kr.egress = selector.ModeGateway, a
			}
		case *expr.Bitwise:
			if len(v.Xor) == 4 {
				kr.mark = binaryutil.NativeEndian.Uint32(v.Xor)
			}
		case *expr.Meta:
			if v.Key == expr.MetaKeyMARK && v.SourceRegister {
				kr.mode = selector.ModeReroute
			}
		case *expr.Verdict:
			if v.Kind == expr.VerdictDrop {
				kr.mode = selector.ModeDrop
			}
		}
	}
	switch {
	case kr.mode == "":
		return kernelRule{}, false
	case len(lookups) == 2:
		kr.srcSet, kr.dstSet = lookups[0], lookups[1]
	case len(lookups) == 1 && kr.mode != selector.ModeGateway && strings.HasPrefix(lookups[0], dstPrefix):
		kr.dstSet = lookups[0] // a policy's own chain
	default:
		return kernelRule{}, false
	}
	return kr, true
}

func ruleComment(r *nftables.Rule) string {
	s, _ := userdata.GetString(r.UserData, userdata.TypeComment)
	return s
}

// commentPolicy extracts the policy name from a rule comment written by
// policyComment (possibly shortened).
func commentPolicy(comment string) string {
	s, ok := strings.CutPrefix(comment, "policy ")
	if !ok {
		return ""
	}
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[:i]
	}
	return s
}
