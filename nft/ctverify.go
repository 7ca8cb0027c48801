package nft

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/ti-mo/conntrack"
	tinetfilter "github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"
)

// Conntrack verification on failover. The node that gives a floating IP up
// checks that no conntrack entry still translates to it (VerifyReleased);
// the node that takes it checks that the flows of its Gateway policies are
// translated to their egress IP (VerifyTaken). Both flush what is wrong and
// report what they found, for the agent's metrics and logs.

// CTVerify is what one conntrack verification found and did. Entries are
// IPv4 conntrack entries.
type CTVerify struct {
	// Flushed: entries deleted. VerifyReleased: entries SNATed to a
	// released IP. VerifyTaken: the Wrong ones.
	Flushed int
	// Remaining: entries still wrong after the flush (a second dump).
	// VerifyReleased: still SNATed to a released IP, i.e. something on
	// this node still translates to it. VerifyTaken: still not translated
	// to their egress IP. Should be 0.
	Remaining int
	// Translated (VerifyTaken): entries of this node's Gateway policies
	// SNATed to their egress IP.
	Translated int
	// Wrong (VerifyTaken): entries of this node's Gateway policies that
	// are not SNATed to their egress IP (picked up before the SNAT rule
	// existed, null-bound while this node rerouted them, or masqueraded to
	// the node IP). They are flushed, so their next packet is NATed anew.
	Wrong int
	// PerIP holds the same counts for each IP asked about (every one of
	// them, zero counts included).
	PerIP map[netip.Addr]CTVerifyIP
}

// CTVerifyIP is the part of a CTVerify that concerns one floating IP.
type CTVerifyIP struct {
	Flushed, Remaining, Translated, Wrong int
}

func newCTVerify(ips []netip.Addr) (CTVerify, map[netip.Addr]bool) {
	v := CTVerify{PerIP: make(map[netip.Addr]CTVerifyIP, len(ips))}
	set := make(map[netip.Addr]bool, len(ips))
	for _, a := range ips {
		a = a.Unmap()
		set[a] = true
		v.PerIP[a] = CTVerifyIP{}
	}
	return v, set
}

func (v *CTVerify) add(ip netip.Addr, d CTVerifyIP) {
	v.Flushed += d.Flushed
	v.Remaining += d.Remaining
	v.Translated += d.Translated
	v.Wrong += d.Wrong
	c := v.PerIP[ip]
	c.Flushed += d.Flushed
	c.Remaining += d.Remaining
	c.Translated += d.Translated
	c.Wrong += d.Wrong
	v.PerIP[ip] = c
}

// VerifyReleased checks, after this node gave ips up, that no conntrack
// entry still translates to one of them (reply destination == the IP, the
// original source another address: the flow was SNATed to it): it deletes
// those entries, dumps again and reports what it deleted (Flushed) and
// what is still there (Remaining: a flow a rule of this node SNATed to it
// again meanwhile). It does not take the dataplane's lock. A restarted
// agent may call it with the cluster's floating IPs it does not hold: a
// crash between a release and its conntrack clean-up leaves entries no
// later Apply deletes (it finds nothing to change).
func (d *Dataplane) VerifyReleased(ctx context.Context, ips []netip.Addr) (CTVerify, error) {
	v, released := newCTVerify(ips)
	if len(released) == 0 {
		return v, nil
	}
	c, err := d.ct.dial()
	if err != nil {
		return v, fmt.Errorf("conntrack dial: %w", err)
	}
	defer c.Close()
	// Translated to a released IP: replies go to it, the flow came from
	// another address (a flow from the IP itself to this node, e.g. from
	// the node that holds it now, is not a translation).
	stale := func(f *conntrack.Flow) (netip.Addr, bool) {
		ip := f.TupleReply.IP.DestinationAddress
		return ip, released[ip] && f.TupleOrig.IP.SourceAddress != ip
	}
	var errs []error
	err = eachFlow(ctx, c, func(f *conntrack.Flow) error {
		ip, ok := stale(f)
		if !ok {
			return nil
		}
		deleted, err := deleteCounted(c, f, &errs)
		if deleted {
			v.add(ip, CTVerifyIP{Flushed: 1})
		}
		return err
	})
	if err != nil {
		return v, err
	}
	err = eachFlow(ctx, c, func(f *conntrack.Flow) error {
		if ip, ok := stale(f); ok {
			v.add(ip, CTVerifyIP{Remaining: 1})
		}
		return nil
	})
	return v, errors.Join(append(errs, err)...)
}

