package gateway

import (
	"fmt"
	"net/netip"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// Resolution is how an EgressNATPolicy's gatewayRef resolves: the Accepted
// and Ready conditions, the egress IP and the node holding it.
type Resolution struct {
	// Accepted: the gatewayRef names an existing group with a floating IP.
	// AcceptedReason is v1.ReasonAccepted, v1.ReasonGatewayNotFound or
	// v1.ReasonNoFloatingIP.
	Accepted                        bool
	AcceptedReason, AcceptedMessage string
	// Ready: a node holds the egress IP. ReadyReason is v1.ReasonApplied or
	// v1.ReasonGatewayUnavailable; for a policy that is not accepted it
	// repeats AcceptedReason.
	Ready                     bool
	ReadyReason, ReadyMessage string
	// EgressIP is the group's first floating IP (valid when Accepted).
	EgressIP netip.Addr
	// Node holds EgressIP (set when Ready).
	Node string
}

// ResolvePolicy resolves ref against groups (keyed "namespace/name", see
// Group.Key) and the assignment returned by Assign. fallbackToNodeIP only
// changes the message of an unavailable gateway: with it, selected traffic
// leaves with the node IPs; without it, it is dropped.
func ResolvePolicy(ref v1.GatewayRef, groups map[string]Group, assignment map[netip.Addr]string, fallbackToNodeIP bool) Resolution {
	name := ref.Namespace + "/" + ref.Name
	notAccepted := func(reason, msg string) Resolution {
		return Resolution{
			AcceptedReason: reason, AcceptedMessage: msg,
			ReadyReason: reason, ReadyMessage: "policy is not applied: " + msg,
		}
	}
	g, ok := groups[name]
	if !ok {
		return notAccepted(v1.ReasonGatewayNotFound, fmt.Sprintf("NetworkGatewayGroup %s not found", name))
	}
	if len(g.FloatingIPs) == 0 {
		return notAccepted(v1.ReasonNoFloatingIP, fmt.Sprintf("NetworkGatewayGroup %s has no floating IPs", name))
	}
	ip := g.FloatingIPs[0].Unmap()
	if !ip.Is4() {
		return notAccepted(v1.ReasonNoFloatingIP, fmt.Sprintf("the first floating IP of NetworkGatewayGroup %s is not a valid IPv4 address", name))
	}
	r := Resolution{
		Accepted:        true,
		AcceptedReason:  v1.ReasonAccepted,
		AcceptedMessage: fmt.Sprintf("egress IP %s of NetworkGatewayGroup %s", ip, name),
		EgressIP:        ip,
	}
	node := assignment[ip]
	if node == "" {
		r.ReadyReason = v1.ReasonGatewayUnavailable
		consequence := "selected traffic to the destinations is dropped"
		if fallbackToNodeIP {
			consequence = "selected traffic to the destinations leaves with the node IPs (fallback to node IP is enabled)"
		}
		r.ReadyMessage = fmt.Sprintf("no node holds egress IP %s of NetworkGatewayGroup %s (no Up node has a subnet containing it); %s", ip, name, consequence)
		return r
	}
	r.Ready = true
	r.ReadyReason = v1.ReasonApplied
	r.ReadyMessage = fmt.Sprintf("node %s holds egress IP %s", node, ip)
	r.Node = node
	return r
}
