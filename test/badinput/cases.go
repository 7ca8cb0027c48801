package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/egressnat/egressnat/test/lab"
)

type labNode = lab.Node

// objRef names an object whose status or Events may explain a case.
type objRef struct {
	Kind, Namespace, Name string
	// Baseline objects exist before and after the case: only conditions
	// that changed during the case count for them.
	Baseline bool
}

func (r objRef) String() string {
	if r.Namespace == "" {
		return r.Kind + "/" + r.Name
	}
	return r.Kind + "/" + r.Namespace + "/" + r.Name
}

// badCase is one hostile or mistaken input.
type badCase struct {
	Name string
	// What the input is, for -list.
	About string
	// Setup is YAML of valid companions the input needs (they must be
	// accepted); it is removed with the input.
	Setup string
	// YAML is the input, created with kubectl create (a refusal is
	// "rejected").
	YAML string
	// Apply makes an input that is not a plain object (a Lease annotation,
	// many objects); an error for which rejectedErr holds is "rejected",
	// any other aborts the case. Undo reverts it (also after a failure).
	Apply func(ctx context.Context, h *harness) error
	Undo  func(ctx context.Context, h *harness) error
	// Concerns are the objects whose conditions or Warning Events count as
	// the report, besides those in YAML and Setup.
	Concerns []objRef
	// Valid marks a legitimate extreme (the input deserves to work): a True
	// Ready or Accepted condition is its report too.
	Valid bool
	// Allow lists further sources a probe class may see on an external
	// probe while the input exists ("sel/ext2" -> {"192.0.2.100"}); "fail"
	// allows no answer (fail-closed drop by design). Internal probes
	// (pod, node, Service) and probes from nodes never have allowances.
	Allow map[string][]string
}

// Lab addresses the cases use (package lab's address plan).
const (
	cp1IP, worker1IP, worker2IP = "192.0.2.11", "192.0.2.12", "192.0.2.13"
	routerIP                    = "192.0.2.1"
	baseIP                      = "192.0.2.100" // the baseline group's floating IP
	ext1Net, ext2Net            = "203.0.113.0/24", "198.51.100.0/24"
)

// Names of the baseline objects and the pods' namespaces.
const (
	baseGroup    = "bi-base"
	basePolicy   = "bi-base"
	appNS        = "bi-app"    // unselected pods
	selNS        = "bi-sel"    // pods the baseline policy selects
	svcNS        = "bi-svc"    // the Service's echo pod
	tenantNS     = "bi-tenant" // a tenant namespace for groups
	gatewayNS    = "kube-system"
	selPodLabel  = "client"
	manyGateways = 66 // > 62, the next-hop marks of the default mark mask 0x3f00
)

// groupYAML is a NetworkGatewayGroup; ips are written as given (strings,
// possibly invalid).
func groupYAML(ns, name string, ips ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: networking.gke.io/v1\nkind: NetworkGatewayGroup\nmetadata:\n  namespace: %s\n  name: %s\nspec:\n", ns, name)
	if len(ips) == 0 {
		b.WriteString("  floatingIPs: []\n")
		return b.String()
	}
	b.WriteString("  floatingIPs:\n")
	for _, ip := range ips {
		fmt.Fprintf(&b, "  - %q\n", ip)
	}
	return b.String()
}

// selSource selects the baseline policy's pods.
const selSource = `  - namespaceSelector:
      matchLabels:
        team: sel
    podSelector:
      matchLabels:
        role: client
`

// allSource selects every pod in every namespace.
const allSource = `  - namespaceSelector: {}
    podSelector: {}
`

type policySpec struct {
	name      string
	sources   string // YAML list items under "sources:"; selSource when empty
	dests     []string
	gwName    string // baseGroup when empty
	gwNS      string // kube-system when empty
	action    string // SNAT when empty
	noSources bool   // sources: []
}

