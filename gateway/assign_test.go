package gateway

import (
	"cmp"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }
func ips(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, ip(x))
	}
	return out
}

func worker(name string, up bool, subnets ...string) Node {
	n := Node{Name: name, Up: up}
	for _, s := range subnets {
		n.Subnets = append(n.Subnets, netip.MustParsePrefix(s))
	}
	return n
}

func cp(name string, up bool, subnets ...string) Node {
	n := worker(name, up, subnets...)
	n.ControlPlane = true
	return n
}

type asg = map[netip.Addr]string

func a(kv ...string) asg {
	m := asg{}
	for i := 0; i < len(kv); i += 2 {
		m[ip(kv[i])] = kv[i+1]
	}
	return m
}

const lan = "192.168.1.0/24"

var seedGroup = Group{Namespace: "kube-system", Name: "gw", FloatingIPs: ips("192.168.1.100", "192.168.1.101", "192.168.1.102")}

func TestAssign(t *testing.T) {
	cases := []struct {
		name    string
		groups  []Group
		nodes   []Node
		current asg
		want    asg
	}{
		{
			name:   "seed example: workers first, fewest first, then name",
			groups: []Group{seedGroup},
			nodes:  []Node{cp("cp1", true, lan), worker("worker2", true, lan), worker("worker1", true, lan)},
			want:   a("192.168.1.100", "worker1", "192.168.1.101", "worker2", "192.168.1.102", "worker1"),
		},
		{
			name:    "stale worker2 (agent stuck): keeps .101, is given no new IP",
			groups:  []Group{seedGroup},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", false, lan), {Name: "worker2", Up: true, Stale: true, Subnets: []netip.Prefix{netip.MustParsePrefix(lan)}}},
			current: a("192.168.1.100", "worker1", "192.168.1.101", "worker2", "192.168.1.102", "worker1"),
			want:    a("192.168.1.100", "cp1", "192.168.1.101", "worker2", "192.168.1.102", "cp1"),
		},
		{
			name:    "worker1 down: its IPs move to worker2, .101 stays",
			groups:  []Group{seedGroup},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", false, lan), worker("worker2", true, lan)},
			current: a("192.168.1.100", "worker1", "192.168.1.101", "worker2", "192.168.1.102", "worker1"),
			want:    a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2"),
		},
		{
			name:    "worker1 back: nothing moves back",
			groups:  []Group{seedGroup},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", true, lan)},
			current: a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2"),
			want:    a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2"),
		},
		{
			name:    "no worker left: control-plane node takes over",
			groups:  []Group{seedGroup},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", false, lan), worker("worker2", false, lan)},
			current: a("192.168.1.100", "worker1", "192.168.1.101", "worker2", "192.168.1.102", "worker1"),
			want:    a("192.168.1.100", "cp1", "192.168.1.101", "cp1", "192.168.1.102", "cp1"),
		},
		{
			name:    "stability: a held IP stays on a control-plane node even when a worker is free",
			groups:  []Group{seedGroup},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", true, lan)},
			current: a("192.168.1.101", "cp1"),
			want:    a("192.168.1.100", "worker1", "192.168.1.101", "cp1", "192.168.1.102", "worker1"),
		},
		{
			name:    "stability counts before new IPs: kept IPs make their node busier",
			groups:  []Group{seedGroup},
			nodes:   []Node{worker("worker1", true, lan), worker("worker2", true, lan)},
			current: a("192.168.1.102", "worker1"),
			// worker1 holds .102, so .100 goes to worker2, then .101 to worker1 (1:1, name).
			want: a("192.168.1.100", "worker2", "192.168.1.101", "worker1", "192.168.1.102", "worker1"),
		},
		{
			name:   "worker preferred over an idle control-plane node",
			groups: []Group{seedGroup},
			nodes:  []Node{cp("cp1", true, lan), worker("worker1", true, lan)},
			want:   a("192.168.1.100", "worker1", "192.168.1.101", "worker1", "192.168.1.102", "worker1"),
		},
		{
			name: "fewest counted over all groups",
			groups: []Group{
				{Namespace: "kube-system", Name: "b", FloatingIPs: ips("192.168.1.20")},
				{Namespace: "kube-system", Name: "a", FloatingIPs: ips("192.168.1.10", "192.168.1.11")},
			},
			nodes:   []Node{worker("n1", true, lan), worker("n2", true, lan), worker("n3", true, lan)},
			current: a("192.168.1.11", "n1"),
			// n1 holds .11 (kept); a/.10 → n2; b/.20 → n3 (the only one with none).
			want: a("192.168.1.10", "n2", "192.168.1.11", "n1", "192.168.1.20", "n3"),
		},
		{
			name: "groups ordered by namespace then name, IPs in spec order",
			groups: []Group{
				{Namespace: "z", Name: "a", FloatingIPs: ips("192.168.1.1")},
				{Namespace: "a", Name: "z", FloatingIPs: ips("192.168.1.9", "192.168.1.2")},
			},
			nodes: []Node{worker("n1", true, lan), worker("n2", true, lan)},
			// a/z first: .9 → n1, .2 → n2; then z/a: .1 → n1.
			want: a("192.168.1.9", "n1", "192.168.1.2", "n2", "192.168.1.1", "n1"),
		},
		{
			name:   "subnet mismatch: only nodes whose subnet contains the IP; none → absent",
			groups: []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("10.0.0.5", "192.168.1.5", "172.16.0.1")}},
			nodes:  []Node{worker("a", true, "10.0.0.0/24"), worker("b", true, lan)},
			want:   a("10.0.0.5", "a", "192.168.1.5", "b"),
		},
		{
			name:    "holder whose subnet no longer contains the IP loses it",
			groups:  []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("192.168.1.5")}},
			nodes:   []Node{worker("a", true, "10.0.0.0/24"), worker("b", true, lan)},
			current: a("192.168.1.5", "a"),
			want:    a("192.168.1.5", "b"),
		},
		{
			name:    "holder that no longer exists loses it; unknown IPs in current are dropped",
			groups:  []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("192.168.1.5")}},
			nodes:   []Node{worker("b", true, lan)},
			current: a("192.168.1.5", "gone", "192.168.1.6", "b"),
			want:    a("192.168.1.5", "b"),
		},
		{
			name:    "no Up node: IP absent even when it was held",
			groups:  []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("192.168.1.5")}},
			nodes:   []Node{worker("b", false, lan), cp("c", false, lan)},
			current: a("192.168.1.5", "b"),
			want:    a(),
		},
		{
			name: "same IP in two groups is assigned once",
			groups: []Group{
				{Namespace: "ns", Name: "g1", FloatingIPs: ips("192.168.1.5")},
				{Namespace: "ns", Name: "g2", FloatingIPs: ips("192.168.1.5", "192.168.1.6")},
			},
			nodes: []Node{worker("n1", true, lan), worker("n2", true, lan)},
			want:  a("192.168.1.5", "n1", "192.168.1.6", "n2"),
		},
		{
			name:   "overlapping subnets: candidates are the union, each node once",
			groups: []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("10.1.2.3", "10.1.2.4", "10.1.9.9")}},
			nodes: []Node{
				worker("wide", true, "10.1.0.0/16"),
				worker("narrow", true, "10.1.2.0/24", "10.1.0.0/16"),
			},
			// .2.3: both idle → narrow (name); .2.4: wide idle → wide; .9.9: only... both in /16, 1:1 → narrow.
			want: a("10.1.2.3", "narrow", "10.1.2.4", "wide", "10.1.9.9", "narrow"),
		},
		{
			name:   "unusable addresses are never assigned, even in a node's subnet",
			groups: []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("127.0.0.5", "169.254.1.1", "224.0.0.9", "0.0.0.1", "192.168.1.5")}},
			nodes:  []Node{worker("n", true, "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", lan)},
			want:   a("192.168.1.5", "n"),
		},
		{
			name:   "nodeSelector: only the selected nodes hold the group's IPs, the seed's order among them",
			groups: []Group{{Namespace: "kube-system", Name: "gw", FloatingIPs: seedGroup.FloatingIPs, Nodes: map[string]bool{"cp1": true, "worker2": true}}},
			nodes:  []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", true, lan)},
			want:   a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2"),
		},
		{
			name:    "nodeSelector: the selected holder dies, the IPs go to another selected node only",
			groups:  []Group{{Namespace: "kube-system", Name: "gw", FloatingIPs: seedGroup.FloatingIPs, Nodes: map[string]bool{"cp1": true, "worker2": true}}},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", false, lan)},
			current: a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2"),
			want:    a("192.168.1.100", "cp1", "192.168.1.101", "cp1", "192.168.1.102", "cp1"),
		},
		{
			name:    "nodeSelector: no selected node can hold the IPs, none is assigned",
			groups:  []Group{{Namespace: "kube-system", Name: "gw", FloatingIPs: seedGroup.FloatingIPs, Nodes: map[string]bool{"worker2": true}}},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", false, lan)},
			current: a("192.168.1.100", "worker2"),
			want:    a(),
		},
		{
			name:    "nodeSelector: a holder no longer selected gives its IPs up; another group on the same subnet is not bound",
			groups:  []Group{{Namespace: "kube-system", Name: "gw", FloatingIPs: ips("192.168.1.100"), Nodes: map[string]bool{"worker2": true}}, {Namespace: "kube-system", Name: "other", FloatingIPs: ips("192.168.1.110")}},
			nodes:   []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", true, lan)},
			current: a("192.168.1.100", "worker1", "192.168.1.110", "worker1"),
			want:    a("192.168.1.100", "worker2", "192.168.1.110", "worker1"),
		},
		{
			name:   "unmasked subnet reported by an agent still counts",
			groups: []Group{{Namespace: "ns", Name: "g", FloatingIPs: ips("192.168.1.5")}},
			nodes:  []Node{{Name: "n", Up: true, Subnets: []netip.Prefix{netip.MustParsePrefix("192.168.1.17/24")}}},
			want:   a("192.168.1.5", "n"),
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Assign(tc.groups, tc.nodes, tc.current)
			if !maps.Equal(got, tc.want) {
				t.Fatalf("Assign:\n got %v\nwant %v", got, tc.want)
			}
			// Determinism: node and group order in the input do not matter.
			rg, rn := slices.Clone(tc.groups), slices.Clone(tc.nodes)
			slices.Reverse(rg)
			slices.Reverse(rn)
			if again := Assign(rg, rn, tc.current); !maps.Equal(again, got) {
				t.Fatalf("Assign with reversed inputs:\n got %v\nwant %v", again, got)
			}
			// Stability: feeding the result back changes nothing.
			if again := Assign(tc.groups, tc.nodes, got); !maps.Equal(again, got) {
				t.Fatalf("Assign is not a fixed point:\n got %v\nwant %v", again, got)
			}
		})
	}
}

