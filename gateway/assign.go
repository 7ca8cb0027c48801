package gateway

import (
	"cmp"
	"container/heap"
	"net/netip"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/selector"
)

// Node is a node as the assignment sees it.
type Node struct {
	Name string
	// ControlPlane: the node has the label node-role.kubernetes.io/control-plane.
	ControlPlane bool
	// Up is the result of Up for the node's liveness.
	Up bool
	// IP is the node IP on its uplink.
	IP netip.Addr
	// Subnets are the uplink subnets the node's agent reports.
	Subnets []netip.Prefix
	// Stale: the node's agent has not renewed its Lease within the Lease's
	// duration (it renews only while its sync loop makes progress). A
	// stale node keeps the IPs it holds while it is Up (moving them would
	// risk two holders) but is given no new one: nobody might program it.
	Stale bool
	// Draining says why the node is to give its floating IPs up (cordoned,
	// labelled for maintenance, its agent stopping); "" when it is not. A
	// draining node is given no new IP, and each IP it holds goes to
	// another node that can hold it (gracefully: see Plan); an IP no other
	// node can hold stays.
	Draining string
}

// Group is a NetworkGatewayGroup reduced to what the assignment needs.
type Group struct {
	Namespace, Name string
	// FloatingIPs in spec order.
	FloatingIPs []netip.Addr
	// Nodes, when not nil, are the only nodes that may hold the group's
	// IPs (its spec.nodeSelector matched against the Nodes' labels); nil
	// means every node.
	Nodes map[string]bool
}

// allows reports whether node may hold g's IPs.
func (g *Group) allows(node string) bool { return g.Nodes == nil || g.Nodes[node] }

// Assign returns, for every floating IP of every group, the name of the node
// holding it. An IP that no node can hold is absent.
//
// A node can hold an IP when it is Up, one of its subnets contains the IP,
// and its group's Nodes allow it; a Stale node keeps what it holds but is
// given no new IP; a Draining node is given no new IP and keeps only what
// no other node can take.
// current is the previous assignment: an IP whose current holder can still
// hold it stays there. Every other IP goes, in order of groups by
// namespace/name and IPs in spec order, to the node that can hold it and
// comes first by: worker before control-plane node, fewer floating IPs held
// (over all groups, counting the IPs kept and those assigned earlier in this
// call), name. An IP listed by several groups is assigned once. Invalid and
// non-IPv4 addresses, and those selector.Unusable refuses, are ignored;
// IPv4-mapped IPv6 addresses are unmapped.
//
// Assign does not judge the groups: the operator passes for each only the
// floating IPs selector.CheckGroups finds usable (none for a group it
// ignores), so that a node's address, an address in use or an IP an older
// group keeps is never assigned.
// Node names are unique; for a repeated name the first node counts.
func Assign(groups []Group, nodes []Node, current map[netip.Addr]string) map[netip.Addr]string {
	out := make(map[netip.Addr]string)
	ix := newNodeIndex(nodes)

	// Deterministic order of IPs: groups by namespace/name, IPs in spec order.
	order := make([]int, len(groups))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		return cmp.Or(cmp.Compare(groups[a].Namespace, groups[b].Namespace), cmp.Compare(groups[a].Name, groups[b].Name))
	})
	// An IP listed by several groups belongs to the first (by
	// namespace/name): its Nodes decide.
	type groupIP struct {
		ip netip.Addr
		g  int
	}
	var ips []groupIP
	seen := make(map[netip.Addr]bool)
	for _, gi := range order {
		for _, ip := range groups[gi].FloatingIPs {
			ip = ip.Unmap()
			if !ip.Is4() || seen[ip] || selector.Unusable(ip) != "" {
				continue
			}
			seen[ip] = true
			ips = append(ips, groupIP{ip, gi})
		}
	}

	counts := make([]int32, len(ix.nodes))
	// Stability first: every IP whose holder can still hold it stays, and
	// counts before any IP is placed.
	// An IP on a draining node that could keep it is pending too, with
	// that node as its fallback.
	var pending []groupIP
	fallback := map[netip.Addr]int{}
	for _, gip := range ips {
		ip := gip.ip
		if n, ok := ix.byName[current[ip]]; ok && ix.nodes[n].Up && containsAny(ix.nodes[n].Subnets, ip) &&
			groups[gip.g].allows(ix.nodes[n].Name) {
			if ix.nodes[n].Draining == "" {
				out[ip] = ix.nodes[n].Name
				counts[n]++
				continue
			}
			fallback[ip] = n
		}
		pending = append(pending, gip)
	}
	keep := func(ip netip.Addr) {
		if n, ok := fallback[ip]; ok {
			out[ip] = ix.nodes[n].Name
			counts[n]++
		}
	}

	// Every IP contained in the same set of indexed subnets has the same
	// candidates; they share one heap. Heap keys hold a snapshot of the
	// node's count; counts only grow, so a stale entry sorts too early and
	// is refreshed when it reaches the top.
	heaps := make(map[string]*candHeap)
	var key strings.Builder
	var matched []netip.Prefix
	for _, gip := range pending {
		ip, g := gip.ip, &groups[gip.g]
		matched = ix.subnetsContaining(ip, matched[:0])
		if len(matched) == 0 {
			keep(ip)
			continue
		}
		key.Reset()
		for _, p := range matched {
			key.WriteString(p.String())
			key.WriteByte(',')
		}
		if g.Nodes != nil { // its own candidates
			key.WriteString(g.Namespace + "/" + g.Name)
		}
		h, ok := heaps[key.String()]
		if !ok {
			h = ix.newHeap(matched, counts, g.allows)
			heaps[key.String()] = h
		}
		n := h.pick(counts)
		if n < 0 {
			keep(ip)
			continue
		}
		out[ip] = ix.nodes[n].Name
		counts[n]++
		heap.Push(h, ix.entry(n, counts[n]))
	}
	return out
}

