package nft

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
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
	// setInternal holds the cluster-internal destinations (pod and Service
	// CIDRs, node addresses, the API server): never steered.
	setInternal = "internal"
	srcPrefix   = "src-"
	dstPrefix   = "dst-"
	// setPreSrc maps each source address of this node's Reroute and Drop
	// policies to the chain that handles it: the policy's own chain, or
	// chainMulti for an address several policies select. One hash lookup
	// per packet, whatever the number of policies and pods.
	setPreSrc = "pre-src"
	// setBootDests, only in the guard table (Dataplane.Guard): the policy
	// destinations of the last apply before the node's restart.
	setBootDests = "boot-dests"
	// setKnown: this node's pods the agent knows (selector.NodeState.
	// LocalPods); setPodNets: the pod networks; setHeldDests: every
	// policy's destinations. A packet from a pod network to a policy
	// destination whose source is not known is held (ruleHold).
	setKnown     = "known-pods"
	setPodNets   = "pod-nets"
	setHeldDests = "held-dests"
	// chainMulti holds, in policy order, the rules of every Reroute and
	// Drop policy, for addresses several policies select.
	chainMulti = "multi"
	// chainClassClear, in the eBPF mode, clears the class bits of the
	// mark right after chainPrerouting read them (the next priority): the
	// mark bits are shared with other software (a NetworkPolicy
	// implementation, a CNI) that must not see our classes.
	chainClassClear = "class-clear"
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
// (this node's pods) to the chain its packets jump to: the policy's own
// chain, or chainMulti when another policy, of any mode, selects it too.
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
	// A Gateway policy's sources are every selected pod of the cluster;
	// those of this node's that a Reroute or Drop policy selects too are
	// shared.
	for _, p := range st.Policies {
		if p.Mode != selector.ModeGateway {
			continue
		}
		for _, a := range p.Sources {
			if _, local := out[a]; local {
				out[a] = chainMulti
			}
		}
	}
	return out
}

