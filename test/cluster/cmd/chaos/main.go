// Command chaos runs a randomized fault campaign on a lab cluster with the
// real egressnat binaries while observers outside the nodes watch what a
// user's network would see (`make chaos`, issue 12).
//
// The cluster: cp1 (control plane: etcd, kube-apiserver and both operator
// replicas run there) and worker1..worker3, two NetworkGatewayGroups
// (gw-a: 192.0.2.100-102, gw-b: 192.0.2.110-111) and two policies (alice's
// and bob's frontends to 203.0.113.0/24) selecting pods on every node, plus
// unselected pods.
//
// The campaign draws a fault from a seeded generator, applies it for a
// random duration, undoes it, sometimes overlaps a second one, and goes on
// until -duration has passed. Faults: a node's cable pulled (link-down);
// switch filter rules (nftables "bridge enat_chaos" in the switch
// namespace) dropping only the operators' health probes to a node
// (part-operator), only a node's traffic with the API server (part-api),
// everything between two workers (part-node), or frames one way between
// two switch ports (oneway); kube-apiserver stopped (api-stop); kill -9 of
// the leading operator (leader-kill) or of an agent (agent-kill); a pod's
// labels or a policy changed and an agent killed 0-50 ms later
// (mid-apply); a node rebooted: cable out, agent killed, its floating
// addresses, route tables, ip rules, nftables table, conntrack and
// neighbour cache wiped, then cable in and agent started (reboot); an
// agent stopped with SIGSTOP and continued (cpu-starve).
//
// Observers (package test/chaos), all the time: from the router, an ARP
// request for every floating IP every 50 ms, counting the MACs that answer
// (more than one: a dual holder); on ext1, UDP datagrams from every pod
// checked for their source (a selected pod's: its policy's egress IP; an
// unselected pod's: its node's address), and the longest time a selected
// pod's datagrams did not get out. After the last fault: within 5 s the
// status (every floating IP assigned to a live, Up node; policies Ready on
// the holder) and the kernels (each floating IP on exactly the node the
// status names and nowhere else, the ARP answers agreeing, nftables tables
// where needed, traffic flowing with the right sources) must agree.
//
// Output: one line per fault, one per violation as it happens, and last
//
//	chaos faults=<n> violations=<k> max_dual_holder_ms=<d> max_outage_ms=<o>
//
// The exit status is 1 when k > 0, 2 when fewer than -min-faults faults
// ran, 3 when the tool itself failed (e.g. could not undo a fault).
package main

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/test/chaos"
	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
)

const prefix = "enat-chaos-"

// The listener on ext1 for the observers' datagrams.
var listenAddr = netip.MustParseAddrPort("203.0.113.10:9000")

var scenarioYAML = cluster.GatewayYAML("gw-a", "192.0.2.100", "192.0.2.101", "192.0.2.102") + "---\n" +
	cluster.GatewayYAML("gw-b", "192.0.2.110", "192.0.2.111") + "---\n" +
	policyYAML("chaos-a", "alice", "gw-a") + "---\n" + policyYAML("chaos-b", "bob", "gw-b")

func policyYAML(name, user, gw string) string {
	return fmt.Sprintf(`apiVersion: networking.gke.io/v1
kind: EgressNATPolicy
metadata:
  name: %s
spec:
  sources:
  - namespaceSelector:
      matchLabels:
        user: %s
    podSelector:
      matchLabels:
        role: frontend
  action: SNAT
  destinations:
  - cidr: 203.0.113.0/24
  gatewayRef:
    name: %s
    namespace: kube-system
`, name, user, gw)
}

type podDef struct {
	Namespace, Name, Node string
	labels                map[string]string
	pod                   *cluster.Pod
}

func (d *podDef) key() string { return d.Namespace + "/" + d.Name }

// scenario is the seed of the campaign.
type scenario struct {
	cp               string
	nodes            []string // every node
	workers          []string
	nodeIP           map[string]netip.Addr
	pods             []*podDef
	flip             *podDef // the pod whose labels mid-apply faults flip
	egressA, egressB netip.Addr
	policyB          string
	extraDst         string
	fips             []netip.Addr
	groups           map[string][]netip.Addr // group -> floating IPs in spec order
	policies         map[string]string       // policy -> group
}

