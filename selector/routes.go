package selector

import (
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
)

// Defaults of the agent's kernel settings, shared by the agent, the dataplane
// and egressnatctl (one place).
const (
	// DefaultMarkMask holds the fwmark bits egressnat uses: clear of
	// kube-proxy (0x4000, 0x8000) and Calico (0xffff0000).
	DefaultMarkMask uint32 = 0x00003f00
	// DefaultRouteTableBase: next hop index i is routed by table base+i.
	DefaultRouteTableBase = 2700
	// DefaultRulePriority of the fwmark ip rules, before main (32766).
	DefaultRulePriority = 29000
)

// MaxMarks bounds the number of next hops one mark mask can address, so that
// route table numbers (base + index) stay in a small, predictable range even
// when an operator configures a wide mask.
const MaxMarks = 65535

// MaxMarkIndex returns the highest mark index mask can express: every
// non-zero value made of mask bits, at most MaxMarks+1.
func MaxMarkIndex(mask uint32) int {
	n := bits.OnesCount32(mask)
	if n > 16 {
		return MaxMarks + 1
	}
	return 1<<n - 1
}

// RPMarkIndex is the mark index a gateway reserves for the traffic other
// nodes reroute to it (the highest: with mask 0x3f00, mark 0x3f00): the
// reverse-path check of such packets looks their source up by that mark
// (see nft). 0 when mask has a single bit, too narrow to reserve one.
func RPMarkIndex(mask uint32) int {
	if m := MaxMarkIndex(mask); m >= 2 {
		return m
	}
	return 0
}

// ReplyMarkIndex is the mark index a gateway reserves for the replies to
// the traffic other nodes reroute to it (the one below RPMarkIndex: with
// mask 0x3f00, mark 0x3e00): they are routed back to the node that sent
// the request by the uplink (see nft). 0 when mask has fewer than three
// bits: the replies then follow the main table.
func ReplyMarkIndex(mask uint32) int {
	if m := MaxMarkIndex(mask); m >= 7 {
		return m - 1
	}
	return 0
}

// MarkCapacity returns how many distinct next hops fit in mask: every
// mark index but RPMarkIndex's and ReplyMarkIndex's, at most MaxMarks.
func MarkCapacity(mask uint32) int {
	m := MaxMarkIndex(mask)
	if RPMarkIndex(mask) != 0 {
		m--
	}
	if ReplyMarkIndex(mask) != 0 {
		m--
	}
	return min(m, MaxMarks)
}

// MarkValue returns the packet mark for a mark index (1-based): the bits
// of index are spread over the set bits of mask, lowest first. With mask
// 0x3f00, index 1 is 0x100, index 2 is 0x200, index 3 is 0x300. It returns 0
// when index is out of range.
func MarkValue(mask uint32, index int) uint32 {
	if index < 1 || index > MaxMarkIndex(mask) {
		return 0
	}
	var v uint32
	idx := uint32(index)
	for m := mask; m != 0 && idx != 0; m &= m - 1 {
		low := m & -m
		if idx&1 != 0 {
			v |= low
		}
		idx >>= 1
	}
	return v
}