// sharingPolicies returns the policies that select an address jumping to
// chainMulti: their rules make up chainMulti.
func sharingPolicies(st selector.NodeState, jumps map[netip.Addr]string) map[string]bool {
	out := map[string]bool{}
	for _, p := range st.Policies {
		for _, a := range p.Sources {
			if jumps[a] == chainMulti {
				out[p.Name] = true
				break
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

// forwardGuardComment marks the last postrouting rule.
const forwardGuardComment = "rerouted here, not SNATed by egressnat: drop, never masquerade"

const bootGuardComment = "no apply since the node started: traffic rerouted here is dropped"

const bootGuardPodsComment = "no apply since the node started: cluster sources to policy destinations are held"

const floatingGuardComment = "floating IPs are egress-only: no new inbound flows"

const rpMarkComment = "rerouted here: reverse-path check by the uplink (src_valid_mark)"

const rpReplyComment = "reply to traffic rerouted here: back by the uplink to the node that sent it"

const classClearComment = "pod class read: cleared before anything else sees the mark"

const classDispatchComment = "pod class written by the eBPF classifier -> its chain"

const holdComment = "a pod egressnat does not know yet, to a policy destination: held until it does"

const rpUnmarkComment = "reverse-path mark cleared: not a reroute mark"

// ctStateNew is the ct state bit of a packet that opens a connection.
const ctStateNew = 1 << 3

// ruleKind is what one of our rules does.
type ruleKind int

const (
	// ruleGuard: ip daddr @floating ct state new counter drop.
	//
	// Replies to SNATed flows reach a floating IP in the reply direction.
	// A packet that opens a flow toward a floating IP is either a probe
	// from outside or, right after a failover, a server's retransmission
	// that reached the new holder before the pod's next packet re-created
	// the conntrack entry there; answering it locally would reset the
	// connection, dropping it lets the pod's own retransmission restore
	// the flow.
	ruleGuard ruleKind = iota + 1
	// ruleDispatch: ip saddr vmap @pre-src.
	ruleDispatch
	// ruleClassDispatch: meta mark & <class mask> vmap @pre-class, before
	// ruleDispatch in the eBPF mode: the class the classifier wrote into
	// the mark of a pod's packet selects its chain (see classes.go).
	ruleClassDispatch
	// ruleReroute: [ip saddr @src] ip daddr @dst counter
	// meta mark set meta mark & ~mask | mark.
	ruleReroute
	// ruleDrop: [ip saddr @src] ip daddr @dst counter drop.
	ruleDrop
	// ruleGateway: ip saddr @src ip daddr @dst oifname <uplink> counter
	// snat to <egress>.
	//
	// No NAT flag is set: the kernel adds NF_NAT_RANGE_MAP_IPS itself when
	// an address register is given, and without NF_NAT_RANGE_PROTO_SPECIFIED
	// (or the random flags) get_unique_tuple keeps the source port when it
	// is free. This is what `nft add rule ... snat to 192.0.2.10` sends, too.
	ruleGateway
	// ruleNullBinding: meta mark & mask != 0 counter snat to ip saddr. The
	// NAT core stops at the first binding, so the CNI's masquerade at
	// srcnat (100) is skipped for traffic we reroute.
	ruleNullBinding
	// ruleReplyReturn: ct direction reply return. Only the original
	// direction of a connection is steered: the replies of a connection
	// that came in to a selected pod go back the way it came.
	ruleReplyReturn
	// ruleInternalReturn: ip daddr @internal return. Cluster-internal
	// destinations are never steered nor SNATed, whatever a policy's
	// destinations say, also while a policy fails closed.
	ruleInternalReturn
	// ruleStay: ip saddr @src ip daddr <pfx> counter return. A shared
	// source whose traffic a policy this node serves as gateway wins: not
	// marked, SNATed in postrouting.
	ruleStay
	// ruleForwardGuard: ip saddr @internal iifname <uplink> oifname
	// <uplink> counter drop, the last postrouting rule. A connection that
	// came in on the uplink from a cluster-internal source (a pod on
	// another node) and leaves by the uplink again to an outside
	// destination was rerouted here by egressnat; if no gateway rule of
	// this node SNATed it (this node stopped being, or is not yet, its
	// gateway, or it does not know the pod yet), the CNI's masquerade would
	// send it out with this node's address. It is dropped instead (fail
	// closed). Only new connections reach a NAT chain.
	ruleForwardGuard
	// ruleBootGuard: ip saddr @internal iifname <uplink> fib daddr type !=
	// local counter drop, in prerouting after the internal return, only
	// in the guard table (Dataplane.Guard) that holds the place until the
	// first Apply. Every packet, not only new connections: a rebooted
	// node whose network came up before its agent masqueraded the first
	// rerouted packets, and conntrack would keep masquerading the rest of
	// those flows past the forward guard.
	ruleBootGuard
	// ruleBootGuardPods: ip saddr @internal ip daddr @boot-dests counter
	// drop, in prerouting after the internal return, only in the guard
	// table: the node's own pods (and any other cluster source) sending to
	// a policy destination of the last apply are held until the first
	// apply says which of them may go and how.
	ruleBootGuardPods
	// ruleRPMark: ip saddr @internal iifname <uplink> fib daddr type !=
	// local meta mark set meta mark & ~mask | rpMark, in prerouting on a
	// gateway: traffic other nodes reroute here gets the reverse-path mark
	// before routing, so that the reverse-path check (src_valid_mark on
	// the uplink) finds its pod source by the uplink through the
	// reverse-path table, also under strict rp_filter with an overlay.
	ruleRPMark
	// ruleRPReply: ct direction reply ct mark & mask == rpMark meta mark
	// set meta mark & ~mask | replyMark, in prerouting before the reply
	// return, on a gateway that knows the other nodes' pod CIDRs: a reply
	// to traffic rerouted here (ruleRPMark also sets rpMark in the ct
	// mark) is routed by the reply table, which routes those CIDRs via
	// their nodes by the uplink: it goes back the way its request came,
	// not by an overlay the source node's strict reverse-path check would
	// refuse it from. A pod no route covers falls through to the main
	// table.
	ruleRPReply
	// ruleClassClear: meta mark & <class mask> != 0 meta mark set meta
	// mark & ~<class mask>, the only rule of chainClassClear.
	ruleClassClear
	// ruleHold: iifname != <uplink> ip saddr != @known-pods ip saddr
	// @pod-nets ip daddr @held-dests counter drop, in prerouting before
	// the dispatch: a pod the agent has not evaluated yet (its address is
	// not in the API yet, or not in the agent's cache) may be selected by
	// a policy; its traffic to any policy destination is held until the
	// agent knows it, so that it never leaves with the node's address.
	// Every packet, not only the first: conntrack would otherwise keep
	// the flow's first decision.
	ruleHold
	// ruleRPUnmark: meta mark & mask == rpMark meta mark set meta mark &
	// ~mask, first in postrouting: the reverse-path mark is not a reroute
	// mark, the null binding must not keep such a packet from the
	// gateway's SNAT or from the forward guard.
	ruleRPUnmark
)

// ctDirReply is the ct direction of a reply (IP_CT_DIR_REPLY).
const ctDirReply = 1

// rule is one rule of our table, as data: what it does and the objects it
// names. Its expressions are built from it (exprs), so is its nft text.
type rule struct {
	chain   string
	kind    ruleKind
	policy  string // "" for the shared rules
	comment string
	src     string // source set ("" in a policy's own chain)
	dst     string // destination set, or the set/map of guard and dispatch
	mask    uint32 // reroute, null binding
	mark    uint32 // reroute
	ctMark  uint32 // reply: the ct mark it matches
	oif     string // gateway
	known   string // hold: the set of known sources
	classes string // hold, eBPF mode: the set of live classes (under mask)
	egress  netip.Addr
	// pfx, when valid, is the one destination the rule matches instead of
	// the dst set: rules of overlapping policies, one per destination, in
	// precedence order (see rankedRules). The first that matches decides.
	pfx netip.Prefix
}

func (r rule) userData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, r.comment)
}

// exprs builds the rule's expressions; set returns the set object a
// lookup refers to (with the ID of a set created in the same transaction).
func (r rule) exprs(set func(name string) *nftables.Set) []expr.Any {
	lookup := func(name string) *expr.Lookup {
		s := set(name)
		return &expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID}
	}
	// reroutedHere: ip saddr @src iifname <oif> fib daddr type != local,
	// a packet from a cluster source another node rerouted here.
	reroutedHere := func() []expr.Any {
		return []expr.Any{
			loadAddr(12), lookup(r.src),
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.oif)},
			&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		}
	}
	match := func() []expr.Any {
		var out []expr.Any
		if r.src != "" {
			out = append(out, loadAddr(12), lookup(r.src))
		}
		if r.pfx.IsValid() {
			return append(out, matchPrefix(16, r.pfx)...)
		}
		return append(out, loadAddr(16), lookup(r.dst))
	}
	switch r.kind {
	case ruleGuard:
		return []expr.Any{
			loadAddr(16), lookup(r.dst),
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(ctStateNew)},
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}
	case ruleDispatch:
		l := lookup(r.dst)
		l.IsDestRegSet = true
		return []expr.Any{loadAddr(12), l}
	case ruleClassDispatch:
		l := lookup(r.dst)
		l.IsDestRegSet = true
		return append(loadMark(r.mask, 0), l)
	case ruleClassClear:
		return slices.Concat(loadMark(r.mask, 0),
			[]expr.Any{&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)}},
			setMark(^r.mask, 0))
	case ruleReplyReturn:
		return []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{ctDirReply}},
			&expr.Verdict{Kind: expr.VerdictReturn},
		}
	case ruleInternalReturn:
		return []expr.Any{loadAddr(16), lookup(r.dst), &expr.Verdict{Kind: expr.VerdictReturn}}
	case ruleReroute:
		out := append(append(match(), &expr.Counter{}), setMark(^r.mask, r.mark&r.mask)...)
		if r.pfx.IsValid() {
			out = append(out, &expr.Verdict{Kind: expr.VerdictReturn})
		}
		return out
	case ruleStay:
		return append(match(), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictReturn})
	case ruleDrop:
		return append(match(), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	case ruleGateway:
		ip := r.egress.As4()
		return append(match(),
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.oif)},
			&expr.Counter{},
			&expr.Immediate{Register: 1, Data: ip[:]},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		)
	case ruleForwardGuard:
		return []expr.Any{
			loadAddr(12), lookup(r.src),
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.oif)},
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.oif)},
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}
	case ruleBootGuard:
		return append(reroutedHere(),
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		)
	case ruleBootGuardPods:
		return []expr.Any{
			loadAddr(12), lookup(r.src),
			loadAddr(16), lookup(r.dst),
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}
	case ruleRPMark:
		return slices.Concat(reroutedHere(), setMark(^r.mask, r.mark&r.mask), setCtMark(^r.mask, r.mark&r.mask))
	case ruleRPReply:
		return slices.Concat([]expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{ctDirReply}},
			&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			maskXor(r.mask, 0),
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(r.ctMark & r.mask)},
		}, setMark(^r.mask, r.mark&r.mask))
	case ruleHold:
		known := lookup(r.known)
		known.Invert = true
		out := []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname(r.oif)},
		}
		if r.classes != "" {
			live := lookup(r.classes)
			live.Invert = true
			out = append(append(out, loadMark(r.mask, 0)...), live) // a classified pod's packet stops here
		}
		return append(out,
			loadAddr(12), known, // first: a known pod's packet stops here
			lookup(r.src),
			loadAddr(16), lookup(r.dst),
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		)
	case ruleRPUnmark:
		return slices.Concat(loadMark(r.mask, 0),
			[]expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(r.mark & r.mask)}},
			setMark(^r.mask, 0))
	case ruleNullBinding:
		return append(loadMark(r.mask, 0),
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
			&expr.Counter{},
			loadAddr(12),
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		)
	}
	return nil
}

