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
//		set held { type ipv4_addr; }                   # floating IPs held
//		set live { type ipv4_addr; flags timeout; }    # renewed by KeepARP
//		set asking { type ipv4_addr; flags timeout; }  # the same, muted IPs
//		chain output {
//			type filter hook output priority filter; policy accept;
//			arp operation request arp saddr ip @asking counter accept comment "..."
//			arp saddr ip @held arp saddr ip != @live counter drop comment "..."
//		}
//	}
//
// The kernel drops an element of live (or asking) from the lookups the
// moment its timeout has passed (before the set's garbage collection
// removes it), so a node stops answering for its floating IPs within
// Config.ARPLease of the agent's last KeepARP. Gratuitous ARP and ARP
// probes are sent through packet sockets and do not pass the hook (they
// are sent by Apply, which makes the lease live first).
//
// Muted IPs (selector.NodeState.Muted, a planned handover: the old holder
// while the new one prepares, the new holder preparing) are in held and
// never in live: the node must not answer ARP for them (the new holder's
// probe must find the IP free) and does not announce them (their
// gratuitous ARP schedule stops, see addresses.stop). But the old holder
// still SNATs to its muted IP, and when the kernel resolves or revalidates
// a neighbour (the router) for such a packet, its request has the muted IP
// as sender (arp_announce 0): dropped, the node could not reach its
// router, and its traffic would stall for a retransmit time (a second)
// or more during the handover. So a muted IP has its lease in asking
// instead of live: the first rule lets the node's own requests with it as
// sender out (never its replies: op 1 only), under the same dead man's
// switch (a frozen agent's node stops sending them within the lease too).
// Like any request, such a request teaches its target (and every host
// that has an entry for the IP) the node's MAC for the IP, and a
// broadcast one seen by a node probing the IP is a conflict for its probe
// (probeConflict); a revalidation of a router known already is unicast.
//
// An IP has its lease in exactly one of live and asking (none when it ran
// out), by whether the last Apply muted it; every write refills both sets
// with the same bookkeeping (arpLease.leases, leaseElements): a full lease
// for an IP an Apply adds (muted or not) and from KeepARP, what is left of
// it otherwise. The Apply that mutes an IP held moves what is left of its
// lease from live to asking in the same transaction that writes held (the
// node stops answering at once, not when the lease runs out); a fresh
// muted IP is ARP-probed and added like any other, with a full lease in
// asking. The Apply that finds an IP muted by the previous one held and
// no longer muted (the switch) gives it a full lease in live at once,
// like an IP it adds, and announces it anew; it is on the uplink already,
// so it is not probed. Which IPs are muted is known to this process only
// (as of its last Apply): a restarted agent's KeepARP renews every held
// IP in live until its first Apply (the agent calls it only after).
//
// With the lease disabled, the table exists only while an IP is muted:
// held holds the muted IPs alone, live nothing, asking the muted IPs
// without a timeout (their requests pass, their replies are dropped), and
// KeepARP does nothing.
//
// A table that is not exactly this one (an older version's had neither
// asking nor its rule) is rewritten in one transaction by the next full
// Apply (readLocked, ensure), or by KeepARP when its write fails.

// DefaultARPLease is the ARP lease when Config.ARPLease is zero.
const DefaultARPLease = 300 * time.Millisecond

const (
	arpSetHeld   = "held"
	arpSetLive   = "live"
	arpSetAsking = "asking"
	arpChain     = "output"
	// arpHookOutput is NF_ARP_OUT (the ARP family has its own hook
	// numbers: nftables.ChainHookOutput is the inet one).
	arpHookOutput nftables.ChainHook = 1
	// arpOperation: the operation field of the ARP header (`arp
	// operation`), 2 bytes, big-endian; arpSenderIP: the sender protocol
	// address in an ARP packet for ethernet and IPv4 (`arp saddr ip`).
	arpOperation  = 6
	arpSenderIP   = 14
	arpComment    = "egressnat: no ARP for a held floating ip whose lease ran out (agent not renewing)"
	arpAskComment = "egressnat: a muted floating ip's own ARP requests pass while its lease is live (agent renewing)"
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

// arpAskRuleExprs: arp operation request arp saddr ip @asking counter
// accept, the rule before arpRuleExprs' (asking: the set object, with its
// ID when created in the same transaction).
func arpAskRuleExprs(asking *nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: arpOperation, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, arpRequest}},
		loadAddr(arpSenderIP),
		&expr.Lookup{SourceRegister: 1, SetName: asking.Name, SetID: asking.ID},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

