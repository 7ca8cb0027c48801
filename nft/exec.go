package nft

import (
	"context"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
)

// executor runs a plan: the kernel (kernelExec), or an in-memory table in
// tests. It returns the number of transactions it committed; on an error
// the transaction that failed changed nothing, the ones before it stay.
type executor interface {
	run(ctx context.Context, p *Plan) (int, error)
}

// kernelExec sends plans to the kernel through google/nftables, in as few
// transactions as the batch bounds allow (a step is never split).
type kernelExec struct {
	conn func() (*nftables.Conn, error)
}

// committedHook, when set, is called after each transaction the kernel
// committed. It is for tests only (the crash tests kill the process there,
// see crash_test.go); nil in production, where it costs one comparison.
var committedHook func()

func (k kernelExec) run(ctx context.Context, p *Plan) (int, error) {
	if p.Empty() {
		return 0, nil
	}
	c, err := k.conn()
	if err != nil {
		return 0, fmt.Errorf("nftables conn: %w", err)
	}
	t := &nftables.Table{Name: p.table, Family: nftables.TableFamilyIPv4}
	flushes := 0
	for _, steps := range transactions(p) {
		if err := ctx.Err(); err != nil {
			return flushes, err
		}
		tx := &kernelTx{c: c, t: t, created: map[string]*nftables.Set{}}
		for _, s := range steps {
			for _, o := range s.ops {
				if err := tx.queue(o); err != nil {
					return flushes, err
				}
			}
		}
		if err := c.Flush(); err != nil {
			return flushes, fmt.Errorf("nftables transaction %d: %w", flushes+1, err)
		}
		flushes++
		if committedHook != nil {
			committedHook()
		}
	}
	return flushes, nil
}

// transactions groups the plan's steps into transactions: consecutive steps
// as long as the batch bounds allow, a step never split.
func transactions(p *Plan) [][]step {
	var out [][]step
	var cur []step
	elems, bytes, msgs := 0, 0, 0
	for _, s := range p.steps {
		if len(cur) > 0 && (elems+s.elems > maxBatchElements || bytes+s.bytes > maxBatchBytes || msgs+s.msgs > maxBatchMsgs) {
			out = append(out, cur)
			cur, elems, bytes, msgs = nil, 0, 0, 0
		}
		cur = append(cur, s)
		elems += s.elems
		bytes += s.bytes
		msgs += s.msgs
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// kernelTx queues operations of one transaction on a connection.
type kernelTx struct {
	c *nftables.Conn
	t *nftables.Table
	// created: sets added in this transaction, which rules reference by
	// ID as well as by name.
	created map[string]*nftables.Set
}

func (tx *kernelTx) set(name string) *nftables.Set {
	if s, ok := tx.created[name]; ok {
		return s
	}
	return &nftables.Set{Table: tx.t, Name: name}
}

func (tx *kernelTx) setObj(d setDef) *nftables.Set {
	if s, ok := tx.created[d.name]; ok {
		return s
	}
	return nftSet(tx.t, d)
}

func nftSet(t *nftables.Table, d setDef) *nftables.Set {
	s := &nftables.Set{Table: t, Name: d.name, KeyType: keyType(d.name), Comment: d.comment}
	if s.KeyType.Name == nftables.TypeMark.Name {
		// Marks are host order: said in the set's userdata, so that nft
		// lists (and `nft -f` restores) the keys the rules compare.
		s.KeyByteOrder = binaryutil.NativeEndian
	}
	switch d.kind {
	case kindInterval:
		s.Interval = true
	case kindVerdict:
		s.IsMap, s.DataType = true, nftables.TypeVerdict
	}
	return s
}

func nftElements(els []element) []nftables.SetElement {
	out := make([]nftables.SetElement, len(els))
	for i, e := range els {
		b := e.addr.As4()
		out[i] = nftables.SetElement{Key: b[:], IntervalEnd: e.end}
		if e.chain != "" {
			out[i].VerdictData = &expr.Verdict{Kind: expr.VerdictJump, Chain: e.chain}
		}
	}
	return out
}

func (tx *kernelTx) chain(d *chainDef) *nftables.Chain {
	ch := &nftables.Chain{Name: d.name, Table: tx.t}
	if d.base != nil {
		accept := nftables.ChainPolicyAccept
		prio := nftables.ChainPriority(d.base.priority)
		ch.Type, ch.Priority, ch.Policy = d.base.typ, &prio, &accept
		switch d.base.hook {
		case "prerouting":
			ch.Hooknum = nftables.ChainHookPrerouting
		case "postrouting":
			ch.Hooknum = nftables.ChainHookPostrouting
		}
	}
	return ch
}

func (tx *kernelTx) queue(o Op) error {
	switch {
	case o.table && o.Verb == VerbAdd:
		tx.c.AddTable(tx.t)
	case o.table && o.Verb == VerbDelete:
		tx.c.DelTable(tx.t)
	case o.set != nil && o.elems == nil && o.Verb == VerbAdd:
		s := nftSet(tx.t, *o.set)
		if err := tx.c.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
		tx.created[s.Name] = s
	case o.set != nil && o.elems == nil:
		tx.c.DelSet(&nftables.Set{Table: tx.t, Name: o.set.name})
		delete(tx.created, o.set.name)
	case o.set != nil && o.Verb == VerbAdd:
		if err := tx.c.SetAddElements(tx.setObj(*o.set), nftElements(o.elems)); err != nil {
			return fmt.Errorf("add elements to set %s: %w", o.set.name, err)
		}
	case o.set != nil:
		if err := tx.c.SetDeleteElements(tx.setObj(*o.set), nftElements(o.elems)); err != nil {
			return fmt.Errorf("delete elements of set %s: %w", o.set.name, err)
		}
	case o.chain != nil && o.Verb == VerbAdd:
		tx.c.AddChain(tx.chain(o.chain))
	case o.chain != nil && o.Verb == VerbFlush:
		tx.c.FlushChain(tx.chain(o.chain))
	case o.chain != nil:
		tx.c.DelChain(tx.chain(o.chain))
	case o.rule != nil:
		tx.c.AddRule(&nftables.Rule{Table: tx.t, Chain: &nftables.Chain{Name: o.rule.chain, Table: tx.t},
			Exprs: o.rule.exprs(tx.set), UserData: o.rule.userData()})
	default:
		return fmt.Errorf("unknown operation %q", o.text(tx.t.Name))
	}
	return nil
}
