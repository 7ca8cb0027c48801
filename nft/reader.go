package nft

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// tableReader reads our table from the kernel, one object at a time. It is
// the one reader behind an Apply's read of the kernel, Verify (which reads
// one set or chain per lock hold), Dump (rules only) and egressnatctl
// ruleset (ReadTable).
type tableReader struct {
	c    *nftables.Conn
	name string
}

func (r tableReader) table() *nftables.Table {
	return &nftables.Table{Name: r.name, Family: nftables.TableFamilyIPv4}
}

func (r tableReader) exists() (bool, error) {
	tables, err := r.c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, fmt.Errorf("list tables: %w", err)
	}
	return slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == r.name }), nil
}

func (r tableReader) sets() ([]*nftables.Set, error) {
	sets, err := r.c.GetSets(r.table())
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	return sets, nil
}

// elements lists a set's elements; errNotFound when the set is gone.
// elementsOf returns the elements of the set name; nil when the table or
// the set does not exist.
func (r tableReader) elementsOf(name string) ([]nftables.SetElement, error) {
	s, err := r.set(name)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	el, err := r.elements(s)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	return el, err
}

func (r tableReader) elements(s *nftables.Set) ([]nftables.SetElement, error) {
	el, err := r.c.GetSetElements(s)
	if errors.Is(err, unix.ENOENT) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("list set %s: %w", s.Name, err)
	}
	return el, nil
}

// set reads one set by name; errNotFound when it does not exist.
func (r tableReader) set(name string) (*nftables.Set, error) {
	s, err := r.c.GetSetByName(r.table(), name)
	if errors.Is(err, unix.ENOENT) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get set %s: %w", name, err)
	}
	return s, nil
}

// chains lists the chains of our table, sorted by name.
func (r tableReader) chains() ([]*nftables.Chain, error) {
	all, err := r.c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	var out []*nftables.Chain
	for _, ch := range all {
		if ch.Table != nil && ch.Table.Name == r.name {
			out = append(out, ch)
		}
	}
	slices.SortFunc(out, func(a, b *nftables.Chain) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// rules lists a chain's rules; errNotFound when the chain is gone.
func (r tableReader) rules(ch *nftables.Chain) ([]*nftables.Rule, error) {
	rules, err := r.c.GetRules(r.table(), ch)
	if errors.Is(err, unix.ENOENT) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("list rules %s: %w", ch.Name, err)
	}
	return rules, nil
}

var errNotFound = errors.New("not found")

// all reads the whole table.
func (r tableReader) all(ctx context.Context) (*nftState, error) {
	ks := &nftState{
		sets:   map[string]*nftables.Set{},
		elems:  map[string][]nftables.SetElement{},
		chains: map[string]*nftables.Chain{},
		rules:  map[string][]*nftables.Rule{},
	}
	var err error
	if ks.exists, err = r.exists(); err != nil || !ks.exists {
		return ks, err
	}
	sets, err := r.sets()
	if err != nil {
		return nil, err
	}
	for _, s := range sets {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		el, err := r.elements(s)
		if err != nil {
			return nil, err
		}
		ks.sets[s.Name], ks.elems[s.Name] = s, el
	}
	chains, err := r.chains()
	if err != nil {
		return nil, err
	}
	for _, ch := range chains {
		rules, err := r.rules(ch)
		if err != nil {
			return nil, err
		}
		ks.chains[ch.Name], ks.rules[ch.Name] = ch, rules
	}
	return ks, nil
}

// Table is one read of a table: its chains with their rules and its sets
// with their elements, sorted by name.
type Table struct {
	Name   string
	Exists bool
	Chains []TableChain
	Sets   []TableSet
}

// TableChain is a chain and its rules, in order.
type TableChain struct {
	Chain *nftables.Chain
	Rules []*nftables.Rule
}

// TableSet is a set and its elements.
type TableSet struct {
	Set      *nftables.Set
	Elements []nftables.SetElement
}

// ReadTable reads table name (family ip) from the network namespace netNSFd
// (below 1: the current one). It needs CAP_NET_ADMIN.
func ReadTable(ctx context.Context, netNSFd int, name string) (*Table, error) {
	c, err := Config{NetNSFd: netNSFd}.nftConn()
	if err != nil {
		return nil, fmt.Errorf("nftables conn: %w", err)
	}
	ks, err := tableReader{c: c, name: name}.all(ctx)
	if err != nil {
		return nil, err
	}
	t := &Table{Name: name, Exists: ks.exists}
	for _, n := range sortedKeys(ks.chains) {
		t.Chains = append(t.Chains, TableChain{Chain: ks.chains[n], Rules: ks.rules[n]})
	}
	for _, n := range sortedKeys(ks.sets) {
		t.Sets = append(t.Sets, TableSet{Set: ks.sets[n], Elements: ks.elems[n]})
	}
	return t, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
