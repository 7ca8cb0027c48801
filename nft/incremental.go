package nft

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/egressnat/egressnat/selector"
)

// The incremental path. A pod event changes only the sources of some
// policies; Apply then touches only those sets and the dispatch map entries
// of the changed addresses, in one transaction, instead of planning the
// whole table (see applySources). Everything else takes the full path.

// shapeOf copies what the incremental path compares of a state: all but the
// policies' sources and the local pods, whose content the cache holds
// (nftState.sources).
func shapeOf(st selector.NodeState) *selector.NodeState {
	out := &selector.NodeState{
		Policies:    make([]selector.PolicyState, len(st.Policies)),
		FloatingIPs: slices.Clone(st.FloatingIPs),
		Muted:       slices.Clone(st.Muted),
		Excluded:    slices.Clone(st.Excluded),

		ClusterFloatingIPs: slices.Clone(st.ClusterFloatingIPs),
		PodNetworks:        slices.Clone(st.PodNetworks),
		ReturnRoutes:       slices.Clone(st.ReturnRoutes),
	}
	for i, p := range st.Policies {
		p.Sources = nil
		p.Destinations = slices.Clone(p.Destinations)
		p.Written = slices.Clone(p.Written)
		out.Policies[i] = p
	}
	return out
}

// sameShape reports whether st differs from the applied shape at most in
// its policies' sources and its local pods (a change of Muted, say, takes
// the full path: it changes the arp table and the announcements).
func sameShape(applied *selector.NodeState, st selector.NodeState) bool {
	if len(applied.Policies) != len(st.Policies) ||
		!slices.Equal(applied.PodNetworks, st.PodNetworks) || !slices.Equal(applied.ReturnRoutes, st.ReturnRoutes) ||
		!slices.Equal(applied.FloatingIPs, st.FloatingIPs) || !slices.Equal(applied.Muted, st.Muted) ||
		!slices.Equal(applied.Excluded, st.Excluded) || !slices.Equal(applied.ClusterFloatingIPs, st.ClusterFloatingIPs) {
		return false
	}
	for i, p := range st.Policies {
		a := applied.Policies[i]
		if a.Name != p.Name || a.Mode != p.Mode || a.EgressIP != p.EgressIP || a.NextHop != p.NextHop ||
			!slices.Equal(a.Destinations, p.Destinations) || !slices.Equal(a.Written, p.Written) || !a.Created.Equal(p.Created) {
			return false
		}
	}
	return true
}

// normalizeSources returns a copy of a policy's sources, sorted, without
// duplicates, as IPv4 addresses. The copy is the dataplane's own: the
// cache keeps it whatever the caller does with the state later.
func normalizeSources(p selector.PolicyState) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(p.Sources))
	sorted := true
	for i, a := range p.Sources {
		a = a.Unmap()
		if !a.Is4() {
			return nil, fmt.Errorf("policy %q: source %s is not ipv4", p.Name, a)
		}
		if i > 0 && out[i-1].Compare(a) >= 0 {
			sorted = false
		}
		out = append(out, a)
	}
	if sorted {
		return out, nil
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}