// VerifyTaken checks, after this node took ips, the conntrack entries of
// its Gateway policies whose egress IP is one of ips: an entry whose
// original source the policy selects and whose original destination it
// covers (as the table's rules decide it: cluster-internal destinations
// and sources a Reroute or Drop policy of higher precedence takes are not
// the policy's) is Translated when its replies go to the egress IP, Wrong
// otherwise. Wrong entries are deleted (their next packet is NATed by the
// current rules), then a second dump counts the ones still wrong
// (Remaining). The policies are the ones of the last Apply of this
// process, or the table read back from the kernel when there is none (the
// dataplane's lock is held while the model of the rules is built, not
// during the conntrack dumps). A restarted agent may call it with the IPs
// it holds, for the same reason as VerifyReleased.
//
// A flow the SNAT rule cannot see (one that leaves by another interface
// than the uplink) counts as Wrong.
func (d *Dataplane) VerifyTaken(ctx context.Context, ips []netip.Addr) (CTVerify, error) {
	v, taken := newCTVerify(ips)
	if len(taken) == 0 {
		return v, nil
	}
	m, err := d.snatModel(ctx)
	if err != nil {
		return v, err
	}
	if m.empty() {
		return v, nil
	}
	c, err := d.ct.dial()
	if err != nil {
		return v, fmt.Errorf("conntrack dial: %w", err)
	}
	defer c.Close()
	// check returns the egress IP the entry should be SNATed to (one of
	// ips) and whether it is.
	check := func(f *conntrack.Flow) (netip.Addr, bool, bool) {
		r, ok := m.expect(f.TupleOrig.IP.SourceAddress, f.TupleOrig.IP.DestinationAddress)
		if !ok || !taken[r.egress] {
			return netip.Addr{}, false, false
		}
		return r.egress, f.TupleReply.IP.DestinationAddress == r.egress, true
	}
	var errs []error
	err = eachFlow(ctx, c, func(f *conntrack.Flow) error {
		ip, translated, ok := check(f)
		switch {
		case !ok:
			return nil
		case translated:
			v.add(ip, CTVerifyIP{Translated: 1})
			return nil
		}
		v.add(ip, CTVerifyIP{Wrong: 1})
		deleted, err := deleteCounted(c, f, &errs)
		if deleted {
			v.add(ip, CTVerifyIP{Flushed: 1})
		}
		return err
	})
	if err != nil {
		return v, err
	}
	err = eachFlow(ctx, c, func(f *conntrack.Flow) error {
		if ip, translated, ok := check(f); ok && !translated {
			v.add(ip, CTVerifyIP{Remaining: 1})
		}
		return nil
	})
	return v, errors.Join(append(errs, err)...)
}

// eachFlow dumps the IPv4 conntrack table and calls fn for each entry; it
// stops at fn's first error or when ctx ends.
func eachFlow(ctx context.Context, c *conntrack.Conn, fn func(f *conntrack.Flow) error) error {
	flows, err := c.DumpFilter(conntrack.NewFilter().Family(tinetfilter.ProtoIPv4), nil)
	if err != nil {
		return fmt.Errorf("conntrack dump: %w", err)
	}
	for i := range flows {
		if i%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if err := fn(&flows[i]); err != nil {
			return err
		}
	}
	return nil
}

// deleteFlow deletes one entry; one that is gone already is not an error
// (and not counted as deleted).
func deleteFlow(c *conntrack.Conn, f *conntrack.Flow) (bool, error) {
	if err := c.Delete(*f); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("conntrack delete %s: %w", f.TupleOrig, err)
	}
	return true, nil
}

// The SNAT model: which translation an entry should carry, as the table's
// rules decide it for a packet of the flow.

// snatRule is one policy rule of the table that decides a flow's
// translation on this node.
type snatRule struct {
	policy string
	src    []netip.Addr // sorted
	// dst: the destinations the rule matches; all: every destination (a
	// 0.0.0.0/0 rule matches no address at all).
	dst spanSet
	all bool
	// gateway: a Gateway policy's rule (SNAT to egress in postrouting,
	// "stay" in the shared chain); otherwise a Reroute or Drop policy's
	// rule in the shared chain, which takes the flow away from the SNAT.
	gateway bool
	egress  netip.Addr
}

func (r *snatRule) matches(src, dst netip.Addr) bool {
	if _, ok := slices.BinarySearchFunc(r.src, src, netip.Addr.Compare); !ok {
		return false
	}
	return r.all || r.dst.contains(dst)
}

