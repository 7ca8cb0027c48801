package nft

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// fakeKernel is an in-memory nftables table that applies plans with the
// kernel's transaction semantics: a transaction applies whole or not at
// all, and what the kernel rejects is rejected (unknown table, set or
// chain, a set of another kind, deleting a chain that still has rules or
// is jumped to, deleting a set a rule reads, overlapping or duplicate
// interval elements, deleting an element that is not there).
type fakeKernel struct {
	name string
	tbl  *fakeTable
	// commits counts committed transactions; onCommit sees the table after
	// each one.
	commits  int
	onCommit func(t *fakeTable)
	// failAt makes the transaction with this number (1-based, counted
	// over the kernel's life) fail, as if the kernel rejected it.
	failAt int
}

type fakeTable struct {
	sets   map[string]*fakeSet
	chains map[string]*fakeChain
}

type fakeSet struct {
	def       setDef
	addrs     map[netip.Addr]string // address -> jump chain (maps), "" otherwise
	intervals []ipRange
}

type fakeChain struct {
	base  *baseChain
	rules []rule
}

func newFakeKernel(table string) *fakeKernel { return &fakeKernel{name: table} }

func (t *fakeTable) clone() *fakeTable {
	if t == nil {
		return nil
	}
	out := &fakeTable{sets: map[string]*fakeSet{}, chains: map[string]*fakeChain{}}
	for n, s := range t.sets {
		out.sets[n] = &fakeSet{def: s.def, addrs: maps.Clone(s.addrs), intervals: slices.Clone(s.intervals)}
	}
	for n, c := range t.chains {
		out.chains[n] = &fakeChain{base: c.base, rules: slices.Clone(c.rules)}
	}
	return out
}

func (k *fakeKernel) run(ctx context.Context, p *Plan) (int, error) {
	n := 0
	for _, steps := range transactions(p) {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		tx := k.tbl.clone()
		var err error
		for _, s := range steps {
			for _, o := range s.ops {
				if tx, err = applyFake(tx, o); err != nil {
					return n, fmt.Errorf("nftables transaction %d: %s: %w", n+1, o.text(k.name), err)
				}
			}
		}
		if k.failAt == k.commits+1 {
			k.failAt = 0 // once
			return n, fmt.Errorf("nftables transaction %d: injected failure", n+1)
		}
		k.tbl = tx
		k.commits++
		n++
		if k.onCommit != nil {
			k.onCommit(k.tbl)
		}
	}
	return n, nil
}

func applyFake(t *fakeTable, o Op) (*fakeTable, error) {
	if o.table {
		if o.Verb == VerbDelete {
			if t == nil {
				return nil, unix.ENOENT
			}
			return nil, nil
		}
		if t == nil {
			t = &fakeTable{sets: map[string]*fakeSet{}, chains: map[string]*fakeChain{}}
		}
		return t, nil
	}
	if t == nil {
		return nil, fmt.Errorf("no table: %w", unix.ENOENT)
	}
	switch {
	case o.set != nil && o.elems == nil:
		s, ok := t.sets[o.set.name]
		if o.Verb == VerbAdd {
			if ok && s.def.kind != o.set.kind {
				return nil, fmt.Errorf("set of another kind: %w", unix.EEXIST)
			}
			if !ok {
				t.sets[o.set.name] = &fakeSet{def: *o.set, addrs: map[netip.Addr]string{}}
			}
			return t, nil
		}
		if !ok {
			return nil, unix.ENOENT
		}
		for name, c := range t.chains {
			for _, r := range c.rules {
				if slices.Contains(r.sets(), o.set.name) {
					return nil, fmt.Errorf("set read by a rule of chain %s: %w", name, unix.EBUSY)
				}
			}
		}
		delete(t.sets, o.set.name)
		return t, nil
	case o.set != nil:
		s, ok := t.sets[o.set.name]
		if !ok {
			return nil, unix.ENOENT
		}
		if s.def.kind == kindInterval {
			return t, s.applyIntervals(o.Verb, o.elems)
		}
		for _, e := range o.elems {
			have, present := s.addrs[e.addr]
			switch {
			case o.Verb == VerbDelete && !present:
				return nil, fmt.Errorf("element %s: %w", e.addr, unix.ENOENT)
			case o.Verb == VerbDelete:
				delete(s.addrs, e.addr)
			case s.def.kind == kindVerdict && t.chains[e.chain] == nil:
				return nil, fmt.Errorf("jump to chain %s: %w", e.chain, unix.ENOENT)
			case present && have != e.chain:
				return nil, fmt.Errorf("element %s with other data: %w", e.addr, unix.EEXIST)
			default:
				s.addrs[e.addr] = e.chain
			}
		}
		return t, nil
	case o.chain != nil:
		c, ok := t.chains[o.chain.name]
		switch o.Verb {
		case VerbAdd:
			if ok && (c.base == nil) != (o.chain.base == nil) {
				return nil, fmt.Errorf("chain of another kind: %w", unix.EEXIST)
			}
			if !ok {
				t.chains[o.chain.name] = &fakeChain{base: o.chain.base}
			}
		case VerbFlush:
			if !ok {
				return nil, unix.ENOENT
			}
			c.rules = nil
		case VerbDelete:
			if !ok {
				return nil, unix.ENOENT
			}
			if len(c.rules) > 0 {
				return nil, fmt.Errorf("chain %s has rules: %w", o.chain.name, unix.EBUSY)
			}
			for _, s := range t.sets {
				for a, target := range s.addrs {
					if target == o.chain.name {
						return nil, fmt.Errorf("chain %s is jumped to from %s in %s: %w", o.chain.name, a, s.def.name, unix.EBUSY)
					}
				}
			}
			delete(t.chains, o.chain.name)
		}
		return t, nil
	case o.rule != nil:
		c, ok := t.chains[o.rule.chain]
		if !ok {
			return nil, fmt.Errorf("chain %s: %w", o.rule.chain, unix.ENOENT)
		}
		for _, name := range o.rule.sets() {
			s, ok := t.sets[name]
			if !ok {
				return nil, fmt.Errorf("set %s: %w", name, unix.ENOENT)
			}
			if (s.def.kind == kindVerdict) != (o.rule.kind == ruleDispatch) {
				return nil, fmt.Errorf("set %s of the wrong kind for the rule: %w", name, unix.EINVAL)
			}
		}
		c.rules = append(c.rules, *o.rule)
		return t, nil
	}
	return nil, fmt.Errorf("unknown operation: %w", unix.EINVAL)
}

