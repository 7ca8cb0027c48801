package gateway

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"
)

// Handover is a planned move under way: the IP's holder is still From,
// which stops answering ARP for it, while To prepares (adds the address
// after an ARP probe, unannounced).
type Handover struct {
	From, To, Reason string
	Since            time.Time
}

// Move is an IP given to another node by Plan: at once (Planned false:
// the old holder is gone or Down) or at the end of a handover.
type Move struct {
	IP       netip.Addr
	From, To string
	Planned  bool
	// Reason of a planned move (the handover's); "" for one at once (the
	// caller says why: Down, deleted).
	Reason string
	// Unprepared: the handover timed out before To reported ready.
	Unprepared bool
}

// PlanInput is what Plan decides from.
type PlanInput struct {
	// Current: each IP's holder as the statuses say it.
	Current map[netip.Addr]string
	// Handovers under way, as the statuses say them.
	Handovers map[netip.Addr]Handover
	// Target: where each IP should be (Assign of the current holders
	// overlaid with the handovers' targets, plus the requested moves).
	Target map[netip.Addr]string
	// Nodes as Assign sees them.
	Nodes []Node
	// Prepared reports whether node's agent reported ip ready (added
	// unannounced after an ARP probe).
	Prepared func(node string, ip netip.Addr) bool
	// Reason says why ip should go from one Up node to another.
	Reason func(ip netip.Addr, from, to string) string
	// Now and Timeout: a handover older than Timeout completes without
	// its target's report.
	Now     time.Time
	Timeout time.Duration
}

// PlanResult is what the statuses should say.
type PlanResult struct {
	// Assignment: each IP's holder to publish.
	Assignment map[netip.Addr]string
	// Handovers under way to publish.
	Handovers map[netip.Addr]Handover
	// Moves: IPs whose holder changes in this write, sorted by IP.
	Moves []Move
}

// Plan turns the target assignment into the holders to publish now, make
// before break: an IP whose holder is Up and should go to another node is
// handed over (the holder keeps it while the target prepares; the switch
// comes when the target reports the IP prepared, or after Timeout); an IP
// whose holder is Down or gone moves at once. A handover whose target is
// no longer the target (it cannot hold the IP any more, or the IP should
// stay) is dropped; one whose old holder went Down completes at once.
// Plan is deterministic.
func Plan(in PlanInput) PlanResult {
	out := PlanResult{Assignment: map[netip.Addr]string{}, Handovers: map[netip.Addr]Handover{}}
	up := map[string]bool{}
	for _, n := range in.Nodes {
		if _, seen := up[n.Name]; !seen {
			up[n.Name] = n.Up
		}
	}
	ips := slices.Collect(maps.Keys(in.Target))
	for ip := range in.Current {
		if _, ok := in.Target[ip]; !ok {
			ips = append(ips, ip)
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	for _, ip := range ips {
		from, to := in.Current[ip], in.Target[ip]
		switch {
		case to == "":
			continue // nobody can hold it
		case from == "" || from == to:
			out.Assignment[ip] = to
			continue
		case !up[from]:
			out.Assignment[ip] = to
			out.Moves = append(out.Moves, Move{IP: ip, From: from, To: to})
			continue
		}
		h, ok := in.Handovers[ip]
		if !ok || h.From != from || h.To != to {
			h = Handover{From: from, To: to, Reason: in.Reason(ip, from, to), Since: in.Now}
		}
		prepared := in.Prepared != nil && in.Prepared(to, ip)
		if prepared || in.Now.Sub(h.Since) >= in.Timeout {
			out.Assignment[ip] = to
			out.Moves = append(out.Moves, Move{IP: ip, From: from, To: to, Planned: true, Reason: h.Reason, Unprepared: !prepared})
			continue
		}
		out.Assignment[ip] = from
		out.Handovers[ip] = h
	}
	return out
}

// Overlay returns current with each handover's IP given to its target:
// the assignment Assign keeps stable while the handovers run.
func Overlay(current map[netip.Addr]string, handovers map[netip.Addr]Handover) map[netip.Addr]string {
	out := maps.Clone(current)
	if out == nil {
		out = map[netip.Addr]string{}
	}
	for ip, h := range handovers {
		if current[ip] == h.From {
			out[ip] = h.To
		}
	}
	return out
}

// Candidate returns the node that Assign would give ip to if it were
// free, among the nodes that can hold it but except, with assignment's
// counts; "" when none can.
func Candidate(g Group, ip netip.Addr, nodes []Node, assignment map[netip.Addr]string, except string) string {
	counts := map[string]int{}
	for _, n := range assignment {
		counts[n]++
	}
	best := -1
	for i := range nodes {
		n := &nodes[i]
		if n.Name == except || !CanTake(g, ip, *n) {
			continue
		}
		if best < 0 || cmp.Or(compareBool(n.ControlPlane, nodes[best].ControlPlane), cmp.Compare(counts[n.Name], counts[nodes[best].Name]),
			cmp.Compare(n.Name, nodes[best].Name)) < 0 {
			best = i
		}
	}
	if best < 0 {
		return ""
	}
	return nodes[best].Name
}

// CanTake reports whether n may be given ip of g: Up, neither stale nor
// draining, allowed by g's Nodes, with a subnet containing ip.
func CanTake(g Group, ip netip.Addr, n Node) bool {
	return n.Up && !n.Stale && n.Draining == "" && g.allows(n.Name) && containsAny(n.Subnets, ip)
}

// WhyNot says why n may not be given ip of g ("" when it may).
func WhyNot(g Group, ip netip.Addr, n Node) string {
	switch {
	case !n.Up:
		return fmt.Sprintf("node %s is Down", n.Name)
	case n.Stale:
		return fmt.Sprintf("node %s's agent has not renewed its Lease", n.Name)
	case n.Draining != "":
		return fmt.Sprintf("node %s is %s", n.Name, n.Draining)
	case !g.allows(n.Name):
		return fmt.Sprintf("node %s is not selected by spec.nodeSelector", n.Name)
	case !containsAny(n.Subnets, ip):
		return fmt.Sprintf("%s is in none of node %s's subnets", ip, n.Name)
	}
	return ""
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}
