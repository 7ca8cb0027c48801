package gateway

import (
	"net/netip"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
)

// Resolution is how an EgressNATPolicy's gatewayRef resolves: the Accepted
// and Ready conditions, the egress IP and the node holding it. The fields
// are those of selector.Decision.
type Resolution struct {
	// Accepted: the gatewayRef names an existing, honoured group whose
	// first floating IP is IPv4 and not rejected. AcceptedReason is
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
	// Node holds EgressIP (set when Ready).
	Node string
}

// ResolvePolicy resolves ref against groups (keyed "namespace/name"), their
// checks (selector.CheckGroups; a group missing there has no problem) and
// the assignment returned by Assign, with selector.Decide: the agents decide
// from the status the operator writes from this, by the same rule.
// fallbackToNodeIP only changes the message of an unavailable gateway: with
// it, selected traffic leaves with the node IPs; without it, it is dropped.
func ResolvePolicy(ref v1.GatewayRef, groups map[string]*v1.NetworkGatewayGroup, checks map[string]selector.GroupCheck, assignment map[netip.Addr]string, fallbackToNodeIP bool) Resolution {
	f := selector.PolicyFacts{Gateway: ref.Namespace + "/" + ref.Name, FallbackToNodeIP: fallbackToNodeIP}
	if g := groups[f.Gateway]; g != nil {
		f.GatewayFound = true
		f.FloatingIPs = g.Spec.FloatingIPs
		f.Holders = make(map[string]string, len(g.Spec.FloatingIPs))
		for _, s := range g.Spec.FloatingIPs {
			if ip, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil {
				ip = ip.Unmap()
				if node := assignment[ip]; node != "" {
					f.Holders[ip.String()] = node
				}
			}
		}
		f.SetGatewayCheck(checks)
	}
	d := selector.Decide(f)
	return Resolution{
		Accepted: d.Accepted, AcceptedReason: d.AcceptedReason, AcceptedMessage: d.AcceptedMessage,
		Ready: d.Ready, ReadyReason: d.ReadyReason, ReadyMessage: d.ReadyMessage,
		EgressIP: d.EgressIP, Node: d.Holder,
	}
}
