package selector

import (
	"net/netip"
	"slices"
)

// Tracker keeps one node's desired state current as pods come, change and
// go, touching only the policies a changed pod's addresses belong to: a pod
// event costs a lookup of the policies whose namespace selectors match the
// pod's namespace and a check of those, not a recomputation of the node.
// Anything else (policies, gateway groups, namespaces, nodes) changes the
// Input as a whole: build a new Tracker with NewTracker.
//
// After any sequence of SetPod and DeletePod, State equals Desired of the
// Input with the pods as they are now (the tests check this).
//
// A Tracker is not safe for concurrent use.
type Tracker struct {
	in       Input // Pods is nil: the pods live in pods
	state    NodeState
	compiled []*CompiledPolicy // by index of state.Policies
	local    []bool            // the policy selects this node's pods only
	pods     map[podKey]Pod
	byIP     map[netip.Addr][]podKey
	// nsPolicies: namespace → indexes of the policies one of whose
	// namespace selectors matches it; filled on first use.
	nsPolicies map[string][]int
}

type podKey struct{ namespace, name string }

// NewTracker computes the desired state of in (see Desired) and returns a
// Tracker holding it, with the warnings about what Desired skipped.
func NewTracker(in Input) (*Tracker, []string, error) {
	st, warn, compiled, err := desired(in)
	if err != nil {
		return nil, nil, err
	}
	t := &Tracker{
		state:      st,
		compiled:   compiled,
		local:      make([]bool, len(st.Policies)),
		pods:       make(map[podKey]Pod, len(in.Pods)),
		byIP:       make(map[netip.Addr][]podKey, len(in.Pods)),
		nsPolicies: map[string][]int{},
	}
	for i, p := range st.Policies {
		t.local[i] = p.Mode != ModeGateway
	}
	for _, p := range in.Pods {
		if old, dup := t.pods[podKey{p.Namespace, p.Name}]; dup {
			t.remove(podKey{p.Namespace, p.Name}, old)
		}
		t.add(p)
	}
	in.Pods = nil
	t.in = in
	return t, warn, nil
}

// State returns the current desired state. The caller may keep it: later
// events replace the Sources of changed policies, they never modify a
// returned slice.
func (t *Tracker) State() NodeState {
	st := t.state
	st.Policies = slices.Clone(t.state.Policies)
	return st
}

// SetPod adds or updates a pod (by namespace and name).
func (t *Tracker) SetPod(p Pod) {
	k := podKey{p.Namespace, p.Name}
	var affected []netip.Addr
	if old, ok := t.pods[k]; ok {
		affected = append(affected, t.remove(k, old)...)
	}
	affected = append(affected, t.add(p)...)
	t.refresh(p.Namespace, affected)
	t.refreshLocal(affected)
}

// DeletePod removes a pod.
func (t *Tracker) DeletePod(namespace, name string) {
	k := podKey{namespace, name}
	if old, ok := t.pods[k]; ok {
		ips := t.remove(k, old)
		t.refresh(namespace, ips)
		t.refreshLocal(ips)
	}
}

// refreshLocal brings NodeState.LocalPods up to date for the addresses
// ips: an address is listed while one of this node's known pods has it.
func (t *Tracker) refreshLocal(ips []netip.Addr) {
	for _, ip := range ips {
		want := slices.ContainsFunc(t.byIP[ip], func(k podKey) bool { return knownLocal(t.in.Node, t.pods[k]) })
		at, have := slices.BinarySearchFunc(t.state.LocalPods, ip, netip.Addr.Compare)
		switch {
		case want && !have:
			t.state.LocalPods = slices.Insert(slices.Clip(t.state.LocalPods), at, ip)
		case !want && have:
			t.state.LocalPods = slices.Delete(slices.Clone(t.state.LocalPods), at, at+1)
			if len(t.state.LocalPods) == 0 {
				t.state.LocalPods = nil
			}
		}
	}
}

// add records p and returns its address, if it has one.
func (t *Tracker) add(p Pod) []netip.Addr {
	p.IP = p.IP.Unmap()
	k := podKey{p.Namespace, p.Name}
	t.pods[k] = p
	if !p.IP.IsValid() {
		return nil
	}
	t.byIP[p.IP] = append(t.byIP[p.IP], k)
	return []netip.Addr{p.IP}
}

func (t *Tracker) remove(k podKey, old Pod) []netip.Addr {
	delete(t.pods, k)
	if !old.IP.IsValid() {
		return nil
	}
	keys := slices.DeleteFunc(t.byIP[old.IP], func(o podKey) bool { return o == k })
	if len(keys) == 0 {
		delete(t.byIP, old.IP)
	} else {
		t.byIP[old.IP] = keys
	}
	return []netip.Addr{old.IP}
}

// refresh brings the sources of the policies up to date for the addresses
// ips, after a change of a pod of namespace ns.
//
// A policy lists an address when it selects a pod with that address. Only
// the changed pod's selection changed, so only policies matching its
// namespace can change; for those, every pod with the address counts.
func (t *Tracker) refresh(ns string, ips []netip.Addr) {
	slices.SortFunc(ips, netip.Addr.Compare)
	ips = slices.Compact(ips)
	if len(ips) == 0 {
		return
	}
	for _, i := range t.policiesOf(ns) {
		for _, ip := range ips {
			want := false
			for _, k := range t.byIP[ip] {
				if t.selects(i, t.pods[k]) {
					want = true
					break
				}
			}
			ps := &t.state.Policies[i]
			at, have := slices.BinarySearchFunc(ps.Sources, ip, netip.Addr.Compare)
			switch {
			case want && !have:
				// Copy on write: a State returned earlier keeps its slice.
				ps.Sources = slices.Insert(slices.Clip(ps.Sources), at, ip)
			case !want && have:
				ps.Sources = slices.Delete(slices.Clone(ps.Sources), at, at+1)
				if len(ps.Sources) == 0 {
					ps.Sources = nil // as Desired has it
				}
			}
		}
	}
}

// selects reports whether policy i selects pod p as Desired does.
func (t *Tracker) selects(i int, p Pod) bool {
	nsl, ok := t.in.Namespaces[p.Namespace]
	if !ok || (t.local[i] && p.Node != t.in.Node) {
		return false
	}
	return t.compiled[i].Selects(p, nsl)
}

// policiesOf returns the policies one of whose namespace selectors matches
// namespace ns (none for an unknown namespace).
func (t *Tracker) policiesOf(ns string) []int {
	if out, ok := t.nsPolicies[ns]; ok {
		return out
	}
	out := []int{}
	if nsl, ok := t.in.Namespaces[ns]; ok {
		for i, cp := range t.compiled {
			if cp.selectsNamespace(nsl) {
				out = append(out, i)
			}
		}
	}
	t.nsPolicies[ns] = out
	return out
}
