package gateway

import (
	"net/netip"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// GroupStatus computes a group's status from the nodes and the assignment
// returned by Assign:
//
//   - nodes: every node with a subnet containing at least one of the group's
//     floating IPs, "Up" or "Down";
//   - ips: floating IP (canonical string) → holding node, for the group's IPs
//     that are assigned;
//   - assigned: the number of the group's distinct floating IPs that are
//     assigned.
//
// The maps are never nil.
func GroupStatus(g Group, nodes []Node, assignment map[netip.Addr]string) (map[string]v1.NodeHealth, map[string]string, int32) {
	health := make(map[string]v1.NodeHealth)
	ips := make(map[string]string)

	// Index the group's IPs by every prefix length present in the node
	// subnets, so that each subnet is checked with one lookup.
	var lens [33]bool
	for i := range nodes {
		for _, s := range nodes[i].Subnets {
			if s, ok := canonical4(s); ok {
				lens[s.Bits()] = true
			}
		}
	}
	covered := make(map[netip.Prefix]bool)
	for _, ip := range g.FloatingIPs {
		ip = ip.Unmap()
		if !ip.Is4() {
			continue
		}
		for l, ok := range lens {
			if ok {
				covered[netip.PrefixFrom(ip, l).Masked()] = true
			}
		}
		if n, ok := assignment[ip]; ok && n != "" {
			ips[ip.String()] = n
		}
	}
	for i := range nodes {
		n := &nodes[i]
		if _, done := health[n.Name]; done {
			continue
		}
		for _, s := range n.Subnets {
			if s, ok := canonical4(s); ok && covered[s] {
				health[n.Name] = v1.NodeDown
				if n.Up {
					health[n.Name] = v1.NodeUp
				}
				break
			}
		}
	}
	return health, ips, int32(len(ips))
}
