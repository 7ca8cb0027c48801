package selector

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Validation of NetworkGatewayGroups shared by the operator and the agents,
// so that both refuse the same floating IPs from the same facts: no object
// can make a node add (or remove) an address that is not egressnat's.
//
// The facts are the Nodes (their InternalIP and ExternalIP addresses) and
// what every agent advertises on its Lease (its uplink subnets with its own
// address, the uplink's default gateways and the addresses it found on its
// uplink that egressnat did not add). ReservedFrom turns them into
// Reserved; CheckGroups judges every group against it.

// RejectKind says why a floating IP is rejected.
type RejectKind string

const (
	// RejectInvalid: not an IPv4 address a node can hold (0.0.0.0/8,
	// loopback, link-local, multicast, class E, the limited broadcast).
	RejectInvalid RejectKind = "Invalid"
	// RejectReserved: a node's address, the network or broadcast address of
	// an uplink subnet, or an uplink's default gateway.
	RejectReserved RejectKind = "Reserved"
	// RejectInUse: an agent found it on its uplink, not added by egressnat.
	RejectInUse RejectKind = "InUse"
	// RejectConflict: an older group lists it and keeps it.
	RejectConflict RejectKind = "Conflict"
)

// DefaultMinSubnetPrefix is the shortest uplink subnet the operator uses
// (flag --min-subnet-prefix).
const DefaultMinSubnetPrefix = 16

