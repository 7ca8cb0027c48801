package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressnat/egressnat/nft"
	"go.uber.org/zap/zaptest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"
)

// TestIsUninstall: the verdict from what the agent saw. Only a namespace
// or a DaemonSet being deleted or gone is an uninstall; what is unknown
// (not seen, or an absence seen by a watch failing now) is not; a
// deletionTimestamp once seen counts even when the API refuses the agent
// since.
func TestIsUninstall(t *testing.T) {
	ns := func(mod func(*ObjectFacts)) ObjectFacts {
		f := ObjectFacts{Name: "egressnat-system", Seen: true, Current: true, Exists: true}
		if mod != nil {
			mod(&f)
		}
		return f
	}
	ds := ns // same shape
	const name = "egressnat-agent"
	named := func(mod func(*ObjectFacts)) ObjectFacts {
		f := ds(mod)
		f.Name = name
		return f
	}
	stale := func(f *ObjectFacts) { f.Current = false }
	gone := func(f *ObjectFacts) { f.Exists = false }
	deleting := func(f *ObjectFacts) { f.Deleting = true }
	for _, tc := range []struct {
		name      string
		facts     InstallFacts
		uninstall bool
		reason    string
	}{
		{"restart or rolling update: both there", InstallFacts{ns(nil), named(nil)}, false, "exists"},
		{"DaemonSet being deleted", InstallFacts{ns(nil), named(deleting)}, true, "DaemonSet egressnat-system/egressnat-agent is being deleted"},
		{"DaemonSet gone", InstallFacts{ns(nil), named(gone)}, true, "is gone"},
		{"namespace being deleted", InstallFacts{ns(deleting), named(nil)}, true, "namespace egressnat-system is being deleted"},
		{"namespace gone", InstallFacts{ns(gone), named(gone)}, true, "namespace egressnat-system is gone"},
		{"namespace deleting, then the API refused the agent", InstallFacts{ns(func(f *ObjectFacts) { deleting(f); stale(f) }), named(stale)}, true, "being deleted"},
		{"DaemonSet deleting, then the API refused the agent", InstallFacts{ns(stale), named(func(f *ObjectFacts) { deleting(f); stale(f) })}, true, "being deleted"},
		{"DaemonSet deleted orphaning its pods", InstallFacts{ns(nil), named(func(f *ObjectFacts) { deleting(f); f.Orphaning = true })}, false, "orphaning"},
		{"DaemonSet gone, its watch failing since", InstallFacts{ns(stale), named(func(f *ObjectFacts) { gone(f); stale(f) })}, false, "unknown"},
		{"namespace gone, its watch failing since", InstallFacts{ns(func(f *ObjectFacts) { gone(f); stale(f) }), named(stale)}, false, "exists"},
		{"both there, watches failing", InstallFacts{ns(stale), named(stale)}, false, "watch is failing"},
		{"nothing seen (API unreachable from the start)", InstallFacts{ObjectFacts{Name: "egressnat-system"}, ObjectFacts{Name: name}}, false, "not read"},
		{"DaemonSet not known, namespace there", InstallFacts{ns(nil), ObjectFacts{}}, false, "not known"},
		{"DaemonSet not known, namespace deleting", InstallFacts{ns(deleting), ObjectFacts{}}, true, "namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := IsUninstall(tc.facts)
			if got != tc.uninstall || !strings.Contains(why, tc.reason) {
				t.Errorf("IsUninstall(%+v) = %v %q, want %v with %q", tc.facts, got, why, tc.uninstall, tc.reason)
			}
		})
	}
}

const (
	agentNS  = "egressnat-system"
	agentDS  = "egressnat-agent"
	agentPod = "egressnat-agent-x7k2p"
)

// installObjects are the agent's namespace, DaemonSet and pod.
func installObjects() []runtime.Object {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: agentNS, Name: agentDS, UID: "ds-1"}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: agentNS, Name: agentPod,
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: agentDS, UID: "ds-1", Controller: ptr.To(true)}}},
		Spec: corev1.PodSpec{NodeName: node1}}
	return []runtime.Object{&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: agentNS}}, ds, pod}
}

// installAPI is a fake API server whose answers can turn into refusals
// (the agent's token invalid: its ServiceAccount deleted), ending the
// watches it serves, or whose DaemonSet watch can lag (deliver nothing).
type installAPI struct {
	core    *k8sfake.Clientset
	refuse  atomic.Bool
	lagging atomic.Bool
	mu      sync.Mutex
	live    []watch.Interface
}

