package realcluster

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

var (
	fip      = netip.MustParseAddr("192.0.2.100") // the seed gateway's first floating IP
	alice    = map[string]string{"user": "alice"}
	frontend = map[string]string{"role": "frontend"}
	backend  = map[string]string{"role": "backend"}

	// before is every node's kernel state before egressnat was installed.
	before = map[string]kernelState{}
	// streams receives the datagrams of the stream pods (TestLeakWindow),
	// which keep sending through the later tests.
	streams *streamLog
)

// The ports of the external host's servers the tests start.
const (
	streamPort = 9000 // UDP: the stream pods' datagrams
	holdPort   = 9001 // TCP: netutil echo-server for the hold pods
)

// 1. kubectl apply -k manifests/ installs egressnat from the image: an
// agent on every node, two operators on two nodes, running with the
// identities and capabilities the manifests ask for.
func TestInstall(t *testing.T) {
	ctx := ctxT(t)
	for _, n := range c.Lab.Nodes() {
		before[n.Name] = readKernel(t, n)
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Kubectl(ctx, "", "apply", "-k", filepath.Join(root, "manifests")); err != nil {
		t.Fatalf("kubectl apply -k manifests/: %v: %s", err, out)
	}
	if err := c.WaitRollouts(ctx, cluster.SystemNamespace, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	procs := containerProcs(t)
	var agents, operators []containerProc
	for _, p := range procs {
		switch p.comm {
		case "egressnat-agent":
			agents = append(agents, p)
		case "egressnat-opera": // comm is cut at 15 characters
			operators = append(operators, p)
		}
	}
	var agentNodes, operatorNodes []string
	for _, p := range agents {
		agentNodes = append(agentNodes, p.node)
		// Root for netlink and nftables, cut to NET_ADMIN and NET_RAW.
		if p.uid != "0" || p.capEff != 1<<12|1<<13 || !p.noNewPrivs || !p.seccomp {
			t.Errorf("agent on %s: uid %s, CapEff %#x, NoNewPrivs %v, seccomp %v; want uid 0, NET_ADMIN|NET_RAW (0x3000), no new privileges, seccomp",
				p.node, p.uid, p.capEff, p.noNewPrivs, p.seccomp)
		}
	}
	for _, p := range operators {
		operatorNodes = append(operatorNodes, p.node)
		if p.uid != "65532" || p.capEff != 0 || !p.noNewPrivs || !p.seccomp {
			t.Errorf("operator on %s: uid %s, CapEff %#x, NoNewPrivs %v, seccomp %v; want uid 65532, no capability, no new privileges, seccomp",
				p.node, p.uid, p.capEff, p.noNewPrivs, p.seccomp)
		}
	}
	slices.Sort(agentNodes)
	if want := []string{"cp1", "worker1", "worker2"}; !slices.Equal(agentNodes, want) {
		t.Errorf("agent processes on %v, want one on each of %v", agentNodes, want)
	}
	if len(operatorNodes) != 2 || operatorNodes[0] == operatorNodes[1] {
		t.Errorf("operator processes on %v, want two on two nodes", operatorNodes)
	}
	// The image the pods run is the one the kustomization names.
	out, err := c.Kubectl(ctx, "", "-n", cluster.SystemNamespace, "get", "pods", "-o", "jsonpath={.items[*].status.containerStatuses[*].image}")
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range strings.Fields(out) {
		if img != "ghcr.io/egressnat/egressnat:v0.1.0" {
			t.Errorf("a pod runs image %s, want ghcr.io/egressnat/egressnat:v0.1.0", img)
		}
	}
}

// 2. The seed scenario on real pods: selected pods leave with the floating
// IP, the others with their node's IP.
func TestSeedScenario(t *testing.T) {
	var b strings.Builder
	if err := cluster.SeedWalkthrough(ctxT(t), c, &b); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + b.String())
}

// 3. The leak window with pod IPs written by real kubelets: pods that
// send from their first instant (before their kubelet has written their IP
// into the API, before any agent knows them) never leave with a wrong
// source; the test measures how long their first packets are held.
func TestLeakWindow(t *testing.T) {
	ctx := ctxT(t)
	var err error
	if streams, err = listenStreams(c.Lab.External("ext1")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			streams.close()
		}
	})
	dst := netip.AddrPortFrom(c.Lab.External("ext1").IP, streamPort).String()
	var pods []cluster.RealPod
	for i := range 4 {
		for _, node := range []string{"worker1", "worker2"} {
			labels, want := frontend, fip
			name := fmt.Sprintf("sel-%s-%d", node, i)
			if i == 3 { // one in four is not selected: it must keep its node's IP
				labels, want, name = backend, c.Lab.Node(node).IP, fmt.Sprintf("uns-%s-%d", node, i)
			}
			streams.expect(name, want)
			p, err := c.RunPod(ctx, node, "alice", name, labels, "stream", "--interval", "10ms", "--tag", name, dst)
			if err != nil {
				t.Fatal(err)
			}
			pods = append(pods, p)
		}
	}
	for _, p := range pods {
		if _, err := c.WaitPodRunning(ctx, p, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	// Every pod is delivered, and keeps being delivered.
	if err := cluster.Poll(2*time.Minute, 100*time.Millisecond, func() error {
		for _, p := range pods {
			if n := streams.count(p.Name); n < 100 {
				return fmt.Errorf("%s: %d datagrams received", p, n)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if wrong := streams.wrong(time.Time{}); len(wrong) > 0 {
		t.Fatalf("datagrams left with a wrong source: %v", wrong)
	}
	var held []int
	for _, p := range pods {
		first := streams.first(p.Name)
		held = append(held, first.seq*10)
		t.Logf("%s: first datagram delivered is #%d (held about %d ms), from %s", p, first.seq, first.seq*10, first.src)
	}
	slices.Sort(held)
	t.Logf("leak window: %d pods, 0 datagrams with a wrong source; first packets held p50 %d ms, max %d ms",
		len(held), held[len(held)/2], held[len(held)-1])
}

// 4. A rolling update of the DaemonSet during traffic: every agent that
// holds floating IPs hands them over before it stops (planned moves,
// make before break), no datagram leaves with a wrong source, and
// established connections (through a remote gateway and through the local
// one) survive.
func TestRollingUpdate(t *testing.T) {
	ctx := ctxT(t)
	needStreams(t)
	holds := startHolds(t)
	before := policyNode(t)
	t0 := time.Now()
	if out, err := c.Kubectl(ctx, "", "-n", cluster.SystemNamespace, "rollout", "restart", "daemonset/egressnat-agent"); err != nil {
		t.Fatalf("rollout restart: %v: %s", err, out)
	}
	if err := c.WaitRollouts(ctx, cluster.SystemNamespace, 4*time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("rolling update of 3 agents took %s", time.Since(t0).Round(100*time.Millisecond))
	// The agents' pods are new ones.
	out, err := c.Kubectl(ctx, "", "-n", cluster.SystemNamespace, "get", "pods", "-l", "app.kubernetes.io/name=egressnat-agent",
		"-o", "jsonpath={range .items[*]}{.metadata.creationTimestamp}{\"\\n\"}{end}")
	if err != nil {
		t.Fatal(err)
	}
	for _, ts := range strings.Fields(out) {
		created, err := time.Parse(time.RFC3339, ts)
		if err != nil || created.Before(t0.Add(-time.Second)) {
			t.Errorf("an agent pod created at %s, before the rollout (%s)", ts, t0.Format(time.RFC3339))
		}
	}
	// Traffic kept flowing after the update: wait for a second of fresh
	// datagrams from every stream pod.
	waitFresh(t, time.Now())
	if wrong := streams.wrong(t0); len(wrong) > 0 {
		t.Fatalf("datagrams left with a wrong source during the rolling update: %v", wrong)
	}
	for tag, gap := range streams.maxGaps(t0) {
		t.Logf("%s: longest gap between datagrams during the update %s", tag, gap.Round(time.Millisecond))
	}
	checkHolds(t, holds)
	// The egress IP's holder drained: the IP moved, planned, when its
	// agent stopped.
	out, err = c.Kubectl(ctx, "", "get", "ngg", "default", "-n", "kube-system", "-o",
		`jsonpath={range .status.recentMoves[?(@.ip=="`+fip.String()+`")]}{.from}{" "}{.to}{" "}{.reason}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, before+" ") || !strings.Contains(out, "planned: node "+before+" draining: agent stopping") {
		t.Errorf("no planned move of %s off %s during the rollout; recentMoves:\n%s", fip, before, out)
	}
	t.Logf("moves of %s during the rollout:\n%s", fip, out)
}

// 5. The loss of the gateway node (kubelet, agent, containers and cable at
// once): the floating IP moves, the remote pods' traffic keeps its
// source, and their established connection survives.
func TestGatewayNodeLoss(t *testing.T) {
	ctx := ctxT(t)
	needStreams(t)
	holder := policyNode(t)
	if holder == "" {
		t.Fatal("the policy has no node")
	}
	var survivor string
	for _, n := range []string{"worker1", "worker2"} {
		if n != holder {
			survivor = n
		}
	}
	// The connection must survive (the same TCP connection goes on, never
	// reset), not answer within a failover's time: when the operator
	// leader dies with the gateway, the IP moves only after a standby took
	// the leader Lease (--leader-lease-duration, 4 s), and the client's
	// retransmissions back off meanwhile.
	hold, err := c.RunPod(ctx, survivor, "alice", "hold-loss", frontend, "hold", "--interval", "100ms", "--timeout", "20s",
		netip.AddrPortFrom(c.Lab.External("ext1").IP, holdPort).String())
	if err != nil {
		t.Fatal(err)
	}
	waitConnected(t, hold)
	// Where the operator leader runs decides how long the move may take:
	// the probes detect the dead node within a second, a leader that died
	// with it is replaced after its Lease expired.
	bound, leaderNode := 3*time.Second, leaderOperatorNode(t)
	if leaderNode == holder {
		bound += 4 * time.Second
	}
	t0 := time.Now()
	t.Logf("killing %s, the holder of %s (the operator leader runs on %s)", holder, fip, leaderNode)
	if err := c.KillRealNode(holder); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Poll(time.Minute, 100*time.Millisecond, func() error {
		if n := policyNode(t); n == holder || n == "" {
			return fmt.Errorf("the policy's node is %q", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	moved := time.Since(t0)
	t.Logf("the policy moved from %s to %s after %s", holder, policyNode(t), moved.Round(time.Millisecond))
	if moved > bound {
		t.Errorf("the policy moved after %s, more than %s", moved.Round(time.Millisecond), bound)
	}
	streams.forget(func(tag string) bool { return strings.Contains(tag, holder) }) // died with the node
	waitFresh(t, time.Now())
	if wrong := streams.wrong(t0); len(wrong) > 0 {
		t.Fatalf("datagrams left with a wrong source after the gateway died: %v", wrong)
	}
	for tag, gap := range streams.maxGaps(t0) {
		t.Logf("%s: outage %s", tag, gap.Round(time.Millisecond))
	}
	checkHolds(t, []cluster.RealPod{hold})
}

// 6. kubectl delete -k manifests/ leaves nothing of egressnat in any live
// node's kernel: every node's nftables tables, ip rules, policy routes,
// uplink addresses and net sysctls are as they were before the install.
// The node that died (TestGatewayNodeLoss) cannot clean itself; its
// manual cleanup (egressnat-agent --cleanup) does it.
func TestUninstall(t *testing.T) {
	ctx := ctxT(t)
	if len(before) == 0 {
		t.Skip("TestInstall did not run")
	}
	if streams != nil {
		streams.close()
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// A dead node's pods stay Terminating until its Node object goes (as
	// for every DaemonSet): delete it, as its operator would, or the
	// namespace never finishes deleting.
	for _, n := range c.Lab.Nodes() {
		if !c.RealNodes[n.Name].Kubelet.Running() {
			if out, err := c.Kubectl(ctx, "", "delete", "node", n.Name); err != nil {
				t.Fatalf("delete the dead node %s: %v: %s", n.Name, err, out)
			}
		}
	}
	if out, err := c.Kubectl(ctx, "", "delete", "-k", filepath.Join(root, "manifests"), "--wait=true", "--timeout=3m"); err != nil {
		t.Fatalf("kubectl delete -k manifests/: %v: %s", err, out)
	}
	for _, n := range c.Lab.Nodes() {
		rn := c.RealNodes[n.Name]
		if rn.Kubelet.Running() {
			continue
		}
		// A dead node: bring its cable back and clean it by hand, as its
		// operator would (the agent binary the image ships, run on the node
		// with its state directory).
		if err := c.Lab.SetLinkUp(n.Name); err != nil {
			t.Fatal(err)
		}
		out, err := c.Lab.Exec(ctx, n.NetNS, filepath.Join(c.BinDir(), "egressnat-agent"), "--cleanup",
			"--state-dir="+filepath.Join(rn.VarLib(), "egressnat"), "--proc-sys-net=/proc/sys/net", "--log-format=console")
		if err != nil {
			t.Fatalf("cleanup of the dead node %s: %v: %s", n.Name, err, out)
		}
	}
	for _, n := range c.Lab.Nodes() {
		var now kernelState
		if err := cluster.Poll(time.Minute, 100*time.Millisecond, func() error {
			now = readKernel(t, n)
			if d := now.diff(before[n.Name]); d != "" {
				return fmt.Errorf("%s", d)
			}
			return nil
		}); err != nil {
			t.Errorf("node %s after the uninstall: %v", n.Name, err)
		}
		if ents, err := os.ReadDir(filepath.Join(c.RealNodes[n.Name].VarLib(), "egressnat")); err == nil && len(ents) > 0 {
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			t.Logf("node %s keeps /var/lib/egressnat: %v", n.Name, names)
		}
	}
}

// kernelState is what egressnat may change in a node's kernel.
type kernelState struct {
	Tables  []string          // nft list tables
	Rules   []string          // ip rule
	Routes  []string          // routes of every table but main and local
	Addrs   []string          // the uplink's IPv4 addresses
	Sysctls map[string]string // net.ipv4.conf.{all,default,<uplink>}.*, conntrack's be_liberal
}

func readKernel(t *testing.T, n *lab.Node) kernelState {
	t.Helper()
	ctx := ctxT(t)
	run := func(argv ...string) []string {
		out, err := c.Lab.Exec(ctx, n.NetNS, argv...)
		if err != nil {
			t.Fatalf("on %s: %v", n.Name, err)
		}
		var lines []string
		for _, l := range strings.Split(string(out), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				lines = append(lines, l)
			}
		}
		return lines
	}
	var s kernelState
	s.Tables = run("nft", "list", "tables")
	slices.Sort(s.Tables)
	s.Rules = run("ip", "rule", "show")
	for _, l := range run("ip", "route", "show", "table", "all") {
		if strings.Contains(l, " table ") && !strings.Contains(l, " table main") && !strings.Contains(l, " table local") {
			s.Routes = append(s.Routes, l)
		}
	}
	slices.Sort(s.Routes)
	for _, l := range run("ip", "-4", "-o", "addr", "show", "dev", n.Uplink) {
		if f := strings.Fields(l); len(f) > 3 {
			s.Addrs = append(s.Addrs, f[3])
		}
	}
	slices.Sort(s.Addrs)
	s.Sysctls = map[string]string{}
	for _, l := range run("sh", "-c", "grep -rs . /proc/sys/net/ipv4/conf/all /proc/sys/net/ipv4/conf/default /proc/sys/net/ipv4/conf/"+n.Uplink+
		" /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal || true") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			s.Sysctls[k] = v
		}
	}
	return s
}

// diff says how s differs from want, "" when it does not.
func (s kernelState) diff(want kernelState) string {
	var d []string
	if !slices.Equal(s.Tables, want.Tables) {
		d = append(d, fmt.Sprintf("nftables tables %v, before %v", s.Tables, want.Tables))
	}
	if !slices.Equal(s.Rules, want.Rules) {
		d = append(d, fmt.Sprintf("ip rules %q, before %q", s.Rules, want.Rules))
	}
	if !slices.Equal(s.Routes, want.Routes) {
		d = append(d, fmt.Sprintf("routes %q, before %q", s.Routes, want.Routes))
	}
	if !slices.Equal(s.Addrs, want.Addrs) {
		d = append(d, fmt.Sprintf("uplink addresses %v, before %v", s.Addrs, want.Addrs))
	}
	if !reflect.DeepEqual(s.Sysctls, want.Sysctls) {
		for k, v := range s.Sysctls {
			if want.Sysctls[k] != v {
				d = append(d, fmt.Sprintf("%s = %s, before %s", k, v, want.Sysctls[k]))
			}
		}
		for k := range want.Sysctls {
			if _, ok := s.Sysctls[k]; !ok {
				d = append(d, fmt.Sprintf("%s gone", k))
			}
		}
	}
	return strings.Join(d, "; ")
}

// containerProc is a process of a container, with what the kernel says of
// its identity.
type containerProc struct {
	comm, node, uid string
	capEff          uint64
	noNewPrivs      bool
	seccomp         bool
}

// containerProcs lists the egressnat processes on the machine with their
// node (by network namespace).
func containerProcs(t *testing.T) []containerProc {
	t.Helper()
	nodeOf := map[uint64]string{}
	for _, n := range c.Lab.Nodes() {
		var st syscall.Stat_t
		if err := syscall.Stat("/run/netns/"+n.NetNS, &st); err != nil {
			t.Fatal(err)
		}
		nodeOf[st.Ino] = n.Name
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []containerProc
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		comm, err := os.ReadFile("/proc/" + e.Name() + "/comm")
		if err != nil || !strings.HasPrefix(string(comm), "egressnat-") {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat("/proc/"+e.Name()+"/ns/net", &st) != nil {
			continue
		}
		node, ok := nodeOf[st.Ino]
		if !ok {
			continue // not in this cluster (another lab, a host process)
		}
		status, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		p := containerProc{comm: strings.TrimSpace(string(comm)), node: node}
		for _, l := range strings.Split(string(status), "\n") {
			k, v, _ := strings.Cut(l, ":")
			f := strings.Fields(v)
			switch {
			case k == "Uid" && len(f) > 0:
				p.uid = f[0]
			case k == "CapEff" && len(f) > 0:
				p.capEff, _ = strconv.ParseUint(f[0], 16, 64)
			case k == "NoNewPrivs":
				p.noNewPrivs = strings.TrimSpace(v) == "1"
			case k == "Seccomp":
				p.seccomp = strings.TrimSpace(v) == "2"
			}
		}
		out = append(out, p)
	}
	return out
}

// policyNode is the node the seed policy's status names ("" when none).
func policyNode(t *testing.T) string {
	out, err := c.Kubectl(ctxT(t), "", "get", "egressnatpolicy", "egress", "-o", "jsonpath={.status.gatewayNode}")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}

// leaderOperatorNode returns the node of the operator replica holding the
// leader Lease.
func leaderOperatorNode(t *testing.T) string {
	t.Helper()
	ctx := ctxT(t)
	id, err := c.Kubectl(ctx, "", "-n", cluster.SystemNamespace, "get", "lease", "egressnat-operator", "-o", "jsonpath={.spec.holderIdentity}")
	if err != nil || strings.TrimSpace(id) == "" {
		t.Fatalf("the operator leader Lease: %v: %q", err, id)
	}
	node, err := c.Kubectl(ctx, "", "-n", cluster.SystemNamespace, "get", "pod", strings.TrimSpace(id), "-o", "jsonpath={.spec.nodeName}")
	if err != nil || strings.TrimSpace(node) == "" {
		t.Fatalf("the operator leader %s: %v: %q", id, err, node)
	}
	return strings.TrimSpace(node)
}

func needStreams(t *testing.T) {
	t.Helper()
	if streams == nil || streams.closed() {
		t.Skip("TestLeakWindow did not leave its streams")
	}
}

// startHolds starts the TCP echo server on ext1 (once) and a hold pod on
// each worker: one behind a remote gateway, one on the gateway itself.
func startHolds(t *testing.T) []cluster.RealPod {
	t.Helper()
	ctx := ctxT(t)
	ensureHoldServer(t)
	var pods []cluster.RealPod
	for _, node := range []string{"worker1", "worker2"} {
		p, err := c.RunPod(ctx, node, "alice", "hold-"+node, frontend, "hold", "--interval", "100ms", "--timeout", "5s",
			netip.AddrPortFrom(c.Lab.External("ext1").IP, holdPort).String())
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	for _, p := range pods {
		waitConnected(t, p)
	}
	return pods
}

var holdServer *lab.Proc

func ensureHoldServer(t *testing.T) {
	t.Helper()
	if holdServer != nil {
		return
	}
	ext := c.Lab.External("ext1")
	p, err := c.Lab.Start(ext.NetNS, "", netutilBin, "echo-server", "--tcp", fmt.Sprintf(":%d", holdPort))
	if err != nil {
		t.Fatal(err)
	}
	holdServer = p
	if err := cluster.Poll(30*time.Second, 100*time.Millisecond, func() error {
		if !strings.Contains(p.Log(), "listening tcp=") {
			return fmt.Errorf("echo server not listening: %s", p.Log())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// waitConnected waits until hold pod p is connected through the floating
// IP.
func waitConnected(t *testing.T, p cluster.RealPod) {
	t.Helper()
	ensureHoldServer(t)
	if _, err := c.WaitPodRunning(ctxT(t), p, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Poll(time.Minute, 100*time.Millisecond, func() error {
		logs, err := c.Kubectl(ctxT(t), "", "-n", p.Namespace, "logs", p.Name)
		if err != nil {
			return err
		}
		if !strings.Contains(logs, "connected seen="+fip.String()+":") {
			return fmt.Errorf("%s: %q", p, logs)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// checkHolds fails the test when a hold pod's connection broke (or it
// stopped running).
func checkHolds(t *testing.T, pods []cluster.RealPod) {
	t.Helper()
	for _, p := range pods {
		logs, err := c.Kubectl(ctxT(t), "", "-n", p.Namespace, "logs", p.Name)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if strings.Contains(logs, "failed") || strings.Contains(logs, "hold sent=") {
			t.Errorf("%s: the connection did not survive: %s", p, logs)
		}
		if !strings.Contains(logs, "connected") {
			t.Errorf("%s never connected: %s", p, logs)
		}
	}
}

// waitFresh waits until every stream pod has delivered datagrams sent
// after since plus a second.
func waitFresh(t *testing.T, since time.Time) {
	t.Helper()
	if err := cluster.Poll(time.Minute, 100*time.Millisecond, func() error {
		for _, tag := range streams.tags() {
			if last := streams.lastSent(tag); last.Before(since.Add(time.Second)) {
				return fmt.Errorf("%s: last datagram delivered was sent at %s", tag, last.Format(time.StampMilli))
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
