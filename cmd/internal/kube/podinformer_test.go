package kube_test

// The pod informers against a real kube-apiserver (package test/apiserver):
// SlimPodInformer lists every pod over many pages and keeps them slim, and
// the peak memory of a first sync, measured in a fresh child process.
//
// The memory measure runs at 20,000 pods with
//
//	EGRESSNAT_MEM_PODS=20000 go test -count=1 -run TestPodInformerMemory -v ./cmd/internal/kube/
//
// (a few minutes: the pods are created first); at the default size it only
// reports.

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/test/apiserver"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

var srv *apiserver.Server

// Environment of the memory measure's child process.
const (
	childEnv      = "EGRESSNAT_MEM_CHILD" // the informer: plain or slim
	kubeconfigEnv = "EGRESSNAT_MEM_KUBECONFIG"
	wantEnv       = "EGRESSNAT_MEM_WANT" // pods the cache must hold
)

// TestMain starts the API server, except in the memory measure's child
// process and under -short, where the tests that need it skip (needServer)
// and the package's other tests run.
func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(memChild(mode))
	}
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	os.Exit(run(m))
}

// needServer skips t when no API server runs (go test -short).
func needServer(t testing.TB) {
	t.Helper()
	if srv == nil {
		t.Skip("needs kube-apiserver and etcd (skipped under -short)")
	}
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var err error
	srv, err = apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start api server:", err)
		return 1
	}
	defer srv.Stop()
	return m.Run()
}

// writer is a client for creating many objects fast.
func writer(t testing.TB) kubernetes.Interface {
	rc := srv.Config()
	rc.QPS, rc.Burst = 5000, 10000
	rc.Timeout = time.Minute
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// createPods creates pods prefix-00000.. in namespaces
// <prefix>-ns-0000.. (pod j in namespace j % namespaces), shaped as the
// synthetic pods of test/cluster/cmd/bench-scale: one pause container, the
// label app=bench, a node, then status Running with a pod IP and host IP,
// written as a kubelet would with UpdateStatus. workers write in parallel.
func createPods(t testing.TB, prefix string, n, namespaces int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cs := writer(t)
	nsName := func(i int) string { return fmt.Sprintf("%s-ns-%04d", prefix, i) }
	apiserver.Parallel(t, ctx, namespaces, 32, func(ctx context.Context, i int) error {
		_, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: nsName(i), Labels: map[string]string{"bench": "scale", "bench-ns": nsName(i)}}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		// The ServiceAccount admission plugin wants the default account.
		_, err = cs.CoreV1().ServiceAccounts(nsName(i)).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		return nil
	})
	nodes := []string{"cp1", "w1", "w2", "w3"}
	start := time.Now()
	apiserver.Parallel(t, ctx, n, 32, func(ctx context.Context, j int) error {
		f := false
		ns := nsName(j % namespaces)
		node := nodes[(j/namespaces)%len(nodes)]
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%05d", prefix, j), Namespace: ns,
				Labels: map[string]string{"app": "bench"}},
			Spec: corev1.PodSpec{NodeName: node, AutomountServiceAccountToken: &f,
				Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		ip := netip.AddrFrom4([4]byte{10, 244, byte(128 + j>>8), byte(j)}).String()
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP = ip
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
		p.Status.HostIP = fmt.Sprintf("192.0.2.%d", 11+slices.Index(nodes, node))
		_, err = cs.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		return err
	})
	t.Logf("created %d pods in %d namespaces in %.1fs", n, namespaces, time.Since(start).Seconds())
}

// countingTransport counts the pod list requests and their limits.
type countingTransport struct {
	rt     http.RoundTripper
	mu     sync.Mutex
	lists  int
	limits []string
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods" && r.URL.Query().Get("watch") != "true" {
		c.mu.Lock()
		c.lists++
		c.limits = append(c.limits, r.URL.Query().Get("limit"))
		c.mu.Unlock()
	}
	return c.rt.RoundTrip(r)
}

