package gateway

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// MoveRequest is the value of a group's annotation
// egressnat.io/move-request, parsed (see ParseMoveRequest).
type MoveRequest struct {
	// All: "*", rebalance every IP of the group.
	All bool
	// IPs maps each IP named to the node asked for, "" for the best other
	// node.
	IPs map[netip.Addr]string
	// ID is what follows ";" (egressnatctl writes a fresh one, so that the
	// same request can be made twice).
	ID string
}

// ParseMoveRequest parses a move request: a comma-separated list of "*",
// "<ip>" and "<ip>=<node>", optionally followed by ";<id>". Spaces around
// items are ignored. An IP named twice, an empty list or an item that
// does not parse is an error.
func ParseMoveRequest(s string) (MoveRequest, error) {
	var r MoveRequest
	body, id, _ := strings.Cut(s, ";")
	r.ID = strings.TrimSpace(id)
	for _, item := range strings.Split(body, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if item == "*" {
			r.All = true
			continue
		}
		ipStr, node, named := strings.Cut(item, "=")
		ip, err := netip.ParseAddr(strings.TrimSpace(ipStr))
		if err != nil || !ip.Unmap().Is4() {
			return MoveRequest{}, fmt.Errorf("%q: not an IPv4 address", strings.TrimSpace(ipStr))
		}
		ip = ip.Unmap()
		node = strings.TrimSpace(node)
		if named && node == "" {
			return MoveRequest{}, fmt.Errorf("%q: no node after '='", item)
		}
		if r.IPs == nil {
			r.IPs = map[netip.Addr]string{}
		}
		if _, dup := r.IPs[ip]; dup {
			return MoveRequest{}, fmt.Errorf("%s is named twice", ip)
		}
		r.IPs[ip] = node
	}
	if !r.All && len(r.IPs) == 0 {
		return MoveRequest{}, errors.New("names no floating IP (want \"*\", \"<ip>\" or \"<ip>=<node>\", comma-separated)")
	}
	return r, nil
}

// String formats r as ParseMoveRequest reads it (IPs sorted).
func (r MoveRequest) String() string {
	var items []string
	if r.All {
		items = append(items, "*")
	}
	for _, ip := range slices.SortedFunc(maps.Keys(r.IPs), netip.Addr.Compare) {
		if n := r.IPs[ip]; n != "" {
			items = append(items, ip.String()+"="+n)
		} else {
			items = append(items, ip.String())
		}
	}
	s := strings.Join(items, ",")
	if r.ID != "" {
		s += ";" + r.ID
	}
	return s
}

// Requested decides the move request req of groups[gi]: the targets it
// sets (IP → node, only IPs that change node) and a message for the
// group's status. current holds each IP's holder, target the assignment
// decided without the request (whose counts place a rebalanced IP).
// "*" puts every IP of the group where Assign would put it if the group's
// IPs were all free; "<ip>" moves ip to the node Assign would choose
// among the others (Candidate); "<ip>=<node>" to node, when it can hold
// ip (CanTake). Anything that cannot be done is said in the message and
// not done.
func Requested(groups []Group, gi int, req MoveRequest, nodes []Node, current, target map[netip.Addr]string) (map[netip.Addr]string, string) {
	g := groups[gi]
	out := map[netip.Addr]string{}
	var said []string
	own := map[netip.Addr]bool{}
	for _, ip := range g.FloatingIPs {
		own[ip.Unmap()] = true
	}
	if req.All {
		free := maps.Clone(target)
		for ip := range own {
			delete(free, ip)
		}
		fresh := Assign(groups, nodes, free)
		for _, ip := range g.FloatingIPs {
			ip = ip.Unmap()
			if _, named := req.IPs[ip]; named {
				continue // said on its own below
			}
			if to := fresh[ip]; to != "" && current[ip] != "" && to != current[ip] {
				out[ip] = to
			}
		}
	}
	byName := map[string]Node{}
	for _, n := range nodes {
		if _, dup := byName[n.Name]; !dup {
			byName[n.Name] = n
		}
	}
	for _, ip := range slices.SortedFunc(maps.Keys(req.IPs), netip.Addr.Compare) {
		to := req.IPs[ip]
		from := current[ip]
		switch n, known := byName[to]; {
		case !own[ip]:
			said = append(said, fmt.Sprintf("%s is not a usable floating IP of this group", ip))
		case from == "":
			said = append(said, fmt.Sprintf("%s is held by no node: it is placed as soon as a node can hold it", ip))
		case to == from:
			said = append(said, fmt.Sprintf("%s is already on %s", ip, to))
		case to == "":
			if c := Candidate(g, ip, nodes, target, from); c != "" {
				out[ip] = c
			} else {
				said = append(said, fmt.Sprintf("%s: no other node can hold it", ip))
			}
		case !known:
			said = append(said, fmt.Sprintf("%s: node %s does not exist", ip, to))
		case !CanTake(g, ip, n):
			said = append(said, fmt.Sprintf("%s cannot go to %s: %s", ip, to, WhyNot(g, ip, n)))
		default:
			out[ip] = to
		}
	}
	var moving []string
	for _, ip := range slices.SortedFunc(maps.Keys(out), netip.Addr.Compare) {
		moving = append(moving, fmt.Sprintf("%s from %s to %s", ip, current[ip], out[ip]))
	}
	msg := "nothing to move"
	if len(moving) > 0 {
		msg = "moving " + strings.Join(moving, ", ")
	}
	if len(said) > 0 {
		msg += "; " + strings.Join(said, "; ")
	}
	return out, msg
}
