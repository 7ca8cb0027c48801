package nft

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The ARP lease: a dead man's switch in the kernel. A node answers ARP for
// the floating IPs on its uplink whether its agent works or not; a frozen
// agent (SIGSTOP, stuck) would keep answering for an IP the operator has
// moved to another node, and two nodes would answer for it. So every ARP
// frame the node sends (replies, its own requests) with a sender IP this
// node holds as a floating IP is dropped unless that IP's lease is live,
// and the agent renews the leases (KeepARP) while it works:
//
//	table arp egressnat {
//		set held { type ipv4_addr; }                 # floating IPs held
//		set live { type ipv4_addr; flags timeout; }  # renewed by KeepARP
//		chain output {
//			type filter hook output priority filter; policy accept;
//			arp saddr ip @held arp saddr ip != @live counter drop comment "..."
//		}
//	}
//
// The kernel drops an element of live from the lookups the moment its
// timeout has passed (before the set's garbage collection removes it), so
// a node stops answering for its floating IPs within Config.ARPLease of
// the agent's last KeepARP. Gratuitous ARP and ARP probes are sent through
// packet sockets and do not pass the hook (they are sent by Apply, which
// makes the lease live first).

// DefaultARPLease is the ARP lease when Config.ARPLease is zero.
const DefaultARPLease = 300 * time.Millisecond

const (
	arpSetHeld = "held"
	arpSetLive = "live"
	arpChain   = "output"
	// arpHookOutput is NF_ARP_OUT (the ARP family has its own hook
	// numbers: nftables.ChainHookOutput is the inet one).
	arpHookOutput nftables.ChainHook = 1
	// arpSenderIP: the sender protocol address in an ARP packet for
	// ethernet and IPv4 (`arp saddr ip`).
	arpSenderIP = 14
	arpComment  = "egressnat: no ARP for a held floating ip whose lease ran out (agent not renewing)"
)

// arpRuleExprs: arp saddr ip @held arp saddr ip != @live counter drop.
// held and live are the set objects (with their IDs when created in the
// same transaction).
func arpRuleExprs(held, live *nftables.Set) []expr.Any {
	return []expr.Any{
		loadAddr(arpSenderIP),
		&expr.Lookup{SourceRegister: 1, SetName: held.Name, SetID: held.ID},
		loadAddr(arpSenderIP),
		&expr.Lookup{SourceRegister: 1, SetName: live.Name, SetID: live.ID, Invert: true},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}

func arpRuleUserData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, arpComment)
}

// arpLease owns the arp table. Its lock is its own, never the
// Dataplane's: KeepARP never waits for an Apply, only for another write of
// this table (one short transaction).
type arpLease struct {
	cfg Config
	log *zap.Logger

	mu sync.Mutex
	// held: the floating IPs the arp table holds (sorted), as this process
	// last wrote them; loaded tells whether it was written or read back
	// yet (a restarted agent renews what its predecessor held).
	held   []netip.Addr
	loaded bool
	// leases: when the live lease of each held IP was last written in
	// full (the write began then; the timeout starts at its commit, a
	// little later). Only KeepARP renews the lease of an IP already held
	// (and Apply gives one to an IP it adds): every other write of the
	// table keeps an IP's lease to what is left of it, so that no write
	// brings back a lease that ran out (the IP may have moved meanwhile).
	leases map[netip.Addr]time.Time
	// conn is a lasting nftables connection, dropped after any error;
	// after close, every call makes its own.
	conn   *nftables.Conn
	closed bool
}

func (a *arpLease) enabled() bool { return a.cfg.ARPLease > 0 }

func (a *arpLease) table() *nftables.Table {
	return &nftables.Table{Name: a.cfg.Table, Family: nftables.TableFamilyARP}
}

func (a *arpLease) heldSet() *nftables.Set {
	return &nftables.Set{Table: a.table(), Name: arpSetHeld, KeyType: nftables.TypeIPAddr}
}

func (a *arpLease) liveSet() *nftables.Set {
	return &nftables.Set{Table: a.table(), Name: arpSetLive, KeyType: nftables.TypeIPAddr, HasTimeout: true}
}

