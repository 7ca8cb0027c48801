package main

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/test/chaos"
	"github.com/egressnat/egressnat/test/cluster"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// observerIP is the sender address of the ARP observer's requests: in the
// node subnet, used by nothing else in the lab (nodes are .11-.99, floating
// IPs .100-.199, the router .1).
var observerIP = netip.MustParseAddr("192.0.2.254")

// switchTable is the nftables table (family bridge) the chaos tool owns in
// the switch namespace.
const switchTable = "enat_chaos"

var (
	gatewayGVR = schema.GroupVersionResource{Group: v1.GroupVersion.Group, Version: v1.GroupVersion.Version, Resource: v1.NetworkGatewayGroupResource}
	policyGVR  = schema.GroupVersionResource{Group: v1.GroupVersion.Group, Version: v1.GroupVersion.Version, Resource: v1.EgressNATPolicyResource}
)

// switchRule is one drop rule of the chaos table: frames entering the
// switch from port from and leaving by port to, matching match (empty: all
// traffic, a cut between the two ports).
type switchRule struct {
	from, to string
	match    string
}

func (r switchRule) String() string {
	s := fmt.Sprintf("iifname %q oifname %q", r.from, r.to)
	if r.match != "" {
		s += " " + r.match
	}
	return s + " drop"
}

// world is the campaign's shared state: the cluster, the observers and
// the faults in effect.
type world struct {
	c       *cluster.Cluster
	dyn     dynamic.Interface
	arp     *chaos.ARPObserver
	src     *chaos.SourceObserver
	status  *statusCache
	start   time.Time
	verbose bool
	// bootGuard: rebooted nodes run the boot unit before their link is up.
	bootGuard bool

	// cmu serializes what changes c.Agents and c.Operators (the cluster's
	// maps are not safe for concurrent use).
	cmu sync.Mutex
	// rmu serializes writes of the switch table.
	rmu sync.Mutex

	mu       sync.Mutex
	out      sync.Mutex
	active   map[int]*fault
	recent   []*fault // ended, newest last
	locks    map[string]int
	rules    map[int][]switchRule
	isolated map[string]int // node -> link-down faults on it
	cuts     map[[2]string]int
	toolErr  []string
	apiDown  bool
	// ownViolations: found by the campaign itself (readiness, convergence).
	ownViolations int
	ports         map[string]string // node -> switch port
}

func newWorld(c *cluster.Cluster, verbose, bootGuard bool) (*world, error) {
	dyn, err := dynamic.NewForConfig(c.API.Config())
	if err != nil {
		return nil, err
	}
	w := &world{c: c, dyn: dyn, verbose: verbose, bootGuard: bootGuard, start: time.Now(),
		active: map[int]*fault{}, locks: map[string]int{}, rules: map[int][]switchRule{},
		isolated: map[string]int{}, cuts: map[[2]string]int{}, ports: map[string]string{}}
	for _, n := range c.Lab.Nodes() {
		w.ports[n.Name] = n.SwitchPort
	}
	w.status = &statusCache{dyn: dyn}
	return w, nil
}

func (w *world) elapsed() float64 { return time.Since(w.start).Seconds() }

// printf prints one line prefixed with the campaign time.
func (w *world) printf(format string, args ...any) {
	w.out.Lock()
	defer w.out.Unlock()
	fmt.Printf("%8.3fs  %s\n", w.elapsed(), fmt.Sprintf(format, args...))
}

func (w *world) debugf(format string, args ...any) {
	if w.verbose {
		w.printf(format, args...)
	}
}

// toolError records a failure of the tool itself (not of the product).
func (w *world) toolError(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	w.mu.Lock()
	w.toolErr = append(w.toolErr, msg)
	w.mu.Unlock()
	w.printf("TOOL ERROR %s", msg)
}

// context describes the faults in effect and those ended in the last 10 s,
// for violation reports.
func (w *world) context() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	var act []string
	for _, f := range w.active {
		act = append(act, fmt.Sprintf("#%d %s %s (%.2fs in)", f.id, f.kind, f.target, now.Sub(f.applied).Seconds()))
	}
	sort.Strings(act)
	var rec []string
	for i := len(w.recent) - 1; i >= 0; i-- {
		f := w.recent[i]
		if now.Sub(f.undone) > 10*time.Second {
			break
		}
		rec = append(rec, fmt.Sprintf("#%d %s %s (%.2fs ago)", f.id, f.kind, f.target, now.Sub(f.undone).Seconds()))
	}
	s := "faults now: none"
	if len(act) > 0 {
		s = "faults now: " + strings.Join(act, ", ")
	}
	if len(rec) > 0 {
		s += "; ended: " + strings.Join(rec, ", ")
	}
	return s
}

