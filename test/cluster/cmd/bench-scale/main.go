// Command bench-scale measures egressnat at scale on the lab cluster with
// the real binaries (`make bench-scale`): synthetic Pods, Namespaces,
// EgressNATPolicies and NetworkGatewayGroups through the real API server,
// the agents' nftables state read from each node's kernel, real pods for
// the packet path. It measures
//
//   - creation of the objects and the agents' convergence;
//   - programming latency: status.podIP update to the address in the
//     node's table (kernel notifications), for synthetic pods; and to the
//     first packet leaving with the floating IP, for real pods;
//   - full resync: an agent started on an emptied kernel until its table is
//     back, per node; peak memory (VmHWM) of the agents and the operator;
//   - the operator's assignment of 1,000 floating IPs over 5,000 nodes
//     (the Go benchmark gateway.BenchmarkAssign);
//   - per-packet cost on one source node: full ruleset, no table, and a
//     linear per-(pod, destination) iptables chain; gateway vs direct path.
//
// It ends with
//
//	scale classifier=<nft|ebpf> programming_p99_ms=<n> resync_ms=<n> agent_rss_mb=<n> packet_ratio=<r> bulk_ratio=<r> load100k_ms=<n> linear_ratio=<r> leaked=<n>
//
// leaked counts the real pods' datagrams that reached the outside with a
// source their policy does not give them (the goal is 0): they start
// sending before their address is in the API.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

type config struct {
	pods, policies, gateways, dests int
	latencyPods                     int
	latencyRate                     float64
	realPods, realBatch             int
	sendInterval                    time.Duration
	ppNode                          string
	ppDuration                      time.Duration
	ppRounds                        int
	linearMin                       int
	workers                         int
	assignBench, loadBench          bool
	classifier                      string
	keepLogs                        string
	operatorArgs, agentArgs         string
}

func logf(format string, a ...any) { fmt.Printf("# "+format+"\n", a...) }

