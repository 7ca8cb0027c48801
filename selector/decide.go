package selector

import (
	"fmt"
	"net/netip"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// PolicyFacts is everything that decides how one EgressNATPolicy is applied:
// by the agent of Node, by the operator (for the policy's status) or by
// egressnatctl explain (for a pod on Node). FactsOf fills the part read
// from the policy and its gateway; the caller adds the rest.
type PolicyFacts struct {
	// Gateway is the gatewayRef, "namespace/name".
	Gateway string
	// GatewayFound: a NetworkGatewayGroup of that name exists.
	GatewayFound bool
	// FloatingIPs are the group's spec.floatingIPs, in order. The first is
	// the policy's egress IP.
	FloatingIPs []string
	// Holders maps a floating IP, in canonical form (netip.Addr.String), to
	// the node holding it: the group's status.floatingIPs as the operator
	// wrote it (agents, egressnatctl), or the operator's fresh assignment.
	Holders map[string]string
	// Node is the node deciding; "" for a view from no node (the operator),
	// where a held egress IP gives ModeReroute.
	Node string
	// NodeIPs maps node name → the next hop towards it. When NodeIPsKnown
	// is false (the operator, or egressnatctl without the right to list
	// Nodes) the holder is taken as reachable and the next hop is left
	// invalid; when true, a holder missing from NodeIPs cannot be reached.
	NodeIPs      map[string]netip.Addr
	NodeIPsKnown bool
	// FallbackToNodeIP is the flag of the component deciding.
	FallbackToNodeIP bool
	// WhenUnavailable is the policy's status.whenUnavailable.
	WhenUnavailable v1.UnavailableAction
	// GatewayIgnored says why the group is not honoured (GroupCheck.Ignored)
	// and EgressIPRejected why its first floating IP is never assigned
	// (GroupCheck.EgressRejected); "" means no problem. SetGatewayCheck
	// fills both from CheckGroups.
	GatewayIgnored, EgressIPRejected string
}

// FactsOf returns the facts the policy and its gateway give: g is the group
// pol's gatewayRef names, nil when it does not exist. Its status.floatingIPs
// say who holds what. Node, NodeIPs and FallbackToNodeIP are left to the
// caller.
func FactsOf(pol *v1.EgressNATPolicy, g *v1.NetworkGatewayGroup) PolicyFacts {
	f := PolicyFacts{
		Gateway:         pol.Spec.GatewayRef.Namespace + "/" + pol.Spec.GatewayRef.Name,
		WhenUnavailable: pol.Status.WhenUnavailable,
	}
	if g != nil {
		f.GatewayFound, f.FloatingIPs, f.Holders = true, g.Spec.FloatingIPs, g.Status.FloatingIPs
	}
	return f
}

// Decision is how a policy is applied, with the Accepted and Ready
// conditions the operator writes for it.
type Decision struct {
	// Accepted: the gateway exists, is honoured, and its first floating IP
	// is an IPv4 address that is not rejected. AcceptedReason is
	// v1.ReasonAccepted, v1.ReasonGatewayNotFound, v1.ReasonGatewayIgnored,
	// v1.ReasonNoFloatingIP or v1.ReasonEgressIPRejected.
	Accepted                        bool
	AcceptedReason, AcceptedMessage string
	// Ready: a node holds the egress IP. ReadyReason is v1.ReasonApplied or
	// v1.ReasonGatewayUnavailable; for a policy that is not accepted it
	// repeats AcceptedReason.
	Ready                     bool
	ReadyReason, ReadyMessage string
	// EgressIP is the group's first floating IP (valid when Accepted).
	EgressIP netip.Addr
	// Holder is the node holding EgressIP ("" when none).
	Holder string

	// Applied: Node puts the policy in its state, in Mode. A policy that is
	// not Accepted is not applied, nor one that Fallback leaves out.
	Applied bool
	Mode    Mode
	// NextHop is the holder's IP (ModeReroute, when NodeIPsKnown).
	NextHop netip.Addr
	// Fallback: Node cannot reach a holder (there is none, or its IP is
	// unknown) and the fallback rule holds (FallbackToNodeIP, or
	// WhenUnavailable is NodeIP): the policy is left out and the selected
	// traffic keeps the node IP instead of being dropped.
	Fallback bool
}

// Decide decides a policy from f. It is the one place that says which mode,
// egress IP and next hop a policy gets:
//
//   - the gateway does not exist, is ignored (GatewayIgnored), has no
//     floating IP, or its first floating IP is not IPv4 or is rejected
//     (EgressIPRejected): not accepted, not applied;
//   - the egress IP (the first floating IP) is held by Node: ModeGateway;
//   - held by another node, reachable: ModeReroute towards it;
//   - held by no node, or by one Node cannot reach: left out (Fallback) when
//     FallbackToNodeIP is set or WhenUnavailable is NodeIP, else ModeDrop.
func Decide(f PolicyFacts) Decision {
	var d Decision
	notAccepted := func(reason, msg string) Decision {
		d.AcceptedReason, d.AcceptedMessage = reason, msg
		d.ReadyReason, d.ReadyMessage = reason, "policy is not applied: "+msg
		return d
	}
	switch {
	case !f.GatewayFound:
		return notAccepted(v1.ReasonGatewayNotFound, fmt.Sprintf("NetworkGatewayGroup %s not found", f.Gateway))
	case f.GatewayIgnored != "":
		return notAccepted(v1.ReasonGatewayIgnored, fmt.Sprintf("NetworkGatewayGroup %s is ignored: %s", f.Gateway, f.GatewayIgnored))
	case len(f.FloatingIPs) == 0:
		return notAccepted(v1.ReasonNoFloatingIP, fmt.Sprintf("NetworkGatewayGroup %s has no floating IPs", f.Gateway))
	}
	ip, err := parseIPv4(f.FloatingIPs[0])
	if err != nil {
		return notAccepted(v1.ReasonNoFloatingIP,
			fmt.Sprintf("the first floating IP of NetworkGatewayGroup %s, %q, is not an IPv4 address", f.Gateway, f.FloatingIPs[0]))
	}
	if f.EgressIPRejected != "" {
		return notAccepted(v1.ReasonEgressIPRejected,
			fmt.Sprintf("egress IP %s (the first floating IP of NetworkGatewayGroup %s) is rejected and never assigned: %s", ip, f.Gateway, f.EgressIPRejected))
	}
	d.Accepted, d.AcceptedReason = true, v1.ReasonAccepted
	d.AcceptedMessage = fmt.Sprintf("egress IP %s of NetworkGatewayGroup %s", ip, f.Gateway)
	d.EgressIP, d.Holder = ip, f.Holders[ip.String()]
	fallback := f.FallbackToNodeIP || f.WhenUnavailable == v1.UnavailableNodeIP

	if d.Holder == "" {
		d.ReadyReason = v1.ReasonGatewayUnavailable
		consequence := "selected traffic to the destinations is dropped"
		switch {
		case f.FallbackToNodeIP:
			consequence = "selected traffic to the destinations leaves with the node IPs (fallback to node IP is enabled)"
		case fallback:
			consequence = "selected traffic to the destinations leaves with the node IPs (status.whenUnavailable is NodeIP)"
		}
		d.ReadyMessage = fmt.Sprintf("no node holds egress IP %s of NetworkGatewayGroup %s (no Up node has a subnet containing it); %s", ip, f.Gateway, consequence)
	} else {
		d.Ready, d.ReadyReason = true, v1.ReasonApplied
		d.ReadyMessage = fmt.Sprintf("node %s holds egress IP %s", d.Holder, ip)
	}

	nh, nhOK := f.NodeIPs[d.Holder]
	switch {
	case d.Holder != "" && d.Holder == f.Node:
		d.Applied, d.Mode = true, ModeGateway
	case d.Holder != "" && !f.NodeIPsKnown:
		d.Applied, d.Mode = true, ModeReroute
	case d.Holder != "" && nhOK && nh.IsValid():
		d.Applied, d.Mode, d.NextHop = true, ModeReroute, nh.Unmap()
	case fallback:
		d.Fallback = true
	default:
		d.Applied, d.Mode = true, ModeDrop
	}
	return d
}
