package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// The nftables plan is a value: a list of steps, each a list of operations
// (a verb and the object it acts on). A step's operations always share one
// transaction; consecutive steps share one as long as the batch bounds
// allow (see kernelExec). A plan prints as `nft -f` input, which is how
// tests compare plans, and a fake executor (fake_test.go) applies it to an
// in-memory table with the kernel's all-or-nothing semantics.

// Verb is what an operation does to its object.
type Verb string

const (
	VerbAdd    Verb = "add"
	VerbDelete Verb = "delete"
	// VerbFlush empties a chain of its rules.
	VerbFlush Verb = "flush"
)

// setKind is the kind of one of our sets.
type setKind int

const (
	kindAddrs    setKind = iota // type ipv4_addr
	kindInterval                // type ipv4_addr; flags interval
	kindVerdict                 // type ipv4_addr : verdict (a verdict map)
)

// setDef is one set of our table.
type setDef struct {
	name    string
	kind    setKind
	comment string
}

// chainDef is one chain of our table; a base chain has a hook.
type chainDef struct {
	name string
	base *baseChain
}

type baseChain struct {
	typ      nftables.ChainType
	hook     string // "prerouting", "postrouting"
	priority int32
}

// element is one element of a set: an address, an interval end, or an
// address with the chain a verdict map jumps to.
type element struct {
	addr  netip.Addr
	end   bool   // interval end (the first address after the interval)
	chain string // verdict maps: jump target ("" in deletes)
}

// Op is one operation of a plan. Exactly one of its objects is set.
type Op struct {
	Verb  Verb
	table bool
	set   *setDef
	chain *chainDef
	// elems: elements of set (one netlink message).
	elems []element
	rule  *rule
}

// step is a group of operations that must share a transaction.
type step struct {
	ops   []Op
	elems int // set elements carried
	bytes int // estimated message bytes
	msgs  int // netlink messages
}

// Plan is the ordered list of steps for one change of the table.
type Plan struct {
	table string
	steps []step
}

func (p *Plan) add(s ...step) { p.steps = append(p.steps, s...) }

// ops returns every operation, in order.
func (p *Plan) ops() []Op {
	var out []Op
	for _, s := range p.steps {
		out = append(out, s.ops...)
	}
	return out
}

// Empty reports whether the plan changes nothing.
func (p *Plan) Empty() bool { return len(p.steps) == 0 }

// String prints the plan as `nft -f` input, one operation a line.
func (p *Plan) String() string {
	var b strings.Builder
	for _, o := range p.ops() {
		b.WriteString(o.text(p.table))
		b.WriteByte('\n')
	}
	return b.String()
}

// text prints one operation in nft syntax.
func (o Op) text(table string) string {
	t := "ip " + table
	switch {
	case o.table:
		return fmt.Sprintf("%s table %s", o.Verb, t)
	case o.set != nil && o.elems == nil:
		if o.Verb != VerbAdd {
			return fmt.Sprintf("%s set %s %s", o.Verb, t, o.set.name)
		}
		return fmt.Sprintf("add set %s %s { %s }", t, o.set.name, o.set.spec())
	case o.set != nil:
		return fmt.Sprintf("%s element %s %s { %s }", o.Verb, t, o.set.name, elemText(o.set.kind, o.elems))
	case o.chain != nil:
		if o.Verb == VerbAdd && o.chain.base != nil {
			bc := o.chain.base
			return fmt.Sprintf("add chain %s %s { type %s hook %s priority %d; policy accept; }", t, o.chain.name, bc.typ, bc.hook, bc.priority)
		}
		return fmt.Sprintf("%s chain %s %s", o.Verb, t, o.chain.name)
	case o.rule != nil:
		return fmt.Sprintf("add rule %s %s %s", t, o.rule.chain, o.rule.String())
	}
	return "# empty operation"
}

