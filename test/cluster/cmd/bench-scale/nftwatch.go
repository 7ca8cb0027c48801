package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// tableName is the nftables table (family ip) the agent owns.
const tableName = "egressnat"

var podRange = netip.MustParsePrefix("10.244.0.0/16")

// watch follows one node's nftables changes through the kernel's netlink
// multicast group (what `nft monitor` does): every element added to or
// deleted from a set of our table arrives as a notification when the
// transaction commits. It keeps per-set element counts and, for addresses
// in 10.244.0.0/16, the time the first element carrying them arrived.
//
// The time of an event is when the bench's receiving goroutine got it, a
// few microseconds after the commit unless the machine is saturated. While
// someone listens, the kernel builds one notification per element, which
// adds a little to the agent's commits (about a microsecond per element).
type watch struct {
	node string
	conn *netlink.Conn
	wake chan struct{}

	mu       sync.Mutex
	sets     map[string]int // set -> elements (interval ends not counted)
	seen     map[netip.Addr]time.Time
	last     time.Time // last change of our table (elements, sets, rules, chains)
	changes  int64     // element notifications
	overruns int       // ENOBUFS: notifications lost
	err      error
}

func newWatch(node, netns string) (*watch, error) {
	f, err := os.Open("/run/netns/" + netns)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(f.Fd())})
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", netns, err)
	}
	if err := conn.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		conn.Close()
		return nil, fmt.Errorf("join nftables group in %s: %w", netns, err)
	}
	rc, err := conn.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 256<<20)
		})
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("receive buffer: %w", err)
	}
	w := &watch{node: node, conn: conn, wake: make(chan struct{}, 1),
		sets: map[string]int{}, seen: map[netip.Addr]time.Time{}}
	go w.loop()
	return w, nil
}

func (w *watch) Close() { w.conn.Close() }

func (w *watch) loop() {
	for {
		msgs, err := w.conn.Receive()
		now := time.Now()
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				w.mu.Lock()
				w.overruns++
				w.mu.Unlock()
				continue
			}
			w.mu.Lock()
			if !strings.Contains(err.Error(), "closed") {
				w.err = err
			}
			w.mu.Unlock()
			return
		}
		w.mu.Lock()
		for _, m := range msgs {
			w.handle(m, now)
		}
		w.mu.Unlock()
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

// Attribute numbers of linux/netfilter/nf_tables.h.
const (
	nftaTableName         = 1
	nftaSetTable          = 1
	nftaSetName           = 2
	nftaSetElemListTable  = 1
	nftaSetElemListSet    = 2
	nftaSetElemListElems  = 3
	nftaListElem          = 1
	nftaSetElemKey        = 1
	nftaSetElemFlags      = 3
	nftaDataValue         = 1
	nftSetElemIntervalEnd = 1
)

func (w *watch) handle(m netlink.Message, now time.Time) {
	t := uint16(m.Header.Type)
	if t>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 || m.Data[0] != unix.NFPROTO_IPV4 {
		return
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return
	}
	switch t & 0xff {
	case unix.NFT_MSG_DELTABLE:
		for ad.Next() {
			if ad.Type() == nftaTableName && ad.String() == tableName {
				w.sets = map[string]int{}
				w.last = now
			}
		}
	case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN:
		for ad.Next() {
			if ad.Type() == 1 && ad.String() == tableName { // NFTA_RULE_TABLE, NFTA_CHAIN_TABLE
				w.last = now
			}
		}
	case unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET:
		var table, set string
		for ad.Next() {
			switch ad.Type() {
			case nftaSetTable:
				table = ad.String()
			case nftaSetName:
				set = ad.String()
			}
		}
		if table != tableName {
			return
		}
		if t&0xff == unix.NFT_MSG_DELSET {
			delete(w.sets, set)
		} else if _, ok := w.sets[set]; !ok {
			w.sets[set] = 0
		}
		w.last = now
	case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
		var table, set string
		var elems []byte
		for ad.Next() {
			switch ad.Type() {
			case nftaSetElemListTable:
				table = ad.String()
			case nftaSetElemListSet:
				set = ad.String()
			case nftaSetElemListElems:
				elems = ad.Bytes()
			}
		}
		if table != tableName {
			return
		}
		add := t&0xff == unix.NFT_MSG_NEWSETELEM
		forEachElem(elems, func(key []byte, end bool) {
			w.changes++
			if end {
				return
			}
			if add {
				w.sets[set]++
				for i := 0; i+4 <= len(key); i += 4 {
					a := netip.AddrFrom4([4]byte(key[i : i+4]))
					if podRange.Contains(a) {
						if _, ok := w.seen[a]; !ok {
							w.seen[a] = now
						}
					}
				}
			} else {
				w.sets[set]--
			}
		})
		w.last = now
	}
}

func forEachElem(b []byte, fn func(key []byte, end bool)) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return
	}
	for ad.Next() {
		if ad.Type() != nftaListElem {
			continue
		}
		ad.Nested(func(e *netlink.AttributeDecoder) error {
			var key []byte
			var flags uint32
			for e.Next() {
				switch e.Type() {
				case nftaSetElemKey:
					e.Nested(func(k *netlink.AttributeDecoder) error {
						for k.Next() {
							if k.Type() == nftaDataValue {
								key = k.Bytes()
							}
						}
						return nil
					})
				case nftaSetElemFlags:
					if v := e.Bytes(); len(v) == 4 {
						flags = binary.BigEndian.Uint32(v)
					}
				}
			}
			fn(key, flags&nftSetElemIntervalEnd != 0)
			return nil
		})
	}
}

// counts is what the watch saw of the table.
type counts struct {
	src, dst, total int
	last            time.Time
	changes         int64
	overruns        int
	err             error
}

