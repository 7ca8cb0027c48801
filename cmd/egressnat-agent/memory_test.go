package main

// TestAgentMemory measures the agent binary's peak memory (VmHWM) at the
// scale of test/cluster/cmd/bench-scale, without the lab: a real
// kube-apiserver (test/apiserver) holds 3 nodes, 20 gateways (their
// floating IPs assigned as the operator would), 1,000 namespaces, 1,000
// policies and the pods; the agent runs as node n1 in a network namespace
// of its own (enmem-*, a veth uplink, real nftables), reaching the API
// server through a relay. It only runs when asked, as root:
//
//	EGRESSNAT_MEM_AGENT=20000 go test -count=1 -timeout 60m -run TestAgentMemory -v ./cmd/egressnat-agent/
//
// Each variant starts the agent on the complete cluster (as after a
// restart), waits for its first sync and two full resyncs (--resync 10s),
// then changes the IP of every pod (a kubelet's churn) and waits until the
// agent is quiet again. EGRESSNAT_MEM_AGENT_BINS compares agent binaries
// (name=path,...; the package's own build by default);
// EGRESSNAT_MEM_AGENT_ENVS adds environment variants separated by ';'
// (e.g. "GOMEMLIMIT=150MiB;GOGC=50"; the empty variant always runs);
// EGRESSNAT_MEM_AGENT_RUNS repeats them all; EGRESSNAT_MEM_AGENT_LOGS
// keeps the agents' logs in a directory.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

const (
	memNodes    = 3
	memGateways = 20
	memDests    = 5
)

func TestAgentMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, kube-apiserver and etcd (skipped under -short)")
	}
	v := os.Getenv("EGRESSNAT_MEM_AGENT")
	if v == "" {
		t.Skip("set EGRESSNAT_MEM_AGENT=<pods> to measure the agent's memory")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespace, nftables)")
	}
	pods, err := strconv.Atoi(v)
	if err != nil {
		t.Fatal(err)
	}
	policies := min(1000, max(1, pods/20))
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Minute)
	defer cancel()

	srv, err := apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	root, err := apiserver.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		t.Fatal(err)
	}
	w := newWorld(t, srv)
	start := time.Now()
	w.create(ctx, t, policies, pods)
	t.Logf("created %d nodes, %d gateways, %d namespaces and policies, %d pods in %.0fs",
		memNodes, memGateways, policies, pods, time.Since(start).Seconds())

	bins := map[string]string{}
	var order []string
	if v := os.Getenv("EGRESSNAT_MEM_AGENT_BINS"); v != "" {
		for _, kv := range strings.Split(v, ",") {
			name, path, _ := strings.Cut(kv, "=")
			bins[name], order = path, append(order, name)
		}
	} else {
		bin := filepath.Join(t.TempDir(), "egressnat-agent")
		if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
			t.Fatalf("build agent: %v: %s", err, out)
		}
		bins["agent"], order = bin, []string{"agent"}
	}
	envs := []string{""}
	if v := os.Getenv("EGRESSNAT_MEM_AGENT_ENVS"); v != "" {
		envs = append(envs, strings.Split(v, ";")...)
	}
	ns := netnsFor(t)
	relay := relayInto(t, ns, srv.URL)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := apiserver.WriteKubeconfig(kubeconfig, "https://"+relay, srv.AdminToken); err != nil {
		t.Fatal(err)
	}
	runs := 1
	if v := os.Getenv("EGRESSNAT_MEM_AGENT_RUNS"); v != "" {
		if runs, err = strconv.Atoi(v); err != nil {
			t.Fatal(err)
		}
	}
	var results []string
	for range runs {
		for _, name := range order {
			for _, env := range envs {
				r := w.runAgent(ctx, t, ns, bins[name], kubeconfig, strings.Fields(env))
				line := fmt.Sprintf("%-10s %-20q caches synced %5.1fs: VmHWM %5.1f MiB; first sync done %5.1fs: %5.1f MiB; after 2 resyncs %5.1f MiB (VmRSS %5.1f); after every pod's IP changed %5.1f MiB (VmRSS %5.1f); CPU %4.1fs",
					name, env, r.synced.Seconds(), r.hwmSynced, r.firstSync.Seconds(), r.hwmFirst, r.hwmResync, r.rssResync, r.hwmChurn, r.rssChurn, r.cpu.Seconds())
				t.Log(line)
				results = append(results, line)
			}
		}
	}
	t.Logf("summary (%d pods, %d namespaces, %d policies):\n%s", pods, policies, policies, strings.Join(results, "\n"))
}

