package selector

import (
	"net/netip"
	"slices"
	"time"
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
	// Muted: floating IPs of FloatingIPs this node keeps (or adds) on its
	// uplink without answering ARP for them or announcing them: a planned
	// handover is under way (the old holder while the new one prepares,
	// and the new holder preparing). Sorted.
	Muted []netip.Addr
	// ClusterFloatingIPs: every floating IP of the cluster's groups, sorted.
	// The node reports those it finds on its uplink without having added
	// them (the operator then never assigns them), held by it or not.
	ClusterFloatingIPs []netip.Addr
	// Excluded: cluster-internal destinations (pod and Service CIDRs, node
	// addresses, the API server's endpoints), sorted and merged (see
	// MergePrefixes). Traffic to them is never steered, whatever a
	// policy's destinations say, also while a policy fails closed.
	Excluded []netip.Prefix
	// LocalPods: the addresses of this node's pods the agent knows (not
	// host-network, not terminated), sorted. A packet from a pod network
	// (PodNetworks) to a policy destination whose source is not one of
	// them comes from a pod the agent has not evaluated yet: it is held
	// (dropped) until the agent knows the pod, so that no selected pod's
	// first packets leave with the node's address.
	LocalPods []netip.Addr
	// PodNetworks: the pod CIDRs (Node.spec.podCIDRs and --pod-cidrs),
	// sorted and merged. No pod is held when empty.
	PodNetworks []netip.Prefix
	// ReturnRoutes, on a gateway: each other node's pod CIDRs via its
	// address. The replies of traffic rerouted here go back by the uplink
	// to the node that sent it, not by an overlay: the source node's
	// strict reverse-path check expects them where the request left.
	ReturnRoutes []ReturnRoute
}

// ReturnRoute routes the replies to the pods of Dst via the node Via.
type ReturnRoute struct {
	Dst netip.Prefix
	Via netip.Addr
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
	// Written: the destinations as written (sorted, not merged) and
	// Created the policy's creation time: they decide which of several
	// policies selecting a pod applies to a destination (see Precedence).
	Written []netip.Prefix
	Created time.Time
	// EgressIP is the floating IP selected traffic leaves with.
	EgressIP netip.Addr
	// NextHop is the IP of the node holding EgressIP (ModeReroute only).
	NextHop netip.Addr
}

// Equal reports whether two states hold the same (a nil and an empty list
// are the same).
func (s NodeState) Equal(o NodeState) bool {
	return slices.Equal(s.FloatingIPs, o.FloatingIPs) && slices.Equal(s.Muted, o.Muted) && slices.Equal(s.Excluded, o.Excluded) &&
		slices.Equal(s.ClusterFloatingIPs, o.ClusterFloatingIPs) && slices.Equal(s.LocalPods, o.LocalPods) &&
		slices.Equal(s.PodNetworks, o.PodNetworks) && slices.Equal(s.ReturnRoutes, o.ReturnRoutes) &&
		slices.EqualFunc(s.Policies, o.Policies, func(a, b PolicyState) bool {
			return a.Name == b.Name && a.Mode == b.Mode && a.EgressIP == b.EgressIP && a.NextHop == b.NextHop &&
				slices.Equal(a.Sources, b.Sources) && slices.Equal(a.Destinations, b.Destinations) &&
				slices.Equal(a.Written, b.Written) && a.Created.Equal(b.Created)
		})
}