// nodeIndex indexes nodes by their masked IPv4 subnets.
type nodeIndex struct {
	nodes    []Node
	rank     []int32 // position of the node in name order
	byName   map[string]int
	bySubnet map[netip.Prefix][]int32 // Up nodes only, in node order
	lengths  []int                    // distinct prefix lengths in bySubnet, longest first
}

func newNodeIndex(nodes []Node) *nodeIndex {
	ix := &nodeIndex{
		nodes:    nodes,
		rank:     make([]int32, len(nodes)),
		byName:   make(map[string]int, len(nodes)),
		bySubnet: make(map[netip.Prefix][]int32),
	}
	byName := make([]int32, 0, len(nodes))
	for i := range nodes {
		if _, dup := ix.byName[nodes[i].Name]; dup {
			continue
		}
		ix.byName[nodes[i].Name] = i
		byName = append(byName, int32(i))
	}
	slices.SortFunc(byName, func(a, b int32) int { return cmp.Compare(nodes[a].Name, nodes[b].Name) })
	for r, n := range byName {
		ix.rank[n] = int32(r)
	}
	var haveLen [33]bool
	for _, n := range byName {
		if !nodes[n].Up || nodes[n].Stale || nodes[n].Draining != "" {
			continue
		}
		for _, s := range nodes[n].Subnets {
			s, ok := canonical4(s)
			if !ok {
				continue
			}
			list := ix.bySubnet[s]
			if len(list) > 0 && list[len(list)-1] == n {
				continue // the same subnet reported twice
			}
			ix.bySubnet[s] = append(list, n)
			haveLen[s.Bits()] = true
		}
	}
	for l := 32; l >= 0; l-- {
		if haveLen[l] {
			ix.lengths = append(ix.lengths, l)
		}
	}
	return ix
}

// subnetsContaining appends the indexed subnets containing ip, longest first.
func (ix *nodeIndex) subnetsContaining(ip netip.Addr, dst []netip.Prefix) []netip.Prefix {
	for _, l := range ix.lengths {
		p := netip.PrefixFrom(ip, l).Masked()
		if _, ok := ix.bySubnet[p]; ok {
			dst = append(dst, p)
		}
	}
	return dst
}

func (ix *nodeIndex) entry(n int32, count int32) cand {
	var cp uint64
	if ix.nodes[n].ControlPlane {
		cp = 1
	}
	return cand{key: cp<<63 | uint64(count)<<32 | uint64(ix.rank[n]), node: n, count: count}
}

func (ix *nodeIndex) newHeap(subnets []netip.Prefix, counts []int32, allows func(node string) bool) *candHeap {
	h := &candHeap{}
	seen := make(map[int32]bool)
	for _, s := range subnets {
		for _, n := range ix.bySubnet[s] {
			if !allows(ix.nodes[n].Name) {
				continue
			}
			if len(subnets) > 1 {
				if seen[n] {
					continue
				}
				seen[n] = true
			}
			h.items = append(h.items, ix.entry(n, counts[n]))
		}
	}
	heap.Init(h)
	h.ix = ix
	return h
}

// cand is a heap entry: key orders worker before control plane, then count,
// then name rank.
type cand struct {
	key   uint64
	node  int32
	count int32
}

type candHeap struct {
	items []cand
	ix    *nodeIndex
}

func (h *candHeap) Len() int           { return len(h.items) }
func (h *candHeap) Less(i, j int) bool { return h.items[i].key < h.items[j].key }
func (h *candHeap) Swap(i, j int)      { h.items[i], h.items[j] = h.items[j], h.items[i] }
func (h *candHeap) Push(x any)         { h.items = append(h.items, x.(cand)) }
func (h *candHeap) Pop() any {
	last := h.items[len(h.items)-1]
	h.items = h.items[:len(h.items)-1]
	return last
}

// pick removes and returns the best node, or -1 when the heap is empty.
func (h *candHeap) pick(counts []int32) int32 {
	for len(h.items) > 0 {
		top := h.items[0]
		if top.count == counts[top.node] {
			heap.Pop(h)
			return top.node
		}
		h.items[0] = h.ix.entry(top.node, counts[top.node])
		heap.Fix(h, 0)
	}
	return -1
}

func canonical4(p netip.Prefix) (netip.Prefix, bool) {
	if !p.IsValid() {
		return netip.Prefix{}, false
	}
	a := p.Addr()
	if a.Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, false
		}
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, false
	}
	return p.Masked(), true
}

func containsAny(subnets []netip.Prefix, ip netip.Addr) bool {
	for _, s := range subnets {
		if s, ok := canonical4(s); ok && s.Contains(ip) {
			return true
		}
	}
	return false
}