func (a *arpLease) connLocked() (*nftables.Conn, error) {
	if a.conn != nil {
		return a.conn, nil
	}
	if a.closed {
		return a.cfg.nftConn()
	}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(forceBuffers)}
	if !a.cfg.inCurrentNetNS() {
		opts = append(opts, nftables.WithNetNSFd(a.cfg.NetNSFd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables conn: %w", err)
	}
	a.conn = c
	return c, nil
}

// dropConnLocked closes the connection after an error: whatever the
// kernel left unread on it, the next call starts afresh.
func (a *arpLease) dropConnLocked() {
	if a.conn != nil {
		_ = a.conn.CloseLasting()
		a.conn = nil
	}
}

func (a *arpLease) close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.dropConnLocked()
	a.closed = true
}

// elements: the keys, with the lease as timeout for live (the kernel
// counts in milliseconds: rounded up, never zero, which would mean none).
func arpElements(ips []netip.Addr, timeout time.Duration) []nftables.SetElement {
	if timeout > 0 {
		timeout = max((timeout + time.Millisecond - 1).Truncate(time.Millisecond), time.Millisecond)
	}
	out := make([]nftables.SetElement, len(ips))
	for i, ip := range ips {
		b := ip.As4()
		out[i] = nftables.SetElement{Key: b[:], Timeout: timeout}
	}
	return out
}

// keep renews the leases of every held IP (see Dataplane.KeepARP).
func (a *arpLease) keep(ctx context.Context) error {
	if !a.enabled() {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.loadLocked(); err != nil {
		return err
	}
	if len(a.held) == 0 {
		return nil // nothing held, nothing to answer for: no table needed
	}
	return a.writeLocked(a.held, nil, a.held)
}

// loadLocked reads the held set back once, so that a restarted agent
// renews what is held before its first Apply.
func (a *arpLease) loadLocked() error {
	if a.loaded {
		return nil
	}
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	st, err := a.readLocked(c)
	if err != nil {
		a.dropConnLocked()
		return err
	}
	a.held, a.loaded = st.held, true
	return nil
}

// liveElements are the live set's elements for hold: a full lease for the
// IPs of full, what is left of its lease for every other (none when it ran
// out).
func (a *arpLease) liveElements(hold, full []netip.Addr, now time.Time) []nftables.SetElement {
	var out []nftables.SetElement
	for _, ip := range hold {
		d := a.cfg.ARPLease
		if !slices.Contains(full, ip) {
			t, ok := a.leases[ip]
			if !ok {
				continue
			}
			if d -= now.Sub(t); d < time.Millisecond {
				continue
			}
		}
		out = append(out, arpElements([]netip.Addr{ip}, d)...)
	}
	return out
}

// leasesWritten records the leases of a write begun at start.
func (a *arpLease) leasesWritten(hold, full []netip.Addr, start time.Time) {
	if a.leases == nil {
		a.leases = map[netip.Addr]time.Time{}
	}
	for ip := range a.leases {
		if !slices.Contains(hold, ip) {
			delete(a.leases, ip)
		}
	}
	for _, ip := range full {
		if slices.Contains(hold, ip) {
			a.leases[ip] = start
		}
	}
}

// writeLocked makes the kernel's held set hold, in one transaction: held
// gets hold added (a no-op for the ones it has) and del deleted (IPs known
// to be in it), live is flushed and refilled (so a lease never depends on
// how the kernel updates an element's timeout): a full lease for the IPs
// of full, what is left of their lease for the others. When that fails
// (the table, a set or an element is gone: someone flushed the ruleset),
// the whole table is written anew in one transaction.
func (a *arpLease) writeLocked(hold, del, full []netip.Addr) error {
	start := time.Now()
	live := a.liveElements(hold, full, start)
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	held, liveSet := a.heldSet(), a.liveSet()
	err = func() error {
		if len(hold) > 0 {
			if err := c.SetAddElements(held, arpElements(hold, 0)); err != nil {
				return err
			}
		}
		if len(del) > 0 {
			if err := c.SetDeleteElements(held, arpElements(del, 0)); err != nil {
				return err
			}
		}
		c.FlushSet(liveSet)
		if len(live) > 0 {
			if err := c.SetAddElements(liveSet, live); err != nil {
				return err
			}
		}
		return c.Flush()
	}()
	if err == nil {
		a.held = slices.Clone(hold)
		a.leasesWritten(hold, full, start)
		return nil
	}
	a.dropConnLocked()
	if rerr := a.rewriteLocked(hold, full); rerr != nil {
		return fmt.Errorf("arp lease: %w (rewriting the table: %w)", err, rerr)
	}
	a.log.Warn("arp table rewritten", zap.String("table", a.cfg.Table), zap.Stringers("held", hold), zap.NamedError("cause", err))
	return nil
}

// rewriteLocked replaces the arp table, whatever state it is in, by one
// holding hold with live leases, in one transaction (add, delete and add
// the table: the first add makes the delete valid when there is none).
func (a *arpLease) rewriteLocked(hold, full []netip.Addr) error {
	start := time.Now()
	liveElems := a.liveElements(hold, full, start)
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	t := a.table()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	held, live := a.heldSet(), a.liveSet()
	held.Table, live.Table = t, t
	if err := c.AddSet(held, arpElements(hold, 0)); err != nil {
		return err
	}
	if err := c.AddSet(live, liveElems); err != nil {
		return err
	}
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: arpChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookRef(arpHookOutput), Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: arpRuleExprs(held, live), UserData: arpRuleUserData()})
	if err := c.Flush(); err != nil {
		a.dropConnLocked()
		return err
	}
	a.held = slices.Clone(hold)
	a.leasesWritten(hold, full, start)
	return nil
}