func main() {
	var cfg config
	flag.IntVar(&cfg.pods, "pods", 20000, "synthetic pods (Pod objects without network namespace)")
	flag.IntVar(&cfg.policies, "policies", 1000, "EgressNATPolicies, one namespace each")
	flag.IntVar(&cfg.gateways, "gateways", 20, "NetworkGatewayGroups (one floating IP each, 192.0.2.100 on)")
	flag.IntVar(&cfg.dests, "dests", 5, "destination /32s per policy")
	flag.IntVar(&cfg.latencyPods, "latency-pods", 1000, "synthetic pods whose programming latency is measured")
	flag.Float64Var(&cfg.latencyRate, "latency-rate", 20, "status.podIP updates per second during the latency measure")
	flag.IntVar(&cfg.realPods, "real-pods", 100, "real pods (network namespaces) timed to their first packet with the floating IP")
	flag.IntVar(&cfg.realBatch, "real-batch", 10, "real pods measured at once")
	flag.DurationVar(&cfg.sendInterval, "send-interval", 2*time.Millisecond, "datagram interval of each real pod")
	flag.StringVar(&cfg.ppNode, "pp-node", "cp1", "source node of the per-packet measure (best a node that is gateway for nothing)")
	flag.DurationVar(&cfg.ppDuration, "pp-duration", 3*time.Second, "duration of each request/response and each bulk run")
	flag.IntVar(&cfg.ppRounds, "pp-rounds", 5, "interleaved rounds of every per-packet configuration (the median is kept)")
	flag.IntVar(&pinCPU, "pp-cpu", runtime.NumCPU()-1, "CPU both ends of the per-packet runs are pinned to; -1 for none")
	flag.IntVar(&cfg.linearMin, "linear-min", 20000, "minimum rules of the linear iptables chain")
	flag.IntVar(&cfg.workers, "workers", 16, "concurrent API writers")
	flag.StringVar(&cfg.keepLogs, "keep-logs", "", "copy the agents' and operators' logs into this directory at the end")
	flag.BoolVar(&cfg.assignBench, "assign-bench", true, "run gateway.BenchmarkAssign (go test) before the lab")
	flag.StringVar(&cfg.operatorArgs, "operator-args", "--probe-misses=30",
		"extra operator flags; the default keeps a node Up while the bench restarts its agent (3 s instead of 300 ms)")
	flag.StringVar(&cfg.agentArgs, "agent-args", "--log-level=debug", "extra agent flags")
	flag.StringVar(&cfg.classifier, "classifier", "both", "the agents' pod classifier: nft, ebpf, or both (one whole run each, in that order, one summary line each)")
	flag.BoolVar(&cfg.loadBench, "load-bench", true, "run nft.BenchmarkLoadPods (go test; 100,000 pod entries from an empty kernel, per classifier) before the lab")
	flag.Parse()
	if cfg.policies < 1 || cfg.gateways < 1 || cfg.gateways > 100 || cfg.dests < 1 || cfg.dests > 64 ||
		cfg.pods+cfg.latencyPods > 32000 || cfg.realPods > 250 || cfg.realBatch < 1 || cfg.latencyRate <= 0 || cfg.ppRounds < 1 {
		fmt.Fprintln(os.Stderr, "bench-scale: flags out of range")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	backends := []string{cfg.classifier}
	switch cfg.classifier {
	case "both":
		backends = []string{"nft", "ebpf"}
	case "nft", "ebpf":
	default:
		fmt.Fprintln(os.Stderr, "bench-scale: -classifier: want nft, ebpf or both")
		os.Exit(2)
	}
	var load map[string]float64
	if cfg.loadBench {
		logf("loading 100,000 pod entries from an empty kernel: go test -run '^$' -bench '^BenchmarkLoadPods$' -benchtime 3x ./nft/ (before the lab)")
		var err error
		if load, err = runLoadBench(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "bench-scale:", err)
			os.Exit(1)
		}
		for _, b := range backends {
			logf("  %s: %.0f ms", b, load[b])
		}
	}
	var lines []string
	for i, b := range backends {
		cfg.assignBench = cfg.assignBench && i == 0
		line, err := run(ctx, cfg, b, load[b])
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-scale:", err)
			os.Exit(1)
		}
		lines = append(lines, line)
	}
	fmt.Println("#")
	for _, l := range lines {
		fmt.Println(l)
	}
}

