package gateway

import (
	"fmt"
	"net/netip"
	"testing"
)

// benchCluster builds nodes spread over /16 subnets 10.<s>.0.0/16, 1 in 50
// a control-plane node and 1 in 23 Down, and groups of 100 floating IPs
// spread over the subnets. current holds half of the IPs, many on nodes of
// another subnet or Down, so that a run keeps, moves and places IPs.
func benchCluster(nNodes, nIPs, nSubnets int) ([]Group, []Node, map[netip.Addr]string) {
	addr := func(s, off int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(s), byte(off >> 8), byte(off)}) }
	nodes := make([]Node, nNodes)
	for i := range nodes {
		s := i % nSubnets
		nodes[i] = Node{
			Name:         fmt.Sprintf("node-%05d", i),
			ControlPlane: i%50 == 0,
			Up:           i%23 != 7,
			IP:           addr(s, 1+i/nSubnets),
			Subnets:      []netip.Prefix{netip.PrefixFrom(addr(s, 0), 16)},
		}
	}
	var groups []Group
	current := map[netip.Addr]string{}
	for i := range nIPs {
		if i%100 == 0 {
			groups = append(groups, Group{Namespace: "kube-system", Name: fmt.Sprintf("gw-%03d", i/100)})
		}
		fip := addr(i%nSubnets, 60000+i/nSubnets)
		g := &groups[len(groups)-1]
		g.FloatingIPs = append(g.FloatingIPs, fip)
		if i%2 == 0 {
			current[fip] = nodes[(i*7)%nNodes].Name
		}
	}
	return groups, nodes, current
}

func BenchmarkAssign(b *testing.B) {
	for _, bc := range []struct {
		name                   string
		nodes, ips, subnetsNum int
	}{
		{"nodes=5000/ips=1000/subnets=1", 5000, 1000, 1},
		{"nodes=5000/ips=1000/subnets=20", 5000, 1000, 20},
	} {
		b.Run(bc.name, func(b *testing.B) {
			groups, nodes, current := benchCluster(bc.nodes, bc.ips, bc.subnetsNum)
			got := Assign(groups, nodes, current)
			if len(got) != bc.ips {
				b.Fatalf("assigned %d of %d IPs", len(got), bc.ips)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				Assign(groups, nodes, current)
			}
		})
	}
}