func newScenario(c *cluster.Cluster) *scenario {
	sc := &scenario{nodeIP: map[string]netip.Addr{},
		egressA: netip.MustParseAddr("192.0.2.100"), egressB: netip.MustParseAddr("192.0.2.110"),
		policyB: "chaos-b", extraDst: "198.51.100.0/24",
		groups: map[string][]netip.Addr{
			"gw-a": {netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101"), netip.MustParseAddr("192.0.2.102")},
			"gw-b": {netip.MustParseAddr("192.0.2.110"), netip.MustParseAddr("192.0.2.111")},
		},
		policies: map[string]string{"chaos-a": "gw-a", "chaos-b": "gw-b"},
	}
	for _, g := range []string{"gw-a", "gw-b"} {
		sc.fips = append(sc.fips, sc.groups[g]...)
	}
	for _, n := range c.Lab.Nodes() {
		sc.nodes = append(sc.nodes, n.Name)
		sc.nodeIP[n.Name] = n.IP
		if n.ControlPlane {
			sc.cp = n.Name
		} else {
			sc.workers = append(sc.workers, n.Name)
		}
	}
	fe := map[string]string{"role": "frontend"}
	db := map[string]string{"role": "db"}
	sc.pods = []*podDef{
		{Namespace: "alice", Name: "web-cp1", Node: "cp1", labels: fe},
		{Namespace: "alice", Name: "web-w1", Node: "worker1", labels: fe},
		{Namespace: "alice", Name: "web-w3", Node: "worker3", labels: fe},
		{Namespace: "bob", Name: "api-w2", Node: "worker2", labels: fe},
		{Namespace: "bob", Name: "api-w3", Node: "worker3", labels: fe},
		{Namespace: "alice", Name: "db-w1", Node: "worker1", labels: db},
		{Namespace: "carol", Name: "app-w2", Node: "worker2", labels: fe},
		{Namespace: "carol", Name: "app-cp1", Node: "cp1", labels: fe},
		{Namespace: "alice", Name: "flip-w2", Node: "worker2", labels: fe},
	}
	sc.flip = sc.pods[len(sc.pods)-1]
	return sc
}

// expect is what the outside must see from a pod in namespace ns with
// labels on node.
func (sc *scenario) expect(ns string, labels map[string]string, node string) chaos.Expect {
	if labels["role"] == "frontend" {
		switch ns {
		case "alice":
			return chaos.Expect{Selected: true, Policy: "chaos-a", Source: sc.egressA}
		case "bob":
			return chaos.Expect{Selected: true, Policy: "chaos-b", Source: sc.egressB}
		}
	}
	return chaos.Expect{Source: sc.nodeIP[node]}
}

func (sc *scenario) podsOn(node string) []string {
	var out []string
	for _, p := range sc.pods {
		if p.Node == node {
			out = append(out, p.key())
		}
	}
	return out
}

type options struct {
	duration         time.Duration
	seed             uint64
	minFaults        int
	keep, verbose    bool
	overlap          float64
	minDur, maxDur   time.Duration
	only             string
	arpPeriod        time.Duration
	convergeDeadline time.Duration
	logs             string
	bootGuard        bool
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", 10*time.Minute, "how long faults are drawn (the last one ends after it)")
	flag.Uint64Var(&o.seed, "seed", 0, "seed of the fault generator (0: from the clock; printed either way)")
	flag.IntVar(&o.minFaults, "min-faults", 0, "report failure (exit 2) when fewer faults ran")
	flag.BoolVar(&o.keep, "keep", false, "keep the lab after the report, until Ctrl-C, for debugging")
	flag.BoolVar(&o.verbose, "v", false, "more detail: undo times, agent readiness")
	flag.Float64Var(&o.overlap, "overlap", 0.6, "probability that a second fault overlaps a fault")
	flag.DurationVar(&o.minDur, "min-fault", 500*time.Millisecond, "shortest fault")
	flag.DurationVar(&o.maxDur, "max-fault", 4*time.Second, "longest fault")
	flag.StringVar(&o.only, "only", "", "comma-separated fault kinds to draw from (default all: "+strings.Join(faultKinds, ",")+")")
	flag.DurationVar(&o.arpPeriod, "arp-period", 50*time.Millisecond, "ARP observer sampling period")
	flag.DurationVar(&o.convergeDeadline, "converge", 5*time.Second, "how long after the last fault everything must agree")
	flag.StringVar(&o.logs, "logs", "", "copy the logs of every process (agents, operators, API server, echo servers) into this directory at the end")
	flag.BoolVar(&o.bootGuard, "boot-guard", true, "rebooted nodes run the boot unit (egressnat-agent --boot-guard) before their link comes back, as nodes with manifests/host/egressnat-boot-guard.service do; false: the agent's own guard only, after the link is up")
	cleanup := flag.Bool("cleanup", false, "only remove what a crashed or -keep run left behind, and exit")
	flag.Parse()
	if *cleanup {
		if err := lab.CleanupStale(prefix); err != nil {
			fmt.Fprintln(os.Stderr, "chaos:", err)
			os.Exit(1)
		}
		return
	}
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	kinds := faultKinds
	if o.only != "" {
		kinds = nil
		for _, k := range strings.Split(o.only, ",") {
			if k = strings.TrimSpace(k); !slices.Contains(faultKinds, k) {
				fmt.Fprintf(os.Stderr, "chaos: unknown fault kind %q (known: %s)\n", k, strings.Join(faultKinds, ","))
				os.Exit(2)
			}
			kinds = append(kinds, k)
		}
	}
	if o.minDur <= 0 || o.maxDur < o.minDur || o.arpPeriod <= 0 || o.arpPeriod > 100*time.Millisecond {
		fmt.Fprintln(os.Stderr, "chaos: want 0 < -min-fault <= -max-fault and 0 < -arp-period <= 100ms")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, o, kinds)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, o options, kinds []string) (code int) {
	fmt.Printf("# chaos seed=%d duration=%v boot-guard=%v faults from: %s\n", o.seed, o.duration, o.bootGuard, strings.Join(kinds, ","))
	c, err := cluster.Start(ctx, cluster.Options{
		Prefix: prefix,
		Nodes:  []lab.NodeConfig{{Name: "cp1", ControlPlane: true}, {Name: "worker1"}, {Name: "worker2"}, {Name: "worker3"}},
		Log:    func(f string, a ...any) { fmt.Printf("# "+f+"\n", a...) },
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos: start cluster:", err)
		return 3
	}
	var w *world
	defer func() {
		if w != nil {
			rctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			if err := w.restoreAll(rctx); err != nil {
				fmt.Fprintln(os.Stderr, "chaos: restore:", err)
			}
			cancel()
		}
		if code != 0 && code != 1 {
			fmt.Fprintln(os.Stderr, c.Logs())
		}
		if o.logs != "" {
			if err := copyLogs(c.Lab.WorkDir(), o.logs); err != nil {
				fmt.Fprintln(os.Stderr, "chaos: copy logs:", err)
			} else {
				fmt.Fprintf(os.Stderr, "# logs in %s\n", o.logs)
			}
		}
		if o.keep {
			fmt.Fprintf(os.Stderr, "# -keep: the lab runs on (namespaces %s*, work dir %s); Ctrl-C tears it down\n", prefix, c.Lab.WorkDir())
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
			<-sig
		}
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "chaos: close cluster:", err)
		}
		if left := lab.Namespaces(prefix); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "chaos: namespaces left behind: %v (go run ./test/cluster/cmd/chaos -cleanup)\n", left)
			if code == 0 {
				code = 3
			}
		}
	}()

	sc := newScenario(c)
	if w, err = newWorld(c, o.verbose, o.bootGuard); err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		return 3
	}
	if err := setup(ctx, c, sc); err != nil {
		fmt.Fprintln(os.Stderr, "chaos: scenario:", err)
		return 3
	}
	sctx, cancelStatus := context.WithCancel(context.Background())
	defer cancelStatus()
	go w.status.run(sctx)

	// Observers.
	names := map[string]string{}
	describe := map[netip.Addr]string{}
	for _, n := range c.Lab.Nodes() {
		mac, err := c.Lab.LinkMAC(n.NetNS, n.Uplink)
		if err != nil {
			fmt.Fprintln(os.Stderr, "chaos:", err)
			return 3
		}
		names[mac.String()] = n.Name
		describe[n.IP] = "node " + n.Name
	}
	for g, ips := range sc.groups {
		for i, ip := range ips {
			describe[ip] = fmt.Sprintf("floating IP %d of %s", i, g)
		}
	}
	for _, p := range sc.pods {
		describe[p.pod.IP] = "pod IP of " + p.key() + ", not NATed"
	}
	w.arp, err = chaos.StartARP(chaos.ARPConfig{NetNS: c.Lab.RouterNS(), Dev: "eth0", SenderIP: observerIP, IPs: sc.fips, Period: o.arpPeriod,
		Names: names, Logf: w.printf, Context: w.context})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		return 3
	}
	w.src, err = chaos.StartSource(chaos.SourceConfig{ListenNS: c.Lab.External("ext1").NetNS, Listen: listenAddr,
		Logf: w.printf, Context: w.context, Excused: w.excused,
		Describe: func(a netip.Addr) string { return describe[a] }})
	if err != nil {
		w.arp.Stop()
		fmt.Fprintln(os.Stderr, "chaos:", err)
		return 3
	}
	observersStopped := false
	stopObservers := func() (chaos.ARPStats, chaos.SourceStats) {
		observersStopped = true
		return w.arp.Stop(), w.src.Stop()
	}
	defer func() {
		if !observersStopped {
			stopObservers()
		}
	}()
	for _, p := range sc.pods {
		e := sc.expect(p.Namespace, p.labels, p.Node)
		if err := w.src.Add(chaos.Pod{Name: p.key(), NetNS: p.pod.NetNS, Node: p.Node, IP: p.pod.IP, Expect: e}); err != nil {
			fmt.Fprintln(os.Stderr, "chaos:", err)
			return 3
		}
	}
	// Warm-up: everything agrees before the first fault.
	fmt.Println("# warm-up: waiting for every pod's datagrams and one ARP answer per floating IP")
	if p := w.waitConverged(ctx, sc, 30*time.Second); len(p) > 0 {
		for _, s := range p {
			fmt.Println("# warm-up: " + s)
		}
		fmt.Fprintln(os.Stderr, "chaos: the cluster did not settle before the first fault")
		return 3
	}
	w.arp.Reset()
	w.src.Reset()

	// The campaign.
	pl := &planner{w: w, sc: sc, rng: rand.New(rand.NewPCG(o.seed, o.seed^0x9e3779b97f4a7c15)), kinds: kinds, minDur: o.minDur, maxDur: o.maxDur}
	w.start = time.Now()
	fmt.Printf("# campaign: seed=%d for %v; ARP every %v, datagrams every 20 ms per flow, 2 flows per pod, %d pods\n",
		o.seed, o.duration, o.arpPeriod, len(sc.pods))
	applied := 0
	var wg sync.WaitGroup
	for time.Since(w.start) < o.duration && ctx.Err() == nil && !w.broken() {
		f1 := pl.next()
		if f1 == nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		var f2 *fault
		if pl.rng.Float64() < o.overlap {
			if f2 = pl.next(); f2 != nil {
				f2.delay = time.Duration(pl.rng.Int64N(int64(f1.dur)*8/10 + 1))
			}
		}
		wg.Add(1)
		go func() { defer wg.Done(); w.runFault(ctx, f1, 0, &applied) }()
		if f2 != nil {
			wg.Add(1)
			go func() { defer wg.Done(); w.runFault(ctx, f2, f1.id, &applied) }()
		}
		wg.Wait()
		gap := 100*time.Millisecond + time.Duration(pl.rng.Int64N(int64(600*time.Millisecond)))
		select {
		case <-ctx.Done():
		case <-time.After(gap):
		}
	}
	wg.Wait()
	if ctx.Err() != nil {
		fmt.Println("# interrupted")
	}

	// Convergence: within the deadline after the last fault, everything
	// agrees; then 2 s more of observation.
	w.printf("# faults over; checking convergence (deadline %v)", o.convergeDeadline)
	t0 := time.Now()
	problems := w.waitConverged(context.Background(), sc, o.convergeDeadline)
	if len(problems) == 0 {
		w.printf("# converged %d ms after the last fault", time.Since(t0).Milliseconds())
	}
	for _, p := range problems {
		w.violation("not converged %v after the last fault: %s", o.convergeDeadline, p)
	}
	if len(problems) > 0 {
		// Say how it ends, for the report (no extra violation).
		if late := w.waitConverged(context.Background(), sc, 20*time.Second); len(late) == 0 {
			w.printf("# converged after all, %d ms after the last fault", time.Since(t0).Milliseconds())
		} else {
			w.printf("# still not converged %v after the last fault", time.Since(t0).Round(time.Millisecond))
		}
	}
	time.Sleep(2 * time.Second)
	as, ss := stopObservers()

	w.mu.Lock()
	own, toolErrs := w.ownViolations, len(w.toolErr)
	w.mu.Unlock()
	fmt.Printf("# arp: %d rounds (every %v) x %d floating IPs; dual-holder spans %d, longest %d ms (%s); longest without any holder %d ms (%s)\n",
		as.Rounds, o.arpPeriod, len(sc.fips), as.Violations, as.MaxDual.Milliseconds(), addrOr(as.MaxDualIP), as.MaxUnheld.Milliseconds(), addrOr(as.MaxUnheldIP))
	fmt.Printf("# sources: %d datagrams sent, %d received, %d with a wrong source in %d episodes; longest outage of a selected pod %d ms (%s), of an unselected pod %d ms (%s)\n",
		ss.Sent, ss.Received, ss.Wrong, ss.Violations, ss.MaxSelected.Duration.Milliseconds(), orNone(ss.MaxSelected.Pod),
		ss.MaxUnselected.Duration.Milliseconds(), orNone(ss.MaxUnselected.Pod))
	fmt.Printf("# campaign: %d violations found by the campaign itself (readiness, convergence); %d tool errors\n", own, toolErrs)
	violations := as.Violations + ss.Violations + own
	switch {
	case violations > 0:
		code = 1
	case toolErrs > 0 || ctx.Err() != nil:
		code = 3
	case applied < o.minFaults:
		fmt.Printf("# only %d faults ran (-min-faults %d)\n", applied, o.minFaults)
		code = 2
	}
	fmt.Printf("chaos faults=%d violations=%d max_dual_holder_ms=%d max_outage_ms=%d\n",
		applied, violations, as.MaxDual.Milliseconds(), ss.MaxSelected.Duration.Milliseconds())
	return code
}