// sets returns the names of the sets the rule reads.
func (r rule) sets() []string {
	var out []string
	if r.src != "" {
		out = append(out, r.src)
	}
	if r.known != "" {
		out = append(out, r.known)
	}
	if r.classes != "" {
		out = append(out, r.classes)
	}
	if r.dst != "" && !r.pfx.IsValid() {
		out = append(out, r.dst)
	}
	return out
}

// String prints the rule in nft syntax.
func (r rule) String() string {
	var b strings.Builder
	if r.kind == ruleHold {
		fmt.Fprintf(&b, "iifname != %q ", r.oif)
		if r.classes != "" {
			fmt.Fprintf(&b, "meta mark & %#08x != @%s ", r.mask, r.classes)
		}
		fmt.Fprintf(&b, "ip saddr != @%s ", r.known)
	}
	if r.src != "" {
		fmt.Fprintf(&b, "ip saddr @%s ", r.src)
	}
	switch r.kind {
	case ruleGuard:
		fmt.Fprintf(&b, "ip daddr @%s ct state new counter drop", r.dst)
	case ruleDispatch:
		fmt.Fprintf(&b, "ip saddr vmap @%s", r.dst)
	case ruleClassDispatch:
		fmt.Fprintf(&b, "meta mark & %#08x vmap @%s", r.mask, r.dst)
	case ruleClassClear:
		fmt.Fprintf(&b, "meta mark & %#08x != 0 meta mark set meta mark & %#08x", r.mask, ^r.mask)
	case ruleReplyReturn:
		b.WriteString("ct direction reply return")
	case ruleInternalReturn:
		fmt.Fprintf(&b, "ip daddr @%s return", r.dst)
	case ruleReroute:
		fmt.Fprintf(&b, "ip daddr %s counter meta mark set meta mark & %#08x | %#08x", r.daddr(), ^r.mask, r.mark&r.mask)
		if r.pfx.IsValid() {
			b.WriteString(" return")
		}
	case ruleDrop:
		fmt.Fprintf(&b, "ip daddr %s counter drop", r.daddr())
	case ruleStay:
		fmt.Fprintf(&b, "ip daddr %s counter return", r.daddr())
	case ruleGateway:
		fmt.Fprintf(&b, "ip daddr %s oifname %q counter snat to %s", r.daddr(), r.oif, r.egress)
	case ruleNullBinding:
		fmt.Fprintf(&b, "meta mark & %#08x != 0 counter snat to ip saddr", r.mask)
	case ruleForwardGuard:
		fmt.Fprintf(&b, "iifname %q oifname %q counter drop", r.oif, r.oif)
	case ruleBootGuard:
		fmt.Fprintf(&b, "iifname %q fib daddr type != local counter drop", r.oif)
	case ruleBootGuardPods:
		fmt.Fprintf(&b, "ip daddr @%s counter drop", r.dst)
	case ruleRPMark:
		fmt.Fprintf(&b, "iifname %q fib daddr type != local meta mark set meta mark & %#08x | %#08x ct mark set ct mark & %#08x | %#08x",
			r.oif, ^r.mask, r.mark&r.mask, ^r.mask, r.mark&r.mask)
	case ruleRPReply:
		fmt.Fprintf(&b, "ct direction reply ct mark & %#08x == %#08x meta mark set meta mark & %#08x | %#08x", r.mask, r.ctMark&r.mask, ^r.mask, r.mark&r.mask)
	case ruleHold:
		fmt.Fprintf(&b, "ip daddr @%s counter drop", r.dst)
	case ruleRPUnmark:
		fmt.Fprintf(&b, "meta mark & %#08x == %#08x meta mark set meta mark & %#08x", r.mask, r.mark&r.mask, ^r.mask)
	}
	if r.comment != "" {
		fmt.Fprintf(&b, " comment %q", r.comment)
	}
	return b.String()
}