// run is one whole run with the agents' classifier backend; it returns
// the summary line.
func run(ctx context.Context, cfg config, backend string, loadMS float64) (line string, err error) {
	logf("=== classifier %s", backend)
	cfg.classifier = backend
	began := time.Now()
	var assign []assignResult
	if cfg.assignBench {
		logf("operator assignment: go test -run '^$' -bench '^BenchmarkAssign$' -benchtime 20x ./gateway/ (before the lab, on an idle machine)")
		if assign, err = runAssignBench(ctx); err != nil {
			return "", err
		}
		for _, a := range assign {
			logf("  %s: %.2f ms per full computation, %.2f MB allocated", a.name, a.msPerOp, a.mbPerOp)
		}
	}

	c, err := cluster.Start(ctx, cluster.Options{
		Prefix:       "enat-bs-",
		AgentArgs:    strings.Fields(cfg.agentArgs),
		OperatorArgs: strings.Fields(cfg.operatorArgs),
		Classifier:   backend,
		Log:          logf,
	})
	if err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			fmt.Fprintln(os.Stderr, tailLogs(c, 3000))
		}
		if cfg.keepLogs != "" {
			keepLogs(c, cfg.keepLogs)
		}
		if cerr := c.Close(); cerr != nil {
			fmt.Fprintln(os.Stderr, "bench-scale: close:", cerr)
		}
	}()
	s, err := newScale(cfg, c)
	if err != nil {
		return "", err
	}
	watches := map[string]*watch{}
	for _, n := range c.Lab.Nodes() {
		w, err := newWatch(n.Name, n.NetNS)
		if err != nil {
			return "", err
		}
		defer w.Close()
		watches[n.Name] = w
	}

	// 1. Scale objects.
	logf("creating %d gateways, %d namespaces, %d policies (%d destinations each), %d pods with %d API writers",
		cfg.gateways, cfg.policies, cfg.policies, cfg.dests, cfg.pods, cfg.workers)
	t0 := time.Now()
	if err := s.createGateways(ctx); err != nil {
		return "", err
	}
	if err := s.waitHolders(ctx, time.Minute); err != nil {
		return "", err
	}
	perNode := map[string]int{}
	for i := range cfg.policies {
		perNode[s.holders[gatewayName(i%cfg.gateways)]]++
	}
	logf("floating IPs assigned after %.1fs; policies per gateway node: %v", time.Since(t0).Seconds(), perNode)
	tNS := time.Now()
	if err := s.createNamespaces(ctx); err != nil {
		return "", err
	}
	dNS := time.Since(tNS)
	tPol := time.Now()
	if err := s.createPolicies(ctx); err != nil {
		return "", err
	}
	if err := s.createLive(ctx); err != nil {
		return "", err
	}
	dPol := time.Since(tPol)
	tPods := time.Now()
	s.pods = s.planPods(cfg.pods, "p")
	if err := s.createPods(ctx, s.pods); err != nil {
		return "", err
	}
	dPods := time.Since(tPods)
	created := time.Now()
	logf("created in %.1fs: namespaces+service accounts %.1fs, policies %.1fs, pods %.1fs (create + status, %.0f pods/s)",
		created.Sub(t0).Seconds(), dNS.Seconds(), dPol.Seconds(), dPods.Seconds(), float64(cfg.pods)/dPods.Seconds())
	logf("destinations: %d entries in all (%d per policy, distinct within a policy) drawn from the %d /32s of 203.0.113.0/24 and 198.51.100.0/24, so shared across policies",
		cfg.policies*cfg.dests, cfg.dests, 512)

	expected := s.expectedSources(nil)
	conv, err := waitConverged(ctx, s, watches, expected, created, 15*time.Minute)
	if err != nil {
		return "", err
	}
	logf("agents converged %.1fs after the last pod was created (last change of any node's table; %.1fs after the first object)",
		conv.Sub(created).Seconds(), conv.Sub(t0).Seconds())
	for _, n := range s.nodes {
		d, err := dumpTable(c.Lab.Node(n).NetNS)
		if err != nil {
			return "", err
		}
		m, _ := s.agentMemory(n)
		logf("  %-8s %s (dump took %v); agent VmHWM %.0f MiB", n, d, d.took.Round(time.Millisecond), m.hwm)
	}

	checkProcs(c)

	// 2. Programming latency.
	logf("programming latency, synthetic pods: %d Pods created without IP, then status.podIP set at %.0f/s; time from the API's answer to the first kernel notification of an element holding the IP",
		cfg.latencyPods, cfg.latencyRate)
	agentBefore, err := s.agentProgramming(ctx)
	if err != nil {
		return "", err
	}
	own, all, fromSend, err := s.latencySynthetic(ctx, watches)
	if err != nil {
		return "", err
	}
	agentAfter, err := s.agentProgramming(ctx)
	if err != nil {
		return "", err
	}
	slices.Sort(own)
	logf("  in the pod's node's table:             %s", dist(own))
	logf("  same, from sending the update:         %s", dist(fromSend))
	logf("  in the pod's node and gateway's table: %s", dist(all))
	inAgent := agentAfter.minus(agentBefore)
	logf("  inside the agents, from the watch event to the kernel (egressnat_agent_pod_programming_seconds, all agents, %.0f events): %.1f%% within 10 ms, %.1f%% within 50 ms, %.1f%% within 100 ms; p50 <= %g s, p99 <= %g s (bucket bounds)",
		inAgent.count[len(inAgent.count)-1], 100*inAgent.within(0.01), 100*inAgent.within(0.05), 100*inAgent.within(0.1), inAgent.quantileBound(0.5), inAgent.quantileBound(0.99))

	logf("programming latency, real pods: %d pods over %v in batches of %d, each sending UDP to ext1 every %v on one flow; time from the API's answer to the first datagram that reached ext1 with the floating IP",
		cfg.realPods, s.nodes, cfg.realBatch, cfg.sendInterval)
	live, err := s.latencyReal(ctx, watches)
	if err != nil {
		return "", err
	}
	logf("  selected pods (%d), first packet with the floating IP: %s; %d of %d pods never got their first datagram out in 15 s",
		live.pods-live.unselected, dist(live.firstPacket), live.failed, live.pods)
	logf("  (the same pods' IP in their node's table: %s)", dist(live.inSet))
	logf("  unselected pods (%d), first packet out with the node IP (the cost of holding a pod the agent does not know yet): %s",
		live.unselected, dist(live.firstUnselected))
	logf("  leak: %d selected pods sent %d datagrams that left with another source than the floating IP, before or after their IP update (send interval %v); %d datagrams arrived before any update was sent; %d datagrams of unselected pods left with another source than their node's",
		live.leakedPods, live.leaked, cfg.sendInterval, live.early, live.wrong)
	for _, w := range watches {
		if c := w.counts(); c.overruns > 0 || c.err != nil {
			logf("WARNING: kernel notifications of %s lost: %d overruns, error %v", w.node, c.overruns, c.err)
		}
	}

	checkProcs(c)

	// 5. Per-packet cost (before the resyncs: the source node's agent is
	// stopped here and its resync is measured next).
	pk, err := s.packetCost(ctx, watches)
	if err != nil {
		return "", err
	}

	checkProcs(c, cfg.ppNode) // its agent is stopped on purpose

	// 3. Full resync, node by node; peak memory.
	var resyncs []*resyncResult
	for _, n := range s.nodes {
		want := pk.want
		if n != cfg.ppNode {
			if err := waitQuiet(ctx, watches[n], time.Second, time.Minute); err != nil {
				return "", err
			}
			if want, err = dumpTable(c.Lab.Node(n).NetNS); err != nil {
				return "", err
			}
		}
		logf("full resync of %s: kill its agent, delete table ip %s and its floating IPs, start the agent (%s)", n, tableName, want)
		r, err := s.resync(ctx, n, watches[n], want)
		if err != nil {
			return "", err
		}
		if n == cfg.ppNode {
			r.peakBefore = pk.peakBefore
		}
		resyncs = append(resyncs, r)
		logf("  %s: table complete %.0f ms after the agent started (its log: caches synced at +%.0f ms, first sync ended at +%.0f ms with took=%s, %d syncs logged); %d floating IPs back at +%.0f ms",
			n, ms(r.took), ms(r.cachesSynced), ms(r.firstSync), r.firstSyncTook, r.syncs, r.floating, ms(r.floatingBack))
	}
	time.Sleep(2 * time.Second)
	holders, err := s.readHolders(ctx)
	if err != nil {
		return "", err
	}
	moved := 0
	for g, n := range s.holders {
		if holders[g] != n {
			moved++
		}
	}
	if moved > 0 {
		logf("WARNING: %d floating IPs moved during the resyncs (a node was declared Down)", moved)
	}
	maxResync, maxRSS := 0.0, 0.0
	for _, r := range resyncs {
		maxResync = math.Max(maxResync, ms(r.took))
		m, err := s.agentMemory(r.node)
		if err != nil {
			return "", err
		}
		r.peakNew = m
		maxRSS = math.Max(maxRSS, math.Max(r.peakBefore.hwm, m.hwm))
		logf("  agent %s: VmHWM %.0f MiB before the restart (since the start of the bench), %.0f MiB after the full resync (VmRSS now %.0f MiB)",
			r.node, r.peakBefore.hwm, m.hwm, m.rss)
	}
	if m, leader, err := operatorMemory(ctx, c); err != nil {
		logf("WARNING: operator leader's memory: %v", err)
	} else {
		logf("  operator leader %s: VmHWM %.0f MiB, VmRSS %.0f MiB", leader, m.hwm, m.rss)
	}
	checkProcs(c)

	// Summary.
	p99 := percentile(own, 99)
	fmt.Println("#")
	fmt.Println("# summary")
	logf("objects: %d pods, %d namespaces, %d policies + 1 for the real pods, %d destination entries, %d gateways; created in %.0fs, converged %.0fs later",
		cfg.pods, cfg.policies, cfg.policies, cfg.policies*cfg.dests, cfg.gateways, created.Sub(t0).Seconds(), conv.Sub(created).Seconds())
	logf("programming (%d synthetic pods at %.0f/s): p50 %.1f ms, p99 %.1f ms to the pod's node's table; real pods (%d selected): first packet with the floating IP p50 %.1f ms, p99 %.1f ms; unselected (%d): first packet out p50 %.1f ms, p99 %.1f ms; leaked %d datagrams",
		len(own), cfg.latencyRate, percentile(own, 50), p99, len(live.firstPacket), sortedPercentile(live.firstPacket, 50), sortedPercentile(live.firstPacket, 99),
		len(live.firstUnselected), sortedPercentile(live.firstUnselected, 50), sortedPercentile(live.firstUnselected, 99), live.leaked)
	var rs []string
	for _, r := range resyncs {
		rs = append(rs, fmt.Sprintf("%s %.0f ms", r.node, ms(r.took)))
	}
	logf("full resync from an empty kernel: %s; agent peak RSS %.0f MiB", strings.Join(rs, ", "), maxRSS)
	for _, a := range assign {
		logf("assignment %s: %.2f ms", a.name, a.msPerOp)
	}
	logf("per packet on %s (median of %d): request/response full %.0f/s, empty %.0f/s, linear(%d rules) %.0f/s, via gateway %.0f/s; bulk full %.0f, empty %.0f, linear %.0f, via gateway %.0f MB/s",
		cfg.ppNode, cfg.ppRounds, pk.rr["full-direct"], pk.rr["empty"], pk.linearRules, pk.rr["linear"], pk.rr["full-gateway"],
		pk.mbps["full-direct"], pk.mbps["empty"], pk.mbps["linear"], pk.mbps["full-gateway"])
	logf("bench took %.0fs", time.Since(began).Seconds())
	line = fmt.Sprintf("scale classifier=%s programming_p99_ms=%.0f resync_ms=%.0f agent_rss_mb=%.0f packet_ratio=%.3f bulk_ratio=%.3f load100k_ms=%.0f linear_ratio=%.3f leaked=%d",
		backend, p99, maxResync, maxRSS, pk.rr["full-direct"]/pk.rr["empty"], pk.mbps["full-direct"]/pk.mbps["empty"], loadMS,
		pk.rr["linear"]/pk.rr["empty"], live.leaked+live.wrong)
	fmt.Println(line)
	return line, nil
}