// world is the cluster's objects.
type world struct {
	cs    kubernetes.Interface
	dyn   dynamic.Interface
	pods  []*corev1.Pod
	round int // pod IPs changed so many times
}

func newWorld(t *testing.T, srv *apiserver.Server) *world {
	rc := srv.Config()
	rc.QPS, rc.Burst = 5000, 10000
	rc.Timeout = time.Minute
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return &world{cs: cs, dyn: dyn}
}

func nodeName(i int) string { return fmt.Sprintf("n%d", i+1) }
func nodeIP(i int) string   { return fmt.Sprintf("192.0.2.%d", 11+i) }
func nsName(i int) string   { return fmt.Sprintf("s-%04d", i) }
func gwName(i int) string   { return fmt.Sprintf("gw-%02d", i) }

// podIP is pod j's address in round r: 10.244.128.0/17 and on.
func podIP(j, r int) string {
	a := 0x0af48001 + uint32(j) + uint32(r%2)*0x4000
	return netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}).String()
}

// create makes the objects, shaped as bench-scale makes them.
func (w *world) create(ctx context.Context, t *testing.T, policies, pods int) {
	t.Helper()
	for _, n := range []string{"egressnat-system"} {
		if _, err := w.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}},
			metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	for i := range memNodes {
		labels := map[string]string{"kubernetes.io/hostname": nodeName(i), "kubernetes.io/os": "linux"}
		if i == 0 {
			labels[kube.LabelControlPlane] = ""
		}
		n, err := w.cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName(i), Labels: labels}},
			metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		now := metav1.Now()
		n.Status = corev1.NodeStatus{
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP(i)}, {Type: corev1.NodeHostName, Address: nodeName(i)}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
				LastHeartbeatTime: now, LastTransitionTime: now}},
		}
		if _, err := w.cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	gws := w.dyn.Resource(kube.GatewayGVR).Namespace("kube-system")
	for i := range memGateways {
		ip := fmt.Sprintf("192.0.2.%d", 100+i)
		u, err := gws.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1.GroupVersion.String(), "kind": "NetworkGatewayGroup",
			"metadata": map[string]any{"name": gwName(i), "namespace": "kube-system"},
			"spec":     map[string]any{"floatingIPs": []any{ip}},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		nodes := map[string]any{}
		for n := range memNodes {
			nodes[nodeName(n)] = "Up"
		}
		u.Object["status"] = map[string]any{"nodes": nodes, "floatingIPs": map[string]any{ip: nodeName(i % memNodes)}}
		if _, err := gws.UpdateStatus(ctx, u, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	apiserver.Parallel(t, ctx, policies, 16, func(ctx context.Context, i int) error {
		_, err := w.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: nsName(i), Labels: map[string]string{"bench": "scale", "bench-ns": nsName(i)}}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		_, err = w.cs.CoreV1().ServiceAccounts(nsName(i)).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		var dests []any
		for k := range memDests {
			idx := (i*7 + k*103) % 512
			if idx < 256 {
				dests = append(dests, map[string]any{"cidr": fmt.Sprintf("203.0.113.%d/32", idx)})
			} else {
				dests = append(dests, map[string]any{"cidr": fmt.Sprintf("198.51.100.%d/32", idx-256)})
			}
		}
		gw := i % memGateways
		pols := w.dyn.Resource(kube.PolicyGVR)
		u, err := pols.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1.GroupVersion.String(), "kind": "EgressNATPolicy",
			"metadata": map[string]any{"name": nsName(i)},
			"spec": map[string]any{
				"sources":      []any{map[string]any{"namespaceSelector": map[string]any{"matchLabels": map[string]any{"bench-ns": nsName(i)}}, "podSelector": map[string]any{}}},
				"action":       "SNAT",
				"destinations": dests,
				"gatewayRef":   map[string]any{"name": gwName(gw), "namespace": "kube-system"},
			},
		}}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		// The operator's status.
		now := time.Now().UTC().Format(time.RFC3339)
		u.Object["status"] = map[string]any{
			"whenUnavailable": "Drop", "egressIP": fmt.Sprintf("192.0.2.%d", 100+gw), "gatewayNode": nodeName(gw % memNodes),
			"observedGeneration": int64(1),
			"conditions": []any{
				map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "gateway found", "lastTransitionTime": now, "observedGeneration": int64(1)},
				map[string]any{"type": "Ready", "status": "True", "reason": "Applied", "message": "egress IP held", "lastTransitionTime": now, "observedGeneration": int64(1)},
			},
		}
		_, err = pols.UpdateStatus(ctx, u, metav1.UpdateOptions{})
		return err
	})
	w.pods = make([]*corev1.Pod, pods)
	apiserver.Parallel(t, ctx, pods, 16, func(ctx context.Context, j int) error {
		f := false
		ns := nsName(j % policies)
		node := (j / policies) % memNodes
		p, err := w.cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p-%05d", j), Namespace: ns, Labels: map[string]string{"app": "bench"}},
			Spec: corev1.PodSpec{NodeName: nodeName(node), AutomountServiceAccountToken: &f,
				Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP = podIP(j, 0)
		p.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
		p.Status.HostIP = nodeIP(node)
		w.pods[j], err = w.cs.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		return err
	})
}

