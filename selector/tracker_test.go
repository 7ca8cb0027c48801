package selector

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// trackerCluster is a random cluster small enough to hit every case often:
// pods sharing an address, pods of unknown namespaces, every mode.
func trackerCluster(r *rand.Rand) (Input, func() Pod) {
	vals := []string{"a", "b", "c"}
	keys := []string{"app", "tier"}
	randLabels := func() map[string]string {
		m := map[string]string{}
		for _, k := range keys {
			if r.IntN(3) > 0 {
				m[k] = vals[r.IntN(3)]
			}
		}
		return m
	}
	randSel := func() v1.LabelSelector {
		var s v1.LabelSelector
		for range r.IntN(3) {
			k := keys[r.IntN(len(keys))]
			switch r.IntN(4) {
			case 0:
				s.MatchLabels = map[string]v1.LabelValue{k: v1.LabelValue(vals[r.IntN(3)])}
			case 1:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "In", Values: []v1.LabelValue{v1.LabelValue(vals[r.IntN(3)])}})
			case 2:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "NotIn", Values: []v1.LabelValue{v1.LabelValue(vals[r.IntN(3)])}})
			case 3:
				s.MatchExpressions = append(s.MatchExpressions, v1.LabelSelectorRequirement{Key: k, Operator: "Exists"})
			}
		}
		return s
	}
	in := Input{Node: "n1", Namespaces: map[string]map[string]string{},
		NodeIPs:      map[string]netip.Addr{"n1": netip.MustParseAddr("192.0.2.1"), "n2": netip.MustParseAddr("192.0.2.2")},
		LocalSubnets: selPrefixes("192.0.2.0/24"),
		PodCIDRs:     map[string][]netip.Prefix{"n1": selPrefixes("10.244.0.0/24"), "n2": selPrefixes("10.244.1.0/24")}}
	for i := range 5 {
		in.Namespaces[fmt.Sprintf("ns%d", i)] = randLabels()
	}
	// gw: held here (Gateway), gw2: held by n2 (Reroute), gw3: by nobody (Drop).
	in.Groups = []*v1.NetworkGatewayGroup{
		selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n1"),
		selGroup("gw2", []string{"192.0.2.101"}, "192.0.2.101", "n2"),
		selGroup("gw3", []string{"192.0.2.102"}),
	}
	for i := range 9 {
		var srcs []v1.EgressSource
		for range 1 + r.IntN(2) {
			srcs = append(srcs, selSrc(randSel(), randSel()))
		}
		in.Policies = append(in.Policies, selPolicy(fmt.Sprintf("p%d", i), []string{"gw", "gw2", "gw3"}[i%3], srcs, "203.0.113.0/24"))
	}
	n := 0
	newPod := func() Pod {
		n++
		p := Pod{Namespace: fmt.Sprintf("ns%d", r.IntN(6)), Name: fmt.Sprint("pod", n), Node: fmt.Sprintf("n%d", 1+r.IntN(2)),
			Labels: randLabels(), HostNetwork: r.IntN(15) == 0, Terminated: r.IntN(15) == 0}
		if r.IntN(8) > 0 {
			// Few addresses: pods share them often.
			p.IP = netip.AddrFrom4([4]byte{10, 244, 0, byte(r.IntN(40))})
		}
		return p
	}
	for range 30 {
		in.Pods = append(in.Pods, newPod())
	}
	return in, newPod
}

// TestTrackerMatchesDesired: after every random pod event the Tracker's
// state is what Desired computes from scratch, and states returned before
// stay as they were.
func TestTrackerMatchesDesired(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	events, changed := 0, 0
	for iter := range 40 {
		in, newPod := trackerCluster(r)
		tr, _, err := NewTracker(in)
		if err != nil {
			t.Fatal(err)
		}
		pods := map[podKey]Pod{}
		for _, p := range in.Pods {
			pods[podKey{p.Namespace, p.Name}] = p
		}
		for step := range 60 {
			before := tr.State()
			frozenSources := map[string][]netip.Addr{}
			for _, p := range before.Policies {
				frozenSources[p.Name] = slices.Clone(p.Sources)
			}
			frozenLocal := slices.Clone(before.LocalPods)
			keys := slices.SortedFunc(maps.Keys(pods), func(a, b podKey) int {
				return cmpKey(a, b)
			})
			var what string
			switch op := r.IntN(6); {
			case op == 0 || len(keys) == 0:
				p := newPod()
				pods[podKey{p.Namespace, p.Name}] = p
				tr.SetPod(p)
				what = fmt.Sprintf("add %+v", p)
			case op == 1:
				k := keys[r.IntN(len(keys))]
				delete(pods, k)
				tr.DeletePod(k.namespace, k.name)
				what = fmt.Sprintf("delete %v", k)
			default:
				k := keys[r.IntN(len(keys))]
				p := newPod()
				p.Namespace, p.Name = k.namespace, k.name
				if r.IntN(2) == 0 { // keep the address, change the rest
					p.IP = pods[k].IP
				}
				pods[k] = p
				tr.SetPod(p)
				what = fmt.Sprintf("update %+v", p)
			}
			events++
			full := in
			full.Pods = slices.Collect(maps.Values(pods))
			want, err := Desired(full)
			if err != nil {
				t.Fatal(err)
			}
			got := tr.State()
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("iteration %d step %d (%s):\n got %+v\nwant %+v", iter, step, what, got, want)
			}
			if !got.Equal(before) {
				changed++
			}
			for _, p := range before.Policies {
				if !slices.Equal(p.Sources, frozenSources[p.Name]) {
					t.Fatalf("iteration %d step %d: a state returned before changed", iter, step)
				}
			}
			if !slices.Equal(before.LocalPods, frozenLocal) {
				t.Fatalf("iteration %d step %d: the local pods of a state returned before changed", iter, step)
			}
		}
	}
	// The test means something only when events change sources often.
	if changed < events/4 {
		t.Fatalf("only %d of %d events changed sources", changed, events)
	}
}