func policyYAML(p policySpec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: networking.gke.io/v1\nkind: EgressNATPolicy\nmetadata:\n  name: %s\nspec:\n", p.name)
	switch {
	case p.noSources:
		b.WriteString("  sources: []\n")
	case p.sources == "":
		b.WriteString("  sources:\n" + selSource)
	default:
		b.WriteString("  sources:\n" + p.sources)
	}
	action := p.action
	if action == "" {
		action = "SNAT"
	}
	fmt.Fprintf(&b, "  action: %s\n  destinations:\n", action)
	for _, d := range p.dests {
		fmt.Fprintf(&b, "  - cidr: %q\n", d)
	}
	gw, gwNS := p.gwName, p.gwNS
	if gw == "" {
		gw = baseGroup
	}
	if gwNS == "" {
		gwNS = gatewayNS
	}
	fmt.Fprintf(&b, "  gatewayRef:\n    name: %s\n    namespace: %s\n", gw, gwNS)
	return b.String()
}

// addrRange lists n consecutive IPv4 addresses from first.
func addrRange(first string, n int) []string {
	a := netip.MustParseAddr(first)
	out := make([]string, 0, n)
	for range n {
		out = append(out, a.String())
		a = a.Next()
	}
	return out
}

func cidrs(addrs []string, bits int) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = fmt.Sprintf("%s/%d", a, bits)
	}
	return out
}

// manySources is n sources, each with the CRD's maximum of selector terms
// (16 matchLabels, 16 matchExpressions of 16 values) on both selectors;
// they select no pod of the lab.
func manySources(n int) string {
	var b strings.Builder
	sel := func(indent string, i int) {
		fmt.Fprintf(&b, "%smatchLabels:\n", indent)
		for k := range 16 {
			fmt.Fprintf(&b, "%s  bi-l%d-%d: v%d\n", indent, i, k, k)
		}
		fmt.Fprintf(&b, "%smatchExpressions:\n", indent)
		for k := range 16 {
			fmt.Fprintf(&b, "%s- key: bi-e%d-%d\n%s  operator: In\n%s  values: [", indent, i, k, indent, indent)
			for v := range 16 {
				if v > 0 {
					b.WriteString(", ")
				}
				fmt.Fprintf(&b, "v%d", v)
			}
			b.WriteString("]\n")
		}
	}
	for i := range n {
		b.WriteString("  - namespaceSelector:\n")
		sel("      ", i)
		b.WriteString("    podSelector:\n")
		sel("      ", i)
	}
	return b.String()
}

func group(name string, ips ...string) string { return groupYAML(gatewayNS, name, ips...) }