// GatewayNamespaces returns the namespaces whose NetworkGatewayGroups are
// honoured: v1.DefaultGatewayNamespace (kube-system) and those of flag, a
// comma-separated list (the --gateway-namespaces flag of the operator and
// the agents), sorted, without duplicates. A name that is not a valid
// namespace name is an error.
func GatewayNamespaces(flag string) ([]string, error) {
	out := []string{v1.DefaultGatewayNamespace}
	for _, f := range strings.Split(flag, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if errs := validation.IsDNS1123Label(f); len(errs) > 0 {
			return nil, fmt.Errorf("gateway namespace %q: %s", f, strings.Join(errs, "; "))
		}
		out = append(out, f)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// NodeFacts is what one node tells about the addresses around it: its Node
// object and its agent's Lease.
type NodeFacts struct {
	Name string
	// InternalIPs and ExternalIPs: the addresses of these types in the
	// Node's status.addresses, as written. Those that are not IPv4 (or
	// IPv4-mapped) addresses are skipped.
	InternalIPs, ExternalIPs []string
	// Subnets: the Lease annotation egressnat.io/uplink-subnets
	// (kube.ParseSubnets): the uplink's subnets with the node's own address
	// on it, e.g. 192.0.2.12/24.
	Subnets []netip.Prefix
	// Gateways: the annotation egressnat.io/uplink-gateway
	// (kube.ParseUplinkGateways): the uplink's default gateways.
	Gateways []netip.Addr
	// Foreign: the annotation egressnat.io/foreign-addresses
	// (kube.ParseForeignAddresses): floating IPs the agent found on its
	// uplink that egressnat did not add.
	Foreign []netip.Addr
}

// AddNodeAddress records one entry of the Node's status.addresses, of type
// typ ("InternalIP" or "ExternalIP", as corev1.NodeInternalIP and
// corev1.NodeExternalIP; other types are not recorded):
//
//	for _, a := range node.Status.Addresses {
//		facts.AddNodeAddress(string(a.Type), a.Address)
//	}
func (n *NodeFacts) AddNodeAddress(typ, addr string) {
	switch typ {
	case "InternalIP":
		n.InternalIPs = append(n.InternalIPs, addr)
	case "ExternalIP":
		n.ExternalIPs = append(n.ExternalIPs, addr)
	}
}

// Reservation says why an address is never a floating IP.
type Reservation struct {
	// Kind is RejectReserved or RejectInUse.
	Kind RejectKind
	// Node whose fact it is.
	Node string
	// What the address is to the node: "InternalIP", "ExternalIP",
	// "uplink address", "uplink default gateway", "network address",
	// "broadcast address" (of Subnet), "address found on the uplink".
	What string
	// Subnet, for a network or broadcast address.
	Subnet netip.Prefix
}

func (r Reservation) String() string {
	switch {
	case r.Kind == RejectInUse:
		return fmt.Sprintf("already on the uplink of node %s, not added by egressnat", r.Node)
	case r.Subnet.IsValid():
		return fmt.Sprintf("the %s of node %s's uplink subnet %s", r.What, r.Node, r.Subnet)
	}
	return fmt.Sprintf("the %s of node %s", r.What, r.Node)
}

// Reserved are the addresses no floating IP may be, each with why.
type Reserved struct {
	Addrs map[netip.Addr]Reservation
}

// Add reserves a (unmapped), unless it already is: the first reason stays.
// Invalid and non-IPv4 addresses are skipped.
func (r *Reserved) Add(a netip.Addr, why Reservation) {
	a = a.Unmap()
	if !a.Is4() {
		return
	}
	if r.Addrs == nil {
		r.Addrs = make(map[netip.Addr]Reservation)
	}
	if _, ok := r.Addrs[a]; !ok {
		r.Addrs[a] = why
	}
}

// ReservedFrom reserves, for every node: its InternalIPs and ExternalIPs,
// the uplink addresses of its advertised subnets, its uplink's default
// gateways, the network and broadcast addresses of its advertised subnets
// (of those up to /30; a /31 or /32 has none), all as RejectReserved; and
// the addresses it found on its uplink (RejectInUse). Every advertised
// subnet counts, also one the operator does not use for assignment (see
// UsableSubnets): the agents need not know the operator's minimum prefix.
// An address reserved for several reasons keeps the first in that order of
// kinds, then of node names, so the result does not depend on the order of
// nodes.
func ReservedFrom(nodes []NodeFacts) Reserved {
	order := make([]int, len(nodes))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(nodes[a].Name, nodes[b].Name) })
	var r Reserved
	addStrings := func(n *NodeFacts, addrs []string, what string) {
		for _, s := range addrs {
			if a, err := parseIPv4(s); err == nil {
				r.Add(a, Reservation{Kind: RejectReserved, Node: n.Name, What: what})
			}
		}
	}
	for _, i := range order {
		n := &nodes[i]
		addStrings(n, n.InternalIPs, "InternalIP")
		addStrings(n, n.ExternalIPs, "ExternalIP")
		for _, p := range n.Subnets {
			if p, ok := prefix4(p); ok {
				r.Add(p.Addr(), Reservation{Kind: RejectReserved, Node: n.Name, What: "uplink address"})
			}
		}
	}
	for _, i := range order {
		n := &nodes[i]
		for _, g := range n.Gateways {
			r.Add(g, Reservation{Kind: RejectReserved, Node: n.Name, What: "uplink default gateway"})
		}
	}
	for _, i := range order {
		n := &nodes[i]
		for _, p := range n.Subnets {
			p, ok := prefix4(p)
			if !ok || p.Bits() > 30 {
				continue
			}
			m := p.Masked()
			r.Add(m.Addr(), Reservation{Kind: RejectReserved, Node: n.Name, What: "network address", Subnet: m})
			r.Add(lastAddr(m), Reservation{Kind: RejectReserved, Node: n.Name, What: "broadcast address", Subnet: m})
		}
	}
	for _, i := range order {
		n := &nodes[i]
		for _, a := range n.Foreign {
			r.Add(a, Reservation{Kind: RejectInUse, Node: n.Name, What: "address found on the uplink"})
		}
	}
	return r
}

// IgnoredSubnet is an advertised uplink subnet the operator does not use.
type IgnoredSubnet struct {
	Subnet netip.Prefix
	Reason string
}