// TestSlimPodInformer: more pods than a page are all listed, in pages,
// and kept slim; pods created and deleted later arrive by watch, slim too.
// Both with the informer's own transform and with the caller setting slim
// again (as the agent did with PodInformer).
func TestSlimPodInformer(t *testing.T) {
	needServer(t)
	const n = 1200
	defer kube.SetListPageSize(500)()
	createPods(t, "slim", n, 12)
	for i, setTransform := range []bool{false, true} {
		t.Run(fmt.Sprintf("caller sets transform %v", setTransform), func(t *testing.T) {
			testSlimPodInformer(t, n, setTransform, fmt.Sprintf("late%d", i), fmt.Sprintf("slim-%05d", i*12)) // both in slim-ns-0000
		})
	}
}

func testSlimPodInformer(t *testing.T, n int, setTransform bool, late, gone string) {
	ct := &countingTransport{}
	rc := srv.Config()
	rc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	rc.ContentType = "application/vnd.kubernetes.protobuf"
	rc.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { ct.rt = rt; return ct }
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	c := &kube.Clients{Config: rc, Core: cs}
	inf := c.SlimPodInformer(kube.SlimPod)
	if setTransform {
		if err := inf.SetTransform(kube.SlimPod); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kube.RunInformers(ctx, inf)
	if !kube.WaitForSync(ctx, inf) {
		t.Fatal("informer did not sync")
	}
	ct.mu.Lock()
	lists, limits := ct.lists, ct.limits
	ct.mu.Unlock()
	want := (n + 499) / 500
	if lists != want || limits[0] != "500" {
		t.Errorf("%d pod list requests (limits %v), want %d pages of 500", lists, limits, want)
	}
	checkSlim := func(p *corev1.Pod) {
		t.Helper()
		if len(p.Spec.Containers) != 0 || len(p.ManagedFields) != 0 || p.Status.HostIP != "" || p.Spec.NodeName == "" ||
			p.Status.PodIP == "" || p.Status.Phase != corev1.PodRunning || p.Labels["app"] != "bench" || p.ResourceVersion == "" {
			t.Errorf("pod %s/%s is not the slim pod: %+v", p.Namespace, p.Name, p)
		}
	}
	got := 0
	for _, obj := range inf.GetStore().List() {
		p := obj.(*corev1.Pod)
		if strings.HasPrefix(p.Name, "slim-") {
			got++
			checkSlim(p)
		}
	}
	if got < n-1 { // the other subtest may have deleted one
		t.Fatalf("cache holds %d pods, want %d", got, n)
	}

	// Later changes come by watch, slim too. (No kubelet ends the pod: it
	// goes at once.)
	createPods(t, late, 1, 1)
	if err := cs.CoreV1().Pods("slim-ns-0000").Delete(ctx, gone, *metav1.NewDeleteOptions(0)); err != nil {
		t.Fatal(err)
	}
	for {
		_, deleted, _ := inf.GetStore().GetByKey("slim-ns-0000/" + gone)
		obj, added, _ := inf.GetStore().GetByKey(late + "-ns-0000/" + late + "-00000")
		if !deleted && added && obj.(*corev1.Pod).Status.PodIP != "" {
			checkSlim(obj.(*corev1.Pod))
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the watch did not bring the new pod and the deletion")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// memResult is what the child process reports.
type memResult struct {
	Mode         string  `json:"mode"`
	Pods         int     `json:"pods"`
	SyncSeconds  float64 `json:"syncSeconds"`
	RSSBeforeMiB float64 `json:"rssBeforeMiB"`
	HWMMiB       float64 `json:"hwmMiB"`      // VmHWM: peak resident set
	PeakHeapMiB  float64 `json:"peakHeapMiB"` // sampled peak of heap objects
	LiveHeapMiB  float64 `json:"liveHeapMiB"` // heap in use after sync and a GC
}

// TestPodInformerMemory measures a first sync of a pod informer that keeps
// the agent's slim pods, each in a fresh process: "plain" is PodInformer
// with kube.SlimPod set as transform (the agent until now), "slim+transform"
// SlimPodInformer with the caller setting kube.SlimPod again, "slim"
// SlimPodInformer alone. EGRESSNAT_MEM_PODS sets the size (1,000
// namespaces from 20,000 pods on, like the bench) and makes 3 runs;
// EGRESSNAT_MEM_RUNS, EGRESSNAT_MEM_MODES (comma-separated) and
// EGRESSNAT_MEM_CHILD_ENV (e.g. GOMEMLIMIT=150MiB) change them.
func TestPodInformerMemory(t *testing.T) {
	needServer(t)
	n, runs := 2000, 1
	if v := os.Getenv("EGRESSNAT_MEM_PODS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			t.Fatal(err)
		}
		runs = 3
	}
	if v := os.Getenv("EGRESSNAT_MEM_RUNS"); v != "" {
		runs, _ = strconv.Atoi(v)
	}
	namespaces := min(1000, max(1, n/20))
	createPods(t, "mem", n, namespaces)
	modes := []string{"plain", "slim+transform", "slim"}
	if v := os.Getenv("EGRESSNAT_MEM_MODES"); v != "" {
		modes = strings.Split(v, ",")
	}
	for r := range runs {
		for _, mode := range modes {
			env := strings.Fields(os.Getenv("EGRESSNAT_MEM_CHILD_ENV")) // e.g. GOMEMLIMIT=150MiB
			res, err := runChild(mode, n, env)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("run %d %-14s %d pods %v: sync %.2fs, VmHWM %.1f MiB (VmRSS %.1f MiB before the list), peak heap %.1f MiB, live heap after sync %.1f MiB",
				r+1, mode, res.Pods, env, res.SyncSeconds, res.HWMMiB, res.RSSBeforeMiB, res.PeakHeapMiB, res.LiveHeapMiB)
		}
	}
}

func runChild(mode string, n int, env []string) (*memResult, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, kubeconfigEnv+"="+srv.Kubeconfig, wantEnv+"="+strconv.Itoa(n))
	cmd.Env = append(cmd.Env, env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("child %s: %v: %s", mode, err, stderr.String())
	}
	var res memResult
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("child %s: %v: %q", mode, err, out)
	}
	return &res, nil
}

// memChild syncs one pod informer, as the agent builds it, and prints a
// memResult.
func memChild(mode string) int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, err); return 1 }
	want, _ := strconv.Atoi(os.Getenv(wantEnv))
	c, err := kube.NewClients(os.Getenv(kubeconfigEnv))
	if err != nil {
		return fail(err)
	}
	var inf cache.SharedIndexInformer
	switch mode {
	case "plain":
		inf = c.PodInformer()
	case "slim", "slim+transform":
		inf = c.SlimPodInformer(kube.SlimPod)
	default:
		return fail(fmt.Errorf("unknown mode %q", mode))
	}
	if mode != "slim" {
		if err := inf.SetTransform(kube.SlimPod); err != nil {
			return fail(err)
		}
	}
	runtime.GC()
	res := memResult{Mode: mode, RSSBeforeMiB: procStatus("VmRSS")}
	var peak atomic.Uint64
	done := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		for {
			metrics.Read(s)
			if v := s[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	kube.RunInformers(ctx, inf)
	if !kube.WaitForSync(ctx, inf) {
		return fail(fmt.Errorf("informer did not sync"))
	}
	res.SyncSeconds = time.Since(start).Seconds()
	close(done)
	<-sampled
	res.HWMMiB, res.PeakHeapMiB = procStatus("VmHWM"), float64(peak.Load())/(1<<20)
	res.Pods = len(inf.GetStore().ListKeys())
	if res.Pods < want {
		return fail(fmt.Errorf("cache holds %d pods, want at least %d", res.Pods, want))
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	res.LiveHeapMiB = float64(ms.HeapAlloc) / (1 << 20)
	runtime.KeepAlive(inf)
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
	return 0
}

// procStatus reads a field of /proc/self/status in MiB.
func procStatus(field string) float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field+":" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return -1
}
