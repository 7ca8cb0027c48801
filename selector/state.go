package selector

import (
	"net/netip"
	"slices"
)

// Mode says what a node does with the traffic one policy selects.
type Mode string

const (
	// ModeGateway: this node holds the policy's egress IP. Selected traffic
	// (from any node's pods) leaving through the uplink is SNATed to EgressIP.
	ModeGateway Mode = "Gateway"
	// ModeReroute: another node holds the egress IP. Selected traffic is
	// marked, kept from the CNI's masquerade, and routed to NextHop.
	ModeReroute Mode = "Reroute"
	// ModeDrop: no node can serve the policy's egress IP. Selected traffic is
	// dropped (fail closed) so that it never leaves with the node IP.
	ModeDrop Mode = "Drop"
)

// NodeState is everything one node's kernel should hold for egressnat. It is
// computed by pure code and applied by package nft in one transaction.
type NodeState struct {
	// Policies applied on this node, sorted by Name. A policy that is not
	// applied (invalid gatewayRef, no egress IP) is absent.
	Policies []PolicyState
	// FloatingIPs this node holds, each with the prefix length of the node
	// subnet it lies in, sorted. They are added to the uplink.
	FloatingIPs []netip.Prefix
	// Released: every other floating IP of the cluster, sorted. The node
	// removes them from its uplink even when it did not record adding them,
	// so that a node never answers for an IP another node holds.
	Released []netip.Addr
}

// PolicyState is one EgressNATPolicy as one node applies it.
type PolicyState struct {
	// Name of the EgressNATPolicy.
	Name string
	// Sources: IPv4 addresses of the selected pods, sorted, without
	// duplicates: every selected pod in the cluster in ModeGateway (traffic
	// arrives from other nodes), this node's selected pods otherwise.
	Sources []netip.Addr
	// Destinations: IPv4 prefixes, sorted, merged so that none overlaps
	// another (nftables interval sets reject overlaps).
	Destinations []netip.Prefix
	Mode         Mode
	// EgressIP is the floating IP selected traffic leaves with.
	EgressIP netip.Addr
	// NextHop is the IP of the node holding EgressIP (ModeReroute only).
	NextHop netip.Addr
}

// Equal reports whether two states hold the same (a nil and an empty list
// are the same).
func (s NodeState) Equal(o NodeState) bool {
	return slices.Equal(s.FloatingIPs, o.FloatingIPs) && slices.Equal(s.Released, o.Released) &&
		slices.EqualFunc(s.Policies, o.Policies, func(a, b PolicyState) bool {
			return a.Name == b.Name && a.Mode == b.Mode && a.EgressIP == b.EgressIP && a.NextHop == b.NextHop &&
				slices.Equal(a.Sources, b.Sources) && slices.Equal(a.Destinations, b.Destinations)
		})
}
