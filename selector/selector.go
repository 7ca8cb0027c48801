package selector

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Pod is a pod as the selection sees it.
type Pod struct {
	Namespace, Name, Node string
	IP                    netip.Addr
	Labels                map[string]string
	HostNetwork           bool
	// Terminated: the pod is in phase Succeeded or Failed; its IP may
	// already belong to another pod.
	Terminated bool
}

// Input is everything one node's agent knows that decides its NodeState.
type Input struct {
	// Node is the name of this node.
	Node     string
	Policies []*v1.EgressNATPolicy
	// Groups carry status.floatingIPs as written by the operator.
	Groups []*v1.NetworkGatewayGroup
	// Namespaces maps namespace name → labels. A pod in a namespace missing
	// here is not selected.
	Namespaces map[string]map[string]string
	Pods       []Pod
	// NodeIPs maps node name → uplink IP, the next hop towards that node.
	NodeIPs map[string]netip.Addr
	// LocalSubnets are this node's uplink subnets; a held floating IP is
	// added with the prefix length of the subnet containing it.
	LocalSubnets []netip.Prefix
	// FallbackToNodeIP: when this node cannot reach a holder of a policy's
	// egress IP, leave the policy out (traffic keeps the node IP) instead of
	// ModeDrop; see Decide.
	FallbackToNodeIP bool
	// ClusterNetworks are the cluster-internal destinations: pod and
	// Service CIDRs, node addresses, the API server's endpoints. They
	// become NodeState.Excluded.
	ClusterNetworks []netip.Prefix
	// GatewayNamespaces, when not nil, are the namespaces whose groups are
	// honoured (see GatewayNamespaces), and Reserved the addresses no
	// floating IP may be (see ReservedFrom): groups are checked with
	// CheckGroups, as the operator checks them, and the node never holds a
	// rejected IP nor applies a policy whose gateway is ignored or whose
	// egress IP is rejected. nil: every group as it is (egressnatctl,
	// tests).
	GatewayNamespaces []string
	Reserved          Reserved
	// PodCIDRs maps node name → its pod CIDRs (Node.spec.podCIDRs), and
	// ExtraPodCIDRs are pod networks the Nodes do not list (--pod-cidrs):
	// they become NodeState.PodNetworks and, on a gateway, its
	// ReturnRoutes.
	PodCIDRs      map[string][]netip.Prefix
	ExtraPodCIDRs []netip.Prefix
}

// Desired computes the state this node should apply. Policies whose spec
// does not parse, duplicate policy names, gateways whose first floating IP
// is not IPv4 and floating IPs held by this node that lie in no local subnet
// are skipped; NewTracker returns warnings about them. The error is only for
// an unusable Input (no node name). The output depends only on in: the same
// input gives an equal NodeState.
//
// Each policy is decided by Decide, with the holders of its group's
// status.floatingIPs, NodeIPs as next hops and FallbackToNodeIP. Sources
// are the selected pods of the whole cluster in ModeGateway (traffic
// arrives from other nodes), the selected pods on this node otherwise.
func Desired(in Input) (NodeState, error) {
	st, _, _, err := desired(in)
	return st, err
}

