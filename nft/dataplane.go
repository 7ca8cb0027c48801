package nft

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/egressnat/egressnat/selector"
)

// Dataplane programs one node's kernel. It is split by kernel object, each
// with one owner: netfilter (the table: sets, maps, chains, rules),
// routing (marks, ip rules, route tables, gateway sysctls), addresses
// (floating IPs on the uplink and their gratuitous ARP) and conntrack; Apply
// only orders them. Its methods are safe for concurrent use; calls are
// serialized.
type Dataplane struct {
	cfg  Config
	log  *zap.Logger
	nf   *netfilter
	rt   routing
	addr *addresses
	ct   conntrackCleaner
	arp  *arpLease // own lock: see KeepARP

	mu   sync.Mutex
	last Result
	// recheck: the next Apply takes the full path (routes, addresses,
	// sysctls, the table planned against the cache) even when only
	// sources changed.
	recheck bool
	// applied: an Apply of this Dataplane succeeded (see conntrackMatcher).
	applied bool
	// muted and foreign: Result.Muted and Result.Foreign of the last full
	// Apply, which an incremental one (same shape, so the same floating
	// and muted IPs; the uplink's addresses are read by full Applies only)
	// reports again.
	muted, foreign []netip.Addr
	// cls: the eBPF classifier's part (Config.Classifier); nil in the
	// nftables mode.
	cls *classState

	wg        sync.WaitGroup
	done      chan struct{}
	closeOnce sync.Once
}

// Result tells what one Apply or Cleanup changed.
type Result struct {
	Transactions    int // nftables transactions (Flush calls)
	ElementsAdded   int
	ElementsDeleted int
	SetsCreated     int
	SetsDeleted     int
	// SetsSwapped: source sets changed by more than a batch, through a
	// filled copy the rules switch to and back in one transaction each.
	SetsSwapped      int
	ChainsRebuilt    []string
	RoutesChanged    int
	IPRulesChanged   int
	AddrsAdded       int
	AddrsDeleted     int
	SysctlsChanged   int
	Announced        []netip.Addr // floating IPs gratuitous ARP was sent for
	ConntrackDeleted int
	// Unroutable: Reroute policies whose next hop got no mark (more next
	// hops than the mark mask holds): they drop their traffic on this node.
	Unroutable []string
	// Foreign: floating IPs of the cluster (wanted here or not) found on
	// the uplink that egressnat did not put there (no label, no record):
	// never managed, reported.
	Foreign []netip.Addr
	// Probed: floating IPs that were not on the uplink, ARP-probed before
	// being added (see Config.ARPProbeWait), and ProbeWait how long the
	// probe window lasted (all of them share one).
	Probed    []netip.Addr
	ProbeWait time.Duration
	// Conflicts: probed floating IPs another host answered for. They are
	// not added, and the Gateway policies that SNAT to them drop their
	// traffic on this node (fail closed) until an Apply finds them free:
	// after an Apply with conflicts the next one takes the full path and
	// probes again.
	Conflicts []netip.Addr
	// Muted: the muted floating IPs (NodeState.Muted) on the uplink after
	// this Apply, sorted: held (recorded, their SNAT rules as the policies
	// say) but neither answered for by ARP nor announced. A muted IP
	// another host answered for is in Conflicts instead (not taken), one
	// something else put on the uplink in Foreign. On the new holder of a
	// planned handover they are the IPs prepared; the old holder lists
	// the ones it keeps silent. An incremental Apply reports the last
	// full one's (the same state shape: the same floating and muted IPs).
	Muted []netip.Addr
	// Unmuted: floating IPs the previous Apply of this Dataplane muted
	// that this one holds unmuted (the switch of a handover): they got a
	// full ARP lease at once and were announced anew (Announced), without
	// an ARP probe (they were on the uplink already).
	Unmuted []netip.Addr
	// Marks is the mark value used for each next hop (full path only).
	Marks map[netip.Addr]uint32
	// ClassesWritten and ClassesDeleted: entries of the eBPF classifier's
	// map written and deleted (Config.Classifier).
	ClassesWritten, ClassesDeleted int
	// Incremental: only policies' sources changed, and only their elements
	// and dispatch map entries were touched (see applySources).
	Incremental bool
}

// Changed reports whether the kernel state was modified (gratuitous ARP and
// conntrack deletions aside).
func (r Result) Changed() bool {
	return r.Transactions > 0 || r.RoutesChanged > 0 || r.IPRulesChanged > 0 ||
		r.AddrsAdded > 0 || r.AddrsDeleted > 0 || r.SysctlsChanged > 0
}

// New returns a Dataplane. It does not touch the kernel.
func New(cfg Config) (*Dataplane, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	d := &Dataplane{cfg: cfg, log: cfg.Logger, done: make(chan struct{})}
	d.nf = &netfilter{cfg: cfg, exec: kernelExec{conn: cfg.nftConn}, read: func(ctx context.Context) (*nftState, error) {
		c, err := cfg.nftConn()
		if err != nil {
			return nil, fmt.Errorf("nftables conn: %w", err)
		}
		return tableReader{c: c, name: cfg.Table}.all(ctx)
	}}
	d.rt = routing{cfg: cfg, log: cfg.Logger}
	d.addr = &addresses{cfg: cfg, log: cfg.Logger, announced: map[netip.Addr]bool{}, wg: &d.wg, done: d.done}
	d.ct = conntrackCleaner{cfg: cfg}
	d.arp = &arpLease{cfg: cfg, log: cfg.Logger}
	d.addr.leaseFresh = d.arp.fresh
	if cfg.Classifier != nil {
		d.cls = &classState{pc: cfg.Classifier, mask: cfg.ClassMask}
	}
	return d, nil
}

