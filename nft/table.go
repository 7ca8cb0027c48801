package nft

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"

	"github.com/egressnat/egressnat/selector"
)

// Batch bounds. A netlink attribute length is 16 bits, so one message carries
// at most a few thousand elements; one Flush is one sendmsg, bounded by the
// socket send buffer (about 200 KiB: 20k IPv4 elements fail with "message
// too long").
var (
	maxMsgElements   = 1024
	maxBatchElements = 8000
	maxBatchBytes    = 150_000
	// Every message is acknowledged; bound them too so the acknowledgements
	// fit the receive buffer.
	maxBatchMsgs = 1000
)

// Rough sizes of what a batch carries, in bytes of netlink messages.
const (
	bytesElem     = 16
	bytesEndElem  = 24
	bytesRule     = 400
	bytesSetOrObj = 200
	bytesMsg      = 100
)

// nftState is what the kernel holds in our table.
type nftState struct {
	exists bool
	sets   map[string]*nftables.Set
	elems  map[string][]nftables.SetElement
	chains map[string]*nftables.Chain
	rules  map[string][]*nftables.Rule
}

func (d *Dataplane) table() *nftables.Table {
	return &nftables.Table{Name: d.cfg.Table, Family: nftables.TableFamilyIPv4}
}

func (d *Dataplane) readNFT(ctx context.Context, c *nftables.Conn) (*nftState, error) {
	ks := &nftState{
		sets:   map[string]*nftables.Set{},
		elems:  map[string][]nftables.SetElement{},
		chains: map[string]*nftables.Chain{},
		rules:  map[string][]*nftables.Rule{},
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == d.cfg.Table {
			ks.exists = true
		}
	}
	if !ks.exists {
		return ks, nil
	}
	t := d.table()
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	for _, s := range sets {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		ks.sets[s.Name] = s
		el, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("list set %s: %w", s.Name, err)
		}
		ks.elems[s.Name] = el
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != d.cfg.Table {
			continue
		}
		ks.chains[ch.Name] = ch
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return nil, fmt.Errorf("list rules %s: %w", ch.Name, err)
		}
		ks.rules[ch.Name] = rules
	}
	return ks, nil
}

func (d *Dataplane) chainDefs() map[string]*nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return map[string]*nftables.Chain{
		chainPrerouting: {
			Name: chainPrerouting, Table: d.table(), Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle, Policy: &accept,
		},
		chainPostrouting: {
			Name: chainPostrouting, Table: d.table(), Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATSource - 1), Policy: &accept,
		},
	}
}

func chainMatches(have, want *nftables.Chain) bool {
	return have.Type == want.Type &&
		have.Hooknum != nil && *have.Hooknum == *want.Hooknum &&
		have.Priority != nil && *have.Priority == *want.Priority &&
		(have.Policy == nil || *have.Policy == *want.Policy)
}

// setSpec is one set we want.
type setSpec struct {
	name     string
	interval bool
	comment  string
}

func setMatches(s *nftables.Set, spec setSpec) bool {
	return s.KeyType.Name == nftables.TypeIPAddr.Name && s.Interval == spec.interval &&
		!s.IsMap && !s.Constant && !s.Anonymous && !s.HasTimeout && !s.Concatenation
}

// op is one step of an nftables plan. Ops run in order; consecutive ops share
// a transaction as long as the batch bounds allow.
type op struct {
	elems int // set elements carried
	bytes int // estimated message bytes
	msgs  int // netlink messages
	run   func(c *nftables.Conn) error
}

// nftPlan is the ordered list of nftables changes for one Apply.
type nftPlan struct {
	ops                      []op
	elemsAdded, elemsDeleted int
	setsCreated, setsDeleted int
	chainsRebuilt            []string
	sets                     map[string]*nftables.Set
	// For conntrack: source and destination changes by set name, and the
	// egress IP of each gateway rule before the change, by source set name.
	sourceChanges map[string]srcChange
	destChanges   map[string]dstChange
	prevGateway   map[string]netip.Addr
}

type srcChange struct{ added, removed []netip.Addr }
type dstChange struct{ old, new []ipRange }

func (p *nftPlan) add(o op) { p.ops = append(p.ops, o) }