func arpRuleUserData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, arpComment)
}

func arpAskRuleUserData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, arpAskComment)
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
	// leases: when the lease of each held IP was last written in full
	// (the write began then; the timeout starts at its commit, a little
	// later), in live or, while the IP is muted, in asking. Only KeepARP
	// renews the lease of an IP already held (and Apply gives one to an
	// IP it adds): every other write of the table keeps an IP's lease to
	// what is left of it, so that no write brings back a lease that ran
	// out (the IP may have moved meanwhile). Muting or unmuting an IP
	// moves its lease between the sets (unmuting renews it, see
	// applyARP).
	leases map[netip.Addr]time.Time
	// muted: the held IPs the last Apply muted (sorted, a subset of
	// held). Their lease is in asking, never in live, and fresh is false
	// for them (no gratuitous ARP repeat).
	muted []netip.Addr
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

func (a *arpLease) askingSet() *nftables.Set {
	return &nftables.Set{Table: a.table(), Name: arpSetAsking, KeyType: nftables.TypeIPAddr, HasTimeout: true}
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

// arpElements: the keys, with the lease as timeout for live and asking
// (the kernel counts in milliseconds: rounded up, never zero, which would
// mean none; 0: no timeout).
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

// keep renews the leases of every held IP, in live or, for the muted
// ones, in asking (see Dataplane.KeepARP).
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
	return a.writeLocked(a.held, nil, a.held, a.muted)
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

// leaseElements splits the leases of hold between the live and the
// asking set: an IP of muted (sorted) has its lease in asking, every
// other in live. The lease is a full one for the IPs of full, what is
// left of the last full one for every other (none when it ran out, or
// when this process never wrote one): muting or unmuting an IP moves what
// is left of its lease to the other set. With the lease disabled there is
// no live element, and the muted IPs of hold are in asking without a
// timeout.
func (a *arpLease) leaseElements(hold, full, muted []netip.Addr, now time.Time) (live, asking []nftables.SetElement) {
	for _, ip := range hold {
		_, m := slices.BinarySearchFunc(muted, ip, netip.Addr.Compare)
		if !a.enabled() {
			if m {
				asking = append(asking, arpElements([]netip.Addr{ip}, 0)...)
			}
			continue
		}
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
		if m {
			asking = append(asking, arpElements([]netip.Addr{ip}, d)...)
		} else {
			live = append(live, arpElements([]netip.Addr{ip}, d)...)
		}
	}
	return live, asking
}

// leasesWritten records the leases of a write begun at start, and what it
// left held and muted.
func (a *arpLease) leasesWritten(hold, full, muted []netip.Addr, start time.Time) {
	if a.leases == nil {
		a.leases = map[netip.Addr]time.Time{}
	}
	a.held = slices.Clone(hold)
	a.muted = intersect(muted, a.held)
	for ip := range a.leases {
		if !slices.Contains(a.held, ip) {
			delete(a.leases, ip)
		}
	}
	if !a.enabled() {
		return
	}
	for _, ip := range full {
		if slices.Contains(a.held, ip) {
			a.leases[ip] = start
		}
	}
}

// writeLocked makes the kernel's held set hold, in one transaction: held
// gets hold added (a no-op for the ones it has) and del deleted (IPs known
// to be in it), live and asking are flushed and refilled (so a lease never
// depends on how the kernel updates an element's timeout) with the leases
// of leaseElements: in asking for the IPs of muted, in live for the
// others, a full lease for the IPs of full, what is left of their lease
// for the others. When that fails (the table, a set or an element is
// gone: someone flushed the ruleset; or the table is an older version's,
// without asking), the whole table is written anew in one transaction.
func (a *arpLease) writeLocked(hold, del, full, muted []netip.Addr) error {
	start := time.Now()
	live, asking := a.leaseElements(hold, full, muted, start)
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	held, liveSet, askingSet := a.heldSet(), a.liveSet(), a.askingSet()
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
		c.FlushSet(askingSet)
		if len(asking) > 0 {
			if err := c.SetAddElements(askingSet, asking); err != nil {
				return err
			}
		}
		return c.Flush()
	}()
	if err == nil {
		a.leasesWritten(hold, full, muted, start)
		return nil
	}
	a.dropConnLocked()
	if rerr := a.rewriteLocked(hold, full, muted); rerr != nil {
		return fmt.Errorf("arp lease: %w (rewriting the table: %w)", err, rerr)
	}
	a.log.Warn("arp table rewritten", zap.String("table", a.cfg.Table), zap.Stringers("held", hold), zap.NamedError("cause", err))
	return nil
}