// UsableSubnets splits the subnets a node's agent advertises (n.Subnets)
// into those a floating IP may be assigned in, as given, and those ignored,
// with why: a subnet that is not IPv4, is shorter than minPrefix, or
// contains none of the node's IPv4 InternalIPs (a node without one can use
// no subnet). A subnet advertised twice is used once.
func UsableSubnets(n NodeFacts, minPrefix int) (usable []netip.Prefix, ignored []IgnoredSubnet) {
	var internal []netip.Addr
	for _, s := range n.InternalIPs {
		if a, err := parseIPv4(s); err == nil {
			internal = append(internal, a)
		}
	}
	seen := map[netip.Prefix]bool{}
	for _, s := range n.Subnets {
		p, ok := prefix4(s)
		if !ok {
			ignored = append(ignored, IgnoredSubnet{Subnet: s, Reason: "not an IPv4 subnet"})
			continue
		}
		if seen[p.Masked()] {
			continue
		}
		seen[p.Masked()] = true
		switch {
		case p.Bits() < minPrefix:
			ignored = append(ignored, IgnoredSubnet{Subnet: s, Reason: fmt.Sprintf("shorter than the minimum prefix /%d (--min-subnet-prefix)", minPrefix)})
		case len(internal) == 0:
			ignored = append(ignored, IgnoredSubnet{Subnet: s, Reason: "the node has no IPv4 InternalIP"})
		case !slices.ContainsFunc(internal, p.Contains):
			ignored = append(ignored, IgnoredSubnet{Subnet: s, Reason: fmt.Sprintf("does not contain the node's InternalIP %s", internal[0])})
		default:
			usable = append(usable, s)
		}
	}
	return usable, ignored
}

// RejectedIP is a floating IP that is never assigned for its group.
type RejectedIP struct {
	// IP as written in spec.floatingIPs.
	IP     string
	Kind   RejectKind
	Reason string
	// KeptBy: the group that keeps the IP, "namespace/name" (RejectConflict).
	KeptBy string
}

// GroupCheck is the verdict on one NetworkGatewayGroup.
type GroupCheck struct {
	// Ignored says why the group is not honoured at all ("" when it is):
	// its namespace is not a gateway namespace. Its IPs are not assigned,
	// nor judged (Usable and Rejected are empty).
	Ignored string
	// Usable: the floating IPs that may be assigned, unmapped, in spec
	// order, each once.
	Usable []netip.Addr
	// Rejected: the other entries of spec.floatingIPs, in spec order.
	Rejected []RejectedIP
	// EgressRejected: why the first entry of spec.floatingIPs (the egress IP
	// of the group's policies) is rejected, "" when it is not.
	EgressRejected string
}

// Allows reports whether ip may be assigned for the group: it is one of
// Usable. A node holds or releases only such IPs: an IP the group does not
// allow is no business of the group (it may belong to a node, to something
// else on the network, or to an older group).
func (c GroupCheck) Allows(ip netip.Addr) bool {
	return slices.Contains(c.Usable, ip.Unmap())
}

// Message lists the rejected IPs and why, "" when none is:
// "192.0.2.11: the InternalIP of node n1; 192.0.2.200: ...".
func (c GroupCheck) Message() string {
	var b strings.Builder
	for i, r := range c.Rejected {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: %s", r.IP, r.Reason)
	}
	return b.String()
}

// OnlyConflicts reports whether every rejected IP is kept by an older
// group (and at least one is rejected).
func (c GroupCheck) OnlyConflicts() bool {
	return len(c.Rejected) > 0 && !slices.ContainsFunc(c.Rejected, func(r RejectedIP) bool { return r.Kind != RejectConflict })
}