func TestAssignFailoverSequence(t *testing.T) {
	nodes := []Node{cp("cp1", true, lan), worker("worker1", true, lan), worker("worker2", true, lan)}
	cur := Assign([]Group{seedGroup}, nodes, nil)
	steps := []struct {
		down []string
		want asg
	}{
		{nil, a("192.168.1.100", "worker1", "192.168.1.101", "worker2", "192.168.1.102", "worker1")},
		{[]string{"worker1"}, a("192.168.1.100", "worker2", "192.168.1.101", "worker2", "192.168.1.102", "worker2")},
		{[]string{"worker1", "worker2"}, a("192.168.1.100", "cp1", "192.168.1.101", "cp1", "192.168.1.102", "cp1")},
		{nil, a("192.168.1.100", "cp1", "192.168.1.101", "cp1", "192.168.1.102", "cp1")},
	}
	for i, s := range steps {
		for j := range nodes {
			nodes[j].Up = !slices.Contains(s.down, nodes[j].Name)
		}
		cur = Assign([]Group{seedGroup}, nodes, cur)
		if !maps.Equal(cur, s.want) {
			t.Fatalf("step %d (down %v):\n got %v\nwant %v", i, s.down, cur, s.want)
		}
	}
}

// naiveAssign is the rule written as plainly as possible: a reference for
// the indexed implementation.
func naiveAssign(groups []Group, nodes []Node, current map[netip.Addr]string) map[netip.Addr]string {
	gs := slices.Clone(groups)
	slices.SortStableFunc(gs, func(x, y Group) int {
		return cmp.Or(cmp.Compare(x.Namespace, y.Namespace), cmp.Compare(x.Name, y.Name))
	})
	var all []netip.Addr
	owner := map[netip.Addr]Group{} // the first group listing the IP
	for _, g := range gs {
		for _, i := range g.FloatingIPs {
			if !slices.Contains(all, i) {
				all = append(all, i)
				owner[i] = g
			}
		}
	}
	eligible := func(n Node, i netip.Addr) bool {
		if !n.Up {
			return false
		}
		if g := owner[i]; g.Nodes != nil && !g.Nodes[n.Name] {
			return false
		}
		for _, s := range n.Subnets {
			if s.Masked().Contains(i) {
				return true
			}
		}
		return false
	}
	count := map[string]int{}
	out := map[netip.Addr]string{}
	for _, i := range all {
		for _, n := range nodes {
			if n.Name == current[i] && eligible(n, i) && n.Draining == "" {
				out[i] = n.Name
				count[n.Name]++
			}
		}
	}
	for _, i := range all {
		if _, ok := out[i]; ok {
			continue
		}
		best := -1
		for k, n := range nodes {
			if !eligible(n, i) || n.Stale || n.Draining != "" {
				continue
			}
			if best < 0 {
				best = k
				continue
			}
			b := nodes[best]
			c := cmp.Or(compareBool(n.ControlPlane, b.ControlPlane), cmp.Compare(count[n.Name], count[b.Name]), cmp.Compare(n.Name, b.Name))
			if c < 0 {
				best = k
			}
		}
		if best >= 0 {
			out[i] = nodes[best].Name
			count[nodes[best].Name]++
			continue
		}
		// Nobody else can: a draining holder keeps it.
		for _, n := range nodes {
			if n.Name == current[i] && eligible(n, i) {
				out[i] = n.Name
				count[n.Name]++
			}
		}
	}
	return out
}

func TestAssignMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	subnets := []string{"10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/16", "10.0.0.0/23", "10.0.0.128/25"}
	for iter := 0; iter < 300; iter++ {
		var nodes []Node
		for k := range 1 + r.IntN(12) {
			n := Node{Name: fmt.Sprintf("n%02d", k), Up: r.IntN(4) != 0, ControlPlane: r.IntN(4) == 0, Stale: r.IntN(6) == 0}
			if r.IntN(5) == 0 {
				n.Draining = "cordoned"
			}
			for range 1 + r.IntN(2) {
				n.Subnets = append(n.Subnets, netip.MustParsePrefix(subnets[r.IntN(len(subnets))]))
			}
			nodes = append(nodes, n)
		}
		var groups []Group
		for g := range 1 + r.IntN(4) {
			grp := Group{Namespace: "ns", Name: fmt.Sprintf("g%d", r.IntN(10)*10+g)}
			for range 1 + r.IntN(6) {
				grp.FloatingIPs = append(grp.FloatingIPs, netip.AddrFrom4([4]byte{10, byte(r.IntN(3)), 0, byte(r.IntN(256))}))
			}
			if r.IntN(2) == 0 { // a nodeSelector: a random subset of the nodes
				grp.Nodes = map[string]bool{}
				for _, n := range nodes {
					if r.IntN(2) == 0 {
						grp.Nodes[n.Name] = true
					}
				}
			}
			groups = append(groups, grp)
		}
		current := map[netip.Addr]string{}
		for _, g := range groups {
			for _, i := range g.FloatingIPs {
				if r.IntN(2) == 0 {
					current[i] = nodes[r.IntN(len(nodes))].Name
				}
			}
		}
		got, want := Assign(groups, nodes, current), naiveAssign(groups, nodes, current)
		if !maps.Equal(got, want) {
			t.Fatalf("iteration %d: nodes %+v groups %+v current %v:\n got %v\nwant %v", iter, nodes, groups, current, got, want)
		}
	}
}