// desired is Desired, also returning the warnings and each applied policy
// compiled, in the order of st.Policies. The warnings come in a fixed
// order.
func desired(in Input) (NodeState, []string, []*CompiledPolicy, error) {
	if in.Node == "" {
		return NodeState{}, nil, nil, errors.New("selector: Input.Node is empty")
	}
	var warn []string
	warnf := func(format string, args ...any) { warn = append(warn, fmt.Sprintf(format, args...)) }

	groups := sortedGroups(in.Groups)
	byKey := make(map[string]*v1.NetworkGatewayGroup, len(groups))
	for _, g := range groups {
		k := g.Namespace + "/" + g.Name
		if _, dup := byKey[k]; !dup {
			byKey[k] = g
		}
	}

	var checks map[string]GroupCheck
	if in.GatewayNamespaces != nil {
		checks = CheckGroups(groups, in.GatewayNamespaces, in.Reserved)
	}
	held, muted := heldFloatingIPs(in, groups, checks, warnf)
	st := NodeState{FloatingIPs: held, Muted: muted, Excluded: clusterDestinations(in.ClusterNetworks),
		ClusterFloatingIPs: clusterFloatingIPs(groups)}

	pols := make([]*v1.EgressNATPolicy, 0, len(in.Policies))
	for _, p := range in.Policies {
		if p != nil {
			pols = append(pols, p)
		}
	}
	slices.SortStableFunc(pols, func(a, b *v1.EgressNATPolicy) int { return cmp.Compare(a.Name, b.Name) })

	ev := newEvaluator(in)
	var compiled []*CompiledPolicy
	warned := map[string]bool{} // gateways warned about
	for i, pol := range pols {
		if i > 0 && pols[i-1].Name == pol.Name {
			warnf("EgressNATPolicy %s is listed twice; the second copy is ignored", pol.Name)
			continue
		}
		cp, err := Compile(pol)
		if err != nil {
			warnf("EgressNATPolicy %s is not applied: %v", pol.Name, err)
			continue
		}
		f := FactsOf(pol, byKey[pol.Spec.GatewayRef.Namespace+"/"+pol.Spec.GatewayRef.Name])
		f.Node, f.NodeIPs, f.NodeIPsKnown, f.FallbackToNodeIP = in.Node, in.NodeIPs, true, in.FallbackToNodeIP
		f.SetGatewayCheck(checks)
		d := Decide(f)
		if !d.Accepted && len(f.FloatingIPs) > 0 && !warned[f.Gateway] {
			warned[f.Gateway] = true
			warnf("%s", d.AcceptedMessage)
		}
		if !d.Applied {
			continue
		}
		ps := PolicyState{Name: pol.Name, Mode: d.Mode, EgressIP: d.EgressIP, NextHop: d.NextHop, Destinations: cp.Destinations,
			Written: cp.Written, Created: cp.Created}
		ps.Sources = ev.sources(cp, d.Mode != ModeGateway)
		st.Policies = append(st.Policies, ps)
		compiled = append(compiled, cp)
	}
	st.LocalPods = localPods(in.Node, in.Pods)
	st.PodNetworks, st.ReturnRoutes = podNetworks(in, st)
	return st, warn, compiled, nil
}

// knownLocal reports whether p is one of node's pods whose address the
// node holds back no traffic from (see NodeState.LocalPods).
func knownLocal(node string, p Pod) bool {
	return p.Node == node && !p.HostNetwork && !p.Terminated && p.IP.Unmap().Is4()
}