func cmpKey(a, b podKey) int {
	if a.namespace != b.namespace {
		if a.namespace < b.namespace {
			return -1
		}
		return 1
	}
	switch {
	case a.name < b.name:
		return -1
	case a.name > b.name:
		return 1
	}
	return 0
}

func TestTrackerCases(t *testing.T) {
	in := selBase()
	in.Groups = []*v1.NetworkGatewayGroup{
		selGroup("gw", []string{"192.0.2.100"}, "192.0.2.100", "n2"),
		selGroup("gw-here", []string{"192.0.2.101"}, "192.0.2.101", "n1"),
	}
	in.Policies = []*v1.EgressNATPolicy{
		selPolicy("reroute", "gw", []v1.EgressSource{selSrc(selMatch("env", "prod"), selMatch("app", "web"))}, "203.0.113.0/24"),
		selPolicy("gateway", "gw-here", []v1.EgressSource{selSrc(selMatch("env", "prod"), selMatch("app", "web"))}, "198.51.100.0/24"),
	}
	tr, warns, err := NewTracker(in)
	if err != nil || len(warns) > 0 {
		t.Fatalf("warnings %v, err %v", warns, err)
	}
	sources := func() map[string][]netip.Addr {
		out := map[string][]netip.Addr{}
		for _, p := range tr.State().Policies {
			out[p.Name] = p.Sources
		}
		return out
	}
	if got := sources(); !slices.Equal(got["reroute"], selAddrs("10.244.1.10")) || !slices.Equal(got["gateway"], selAddrs("10.244.1.10", "10.244.2.10")) {
		t.Fatalf("initial sources %v", got)
	}
	// Each event, and the sources of both policies after it.
	for _, tc := range []struct {
		name              string
		event             func()
		reroute, gateways []string
	}{
		{"new local pod selected by both",
			func() { tr.SetPod(selPod("prod", "web-9", "n1", "10.244.1.20", "app", "web")) },
			[]string{"10.244.1.10", "10.244.1.20"}, []string{"10.244.1.10", "10.244.1.20", "10.244.2.10"}},
		{"remote pod: only the gateway policy (cluster-wide)",
			func() { tr.SetPod(selPod("prod", "web-8", "n2", "10.244.2.20", "app", "web")) },
			[]string{"10.244.1.10", "10.244.1.20"}, []string{"10.244.1.10", "10.244.1.20", "10.244.2.10", "10.244.2.20"}},
		{"pod without IP yet: nothing",
			func() { tr.SetPod(selPod("prod", "web-7", "n1", "", "app", "web")) },
			[]string{"10.244.1.10", "10.244.1.20"}, []string{"10.244.1.10", "10.244.1.20", "10.244.2.10", "10.244.2.20"}},
		{"the IP arrives",
			func() { tr.SetPod(selPod("prod", "web-7", "n1", "10.244.1.21", "app", "web")) },
			[]string{"10.244.1.10", "10.244.1.20", "10.244.1.21"}, []string{"10.244.1.10", "10.244.1.20", "10.244.1.21", "10.244.2.10", "10.244.2.20"}},
		{"label change deselects",
			func() { tr.SetPod(selPod("prod", "web-7", "n1", "10.244.1.21", "app", "db")) },
			[]string{"10.244.1.10", "10.244.1.20"}, []string{"10.244.1.10", "10.244.1.20", "10.244.2.10", "10.244.2.20"}},
		{"terminated pod leaves",
			func() {
				p := selPod("prod", "web-9", "n1", "10.244.1.20", "app", "web")
				p.Terminated = true
				tr.SetPod(p)
			},
			[]string{"10.244.1.10"}, []string{"10.244.1.10", "10.244.2.10", "10.244.2.20"}},
		{"an unselected pod takes a selected pod's IP: still listed",
			func() { tr.SetPod(selPod("dev", "other-1", "n1", "10.244.1.10", "app", "x")) },
			[]string{"10.244.1.10"}, []string{"10.244.1.10", "10.244.2.10", "10.244.2.20"}},
		{"the selected pod goes: the IP goes",
			func() { tr.DeletePod("prod", "web-1") },
			nil, []string{"10.244.2.10", "10.244.2.20"}},
		{"pod of an unknown namespace: nothing",
			func() { tr.SetPod(selPod("nowhere", "web-1", "n1", "10.244.1.30", "app", "web")) },
			nil, []string{"10.244.2.10", "10.244.2.20"}},
		{"delete of an unknown pod: nothing",
			func() { tr.DeletePod("prod", "never") },
			nil, []string{"10.244.2.10", "10.244.2.20"}},
	} {
		tc.event()
		got := sources()
		if !slices.Equal(got["reroute"], selAddrs(tc.reroute...)) || !slices.Equal(got["gateway"], selAddrs(tc.gateways...)) {
			t.Errorf("%s: sources %v, want reroute %v, gateway %v", tc.name, got, tc.reroute, tc.gateways)
		}
	}
}

