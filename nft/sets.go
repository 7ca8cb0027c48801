package nft

import (
	"cmp"
	"net/netip"
	"slices"
	"sort"

	"github.com/google/nftables"
)

// addrElems encodes IPv4 addresses as elements of an ipv4_addr set.
func addrElems(addrs []netip.Addr) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(addrs))
	for _, a := range addrs {
		b := a.As4()
		out = append(out, nftables.SetElement{Key: b[:]})
	}
	return out
}

// elemAddrs decodes the elements of an ipv4_addr set; malformed keys are
// skipped.
func elemAddrs(elems []nftables.SetElement) []netip.Addr {
	out := make([]netip.Addr, 0, len(elems))
	for _, e := range elems {
		if a, ok := netip.AddrFromSlice(e.Key); ok && a.Is4() {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// diffAddrs returns want minus have and have minus want; both inputs sorted
// and without duplicates.
func diffAddrs(have, want []netip.Addr) (added, removed []netip.Addr) {
	return diffSorted(have, want, netip.Addr.Compare)
}

// diffSorted returns want minus have and have minus want, both inputs
// sorted by cmp and without duplicates.
func diffSorted[T any](have, want []T, cmp func(a, b T) int) (added, removed []T) {
	i, j := 0, 0
	for i < len(have) || j < len(want) {
		switch {
		case i == len(have):
			added = append(added, want[j])
			j++
		case j == len(want):
			removed = append(removed, have[i])
			i++
		default:
			switch c := cmp(have[i], want[j]); {
			case c == 0:
				i++
				j++
			case c < 0:
				removed = append(removed, have[i])
				i++
			default:
				added = append(added, want[j])
				j++
			}
		}
	}
	return added, removed
}

// ipRange is one interval of an interval set: [start, end), or [start,
// 255.255.255.255] when open (nftables then holds no end element).
type ipRange struct {
	start netip.Addr
	end   netip.Addr
	open  bool
}

var maxIPv4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})

func prefixRange(p netip.Prefix) ipRange {
	p = p.Masked()
	start := p.Addr()
	b := start.As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	size := uint64(1) << (32 - p.Bits())
	last := uint64(n) + size - 1
	if last >= 0xffffffff {
		return ipRange{start: start, open: true}
	}
	e := uint32(last + 1)
	return ipRange{start: start, end: netip.AddrFrom4([4]byte{byte(e >> 24), byte(e >> 16), byte(e >> 8), byte(e)})}
}

// last is the highest address in r.
func (r ipRange) last() netip.Addr {
	if r.open {
		return maxIPv4
	}
	return r.end.Prev()
}

func (r ipRange) contains(a netip.Addr) bool {
	if a.Compare(r.start) < 0 {
		return false
	}
	return r.open || a.Compare(r.end) < 0
}

func (r ipRange) elems() []nftables.SetElement {
	s := r.start.As4()
	out := []nftables.SetElement{{Key: s[:]}}
	if !r.open {
		e := r.end.As4()
		out = append(out, nftables.SetElement{Key: e[:], IntervalEnd: true})
	}
	return out
}

func compareRange(a, b ipRange) int {
	if c := a.start.Compare(b.start); c != 0 {
		return c
	}
	if a.open != b.open {
		if a.open {
			return 1
		}
		return -1
	}
	return a.end.Compare(b.end)
}

func prefixRanges(ps []netip.Prefix) []ipRange {
	out := make([]ipRange, 0, len(ps))
	for _, p := range ps {
		out = append(out, prefixRange(p))
	}
	slices.SortFunc(out, compareRange)
	return slices.Compact(out)
}

// elemRanges decodes the elements of an interval set as the kernel dumps
// them (in any order, start and end elements separate).
func elemRanges(elems []nftables.SetElement) []ipRange {
	type point struct {
		a   netip.Addr
		end bool
	}
	pts := make([]point, 0, len(elems))
	for _, e := range elems {
		if a, ok := netip.AddrFromSlice(e.Key); ok && a.Is4() {
			pts = append(pts, point{a, e.IntervalEnd})
		}
	}
	// At one address an end closes the previous interval before a start
	// opens the next (adjacent prefixes).
	slices.SortFunc(pts, func(x, y point) int {
		if c := x.a.Compare(y.a); c != 0 {
			return c
		}
		if x.end == y.end {
			return 0
		}
		if x.end {
			return -1
		}
		return 1
	})
	var out []ipRange
	var open *netip.Addr
	for _, p := range pts {
		switch {
		case !p.end && open == nil:
			a := p.a
			open = &a
		case !p.end && open != nil:
			// A start without an end: only valid as the last one. Record it
			// so that the diff deletes it.
			out = append(out, ipRange{start: *open, open: true})
			a := p.a
			open = &a
		case p.end && open != nil:
			out = append(out, ipRange{start: *open, end: p.a})
			open = nil
		default:
			// An end without a start (libnftables-style leading 0.0.0.0
			// end): keep it as a degenerate range so it is deleted.
			out = append(out, ipRange{start: p.a, end: p.a})
		}
	}
	if open != nil {
		out = append(out, ipRange{start: *open, open: true})
	}
	slices.SortFunc(out, compareRange)
	return out
}

// Intervals returns the intervals an interval set's elements describe, as
// their first and last address, in order (as the kernel dumps them or as
// the agent writes them).
func Intervals(elems []nftables.SetElement) [][2]netip.Addr {
	var out [][2]netip.Addr
	for _, r := range elemRanges(elems) {
		if !r.open && r.start == r.end {
			continue // a lone end element holds no address
		}
		out = append(out, [2]netip.Addr{r.start, r.last()})
	}
	return out
}

func (r ipRange) elemsForDelete() []nftables.SetElement {
	if !r.open && r.start == r.end { // lone end element
		e := r.end.As4()
		return []nftables.SetElement{{Key: e[:], IntervalEnd: true}}
	}
	return r.elems()
}

func diffRanges(have, want []ipRange) (added, removed []ipRange) {
	return diffSorted(have, want, compareRange)
}

// rangeCluster is a group of removed and added ranges that overlap one
// another, so they must change in one transaction (deletes first) to keep
// the interval set free of overlaps.
type rangeCluster struct {
	removed, added []ipRange
}

func (c rangeCluster) weight() int {
	n := 0
	for _, r := range c.removed {
		n += len(r.elemsForDelete())
	}
	for _, r := range c.added {
		n += len(r.elems())
	}
	return n
}

// clusterRanges groups overlapping ranges of a diff. Clusters holding only
// additions or only removals can be applied on their own.
func clusterRanges(added, removed []ipRange) []rangeCluster {
	type tagged struct {
		r   ipRange
		add bool
	}
	all := make([]tagged, 0, len(added)+len(removed))
	for _, r := range added {
		all = append(all, tagged{r, true})
	}
	for _, r := range removed {
		all = append(all, tagged{r, false})
	}
	slices.SortFunc(all, func(a, b tagged) int {
		return cmp.Or(compareRange(a.r, b.r), cmp.Compare(boolInt(a.add), boolInt(b.add)))
	})
	var out []rangeCluster
	var cur rangeCluster
	var curLast netip.Addr
	for _, t := range all {
		empty := len(cur.added)+len(cur.removed) == 0
		if !empty && t.r.start.Compare(curLast) > 0 {
			out = append(out, cur)
			cur = rangeCluster{}
			empty = true
		}
		if empty || t.r.last().Compare(curLast) > 0 {
			curLast = t.r.last()
		}
		if t.add {
			cur.added = append(cur.added, t.r)
		} else {
			cur.removed = append(cur.removed, t.r)
		}
	}
	if len(cur.added)+len(cur.removed) > 0 {
		out = append(out, cur)
	}
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// addrSpan is an inclusive address interval.
type addrSpan struct{ lo, hi netip.Addr }

// spanSet is a sorted list of disjoint spans, for fast membership tests.
type spanSet []addrSpan

func newSpanSet(rs ...[]ipRange) spanSet {
	var all []addrSpan
	for _, l := range rs {
		for _, r := range l {
			if hi := r.last(); hi.Compare(r.start) >= 0 {
				all = append(all, addrSpan{r.start, hi})
			}
		}
	}
	slices.SortFunc(all, func(a, b addrSpan) int { return a.lo.Compare(b.lo) })
	var out spanSet
	for _, s := range all {
		if n := len(out); n > 0 && (s.lo.Compare(out[n-1].hi) <= 0 || out[n-1].hi.Next() == s.lo) {
			if s.hi.Compare(out[n-1].hi) > 0 {
				out[n-1].hi = s.hi
			}
			continue
		}
		out = append(out, s)
	}
	return out
}

func (ss spanSet) contains(a netip.Addr) bool {
	i := sort.Search(len(ss), func(i int) bool { return ss[i].hi.Compare(a) >= 0 })
	return i < len(ss) && ss[i].lo.Compare(a) <= 0
}

// intersect returns the addresses of x that are in y (sorted).
func intersect(x, y []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range x {
		if _, ok := slices.BinarySearchFunc(y, a, netip.Addr.Compare); ok {
			out = append(out, a)
		}
	}
	return out
}

// union returns the addresses of x and y, sorted, without duplicates.
func union(x, y []netip.Addr) []netip.Addr {
	out := slices.Concat(x, y)
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}