// Close stops background gratuitous ARP and waits for it. It leaves the
// kernel state in place (see Cleanup).
func (d *Dataplane) Close() error {
	d.closeOnce.Do(func() { close(d.done) })
	d.wg.Wait()
	d.arp.close()
	return nil
}

// LastResult returns what the last Apply or Cleanup changed.
func (d *Dataplane) LastResult() Result {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.last
}

// normalized is a validated copy of the state with sorted, IPv4-only
// contents.
type normalized struct {
	state    selector.NodeState
	sources  map[string][]netip.Addr
	dests    map[string][]ipRange
	floating []netip.Prefix
	// muted: the IPs of floating that are muted (see mutedOf).
	muted []netip.Addr
}

func normalizeState(st selector.NodeState) (*normalized, error) {
	n := &normalized{sources: map[string][]netip.Addr{}, dests: map[string][]ipRange{}}
	seen := map[string]string{}
	for _, p := range st.Policies {
		if p.Name == "" {
			return nil, errors.New("policy without name")
		}
		key := srcSetName(p.Name)
		if other, dup := seen[key]; dup {
			return nil, fmt.Errorf("policy %q: set name clashes with policy %q", p.Name, other)
		}
		seen[key] = p.Name
		switch p.Mode {
		case selector.ModeReroute:
			if !p.NextHop.Is4() || p.NextHop.IsUnspecified() {
				return nil, fmt.Errorf("policy %q: invalid next hop %s", p.Name, p.NextHop)
			}
		case selector.ModeGateway:
			if !p.EgressIP.Is4() || p.EgressIP.IsUnspecified() {
				return nil, fmt.Errorf("policy %q: invalid egress ip %s", p.Name, p.EgressIP)
			}
		case selector.ModeDrop:
		default:
			return nil, fmt.Errorf("policy %q: unknown mode %q", p.Name, p.Mode)
		}
		srcs, err := normalizeSources(p)
		if err != nil {
			return nil, err
		}
		n.sources[key] = srcs
		var dsts []netip.Prefix
		for _, d := range p.Destinations {
			if !d.IsValid() || !d.Addr().Unmap().Is4() {
				return nil, fmt.Errorf("policy %q: destination %s is not ipv4", p.Name, d)
			}
			dsts = append(dsts, netip.PrefixFrom(d.Addr().Unmap(), d.Bits()))
		}
		n.dests[dstSetName(p.Name)] = mergeOverlaps(prefixRanges(dsts))
	}
	excluded, err := ipv4Only("excluded destination", st.Excluded)
	if err != nil {
		return nil, err
	}
	n.dests[setInternal] = mergeOverlaps(prefixRanges(excluded))
	var held []ipRange
	for _, p := range st.Policies {
		held = append(held, n.dests[dstSetName(p.Name)]...)
	}
	slices.SortFunc(held, compareRange)
	n.dests[setHeldDests] = mergeOverlaps(held)
	podNets, err := ipv4Only("pod network", st.PodNetworks)
	if err != nil {
		return nil, err
	}
	n.dests[setPodNets] = mergeOverlaps(prefixRanges(podNets))
	if n.sources[setKnown], err = knownPods(st); err != nil {
		return nil, err
	}
	for _, f := range st.FloatingIPs {
		if !f.IsValid() || !f.Addr().Unmap().Is4() {
			return nil, fmt.Errorf("floating ip %s is not ipv4", f)
		}
		n.floating = append(n.floating, netip.PrefixFrom(f.Addr().Unmap(), f.Bits()))
	}
	slices.SortFunc(n.floating, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	n.floating = slices.CompactFunc(n.floating, func(a, b netip.Prefix) bool { return a.Addr() == b.Addr() })
	if n.muted, err = mutedOf(st.Muted, n.floating); err != nil {
		return nil, err
	}
	n.state = st
	return n, nil
}

// mutedOf returns the muted IPs (NodeState.Muted) that are floating IPs of
// floating (sorted by address), unmapped, sorted, without duplicates: a
// muted IP this node does not hold means nothing and is left out.
func mutedOf(muted []netip.Addr, floating []netip.Prefix) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, a := range muted {
		if a = a.Unmap(); !a.Is4() {
			return nil, fmt.Errorf("muted ip %s is not ipv4", a)
		}
		if _, held := slices.BinarySearchFunc(floating, a, func(p netip.Prefix, a netip.Addr) int { return p.Addr().Compare(a) }); held {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}

// knownPods returns the content of the known-pods set: st.LocalPods
// normalized as a policy's sources are.
func knownPods(st selector.NodeState) ([]netip.Addr, error) {
	return normalizeSources(selector.PolicyState{Name: "known pods", Sources: st.LocalPods})
}

// ipv4Only returns ps unmapped, or an error naming what (a non-IPv4 prefix).
func ipv4Only(what string, ps []netip.Prefix) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ps))
	for _, e := range ps {
		if !e.IsValid() || !e.Addr().Unmap().Is4() {
			return nil, fmt.Errorf("%s %s is not ipv4", what, e)
		}
		out = append(out, netip.PrefixFrom(e.Addr().Unmap(), e.Bits()))
	}
	return out, nil
}