// localPods returns the addresses of node's known pods, sorted, without
// duplicates.
func localPods(node string, pods []Pod) []netip.Addr {
	var out []netip.Addr
	for _, p := range pods {
		if knownLocal(node, p) {
			out = append(out, p.IP.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// podNetworks returns the merged pod networks and, when st has a Gateway
// policy, the routes back to the other nodes' pods (each node's IPv4 pod
// CIDRs via its address, sorted).
func podNetworks(in Input, st NodeState) ([]netip.Prefix, []ReturnRoute) {
	nets := clusterDestinations(in.ExtraPodCIDRs)
	var routes []ReturnRoute
	gateway := slices.ContainsFunc(st.Policies, func(p PolicyState) bool { return p.Mode == ModeGateway })
	for node, cidrs := range in.PodCIDRs {
		own := clusterDestinations(cidrs)
		nets = append(nets, own...)
		via, ok := in.NodeIPs[node]
		onLink := slices.ContainsFunc(in.LocalSubnets, func(s netip.Prefix) bool {
			return s.IsValid() && netip.PrefixFrom(s.Addr().Unmap(), s.Bits()).Contains(via.Unmap())
		})
		if !gateway || node == in.Node || !ok || !via.Unmap().Is4() || !onLink {
			continue // a node beyond a router: its replies follow the main table
		}
		for _, c := range own {
			routes = append(routes, ReturnRoute{Dst: c, Via: via.Unmap()})
		}
	}
	slices.SortFunc(routes, func(a, b ReturnRoute) int {
		return cmp.Or(comparePrefix(a.Dst, b.Dst), a.Via.Compare(b.Via))
	})
	// Two nodes claiming one pod CIDR: neither is trusted with it.
	var kept []ReturnRoute
	for i, r := range routes {
		if (i > 0 && routes[i-1].Dst == r.Dst) || (i+1 < len(routes) && routes[i+1].Dst == r.Dst) {
			continue
		}
		kept = append(kept, r)
	}
	return MergePrefixes(nets), kept
}

// holder returns the node that the group's status says holds ip, or "".
// The operator writes the status keys in canonical form (netip.Addr.String).
func holder(g *v1.NetworkGatewayGroup, ip netip.Addr) string {
	return g.Status.FloatingIPs[ip.String()]
}

func parseIPv4(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return netip.Addr{}, err
	}
	a = a.Unmap()
	if !a.Is4() {
		return netip.Addr{}, fmt.Errorf("%s is not an IPv4 address", s)
	}
	return a, nil
}

func sortedGroups(in []*v1.NetworkGatewayGroup) []*v1.NetworkGatewayGroup {
	out := make([]*v1.NetworkGatewayGroup, 0, len(in))
	for _, g := range in {
		if g != nil {
			out = append(out, g)
		}
	}
	slices.SortStableFunc(out, func(a, b *v1.NetworkGatewayGroup) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}

// handover returns the planned move under way of ip in g's status (its
// holder is the handover's From), or nil.
func handover(g *v1.NetworkGatewayGroup, ip netip.Addr) *v1.FloatingIPHandover {
	for i, h := range g.Status.Handovers {
		if a, err := parseIPv4(h.IP); err == nil && a == ip && h.From != "" && h.To != "" && h.From != h.To &&
			holder(g, ip) == h.From {
			return &g.Status.Handovers[i]
		}
	}
	return nil
}

// heldFloatingIPs returns the floating IPs (of the spec) that the status of
// their group gives to this node, or hands over to it (status.handovers),
// with the prefix length of the longest local subnet containing each, and
// the muted ones: those of a handover under way, from or to this node
// (sorted).
func heldFloatingIPs(in Input, groups []*v1.NetworkGatewayGroup, checks map[string]GroupCheck, warnf func(string, ...any)) ([]netip.Prefix, []netip.Addr) {
	var locals []netip.Prefix
	for _, s := range in.LocalSubnets {
		if s.IsValid() && s.Addr().Unmap().Is4() {
			locals = append(locals, s)
		}
	}
	var out []netip.Prefix
	var muted []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, g := range groups {
		for _, s := range g.Spec.FloatingIPs {
			ip, err := parseIPv4(s)
			if err != nil || seen[ip] {
				continue
			}
			h := handover(g, ip)
			if holder(g, ip) != in.Node && (h == nil || h.To != in.Node) {
				continue
			}
			if c, ok := checks[g.Namespace+"/"+g.Name]; checks != nil && (!ok || !c.Allows(ip)) {
				// Rejected (a node's own address, the router, another
				// group's, ...) or an ignored group: never held, whatever
				// a status says.
				warnf("floating IP %s of NetworkGatewayGroup %s/%s is not held: %s", ip, g.Namespace, g.Name, c.Message())
				continue
			}
			seen[ip] = true
			bits := -1
			for _, l := range locals {
				if l.Bits() > bits && netip.PrefixFrom(l.Addr().Unmap(), l.Bits()).Contains(ip) {
					bits = l.Bits()
				}
			}
			if bits < 0 {
				warnf("floating IP %s of NetworkGatewayGroup %s/%s is assigned to this node but lies in none of its subnets %v; it is not added", ip, g.Namespace, g.Name, in.LocalSubnets)
				continue
			}
			out = append(out, netip.PrefixFrom(ip, bits))
			if h != nil {
				muted = append(muted, ip)
			}
		}
	}
	slices.SortFunc(out, comparePrefix)
	slices.SortFunc(muted, netip.Addr.Compare)
	return out, muted
}

// clusterFloatingIPs returns every IPv4 floating IP of the groups' specs,
// sorted, without duplicates.
func clusterFloatingIPs(groups []*v1.NetworkGatewayGroup) []netip.Addr {
	var out []netip.Addr
	for _, g := range groups {
		for _, s := range g.Spec.FloatingIPs {
			if ip, err := parseIPv4(s); err == nil {
				out = append(out, ip)
			}
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// clusterDestinations returns the cluster-internal destinations as IPv4
// prefixes, merged.
func clusterDestinations(nets []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range nets {
		if p.IsValid() && p.Addr().Unmap().Is4() {
			out = append(out, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()))
		}
	}
	return MergePrefixes(out)
}

// comparePrefix orders by address, then by prefix length (shorter first),
// so that a prefix comes before the prefixes it contains.
func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// ParseDestinations parses a policy's destination CIDRs (IPv4 only; host
// bits are cleared) and merges them with MergePrefixes.
func ParseDestinations(dests []v1.EgressDestination) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(dests))
	for _, d := range dests {
		p, err := parseDestination(d.CIDR)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return MergePrefixes(out), nil
}

// parseDestination parses one destination CIDR: IPv4 (or IPv4-mapped),
// host bits cleared.
func parseDestination(cidr string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(cidr))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("destination %q: %w", cidr, err)
	}
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("destination %q: not an IPv4 network", cidr)
	}
	return p.Masked(), nil
}

// MergePrefixes sorts prefixes by address and drops every prefix contained
// in another one (and duplicates). Adjacent prefixes stay separate. The
// result overlaps nowhere, as nftables interval sets require. prefixes is
// reordered in place.
func MergePrefixes(prefixes []netip.Prefix) []netip.Prefix {
	if len(prefixes) == 0 {
		return nil
	}
	for i, p := range prefixes {
		prefixes[i] = p.Masked()
	}
	slices.SortFunc(prefixes, comparePrefix)
	out := prefixes[:1]
	for _, p := range prefixes[1:] {
		last := out[len(out)-1]
		if last.Bits() <= p.Bits() && last.Contains(p.Addr()) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// Eligible reports whether a pod can be selected at all: it has an IPv4
// address, does not use the host network and is not terminated.
func Eligible(p Pod) bool {
	return p.IP.Unmap().Is4() && !p.HostNetwork && !p.Terminated
}

// CompiledPolicy is an EgressNATPolicy with its selectors and destinations
// parsed once.
type CompiledPolicy struct {
	Name       string
	GatewayRef v1.GatewayRef
	// Destinations, parsed and merged (see MergePrefixes).
	Destinations []netip.Prefix
	// Written: the destinations as written (host bits cleared, sorted,
	// duplicates dropped, none merged), which rank overlapping policies.
	Written []netip.Prefix
	// Created is the policy's creationTimestamp.
	Created time.Time
	sources []compiledSource
}

type compiledSource struct {
	ns, pod *compiledSelector
}

// Compile parses a policy's destinations and selectors. It fails on a bad
// CIDR, a bad selector, an action other than SNAT or no destinations.
func Compile(pol *v1.EgressNATPolicy) (*CompiledPolicy, error) {
	if pol.Spec.Action != "" && pol.Spec.Action != v1.ActionSNAT {
		return nil, fmt.Errorf("action %q is not supported (only SNAT)", pol.Spec.Action)
	}
	if len(pol.Spec.Destinations) == 0 {
		return nil, errors.New("no destinations")
	}
	var written []netip.Prefix
	for _, d := range pol.Spec.Destinations {
		p, err := parseDestination(d.CIDR)
		if err != nil {
			return nil, err
		}
		written = append(written, p)
	}
	slices.SortFunc(written, comparePrefix)
	written = slices.Compact(written)
	cp := &CompiledPolicy{Name: pol.Name, GatewayRef: pol.Spec.GatewayRef, Written: written,
		Destinations: MergePrefixes(slices.Clone(written)), Created: pol.CreationTimestamp.Time}
	for i, s := range pol.Spec.Sources {
		ns, err := compileSelector(s.NamespaceSelector)
		if err != nil {
			return nil, fmt.Errorf("sources[%d].namespaceSelector: %w", i, err)
		}
		pod, err := compileSelector(s.PodSelector)
		if err != nil {
			return nil, fmt.Errorf("sources[%d].podSelector: %w", i, err)
		}
		cp.sources = append(cp.sources, compiledSource{ns: ns, pod: pod})
	}
	return cp, nil
}

// Selects reports whether the policy selects pod p, whose namespace has the
// labels nsLabels: p is Eligible and one source matches (its
// namespaceSelector matches nsLabels and its podSelector matches p.Labels).
// nil nsLabels means a namespace without labels; the caller decides whether
// the namespace exists (a pod of an unknown namespace is not selected).
func (c *CompiledPolicy) Selects(p Pod, nsLabels map[string]string) bool {
	if !Eligible(p) {
		return false
	}
	for _, s := range c.sources {
		if s.ns.sel.Matches(labels.Set(nsLabels)) && s.pod.sel.Matches(labels.Set(p.Labels)) {
			return true
		}
	}
	return false
}

// selectsNamespace reports whether one of the policy's namespace selectors
// matches a namespace with labels nsLabels.
func (c *CompiledPolicy) selectsNamespace(nsLabels map[string]string) bool {
	for _, s := range c.sources {
		if s.ns.sel.Matches(labels.Set(nsLabels)) {
			return true
		}
	}
	return false
}

// compiledSelector is a parsed label selector and the requirements that
// only labelled objects can meet, which pick candidates from an index.
type compiledSelector struct {
	sel labels.Selector
	key string
	all bool
	pos []posReq
}

// posReq: the object must have label key with one of values (any value when
// values is nil).
type posReq struct {
	key    string
	values []string
}

func compileSelector(s v1.LabelSelector) (*compiledSelector, error) {
	sel, err := s.AsSelector()
	if err != nil {
		return nil, err
	}
	c := &compiledSelector{sel: sel, key: sel.String(), all: sel.Empty()}
	for k, v := range s.MatchLabels {
		c.pos = append(c.pos, posReq{key: k, values: []string{string(v)}})
	}
	for _, r := range s.MatchExpressions {
		switch r.Operator {
		case "In":
			vals := make([]string, 0, len(r.Values))
			for _, v := range r.Values {
				vals = append(vals, string(v))
			}
			slices.Sort(vals)
			c.pos = append(c.pos, posReq{key: r.Key, values: slices.Compact(vals)})
		case "Exists":
			c.pos = append(c.pos, posReq{key: r.Key})
		}
	}
	return c, nil
}

// labelIndex is a set of labelled objects (by index) with an inverted index
// label key → value → objects, built on first use.
type labelIndex struct {
	items []int32
	byKV  map[string]map[string][]int32
}

func (x *labelIndex) index(labelsOf func(int32) map[string]string) {
	x.byKV = make(map[string]map[string][]int32)
	for _, it := range x.items {
		for k, v := range labelsOf(it) {
			m := x.byKV[k]
			if m == nil {
				m = make(map[string][]int32)
				x.byKV[k] = m
			}
			m[v] = append(m[v], it)
		}
	}
}

// match appends the objects s selects to dst.
func (x *labelIndex) match(s *compiledSelector, labelsOf func(int32) map[string]string, dst []int32) []int32 {
	if s.all {
		return append(dst, x.items...)
	}
	if len(s.pos) == 0 || len(x.items) < 8 {
		for _, it := range x.items {
			if s.sel.Matches(labels.Set(labelsOf(it))) {
				dst = append(dst, it)
			}
		}
		return dst
	}
	if x.byKV == nil {
		x.index(labelsOf)
	}
	// Candidates come from the most selective positive requirement; every
	// candidate is then checked against the whole selector.
	best, bestN := -1, 0
	for i, r := range s.pos {
		n := 0
		vals := x.byKV[r.key]
		if r.values == nil {
			for _, l := range vals {
				n += len(l)
			}
		} else {
			for _, v := range r.values {
				n += len(vals[v])
			}
		}
		if best < 0 || n < bestN {
			best, bestN = i, n
		}
		if n == 0 {
			return dst
		}
	}
	r := s.pos[best]
	check := func(list []int32) {
		for _, it := range list {
			if s.sel.Matches(labels.Set(labelsOf(it))) {
				dst = append(dst, it)
			}
		}
	}
	if r.values == nil {
		for _, l := range x.byKV[r.key] {
			check(l)
		}
	} else {
		for _, v := range r.values {
			check(x.byKV[r.key][v])
		}
	}
	return dst
}

// evaluator selects pods for compiled policies, sharing work between them:
// namespace selectors are evaluated over namespaces, pod selectors over the
// pods of the matching namespaces only, through per-namespace indexes; the
// results of identical selectors and source lists are reused.
type evaluator struct {
	pods   []Pod // eligible pods in known namespaces, sorted by IP
	nsName []string
	nsLbl  []map[string]string
	ns     labelIndex
	// per scope (0: cluster, 1: this node): namespace index → pods
	scope [2][]*labelIndex

	nsCache  map[string][]int32
	srcCache [2]map[string][]int32
	polCache [2]map[string][]netip.Addr
	buf      []int32
}

func newEvaluator(in Input) *evaluator {
	e := &evaluator{nsCache: map[string][]int32{}}
	for i := range 2 {
		e.srcCache[i] = map[string][]int32{}
		e.polCache[i] = map[string][]netip.Addr{}
	}
	for name := range in.Namespaces {
		e.nsName = append(e.nsName, name)
	}
	slices.Sort(e.nsName)
	nsIdx := make(map[string]int32, len(e.nsName))
	for i, name := range e.nsName {
		nsIdx[name] = int32(i)
		e.nsLbl = append(e.nsLbl, in.Namespaces[name])
		e.ns.items = append(e.ns.items, int32(i))
	}
	for _, p := range in.Pods {
		if _, ok := nsIdx[p.Namespace]; ok && Eligible(p) {
			p.IP = p.IP.Unmap()
			e.pods = append(e.pods, p)
		}
	}
	slices.SortFunc(e.pods, func(a, b Pod) int {
		return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for s := range 2 {
		e.scope[s] = make([]*labelIndex, len(e.nsName))
		for i := range e.scope[s] {
			e.scope[s][i] = &labelIndex{}
		}
	}
	for i := range e.pods {
		n := nsIdx[e.pods[i].Namespace]
		e.scope[0][n].items = append(e.scope[0][n].items, int32(i))
		if e.pods[i].Node == in.Node {
			e.scope[1][n].items = append(e.scope[1][n].items, int32(i))
		}
	}
	return e
}

func (e *evaluator) podLabels(i int32) map[string]string { return e.pods[i].Labels }
func (e *evaluator) nsLabels(i int32) map[string]string  { return e.nsLbl[i] }

// sources returns the sorted, distinct IPs of the pods cp selects, on this
// node only when local.
func (e *evaluator) sources(cp *CompiledPolicy, local bool) []netip.Addr {
	s := 0
	if local {
		s = 1
	}
	var pk strings.Builder
	for _, src := range cp.sources {
		pk.WriteString(src.ns.key)
		pk.WriteByte(0)
		pk.WriteString(src.pod.key)
		pk.WriteByte(1)
	}
	if ips, ok := e.polCache[s][pk.String()]; ok {
		return slices.Clone(ips)
	}
	idx := e.buf[:0]
	for _, src := range cp.sources {
		idx = append(idx, e.source(src, s)...)
	}
	slices.Sort(idx)
	var ips []netip.Addr
	for i, p := range idx {
		if i > 0 && idx[i-1] == p {
			continue
		}
		ip := e.pods[p].IP
		if n := len(ips); n > 0 && ips[n-1] == ip {
			continue
		}
		ips = append(ips, ip)
	}
	e.buf = idx
	e.polCache[s][pk.String()] = ips
	return slices.Clone(ips)
}

func (e *evaluator) source(src compiledSource, s int) []int32 {
	key := src.ns.key + "\x00" + src.pod.key
	if r, ok := e.srcCache[s][key]; ok {
		return r
	}
	nss, ok := e.nsCache[src.ns.key]
	if !ok {
		nss = e.ns.match(src.ns, e.nsLabels, nil)
		e.nsCache[src.ns.key] = nss
	}
	var r []int32
	for _, n := range nss {
		r = e.scope[s][n].match(src.pod, e.podLabels, r)
	}
	e.srcCache[s][key] = r
	return r
}