// BenchmarkTrackerSetPod: one pod's address changes in the 20,000-pod,
// 1,000-policy cluster of BenchmarkDesired (the event a new pod makes).
func BenchmarkTrackerSetPod(b *testing.B) {
	for _, held := range []int{1, 19} {
		b.Run(fmt.Sprintf("pods=20000/policies=1000/gateway-for=%dof20", held), func(b *testing.B) {
			in := benchInput(held)
			tr, _, err := NewTracker(in)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				p := in.Pods[(i*7)%len(in.Pods)]
				p.IP = netip.AddrFrom4([4]byte{10, 250, byte(i >> 8), byte(i)})
				tr.SetPod(p)
				_ = tr.State()
			}
		})
	}
}

func BenchmarkNewTracker(b *testing.B) {
	in := benchInput(1)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, _, err := NewTracker(in); err != nil {
			b.Fatal(err)
		}
	}
}

func TestNodeStateEqual(t *testing.T) {
	base := func() NodeState {
		return NodeState{
			Policies: []PolicyState{{Name: "a", Sources: selAddrs("10.0.0.1"), Destinations: selPrefixes("203.0.113.0/24"),
				Mode: ModeReroute, EgressIP: netip.MustParseAddr("192.0.2.100"), NextHop: netip.MustParseAddr("192.0.2.2")}},
			FloatingIPs: selPrefixes("192.0.2.101/24"),
			Excluded:    selPrefixes("10.96.0.0/12"),
		}
	}
	for name, change := range map[string]func(*NodeState){
		"muted":        func(s *NodeState) { s.Muted = selAddrs("192.0.2.100") },
		"source":       func(s *NodeState) { s.Policies[0].Sources = selAddrs("10.0.0.2") },
		"no sources":   func(s *NodeState) { s.Policies[0].Sources = nil },
		"destination":  func(s *NodeState) { s.Policies[0].Destinations = selPrefixes("203.0.113.0/25") },
		"mode":         func(s *NodeState) { s.Policies[0].Mode = ModeDrop },
		"egress":       func(s *NodeState) { s.Policies[0].EgressIP = netip.MustParseAddr("192.0.2.103") },
		"next hop":     func(s *NodeState) { s.Policies[0].NextHop = netip.Addr{} },
		"name":         func(s *NodeState) { s.Policies[0].Name = "b" },
		"policy added": func(s *NodeState) { s.Policies = append(s.Policies, PolicyState{Name: "b"}) },
		"floating":     func(s *NodeState) { s.FloatingIPs = nil },
		"excluded":     func(s *NodeState) { s.Excluded = append(s.Excluded, netip.MustParsePrefix("10.244.0.0/16")) },
		"local pods":   func(s *NodeState) { s.LocalPods = selAddrs("10.244.1.9") },
		"pod networks": func(s *NodeState) { s.PodNetworks = selPrefixes("10.244.0.0/16") },
		"return routes": func(s *NodeState) {
			s.ReturnRoutes = []ReturnRoute{{Dst: netip.MustParsePrefix("10.244.2.0/24"), Via: netip.MustParseAddr("192.0.2.12")}}
		},
	} {
		b := base()
		change(&b)
		if base().Equal(b) || b.Equal(base()) {
			t.Errorf("%s: still equal", name)
		}
	}
	if !base().Equal(base()) {
		t.Error("a state differs from its copy")
	}
	empty := NodeState{Policies: []PolicyState{}}
	if !empty.Equal(NodeState{}) {
		t.Error("an empty list differs from nil")
	}
}
