package nft

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/google/nftables"
)

// Verify compares the table in the kernel with the one this process last
// applied, one set or chain at a time: the dataplane's lock is held for one
// read only, so applies go on in between, and a check of thousands of sets
// delays no pod. On a difference it drops the cached table (the next Apply
// reads the kernel back and repairs it) and returns what differs; "" means
// the kernel holds what was applied, or there is nothing to compare yet.
func (d *Dataplane) Verify(ctx context.Context) (string, error) {
	c, err := d.cfg.nftConn()
	if err != nil {
		return "", fmt.Errorf("nftables conn: %w", err)
	}
	r := tableReader{c: c, name: d.cfg.Table}
	var sets []*nftables.Set
	var chains []*nftables.Chain
	drift, err := d.verifyStep(func(ks *nftState) (string, error) {
		exists, err := r.exists()
		if err != nil || !exists {
			return "table " + d.cfg.Table + " is gone", err
		}
		if sets, err = r.sets(); err != nil {
			return "", err
		}
		var names []string
		for _, s := range sets {
			names = append(names, s.Name)
			if want := ks.sets[s.Name]; want != nil && !setMatches(s, setDef{name: s.Name, kind: kindOf(want)}) {
				return "set " + s.Name + " is of another kind", nil
			}
		}
		slices.Sort(names)
		if want := slices.Sorted(maps.Keys(ks.sets)); !slices.Equal(names, want) {
			return fmt.Sprintf("sets differ: %d in the kernel, %d applied", len(names), len(want)), nil
		}
		if chains, err = r.chains(); err != nil {
			return "", err
		}
		names = nil
		for _, ch := range chains {
			names = append(names, ch.Name)
			if want, ok := ks.defs[ch.Name]; ok && !chainMatches(ch, want) {
				return "chain " + ch.Name + " has another type, hook, priority or policy", nil
			}
		}
		if want := slices.Sorted(maps.Keys(ks.chains)); !slices.Equal(names, want) {
			return fmt.Sprintf("chains differ: %v in the kernel, %v applied", names, want), nil
		}
		return "", nil
	})
	if drift != "" || err != nil {
		return drift, err
	}
	for _, s := range sets {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		drift, err := d.verifyStep(func(ks *nftState) (string, error) {
			name := s.Name
			want := ks.sets[name]
			if want == nil {
				return "", nil // removed by an apply meanwhile
			}
			el, err := r.elements(s)
			if errors.Is(err, errNotFound) {
				return "set " + name + " is gone", nil
			}
			if err != nil {
				return "", err
			}
			same := false
			switch {
			case want.IsMap:
				// Every element must be one of our jumps: an element with
				// another verdict does not decode and would go unseen.
				same = len(el) == len(ks.mapOf(name)) && maps.Equal(elemJumps(el), ks.mapOf(name))
			case want.Interval:
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
	for _, ch := range chains {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		drift, err := d.verifyStep(func(ks *nftState) (string, error) {
			if _, ok := ks.chains[ch.Name]; !ok || ks.specs == nil {
				return "", nil
			}
			rules, err := r.rules(ch)
			if errors.Is(err, errNotFound) {
				return "chain " + ch.Name + " is gone", nil
			}
			if err != nil {
				return "", err
			}
			if !rulesMatch(rules, ks.specs[ch.Name]) {
				return "rules of chain " + ch.Name + " differ", nil
			}
			return "", nil
		})
		if drift != "" || err != nil {
			return drift, err
		}
	}
	return d.verifyClasses(ctx)
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
	if d.nf.cache == nil {
		return "", nil
	}
	drift, err := check(d.nf.cache)
	if drift != "" {
		d.nf.cache = nil
	}
	return drift, err
}