func (s setDef) spec() string {
	var out string
	switch s.kind {
	case kindInterval:
		out = "type ipv4_addr; flags interval;"
	case kindVerdict:
		out = "type ipv4_addr : verdict;"
	default:
		out = "type ipv4_addr;"
	}
	if s.comment != "" {
		out += fmt.Sprintf(" comment %q;", s.comment)
	}
	return out
}

// elemText prints elements as nft does: addresses, intervals as first-last,
// map entries as address : jump chain.
func elemText(kind setKind, els []element) string {
	var parts []string
	switch kind {
	case kindInterval:
		var open *netip.Addr
		for _, e := range els {
			switch {
			case !e.end && open == nil:
				a := e.addr
				open = &a
			case !e.end:
				parts = append(parts, open.String())
				a := e.addr
				open = &a
			case open != nil:
				parts = append(parts, open.String()+"-"+e.addr.Prev().String())
				open = nil
			default:
				parts = append(parts, "end "+e.addr.String())
			}
		}
		if open != nil {
			parts = append(parts, open.String()+"-"+maxIPv4.String())
		}
	case kindVerdict:
		for _, e := range els {
			if e.chain == "" {
				parts = append(parts, e.addr.String())
			} else {
				parts = append(parts, e.addr.String()+" : jump "+e.chain)
			}
		}
	default:
		for _, e := range els {
			parts = append(parts, e.addr.String())
		}
	}
	return strings.Join(parts, ", ")
}

// Building steps.

func tableStep() step {
	return step{ops: []Op{{Verb: VerbAdd, table: true}}, bytes: bytesSetOrObj, msgs: 1}
}

func addSetStep(s setDef) step {
	return step{ops: []Op{{Verb: VerbAdd, set: &s}}, bytes: bytesSetOrObj, msgs: 1}
}

func delSetStep(s setDef) step {
	return step{ops: []Op{{Verb: VerbDelete, set: &s}}, bytes: bytesSetOrObj, msgs: 1}
}

// elemSteps splits elements into messages of at most maxMsgElements, one
// step each.
func elemSteps(s setDef, els []element, del bool) []step {
	verb := VerbAdd
	if del {
		verb = VerbDelete
	}
	var out []step
	for len(els) > 0 {
		n := min(len(els), maxMsgElements)
		chunk := els[:n:n]
		els = els[n:]
		b := bytesMsg
		for _, e := range chunk {
			if e.end {
				b += bytesEndElem
			} else {
				b += bytesElem
			}
		}
		sd := s
		out = append(out, step{ops: []Op{{Verb: verb, set: &sd, elems: chunk}}, elems: n, bytes: b, msgs: 1})
	}
	return out
}

// join makes one step of several, so that they share a transaction.
func join(steps ...step) step {
	var out step
	for _, s := range steps {
		out.ops = append(out.ops, s.ops...)
		out.elems += s.elems
		out.bytes += s.bytes
		out.msgs += s.msgs
	}
	return out
}

// Element encodings.

func addrElements(addrs []netip.Addr) []element {
	out := make([]element, len(addrs))
	for i, a := range addrs {
		out[i] = element{addr: a}
	}
	return out
}

func rangeElements(rs []ipRange) []element {
	var out []element
	for _, r := range rs {
		out = append(out, r.elements()...)
	}
	return out
}

func (r ipRange) elements() []element {
	out := []element{{addr: r.start}}
	if !r.open {
		out = append(out, element{addr: r.end, end: true})
	}
	return out
}

func (r ipRange) elementsForDelete() []element {
	if !r.open && r.start == r.end { // lone end element
		return []element{{addr: r.end, end: true}}
	}
	return r.elements()
}

// jumpElements are the elements of the dispatch map, sorted by address.
func jumpElements(targets map[netip.Addr]string) []element {
	out := make([]element, 0, len(targets))
	for a, chain := range targets {
		out = append(out, element{addr: a, chain: chain})
	}
	slices.SortFunc(out, func(x, y element) int { return x.addr.Compare(y.addr) })
	return out
}
