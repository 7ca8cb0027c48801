package selector

import (
	"fmt"
	"net/netip"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// benchInput builds a cluster of 100 nodes, 50 namespaces (labels team,
// env), 20,000 pods (labels app among 200, tier, version, a unique
// pod-template-hash), 20 gateway groups and 1,000 policies with 5
// destinations each (5,000 CIDRs, some overlapping). Most policies select
// one or two apps in a few namespaces through matchLabels and
// matchExpressions; every 50th selects whole namespaces and every 100th
// half of the cluster. This node (node-000) holds the egress IPs of the
// first `held` groups; other nodes hold the rest but the last, which nobody
// holds.
func benchInput(held int) Input {
	in := Input{
		Node:         "node-000",
		Namespaces:   map[string]map[string]string{},
		NodeIPs:      map[string]netip.Addr{},
		LocalSubnets: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
	}
	for n := range 100 {
		in.NodeIPs[fmt.Sprintf("node-%03d", n)] = netip.AddrFrom4([4]byte{192, 0, 2, byte(n + 1)})
	}
	env := []string{"prod", "dev"}
	for ns := range 50 {
		in.Namespaces[fmt.Sprintf("ns-%02d", ns)] = map[string]string{
			"team": fmt.Sprintf("team-%02d", ns%25), "env": env[ns%2], "kubernetes.io/metadata.name": fmt.Sprintf("ns-%02d", ns),
		}
	}
	tiers := []string{"frontend", "backend", "batch"}
	for i := range 20000 {
		app := (i * 7919) % 200
		in.Pods = append(in.Pods, Pod{
			Namespace: fmt.Sprintf("ns-%02d", i%50),
			Name:      fmt.Sprintf("pod-%05d", i),
			Node:      fmt.Sprintf("node-%03d", i%100),
			IP:        netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}),
			Labels: map[string]string{
				"app": fmt.Sprintf("app-%03d", app), "tier": tiers[app%3], "version": fmt.Sprintf("v%d", i%4),
				"pod-template-hash": fmt.Sprintf("%08x", i*2654435761),
			},
			HostNetwork: i%500 == 0,
			Terminated:  i%333 == 0,
		})
	}
	for g := range 20 {
		grp := &v1.NetworkGatewayGroup{
			ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: fmt.Sprintf("gw-%02d", g)},
			Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: []string{fmt.Sprintf("192.0.2.%d", 200+g), fmt.Sprintf("192.0.2.%d", 230+g)}},
			Status:     v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{}},
		}
		switch {
		case g < held:
			grp.Status.FloatingIPs[grp.Spec.FloatingIPs[0]] = in.Node
		case g == 19:
			// nobody holds it: its policies drop
		default:
			grp.Status.FloatingIPs[grp.Spec.FloatingIPs[0]] = fmt.Sprintf("node-%03d", 1+g)
		}
		in.Groups = append(in.Groups, grp)
	}
	for p := range 1000 {
		lv := func(s string) v1.LabelValue { return v1.LabelValue(s) }
		src := v1.EgressSource{
			NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"team": lv(fmt.Sprintf("team-%02d", p%25))}},
			PodSelector: v1.LabelSelector{
				MatchLabels: map[string]v1.LabelValue{"app": lv(fmt.Sprintf("app-%03d", p%200))},
				MatchExpressions: []v1.LabelSelectorRequirement{
					{Key: "version", Operator: "NotIn", Values: []v1.LabelValue{lv(fmt.Sprintf("v%d", p%4))}},
				},
			},
		}
		src2 := v1.EgressSource{
			NamespaceSelector: v1.LabelSelector{MatchExpressions: []v1.LabelSelectorRequirement{
				{Key: "env", Operator: "In", Values: []v1.LabelValue{lv(env[p%2])}},
				{Key: "team", Operator: "Exists"},
			}},
			PodSelector: v1.LabelSelector{MatchExpressions: []v1.LabelSelectorRequirement{
				{Key: "app", Operator: "In", Values: []v1.LabelValue{lv(fmt.Sprintf("app-%03d", (p*13)%200)), lv(fmt.Sprintf("app-%03d", (p*17)%200))}},
				{Key: "tier", Operator: "In", Values: []v1.LabelValue{lv(tiers[p%3])}},
			}},
		}
		srcs := []v1.EgressSource{src, src2}
		switch {
		case p%100 == 0: // half of the cluster
			srcs = []v1.EgressSource{{NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"env": "prod"}}}}
		case p%50 == 0: // whole namespaces
			srcs = []v1.EgressSource{{NamespaceSelector: v1.LabelSelector{MatchLabels: map[string]v1.LabelValue{"team": lv(fmt.Sprintf("team-%02d", p%25))}}}}
		}
		pol := &v1.EgressNATPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("policy-%04d", p)},
			Spec: v1.EgressNATPolicySpec{
				Sources:    srcs,
				Action:     v1.ActionSNAT,
				GatewayRef: v1.GatewayRef{Namespace: "kube-system", Name: fmt.Sprintf("gw-%02d", p%20)},
			},
		}
		for d := range 5 {
			cidr := fmt.Sprintf("%d.%d.%d.0/24", 100+p%50, p/50, d)
			if d == 4 {
				cidr = fmt.Sprintf("%d.%d.0.0/16", 100+p%50, p/50) // contains the others
			}
			pol.Spec.Destinations = append(pol.Spec.Destinations, v1.EgressDestination{CIDR: cidr})
		}
		in.Policies = append(in.Policies, pol)
	}
	return in
}

func BenchmarkDesired(b *testing.B) {
	for _, bc := range []struct {
		name string
		held int
	}{
		{"pods=20000/policies=1000/cidrs=5000/gateway-for=1of20", 1},
		{"pods=20000/policies=1000/cidrs=5000/gateway-for=19of20", 19},
	} {
		b.Run(bc.name, func(b *testing.B) {
			in := benchInput(bc.held)
			st, warns, err := selDesired(in)
			if err != nil || len(warns) != 0 || len(st.Policies) != 1000 {
				b.Fatalf("policies %d, warnings %q, err %v", len(st.Policies), warns, err)
			}
			var srcs int
			modes := map[Mode]int{}
			for _, p := range st.Policies {
				srcs += len(p.Sources)
				modes[p.Mode]++
				if len(p.Destinations) != 1 {
					b.Fatalf("policy %s: destinations %v not merged", p.Name, p.Destinations)
				}
			}
			b.ReportMetric(float64(srcs), "sources")
			b.Logf("modes %v, %d source addresses", modes, srcs)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := Desired(in); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