// fresh reports whether the kernel answers ARP for ip as far as the lease
// goes: its lease was written less than ARPLease ago (always, with the
// lease disabled). Gratuitous ARP leaves through a packet socket, past the
// arp table: a repeat is sent only while fresh says so, or an agent that
// resumes after a pause would announce an IP that moved meanwhile.
func (a *arpLease) fresh(ip netip.Addr) bool {
	if !a.enabled() {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.leases[ip] // only held IPs have one
	return ok && time.Since(t) < a.cfg.ARPLease
}

// arpState is what readLocked found.
type arpState struct {
	exists bool
	// ok: the table is exactly ours (sets, chain, rule), whatever the
	// elements.
	ok   bool
	held []netip.Addr
}

// readLocked reads the arp table back: does it exist, is it exactly what
// rewriteLocked writes, and which IPs does held hold.
func (a *arpLease) readLocked(c *nftables.Conn) (arpState, error) {
	var st arpState
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyARP)
	if err != nil {
		return st, fmt.Errorf("list arp tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == a.cfg.Table }) {
		return st, nil
	}
	st.exists = true
	t := a.table()
	sets, err := c.GetSets(t)
	if err != nil {
		return st, fmt.Errorf("list sets of arp table %s: %w", t.Name, err)
	}
	var held *nftables.Set
	setsOK := len(sets) == 2
	for _, s := range sets {
		switch {
		case s.Name == arpSetHeld && s.KeyType.Name == nftables.TypeIPAddr.Name && !s.HasTimeout && !s.Interval && !s.IsMap && !s.Constant:
			held = s
		case s.Name == arpSetLive && s.KeyType.Name == nftables.TypeIPAddr.Name && s.HasTimeout && !s.Interval && !s.IsMap && !s.Constant:
		default:
			setsOK = false
		}
	}
	if held != nil {
		els, err := c.GetSetElements(held)
		if err != nil {
			return st, fmt.Errorf("list arp set %s: %w", arpSetHeld, err)
		}
		for _, e := range els {
			if ip, ok := netip.AddrFromSlice(e.Key); ok && ip.Is4() {
				st.held = append(st.held, ip)
			}
		}
		slices.SortFunc(st.held, netip.Addr.Compare)
		st.held = slices.Compact(st.held)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyARP)
	if err != nil {
		return st, fmt.Errorf("list arp chains: %w", err)
	}
	var ours []*nftables.Chain
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == a.cfg.Table {
			ours = append(ours, ch)
		}
	}
	if !setsOK || held == nil || len(ours) != 1 {
		return st, nil
	}
	ch := ours[0]
	if ch.Name != arpChain || ch.Type != nftables.ChainTypeFilter || ch.Hooknum == nil || *ch.Hooknum != arpHookOutput ||
		ch.Priority == nil || *ch.Priority != *nftables.ChainPriorityFilter || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept {
		return st, nil
	}
	rules, err := c.GetRules(t, ch)
	if err != nil {
		return st, fmt.Errorf("list arp rules: %w", err)
	}
	want := normalize(arpRuleExprs(&nftables.Set{Name: arpSetHeld}, &nftables.Set{Name: arpSetLive}))
	st.ok = len(rules) == 1 && string(rules[0].UserData) == string(arpRuleUserData()) &&
		reflect.DeepEqual(normalize(rules[0].Exprs), want)
	return st, nil
}