// cases lists every input the harness tries, in order.
func cases() []badCase {
	baseGroupRef := objRef{Kind: "NetworkGatewayGroup", Namespace: gatewayNS, Name: baseGroup, Baseline: true}
	basePolicyRef := objRef{Kind: "EgressNATPolicy", Name: basePolicy, Baseline: true}
	nodeRef := func(n string) objRef { return objRef{Kind: "Node", Name: n, Baseline: true} }

	maxIPs := append(addrRange("192.0.2.101", 99), addrRange("203.0.113.99", 157)...)
	dests512 := append(cidrs(addrRange("198.51.100.0", 256), 32), cidrs(addrRange("203.0.113.0", 256), 32)...)
	dests513 := append(append([]string(nil), dests512...), "192.0.2.100/32")

	return []badCase{
		// Floating IPs a node must never take.
		{Name: "floating-ip-is-node-ip", About: "a group whose floating IP is worker1's InternalIP",
			YAML: group("bi-nodeip", worker1IP), Concerns: []objRef{nodeRef("worker1")}},
		{Name: "floating-ip-is-apiserver-node-ip", About: "a group whose floating IP is cp1's InternalIP (the API server's address)",
			YAML: group("bi-cpip", cp1IP), Concerns: []objRef{nodeRef("cp1")}},
		{Name: "floating-ip-is-router", About: "a group whose floating IP is the router's address 192.0.2.1",
			YAML: group("bi-router", routerIP)},
		{Name: "floating-ip-is-subnet-network", About: "a group whose floating IP is the node subnet's network address 192.0.2.0",
			YAML: group("bi-network", "192.0.2.0")},
		{Name: "floating-ip-is-subnet-broadcast", About: "a group whose floating IP is the node subnet's broadcast address 192.0.2.255",
			YAML: group("bi-broadcast", "192.0.2.255")},
		{Name: "floating-ip-in-two-groups", About: "a second group listing the baseline group's floating IP",
			YAML: group("bi-dup", baseIP), Concerns: []objRef{baseGroupRef}},
		{Name: "group-in-tenant-namespace", About: "a group in a tenant namespace (not kube-system)",
			YAML: groupYAML(tenantNS, "bi-tenant", "192.0.2.150")},
		{Name: "tenant-group-claims-used-ip", About: "a group in a tenant namespace listing the baseline group's floating IP",
			YAML: groupYAML(tenantNS, "bi-tenant-steal", baseIP), Concerns: []objRef{baseGroupRef}},
		{Name: "floating-ip-0.0.0.0", About: "floating IP 0.0.0.0", YAML: group("bi-zero", "0.0.0.0")},
		{Name: "floating-ip-127.0.0.1", About: "floating IP 127.0.0.1 (loopback)", YAML: group("bi-loopback", "127.0.0.1")},
		{Name: "floating-ip-224.0.0.1", About: "floating IP 224.0.0.1 (multicast)", YAML: group("bi-multicast", "224.0.0.1")},
		{Name: "floating-ip-255.255.255.255", About: "floating IP 255.255.255.255 (limited broadcast)", YAML: group("bi-bcast", "255.255.255.255")},
		{Name: "floating-ip-169.254.1.1", About: "floating IP 169.254.1.1 (link-local)", YAML: group("bi-linklocal", "169.254.1.1")},
		{Name: "group-without-ips", About: "a group with an empty floatingIPs list", YAML: group("bi-empty")},
		{Name: "floating-ip-ipv6", About: "an IPv6 floating IP", YAML: group("bi-ipv6", "2001:db8::1")},
		{Name: "floating-ip-garbage", About: "a floating IP that is no address (192.0.2.300)", YAML: group("bi-garbage", "192.0.2.300")},
		{Name: "floating-ip-listed-twice", About: "one floating IP listed twice in a group", YAML: group("bi-twice", "192.0.2.150", "192.0.2.150")},
		{Name: "floating-ip-outside-node-subnets", About: "a floating IP in no node's subnet (198.51.100.50)",
			YAML: group("bi-elsewhere", "198.51.100.50")},
		{Name: "group-max-floating-ips", About: "256 floating IPs (the CRD maximum): 99 in the node subnet, 157 in no node's subnet",
			YAML: group("bi-maxips", maxIPs...)},
		{Name: "group-257-floating-ips", About: "257 floating IPs (one over the CRD maximum)",
			YAML: group("bi-257ips", append(append([]string(nil), maxIPs...), "192.0.2.150")...)},

		// Policies whose destinations reach into the cluster itself.
		{Name: "policy-to-0.0.0.0/0", About: "the selected pods' traffic to 0.0.0.0/0 through the baseline gateway",
			YAML: policyYAML(policySpec{name: "bi-everywhere", dests: []string{"0.0.0.0/0"}}), Valid: true,
			Allow: map[string][]string{"sel/ext2": {baseIP}}},
		{Name: "policy-to-pod-cidr", About: "a policy whose destination is the pod CIDR 10.244.0.0/16",
			YAML: policyYAML(policySpec{name: "bi-podcidr", dests: []string{"10.244.0.0/16"}})},
		{Name: "policy-to-service-cidr", About: "a policy whose destination is the Service CIDR 10.96.0.0/16",
			YAML: policyYAML(policySpec{name: "bi-svccidr", dests: []string{"10.96.0.0/16"}})},
		{Name: "policy-to-node-subnet", About: "a policy whose destination is the node subnet 192.0.2.0/24",
			YAML: policyYAML(policySpec{name: "bi-nodenet", dests: []string{"192.0.2.0/24"}})},
		{Name: "policy-to-apiserver-node", About: "a policy whose destination is cp1's address 192.0.2.11/32 (the API server)",
			YAML: policyYAML(policySpec{name: "bi-apiserver", dests: []string{cp1IP + "/32"}})},
		{Name: "policy-selects-every-pod", About: "every pod of every namespace to 0.0.0.0/0 through the baseline gateway",
			YAML: policyYAML(policySpec{name: "bi-all", sources: allSource, dests: []string{"0.0.0.0/0"}}), Valid: true,
			Allow: map[string][]string{"sel/ext2": {baseIP}, "app/ext1": {baseIP}, "app/ext2": {baseIP}}},
		{Name: "overlapping-policy-other-gateway", About: "a policy with the baseline policy's pods and destinations through another gateway",
			Setup:    group("bi-other", "192.0.2.120"),
			YAML:     policyYAML(policySpec{name: "bi-overlap", dests: []string{ext1Net}, gwName: "bi-other"}),
			Concerns: []objRef{basePolicyRef}, Allow: map[string][]string{"sel/ext1": {"192.0.2.120"}}},
		{Name: "policy-missing-gateway", About: "a policy whose gatewayRef names no group",
			YAML: policyYAML(policySpec{name: "bi-nogw", dests: []string{ext2Net}, gwName: "bi-nothere"})},
		{Name: "policy-gateway-wrong-namespace", About: "a policy whose gatewayRef names the baseline group in namespace default",
			YAML: policyYAML(policySpec{name: "bi-wrongns", dests: []string{ext2Net}, gwNS: "default"})},
		{Name: "policy-gateway-in-tenant-namespace", About: "a policy through a group in a tenant namespace",
			Setup: groupYAML(tenantNS, "bi-tenant-gw", "192.0.2.151"),
			YAML:  policyYAML(policySpec{name: "bi-tenantref", dests: []string{ext2Net}, gwName: "bi-tenant-gw", gwNS: tenantNS}),
			Allow: map[string][]string{"sel/ext2": {"192.0.2.151", "fail"}}},
		{Name: "policy-gateway-without-usable-ip", About: "a policy through a group whose only IP no node can hold (fail-closed drop allowed)",
			Setup: group("bi-unusable", "198.51.100.50"),
			YAML:  policyYAML(policySpec{name: "bi-unusable", dests: []string{ext2Net}, gwName: "bi-unusable"}),
			Allow: map[string][]string{"sel/ext2": {"fail"}}},

		// Malformed policies.
		{Name: "selector-bad-operator", About: "a matchExpression with operator Equals",
			YAML: policyYAML(policySpec{name: "bi-badop", dests: []string{ext2Net}, sources: `  - namespaceSelector: {}
    podSelector:
      matchExpressions:
      - key: role
        operator: Equals
        values: [client]
`})},
		{Name: "selector-in-without-values", About: "a matchExpression In with no values",
			YAML: policyYAML(policySpec{name: "bi-novalues", dests: []string{ext2Net}, sources: `  - namespaceSelector: {}
    podSelector:
      matchExpressions:
      - key: role
        operator: In
        values: []
`})},
		{Name: "selector-bad-label-key", About: "a matchLabels key that is no label key",
			YAML: policyYAML(policySpec{name: "bi-badkey", dests: []string{ext2Net}, sources: `  - namespaceSelector:
      matchLabels:
        "bad key!": x
    podSelector: {}
`})},
		{Name: "policy-without-sources", About: "a policy with an empty sources list",
			YAML: policyYAML(policySpec{name: "bi-nosources", dests: []string{ext2Net}, noSources: true})},
		{Name: "destination-not-canonical", About: "destination 203.0.113.7/24 (host bits set)",
			YAML: policyYAML(policySpec{name: "bi-noncanon", dests: []string{"203.0.113.7/24"}})},
		{Name: "destination-ipv6", About: "destination 2001:db8::/32",
			YAML: policyYAML(policySpec{name: "bi-v6dest", dests: []string{"2001:db8::/32"}})},
		{Name: "destination-loopback", About: "destination 127.0.0.0/8",
			YAML: policyYAML(policySpec{name: "bi-loopdest", dests: []string{"127.0.0.0/8"}})},
		{Name: "action-drop", About: "action DROP (only SNAT exists)",
			YAML: policyYAML(policySpec{name: "bi-drop", dests: []string{ext2Net}, action: "DROP"})},
		{Name: "policy-max-destinations", About: "512 destinations (the CRD maximum), covering both external servers",
			YAML: policyYAML(policySpec{name: "bi-max-dests", dests: dests512}), Valid: true,
			Allow: map[string][]string{"sel/ext2": {baseIP}}},
		{Name: "policy-513-destinations", About: "513 destinations (one over the CRD maximum)",
			YAML: policyYAML(policySpec{name: "bi-513-dests", dests: dests513})},
		{Name: "policy-max-sources", About: "16 sources (the CRD maximum), each selector with 16 labels and 16 expressions of 16 values",
			YAML: policyYAML(policySpec{name: "bi-max-sources", sources: manySources(16), dests: []string{ext2Net}}), Valid: true},
		{Name: "policy-17-sources", About: "17 sources (one over the CRD maximum)",
			YAML: policyYAML(policySpec{name: "bi-17-sources", sources: strings.Repeat(selSource, 17), dests: []string{ext2Net}})},

		// Beyond single objects.
		{Name: "mark-space-exhausted", About: fmt.Sprintf("%d gateway nodes (fake Nodes with agent Leases answering the health probes), %d groups and %d policies: more next hops than the 62 next-hop marks of mask 0x3f00", manyGateways, manyGateways, manyGateways),
			Apply: applyManyGateways, Undo: undoManyGateways,
			Concerns: []objRef{nodeRef("cp1"), nodeRef("worker1"), nodeRef("worker2"), basePolicyRef}},
		{Name: "spoofed-subnet-advertisement", About: "worker2's agent Lease rewritten (admin token) to claim 198.51.100.13/24, and a group with 198.51.100.50",
			Apply: spoofLease("worker2", "198.51.100.13/24"), Undo: restoreLease("worker2"),
			Concerns: []objRef{nodeRef("worker2"), {Kind: "Lease", Namespace: agentNS, Name: "egressnat-agent-worker2", Baseline: true}}},
		{Name: "garbage-subnet-advertisement", About: "the baseline gateway node's agent Lease rewritten (admin token) to claim an unparsable subnet",
			Apply: spoofHolderLease("not-a-subnet"), Undo: restoreHolderLease,
			Concerns: []objRef{baseGroupRef, basePolicyRef}},
	}
}

