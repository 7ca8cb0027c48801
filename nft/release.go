package nft

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"go.uber.org/zap"

	"github.com/egressnat/egressnat/selector"
)

// The release path: a node gives floating IPs up at once, without a full
// Apply. The next Apply converges from what it leaves, whatever its state.

// ReleaseResult tells what one Release did.
type ReleaseResult struct {
	// AddrsRemoved: floating IPs removed from the uplink (egressnat's own).
	AddrsRemoved []netip.Addr
	// NotOwned: IPs released that are on the uplink but that egressnat did
	// not put there: left in place (their SNAT stops all the same).
	NotOwned []netip.Addr
	// RulesChanged: Gateway rules (SNAT to a released IP) replaced by drop
	// rules.
	RulesChanged int
	// Unrecorded: IPs removed from the floating record (set "floating").
	Unrecorded []netip.Addr
	// Transactions: nftables transactions (0 or 1).
	Transactions     int
	ConntrackDeleted int
	// Duration of the release, lock wait excluded.
	Duration time.Duration
}

// Release gives the floating IPs ips up, fast and in this order:
//
//  1. their gratuitous ARP stops and those egressnat added leave the
//     uplink, so the node stops answering ARP for them (an address it did
//     not add is never removed: ReleaseResult.NotOwned); then they leave
//     the ARP lease table (see KeepARP; best effort);
//  2. in one nftables transaction, every Gateway rule that SNATs to one of
//     them becomes a drop rule (same match, `counter drop`), so that the
//     traffic of those policies fails closed: it is neither SNATed to an
//     IP the node no longer holds nor forwarded unNATed (the CNI's
//     masquerade would send it out with the node IP); and they leave the
//     floating record;
//  3. the conntrack entries SNATed to them are deleted, so established
//     flows meet the drop rule too.
//
// The rest of the table stays as it is. The next Apply converges from this
// state whatever it wants (it takes the full path, and an IP still wanted
// is probed and taken again); the cached table is updated, or dropped when
// it did not match the kernel.
//
// Release reads only the uplink's addresses, the floating set and the
// postrouting chain. It takes the Dataplane's lock like every other
// method, so it waits for an Apply in progress, but for nothing else (the
// caller's Apply backoff, if any, is not its concern).
func (d *Dataplane) Release(ctx context.Context, ips []netip.Addr) (ReleaseResult, error) {
	var targets []netip.Addr
	for _, ip := range ips {
		ip = ip.Unmap()
		if !ip.Is4() {
			return ReleaseResult{}, fmt.Errorf("release: %s is not ipv4", ip)
		}
		targets = append(targets, ip)
	}
	slices.SortFunc(targets, netip.Addr.Compare)
	targets = slices.Compact(targets)
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.release(ctx, targets, false)
}

// ReleaseFloating releases (see Release) every floating IP this node holds:
// those egressnat added to the uplink and those it recorded; every Gateway
// rule then drops. A node that is cut off uses it before it knows the
// desired state (its agent cannot reach the API server).
func (d *Dataplane) ReleaseFloating(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, err := d.release(ctx, nil, true)
	return err
}