// waitConverged waits until every node's source-set elements reach the
// expected counts and the tables have been quiet for a second, checked by a
// dump; if the counts never match, it accepts tables quiet for 20 s and
// reports the difference. It returns the time of the last change.
func waitConverged(ctx context.Context, s *scale, watches map[string]*watch, expected map[string]int, since time.Time, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	lastLog := time.Now()
	for {
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
		var last time.Time
		match := true
		var state []string
		for _, n := range s.nodes {
			c := watches[n].counts()
			if c.last.After(last) {
				last = c.last
			}
			if c.src != expected[n] {
				match = false
			}
			state = append(state, fmt.Sprintf("%s %d/%d", n, c.src, expected[n]))
		}
		quiet := time.Since(last)
		if time.Since(lastLog) > 10*time.Second {
			logf("  converging: source elements (seen/expected) %s", strings.Join(state, ", "))
			lastLog = time.Now()
		}
		if (match && quiet > time.Second) || quiet > 20*time.Second {
			ok := true
			var report []string
			for _, n := range s.nodes {
				d, err := dumpTable(s.c.Lab.Node(n).NetNS)
				if err != nil {
					return time.Time{}, err
				}
				if d.src != expected[n] {
					ok = false
				}
				report = append(report, fmt.Sprintf("%s %d/%d", n, d.src, expected[n]))
			}
			if ok || quiet > 20*time.Second {
				if !ok {
					logf("WARNING: source elements in the kernel differ from the bench's expectation (gateway mode: all selected pods; reroute: the node's): %s",
						strings.Join(report, ", "))
				}
				return last, nil
			}
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("not converged after %v: %s", timeout, strings.Join(state, ", "))
		}
	}
}

