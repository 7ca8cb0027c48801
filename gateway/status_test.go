package gateway

import (
	"maps"
	"net/netip"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
)

func TestGroupStatus(t *testing.T) {
	nodes := []Node{
		cp("cp1", true, lan),
		worker("worker1", false, lan),
		worker("worker2", true, "10.0.0.0/24", lan),
		worker("other", true, "10.9.0.0/16"),
		worker("wide", true, "192.168.0.0/16"),
		{Name: "nosubnet", Up: true},
	}
	cases := []struct {
		name       string
		g          Group
		assignment map[netip.Addr]string
		wantNodes  map[string]v1.NodeHealth
		wantIPs    map[string]string
		wantCount  int32
	}{
		{
			name:       "seed shape",
			g:          seedGroup,
			assignment: a("192.168.1.100", "worker2", "192.168.1.101", "cp1", "10.0.0.7", "worker2"),
			wantNodes:  map[string]v1.NodeHealth{"cp1": v1.NodeUp, "worker1": v1.NodeDown, "worker2": v1.NodeUp, "wide": v1.NodeUp},
			wantIPs:    map[string]string{"192.168.1.100": "worker2", "192.168.1.101": "cp1"},
			wantCount:  2,
		},
		{
			name:       "IP outside every subnet: no nodes, not assigned",
			g:          Group{Namespace: "ns", Name: "g", FloatingIPs: ips("172.16.0.1")},
			assignment: a(),
			wantNodes:  map[string]v1.NodeHealth{},
			wantIPs:    map[string]string{},
		},
		{
			name:       "IPs in two subnets",
			g:          Group{Namespace: "ns", Name: "g", FloatingIPs: ips("10.9.3.3", "10.0.0.9")},
			assignment: a("10.9.3.3", "other"),
			wantNodes:  map[string]v1.NodeHealth{"other": v1.NodeUp, "worker2": v1.NodeUp},
			wantIPs:    map[string]string{"10.9.3.3": "other"},
			wantCount:  1,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			gotNodes, gotIPs, gotCount := GroupStatus(tc.g, nodes, tc.assignment)
			if !maps.Equal(gotNodes, tc.wantNodes) {
				t.Errorf("nodes = %v, want %v", gotNodes, tc.wantNodes)
			}
			if !maps.Equal(gotIPs, tc.wantIPs) {
				t.Errorf("floatingIPs = %v, want %v", gotIPs, tc.wantIPs)
			}
			if gotCount != tc.wantCount {
				t.Errorf("assigned = %d, want %d", gotCount, tc.wantCount)
			}
		})
	}
}

func TestAssignThenStatus(t *testing.T) {
	nodes := []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", true, lan)}
	asgn := Assign([]Group{seedGroup}, nodes, nil)
	gotNodes, gotIPs, n := GroupStatus(seedGroup, nodes, asgn)
	wantNodes := map[string]v1.NodeHealth{"cp1": "Up", "worker1": "Up", "worker2": "Up"}
	wantIPs := map[string]string{"192.168.1.100": "worker1", "192.168.1.101": "worker2", "192.168.1.102": "worker1"}
	if !maps.Equal(gotNodes, wantNodes) || !maps.Equal(gotIPs, wantIPs) || n != 3 {
		t.Fatalf("GroupStatus = %v %v %d, want %v %v 3", gotNodes, gotIPs, n, wantNodes, wantIPs)
	}
}