func pair(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

// excused tells whether a pod's datagrams cannot get out through no fault
// of egressnat: its node's cable is pulled, or a switch cut lies on its
// path (pod node -> gateway node -> router; the gateway as the group's
// status says). Cuts count in both directions (a one-way cut breaks ARP).
// Partitions from the operators or the API server excuse nothing: what
// egressnat does about them is under test.
func (w *world) excused(p chaos.Pod) bool {
	w.mu.Lock()
	if w.isolated[p.Node] > 0 {
		w.mu.Unlock()
		return true
	}
	if len(w.cuts) == 0 {
		w.mu.Unlock()
		return false
	}
	w.mu.Unlock()
	hops := [][2]string{}
	from := w.ports[p.Node]
	if p.Selected {
		gw := w.status.holder(p.Source)
		if gw == "" {
			return false
		}
		if gw != p.Node {
			hops = append(hops, pair(from, w.ports[gw]))
			from = w.ports[gw]
		}
	}
	hops = append(hops, pair(from, "rtr"))
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, h := range hops {
		if w.cuts[h] > 0 {
			return true
		}
	}
	return false
}

// setRules installs (or, with nil, removes) the switch rules of fault id
// and rewrites the chaos table in one transaction.
func (w *world) setRules(ctx context.Context, id int, rules []switchRule) error {
	w.rmu.Lock()
	defer w.rmu.Unlock()
	w.mu.Lock()
	for _, r := range w.rules[id] {
		if r.match == "" {
			k := pair(r.from, r.to)
			if w.cuts[k]--; w.cuts[k] <= 0 {
				delete(w.cuts, k)
			}
		}
	}
	delete(w.rules, id)
	if len(rules) > 0 {
		w.rules[id] = rules
	}
	ids := make([]int, 0, len(w.rules))
	for i := range w.rules {
		ids = append(ids, i)
	}
	sort.Ints(ids)
	text := chaos.SwitchExemptRules(observerIP)
	for _, i := range ids {
		for _, r := range w.rules[i] {
			text = append(text, r.String())
		}
	}
	w.mu.Unlock()
	// Cuts count for the excuses only once the rules are in (adding) and
	// until they are gone (removing, done above: a removed cut takes some
	// milliseconds to stop mattering, which only makes outages look longer).
	err := w.c.Lab.SetSwitchFilter(ctx, switchTable, text)
	if err == nil {
		w.mu.Lock()
		for _, r := range rules {
			if r.match == "" {
				w.cuts[pair(r.from, r.to)]++
			}
		}
		w.mu.Unlock()
	}
	return err
}

// statusCache polls the groups' and policies' status, for the excuses and
// the reports; it keeps the last answer while the API server is away.
type statusCache struct {
	dyn dynamic.Interface

	mu       sync.Mutex
	groups   map[string]*v1.NetworkGatewayGroup
	policies map[string]*v1.EgressNATPolicy
	at       time.Time
}

func (s *statusCache) run(ctx context.Context) {
	for {
		if g, p, err := readStatus(ctx, s.dyn); err == nil {
			s.mu.Lock()
			s.groups, s.policies, s.at = g, p, time.Now()
			s.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// holder is the node the status says holds ip ("" if none or unknown).
func (s *statusCache) holder(ip netip.Addr) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.groups {
		if n := g.Status.FloatingIPs[ip.String()]; n != "" {
			return n
		}
	}
	return ""
}

// readStatus lists the groups in kube-system and the policies.
func readStatus(ctx context.Context, dyn dynamic.Interface) (map[string]*v1.NetworkGatewayGroup, map[string]*v1.EgressNATPolicy, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	gl, err := dyn.Resource(gatewayGVR).Namespace("kube-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	pl, err := dyn.Resource(policyGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	groups := map[string]*v1.NetworkGatewayGroup{}
	for i := range gl.Items {
		var g v1.NetworkGatewayGroup
		if err := fromUnstructured(&gl.Items[i], &g); err != nil {
			return nil, nil, err
		}
		groups[g.Name] = &g
	}
	policies := map[string]*v1.EgressNATPolicy{}
	for i := range pl.Items {
		var p v1.EgressNATPolicy
		if err := fromUnstructured(&pl.Items[i], &p); err != nil {
			return nil, nil, err
		}
		policies[p.Name] = &p
	}
	return groups, policies, nil
}

func fromUnstructured(u *unstructured.Unstructured, into any) error {
	return runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into)
}

// apiBlocked reports whether node cannot reach the API server (on cp)
// now: the API server is stopped, either node's cable is pulled, or a
// switch rule cuts the way between them (all traffic or the API port).
// A change made through the API meanwhile cannot reach the node's agent.
func (w *world) apiBlocked(node, cp string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.apiDown || w.isolated[node] > 0 || w.isolated[cp] > 0 {
		return true
	}
	np, cpp := w.ports[node], w.ports[cp]
	for _, rules := range w.rules {
		for _, r := range rules {
			if (r.from == np && r.to == cpp) || (r.from == cpp && r.to == np) {
				if r.match == "" || strings.Contains(r.match, "6443") {
					return true
				}
			}
		}
	}
	return false
}

// settleWhenReachable ends pod's transition grace settle after the nodes
// can all reach the API server again (they learn the change only then),
// or after ctx ends.
func (w *world) settleWhenReachable(ctx context.Context, pod, cp string, settle time.Duration, nodes ...string) {
	go func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			blocked := false
			for _, n := range nodes {
				blocked = blocked || w.apiBlocked(n, cp)
			}
			if !blocked {
				w.src.SettleExpect(pod, settle)
				return
			}
			select {
			case <-ctx.Done():
				w.src.SettleExpect(pod, settle)
				return
			case <-t.C:
			}
		}
	}()
}
