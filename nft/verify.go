package nft

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Verify compares the table in the kernel with the one this process last
// applied, one set or chain at a time: the dataplane's lock is held for one
// read only, so applies go on in between, and a check of thousands of sets
// delays no pod. On a difference it drops the cached table (the next Apply
// reads the kernel back and repairs it) and returns what differs; "" means
// the kernel holds what was applied, or there is nothing to compare yet.
func (d *Dataplane) Verify(ctx context.Context) (string, error) {
	c, err := d.nftConn()
	if err != nil {
		return "", fmt.Errorf("nftables conn: %w", err)
	}
	var sets, chains []string
	drift, err := d.verifyStep(func(ks *nftState) (string, error) {
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
		if err != nil {
			return "", fmt.Errorf("list tables: %w", err)
		}
		if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == d.cfg.Table }) {
			return "table " + d.cfg.Table + " is gone", nil
		}
		have, err := c.GetSets(d.table())
		if err != nil {
			return "", fmt.Errorf("list sets: %w", err)
		}
		for _, s := range have {
			sets = append(sets, s.Name)
			if want := ks.sets[s.Name]; want != nil && !setMatches(s, setSpec{name: s.Name, interval: want.Interval, verdictMap: want.IsMap}) {
				return "set " + s.Name + " is of another kind", nil
			}
		}
		slices.Sort(sets)
		if want := slices.Sorted(maps.Keys(ks.sets)); !slices.Equal(sets, want) {
			return fmt.Sprintf("sets differ: %d in the kernel, %d applied", len(sets), len(want)), nil
		}
		all, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
		if err != nil {
			return "", fmt.Errorf("list chains: %w", err)
		}
		for _, ch := range all {
			if ch.Table != nil && ch.Table.Name == d.cfg.Table {
				chains = append(chains, ch.Name)
				if want := ks.chains[ch.Name]; want != nil && !chainMatches(ch, want) {
					return "chain " + ch.Name + " has another type, hook, priority or policy", nil
				}
			}
		}
		slices.Sort(chains)
		if want := slices.Sorted(maps.Keys(ks.chains)); !slices.Equal(chains, want) {
			return fmt.Sprintf("chains differ: %v in the kernel, %v applied", chains, want), nil
		}
		return "", nil
	})
	if drift != "" || err != nil {
		return drift, err
	}
	for _, name := range sets {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		drift, err := d.verifyStep(func(ks *nftState) (string, error) {
			s := ks.sets[name]
			if s == nil {
				return "", nil // removed by an apply meanwhile
			}
			el, err := c.GetSetElements(s)
			if errors.Is(err, unix.ENOENT) {
				return "set " + name + " is gone", nil
			}
			if err != nil {
				return "", fmt.Errorf("list set %s: %w", name, err)
			}
			same := false
			switch {
			case s.IsMap:
				// Every element must be one of our jumps: an element with
				// another verdict does not decode and would go unseen.
				same = len(el) == len(ks.jumpMap()) && maps.Equal(elemJumps(el), ks.jumpMap())
			case s.Interval:
				same = slices.Equal(elemRanges(el), elemRanges(ks.elems[name]))
			case name == setFloating:
				same = slices.Equal(elemAddrs(el), elemAddrs(ks.elems[name]))
			default:
				same = slices.Equal(elemAddrs(el), ks.srcAddrs(name))
			}
			if !same {
				return "elements of set " + name + " differ", nil
			}
			return "", nil
		})
		if drift != "" || err != nil {
			return drift, err
		}
	}
	for _, name := range chains {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		drift, err := d.verifyStep(func(ks *nftState) (string, error) {
			ch := ks.chains[name]
			if ch == nil || ks.specs == nil {
				return "", nil
			}
			rules, err := c.GetRules(d.table(), ch)
			if errors.Is(err, unix.ENOENT) {
				return "chain " + name + " is gone", nil
			}
			if err != nil {
				return "", fmt.Errorf("list rules %s: %w", name, err)
			}
			if !rulesMatch(rules, ks.specs[name]) {
				return "rules of chain " + name + " differ", nil
			}
			return "", nil
		})
		if drift != "" || err != nil {
			return drift, err
		}
	}
	return "", nil
}

// verifyStep runs one check of Verify against the cached table, under the
// lock. Without a cached table there is nothing to check (the next Apply
// reads the kernel anyway). On a difference the cache is dropped.
func (d *Dataplane) verifyStep(check func(ks *nftState) (string, error)) (string, error) {
	if d.cfg.VerifyPause > 0 {
		time.Sleep(d.cfg.VerifyPause)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.nftCache == nil {
		return "", nil
	}
	drift, err := check(d.nftCache)
	if drift != "" {
		d.nftCache = nil
	}
	return drift, err
}
