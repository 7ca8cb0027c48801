package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

var (
	groupGVR  = schema.GroupVersionResource{Group: "networking.gke.io", Version: "v1", Resource: "networkgatewaygroups"}
	policyGVR = schema.GroupVersionResource{Group: "networking.gke.io", Version: "v1", Resource: "egressnatpolicies"}
)

const (
	agentNS = cluster.SystemNamespace
	// The Service every pod reaches through kube-proxy, and its backend.
	svcName  = "echo"
	svcPort  = 80
	echoPort = 8080
	// nodeEchoPort: an echo server on every node (a hostNetwork server).
	nodeEchoPort = 18080
)

var svcIP = netip.MustParseAddr("10.96.0.80")

// probe is one TCP exchange with an echo server, which answers with the
// source address it saw.
type probe struct {
	name  string
	ns    string // network namespace it starts in
	class string // app (unselected pods), sel (the baseline policy's pods), node
	kind  string // pod, node, svc, ext
	ext   string // ext1, ext2 for kind ext
	addr  string
}

// allowKey is the key of badCase.Allow for a probe ("" when a probe can have
// no allowance: internal traffic and nodes' own traffic never change).
func (p probe) allowKey() string {
	if p.kind != "ext" || p.class == "node" {
		return ""
	}
	return p.class + "/" + p.ext
}

type harness struct {
	c             *cluster.Cluster
	dyn           dynamic.Interface
	reportTimeout time.Duration
	log           func(format string, args ...any)

	nodes   []*lab.Node
	pods    []*cluster.Pod // probe clients
	echoPod *cluster.Pod
	probes  []probe

	baseTraffic map[string]string // probe name -> source seen
	baseState   map[string]string // node -> egressnat kernel state
	baseMain    map[string]string // node -> main routing table

	// Set by a case's Apply for its Undo and its report.
	extraConcerns []objRef
	savedLease    map[string]map[string]string // node -> annotations
	fakeListener  net.Listener
	manyYAML      string
}

func newHarness(c *cluster.Cluster, reportTimeout time.Duration, log func(string, ...any)) (*harness, error) {
	dyn, err := dynamic.NewForConfig(c.API.Config())
	if err != nil {
		return nil, err
	}
	return &harness{c: c, dyn: dyn, reportTimeout: reportTimeout, log: log, nodes: c.Lab.Nodes(),
		savedLease: map[string]map[string]string{}}, nil
}

func short(node string) string {
	return strings.NewReplacer("worker", "w").Replace(node)
}