// daddr is the destination match in nft syntax: the prefix or the set.
func (r rule) daddr() string {
	if r.pfx.IsValid() {
		return r.pfx.String()
	}
	return "@" + r.dst
}

// matchPrefix matches the address at offset against p: payload & mask ==
// network (nothing for /0, no mask for /32).
func matchPrefix(offset uint32, p netip.Prefix) []expr.Any {
	if p.Bits() == 0 {
		return nil
	}
	net4 := p.Masked().Addr().As4()
	out := []expr.Any{loadAddr(offset)}
	if p.Bits() < 32 {
		m := net.CIDRMask(p.Bits(), 32)
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m, Xor: []byte{0, 0, 0, 0}})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]})
}

// maskXor turns the 32-bit value in register 1 into (value & keep) ^ xor.
func maskXor(keep, xor uint32) *expr.Bitwise {
	return &expr.Bitwise{
		SourceRegister: 1,
		DestRegister:   1,
		Len:            4,
		Mask:           binaryutil.NativeEndian.PutUint32(keep),
		Xor:            binaryutil.NativeEndian.PutUint32(xor),
	}
}

// loadMark loads the packet mark into register 1 as (mark & keep) ^ xor.
func loadMark(keep, xor uint32) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, maskXor(keep, xor)}
}