// waitQuiet waits until the node's table has not changed for quiet.
func waitQuiet(ctx context.Context, w *watch, quiet, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Since(w.counts().last) < quiet {
		if time.Now().After(deadline) {
			return fmt.Errorf("table of %s still changing after %v", w.node, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

type packetResult struct {
	rr, mbps    map[string]float64 // medians
	linearRules int
	want        *tableDump // the source node's table as its agent left it
	peakBefore  memory
}

// packetCost measures request/response and bulk rates from pods on the
// source node to a server on ext1, with the full ruleset (a pod no policy
// selects, the direct path; and a selected pod, through the gateway), with
// no egressnat table, and with a linear iptables chain instead.
func (s *scale) packetCost(ctx context.Context, watches map[string]*watch) (*packetResult, error) {
	node := s.cfg.ppNode
	n := s.c.Lab.Node(node)
	if n == nil {
		return nil, fmt.Errorf("no node %s", node)
	}
	ext := s.c.Lab.External("ext1")
	if h := s.holders[liveGateway]; h == node {
		logf("WARNING: %s holds the floating IP of %s: the 'gateway' path is local SNAT, not another node", node, liveGateway)
	}
	direct, err := s.c.AddPod(ctx, node, liveNamespace, "pp-direct", map[string]string{"egress": "no"})
	if err != nil {
		return nil, err
	}
	viaGW, err := s.c.AddPod(ctx, node, liveNamespace, "pp-gw", map[string]string{"egress": "yes"})
	if err != nil {
		return nil, err
	}
	if _, err := s.c.WaitSource(ctx, direct, ext, n.IP, 30*time.Second); err != nil {
		return nil, err
	}
	fip := s.c.Lab.Node(node).IP
	if a, err := s.c.WaitSource(ctx, viaGW, ext, mustAddr(floatingIP(0)), 30*time.Second); err != nil {
		return nil, err
	} else {
		fip = a
	}
	if err := waitQuiet(ctx, watches[node], time.Second, time.Minute); err != nil {
		return nil, err
	}
	res := &packetResult{rr: map[string]float64{}, mbps: map[string]float64{}}
	if res.peakBefore, err = s.agentMemory(node); err != nil {
		return nil, err
	}
	if err := s.c.Agents[node].Stop(); err != nil {
		return nil, err
	}
	if res.want, err = dumpTable(n.NetNS); err != nil {
		return nil, err
	}
	out, err := s.c.Lab.Exec(ctx, n.NetNS, "nft", "list", "table", "ip", tableName)
	if err != nil {
		return nil, err
	}
	p := &ppNode{s: s, node: node, netns: n.NetNS, saved: filepath.Join(s.c.Lab.WorkDir(), "bench-table.nft"),
		savedSig: res.want.signature(), want: res.want, hasTable: true}
	if s.cfg.classifier == "ebpf" {
		// "empty" is without the classifier's program too: the agent is
		// stopped, the bench detaches and attaches it again.
		if p.prog, err = bpf.Load(s.c.BPFDir(node)); err != nil {
			return nil, err
		}
		defer p.prog.Close()
		if err := lab.Do(n.NetNS, func() (err error) { p.ifaces, err = p.prog.Attached(); return err }); err != nil {
			return nil, err
		}
		logf("eBPF classifier of %s attached to %d interfaces", node, len(p.ifaces))
	}
	if err := os.WriteFile(p.saved, out, 0o644); err != nil {
		return nil, err
	}
	if err := p.writeLinear(s.c.Lab.WorkDir(), s.cfg.linearMin); err != nil {
		return nil, err
	}
	res.linearRules = p.rules
	srv, err := startPPServer(ext.NetNS, ext.IP)
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	backend, _ := s.c.Lab.Exec(ctx, n.NetNS, "iptables", "-V")
	logf("per-packet cost on %s (agent stopped, kernel state kept): its table %s; pods %s (selected by no policy) and %s (selected, leaves with %s through %s); server %s on ext1; %v per run, %d rounds, order rotating; client and server threads pinned to CPU %d (-1: not pinned)",
		node, res.want, direct.IP, viaGW.IP, fip, s.holders[liveGateway], srv.addr, s.cfg.ppDuration, s.cfg.ppRounds, pinCPU)
	logf("linear chain: %d rules `-s <pod>/32 -d <dst>/32 -j MARK` in mangle PREROUTING (one per (pod on %s, destination of its policy), at least %d), %s",
		p.rules, node, s.cfg.linearMin, strings.TrimSpace(string(backend)))
	configs := []ppConfig{
		{name: "full-direct", table: true, pod: direct.NetNS},
		{name: "full-gateway", table: true, pod: viaGW.NetNS},
		{name: "empty", pod: direct.NetNS},
		{name: "linear", linear: true, pod: direct.NetNS},
	}
	samples, err := measurePackets(ctx, p, srv, configs, s.cfg.ppRounds, s.cfg.ppDuration)
	if err != nil {
		p.setLinear(context.Background(), false) //nolint:errcheck
		return nil, err
	}
	if err := p.setLinear(ctx, false); err != nil {
		return nil, err
	}
	for _, c := range configs {
		sm := samples[c.name]
		res.rr[c.name] = median(sm.rr)
		res.mbps[c.name] = median(sm.mbps)
		logf("  %-12s request/response median %8.0f/s (runs %s), bulk median %8.1f MB/s (runs %s)",
			c.name, res.rr[c.name], fmtRuns(sm.rr, "%.0f"), res.mbps[c.name], fmtRuns(sm.mbps, "%.0f"))
	}
	e := res.rr["empty"]
	logf("  packet_ratio (full/empty) %.3f, linear_ratio (linear/empty) %.3f, gateway/direct %.3f; bulk: full/empty %.3f, linear/empty %.3f, gateway/direct %.3f",
		res.rr["full-direct"]/e, res.rr["linear"]/e, res.rr["full-gateway"]/res.rr["full-direct"],
		res.mbps["full-direct"]/res.mbps["empty"], res.mbps["linear"]/res.mbps["empty"], res.mbps["full-gateway"]/res.mbps["full-direct"])
	return res, nil
}

func operatorMemory(ctx context.Context, c *cluster.Cluster) (memory, string, error) {
	leader, err := c.Leader(ctx)
	if err != nil {
		return memory{}, "", err
	}
	i, err := strconv.Atoi(strings.TrimPrefix(leader, "operator-"))
	if err != nil || i >= len(c.Operators) {
		return memory{}, leader, fmt.Errorf("unknown leader %q", leader)
	}
	pid, err := procPid(c.Operators[i], "egressnat-operator")
	if err != nil {
		return memory{}, leader, err
	}
	m, err := procMemory(pid)
	return m, leader, err
}

// checkProcs warns about any agent or operator that is not running (the
// bench stops only the per-packet node's agent, and restarts it).
func checkProcs(c *cluster.Cluster, except ...string) {
	for name, p := range c.Agents {
		if !p.Running() && !slices.Contains(except, name) {
			logf("WARNING: agent %s is not running: %v", name, p.Err())
		}
	}
	for i, p := range c.Operators {
		if p != nil && !p.Running() {
			logf("WARNING: operator-%d is not running: %v", i, p.Err())
		}
	}
}

type assignResult struct {
	name             string
	msPerOp, mbPerOp float64
}

var benchLine = regexp.MustCompile(`^(BenchmarkAssign\S*)\s+\d+\s+([\d.]+) ns/op(?:\s+([\d.]+) B/op)?`)

// runLoadBench runs nft.BenchmarkLoadPods and returns the milliseconds per
// load of 100,000 pod entries, by classifier.
func runLoadBench(ctx context.Context) (map[string]float64, error) {
	root, err := apiserver.RepoRoot()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "^BenchmarkLoadPods$", "-benchtime", "3x", "-count", "1", "./nft/")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go test -bench BenchmarkLoadPods: %w\n%s", err, out)
	}
	res := map[string]float64{}
	line := regexp.MustCompile(`^BenchmarkLoadPods/(\w+)(?:-\d+)?\s+\d+\s+([\d.]+) ns/op`)
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := line.FindStringSubmatch(sc.Text()); m != nil {
			ns, _ := strconv.ParseFloat(m[2], 64)
			res[m[1]] = ns / 1e6
		}
	}
	if len(res) != 2 {
		return nil, fmt.Errorf("no BenchmarkLoadPods results in:\n%s", out)
	}
	return res, nil
}

func runAssignBench(ctx context.Context) ([]assignResult, error) {
	root, err := apiserver.RepoRoot()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "^BenchmarkAssign$", "-benchtime", "20x", "-benchmem", "-count", "1", "./gateway/")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go test -bench BenchmarkAssign: %w\n%s", err, out)
	}
	var res []assignResult
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		ns, _ := strconv.ParseFloat(m[2], 64)
		b, _ := strconv.ParseFloat(m[3], 64)
		name := regexp.MustCompile(`-\d+$`).ReplaceAllString(strings.TrimPrefix(m[1], "BenchmarkAssign/"), "") // GOMAXPROCS suffix
		res = append(res, assignResult{name: name, msPerOp: ns / 1e6, mbPerOp: b / 1e6})
	}
	if len(res) == 0 {
		return nil, fmt.Errorf("no BenchmarkAssign result in:\n%s", out)
	}
	return res, nil
}