func (w *watch) counts() counts {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := counts{last: w.last, changes: w.changes, overruns: w.overruns, err: w.err}
	for name, n := range w.sets {
		c.total += n
		switch {
		case strings.HasPrefix(name, "src-"):
			c.src += n
		case strings.HasPrefix(name, "dst-"):
			c.dst += n
		}
	}
	return c
}

// seenAt is when an element carrying ip first arrived.
func (w *watch) seenAt(ip netip.Addr) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t, ok := w.seen[ip]
	return t, ok
}

// forget drops the first-seen times of ips (before they are measured again).
func (w *watch) forget(ips []netip.Addr) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, ip := range ips {
		delete(w.seen, ip)
	}
}

// tableDump is our table as read back through netlink with
// github.com/google/nftables, opened on the node's namespace.
type tableDump struct {
	exists          bool
	sets            map[string][]string // set -> sorted element descriptors
	rules           map[string]int      // chain -> rules
	src, dst, total int                 // elements without interval ends
	took            time.Duration
}

// dumpTable reads our table in netns. A set or chain that goes while it is
// read (the agent replacing its guard table as it starts) makes it read
// the table again, a few times.
func dumpTable(netns string) (*tableDump, error) {
	for try := 0; ; try++ {
		d, err := dumpTableOnce(netns)
		if err == nil || !errors.Is(err, syscall.ENOENT) || try == 4 {
			return d, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dumpTableOnce(netns string) (*tableDump, error) {
	start := time.Now()
	f, err := os.Open("/run/netns/" + netns)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return nil, err
	}
	d := &tableDump{sets: map[string][]string{}, rules: map[string]int{}}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("list tables in %s: %w", netns, err)
	}
	var t *nftables.Table
	for _, x := range tables {
		if x.Name == tableName {
			t = x
		}
	}
	if t == nil {
		d.took = time.Since(start)
		return d, nil
	}
	d.exists = true
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("list sets in %s: %w", netns, err)
	}
	for _, s := range sets {
		elems, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("elements of %s in %s: %w", s.Name, netns, err)
		}
		descs := make([]string, 0, len(elems))
		n := 0
		for _, e := range elems {
			if e.IntervalEnd && allZero(e.Key) {
				// libnftables (nft -f) opens an interval set with an end
				// element at 0.0.0.0; it holds no address.
				continue
			}
			desc := hex.EncodeToString(e.Key)
			if e.IntervalEnd {
				desc += "/end"
			} else {
				n++
			}
			descs = append(descs, desc)
		}
		slices.Sort(descs)
		d.sets[s.Name] = descs
		d.total += n
		switch {
		case strings.HasPrefix(s.Name, "src-"):
			d.src += n
		case strings.HasPrefix(s.Name, "dst-"):
			d.dst += n
		}
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("list chains in %s: %w", netns, err)
	}
	for _, ch := range chains {
		if ch.Table.Name != tableName {
			continue
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return nil, fmt.Errorf("rules of %s in %s: %w", ch.Name, netns, err)
		}
		d.rules[ch.Name] = len(rules)
	}
	d.took = time.Since(start)
	return d, nil
}

// signature identifies the table's content independently of set names (an
// agent may fill a huge set under a new name and swap the rule over): the
// multiset of set contents and the rule count of every chain.
func (d *tableDump) signature() string {
	if !d.exists {
		return "absent"
	}
	var parts []string
	for _, elems := range d.sets {
		h := sha256.Sum256([]byte(strings.Join(elems, ",")))
		parts = append(parts, hex.EncodeToString(h[:8]))
	}
	slices.Sort(parts)
	var chains []string
	for ch, n := range d.rules {
		chains = append(chains, fmt.Sprintf("%s=%d", ch, n))
	}
	slices.Sort(chains)
	h := sha256.Sum256([]byte(strings.Join(parts, ",") + "|" + strings.Join(chains, ",")))
	return hex.EncodeToString(h[:12])
}

// classFree returns d without the sets whose content depends on the eBPF
// classifier's class allocation (pre-class, classes, and pre-src, which
// holds the pods of chains without a class): the allocation keeps the
// classes a table holds, so a table rebuilt from nothing may give them to
// other chains. d itself in the nftables mode (no pre-class set).
func (d *tableDump) classFree() *tableDump {
	if _, ebpf := d.sets["pre-class"]; !ebpf {
		return d
	}
	out := *d
	out.sets = map[string][]string{}
	for name, elems := range d.sets {
		switch name {
		case "pre-class", "classes", "pre-src":
			out.total -= len(elems)
			out.sets[name] = nil
		default:
			out.sets[name] = elems
		}
	}
	return &out
}

func (d *tableDump) String() string {
	if !d.exists {
		return "no table"
	}
	return fmt.Sprintf("%d sets, %d src + %d dst elements (%d in all), rules %v", len(d.sets), d.src, d.dst, d.total, d.rules)
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// diff describes the first differences between two dumps, for errors.
func (d *tableDump) diff(o *tableDump) string {
	var out []string
	for name, e := range d.sets {
		oe, ok := o.sets[name]
		switch {
		case !ok:
			out = append(out, "set "+name+" missing")
		case strings.Join(e, ",") != strings.Join(oe, ","):
			out = append(out, fmt.Sprintf("set %s: %v vs %v", name, head(e), head(oe)))
		}
		if len(out) >= 3 {
			break
		}
	}
	for ch, n := range d.rules {
		if o.rules[ch] != n {
			out = append(out, fmt.Sprintf("chain %s: %d vs %d rules", ch, n, o.rules[ch]))
		}
	}
	return strings.Join(out, "; ")
}

func head(v []string) []string {
	if len(v) > 6 {
		return v[:6]
	}
	return v
}