// rewriteLocked replaces the arp table, whatever state it is in, by one
// holding hold with leases in live and asking (see writeLocked), in one
// transaction (add, delete and add the table: the first add makes the
// delete valid when there is none).
func (a *arpLease) rewriteLocked(hold, full, muted []netip.Addr) error {
	start := time.Now()
	liveElems, askingElems := a.leaseElements(hold, full, muted, start)
	c, err := a.connLocked()
	if err != nil {
		return err
	}
	t := a.table()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	held, live, asking := a.heldSet(), a.liveSet(), a.askingSet()
	held.Table, live.Table, asking.Table = t, t, t
	if err := c.AddSet(held, arpElements(hold, 0)); err != nil {
		return err
	}
	if err := c.AddSet(live, liveElems); err != nil {
		return err
	}
	if err := c.AddSet(asking, askingElems); err != nil {
		return err
	}
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: arpChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookRef(arpHookOutput), Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: arpAskRuleExprs(asking), UserData: arpAskRuleUserData()})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: arpRuleExprs(held, live), UserData: arpRuleUserData()})
	if err := c.Flush(); err != nil {
		a.dropConnLocked()
		return err
	}
	a.leasesWritten(hold, full, muted, start)
	return nil
}

// fresh reports whether the kernel answers ARP for ip as far as the lease
// goes: its lease was written less than ARPLease ago (always, with the
// lease disabled; never while it is muted: its lease is in asking, which
// lets its requests out, not its replies). Gratuitous
// ARP leaves through a packet socket, past the arp table: a repeat is sent
// only while fresh says so, or an agent that resumes after a pause would
// announce an IP that moved meanwhile.
func (a *arpLease) fresh(ip netip.Addr) bool {
	if !a.enabled() {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, m := slices.BinarySearchFunc(a.muted, ip, netip.Addr.Compare); m {
		return false
	}
	t, ok := a.leases[ip] // only held IPs have one
	return ok && time.Since(t) < a.cfg.ARPLease
}

// arpState is what readLocked found.
type arpState struct {
	exists bool
	// ok: the table is exactly ours (sets, chain, rules), whatever the
	// elements. A table of an older version (without asking and its
	// rule) is not.
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
	setsOK := len(sets) == 3
	for _, s := range sets {
		switch {
		case s.Name == arpSetHeld && s.KeyType.Name == nftables.TypeIPAddr.Name && !s.HasTimeout && !s.Interval && !s.IsMap && !s.Constant:
			held = s
		case (s.Name == arpSetLive || s.Name == arpSetAsking) && s.KeyType.Name == nftables.TypeIPAddr.Name &&
			s.HasTimeout && s.Timeout == 0 && !s.Interval && !s.IsMap && !s.Constant:
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
	st.ok = arpRulesOK(rules)
	return st, nil
}

// arpRulesOK tells whether rules (the output chain's, in order) are
// exactly the two rewriteLocked writes: requests of asking accepted, then
// the drop.
func arpRulesOK(rules []*nftables.Rule) bool {
	want := [][]expr.Any{
		normalize(arpAskRuleExprs(&nftables.Set{Name: arpSetAsking})),
		normalize(arpRuleExprs(&nftables.Set{Name: arpSetHeld}, &nftables.Set{Name: arpSetLive})),
	}
	comments := [][]byte{arpAskRuleUserData(), arpRuleUserData()}
	if len(rules) != len(want) {
		return false
	}
	for i, r := range rules {
		if string(r.UserData) != string(comments[i]) || !reflect.DeepEqual(normalize(r.Exprs), want[i]) {
			return false
		}
	}
	return true
}

// ensure is the full Apply's step, before floating IPs are added: the
// arp table exists, exactly ours (an older version's is rewritten), held
// holds exactly hold (IPs that are not ours leave it), the IPs of muted
// (a subset of hold) have their lease in asking and none in live from
// now on, the others in live; the IPs of full (about to be added, or
// unmuted) get a full lease, and every other keeps what is left of its
// own: an Apply never brings back a lease that ran out (the agent
// stopped, or lost the leader's probes, and the IP may have moved
// meanwhile; KeepARP renews it once that is ruled out).
func (a *arpLease) ensure(hold, full, muted []netip.Addr) error {
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
		return a.rewriteLocked(hold, full, muted)
	}
	del, _ := diffAddrs(hold, st.held) // in the kernel, not wanted
	return a.writeLocked(hold, del, full, muted)
}

// mutedIPs returns the held IPs the last Apply muted.
func (a *arpLease) mutedIPs() []netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.muted)
}