func addrOr(a netip.Addr) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (w *world) broken() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.toolErr) > 0
}

// setup applies the scenario and waits until every pod leaves with the
// source it should (checked with TCP connections to the echo server).
func setup(ctx context.Context, c *cluster.Cluster, sc *scenario) error {
	if _, err := c.Kubectl(ctx, scenarioYAML, "apply", "-f", "-"); err != nil {
		return err
	}
	for ns, labels := range map[string]map[string]string{"alice": {"user": "alice"}, "bob": {"user": "bob"}, "carol": nil} {
		if err := c.EnsureNamespace(ctx, ns, labels); err != nil {
			return err
		}
	}
	ext := c.Lab.External("ext1")
	for _, p := range sc.pods {
		pod, err := c.AddPod(ctx, p.Node, p.Namespace, p.Name, p.labels)
		if err != nil {
			return err
		}
		p.pod = pod
	}
	for _, p := range sc.pods {
		want := sc.expect(p.Namespace, p.labels, p.Node).Source
		if _, err := c.WaitSource(ctx, p.pod, ext, want, 60*time.Second); err != nil {
			return err
		}
	}
	fmt.Printf("# scenario: gw-a %v, gw-b %v; chaos-a: alice frontends -> %s, chaos-b: bob frontends -> %s; %d pods on %s\n",
		sc.groups["gw-a"], sc.groups["gw-b"], sc.egressA, sc.egressB, len(sc.pods), strings.Join(sc.nodes, ","))
	return nil
}