// setup creates the pods, the echo servers, the Service and the baseline
// gateway and policy, and records the baseline traffic and kernel state.
func (h *harness) setup(ctx context.Context) error {
	for ns, team := range map[string]string{appNS: "app", selNS: "sel", svcNS: "svc", tenantNS: "tenant"} {
		if err := h.c.EnsureNamespace(ctx, ns, map[string]string{"team": team}); err != nil {
			return err
		}
	}
	for _, ns := range []string{appNS, selNS} {
		for _, n := range h.nodes {
			p, err := h.c.AddPod(ctx, n.Name, ns, short(n.Name), map[string]string{"role": selPodLabel})
			if err != nil {
				return err
			}
			h.pods = append(h.pods, p)
		}
	}
	echoNode := h.nodes[len(h.nodes)/2].Name
	var err error
	if h.echoPod, err = h.c.AddPod(ctx, echoNode, svcNS, "echo", map[string]string{"app": "echo"}); err != nil {
		return err
	}
	echo := h.c.Lab.EchoServerPath()
	port := fmt.Sprint(echoPort)
	if _, err := h.c.Lab.Start(h.echoPod.NetNS, "", echo, "-name", "echo-pod", "-tcp", port, "-udp", port, "-ctl", "0", "-no-icmp"); err != nil {
		return err
	}
	waits := map[string]string{h.echoPod.NetNS: fmt.Sprintf("127.0.0.1:%d", echoPort)}
	for _, n := range h.nodes {
		np := fmt.Sprint(nodeEchoPort)
		if _, err := h.c.Lab.Start(n.NetNS, "", echo, "-name", "node-"+n.Name, "-tcp", np, "-udp", np, "-ctl", "0", "-no-icmp"); err != nil {
			return err
		}
		waits[n.NetNS] = fmt.Sprintf("127.0.0.1:%d", nodeEchoPort)
	}
	for ns, addr := range waits {
		if err := pollUntil(ctx, 10*time.Second, func() (bool, string) {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			_, err := lab.EchoTCP(cctx, ns, addr)
			return err == nil, fmt.Sprint(err)
		}); err != nil {
			return fmt.Errorf("echo server in %s: %w", ns, err)
		}
	}
	if err := h.c.AddService(ctx, svcNS, svcName, svcIP, svcPort, echoPort, h.echoPod); err != nil {
		return err
	}
	for _, n := range h.nodes {
		if err := h.c.WaitKubeProxy(ctx, n.Name, svcIP.String(), 30*time.Second); err != nil {
			return err
		}
	}

	base := group(baseGroup, baseIP) + "---\n" + policyYAML(policySpec{name: basePolicy, dests: []string{ext1Net}})
	if _, err := h.c.Kubectl(ctx, base, "create", "-f", "-"); err != nil {
		return fmt.Errorf("baseline gateway and policy: %w", err)
	}
	for _, ref := range []objRef{{Kind: "NetworkGatewayGroup", Namespace: gatewayNS, Name: baseGroup}, {Kind: "EgressNATPolicy", Name: basePolicy}} {
		if err := pollUntil(ctx, 30*time.Second, func() (bool, string) {
			st, err := h.condition(ctx, ref, "Ready")
			return err == nil && st == "True", fmt.Sprintf("%s Ready=%q %v", ref, st, err)
		}); err != nil {
			return fmt.Errorf("baseline not Ready: %w", err)
		}
	}
	if _, err := h.settle(ctx, 15*time.Second); err != nil {
		return err
	}

	h.buildProbes()
	if h.baseTraffic, err = h.traffic(ctx); err != nil {
		return err
	}
	if bad := h.sane(h.baseTraffic); len(bad) > 0 {
		return fmt.Errorf("the lab does not behave as expected before any input: %s", strings.Join(bad, "; "))
	}
	// A second look must agree with the first: a check that flaps on its
	// own would blame the inputs.
	again, err := h.traffic(ctx)
	if err != nil {
		return err
	}
	if d := compareTraffic(h.probes, h.baseTraffic, again, nil); len(d) > 0 {
		return fmt.Errorf("baseline traffic is not stable: %s", strings.Join(d, "; "))
	}
	if h.baseState, err = h.states(ctx); err != nil {
		return err
	}
	h.baseMain = map[string]string{}
	for _, n := range h.nodes {
		if h.baseMain[n.Name], err = h.exec(ctx, n.NetNS, "ip", "-4", "route", "show", "table", "main"); err != nil {
			return err
		}
	}
	return nil
}

func (h *harness) buildProbes() {
	h.probes = nil
	exts := h.c.Lab.Externals()
	for _, p := range h.pods {
		class := "app"
		if p.Namespace == selNS {
			class = "sel"
		}
		from := strings.TrimPrefix(p.Name, "bi-")
		add := func(kind, ext, to, addr string) {
			h.probes = append(h.probes, probe{name: from + " -> " + to, ns: p.NetNS, class: class, kind: kind, ext: ext, addr: addr})
		}
		add("pod", "", "pod echo", netip.AddrPortFrom(h.echoPod.IP, echoPort).String())
		for _, n := range h.nodes {
			add("node", "", "node "+n.Name, netip.AddrPortFrom(n.IP, nodeEchoPort).String())
		}
		add("svc", "", "service "+svcIP.String(), netip.AddrPortFrom(svcIP, svcPort).String())
		for _, e := range exts {
			add("ext", e.Name, e.Name, e.TCPAddr())
		}
	}
	for _, n := range h.nodes {
		add := func(kind, ext, to, addr string) {
			h.probes = append(h.probes, probe{name: "node " + n.Name + " -> " + to, ns: n.NetNS, class: "node", kind: kind, ext: ext, addr: addr})
		}
		for _, m := range h.nodes {
			if m != n {
				add("node", "", "node "+m.Name, netip.AddrPortFrom(m.IP, nodeEchoPort).String())
			}
		}
		add("pod", "", "pod echo", netip.AddrPortFrom(h.echoPod.IP, echoPort).String())
		add("svc", "", "service "+svcIP.String(), netip.AddrPortFrom(svcIP, svcPort).String())
		for _, e := range exts {
			add("ext", e.Name, e.Name, e.TCPAddr())
		}
	}
}