// setCtMark sets the conntrack mark to (ct mark & keep) ^ xor.
func setCtMark(keep, xor uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		maskXor(keep, xor),
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK, SourceRegister: true},
	}
}

// setMark sets the packet mark to (mark & keep) ^ xor.
func setMark(keep, xor uint32) []expr.Any {
	return append(loadMark(keep, xor), &expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1})
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

func ifname(name string) []byte {
	b := make([]byte, 16)
	copy(b, name)
	return b
}

// desiredRules builds every chain's rules: the base chains, one chain per
// Reroute or Drop policy, and chainMulti. Where policies overlap (a source
// several select: chainMulti; Gateway policies of this node with
// overlapping destinations: postrouting) the rules are one per destination
// as written, in precedence order (see rankedRules), so that the same
// policy wins on every node.
//
// bootGuard: the guard table (Dataplane.Guard) also drops, in prerouting,
// every packet other nodes reroute here.
func desiredRules(cfg Config, st selector.NodeState, marks map[netip.Addr]int, jumps map[netip.Addr]string, bootGuard, classes bool) map[string][]rule {
	out := map[string][]rule{chainPrerouting: nil, chainPostrouting: nil, chainMulti: nil}
	rpIdx := selector.RPMarkIndex(cfg.MarkMask)
	rpMark := selector.MarkValue(cfg.MarkMask, rpIdx)
	gateway := rpIdx != 0 && isGateway(st)
	out[chainPrerouting] = append(out[chainPrerouting],
		rule{chain: chainPrerouting, kind: ruleGuard, comment: floatingGuardComment, dst: setFloating})
	if replyIdx := selector.ReplyMarkIndex(cfg.MarkMask); gateway && replyIdx != 0 && len(st.ReturnRoutes) > 0 {
		out[chainPrerouting] = append(out[chainPrerouting],
			rule{chain: chainPrerouting, kind: ruleRPReply, comment: rpReplyComment, mask: cfg.MarkMask,
				mark: selector.MarkValue(cfg.MarkMask, replyIdx), ctMark: rpMark})
	}
	out[chainPrerouting] = append(out[chainPrerouting],
		rule{chain: chainPrerouting, kind: ruleReplyReturn, comment: replyComment},
		rule{chain: chainPrerouting, kind: ruleInternalReturn, comment: internalComment, dst: setInternal})
	if bootGuard {
		out[chainPrerouting] = append(out[chainPrerouting],
			rule{chain: chainPrerouting, kind: ruleBootGuard, comment: bootGuardComment, src: setInternal, oif: cfg.Uplink},
			rule{chain: chainPrerouting, kind: ruleBootGuardPods, comment: bootGuardPodsComment, src: setInternal, dst: setBootDests})
	}
	// A gateway marks what other nodes reroute to it for the reverse-path
	// check, and clears the mark again first thing in postrouting.
	if gateway {
		out[chainPrerouting] = append(out[chainPrerouting],
			rule{chain: chainPrerouting, kind: ruleRPMark, comment: rpMarkComment, src: setInternal, oif: cfg.Uplink, mask: cfg.MarkMask, mark: rpMark})
		out[chainPostrouting] = append(out[chainPostrouting],
			rule{chain: chainPostrouting, kind: ruleRPUnmark, comment: rpUnmarkComment, mask: cfg.MarkMask, mark: rpMark})
	}
	if len(st.PodNetworks) > 0 && len(st.Policies) > 0 && !bootGuard {
		hold := rule{chain: chainPrerouting, kind: ruleHold, comment: holdComment, oif: cfg.Uplink, src: setPodNets, known: setKnown, dst: setHeldDests}
		if classes {
			hold.classes, hold.mask = setClasses, cfg.ClassMask
		}
		out[chainPrerouting] = append(out[chainPrerouting], hold)
	}
	if classes {
		out[chainPrerouting] = append(out[chainPrerouting],
			rule{chain: chainPrerouting, kind: ruleClassDispatch, comment: classDispatchComment, mask: cfg.ClassMask, dst: setPreClass})
		out[chainClassClear] = []rule{{chain: chainClassClear, kind: ruleClassClear, comment: classClearComment, mask: cfg.ClassMask}}
	}
	out[chainPrerouting] = append(out[chainPrerouting],
		rule{chain: chainPrerouting, kind: ruleDispatch, comment: dispatchComment, dst: setPreSrc})
	// Postrouting: cluster-internal destinations are left alone; traffic
	// this node reroutes (marked) is kept from every SNAT, ours and the
	// CNI's masquerade; then the gateway SNATs.
	out[chainPostrouting] = append(out[chainPostrouting],
		rule{chain: chainPostrouting, kind: ruleInternalReturn, comment: internalComment, dst: setInternal},
		rule{chain: chainPostrouting, kind: ruleNullBinding, comment: nullBindingComment, mask: cfg.MarkMask})
	policyRule := func(p selector.PolicyState) rule {
		r := rule{policy: p.Name, src: srcSetName(p.Name), dst: dstSetName(p.Name)}
		switch p.Mode {
		case selector.ModeReroute:
			r.kind, r.mask, r.mark = ruleReroute, cfg.MarkMask, selector.MarkValue(cfg.MarkMask, marks[p.NextHop])
			r.comment = policyComment(p, r.mark)
		case selector.ModeDrop:
			r.kind, r.comment = ruleDrop, policyComment(p, 0)
		case selector.ModeGateway:
			r.kind, r.oif, r.egress, r.comment = ruleGateway, cfg.Uplink, p.EgressIP, policyComment(p, 0)
		}
		return r
	}
	// Policy chains: a source only this policy selects.
	for _, p := range st.Policies {
		if p.Mode == selector.ModeReroute || p.Mode == selector.ModeDrop {
			own := policyChainName(p.Name)
			out[own] = []rule{withChain(policyRule(p), own, "")}
		}
	}
	// chainMulti: sources several policies select, every policy that
	// selects one of them, each destination in precedence order. A
	// Gateway policy's rule there only stops the evaluation (its traffic
	// is not marked).
	var sharing []selector.PolicyState
	shared := sharingPolicies(st, jumps)
	for _, p := range st.Policies {
		if shared[p.Name] {
			sharing = append(sharing, p)
		}
	}
	for _, r := range rankedRules(sharing, policyRule) {
		if r.kind == ruleGateway {
			r = rule{kind: ruleStay, policy: r.policy, src: r.src, pfx: r.pfx, comment: r.comment}
		}
		out[chainMulti] = append(out[chainMulti], withChain(r, chainMulti, r.src))
	}
	// Postrouting SNAT: a Gateway policy whose destinations overlap
	// another's takes one rule per destination, in precedence order; the
	// others one rule with their sets.
	var gateways []selector.PolicyState
	for _, p := range st.Policies {
		if p.Mode == selector.ModeGateway {
			gateways = append(gateways, p)
		}
	}
	overlapping := overlappingPolicies(gateways)
	var ranked []selector.PolicyState
	for _, p := range gateways {
		if overlapping[p.Name] {
			ranked = append(ranked, p)
			continue
		}
		out[chainPostrouting] = append(out[chainPostrouting], withChain(policyRule(p), chainPostrouting, srcSetName(p.Name)))
	}
	for _, r := range rankedRules(ranked, policyRule) {
		out[chainPostrouting] = append(out[chainPostrouting], withChain(r, chainPostrouting, r.src))
	}
	out[chainPostrouting] = append(out[chainPostrouting],
		rule{chain: chainPostrouting, kind: ruleForwardGuard, comment: forwardGuardComment, src: setInternal, oif: cfg.Uplink})
	return out
}