// controlCase plants real harm without egressnat (a NAT rule on worker2
// that rewrites its pods' pod-to-pod traffic, and the router's address on
// worker2's uplink) to show that the checks catch it; -control runs it
// first, outside the count.
func controlCase() badCase {
	const table = "enat_bi_control"
	node := func(h *harness) *labNode { return h.c.Lab.Node("worker2") }
	return badCase{Name: "control-planted-harm", About: "not an input: harm planted by hand, which the checks must find",
		Apply: func(ctx context.Context, h *harness) error {
			n := node(h)
			for _, argv := range [][]string{
				{"nft", "add", "table", "ip", table},
				{"nft", "add", "chain", "ip", table, "post", "{ type nat hook postrouting priority 50; }"},
				{"nft", "add", "rule", "ip", table, "post", "ip", "daddr", "10.244.0.0/16", "tcp", "dport", "8080", "snat", "to", worker2IP},
				{"ip", "addr", "add", routerIP + "/32", "dev", "eth0"},
			} {
				if _, err := h.exec(ctx, n.NetNS, argv...); err != nil {
					return err
				}
			}
			return nil
		},
		Undo: func(ctx context.Context, h *harness) error {
			n := node(h)
			h.exec(ctx, n.NetNS, "ip", "addr", "del", routerIP+"/32", "dev", "eth0") //nolint:errcheck
			_, err := h.exec(ctx, n.NetNS, "nft", "delete", "table", "ip", table)
			return err
		},
	}
}