// muteChanges splits the muted IPs of an Apply: held are the floating IPs
// it holds, was the IPs the previous Apply muted, muted the IPs muted now
// (all sorted). now: the muted IPs it holds (no lease, not announced);
// unmuted: those it holds that were muted and are no more (a full lease at
// once, announced anew).
func muteChanges(held, was, muted []netip.Addr) (now, unmuted []netip.Addr) {
	now = intersect(muted, held)
	unmuted, _ = diffAddrs(now, intersect(was, held))
	return now, unmuted
}

// hold makes held hold exactly ips (sorted), the IPs known to be held
// that are not in ips leaving it; the leases keep what is left of them,
// the muted IPs stay muted.
func (a *arpLease) hold(ips []netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.loadLocked(); err != nil {
		return err
	}
	del, _ := diffAddrs(ips, a.held)
	return a.writeLocked(ips, del, nil, a.muted)
}

// unhold removes ips from held (all: every IP), live and asking.
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
	return a.writeLocked(keep, del, nil, a.muted)
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
	a.held, a.loaded, a.leases, a.muted = nil, true, nil, nil
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
// Config.ARPLease more, the node answers ARP for them and sends its own
// requests with them as sender; for the muted ones
// (selector.NodeState.Muted, as of this Dataplane's last Apply; before
// its first, none is known muted) it only sends its own requests (the
// lease is in the asking set, not in live). The agent calls it often
// (every 100 ms for the default lease of 300 ms) from a goroutine of its
// own: when it stops (the agent frozen or stuck), the node stops
// answering ARP for its floating IPs within the lease, so that a node the
// operator has moved an IP away from does not answer for it any more
// while the new holder does, and stops sending requests with them as
// sender, which would teach the hosts that receive them its MAC for the
// IP.
//
// It is one nftables transaction (the held set refilled, the live and
// asking sets flushed and refilled), never waits for an Apply or a
// Release (it does not take the Dataplane's lock) and rewrites the arp
// table when it is gone (or an older version's). With nothing held it
// does nothing; with the lease disabled (Config.ARPLease negative)
// neither.
func (d *Dataplane) KeepARP(ctx context.Context) error {
	return d.arp.keep(ctx)
}

// applyARP is the full Apply's step before the floating IPs are added:
// hold (the IPs held during the Apply) are in the arp table, muted (a
// subset) with their lease in asking (requests only), the others in
// live; full (those it adds, muted or not, or unmutes) get a full lease,
// the others what is left of theirs (an IP muted now moves what is left
// of its live lease to asking). With the lease disabled the kernel
// answers for every address on the uplink but the muted ones: the arp
// table holds them alone, in held and in asking without a timeout (their
// requests pass, their replies do not), or there is none.
func (d *Dataplane) applyARP(hold, full, muted []netip.Addr) error {
	if !d.arp.enabled() {
		if len(muted) == 0 {
			deleted, err := d.arp.remove()
			if deleted {
				d.log.Info("arp table deleted (arp lease disabled)", zap.String("table", d.cfg.Table))
			}
			return err
		}
		hold, full = muted, nil
	}
	if err := d.arp.ensure(hold, full, muted); err != nil {
		return fmt.Errorf("arp lease: %w", err)
	}
	return nil
}

// releaseARP: ips (all: every IP) left the uplink; they leave the arp
// table (with the lease disabled, only while it holds muted IPs). Best
// effort: a failure is logged, the next Apply converges.
func (d *Dataplane) releaseARP(ips []netip.Addr, all bool) {
	if !d.arp.enabled() && len(d.arp.mutedIPs()) == 0 {
		return
	}
	if err := d.arp.unhold(ips, all); err != nil {
		d.log.Warn("arp lease: released ips not removed from the arp table", zap.Stringers("ips", ips), zap.Error(err))
	}
}