func newInstallAPI(t *testing.T, objs ...runtime.Object) (*installAPI, *installWatch) {
	clients, core, _ := fakeClients(t, objs...)
	api := &installAPI{core: core}
	core.PrependReactor("*", "*", func(clienttesting.Action) (bool, runtime.Object, error) {
		if api.refuse.Load() {
			return true, nil, apierrors.NewUnauthorized("token invalid")
		}
		return false, nil, nil
	})
	core.PrependWatchReactor("*", func(a clienttesting.Action) (bool, watch.Interface, error) {
		if api.refuse.Load() {
			return true, nil, apierrors.NewUnauthorized("token invalid")
		}
		if api.lagging.Load() && a.GetResource().Resource == "daemonsets" {
			return true, watch.NewFake(), nil // started, never delivers
		}
		w, err := core.Tracker().Watch(a.GetResource(), a.GetNamespace())
		api.mu.Lock()
		api.live = append(api.live, w)
		api.mu.Unlock()
		return true, w, err
	})
	return api, newInstallWatch(clients, agentNS, agentPod, zaptest.NewLogger(t))
}

// refuseFrom makes the API refuse every request from now on and ends the
// watches it serves (as the API server does in time).
func (api *installAPI) refuseFrom() {
	api.refuse.Store(true)
	api.mu.Lock()
	defer api.mu.Unlock()
	for _, w := range api.live {
		w.Stop()
	}
	api.live = nil
}

// start runs w until the test ends and waits until its watches listed
// what is there and watch (the fake API server delivers only the changes
// made after a watch started, not those since the list).
func start(t *testing.T, api *installAPI, w *installWatch, wantDS bool) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.run(ctx)
	watches := 1
	if wantDS && !api.lagging.Load() {
		watches = 2
	}
	eventually(t, "the watches listed and watching", func() bool {
		f := w.facts()
		api.mu.Lock()
		n := len(api.live)
		api.mu.Unlock()
		return f.Namespace.Seen && (!wantDS || f.DaemonSet.Seen) && n >= watches
	})
}

func decide(t *testing.T, w *installWatch) (bool, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return w.decide(ctx)
}