// snatModel is the part of the table that decides whether and how a
// forwarded flow is SNATed on this node, in rule order.
type snatModel struct {
	// internal: cluster-internal destinations, never SNATed.
	internal spanSet
	// shared: sources dispatched to chainMulti, whose rules (multi) decide
	// by precedence whether a Reroute or Drop policy takes the flow first.
	shared map[netip.Addr]bool
	multi  []snatRule
	// post: the SNAT rules of postrouting (and drop rules, of Gateway
	// policies whose IP was released), in order; the first that matches
	// decides.
	post []snatRule
}

func (m *snatModel) empty() bool { return len(m.post) == 0 }

// expect returns the SNAT rule that decides the flow src -> dst, when one
// of this node's Gateway policies does.
func (m *snatModel) expect(src, dst netip.Addr) (*snatRule, bool) {
	if m.internal.contains(dst) {
		return nil, false
	}
	if m.shared[src] {
		for i := range m.multi {
			r := &m.multi[i]
			if r.matches(src, dst) {
				if !r.gateway {
					return nil, false // marked or dropped before the SNAT
				}
				break
			}
		}
	}
	for i := range m.post {
		if r := &m.post[i]; r.matches(src, dst) {
			return r, r.gateway
		}
	}
	return nil, false
}

// egresses returns the egress IPs of the model's SNAT rules, sorted.
func (m *snatModel) egresses() []netip.Addr {
	var out []netip.Addr
	for _, r := range m.post {
		if r.gateway {
			out = append(out, r.egress)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// modelRule is what the model needs of one rule, from the cache (rule) or
// decoded from the kernel.
type modelRule struct {
	kind   ruleKind
	policy string
	src    string
	dst    string // destination set, when pfx is not valid
	pfx    netip.Prefix
	all    bool // no destination match
	egress netip.Addr
}

// buildSNATModel builds the model from the rules of chainMulti and
// chainPostrouting, the shared sources and the sets' contents.
func buildSNATModel(multi, post []modelRule, shared map[netip.Addr]bool, addrs func(set string) ([]netip.Addr, error), ranges func(set string) ([]ipRange, error)) (*snatModel, error) {
	m := &snatModel{shared: shared}
	internal, err := ranges(setInternal)
	if err != nil {
		return nil, err
	}
	m.internal = newSpanSet(internal)
	conv := func(r modelRule) (snatRule, error) {
		out := snatRule{policy: r.policy, gateway: r.kind == ruleGateway || r.kind == ruleStay, egress: r.egress, all: r.all}
		var err error
		if out.src, err = addrs(r.src); err != nil {
			return out, err
		}
		switch {
		case r.pfx.IsValid():
			out.dst = newSpanSet([]ipRange{prefixRange(r.pfx)})
		case r.dst != "":
			rs, err := ranges(r.dst)
			if err != nil {
				return out, err
			}
			out.dst = newSpanSet(rs)
		}
		return out, nil
	}
	gateways := 0
	for _, r := range post {
		// A drop rule there (a Gateway policy whose IP was released) decides
		// the flows it matches as well: they are not SNATed.
		if r.src == "" || !(r.kind == ruleGateway && r.egress.IsValid() || r.kind == ruleDrop) {
			continue
		}
		sr, err := conv(r)
		if err != nil {
			return nil, err
		}
		m.post = append(m.post, sr)
		if sr.gateway {
			gateways++
		}
	}
	if gateways == 0 {
		return &snatModel{}, nil
	}
	if len(shared) == 0 {
		m.shared = nil
		return m, nil
	}
	for _, r := range multi {
		if r.src == "" || (r.kind != ruleStay && r.kind != ruleReroute && r.kind != ruleDrop) {
			continue
		}
		sr, err := conv(r)
		if err != nil {
			return nil, err
		}
		m.multi = append(m.multi, sr)
	}
	return m, nil
}

// snatModel returns the model of the last Apply's table, or of the table
// read back from the kernel when there is none.
func (d *Dataplane) snatModel(ctx context.Context) (*snatModel, error) {
	d.mu.Lock()
	// In the eBPF mode, the pods dispatched to chainMulti by their class
	// are not in pre-src: the jumps of every pod as last applied say.
	var classJumps map[netip.Addr]string
	if d.cls != nil && d.cls.podJumps != nil {
		classJumps = maps.Clone(d.cls.podJumps)
	}
	if ks := d.nf.cache; ks != nil && ks.ours && ks.specs != nil {
		jumps := ks.jumpMap()
		if classJumps != nil {
			jumps = classJumps
		}
		m, err := modelOfCache(ks, jumps)
		d.mu.Unlock()
		return m, err
	}
	d.mu.Unlock()
	c, err := d.cfg.nftConn()
	if err != nil {
		return nil, fmt.Errorf("nftables conn: %w", err)
	}
	m, err := modelOfKernel(ctx, tableReader{c: c, name: d.cfg.Table})
	if err == nil && m != nil {
		for a, ch := range classJumps {
			if ch == chainMulti {
				if m.shared == nil {
					m.shared = map[netip.Addr]bool{}
				}
				m.shared[a] = true
			}
		}
	}
	return m, err
}

// modelOfCache builds the model from the table as the last Apply left it
// (under the dataplane's lock).
func modelOfCache(ks *nftState, jumps map[netip.Addr]string) (*snatModel, error) {
	conv := func(rs []rule) []modelRule {
		out := make([]modelRule, 0, len(rs))
		for _, r := range rs {
			mr := modelRule{kind: r.kind, policy: r.policy, src: r.src, pfx: r.pfx, egress: r.egress}
			if !r.pfx.IsValid() {
				mr.dst = r.dst
			} else if r.pfx.Bits() == 0 {
				mr.pfx, mr.all = netip.Prefix{}, true
			}
			out = append(out, mr)
		}
		return out
	}
	shared := map[netip.Addr]bool{}
	for a, chain := range jumps {
		if chain == chainMulti {
			shared[a] = true
		}
	}
	// The source slices are replaced, never changed in place, by later
	// applies: they can be used after the lock is released.
	addrs := func(set string) ([]netip.Addr, error) { return ks.srcAddrs(set), nil }
	ranges := func(set string) ([]ipRange, error) { return elemRanges(ks.elems[set]), nil }
	return buildSNATModel(conv(ks.specs[chainMulti]), conv(ks.specs[chainPostrouting]), shared, addrs, ranges)
}

// modelOfKernel reads the rules of chainPostrouting and chainMulti and the
// sets they read from the kernel.
func modelOfKernel(ctx context.Context, r tableReader) (*snatModel, error) {
	exists, err := r.exists()
	if err != nil || !exists {
		return &snatModel{}, err
	}
	chains, err := r.chains()
	if err != nil {
		return nil, err
	}
	rules := map[string][]*nftables.Rule{}
	for _, ch := range chains {
		if ch.Name != chainPostrouting && ch.Name != chainMulti {
			continue
		}
		rs, err := r.rules(ch)
		if err != nil && !errors.Is(err, errNotFound) {
			return nil, err
		}
		rules[ch.Name] = rs
	}
	elems := map[string][]nftables.SetElement{}
	read := func(name string) ([]nftables.SetElement, error) {
		if el, ok := elems[name]; ok {
			return el, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		el, err := r.elementsOf(name)
		if err == nil {
			elems[name] = el
		}
		return el, err
	}
	return modelOfRules(rules, read)
}

// modelOfRules builds the model from rules read from the kernel, by chain,
// and the elements of the sets they name.
func modelOfRules(rules map[string][]*nftables.Rule, elems func(set string) ([]nftables.SetElement, error)) (*snatModel, error) {
	decode := func(rs []*nftables.Rule) []modelRule {
		var out []modelRule
		for _, r := range rs {
			if mr, ok := decodeModelRule(r); ok {
				out = append(out, mr)
			}
		}
		return out
	}
	multi, post := decode(rules[chainMulti]), decode(rules[chainPostrouting])
	shared := map[netip.Addr]bool{}
	if len(multi) > 0 {
		el, err := elems(setPreSrc)
		if err != nil {
			return nil, err
		}
		for a, chain := range elemJumps(el) {
			if chain == chainMulti {
				shared[a] = true
			}
		}
	}
	addrs := func(set string) ([]netip.Addr, error) {
		el, err := elems(set)
		return elemAddrs(el), err
	}
	ranges := func(set string) ([]ipRange, error) {
		el, err := elems(set)
		return elemRanges(el), err
	}
	return buildSNATModel(multi, post, shared, addrs, ranges)
}

// decodeModelRule decodes a policy rule of chainMulti or chainPostrouting
// as rule.exprs writes it: the source set, the destination (set, prefix or
// none) and what it does. ok is false for the other rules.
func decodeModelRule(r *nftables.Rule) (mr modelRule, ok bool) {
	var offset uint32
	loaded := false // the last payload loaded an address to register 1
	var mask []byte
	var imm []byte
	dstMatched := false
	for _, e := range r.Exprs {
		switch v := e.(type) {
		case *expr.Payload:
			loaded = v.OperationType == expr.PayloadLoad && v.Base == expr.PayloadBaseNetworkHeader && v.Len == 4
			offset, mask = v.Offset, nil
			continue
		case *expr.Lookup:
			if loaded && !v.IsDestRegSet {
				switch offset {
				case 12:
					mr.src = v.SetName
				case 16:
					mr.dst, dstMatched = v.SetName, true
				}
			}
		case *expr.Bitwise:
			if loaded && offset == 16 && len(v.Mask) == 4 {
				mask = v.Mask
				continue
			}
		case *expr.Cmp:
			if loaded && offset == 16 && v.Op == expr.CmpOpEq && len(v.Data) == 4 {
				bits := 32
				if mask != nil {
					ones := 0
					for _, b := range mask {
						for i := 7; i >= 0 && b&(1<<i) != 0; i-- {
							ones++
						}
					}
					bits = ones
				}
				a, _ := netip.AddrFromSlice(v.Data)
				mr.pfx, dstMatched = netip.PrefixFrom(a, bits), true
			}
		case *expr.Immediate:
			imm = v.Data
		case *expr.NAT:
			if a, ok := netip.AddrFromSlice(imm); ok && a.Is4() && v.Type == expr.NATTypeSourceNAT {
				mr.kind, mr.egress = ruleGateway, a
			}
		case *expr.Meta:
			if v.Key == expr.MetaKeyMARK && v.SourceRegister {
				mr.kind = ruleReroute
			}
		case *expr.Verdict:
			switch {
			case v.Kind == expr.VerdictDrop && mr.kind == 0:
				mr.kind = ruleDrop
			case v.Kind == expr.VerdictReturn && mr.kind == 0:
				mr.kind = ruleStay
			}
		}
		loaded = false
	}
	if mr.kind == 0 || !strings.HasPrefix(mr.src, srcPrefix) {
		return modelRule{}, false
	}
	mr.all = !dstMatched
	mr.policy = commentPolicy(ruleComment(r))
	return mr, true
}

// SNATCheck tells which translation a conntrack entry should carry on a
// node, from one read of the agent's table (ReadTable): the SNAT rules of
// its Gateway policies, in order, the cluster-internal destinations and
// the sources a Reroute or Drop policy may take first. egressnatctl
// conntrack uses it to show the entries of this node's Gateway policies
// that are not translated to their egress IP.
type SNATCheck struct {
	m *snatModel
}

// SNATCheck returns the check of the table t.
func (t *Table) SNATCheck() *SNATCheck {
	rules := map[string][]*nftables.Rule{}
	for _, tc := range t.Chains {
		rules[tc.Chain.Name] = tc.Rules
	}
	elems := map[string][]nftables.SetElement{}
	for _, ts := range t.Sets {
		elems[ts.Set.Name] = ts.Elements
	}
	m, _ := modelOfRules(rules, func(set string) ([]nftables.SetElement, error) { return elems[set], nil })
	return &SNATCheck{m: m}
}

// Expect returns the Gateway policy that decides the flow from src to dst
// on this node and the egress IP it SNATs to; ok is false when none does
// (the flow is not SNATed by egressnat here).
func (c *SNATCheck) Expect(src, dst netip.Addr) (policy string, egress netip.Addr, ok bool) {
	r, ok := c.m.expect(src.Unmap(), dst.Unmap())
	if !ok {
		return "", netip.Addr{}, false
	}
	return r.policy, r.egress, true
}

// Egresses returns the egress IPs of the table's SNAT rules, sorted.
func (c *SNATCheck) Egresses() []netip.Addr { return c.m.egresses() }

// Policies returns the names of the Gateway policies with a SNAT rule, by
// egress IP.
func (c *SNATCheck) Policies() map[netip.Addr][]string {
	out := map[netip.Addr][]string{}
	for _, r := range c.m.post {
		if r.gateway && !slices.Contains(out[r.egress], r.policy) {
			out[r.egress] = append(out[r.egress], r.policy)
		}
	}
	for _, k := range slices.Collect(maps.Keys(out)) {
		slices.Sort(out[k])
	}
	return out
}

// deleteCounted deletes f, collecting a failure in errs; it returns an
// error (stop) once more than ten deletions failed.
func deleteCounted(c *conntrack.Conn, f *conntrack.Flow, errs *[]error) (bool, error) {
	deleted, err := deleteFlow(c, f)
	if err != nil {
		*errs = append(*errs, err)
		if len(*errs) > 10 {
			return deleted, errors.Join(*errs...)
		}
	}
	return deleted, nil
}