// NextHops returns the distinct next hops of the ModeReroute policies of
// state, sorted.
func NextHops(state NodeState) []netip.Addr {
	var out []netip.Addr
	for _, p := range state.Policies {
		if p.Mode == ModeReroute && p.NextHop.IsValid() {
			out = append(out, p.NextHop)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out)
}

// AllocateMarks gives every next hop a mark index in [1, MarkCapacity(mask)].
//
// existing holds the assignments read back from the kernel; it may name next
// hops that are no longer wanted. The allocation is stable: a wanted next hop
// keeps its existing index. A new next hop takes the lowest index that no
// existing assignment uses (so a route still in use is not repointed while
// the old marks may be in flight); when none is left it takes the lowest
// index that no wanted next hop keeps. It fails when mask is exhausted.
//
// Invalid existing entries (index out of range, or an index claimed twice) are
// resolved deterministically: out-of-range indexes are ignored and, of two
// next hops claiming one index, the lower address keeps it.
func AllocateMarks(mask uint32, nextHops []netip.Addr, existing map[netip.Addr]int) (map[netip.Addr]int, error) {
	capacity := MarkCapacity(mask)
	want := slices.Clone(nextHops)
	slices.SortFunc(want, func(a, b netip.Addr) int { return a.Compare(b) })
	want = slices.Compact(want)
	if len(want) > capacity {
		return nil, fmt.Errorf("mark mask %#x holds %d next hops, %d needed", mask, capacity, len(want))
	}

	// Existing assignments, de-duplicated deterministically.
	held := make([]netip.Addr, 0, len(existing))
	for nh, idx := range existing {
		if idx >= 1 && idx <= capacity {
			held = append(held, nh)
		}
	}
	slices.SortFunc(held, func(a, b netip.Addr) int { return a.Compare(b) })
	owner := make(map[int]netip.Addr, len(held)) // index -> next hop in kernel
	for _, nh := range held {
		if _, taken := owner[existing[nh]]; !taken {
			owner[existing[nh]] = nh
		}
	}

	out := make(map[netip.Addr]int, len(want))
	kept := make(map[int]bool, len(want))
	for _, nh := range want {
		if idx, ok := existing[nh]; ok && owner[idx] == nh {
			out[nh] = idx
			kept[idx] = true
		}
	}
	next := 1 // lowest index never held
	for _, nh := range want {
		if _, ok := out[nh]; ok {
			continue
		}
		for next <= capacity {
			if _, held := owner[next]; !held {
				break
			}
			next++
		}
		if next <= capacity {
			out[nh] = next
			kept[next] = true
			next++
			continue
		}
		// Every index is in the kernel: reuse the lowest stale one.
		idx := 1
		for idx <= capacity && kept[idx] {
			idx++
		}
		if idx > capacity {
			return nil, fmt.Errorf("mark mask %#x exhausted", mask)
		}
		out[nh] = idx
		kept[idx] = true
	}
	return out, nil
}

// LimitNextHops splits next hops into those that get a mark and those that
// do not fit mask: next hops holding a mark in the kernel (existing) keep
// it first, then the lowest addresses, up to MarkCapacity(mask). The
// policies of a next hop without a mark fail closed (Drop) on this node;
// every other policy keeps working.
func LimitNextHops(mask uint32, nextHops []netip.Addr, existing map[netip.Addr]int) (kept, dropped []netip.Addr) {
	capacity := MarkCapacity(mask)
	want := slices.Clone(nextHops)
	slices.SortFunc(want, func(a, b netip.Addr) int { return a.Compare(b) })
	want = slices.Compact(want)
	if len(want) <= capacity {
		return want, nil
	}
	slices.SortStableFunc(want, func(a, b netip.Addr) int {
		_, ha := existing[a]
		_, hb := existing[b]
		switch {
		case ha && !hb:
			return -1
		case hb && !ha:
			return 1
		}
		return 0
	})
	kept, dropped = want[:capacity:capacity], slices.Clone(want[capacity:])
	kept = slices.Clone(kept)
	slices.SortFunc(kept, func(a, b netip.Addr) int { return a.Compare(b) })
	slices.SortFunc(dropped, func(a, b netip.Addr) int { return a.Compare(b) })
	return kept, dropped
}

// UnroutableHolders returns, of the nodes holding egress IPs (by name, with
// their next-hop addresses), those a node routing to all of them cannot
// give a mark: the ones LimitNextHops drops on a node with no mark yet,
// beyond MarkCapacity(mask). The operator tells their policies.
func UnroutableHolders(mask uint32, holders map[string]netip.Addr) []string {
	var nhs []netip.Addr
	byIP := map[netip.Addr]string{}
	for name, ip := range holders {
		if ip.IsValid() {
			nhs = append(nhs, ip)
			byIP[ip] = name
		}
	}
	_, dropped := LimitNextHops(mask, nhs, nil)
	var out []string
	for _, ip := range dropped {
		out = append(out, byIP[ip])
	}
	slices.Sort(out)
	return out
}