// elemOps splits elements into messages of at most maxMsgElements.
func elemOps(s *nftables.Set, elems []nftables.SetElement, del bool) []op {
	var out []op
	for len(elems) > 0 {
		n := min(len(elems), maxMsgElements)
		chunk := elems[:n]
		elems = elems[n:]
		b := bytesMsg
		for _, e := range chunk {
			if e.IntervalEnd {
				b += bytesEndElem
			} else {
				b += bytesElem
			}
		}
		out = append(out, op{elems: len(chunk), bytes: b, msgs: 1, run: func(c *nftables.Conn) error {
			if del {
				if err := c.SetDeleteElements(s, chunk); err != nil {
					return fmt.Errorf("delete elements of set %s: %w", s.Name, err)
				}
				return nil
			}
			if err := c.SetAddElements(s, chunk); err != nil {
				return fmt.Errorf("add elements to set %s: %w", s.Name, err)
			}
			return nil
		}})
	}
	return out
}

// clusterOp applies a group of interval clusters (deletes first, then adds)
// in a single op so it never straddles two transactions.
func clusterOp(s *nftables.Set, cls []rangeCluster) op {
	var del, add []nftables.SetElement
	for _, cl := range cls {
		for _, r := range cl.removed {
			del = append(del, r.elemsForDelete()...)
		}
		for _, r := range cl.added {
			add = append(add, r.elems()...)
		}
	}
	delOps, addOps := elemOps(s, del, true), elemOps(s, add, false)
	o := op{}
	for _, sub := range slices.Concat(delOps, addOps) {
		o.elems += sub.elems
		o.bytes += sub.bytes
		o.msgs += sub.msgs
	}
	o.run = func(c *nftables.Conn) error {
		for _, sub := range slices.Concat(delOps, addOps) {
			if err := sub.run(c); err != nil {
				return err
			}
		}
		return nil
	}
	return o
}

// after returns the table as the kernel holds it once the plan ran, with
// floating as the content of the floating set, for the next Apply to diff
// against (see Dataplane.nftCache).
func (p *nftPlan) after(d *Dataplane, want desiredNFT, floating []netip.Addr) *nftState {
	ks := &nftState{
		exists: true,
		sets:   make(map[string]*nftables.Set, len(p.sets)),
		elems:  make(map[string][]nftables.SetElement, len(p.sets)),
		chains: d.chainDefs(),
		rules:  map[string][]*nftables.Rule{},
	}
	for name, s := range p.sets {
		ks.sets[name] = s
		switch {
		case name == setFloating:
			ks.elems[name] = addrElems(floating)
		case s.Interval:
			var el []nftables.SetElement
			for _, r := range want.dests[name] {
				el = append(el, r.elems()...)
			}
			ks.elems[name] = el
		default:
			ks.elems[name] = addrElems(want.sources[name])
		}
	}
	pre, post := desiredRules(d.cfg, want.state, want.marks, p.sets)
	for name, specs := range map[string][]ruleSpec{chainPrerouting: pre, chainPostrouting: post} {
		for _, r := range specs {
			ks.rules[name] = append(ks.rules[name], &nftables.Rule{Table: d.table(), Chain: ks.chains[name], Exprs: r.exprs, UserData: r.userData()})
		}
	}
	return ks
}

// desiredNFT is the part of the desired state held in nftables.
type desiredNFT struct {
	state    selector.NodeState
	marks    map[netip.Addr]int
	sources  map[string][]netip.Addr // by src set name
	dests    map[string][]ipRange    // by dst set name
	floating []netip.Addr            // target content of the floating set
}