// mergeOverlaps joins overlapping ranges (interval sets reject overlaps);
// adjacent ranges stay separate, as nft keeps them.
func mergeOverlaps(rs []ipRange) []ipRange {
	var out []ipRange
	for _, r := range rs {
		if n := len(out); n > 0 && r.start.Compare(out[n-1].last()) <= 0 {
			if out[n-1].open {
				continue
			}
			if r.open || r.end.Compare(out[n-1].end) > 0 {
				out[n-1].end, out[n-1].open = r.end, r.open
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// Apply makes the kernel match st. It is idempotent: an unchanged state
// changes nothing. New state is added before old state is removed; conntrack
// entries are deleted only after everything else succeeded.
func (d *Dataplane) Apply(ctx context.Context, st selector.NodeState) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	res := Result{}
	cached := d.nf.cache != nil
	handled := false
	var err error
	if !d.recheck {
		handled, err = d.applySources(ctx, st, &res)
		if handled {
			res.Muted = slices.Clone(d.muted) // same shape: the last full Apply's
			res.Foreign = slices.Clone(d.foreign)
		}
	}
	if !handled {
		err = d.apply(ctx, st, &res)
	}
	if err != nil && cached && ctx.Err() == nil {
		// The table changed behind our back (another process, an admin):
		// read it back and try once more.
		d.log.Warn("apply from the cached table failed; reading the kernel back", zap.Error(err))
		res = Result{}
		err = d.apply(ctx, st, &res)
	}
	d.last = res
	if err != nil {
		// Whatever failed (a route, a sysctl, conntrack) is done again by
		// the next Apply, even when its state has the same shape.
		d.recheck = true
		return err
	}
	if !handled {
		d.recheck = false
	}
	if len(res.Conflicts) > 0 {
		d.recheck = true // probe again next time
	}
	if res.Changed() || res.ConntrackDeleted > 0 {
		d.log.Info("applied",
			zap.Int("policies", len(st.Policies)),
			zap.Int("transactions", res.Transactions),
			zap.Int("elementsAdded", res.ElementsAdded),
			zap.Int("elementsDeleted", res.ElementsDeleted),
			zap.Strings("chainsRebuilt", res.ChainsRebuilt),
			zap.Int("routesChanged", res.RoutesChanged),
			zap.Int("ipRulesChanged", res.IPRulesChanged),
			zap.Int("conntrackDeleted", res.ConntrackDeleted))
	}
	return nil
}

// apply is the full path: it orders the owners' changes.
func (d *Dataplane) apply(ctx context.Context, st selector.NodeState, res *Result) error {
	n, err := normalizeState(st)
	if err != nil {
		return fmt.Errorf("invalid state: %w", err)
	}
	h, err := d.cfg.netlinkHandle()
	if err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	link, err := h.LinkByName(d.cfg.Uplink)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", d.cfg.Uplink, err)
	}
	uplinkIndex := link.Attrs().Index
	addrs, err := uplinkAddrs(h, link)
	if err != nil {
		return err
	}
	// ARP probes for the floating IPs not on the uplink yet, while the
	// table and the routes are read: only what is left of the window
	// delays the Apply.
	var fresh []netip.Addr
	for _, p := range n.floating {
		if _, present := addrs[p.Addr()]; !present {
			fresh = append(fresh, p.Addr())
		}
	}
	probeCtx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	probed := d.addr.startProbe(probeCtx, link, fresh)

	ks := d.nf.cache
	d.nf.cache = nil // until this Apply succeeds
	if ks == nil {
		if ks, err = d.nf.read(ctx); err != nil {
			return err
		}
	}
	rs, err := d.rt.read(h, uplinkIndex)
	if err != nil {
		return err
	}

	// Marks: stable, read back from the routes we hold. Next hops beyond
	// the mark mask's capacity get none: their policies fail closed here,
	// reported, and every other policy keeps working.
	kept, dropped := selector.LimitNextHops(d.cfg.MarkMask, selector.NextHops(st), rs.owners)
	if len(dropped) > 0 {
		st, res.Unroutable = failClosed(st, dropped)
		if n, err = normalizeState(st); err != nil {
			return fmt.Errorf("invalid state: %w", err)
		}
		d.log.Warn("more gateway next hops than marks: their policies drop their traffic on this node",
			zap.Int("capacity", selector.MarkCapacity(d.cfg.MarkMask)), zap.Strings("policies", res.Unroutable))
	}
	marks, err := selector.AllocateMarks(d.cfg.MarkMask, kept, rs.owners)
	if err != nil {
		return fmt.Errorf("allocate marks: %w", err)
	}
	res.Marks = map[netip.Addr]uint32{}
	for nh, idx := range marks {
		res.Marks[nh] = selector.MarkValue(d.cfg.MarkMask, idx)
	}

	// Floating IPs. Ours are the addresses on the uplink that carry our
	// label (it survives a lost table and a restart), the ones recorded in
	// the table (added by a version without labels), and the wanted ones we
	// add. A wanted address already on the uplink that is not ours belongs
	// to someone else: it is left alone, never removed, never announced,
	// and reported (Result.Foreign). Only ours are ever removed.
	recorded := elemAddrs(ks.elems[setFloating])
	owned := d.addr.owned(addrs, recorded)
	wantFloat := map[netip.Addr]bool{}
	var ours []netip.Addr
	for _, p := range n.floating {
		wantFloat[p.Addr()] = true
		if _, present := addrs[p.Addr()]; owned[p.Addr()] || !present {
			ours = append(ours, p.Addr())
		} else {
			d.log.Warn("floating ip already on the uplink, put there by something else: not managed", zap.Stringer("ip", p.Addr()))
		}
	}
	for _, a := range st.ClusterFloatingIPs {
		if _, present := addrs[a.Unmap()]; present && !owned[a.Unmap()] {
			res.Foreign = append(res.Foreign, a.Unmap())
		}
	}
	for _, p := range n.floating {
		if _, present := addrs[p.Addr()]; present && !owned[p.Addr()] && !slices.Contains(res.Foreign, p.Addr()) {
			res.Foreign = append(res.Foreign, p.Addr())
		}
	}
	slices.SortFunc(res.Foreign, netip.Addr.Compare)

	// A probed IP another host answers for is not taken: the Gateway
	// policies that SNAT to it fail closed here (they drop, as under the
	// agent's fence) instead of leaving with an address this node does
	// not hold.
	pr := <-probed
	if pr.err != nil {
		return fmt.Errorf("arp probe: %w", pr.err)
	}
	if d.cfg.ARPProbeWait > 0 {
		res.Probed, res.ProbeWait = fresh, pr.waited
	}
	if len(pr.conflicts) > 0 {
		res.Conflicts = slices.SortedFunc(maps.Keys(pr.conflicts), netip.Addr.Compare)
		for _, ip := range res.Conflicts {
			d.log.Warn("floating ip answered for by another host: not taken", zap.Stringer("ip", ip),
				zap.Stringer("holderMAC", pr.conflicts[ip]), zap.String("uplink", d.cfg.Uplink))
		}
		ours = slices.DeleteFunc(ours, func(a netip.Addr) bool { return pr.conflicts[a] != nil })
		var names []string
		st, names = failClosedGateways(st, res.Conflicts)
		if n, err = normalizeState(st); err != nil {
			return fmt.Errorf("invalid state: %w", err)
		}
		if len(names) > 0 {
			d.log.Warn("egress ip held by another host: these policies drop their traffic on this node",
				zap.Strings("policies", names))
		}
	}
	var givenUp []netip.Addr
	for _, a := range slices.SortedFunc(maps.Keys(owned), netip.Addr.Compare) {
		if !wantFloat[a] {
			givenUp = append(givenUp, a)
		}
	}
	// The record keeps what is ours and still on the uplink (an IP given
	// up is removed from the uplink first, then from the record; after a
	// crash in between, the address is gone and so goes its record), and
	// what this Apply adds.
	var floatingSet []netip.Addr
	for _, a := range recorded {
		if _, present := addrs[a]; present {
			floatingSet = append(floatingSet, a)
		}
	}
	floatingSet = append(floatingSet, ours...)
	slices.SortFunc(floatingSet, netip.Addr.Compare)
	floatingSet = slices.Compact(floatingSet)
	floatingSet = slices.DeleteFunc(floatingSet, func(a netip.Addr) bool { return pr.conflicts[a] != nil })

	// 1. Policy routing for new marks, before any rule sets them; on a
	// gateway, the reverse-path table for the traffic rerouted here.
	routes := wanted{marks: marks}
	if isGateway(st) {
		routes.rp, routes.reply = rpRoutes(st), replyRoutes(st)
	}
	if err := d.rt.add(h, rs, routes, uplinkIndex, res); err != nil {
		return err
	}

	// 2. nftables: sets, chains, floating record. In the eBPF mode, the
	// classes and the pods of chains without one; the map follows (2b).
	want := desiredNFT{state: st, marks: marks, sources: n.sources, dests: n.dests, floating: floatingSet, jumps: preSrcTargets(st)}
	var cp classPlan
	var final *desiredNFT // the eBPF mode's table once the map is written
	if d.cls != nil {
		podJumps := want.jumps
		cp = planClasses(d.cls.mask, st, podJumps, n.sources[setKnown], existingClasses(d.cls.mask, ks.mapOf(setPreClass)))
		want.podJumps, want.jumps, want.classJumps = podJumps, cp.jumps, cp.classJumps
		want.sources = maps.Clone(n.sources)
		want.sources[setKnown] = nil
		want.sources[setClasses] = cp.live
		// Until the map is written, pods are dispatched as the kernel
		// holds them; the known pods of the nftables mode (an agent that
		// ran it before) stay known.
		classJumps, jumps, live, ok := cp.transitional(ks.mapOf(setPreClass), ks.jumpMap(), st)
		if known := ks.srcAddrs(setKnown); ok || len(known) > 0 {
			exact := want
			final = &exact
			want.jumps, want.classJumps = jumps, classJumps
			want.sources = maps.Clone(want.sources)
			want.sources[setClasses], want.sources[setKnown] = live, known
		}
	}
	plan := d.nf.plan(ks, want)
	res.Transactions, err = d.nf.exec.run(ctx, &plan.Plan)
	if err != nil {
		return err
	}
	if d.cls != nil {
		// 2b. The classifier's map, now that its classes dispatch.
		if res.ClassesWritten, res.ClassesDeleted, err = d.cls.sync(cp.entries); err != nil {
			return err
		}
		d.cls.podJumps, d.cls.index, d.cls.local, d.cls.net = want.podJumps, cp.index, n.sources[setKnown], cp.net
	}
	res.ElementsAdded, res.ElementsDeleted = plan.elemsAdded, plan.elemsDeleted
	res.SetsCreated, res.SetsDeleted, res.SetsSwapped = plan.setsCreated, plan.setsDeleted, plan.setsSwapped
	res.ChainsRebuilt = plan.chainsRebuilt
	d.nf.policies = map[string]string{}
	for _, p := range st.Policies {
		d.nf.policies[srcSetName(p.Name)] = p.Name
	}
	for _, name := range slices.Sorted(maps.Keys(plan.sourceChanges)) {
		if !strings.HasPrefix(name, srcPrefix) {
			continue // the known pods
		}
		policy, ok := d.nf.policies[name]
		if !ok {
			policy = strings.TrimPrefix(name, srcPrefix) // removed policy: its set key
		}
		ch := plan.sourceChanges[name]
		d.log.Info("policy sources changed", zap.String("policy", policy),
			zap.Int("added", len(ch.added)), zap.Int("removed", len(ch.removed)))
	}

	// 3. Floating IPs and gratuitous ARP. First their ARP leases: every
	// IP held during this Apply (taken or kept, and given up but still
	// on the uplink) is in the arp table's held set; one it adds gets a
	// live lease, so the node answers ARP for it as soon as it is added
	// (and stops unless KeepARP renews it); the others keep what is left
	// of theirs (only KeepARP renews a lease: an Apply right after the
	// agent resumed must not answer again for an IP that moved). The
	// table is created or repaired here; with the lease disabled, deleted.
	//
	// A muted IP (NodeState.Muted: a planned handover) is held like the
	// others but has its lease in the asking set instead of live (what is
	// left of its live lease moves there; a muted IP taken gets a full
	// one; KeepARP renews it there): the node stops answering ARP for it
	// when this step commits, while its own ARP requests with it as
	// sender (resolving the router for the traffic SNATed to it) still
	// leave as long as KeepARP runs. Its announcements stop first and
	// none starts. One muted by the previous Apply and held unmuted now
	// (the switch of the handover) gets a full live lease at once, like
	// one taken, and is announced anew; it is on the uplink already, so it
	// was not probed.
	var taking []netip.Addr
	for _, ip := range ours {
		if _, present := addrs[ip]; !present {
			taking = append(taking, ip)
		}
	}
	wasMuted := d.arp.mutedIPs()
	muted, unmuted := muteChanges(ours, wasMuted, n.muted)
	d.addr.stop(muted)
	for _, a := range muted {
		delete(d.addr.announced, a)
	}
	full := union(taking, unmuted) // taken (muted or not) or unmuted
	if err := d.applyARP(union(ours, givenUp), full, muted); err != nil {
		return err
	}
	for _, a := range muted {
		if !slices.Contains(wasMuted, a) {
			d.log.Info("floating ip muted: no ARP answers, no announcements", zap.Stringer("ip", a))
		}
	}
	for _, a := range unmuted {
		d.log.Info("floating ip unmuted: ARP answered, announced", zap.Stringer("ip", a))
	}
	res.Muted, res.Unmuted = muted, unmuted
	var wantPrefixes []netip.Prefix
	for _, p := range n.floating {
		if slices.Contains(ours, p.Addr()) {
			wantPrefixes = append(wantPrefixes, p)
		}
	}
	added, err := d.addr.add(h, link, addrs, wantPrefixes, res)
	if err != nil {
		return err
	}
	for _, a := range added {
		delete(d.addr.announced, a) // taken anew: announced anew
	}
	var announce []netip.Addr
	for _, a := range ours {
		if !d.addr.announced[a] && !slices.Contains(muted, a) {
			announce = append(announce, a)
		}
	}
	if err := d.addr.announce(link, announce); err != nil {
		return err
	}
	for _, a := range announce {
		d.addr.announced[a] = true
	}
	for a := range d.addr.announced {
		if !wantFloat[a] {
			delete(d.addr.announced, a)
		}
	}
	res.Announced = announce

	// 4. Remove what is no longer wanted: floating IPs given up (then their
	// record), stale routing. Their announcements stop first.
	d.addr.stop(givenUp)
	if err := d.addr.remove(h, link, addrs, givenUp, res); err != nil {
		return err
	}
	if len(givenUp) > 0 && d.arp.enabled() {
		if err := d.arp.hold(union(ours, nil)); err != nil {
			return fmt.Errorf("arp lease: %w", err)
		}
	}
	if err := d.unrecordFloating(ctx, intersect(givenUp, recorded), res); err != nil {
		return err
	}
	floatingAfter := slices.DeleteFunc(slices.Clone(floatingSet), func(a netip.Addr) bool { return slices.Contains(givenUp, a) })
	d.nf.cache = plan.after(d.nf, ks, want, floatingAfter)
	if final != nil {
		// 4b. The eBPF mode: what dispatched pods until the map was
		// written goes.
		final.floating = floatingAfter
		ks2 := d.nf.cache
		d.nf.cache = nil
		plan2 := d.nf.plan(ks2, *final)
		n, err := d.nf.exec.run(ctx, &plan2.Plan)
		res.Transactions += n
		if err != nil {
			return err
		}
		res.ElementsAdded += plan2.elemsAdded
		res.ElementsDeleted += plan2.elemsDeleted
		d.nf.cache = plan2.after(d.nf, ks2, *final, floatingAfter)
	}
	if err := d.rt.removeStale(h, rs, routes, uplinkIndex, res); err != nil {
		return err
	}

	// 5. A gateway must not ICMP-redirect pods' traffic away, and its
	// reverse-path check uses the packet's mark on the uplink.
	if len(n.floating) > 0 || isGateway(st) {
		changed, err := d.rt.gatewaySettings()
		res.SysctlsChanged = changed
		if err != nil {
			return err
		}
	}

	// 6. Conntrack, only after everything above succeeded.
	m := conntrackMatcher(plan, n, givenUp, !d.applied, slices.Collect(maps.Keys(addrs)))
	flushed, err := d.ct.flush(ctx, m)
	res.ConntrackDeleted = flushed
	if err != nil {
		return err
	}
	if flushed > 0 {
		d.log.Info("conntrack entries deleted", zap.Int("count", flushed))
	}
	d.applied = true
	d.muted, d.foreign = muted, slices.Clone(res.Foreign)
	return nil
}

// isGateway reports whether st has a Gateway policy: traffic other nodes
// reroute here is SNATed here.
func isGateway(st selector.NodeState) bool {
	return slices.ContainsFunc(st.Policies, func(p selector.PolicyState) bool { return p.Mode == selector.ModeGateway })
}

// rpRoutes are the routes of the reverse-path table: the cluster networks
// on the uplink (rpPrefixes), for the reverse-path check only.
func rpRoutes(st selector.NodeState) []rpRoute {
	var out []rpRoute
	for _, p := range rpPrefixes(st.Excluded) {
		out = append(out, rpRoute{dst: p})
	}
	return out
}

// replyRoutes are the routes of the reply table: the other nodes' pod
// CIDRs via those nodes (NodeState.ReturnRoutes), for the replies to the
// traffic they reroute here.
func replyRoutes(st selector.NodeState) []rpRoute {
	var out []rpRoute
	for _, r := range st.ReturnRoutes {
		if r.Dst.IsValid() && r.Dst.Bits() > 0 && r.Dst.Addr().Unmap().Is4() && r.Via.Unmap().Is4() {
			out = append(out, rpRoute{dst: netip.PrefixFrom(r.Dst.Addr().Unmap(), r.Dst.Bits()).Masked(), via: r.Via.Unmap()})
		}
	}
	slices.SortFunc(out, func(a, b rpRoute) int { return cmp.Or(a.dst.Addr().Compare(b.dst.Addr()), a.dst.Bits()-b.dst.Bits()) })
	// One route per prefix (the table holds one).
	return slices.CompactFunc(out, func(a, b rpRoute) bool { return a.dst == b.dst })
}

// rpPrefixes are the routes of the reverse-path table: the cluster
// networks (IPv4, wider than one address: the pod and Service CIDRs; the
// sources of traffic rerouted here are pods), without those another one
// covers.
func rpPrefixes(excluded []netip.Prefix) []netip.Prefix {
	var ps []netip.Prefix
	for _, p := range ipv4Prefixes(excluded) {
		if p.Bits() < 32 {
			ps = append(ps, p)
		}
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Bits() - b.Bits(); c != 0 {
			return c
		}
		return a.Addr().Compare(b.Addr())
	})
	var out []netip.Prefix
	for _, p := range ps {
		if !slices.ContainsFunc(out, func(o netip.Prefix) bool { return o.Contains(p.Addr()) }) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// ipv4Prefixes returns the valid IPv4 prefixes of ps (an IPv4-mapped
// address unmapped), masked; the others are left out.
func ipv4Prefixes(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if q := netip.PrefixFrom(p.Addr().Unmap(), p.Bits()); p.IsValid() && q.IsValid() && q.Addr().Is4() {
			out = append(out, q.Masked())
		}
	}
	return out
}

// failClosedGateways turns the Gateway policies whose egress IP is one of
// ips (held by another host) into Drop policies, as the agent's fence
// does, and returns their names.
func failClosedGateways(st selector.NodeState, ips []netip.Addr) (selector.NodeState, []string) {
	var names []string
	out := st
	out.Policies = slices.Clone(st.Policies)
	for i, p := range out.Policies {
		if p.Mode == selector.ModeGateway && slices.Contains(ips, p.EgressIP) {
			p.Mode = selector.ModeDrop
			out.Policies[i] = p
			names = append(names, p.Name)
		}
	}
	return out, names
}

// failClosed turns the Reroute policies toward the next hops dropped into
// Drop policies, and returns their names.
func failClosed(st selector.NodeState, dropped []netip.Addr) (selector.NodeState, []string) {
	var names []string
	out := st
	out.Policies = slices.Clone(st.Policies)
	for i, p := range out.Policies {
		if p.Mode == selector.ModeReroute && slices.Contains(dropped, p.NextHop) {
			p.Mode, p.NextHop = selector.ModeDrop, netip.Addr{}
			out.Policies[i] = p
			names = append(names, p.Name)
		}
	}
	return out, names
}

// conntrackMatcher derives the conntrack entries an Apply invalidated.
//
// first: the first Apply of this Dataplane (the agent started, maybe after
// a crash in the middle of an Apply whose conntrack clean-up never ran).
// The table's diff cannot tell what changed then, so every source of a
// Reroute policy has its translated flows to the policy's destinations
// deleted: here they must leave untranslated (null binding) for the
// gateway; a translated one was masqueraded before the policy took it.
// And every flow SNATed to a floating IP this node holds that none of its
// Gateway policies would SNAT there is deleted (snatAllowed), and every
// untranslated flow of a cluster-internal source to a policy destination
// that is no longer rerouted (nullStray). local: the uplink's addresses
// (the node's own flows are never touched).
func conntrackMatcher(plan *nftPlan, n *normalized, givenUp []netip.Addr, first bool, local []netip.Addr) *ctMatcher {
	m := snatMatcher(givenUp)
	if first {
		m.snatAllowed = map[netip.Addr][]gatewayMatch{}
		for _, f := range n.floating {
			m.snatAllowed[f.Addr()] = nil
		}
		for _, p := range n.state.Policies {
			if _, held := m.snatAllowed[p.EgressIP]; !held || p.Mode != selector.ModeGateway {
				continue
			}
			g := gatewayMatch{sources: map[netip.Addr]bool{}, dests: newSpanSet(n.dests[dstSetName(p.Name)]), egress: p.EgressIP}
			for _, a := range n.sources[srcSetName(p.Name)] {
				g.sources[a] = true
			}
			m.snatAllowed[p.EgressIP] = append(m.snatAllowed[p.EgressIP], g)
		}
		ns := &nullStray{internal: newSpanSet(n.dests[setInternal]), local: map[netip.Addr]bool{}, reroute: map[netip.Addr][]spanSet{}}
		for _, a := range local {
			ns.local[a] = true
		}
		var allDests [][]ipRange
		for _, p := range n.state.Policies {
			allDests = append(allDests, n.dests[dstSetName(p.Name)])
			if p.Mode != selector.ModeReroute {
				continue
			}
			dests := newSpanSet(n.dests[dstSetName(p.Name)])
			for _, a := range n.sources[srcSetName(p.Name)] {
				m.addTranslated(a, dests)
				ns.reroute[a] = append(ns.reroute[a], dests)
			}
		}
		if ns.dests = newSpanSet(allDests...); len(ns.dests) > 0 && len(ns.internal) > 0 {
			m.untranslated = ns
		}
	}
	keys := map[string]bool{}
	for name := range plan.sourceChanges {
		if key, ok := strings.CutPrefix(name, srcPrefix); ok {
			keys[key] = true
		}
	}
	for name := range plan.destChanges {
		if key, ok := strings.CutPrefix(name, dstPrefix); ok {
			keys[key] = true
		}
	}
	for key := range keys {
		src, dst := srcPrefix+key, dstPrefix+key
		dc, dstChanged := plan.destChanges[dst]
		var oldDst, newDst []ipRange
		if dstChanged {
			oldDst, newDst = dc.old, dc.new
		} else {
			newDst = n.dests[dst]
			oldDst = newDst
		}
		// Pods added or removed: their flows to any old or new destination.
		both := newSpanSet(oldDst, newDst)
		sc := plan.sourceChanges[src]
		for _, a := range sc.added {
			m.addSource(a, both)
		}
		for _, a := range sc.removed {
			m.addSource(a, both)
		}
		// Destinations changed: every source's flows to the changed ranges.
		if dstChanged {
			added, removed := diffRanges(oldDst, newDst)
			changed := newSpanSet(added, removed)
			for _, a := range n.sources[src] {
				m.addSource(a, changed)
			}
			for _, a := range sc.removed {
				m.addSource(a, changed)
			}
		}
	}
	// Policies this node newly serves as gateway (or with a new egress IP).
	for _, p := range n.state.Policies {
		if p.Mode != selector.ModeGateway {
			continue
		}
		src := srcSetName(p.Name)
		if prev, ok := plan.prevGateway[src]; ok && prev == p.EgressIP {
			continue
		}
		g := gatewayMatch{sources: map[netip.Addr]bool{}, dests: newSpanSet(n.dests[dstSetName(p.Name)]), egress: p.EgressIP}
		for _, a := range n.sources[src] {
			g.sources[a] = true
		}
		if len(g.sources) > 0 && len(g.dests) > 0 {
			m.gateways = append(m.gateways, g)
		}
	}
	return m
}

// Cleanup removes everything egressnat put in the kernel: the table, the
// fwmark rules, the route tables and the floating addresses recorded in the
// table. It is idempotent.
func (d *Dataplane) Cleanup(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	res := Result{}
	err := d.cleanup(ctx, &res)
	d.last = res
	return err
}

func (d *Dataplane) cleanup(ctx context.Context, res *Result) error {
	d.nf.cache = nil
	d.addr.stopAll()
	h, err := d.cfg.netlinkHandle()
	if err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	ks, err := d.nf.read(ctx)
	if err != nil {
		return err
	}
	var errs []error
	if ks.exists {
		del := &Plan{table: d.cfg.Table, steps: []step{{ops: []Op{{Verb: VerbDelete, table: true}}, msgs: 1}}}
		if res.Transactions, err = d.nf.exec.run(ctx, del); err != nil {
			return fmt.Errorf("delete table %s: %w", d.cfg.Table, err)
		}
		d.log.Info("table deleted", zap.String("table", d.cfg.Table))
	}
	recorded := elemAddrs(ks.elems[setFloating])
	var released []netip.Addr
	uplinkIndex := -1
	link, err := h.LinkByName(d.cfg.Uplink)
	if err == nil {
		uplinkIndex = link.Attrs().Index
		addrs, err := uplinkAddrs(h, link)
		if err != nil {
			errs = append(errs, err)
		} else {
			released = slices.SortedFunc(maps.Keys(d.addr.owned(addrs, recorded)), netip.Addr.Compare)
			if err := d.addr.remove(h, link, addrs, released, res); err != nil {
				errs = append(errs, err)
			}
		}
	} else if _, notFound := err.(netlink.LinkNotFoundError); !notFound {
		errs = append(errs, fmt.Errorf("uplink %s: %w", d.cfg.Uplink, err))
	}
	// The arp table goes once the floating IPs left the uplink (whether
	// the lease is enabled or not).
	if deleted, err := d.arp.remove(); err != nil {
		errs = append(errs, err)
	} else if deleted {
		d.log.Info("arp table deleted", zap.String("table", d.cfg.Table))
	}
	rs, err := d.rt.read(h, uplinkIndex)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := d.rt.removeStale(h, rs, wanted{}, uplinkIndex, res); err != nil {
		errs = append(errs, err)
	}
	clear(d.addr.announced)
	if gone := union(recorded, released); len(gone) > 0 {
		n, err := d.ct.flush(ctx, snatMatcher(gone))
		res.ConntrackDeleted = n
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Recheck makes the next Apply take the full path: it repairs routes, ip
// rules, floating addresses and sysctls, and plans the table against the
// cached one (see Verify for the table itself).
func (d *Dataplane) Recheck() {
	d.mu.Lock()
	d.recheck = true
	d.mu.Unlock()
}

// unrecordFloating deletes addresses from the floating set after they left
// the uplink.
func (d *Dataplane) unrecordFloating(ctx context.Context, ips []netip.Addr, res *Result) error {
	if len(ips) == 0 {
		return nil
	}
	p := &Plan{table: d.cfg.Table, steps: elemSteps(setDef{name: setFloating}, addrElements(ips), true)}
	t, err := d.nf.exec.run(ctx, p)
	res.Transactions += t
	return err
}

// snatMatcher matches the conntrack entries SNATed to one of ips.
func snatMatcher(ips []netip.Addr) *ctMatcher {
	m := &ctMatcher{replyDst: make(map[netip.Addr]bool, len(ips))}
	for _, a := range ips {
		m.replyDst[a] = true
	}
	return m
}

// PolicyCounters are the packet and byte counters of one policy's rule.
type PolicyCounters struct {
	Policy  string
	Mode    selector.Mode
	Packets uint64
	Bytes   uint64
}

// Dump returns the counters of the policy rules in the kernel, in chain
// order. Policies are named by the last Apply of this process, or by the
// rule comment otherwise.
func (d *Dataplane) Dump(ctx context.Context) ([]PolicyCounters, error) {
	d.mu.Lock()
	names := d.nf.policies
	d.mu.Unlock()
	c, err := d.cfg.nftConn()
	if err != nil {
		return nil, fmt.Errorf("nftables conn: %w", err)
	}
	// Only the rules: reading every set's elements would cost far more.
	r := tableReader{c: c, name: d.cfg.Table}
	chains, err := r.chains()
	if err != nil {
		return nil, err
	}
	var out []PolicyCounters
	index := map[PolicyCounters]int{} // by policy and mode (counters zero)
	for _, ch := range chains {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rules, err := r.rules(ch)
		if errors.Is(err, errNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, r := range rules {
			kr, ok := parseRule(r)
			if !ok {
				continue
			}
			name, ok := names[kr.srcSet]
			if !ok {
				name = commentPolicy(ruleComment(r))
			}
			// A Reroute or Drop policy counts in its own chain and in
			// chainMulti: add them up.
			k := PolicyCounters{Policy: name, Mode: kr.mode}
			i, seen := index[k]
			if !seen {
				i = len(out)
				index[k] = i
				out = append(out, k)
			}
			out[i].Packets += kr.counter.Packets
			out[i].Bytes += kr.counter.Bytes
		}
	}
	return out, nil
}