func tailLogs(c *cluster.Cluster, n int) string {
	var b strings.Builder
	for name, p := range c.Agents {
		fmt.Fprintf(&b, "--- agent %s (%s)\n%s\n", name, p.LogPath, tail(p.Log(), n))
	}
	for i, p := range c.Operators {
		fmt.Fprintf(&b, "--- operator-%d\n%s\n", i, tail(p.Log(), n))
	}
	return b.String()
}

func keepLogs(c *cluster.Cluster, dir string) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "bench-scale: keep logs:", err)
		return
	}
	for name, p := range c.Agents {
		os.WriteFile(filepath.Join(dir, "agent-"+name+".log"), []byte(p.Log()), 0o644) //nolint:errcheck
	}
	for i, p := range c.Operators {
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("operator-%d.log", i)), []byte(p.Log()), 0o644) //nolint:errcheck
	}
	logf("logs kept in %s", dir)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func sortedPercentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	sort.Float64s(s)
	return percentile(s, p)
}

func median(v []float64) float64 { return sortedPercentile(v, 50) }

func dist(v []float64) string {
	if len(v) == 0 {
		return "no samples"
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	return fmt.Sprintf("p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, min %.1f ms, max %.1f ms (n=%d)",
		percentile(s, 50), percentile(s, 90), percentile(s, 99), s[0], s[len(s)-1], len(s))
}

func fmtRuns(v []float64, f string) string {
	var parts []string
	for _, x := range v {
		parts = append(parts, fmt.Sprintf(f, x))
	}
	return strings.Join(parts, " ")
}