// TestInstallWatch: the agent's watches of its namespace and DaemonSet
// (its pod's owner) on a fake API server, and the verdict the agent takes
// when it stops.
func TestInstallWatch(t *testing.T) {
	ctx := context.Background()
	dsClient := func(api *installAPI) interface {
		Get(context.Context, string, metav1.GetOptions) (*appsv1.DaemonSet, error)
		Update(context.Context, *appsv1.DaemonSet, metav1.UpdateOptions) (*appsv1.DaemonSet, error)
		Delete(context.Context, string, metav1.DeleteOptions) error
	} {
		return api.core.AppsV1().DaemonSets(agentNS)
	}
	updateDS := func(t *testing.T, api *installAPI, mod func(*appsv1.DaemonSet)) {
		t.Helper()
		ds, err := dsClient(api).Get(ctx, agentDS, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		mod(ds)
		if _, err := dsClient(api).Update(ctx, ds, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	deleteNS := func(t *testing.T, api *installAPI) {
		t.Helper()
		ns, err := api.core.CoreV1().Namespaces().Get(ctx, agentNS, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ns.DeletionTimestamp = &metav1.Time{Time: epoch}
		ns.Status.Phase = corev1.NamespaceTerminating
		if _, err := api.core.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	want := func(t *testing.T, w *installWatch, uninstall bool, reason string) {
		t.Helper()
		got, why := decide(t, w)
		if got != uninstall || !strings.Contains(why, reason) {
			t.Fatalf("verdict %v %q, want %v with %q (facts %+v)", got, why, uninstall, reason, w.facts())
		}
	}

	t.Run("restart", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		want(t, w, false, "exists")
	})
	t.Run("rolling update", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		updateDS(t, api, func(ds *appsv1.DaemonSet) {
			ds.Spec.Template.Annotations = map[string]string{"kubectl.kubernetes.io/restartedAt": "now"}
			ds.Generation++
		})
		eventually(t, "the new template seen", func() bool {
			obj, ok, _ := w.ds.GetStore().GetByKey(agentNS + "/" + agentDS)
			return ok && obj.(*appsv1.DaemonSet).Generation == 1
		})
		want(t, w, false, "exists")
	})
	t.Run("pod deleted", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		if err := api.core.CoreV1().Pods(agentNS).Delete(ctx, agentPod, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		want(t, w, false, "exists")
	})
	t.Run("DaemonSet deleted", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		if err := dsClient(api).Delete(ctx, agentDS, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the deletion seen", func() bool { return !w.facts().DaemonSet.Exists })
		want(t, w, true, "DaemonSet egressnat-system/egressnat-agent is gone")
	})
	t.Run("DaemonSet deleted in the foreground, then the API refuses the agent", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		updateDS(t, api, func(ds *appsv1.DaemonSet) {
			ds.DeletionTimestamp = &metav1.Time{Time: epoch}
			ds.Finalizers = []string{metav1.FinalizerDeleteDependents}
		})
		eventually(t, "the deletion seen", func() bool { return w.facts().DaemonSet.Deleting })
		api.refuseFrom()
		eventually(t, "the watches failing", func() bool { return !w.facts().DaemonSet.Current && !w.facts().Namespace.Current })
		want(t, w, true, "is being deleted")
	})
	t.Run("DaemonSet deleted orphaning its pods", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		updateDS(t, api, func(ds *appsv1.DaemonSet) {
			ds.DeletionTimestamp = &metav1.Time{Time: epoch}
			ds.Finalizers = []string{metav1.FinalizerOrphanDependents}
		})
		eventually(t, "the deletion seen", func() bool { return w.facts().DaemonSet.Deleting })
		want(t, w, false, "orphaning")
	})
	t.Run("namespace deleted, then its ServiceAccount's token refused", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		deleteNS(t, api)
		eventually(t, "the deletion seen", func() bool { return w.facts().Namespace.Deleting })
		api.refuseFrom()
		eventually(t, "the watches failing", func() bool { return !w.facts().DaemonSet.Current && !w.facts().Namespace.Current })
		want(t, w, true, "namespace egressnat-system is being deleted")
	})
	t.Run("DaemonSet gone, then its watch fails", func(t *testing.T) {
		// The absence was seen, but the DaemonSet may be back meanwhile:
		// unknown, not an uninstall.
		api, w := newInstallAPI(t, installObjects()...)
		start(t, api, w, true)
		if err := dsClient(api).Delete(ctx, agentDS, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the deletion seen", func() bool { return !w.facts().DaemonSet.Exists })
		api.refuseFrom()
		eventually(t, "the watches failing", func() bool { return !w.facts().DaemonSet.Current })
		want(t, w, false, "unknown")
	})
	t.Run("API unreachable from the start", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		api.refuse.Store(true)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go w.run(ctx)
		eventually(t, "the namespace's watch failing", func() bool { stale, _ := w.health.Stale("namespace"); return stale })
		want(t, w, false, "not known")
	})
	t.Run("the DaemonSet's watch lags: the read when stopping sees it gone", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		api.lagging.Store(true)
		start(t, api, w, true)
		if err := api.core.Tracker().Delete(appsv1.SchemeGroupVersion.WithResource("daemonsets"), agentNS, agentDS); err != nil {
			t.Fatal(err)
		}
		if f := w.facts(); !f.DaemonSet.Exists || !f.DaemonSet.Current {
			t.Fatalf("the lagging watch saw the deletion: %+v", f)
		}
		want(t, w, true, "is gone")
	})
	t.Run("no pod name: only the namespace counts", func(t *testing.T) {
		api, w := newInstallAPI(t, installObjects()...)
		w.podName = ""
		start(t, api, w, false)
		if err := dsClient(api).Delete(ctx, agentDS, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		want(t, w, false, "not known")
		deleteNS(t, api)
		eventually(t, "the deletion seen", func() bool { return w.facts().Namespace.Deleting })
		want(t, w, true, "namespace egressnat-system is being deleted")
	})
	t.Run("pod without a DaemonSet owner", func(t *testing.T) {
		objs := installObjects()
		objs[2].(*corev1.Pod).OwnerReferences = nil
		api, w := newInstallAPI(t, objs...)
		start(t, api, w, false)
		want(t, w, false, "not known")
		deleteNS(t, api)
		eventually(t, "the deletion seen", func() bool { return w.facts().Namespace.Deleting })
		want(t, w, true, "being deleted")
	})
}

// cleaner counts Cleanup calls; it fails while err is set.
type cleaner struct {
	*fakeDataplane
	calls atomic.Int32
	err   error
}

func (c *cleaner) Cleanup(ctx context.Context) error {
	c.calls.Add(1)
	if c.err != nil {
		return c.err
	}
	return c.fakeDataplane.Cleanup(ctx)
}