// CheckGroups judges every group, keyed "namespace/name":
//
//   - a group whose namespace is not among allowedNamespaces (see
//     GatewayNamespaces; nil means only kube-system) is Ignored;
//   - an entry that is not an IPv4 address or not one a node can hold
//     (Unusable), or is reserved, is rejected;
//   - an IP listed by several honoured groups is kept by the oldest
//     (metadata.creationTimestamp, then namespace/name) and rejected for
//     the others.
//
// The result does not depend on the order of groups; nil groups are
// skipped, and of two groups with the same key the first in that order
// counts.
func CheckGroups(groups []*v1.NetworkGatewayGroup, allowedNamespaces []string, reserved Reserved) map[string]GroupCheck {
	if allowedNamespaces == nil {
		allowedNamespaces = []string{v1.DefaultGatewayNamespace}
	}
	allowed := make(map[string]bool, len(allowedNamespaces))
	for _, ns := range allowedNamespaces {
		allowed[ns] = true
	}
	sorted := make([]*v1.NetworkGatewayGroup, 0, len(groups))
	for _, g := range groups {
		if g != nil {
			sorted = append(sorted, g)
		}
	}
	slices.SortStableFunc(sorted, olderGroup)

	out := make(map[string]GroupCheck, len(sorted))
	keptBy := map[netip.Addr]string{}
	for _, g := range sorted {
		key := g.Namespace + "/" + g.Name
		if _, dup := out[key]; dup {
			continue
		}
		var c GroupCheck
		if !allowed[g.Namespace] {
			c.Ignored = fmt.Sprintf("namespace %s is not a gateway namespace (gateway namespaces: %s; the flag --gateway-namespaces of the operator and the agents adds more)",
				g.Namespace, strings.Join(allowedNamespaces, ", "))
			out[key] = c
			continue
		}
		seen := map[netip.Addr]bool{}
		for i, s := range g.Spec.FloatingIPs {
			reject := func(kind RejectKind, reason, kept string) {
				c.Rejected = append(c.Rejected, RejectedIP{IP: s, Kind: kind, Reason: reason, KeptBy: kept})
				if i == 0 {
					c.EgressRejected = reason
				}
			}
			ip, err := parseIPv4(s)
			if err != nil {
				reject(RejectInvalid, "not an IPv4 address", "")
				continue
			}
			if seen[ip] {
				continue // listed twice in the group: once is enough
			}
			seen[ip] = true
			if why := Unusable(ip); why != "" {
				reject(RejectInvalid, why, "")
			} else if r, ok := reserved.Addrs[ip]; ok {
				reject(r.Kind, r.String(), "")
			} else if owner, ok := keptBy[ip]; ok {
				reject(RejectConflict, fmt.Sprintf("also listed by NetworkGatewayGroup %s, which is older and keeps it", owner), owner)
			} else {
				keptBy[ip] = key
				c.Usable = append(c.Usable, ip)
			}
		}
		out[key] = c
	}
	return out
}

// olderGroup orders groups by creationTimestamp, then namespace, then name.
func olderGroup(a, b *v1.NetworkGatewayGroup) int {
	return cmp.Or(a.CreationTimestamp.Compare(b.CreationTimestamp.Time), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}

var (
	thisNetwork = netip.MustParsePrefix("0.0.0.0/8")
	loopback    = netip.MustParsePrefix("127.0.0.0/8")
	linkLocal   = netip.MustParsePrefix("169.254.0.0/16")
	multicast   = netip.MustParsePrefix("224.0.0.0/4")
	classE      = netip.MustParsePrefix("240.0.0.0/4")
	broadcast   = netip.MustParseAddr("255.255.255.255")
)

// Unusable says why ip can never be a floating IP, "" when it can: not
// IPv4 (after unmapping), in 0.0.0.0/8, loopback, link-local
// (169.254.0.0/16), multicast, the limited broadcast 255.255.255.255 or
// class E (240.0.0.0/4).
func Unusable(ip netip.Addr) string {
	ip = ip.Unmap()
	switch {
	case !ip.Is4():
		return "not an IPv4 address"
	case thisNetwork.Contains(ip):
		return "an address of 0.0.0.0/8 (this network), not usable"
	case loopback.Contains(ip):
		return "a loopback address"
	case linkLocal.Contains(ip):
		return "a link-local address (169.254.0.0/16)"
	case multicast.Contains(ip):
		return "a multicast address"
	case ip == broadcast:
		return "the limited broadcast address"
	case classE.Contains(ip):
		return "a reserved class E address (240.0.0.0/4)"
	}
	return ""
}

// SetGatewayCheck fills f.GatewayIgnored and f.EgressIPRejected from checks
// (the result of CheckGroups) for f.Gateway. A gateway checks does not know
// (nil checks, or a group that does not exist) has no problem.
func (f *PolicyFacts) SetGatewayCheck(checks map[string]GroupCheck) {
	c := checks[f.Gateway]
	f.GatewayIgnored, f.EgressIPRejected = c.Ignored, c.EgressRejected
}

// prefix4 returns p as an IPv4 prefix (unmapping an IPv4-mapped one), not
// masked.
func prefix4(p netip.Prefix) (netip.Prefix, bool) {
	if !p.IsValid() {
		return netip.Prefix{}, false
	}
	if a := p.Addr(); a.Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, false
		}
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p, p.Addr().Is4()
}

// lastAddr returns the last address of the masked IPv4 prefix p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