// ensure is the full Apply's step, before floating IPs are added: the
// arp table exists, exactly ours, held holds exactly hold (IPs that are
// not ours leave it), the IPs of taking (about to be added) have a live
// lease, and every other keeps what is left of its own: an Apply never
// brings back a lease that ran out (the agent stopped, or lost the
// leader's probes, and the IP may have moved meanwhile; KeepARP renews it
// once that is ruled out).
func (a *arpLease) ensure(hold, taking []netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	st, err := a.readLocked(c)
	if err != nil {
		a.dropConnLocked()
		return err
	}
	a.loaded = true
	if !st.ok {
		if st.exists {
			a.log.Warn("arp table not as written: rewritten", zap.String("table", a.cfg.Table))
		}
		return a.rewriteLocked(hold, taking)
	}
	del, _ := diffAddrs(hold, st.held) // in the kernel, not wanted
	return a.writeLocked(hold, del, taking)
}

// hold makes held hold exactly ips (sorted), the IPs known to be held
// that are not in ips leaving it; the leases keep what is left of them.
func (a *arpLease) hold(ips []netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.loadLocked(); err != nil {
		return err
	}
	del, _ := diffAddrs(ips, a.held)
	return a.writeLocked(ips, del, nil)
}

// unhold removes ips from held (all: every IP) and from live.
func (a *arpLease) unhold(ips []netip.Addr, all bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.loadLocked(); err != nil {
		return err
	}
	keep := slices.DeleteFunc(slices.Clone(a.held), func(ip netip.Addr) bool { return all || slices.Contains(ips, ip) })
	if len(keep) == len(a.held) {
		return nil
	}
	del, _ := diffAddrs(keep, a.held)
	return a.writeLocked(keep, del, nil)
}

// remove deletes the arp table (Cleanup, or the lease disabled).
func (a *arpLease) remove() (bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, err := a.connLocked()
	if err != nil {
		return false, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyARP)
	if err != nil {
		a.dropConnLocked()
		return false, fmt.Errorf("list arp tables: %w", err)
	}
	a.held, a.loaded, a.leases = nil, true, nil
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == a.cfg.Table }) {
		return false, nil
	}
	c.DelTable(a.table())
	if err := c.Flush(); err != nil {
		a.dropConnLocked()
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("delete arp table %s: %w", a.cfg.Table, err)
	}
	return true, nil
}

// KeepARP renews the ARP lease of every floating IP this node holds: for
// Config.ARPLease more, the node answers ARP for them. The agent calls it
// often (every 100 ms for the default lease of 300 ms) from a goroutine of
// its own: when it stops (the agent frozen or stuck), the node stops
// answering ARP for its floating IPs within the lease, so that a node the
// operator has moved an IP away from does not answer for it any more
// while the new holder does.
//
// It is one nftables transaction (the held set refilled, the live set
// flushed and refilled), never waits for an Apply or a Release (it does
// not take the Dataplane's lock) and rewrites the arp table when it is
// gone. With nothing held it does nothing; with the lease disabled
// (Config.ARPLease negative) neither.
func (d *Dataplane) KeepARP(ctx context.Context) error {
	return d.arp.keep(ctx)
}

// applyARP is the full Apply's step before the floating IPs are added:
// hold (the IPs held during the Apply) are in the arp table, taking (those
// it adds) with live leases, the others with what is left of theirs; or,
// with the lease disabled, there is no arp table.
func (d *Dataplane) applyARP(hold, taking []netip.Addr) error {
	if !d.arp.enabled() {
		deleted, err := d.arp.remove()
		if deleted {
			d.log.Info("arp table deleted (arp lease disabled)", zap.String("table", d.cfg.Table))
		}
		return err
	}
	if err := d.arp.ensure(hold, taking); err != nil {
		return fmt.Errorf("arp lease: %w", err)
	}
	return nil
}

// releaseARP: ips (all: every IP) left the uplink; they leave the arp
// table. Best effort: a failure is logged, the next Apply converges.
func (d *Dataplane) releaseARP(ips []netip.Addr, all bool) {
	if !d.arp.enabled() {
		return
	}
	if err := d.arp.unhold(ips, all); err != nil {
		d.log.Warn("arp lease: released ips not removed from the arp table", zap.Stringers("ips", ips), zap.Error(err))
	}
}