// applyIntervals adds or deletes ranges given as start (and end) elements.
func (s *fakeSet) applyIntervals(v Verb, els []element) error {
	var rs []ipRange
	for i := 0; i < len(els); i++ {
		e := els[i]
		if e.end {
			return fmt.Errorf("interval end %s without a start: %w", e.addr, unix.EINVAL)
		}
		if i+1 < len(els) && els[i+1].end {
			rs = append(rs, ipRange{start: e.addr, end: els[i+1].addr})
			i++
		} else {
			rs = append(rs, ipRange{start: e.addr, open: true})
		}
	}
	for _, r := range rs {
		i := slices.IndexFunc(s.intervals, func(h ipRange) bool { return compareRange(h, r) == 0 })
		if v == VerbDelete {
			if i < 0 {
				return fmt.Errorf("interval %v: %w", r, unix.ENOENT)
			}
			s.intervals = slices.Delete(s.intervals, i, i+1)
			continue
		}
		if i >= 0 {
			return fmt.Errorf("duplicate interval %s-%s: %w", r.start, r.last(), unix.EEXIST)
		}
		for _, h := range s.intervals {
			if r.start.Compare(h.last()) <= 0 && h.start.Compare(r.last()) <= 0 {
				return fmt.Errorf("interval %s-%s overlaps %s-%s: %w", r.start, r.last(), h.start, h.last(), unix.EEXIST)
			}
		}
		s.intervals = append(s.intervals, r)
		slices.SortFunc(s.intervals, compareRange)
	}
	return nil
}

// read returns the table as a read of the kernel returns it.
func (k *fakeKernel) read(context.Context) (*nftState, error) {
	ks := &nftState{sets: map[string]*nftables.Set{}, elems: map[string][]nftables.SetElement{},
		chains: map[string]*nftables.Chain{}, rules: map[string][]*nftables.Rule{}}
	if k.tbl == nil {
		return ks, nil
	}
	ks.exists = true
	t := &nftables.Table{Name: k.name, Family: nftables.TableFamilyIPv4}
	kt := &kernelTx{t: t}
	byName := func(name string) *nftables.Set { return &nftables.Set{Name: name} }
	for name, s := range k.tbl.sets {
		ks.sets[name] = nftSet(t, s.def)
		if s.def.kind == kindInterval {
			ks.elems[name] = nftElements(rangeElements(s.intervals))
		} else {
			ks.elems[name] = nftElements(jumpElements(s.addrs))
		}
	}
	for name, c := range k.tbl.chains {
		ks.chains[name] = kt.chain(&chainDef{name: name, base: c.base})
		for _, r := range c.rules {
			ks.rules[name] = append(ks.rules[name], &nftables.Rule{Table: t, Chain: ks.chains[name], Exprs: r.exprs(byName), UserData: r.userData()})
		}
	}
	return ks, nil
}

// String dumps the table readably, sorted, for comparisons.
func (t *fakeTable) String() string {
	if t == nil {
		return "(no table)\n"
	}
	var b strings.Builder
	for _, name := range sortedKeys(t.chains) {
		fmt.Fprintf(&b, "chain %s\n", name)
		for _, r := range t.chains[name].rules {
			fmt.Fprintf(&b, "  %s\n", r)
		}
	}
	for _, name := range sortedKeys(t.sets) {
		s := t.sets[name]
		els := jumpElements(s.addrs)
		if s.def.kind == kindInterval {
			els = rangeElements(s.intervals)
		}
		fmt.Fprintf(&b, "set %s { %s }\n", name, elemText(s.def.kind, els))
	}
	return b.String()
}

// members returns a plain set's addresses, sorted.
func (s *fakeSet) members() []netip.Addr {
	return slices.SortedFunc(maps.Keys(s.addrs), netip.Addr.Compare)
}