// planNFT computes the ordered nftables changes: new sets, additions, mixed
// interval changes, chain rebuilds, deletions, stale sets.
func (d *Dataplane) planNFT(ks *nftState, want desiredNFT) *nftPlan {
	t := d.table()
	p := &nftPlan{
		sets:          map[string]*nftables.Set{},
		sourceChanges: map[string]srcChange{},
		destChanges:   map[string]dstChange{},
		prevGateway:   map[string]netip.Addr{},
	}

	var specs []setSpec
	for _, pol := range want.state.Policies {
		specs = append(specs,
			setSpec{name: srcSetName(pol.Name), comment: "sources of policy " + pol.Name},
			setSpec{name: dstSetName(pol.Name), interval: true, comment: "destinations of policy " + pol.Name})
	}
	specs = append(specs, setSpec{name: setFloating, comment: "floating IPs added by egressnat"})

	// Phase 1: table and missing sets. Sets of the wrong kind are recreated
	// with the chains (phase 4).
	if !ks.exists {
		p.add(op{bytes: bytesSetOrObj, msgs: 1, run: func(c *nftables.Conn) error { c.AddTable(t); return nil }})
	}
	var recreate []setSpec
	for _, spec := range specs {
		s := &nftables.Set{Table: t, Name: spec.name, KeyType: nftables.TypeIPAddr, Interval: spec.interval, Comment: spec.comment}
		p.sets[spec.name] = s
		have, ok := ks.sets[spec.name]
		switch {
		case !ok:
			p.setsCreated++
			p.add(op{bytes: bytesSetOrObj, msgs: 1, run: func(c *nftables.Conn) error {
				if err := c.AddSet(s, nil); err != nil {
					return fmt.Errorf("add set %s: %w", s.Name, err)
				}
				return nil
			}})
		case !setMatches(have, spec):
			recreate = append(recreate, spec)
		}
	}
	recreated := map[string]bool{}
	for _, spec := range recreate {
		recreated[spec.name] = true
	}

	// Element diffs.
	var adds, mixed, dels []op
	for _, spec := range specs {
		s := p.sets[spec.name]
		var haveElems []nftables.SetElement
		if !recreated[spec.name] {
			haveElems = ks.elems[spec.name]
		}
		switch {
		case spec.name == setFloating:
			added, removed := diffAddrs(elemAddrs(haveElems), want.floating)
			p.elemsAdded += len(added)
			adds = append(adds, elemOps(s, addrElems(added), false)...)
			// Removed entries here are not ours to keep (never happens:
			// want.floating includes every recorded address); drop them.
			p.elemsDeleted += len(removed)
			dels = append(dels, elemOps(s, addrElems(removed), true)...)
		case spec.interval:
			have := elemRanges(haveElems)
			added, removed := diffRanges(have, want.dests[spec.name])
			if len(added)+len(removed) > 0 {
				p.destChanges[spec.name] = dstChange{old: have, new: want.dests[spec.name]}
			}
			// Clusters of additions only go before the rules, of removals
			// only after them; overlapping replacements go in between, each
			// group atomic. Consecutive ones share messages.
			var pureAdd, pureDel []nftables.SetElement
			var group []rangeCluster
			groupElems := 0
			for _, cl := range clusterRanges(added, removed) {
				switch {
				case len(cl.removed) == 0:
					for _, r := range cl.added {
						pureAdd = append(pureAdd, r.elems()...)
					}
				case len(cl.added) == 0:
					for _, r := range cl.removed {
						pureDel = append(pureDel, r.elemsForDelete()...)
					}
				default:
					group = append(group, cl)
					groupElems += cl.weight()
					if groupElems >= maxMsgElements {
						mixed = append(mixed, clusterOp(s, group))
						group, groupElems = nil, 0
					}
				}
				for _, r := range cl.added {
					p.elemsAdded += len(r.elems())
				}
				for _, r := range cl.removed {
					p.elemsDeleted += len(r.elemsForDelete())
				}
			}
			if len(group) > 0 {
				mixed = append(mixed, clusterOp(s, group))
			}
			adds = append(adds, elemOps(s, pureAdd, false)...)
			dels = append(dels, elemOps(s, pureDel, true)...)
		default:
			added, removed := diffAddrs(elemAddrs(haveElems), want.sources[spec.name])
			if len(added)+len(removed) > 0 {
				p.sourceChanges[spec.name] = srcChange{added: added, removed: removed}
			}
			p.elemsAdded += len(added)
			p.elemsDeleted += len(removed)
			adds = append(adds, elemOps(s, addrElems(added), false)...)
			dels = append(dels, elemOps(s, addrElems(removed), true)...)
		}
	}

	// Sets that will be deleted: their sources are "removed" for conntrack.
	var stale []string
	for name := range ks.sets {
		if _, ok := p.sets[name]; !ok {
			stale = append(stale, name)
		}
	}
	slices.Sort(stale)
	for _, name := range stale {
		switch {
		case strings.HasPrefix(name, srcPrefix):
			if rm := elemAddrs(ks.elems[name]); len(rm) > 0 {
				p.sourceChanges[name] = srcChange{removed: rm}
			}
		case strings.HasPrefix(name, dstPrefix):
			p.destChanges[name] = dstChange{old: elemRanges(ks.elems[name])}
		}
	}

	// Previous gateway rules, for conntrack.
	for _, r := range ks.rules[chainPostrouting] {
		if kr, ok := parseRule(r); ok && kr.mode == selector.ModeGateway {
			p.prevGateway[kr.srcSet] = kr.egress
		}
	}

	p.ops = append(p.ops, adds...)
	p.ops = append(p.ops, mixed...)

	// Phase 4: chains. Rebuilt only when they differ from the kernel.
	defs := d.chainDefs()
	pre, post := desiredRules(d.cfg, want.state, want.marks, p.sets)
	wantRules := map[string][]ruleSpec{chainPrerouting: pre, chainPostrouting: post}
	var rebuild []string
	for _, name := range []string{chainPrerouting, chainPostrouting} {
		have, ok := ks.chains[name]
		if len(recreate) > 0 || !ok || !chainMatches(have, defs[name]) || !rulesMatch(ks.rules[name], wantRules[name]) {
			rebuild = append(rebuild, name)
		}
	}
	var unknown []*nftables.Chain
	for name, ch := range ks.chains {
		if _, ok := defs[name]; !ok {
			unknown = append(unknown, ch)
		}
	}
	if len(rebuild) > 0 || len(unknown) > 0 {
		p.chainsRebuilt = rebuild
		o := op{bytes: bytesSetOrObj * (len(rebuild) + len(unknown)), msgs: 2 * (len(rebuild) + len(unknown))}
		for _, name := range rebuild {
			o.bytes += bytesRule * len(wantRules[name])
			o.msgs += len(wantRules[name])
		}
		var recreateElems [][]nftables.SetElement
		for _, spec := range recreate {
			var el []nftables.SetElement
			if spec.interval {
				for _, r := range want.dests[spec.name] {
					el = append(el, r.elems()...)
				}
			} else if spec.name == setFloating {
				el = addrElems(want.floating)
			} else {
				el = addrElems(want.sources[spec.name])
			}
			recreateElems = append(recreateElems, el)
			o.elems += len(el)
			o.bytes += bytesSetOrObj + len(el)*bytesEndElem
			o.msgs += 2 + len(el)/maxMsgElements + 1
		}
		o.run = func(c *nftables.Conn) error {
			for _, name := range rebuild {
				if have, ok := ks.chains[name]; ok {
					c.FlushChain(have)
					if !chainMatches(have, defs[name]) {
						c.DelChain(have)
						c.AddChain(defs[name])
					}
				} else {
					c.AddChain(defs[name])
				}
			}
			for _, ch := range unknown {
				ch.Table = t
				c.FlushChain(ch)
				c.DelChain(ch)
			}
			for i, spec := range recreate {
				c.DelSet(&nftables.Set{Table: t, Name: spec.name})
				s := p.sets[spec.name]
				if err := c.AddSet(s, nil); err != nil {
					return fmt.Errorf("add set %s: %w", s.Name, err)
				}
				for _, sub := range elemOps(s, recreateElems[i], false) {
					if err := sub.run(c); err != nil {
						return err
					}
				}
			}
			// Rules are built now so that sets created in this transaction
			// are referenced by ID as well as by name.
			pre, post := desiredRules(d.cfg, want.state, want.marks, p.sets)
			byChain := map[string][]ruleSpec{chainPrerouting: pre, chainPostrouting: post}
			for _, name := range rebuild {
				for _, r := range byChain[name] {
					c.AddRule(&nftables.Rule{Table: t, Chain: defs[name], Exprs: r.exprs, UserData: r.userData()})
				}
			}
			return nil
		}
		p.add(o)
	}

	p.ops = append(p.ops, dels...)

	// Phase 6: stale sets, after no rule references them.
	for _, name := range stale {
		s := &nftables.Set{Table: t, Name: name}
		p.setsDeleted++
		p.add(op{bytes: bytesSetOrObj, msgs: 1, run: func(c *nftables.Conn) error { c.DelSet(s); return nil }})
	}
	return p
}