// sane checks the baseline against the lab's design: selected pods leave
// for ext1 with the baseline floating IP, everything else with node IPs,
// pod-to-pod keeps the pod IP, every probe answers.
func (h *harness) sane(res map[string]string) []string {
	var bad []string
	podIP := map[string]string{}
	nodeIP := map[string]string{}
	for _, p := range h.pods {
		podIP[p.NetNS] = p.IP.String()
		nodeIP[p.NetNS] = h.c.Lab.Node(p.Node).IP.String()
	}
	for _, n := range h.nodes {
		nodeIP[n.NetNS] = n.IP.String()
	}
	for _, p := range h.probes {
		got := res[p.name]
		var want string
		switch {
		case strings.HasPrefix(got, "fail"):
			bad = append(bad, p.name+": "+got)
			continue
		case p.kind == "ext" && p.class == "sel" && p.ext == "ext1":
			want = baseIP
		case p.kind == "ext":
			want = nodeIP[p.ns]
		case p.kind == "pod" && p.class != "node":
			want = podIP[p.ns]
		}
		if want != "" && got != want {
			bad = append(bad, fmt.Sprintf("%s: source %s, want %s", p.name, got, want))
		}
	}
	return bad
}

// traffic runs every probe (a few at a time) and returns the source each
// echo server saw, or "fail: ..." when none answered within three tries.
func (h *harness) traffic(ctx context.Context) (map[string]string, error) {
	out := make(map[string]string, len(h.probes))
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for _, p := range h.probes {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r := runProbe(ctx, p)
			mu.Lock()
			out[p.name] = r
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out, ctx.Err()
}

func runProbe(ctx context.Context, p probe) string {
	var last error
	for try := range 3 {
		if try > 0 {
			select {
			case <-ctx.Done():
				return "fail: " + ctx.Err().Error()
			case <-time.After(200 * time.Millisecond):
			}
		}
		cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		s, err := lab.EchoTCP(cctx, p.ns, p.addr)
		cancel()
		if err == nil {
			ap, perr := netip.ParseAddrPort(strings.TrimSpace(s))
			if perr != nil {
				return "fail: bad answer " + s
			}
			return ap.Addr().String()
		}
		last = err
	}
	return "fail: " + shortErr(last)
}

func shortErr(err error) string {
	s := err.Error()
	for _, k := range []string{"i/o timeout", "connection refused", "no route to host", "network is unreachable", "deadline exceeded", "connection reset"} {
		if strings.Contains(s, k) {
			return k
		}
	}
	return s
}

// compareTraffic lists the probes whose result differs from the baseline
// and is not allowed.
func compareTraffic(probes []probe, base, now map[string]string, allow map[string][]string) []string {
	var out []string
	for _, p := range probes {
		b, n := base[p.name], now[p.name]
		if b == n {
			continue
		}
		if k := p.allowKey(); k != "" {
			ok := slices.Contains(allow[k], n)
			if strings.HasPrefix(n, "fail") && slices.Contains(allow[k], "fail") {
				ok = true
			}
			if ok {
				continue
			}
		}
		if strings.HasPrefix(n, "fail") {
			out = append(out, fmt.Sprintf("%s fails (%s), answered as %s before", p.name, strings.TrimPrefix(n, "fail: "), b))
		} else {
			out = append(out, fmt.Sprintf("%s seen from %s, was %s", p.name, n, b))
		}
	}
	return out
}

func (h *harness) exec(ctx context.Context, ns string, argv ...string) (string, error) {
	out, err := h.c.Lab.Exec(ctx, ns, argv...)
	return string(out), err
}

// nodeState is a node's egressnat state: its nftables table (without
// counters, set elements sorted), ip rules, addresses and routes.
func (h *harness) nodeState(ctx context.Context, n *lab.Node) (string, error) {
	var b strings.Builder
	table, err := h.exec(ctx, n.NetNS, "nft", "list", "table", "ip", "egressnat")
	if err != nil {
		table = "(no table ip egressnat)"
	}
	b.WriteString("== nft\n" + normalizeNFT(table))
	for _, c := range [][]string{{"ip", "-4", "rule", "show"}, {"ip", "-4", "addr", "show"}, {"ip", "-4", "route", "show", "table", "all"}} {
		out, err := h.exec(ctx, n.NetNS, c...)
		if err != nil {
			return "", err
		}
		b.WriteString("== " + strings.Join(c[2:], " ") + "\n" + out)
	}
	return b.String(), nil
}

func (h *harness) states(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	for _, n := range h.nodes {
		s, err := h.nodeState(ctx, n)
		if err != nil {
			return nil, err
		}
		out[n.Name] = s
	}
	return out, nil
}

// normalizeNFT drops counters and sorts the elements of every set, whose
// listing order is the kernel's hash order.
func normalizeNFT(s string) string {
	var out []string
	lines := strings.Split(s, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if j := strings.Index(l, "counter packets"); j >= 0 {
			rest := l[j+len("counter packets"):]
			// "counter packets N bytes M" then maybe more statements.
			f := strings.Fields(rest)
			tail := ""
			if len(f) > 3 {
				tail = " " + strings.Join(f[3:], " ")
			}
			l = l[:j] + "counter" + tail
		}
		if k := strings.Index(l, "elements = {"); k >= 0 {
			head := l[:k+len("elements = {")]
			body := l[k+len("elements = {"):]
			for !strings.Contains(body, "}") && i+1 < len(lines) {
				i++
				body += " " + strings.TrimSpace(lines[i])
			}
			end := strings.Index(body, "}")
			var elems []string
			for _, e := range strings.Split(body[:end], ",") {
				if e = strings.TrimSpace(e); e != "" {
					elems = append(elems, e)
				}
			}
			sort.Strings(elems)
			l = head + " " + strings.Join(elems, ", ") + " " + body[end:]
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// settle waits until every node's state stays the same for about a second
// and returns it; after max it returns the last state and an error.
func (h *harness) settle(ctx context.Context, max time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(max)
	prev, err := h.states(ctx)
	if err != nil {
		return nil, err
	}
	same := 0
	for same < 3 {
		if time.Now().After(deadline) {
			return prev, fmt.Errorf("the nodes' state still changes after %s", max)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
		cur, err := h.states(ctx)
		if err != nil {
			return nil, err
		}
		if equalStates(cur, prev) {
			same++
		} else {
			same = 0
		}
		prev = cur
	}
	return prev, nil
}

func equalStates(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// stateDiff lists, per node, the lines only in want ("-") or only in got
// ("+"), at most limit lines per node.
func stateDiff(want, got map[string]string, limit int) []string {
	var out []string
	var names []string
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		w, g := lineSet(want[n]), lineSet(got[n])
		var d []string
		for _, l := range strings.Split(want[n], "\n") {
			if !g[l] {
				d = append(d, "-"+strings.TrimSpace(l))
			}
		}
		for _, l := range strings.Split(got[n], "\n") {
			if !w[l] {
				d = append(d, "+"+strings.TrimSpace(l))
			}
		}
		if len(d) == 0 {
			continue
		}
		more := ""
		if len(d) > limit {
			more = fmt.Sprintf(" (+%d more)", len(d)-limit)
			d = d[:limit]
		}
		out = append(out, n+": "+strings.Join(d, " | ")+more)
	}
	return out
}

func lineSet(s string) map[string]bool {
	m := map[string]bool{}
	for _, l := range strings.Split(s, "\n") {
		m[l] = true
	}
	return m
}

// waitBaseline polls until every node's state equals the baseline and
// returns the remaining difference after max.
func (h *harness) waitBaseline(ctx context.Context, max time.Duration) []string {
	var last map[string]string
	err := pollUntil(ctx, max, func() (bool, string) {
		cur, err := h.states(ctx)
		if err != nil {
			return false, err.Error()
		}
		last = cur
		return equalStates(cur, h.baseState), ""
	})
	if err == nil {
		return nil
	}
	if last == nil {
		return []string{err.Error()}
	}
	return stateDiff(h.baseState, last, 4)
}

// nodeHarm checks that every node keeps its own address as the uplink's
// primary address, holds no address of another node, the router, the
// subnet's network or broadcast address or outside the node subnet, keeps
// its main routing table and the kernel's standard ip rules, that its Node
// object keeps its InternalIP and the baseline group reports it Up.
func (h *harness) nodeHarm(ctx context.Context) []string {
	var out []string
	others := map[string]string{routerIP: "the router", "192.0.2.0": "the subnet's network address", "192.0.2.255": "the subnet's broadcast address"}
	for _, n := range h.nodes {
		others[n.IP.String()] = n.Name + "'s address"
	}
	for _, n := range h.nodes {
		addrs, err := h.exec(ctx, n.NetNS, "ip", "-4", "-o", "addr", "show", "dev", n.Uplink)
		if err != nil {
			out = append(out, fmt.Sprintf("%s: %v", n.Name, err))
			continue
		}
		var held []netip.Prefix
		for _, l := range strings.Split(addrs, "\n") {
			f := strings.Fields(l)
			for i := 0; i+1 < len(f); i++ {
				if f[i] == "inet" {
					if p, err := netip.ParsePrefix(f[i+1]); err == nil {
						held = append(held, p)
					}
				}
			}
		}
		own := netip.PrefixFrom(n.IP, lab.NodeSubnet.Bits())
		if len(held) == 0 || held[0] != own {
			out = append(out, fmt.Sprintf("%s: primary address is %v, want %s", n.Name, first(held), own))
		}
		for _, p := range held {
			if p.Addr() == n.IP {
				continue
			}
			if who, ok := others[p.Addr().String()]; ok {
				out = append(out, fmt.Sprintf("%s holds %s (%s)", n.Name, p, who))
			} else if !lab.NodeSubnet.Contains(p.Addr()) {
				out = append(out, fmt.Sprintf("%s holds %s (outside the node subnet)", n.Name, p))
			}
		}
		main, err := h.exec(ctx, n.NetNS, "ip", "-4", "route", "show", "table", "main")
		if err == nil && main != h.baseMain[n.Name] {
			out = append(out, fmt.Sprintf("%s: main routing table changed: %s", n.Name,
				strings.Join(stateDiff(map[string]string{"": h.baseMain[n.Name]}, map[string]string{"": main}, 3), " ")))
		}
		rules, err := h.exec(ctx, n.NetNS, "ip", "-4", "rule", "show")
		if err == nil {
			for _, want := range []string{"0:\tfrom all lookup local", "32766:\tfrom all lookup main", "32767:\tfrom all lookup default"} {
				if !strings.Contains(rules, want) {
					out = append(out, fmt.Sprintf("%s: ip rule %q missing", n.Name, want))
				}
			}
		}
		node, err := h.c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			out = append(out, fmt.Sprintf("Node %s: %v", n.Name, err))
		} else if ip := internalIP(node); ip != n.IP.String() {
			out = append(out, fmt.Sprintf("Node %s: InternalIP %q, want %s", n.Name, ip, n.IP))
		}
	}
	g, err := h.dyn.Resource(groupGVR).Namespace(gatewayNS).Get(ctx, baseGroup, metav1.GetOptions{})
	if err != nil {
		out = append(out, "baseline group: "+err.Error())
		return out
	}
	status, _, _ := unstructured.NestedStringMap(g.Object, "status", "nodes")
	for _, n := range h.nodes {
		switch s, ok := status[n.Name]; {
		case !ok:
			out = append(out, fmt.Sprintf("node %s dropped from the baseline group's status.nodes (was Up): no longer eligible for its floating IP", n.Name))
		case s != "Up":
			out = append(out, fmt.Sprintf("baseline group reports node %s %s, was Up", n.Name, s))
		}
	}
	return out
}

func first(p []netip.Prefix) any {
	if len(p) == 0 {
		return "none"
	}
	return p[0]
}

func internalIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}

// harm runs every harm check: the nodes, and the traffic against the
// baseline with the case's allowances.
func (h *harness) harm(ctx context.Context, allow map[string][]string) ([]string, error) {
	out := h.nodeHarm(ctx)
	now, err := h.traffic(ctx)
	if err != nil {
		return nil, err
	}
	return append(out, compareTraffic(h.probes, h.baseTraffic, now, allow)...), nil
}

// condition returns the status of an object's condition ("" when absent).
func (h *harness) condition(ctx context.Context, ref objRef, typ string) (string, error) {
	obj, err := h.getCR(ctx, ref)
	if err != nil {
		return "", err
	}
	for _, c := range conditions(obj) {
		if c.Type == typ {
			return string(c.Status), nil
		}
	}
	return "", nil
}

func (h *harness) getCR(ctx context.Context, ref objRef) (*unstructured.Unstructured, error) {
	switch ref.Kind {
	case "NetworkGatewayGroup":
		return h.dyn.Resource(groupGVR).Namespace(ref.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
	case "EgressNATPolicy":
		return h.dyn.Resource(policyGVR).Get(ctx, ref.Name, metav1.GetOptions{})
	}
	return nil, fmt.Errorf("no conditions on %s", ref.Kind)
}

func conditions(obj *unstructured.Unstructured) []metav1.Condition {
	raw, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	var out []metav1.Condition
	for _, r := range raw {
		m, ok := r.(map[string]any)
		if !ok {
			continue
		}
		var c metav1.Condition
		c.Type, _ = m["type"].(string)
		s, _ := m["status"].(string)
		c.Status = metav1.ConditionStatus(s)
		c.Reason, _ = m["reason"].(string)
		c.Message, _ = m["message"].(string)
		if g, ok := m["observedGeneration"].(int64); ok {
			c.ObservedGeneration = g
		}
		if t, ok := m["lastTransitionTime"].(string); ok {
			if tt, err := time.Parse(time.RFC3339, t); err == nil {
				c.LastTransitionTime = metav1.NewTime(tt)
			}
		}
		out = append(out, c)
	}
	return out
}

// warnWhenTrue are condition types that report a problem when True.
var warnWhenTrue = []string{"Overlap", "Conflict", "Degraded"}

// findReport looks once for what explains the input: a False condition
// (or a True problem condition such as Overlap) on a concerned object, or
// a Warning Event about one of them; for a Valid input also a True Ready
// or Accepted condition. Conditions of baseline objects count only when
// they changed since the input was made.
func (h *harness) findReport(ctx context.Context, refs []objRef, since time.Time, valid bool) string {
	cut := since.Truncate(time.Second)
	var accepted string
	for _, ref := range refs {
		if ref.Kind != "NetworkGatewayGroup" && ref.Kind != "EgressNATPolicy" {
			continue
		}
		obj, err := h.getCR(ctx, ref)
		if err != nil {
			continue
		}
		gen := obj.GetGeneration()
		for _, c := range conditions(obj) {
			if ref.Baseline && c.LastTransitionTime.Time.Before(cut) {
				continue
			}
			bad := c.Status == metav1.ConditionFalse || (c.Status == metav1.ConditionTrue && slices.Contains(warnWhenTrue, c.Type))
			if bad {
				return fmt.Sprintf("%s %s=%s %s: %s", ref, c.Type, c.Status, c.Reason, c.Message)
			}
			if valid && !ref.Baseline && c.Status == metav1.ConditionTrue && (c.Type == "Ready" || c.Type == "Accepted") &&
				(c.ObservedGeneration == 0 || c.ObservedGeneration >= gen) && accepted == "" {
				accepted = fmt.Sprintf("valid input accepted: %s %s=True %s", ref, c.Type, c.Reason)
			}
		}
	}
	evs, err := h.c.Client.CoreV1().Events("").List(ctx, metav1.ListOptions{})
	if err == nil {
		for _, ev := range evs.Items {
			if ev.Type != corev1.EventTypeWarning || eventTime(ev).Before(cut) {
				continue
			}
			for _, ref := range refs {
				about := ev.InvolvedObject.Kind == ref.Kind && ev.InvolvedObject.Name == ref.Name &&
					(ref.Namespace == "" || ev.InvolvedObject.Namespace == ref.Namespace)
				mentions := !ref.Baseline && strings.Contains(ev.Message, ref.Name)
				if about || mentions {
					return fmt.Sprintf("Event %s on %s/%s: %s", ev.Reason, ev.InvolvedObject.Kind, ev.InvolvedObject.Name, ev.Message)
				}
			}
		}
	}
	return accepted
}

func eventTime(ev corev1.Event) time.Time {
	for _, t := range []time.Time{ev.EventTime.Time, ev.LastTimestamp.Time, ev.FirstTimestamp.Time} {
		if !t.IsZero() {
			return t
		}
	}
	return ev.CreationTimestamp.Time
}

// waitReport polls findReport for up to the report timeout.
func (h *harness) waitReport(ctx context.Context, refs []objRef, since time.Time, valid bool) string {
	deadline := time.Now().Add(h.reportTimeout)
	var accepted string
	for {
		r := h.findReport(ctx, refs, since, valid)
		if r != "" && !strings.HasPrefix(r, "valid input accepted") {
			return r
		}
		if r != "" {
			// Keep looking for a problem report until the deadline, but
			// an accepted valid input needs no more than a short look.
			accepted = r
			if time.Until(deadline) < h.reportTimeout/2 {
				return accepted
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return accepted
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// pollUntil calls ok every 100 ms until it holds or max passes.
func pollUntil(ctx context.Context, max time.Duration, ok func() (bool, string)) error {
	deadline := time.Now().Add(max)
	for {
		good, why := ok()
		if good {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %s", max, why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// refsOf lists the objects of a YAML stream.
func refsOf(y string) []objRef {
	if y == "" {
		return nil
	}
	docs, err := cluster.SplitYAML([]byte(y))
	if err != nil {
		return nil
	}
	var out []objRef
	for _, d := range docs {
		kind, _ := d["kind"].(string)
		md, _ := d["metadata"].(map[string]any)
		name, _ := md["name"].(string)
		ns, _ := md["namespace"].(string)
		out = append(out, objRef{Kind: kind, Namespace: ns, Name: name})
	}
	return out
}

// rejected tells whether a kubectl error is the API server refusing the
// input (validation or admission), not a failure to reach it.
func rejected(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	for _, k := range []string{"Error from server (Invalid)", "Error from server (Forbidden)", "Error from server (BadRequest)",
		"Error from server (UnprocessableEntity)", "is invalid", "is forbidden", "denied the request", "error validating"} {
		if strings.Contains(s, k) {
			return true
		}
	}
	var se interface{ Status() metav1.Status }
	if errors.As(err, &se) {
		switch se.Status().Reason {
		case metav1.StatusReasonInvalid, metav1.StatusReasonForbidden, metav1.StatusReasonBadRequest:
			return true
		}
	}
	return false
}

// rejection picks the API server's reason out of a kubectl error.
func rejection(err error) string {
	s := err.Error()
	if i := strings.Index(s, "Error from server"); i >= 0 {
		s = s[i:]
	} else if i := strings.Index(s, ": "); i >= 0 && strings.HasPrefix(s, "kubectl") {
		s = s[i+2:]
	}
	if i := strings.Index(s, ": "); i >= 0 && strings.HasPrefix(s, "exit status ") {
		s = s[i+2:]
	}
	return oneLine(s, 220)
}

func oneLine(s string, max int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > max {
		s = s[:max] + "…"
	}
	return s
}