// release runs Release for targets (sorted, unique), or, with all, for
// every floating IP held and every Gateway rule. The caller holds d.mu.
func (d *Dataplane) release(ctx context.Context, targets []netip.Addr, all bool) (rr ReleaseResult, err error) {
	start := time.Now()
	res := Result{}
	defer func() {
		rr.Duration = time.Since(start)
		res.Transactions, res.ConntrackDeleted = rr.Transactions, rr.ConntrackDeleted
		d.last = res
		if err == nil && (len(rr.AddrsRemoved) > 0 || rr.RulesChanged > 0 || len(rr.Unrecorded) > 0 || rr.ConntrackDeleted > 0) {
			d.log.Info("floating ips released", zap.Stringers("ips", targets),
				zap.Stringers("removed", rr.AddrsRemoved), zap.Int("rulesChanged", rr.RulesChanged),
				zap.Int("conntrackDeleted", rr.ConntrackDeleted), zap.Duration("duration", rr.Duration))
		}
	}()
	h, err := d.cfg.netlinkHandle()
	if err != nil {
		return rr, fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	c, err := d.cfg.nftConn()
	if err != nil {
		return rr, fmt.Errorf("nftables conn: %w", err)
	}
	r := tableReader{c: c, name: d.cfg.Table}
	recorded, err := r.floating()
	if err != nil {
		return rr, err
	}
	link, err := h.LinkByName(d.cfg.Uplink)
	if err != nil {
		return rr, fmt.Errorf("uplink %s: %w", d.cfg.Uplink, err)
	}
	addrs, err := uplinkAddrs(h, link)
	if err != nil {
		return rr, err
	}
	owned := d.addr.owned(addrs, recorded)
	if all {
		targets = union(recorded, slices.Collect(maps.Keys(owned)))
	}
	// Whatever happens next, the next Apply takes the full path: it
	// re-adds an address still wanted and rewrites the rules.
	d.recheck = true

	// 1. ARP: no more announcements, then no more answers.
	d.addr.stop(targets)
	var remove []netip.Addr
	for _, ip := range targets {
		delete(d.addr.announced, ip)
		if _, present := addrs[ip]; !present {
			continue
		}
		if owned[ip] {
			remove = append(remove, ip)
		} else {
			rr.NotOwned = append(rr.NotOwned, ip)
		}
	}
	if err := d.addr.remove(h, link, addrs, remove, &res); err != nil {
		return rr, err
	}
	rr.AddrsRemoved = remove
	// Gone from the uplink: out of the arp table (best effort).
	d.releaseARP(targets, all)

	// 2. The Gateway rules to the released IPs drop; the record goes, in
	// the same transaction.
	before, err := r.rules(&nftables.Chain{Name: chainPostrouting, Table: r.table()})
	if err != nil && !errors.Is(err, errNotFound) {
		return rr, err
	}
	released := func(ip netip.Addr) bool {
		_, ok := slices.BinarySearchFunc(targets, ip, netip.Addr.Compare)
		return all || ok
	}
	type replacement struct {
		index  int
		egress netip.Addr
		rule   *nftables.Rule
	}
	var replace []replacement
	for i, kr := range before {
		parsed, ok := parseRule(kr)
		if !ok || parsed.mode != selector.ModeGateway || !released(parsed.egress) {
			continue
		}
		exprs, ok := releasedExprs(kr.Exprs)
		if !ok {
			continue
		}
		comment := releasedComment(ruleComment(kr), parsed.egress)
		replace = append(replace, replacement{index: i, egress: parsed.egress, rule: &nftables.Rule{
			Table: r.table(), Chain: &nftables.Chain{Name: chainPostrouting, Table: r.table()},
			Handle: kr.Handle, Exprs: exprs, UserData: rule{comment: comment}.userData(),
		}})
	}
	unrecord := intersect(targets, recorded)
	if len(replace)+len(unrecord) > 0 {
		for _, rp := range replace {
			c.ReplaceRule(rp.rule)
		}
		if len(unrecord) > 0 {
			if err := c.SetDeleteElements(nftSet(r.table(), setDef{name: setFloating}), nftElements(addrElements(unrecord))); err != nil {
				d.nf.cache = nil
				return rr, fmt.Errorf("release: delete elements of set %s: %w", setFloating, err)
			}
		}
		if err := c.Flush(); err != nil {
			d.nf.cache = nil
			return rr, fmt.Errorf("release: nftables transaction: %w", err)
		}
		rr.Transactions = 1
		rr.RulesChanged = len(replace)
		rr.Unrecorded = unrecord
	}
	d.releaseCache(before, recorded, unrecord, func(i int) bool {
		return slices.ContainsFunc(replace, func(rp replacement) bool { return rp.index == i })
	})

	// 3. Conntrack: the flows SNATed to the released IPs (with all, to
	// the egress IP of any Gateway rule).
	gone := slices.Clone(targets)
	for _, rp := range replace {
		gone = append(gone, rp.egress)
		if _, present := addrs[rp.egress]; present && all && !owned[rp.egress] && !slices.Contains(rr.NotOwned, rp.egress) {
			rr.NotOwned = append(rr.NotOwned, rp.egress)
		}
	}
	gone = union(gone, nil)
	n, err := d.ct.flush(ctx, snatMatcher(gone))
	rr.ConntrackDeleted = n
	return rr, err
}

// releaseCache brings the cached table to what release left in the
// kernel: the postrouting rules replaced (by index) and the floating set
// without unrecorded. The cache is dropped instead when it did not match
// what release read (the kernel had drifted from it).
func (d *Dataplane) releaseCache(before []*nftables.Rule, recorded, unrecorded []netip.Addr, replaced func(int) bool) {
	ks := d.nf.cache
	if ks == nil {
		return
	}
	if !ks.ours || !rulesMatch(before, ks.specs[chainPostrouting]) || !slices.Equal(elemAddrs(ks.elems[setFloating]), recorded) {
		d.nf.cache = nil
		return
	}
	post := slices.Clone(ks.specs[chainPostrouting])
	for i, r := range post {
		if !replaced(i) {
			continue
		}
		if r.kind != ruleGateway {
			d.nf.cache = nil
			return
		}
		post[i] = releasedSpec(r)
	}
	specs := maps.Clone(ks.specs)
	specs[chainPostrouting] = post
	ks.specs = specs
	elems := maps.Clone(ks.elems)
	kept, _ := diffAddrs(unrecorded, recorded) // recorded minus unrecorded
	elems[setFloating] = addrElems(kept)
	ks.elems = elems
}

// releasedComment is the comment of the drop rule that replaces a Gateway
// rule whose egress IP was released: the policy name (from the old
// comment, see policyComment) and what happened.
func releasedComment(old string, ip netip.Addr) string {
	name := commentPolicy(old)
	what := fmt.Sprintf("drop (%s released)", ip)
	if room := maxComment - len("policy : ") - len(what); len(name) > room {
		name = name[:room]
	}
	return fmt.Sprintf("policy %s: %s", name, what)
}

// releasedSpec is the drop rule that replaces the Gateway rule r: the same
// match (sources, destination set or prefix), then `counter drop`.
func releasedSpec(r rule) rule {
	return rule{chain: r.chain, kind: ruleDrop, policy: r.policy, comment: releasedComment(r.comment, r.egress),
		src: r.src, dst: r.dst, pfx: r.pfx}
}

// releasedExprs turns the expressions of a Gateway rule as the kernel
// returns them (match, `oifname <uplink>`, counter, snat) into those of
// its releasedSpec: the match, then `counter drop`.
func releasedExprs(exprs []expr.Any) ([]expr.Any, bool) {
	for i, e := range exprs {
		if m, ok := e.(*expr.Meta); ok && m.Key == expr.MetaKeyOIFNAME && !m.SourceRegister {
			out := slices.Clone(exprs[:i])
			return append(out, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}), true
		}
	}
	return nil, false
}

// floating reads the floating record; nil when there is no table or set.
func (r tableReader) floating() ([]netip.Addr, error) {
	el, err := r.elementsOf(setFloating)
	if err != nil {
		return nil, err
	}
	return elemAddrs(el), nil
}