// runOps sends the ops in as few transactions as the batch bounds allow. It
// returns the number of transactions (Flush calls) sent.
func (d *Dataplane) runOps(ctx context.Context, ops []op) (int, error) {
	if len(ops) == 0 {
		return 0, nil
	}
	c, err := d.nftConn()
	if err != nil {
		return 0, fmt.Errorf("nftables conn: %w", err)
	}
	flushes, queued, elems, bytes, msgs := 0, 0, 0, 0, 0
	flush := func() error {
		if queued == 0 {
			return nil
		}
		if err := c.Flush(); err != nil {
			return fmt.Errorf("nftables transaction %d: %w", flushes+1, err)
		}
		flushes++
		queued, elems, bytes, msgs = 0, 0, 0, 0
		return nil
	}
	for _, o := range ops {
		if err := ctx.Err(); err != nil {
			return flushes, err
		}
		if queued > 0 && (elems+o.elems > maxBatchElements || bytes+o.bytes > maxBatchBytes || msgs+o.msgs > maxBatchMsgs) {
			if err := flush(); err != nil {
				return flushes, err
			}
		}
		if err := o.run(c); err != nil {
			return flushes, err
		}
		queued++
		elems += o.elems
		bytes += o.bytes
		msgs += o.msgs
	}
	return flushes, flush()
}