// waitConverged polls converged until it finds nothing or d has passed,
// and returns the last problems.
func (w *world) waitConverged(ctx context.Context, sc *scenario, d time.Duration) []string {
	deadline := time.Now().Add(d)
	for {
		p := w.converged(ctx, sc)
		if len(p) == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return p
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// converged lists every disagreement between the status, the kernels, the
// ARP answers, the traffic and the processes; empty when all agree.
func (w *world) converged(ctx context.Context, sc *scenario) []string {
	c := w.c
	var p []string
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	// Processes.
	w.cmu.Lock()
	for _, n := range sc.nodes {
		if a := c.Agents[n]; a == nil || !a.Running() || stopped(a.Pid()) {
			add("agent on %s not running", n)
		}
	}
	for i, op := range c.Operators {
		if op == nil || !op.Running() {
			add("operator-%d not running", i)
		}
	}
	w.cmu.Unlock()
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	leader, err := c.Leader(lctx)
	cancel()
	if err != nil || leader == "" {
		add("no operator leader: %q %v", leader, err)
	}
	// Status.
	groups, policies, err := readStatus(ctx, w.dyn)
	if err != nil {
		add("read status: %v", err)
		return p
	}
	holderOf := map[netip.Addr]string{}
	for _, g := range sortedKeys(sc.groups) {
		gg := groups[g]
		if gg == nil {
			add("group %s missing", g)
			continue
		}
		for _, n := range sc.nodes {
			if h := gg.Status.Nodes[n]; h != v1.NodeUp {
				add("group %s: status.nodes[%s] = %q, want Up (the node is live)", g, n, h)
			}
		}
		for _, ip := range sc.groups[g] {
			n := gg.Status.FloatingIPs[ip.String()]
			switch {
			case n == "":
				add("group %s: %s not assigned", g, ip)
			case c.Lab.Node(n) == nil:
				add("group %s: %s assigned to unknown node %q", g, ip, n)
			default:
				holderOf[ip] = n
			}
		}
	}
	for _, name := range sortedKeys(sc.policies) {
		pol := policies[name]
		if pol == nil {
			add("policy %s missing", name)
			continue
		}
		egress := sc.groups[sc.policies[name]][0]
		if pol.Status.EgressIP != egress.String() {
			add("policy %s: status.egressIP %q, want %s", name, pol.Status.EgressIP, egress)
		}
		if pol.Status.GatewayNode != holderOf[egress] {
			add("policy %s: status.gatewayNode %q, but %s is assigned to %q", name, pol.Status.GatewayNode, egress, holderOf[egress])
		}
		if cond := apimeta.FindStatusCondition(pol.Status.Conditions, v1.ConditionReady); cond == nil || cond.Status != "True" {
			add("policy %s: not Ready: %+v", name, cond)
		}
	}
	// Kernels.
	held, err := c.Holders(ctx)
	if err != nil {
		add("read node addresses: %v", err)
	}
	for ip, nodes := range held {
		want := holderOf[ip]
		if !slices.Contains(sc.fips, ip) {
			add("%s (no floating IP of the scenario) on %v", ip, nodes)
			continue
		}
		if len(nodes) != 1 || nodes[0] != want {
			add("%s on %v in the kernels, status says %q", ip, nodes, want)
		}
	}
	for _, ip := range sc.fips {
		if want := holderOf[ip]; want != "" && len(held[ip]) == 0 {
			add("%s on no node's uplink, status says %s", ip, want)
		}
	}
	needTable := map[string]bool{}
	for _, n := range holderOf {
		needTable[n] = true
	}
	for _, pod := range w.src.Pods() {
		if pod.Selected {
			needTable[pod.Node] = true
		}
	}
	for _, n := range sortedKeys(needTable) {
		if ok, err := c.NodeHasTable(ctx, n); err != nil || !ok {
			add("node %s: no nftables table ip egressnat (it holds floating IPs or has selected pods) %v", n, err)
		}
	}
	// What the network sees.
	arp, at := w.arp.Holders()
	if time.Since(at) > 500*time.Millisecond {
		add("ARP observer: last round %v ago", time.Since(at))
	}
	macOf := map[string]string{}
	for _, n := range c.Lab.Nodes() {
		if mac, err := c.Lab.LinkMAC(n.NetNS, n.Uplink); err == nil {
			macOf[n.Name] = mac.String()
		}
	}
	for _, ip := range sc.fips {
		want := holderOf[ip]
		if got := arp[ip]; len(got) != 1 || got[0] != macOf[want] {
			add("ARP for %s answered by %v, want only %s (%s)", ip, got, want, macOf[want])
		}
	}
	p = append(p, w.src.Problems(500*time.Millisecond)...)
	sort.Strings(p)
	return p
}

// stopped reports whether process pid is stopped (state T).
func stopped(pid int) bool {
	if pid == 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'T'
	}
	return false
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// copyLogs copies every *.log file under dir into to, keeping the layout.
func copyLogs(dir, to string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".log") {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
}