// applySources applies st through the incremental path when the cached
// table was written by this process from a state of the same shape. It
// reports whether it handled st; when not, the caller takes the full path.
// On an error the cache is dropped, so the full path reads the kernel.
func (d *Dataplane) applySources(ctx context.Context, st selector.NodeState, res *Result) (bool, error) {
	ks := d.nf.cache
	if ks == nil || ks.state == nil || ks.sources == nil || !sameShape(ks.state, st) {
		return false, nil
	}
	type change struct {
		policy         selector.PolicyState
		set            string
		now            []netip.Addr
		added, removed []netip.Addr
	}
	var changes []change
	for _, p := range st.Policies {
		name := srcSetName(p.Name)
		have, ok := ks.sources[name]
		if !ok {
			return false, nil
		}
		if slices.Equal(have, p.Sources) {
			continue
		}
		now, err := normalizeSources(p)
		if err != nil {
			return true, fmt.Errorf("invalid state: %w", err)
		}
		added, removed := diffAddrs(have, now)
		if len(added)+len(removed) > 0 {
			changes = append(changes, change{policy: p, set: name, now: now, added: added, removed: removed})
		}
	}
	// The known pods: a set like a policy's sources, read by one rule,
	// with no dispatch entry and no conntrack to clean (a held packet's
	// flow was never confirmed).
	var known, local *change
	if d.cls != nil {
		// The eBPF mode: the known pods are in the classifier's map, the
		// known-pods set stays empty.
		if _, ok := ks.sources[setKnown]; !ok || d.cls.podJumps == nil {
			return false, nil
		}
		if !slices.Equal(d.cls.local, st.LocalPods) {
			now, err := knownPods(st)
			if err != nil {
				return true, fmt.Errorf("invalid state: %w", err)
			}
			if added, removed := diffAddrs(d.cls.local, now); len(added)+len(removed) > 0 {
				local = &change{now: now, added: added, removed: removed}
			}
		}
	} else if have, ok := ks.sources[setKnown]; ok && !slices.Equal(have, st.LocalPods) {
		now, err := knownPods(st)
		if err != nil {
			return true, fmt.Errorf("invalid state: %w", err)
		}
		if added, removed := diffAddrs(have, now); len(added)+len(removed) > 0 {
			known = &change{set: setKnown, now: now, added: added, removed: removed}
		}
	} else if !ok {
		return false, nil
	}
	total := 0
	for _, c := range changes {
		total += len(c.added) + len(c.removed)
	}
	if known != nil {
		total += len(known.added) + len(known.removed)
	}
	if local != nil {
		total += len(local.added) + len(local.removed)
	}
	if total > maxBatchElements/2 {
		// More than a transaction: the full path orders big changes
		// (sets filled before rules read them, map entries moved in place).
		return false, nil
	}
	if len(changes) == 0 && known == nil && local == nil {
		res.Incremental = true
		return true, nil
	}

	// The dispatch map: the new target of every address whose membership
	// in a policy changed (a Gateway policy's too: it can make a local
	// address shared).
	affected := map[netip.Addr]bool{}
	for _, c := range changes {
		for _, a := range slices.Concat(c.added, c.removed) {
			affected[a] = true
		}
	}
	fresh := make(map[string][]netip.Addr, len(changes))
	for _, c := range changes {
		fresh[c.set] = c.now
	}
	old := func(p selector.PolicyState) []netip.Addr { return ks.sources[srcSetName(p.Name)] }
	now := func(p selector.PolicyState) []netip.Addr {
		if a, ok := fresh[srcSetName(p.Name)]; ok {
			return a
		}
		return old(p)
	}
	jumps := ks.jumpMap()
	if d.cls != nil {
		jumps = d.cls.podJumps
	}
	target := func(a netip.Addr) string {
		own, n, local := "", 0, false
		for _, p := range st.Policies {
			if _, in := slices.BinarySearchFunc(now(p), a, netip.Addr.Compare); in {
				n++
				if p.Mode != selector.ModeGateway {
					local, own = true, policyChainName(p.Name)
				}
			}
		}
		switch {
		case !local:
			return ""
		case n > 1:
			return chainMulti
		}
		return own
	}
	if len(affected) > 64 { // one pass over every policy beats a search per address
		all := preSrcTargets(selector.NodeState{Policies: withSources(st.Policies, now)})
		target = func(a netip.Addr) string { return all[a] }
	}
	mapHave, mapWant := map[netip.Addr]string{}, map[netip.Addr]string{}
	sharingMayChange := false
	for a := range affected {
		if old, ok := jumps[a]; ok {
			mapHave[a] = old
		}
		if want := target(a); want != "" {
			mapWant[a] = want
		}
		sharingMayChange = sharingMayChange || mapHave[a] == chainMulti || mapWant[a] == chainMulti
	}
	if sharingMayChange {
		// chainMulti holds the rules of the policies that share a source:
		// when they change, the chain is rebuilt on the full path.
		newJumps := maps.Clone(jumps)
		for a := range affected {
			delete(newJumps, a)
		}
		maps.Copy(newJumps, mapWant)
		before := sharingPolicies(selector.NodeState{Policies: withSources(st.Policies, old)}, jumps)
		after := sharingPolicies(selector.NodeState{Policies: withSources(st.Policies, now)}, newJumps)
		if !maps.Equal(before, after) {
			return false, nil
		}
	}
	res.Incremental = true
	sets := changes
	if known != nil {
		sets = append(slices.Clip(changes), *known)
		fresh[setKnown] = known.now
	}

	// Additions, the map, then removals: usually one transaction (the
	// change is at most half a batch), and additions first in any case.
	var adds, dels []step
	for _, c := range sets {
		if ks.sets[c.set] == nil {
			d.nf.cache = nil
			return false, nil
		}
		def := setDef{name: c.set}
		adds = append(adds, elemSteps(def, addrElements(c.added), false)...)
		dels = append(dels, elemSteps(def, addrElements(c.removed), true)...)
		res.ElementsAdded += len(c.added)
		res.ElementsDeleted += len(c.removed)
	}
	nftHave, nftWant := mapHave, mapWant
	var cls *classPlan
	var gone []netip.Addr // eBPF mode: pods out of the classifier's map
	if d.cls != nil {
		localNow, localTouched := d.cls.local, []netip.Addr(nil)
		if local != nil {
			localNow, localTouched = local.now, slices.Concat(local.added, local.removed)
		}
		var touched []netip.Addr
		cls, gone, touched = d.cls.incremental(jumps, affected, mapWant, localNow, localTouched)
		nftHave, nftWant = map[netip.Addr]string{}, cls.jumps
		for _, a := range touched {
			if ch, ok := ks.jumpMap()[a]; ok {
				nftHave[a] = ch
			}
		}
	}
	msteps, added, deleted := mapSteps(setDef{name: setPreSrc, kind: kindVerdict}, nftHave, nftWant)
	if ks.sets[setPreSrc] == nil && len(msteps) > 0 {
		d.nf.cache = nil
		return false, nil
	}
	res.ElementsAdded += added
	res.ElementsDeleted += deleted

	d.nf.cache = nil // until the transaction succeeded
	if cls == nil {
		n, err := d.nf.exec.run(ctx, &Plan{table: d.cfg.Table, steps: slices.Concat(adds, msteps, dels)})
		res.Transactions = n
		if err != nil {
			return true, err
		}
	} else {
		// The eBPF mode: additions, the classifier's map, then removals.
		// mapSteps put the pre-src removals last: they go after the map.
		var mdels []step
		msteps, mdels = splitMapSteps(nftHave, nftWant)
		n, err := d.nf.exec.run(ctx, &Plan{table: d.cfg.Table, steps: slices.Concat(adds, msteps)})
		res.Transactions = n
		if err != nil {
			return true, err
		}
		if res.ClassesWritten, res.ClassesDeleted, err = d.cls.update(cls.entries, gone); err != nil {
			return true, err
		}
		if steps := slices.Concat(dels, mdels); len(steps) > 0 {
			n, err = d.nf.exec.run(ctx, &Plan{table: d.cfg.Table, steps: steps})
			res.Transactions += n
			if err != nil {
				return true, err
			}
		}
		pre := ks.jumpMap()
		for a := range nftHave {
			delete(pre, a)
		}
		maps.Copy(pre, nftWant)
		if local != nil {
			d.cls.local = local.now
		}
	}
	for set, a := range fresh {
		ks.sources[set] = a
	}
	for a := range affected {
		delete(jumps, a)
	}
	maps.Copy(jumps, mapWant)
	d.nf.cache = ks // ks.state stays: the shape is the same

	// Conntrack: flows of the added and removed addresses to the policy's
	// destinations were decided by the old rules.
	ct := &ctMatcher{}
	for _, c := range changes {
		dests := newSpanSet(mergeOverlaps(prefixRanges(c.policy.Destinations)))
		for _, a := range slices.Concat(c.added, c.removed) {
			ct.addSource(a, dests)
		}
		d.log.Info("policy sources changed", zap.String("policy", c.policy.Name),
			zap.Int("added", len(c.added)), zap.Int("removed", len(c.removed)))
	}
	var err error
	res.ConntrackDeleted, err = d.ct.flush(ctx, ct)
	return true, err
}

// withSources returns policies with the sources given by now.
func withSources(ps []selector.PolicyState, now func(selector.PolicyState) []netip.Addr) []selector.PolicyState {
	out := make([]selector.PolicyState, len(ps))
	for i, p := range ps {
		p.Sources = now(p)
		out[i] = p
	}
	return out
}

// splitMapSteps is mapSteps with the removals apart: the steps that add
// and retarget elements of the pre-src map, and the ones that delete the
// addresses want no longer has.
func splitMapSteps(have, want map[netip.Addr]string) (upd, gone []step) {
	kept := map[netip.Addr]string{}
	var out []netip.Addr
	for a, ch := range have {
		if _, ok := want[a]; ok {
			kept[a] = ch
		} else {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	def := setDef{name: setPreSrc, kind: kindVerdict}
	upd, _, _ = mapSteps(def, kept, want)
	return upd, elemSteps(def, addrElements(out), true)
}