// rankedRules returns one rule per (policy, destination as written), in
// precedence order: the longest destination first, then the policy
// created first, then by name (selector.Precedence, the rule egressnatctl
// explain and the operator use too).
func rankedRules(ps []selector.PolicyState, policyRule func(selector.PolicyState) rule) []rule {
	type ranked struct {
		p   *selector.PolicyState
		pfx netip.Prefix
	}
	var all []ranked
	for i := range ps {
		written := ps[i].Written
		if len(written) == 0 {
			written = ps[i].Destinations
		}
		for _, pfx := range written {
			all = append(all, ranked{&ps[i], pfx})
		}
	}
	slices.SortStableFunc(all, func(a, b ranked) int {
		return cmp.Or(selector.Precedence(a.pfx.Bits(), a.p.Created, a.p.Name, b.pfx.Bits(), b.p.Created, b.p.Name),
			a.pfx.Addr().Compare(b.pfx.Addr()))
	})
	out := make([]rule, len(all))
	for i, r := range all {
		out[i] = policyRule(*r.p)
		out[i].pfx = r.pfx
	}
	return out
}

// overlappingPolicies returns the policies with a destination that
// overlaps a destination of another of ps.
func overlappingPolicies(ps []selector.PolicyState) map[string]bool {
	type span struct {
		lo, hi netip.Addr
		name   string
	}
	var spans []span
	for _, p := range ps {
		for _, d := range p.Destinations {
			r := prefixRange(d)
			spans = append(spans, span{r.start, r.last(), p.Name})
		}
	}
	slices.SortFunc(spans, func(a, b span) int { return a.lo.Compare(b.lo) })
	out := map[string]bool{}
	// A sweep: each span against the furthest-reaching one before it.
	var reach span
	for i, s := range spans {
		if i > 0 && s.lo.Compare(reach.hi) <= 0 && s.name != reach.name {
			out[s.name], out[reach.name] = true, true
		}
		if i == 0 || s.hi.Compare(reach.hi) > 0 {
			reach = s
		}
	}
	return out
}

func withChain(r rule, chain, src string) rule {
	r.chain, r.src = chain, src
	return r
}

const (
	dispatchComment = "sources of reroute and drop policies: jump to their chain"
	replyComment    = "only the original direction of a connection is steered"
	internalComment = "cluster-internal destinations are never steered"
)

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
		case *expr.Ct:
			// google/nftables v0.3.0 reads a ct set back without its
			// source register: compare the key only.
			c := *v
			if c.SourceRegister {
				c.Register, c.SourceRegister = 0, false
			}
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

// rulesMatch reports whether the kernel rules of a chain are exactly want.
func rulesMatch(have []*nftables.Rule, want []rule) bool {
	if len(have) != len(want) {
		return false
	}
	byName := func(name string) *nftables.Set { return &nftables.Set{Name: name} }
	for i := range want {
		if string(have[i].UserData) != string(want[i].userData()) {
			return false
		}
		if !reflect.DeepEqual(normalize(have[i].Exprs), normalize(want[i].exprs(byName))) {
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
	case len(lookups) == 1 && strings.HasPrefix(lookups[0], srcPrefix):
		kr.srcSet = lookups[0] // one destination of overlapping policies
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