// churn gives every pod its next IP, as fast as the API takes it.
func (w *world) churn(ctx context.Context, t *testing.T) {
	w.round++
	apiserver.Parallel(t, ctx, len(w.pods), 16, func(ctx context.Context, j int) error {
		p := w.pods[j].DeepCopy()
		p.Status.PodIP = podIP(j, w.round)
		p.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
		out, err := w.cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		if err != nil {
			return err
		}
		w.pods[j] = out
		return nil
	})
}

type agentResult struct {
	synced, firstSync              time.Duration
	hwmSynced, hwmFirst, hwmResync float64
	rssResync, hwmChurn, rssChurn  float64
	cpu                            time.Duration // user + system, whole run
}

// runAgent runs the agent of n1 in ns until it has synced, resynced twice
// and followed a churn of every pod; it returns its memory on the way.
func (w *world) runAgent(ctx context.Context, t *testing.T, ns, bin, kubeconfig string, env []string) agentResult {
	t.Helper()
	// A fresh table for every run, as on a rebooted node.
	exec.Command("ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "egressnat").Run() //nolint:errcheck
	dir := os.Getenv("EGRESSNAT_MEM_AGENT_LOGS")
	if dir == "" {
		dir = t.TempDir()
	}
	logFile, err := os.CreateTemp(dir, "agent-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	logPath := logFile.Name()
	fmt.Fprintf(logFile, "# %s %v\n", bin, env)
	cmd := exec.Command("ip", "netns", "exec", ns, bin, "--kubeconfig="+kubeconfig, "--node-name="+nodeName(0),
		"--namespace=egressnat-system", "--uplink=up0", "--resync=10s", "--log-format=console", "--log-level=debug")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(os.Interrupt) //nolint:errcheck
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }() //nolint:errcheck
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill() //nolint:errcheck
			<-done
		}
	}()
	pid := cmd.Process.Pid // ip netns exec execs the agent
	var r agentResult
	waitLog := func(what string, cond func(l agentLog) bool, timeout time.Duration) agentLog {
		t.Helper()
		deadline := time.Now().Add(timeout)
		for {
			l := readAgentLog(logPath, t0)
			if cond(l) {
				return l
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				b, _ := os.ReadFile(logPath)
				t.Fatalf("agent: no %s after %v; log:\n%s", what, timeout, tail(string(b), 30))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	l := waitLog("caches synced", func(l agentLog) bool { return l.cachesSynced > 0 }, 2*time.Minute)
	r.synced = l.cachesSynced
	r.hwmSynced, _ = procMemory(t, pid)
	l = waitLog("first sync", func(l agentLog) bool { return l.syncs > 0 }, 2*time.Minute)
	r.firstSync = l.firstSync
	r.hwmFirst, _ = procMemory(t, pid)
	time.Sleep(time.Until(t0.Add(l.firstSync + 25*time.Second))) // the resyncs at 10 s and 20 s
	r.hwmResync, r.rssResync = procMemory(t, pid)
	before := readAgentLog(logPath, t0)
	churned := time.Now()
	w.churn(ctx, t)
	// Quiet: no sync logged for 3 s (a resync applies nothing new).
	l = waitLog("quiet after the churn", func(l agentLog) bool {
		return l.syncs > before.syncs && time.Since(t0)-l.lastSync > 3*time.Second && time.Since(churned) > 3*time.Second
	}, 5*time.Minute)
	r.hwmChurn, r.rssChurn = procMemory(t, pid)
	r.cpu = procCPU(t, pid)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	return r
}

type agentLog struct {
	cachesSynced, firstSync, lastSync time.Duration
	syncs                             int
}

// readAgentLog reads the agent's console log (as bench-scale does).
func readAgentLog(path string, t0 time.Time) agentLog {
	var l agentLog
	f, err := os.Open(path)
	if err != nil {
		return l
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fs := strings.Split(sc.Text(), "\t")
		if len(fs) < 3 {
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", fs[0])
		if err != nil {
			continue
		}
		msg := fs[2]
		if len(fs) > 3 && !strings.HasPrefix(fs[3], "{") {
			msg = fs[3]
		}
		switch msg {
		case "agent caches synced":
			l.cachesSynced = ts.Sub(t0)
		case "synced":
			l.syncs++
			if l.firstSync == 0 {
				l.firstSync = ts.Sub(t0)
			}
			l.lastSync = ts.Sub(t0)
		}
	}
	return l
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// procMemory returns VmHWM and VmRSS of pid in MiB.
func procMemory(t *testing.T, pid int) (hwm, rss float64) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		switch k {
		case "VmHWM":
			hwm = kb / 1024
		case "VmRSS":
			rss = kb / 1024
		}
	}
	return hwm, rss
}

// procCPU returns the user and system CPU time pid used.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

// netnsFor creates the agent's network namespace, enmem-<random>, with lo
// and an uplink up0 (a veth pair within the namespace) holding n1's address; it is deleted after the
// test. Only commands addressed to that namespace run: the root network
// namespace is never changed.
func netnsFor(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	ns := "enmem-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "up0", "type", "veth", "peer", "name", "up0peer"},
		{"addr", "add", nodeIP(0) + "/24", "dev", "up0"},
		{"link", "set", "up0peer", "up"},
		{"link", "set", "up0", "up"},
		{"route", "add", "default", "via", "192.0.2.1", "dev", "up0"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip -n %s %v: %v: %s", ns, args, err, out)
		}
	}
	return ns
}

// relayInto listens on 127.0.0.1 inside ns and forwards every connection to
// the API server at serverURL; it returns the listening address.
func relayInto(t *testing.T, ns, serverURL string) string {
	t.Helper()
	u, err := url.Parse(serverURL)
	if err != nil {
		t.Fatal(err)
	}
	l, err := lab.ListenTCP(ns, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", u.Host)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }() //nolint:errcheck
				io.Copy(c, up)                                                 //nolint:errcheck
			}()
		}
	}()
	return l.Addr().String()
}