// nodeFiles fills a state directory as an agent leaves it, and a fake
// /proc/sys/net whose sysctls egressnat changed (and recorded).
func nodeFiles(t *testing.T) (state, procNet string) {
	t.Helper()
	state, procNet = t.TempDir(), t.TempDir()
	for f, text := range map[string]string{networksFile: "10.244.0.0/16\n", destsFile: "203.0.113.0/24\n", uplinkFile: "eth0\n",
		BootBinary: "#!/bin/true\n", networksFile + ".123": "leftover of a crash\n", "unrelated": "not egressnat's\n",
		uplinkFile + ".conf": "not egressnat's either\n"} {
		if err := os.WriteFile(filepath.Join(state, f), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	values := map[string]string{"ipv4/conf/all/send_redirects": "1", "ipv4/conf/eth0/src_valid_mark": "0"}
	var changes []nft.SysctlChange
	for p, v := range values {
		if err := os.MkdirAll(filepath.Join(procNet, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		set := map[string]string{"0": "1", "1": "0"}[v]
		changes = append(changes, nft.SysctlChange{Path: p, Before: v, Set: set})
		if err := os.WriteFile(filepath.Join(procNet, p), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := nft.RecordSysctls(state, procNet, changes); err != nil {
		t.Fatal(err)
	}
	for _, c := range changes {
		if err := os.WriteFile(filepath.Join(procNet, c.Path), []byte(c.Set+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return state, procNet
}

func sysctlNow(t *testing.T, procNet, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(procNet, p))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func remaining(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// TestUninstall: the dataplane cleans up, the sysctls go back to their
// values before, egressnat's files leave the state directory (not the
// files of others); when the kernel cannot be cleaned, the state files
// stay for the boot guard and for --cleanup.
func TestUninstall(t *testing.T) {
	state, procNet := nodeFiles(t)
	c := &cleaner{fakeDataplane: &fakeDataplane{}}
	if err := Uninstall(context.Background(), UninstallConfig{Dataplane: c, StateDir: state, ProcSysNet: procNet, Log: zaptest.NewLogger(t)}); err != nil {
		t.Fatal(err)
	}
	if c.calls.Load() != 1 {
		t.Errorf("Cleanup called %d times", c.calls.Load())
	}
	if got := remaining(t, state); strings.Join(got, " ") != "unrelated uplink.conf" {
		t.Errorf("left in the state directory: %v", got)
	}
	if a, b := sysctlNow(t, procNet, "ipv4/conf/all/send_redirects"), sysctlNow(t, procNet, "ipv4/conf/eth0/src_valid_mark"); a != "1" || b != "0" {
		t.Errorf("sysctls after the uninstall: send_redirects %s src_valid_mark %s, want 1 and 0", a, b)
	}

	state, procNet = nodeFiles(t)
	c = &cleaner{fakeDataplane: &fakeDataplane{}, err: errors.New("netlink: operation not permitted")}
	err := Uninstall(context.Background(), UninstallConfig{Dataplane: c, StateDir: state, ProcSysNet: procNet, Log: zaptest.NewLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "operation not permitted") {
		t.Fatalf("uninstall with a failing cleanup: %v", err)
	}
	if got := remaining(t, state); !strings.Contains(strings.Join(got, " "), uplinkFile) {
		t.Errorf("the state files went although the kernel was not cleaned: %v", got)
	}
}

// TestStopWhenUninstalled runs the whole agent against fake clientsets and
// stops it as the kubelet does: after a restart-like stop the kernel and
// the state directory are as they were; after its DaemonSet was deleted,
// the node's state is removed and the sysctls restored.
func TestStopWhenUninstalled(t *testing.T) {
	for _, uninstall := range []bool{false, true} {
		name := map[bool]string{false: "restart", true: "uninstall"}[uninstall]
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			clients, core, _ := fakeClients(t, append(append(cluster(), probeSecret()), installObjects()...)...)
			dp := &cleaner{fakeDataplane: &fakeDataplane{}}
			state, procNet := nodeFiles(t)
			cfg := testConfig(t, clients, dp)
			cfg.StateDir, cfg.ProcSysNet, cfg.CleanupOnUninstall, cfg.PodName = state, procNet, true, agentPod
			a := newAgent(cfg, clocktesting.NewFakeClock(epoch))
			a.fence.readyz = (&fakeAPI{up: true}).readyz
			done := make(chan error, 1)
			go func() { done <- a.runUntilStopped(ctx) }()
			eventually(t, "the first apply", func() bool { return a.Ready() == nil })
			if uninstall {
				if err := core.AppsV1().DaemonSets(agentNS).Delete(ctx, agentDS, metav1.DeleteOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			applied := func() int { _, n := dp.counts(); return n }
			before := applied()
			cancel() // SIGTERM
			if err := <-done; err != nil {
				t.Fatalf("run: %v", err)
			}
			left := remaining(t, state)
			sr := sysctlNow(t, procNet, "ipv4/conf/all/send_redirects")
			if !uninstall {
				if dp.calls.Load() != 0 || applied() != before || len(left) != 8 || sr != "0" {
					t.Fatalf("a restart changed the node: cleanups %d, applies %d -> %d, state %v, send_redirects %s",
						dp.calls.Load(), before, applied(), left, sr)
				}
				return
			}
			if dp.calls.Load() != 1 || len(left) != 2 || sr != "1" {
				t.Fatalf("an uninstall left: cleanups %d, state %v, send_redirects %s", dp.calls.Load(), left, sr)
			}
		})
	}
}
