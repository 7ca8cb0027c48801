package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/nft"
	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// An agent that stops leaves the kernel as it is (a restart, a rolling
// update, a node shutting down: traffic stays rerouted and SNATed), unless
// egressnat is being uninstalled: then, on SIGTERM, it removes everything
// it put on the node (Uninstall). Whether it is, the agent learns through
// the API while it runs (installWatch) and decides with IsUninstall.

// ObjectFacts is what the agent saw of one object through the API.
type ObjectFacts struct {
	// Name of the object; "" when the agent does not know which (its pod
	// has no DaemonSet owner, or was not read yet).
	Name string
	// Seen: listed or read from the API at least once.
	Seen bool
	// Current: its watch is current (or it was just read); otherwise what
	// was seen may be old.
	Current bool
	// Exists, with a deletionTimestamp (Deleting), and with the orphan
	// finalizer (Orphaning: deleted with --cascade=orphan, its pods kept).
	Exists, Deleting, Orphaning bool
}

// InstallFacts is what the agent saw of its installation: its namespace
// and its DaemonSet (its pod's owner).
type InstallFacts struct {
	Namespace, DaemonSet ObjectFacts
}

// IsUninstall decides, from what the agent saw through the API, whether
// egressnat is being uninstalled from this node, and says why (or why not).
//
// It is an uninstall when the agent's namespace is being deleted or is
// gone (`kubectl delete -k manifests/` deletes it first), or when its
// DaemonSet is being deleted (its pods with it) or is gone. A rolling
// update (a new pod template: the DaemonSet stays), a pod deleted, a node
// shutting down, and a DaemonSet deleted with --cascade=orphan (its pods
// stay, for a replacement to adopt) are not.
//
// It is conservative: removing the state of a node that is not being
// uninstalled lets the selected pods' traffic leave with the node's own
// IP (a leak: the table, its hold and its drops gone) until a new agent
// applies, and loses what the boot guard needs after a reboot; leaving
// the state after an uninstall only leaves rules nothing uses any more
// (and `egressnat-agent --cleanup` removes them). So what is unknown is
// not an uninstall: nothing seen yet (the API unreachable since the
// start), or an absence seen by a watch that is failing now (the object
// may be back). A deletionTimestamp, once seen, counts even when the API
// cannot be reached since: nothing removes it, and the deletion proceeds
// (that is how the agent still knows after the namespace's deletion
// removed its ServiceAccount, and with it its token).
func IsUninstall(f InstallFacts) (bool, string) {
	ns, ds := f.Namespace, f.DaemonSet
	switch {
	case ns.Seen && ns.Exists && ns.Deleting:
		return true, fmt.Sprintf("namespace %s is being deleted", ns.Name)
	case ns.Seen && ns.Current && !ns.Exists:
		return true, fmt.Sprintf("namespace %s is gone", ns.Name)
	case ds.Seen && ds.Exists && ds.Deleting && !ds.Orphaning:
		return true, fmt.Sprintf("DaemonSet %s/%s is being deleted", ns.Name, ds.Name)
	case ds.Seen && ds.Current && !ds.Exists:
		return true, fmt.Sprintf("DaemonSet %s/%s is gone", ns.Name, ds.Name)
	}
	switch {
	case ds.Name == "":
		return false, fmt.Sprintf("its DaemonSet is not known, and namespace %s was not seen being deleted", ns.Name)
	case !ds.Seen:
		return false, fmt.Sprintf("DaemonSet %s/%s not read from the API", ns.Name, ds.Name)
	case !ds.Exists:
		return false, fmt.Sprintf("DaemonSet %s/%s not seen since its watch failed: unknown", ns.Name, ds.Name)
	case ds.Orphaning:
		return false, fmt.Sprintf("DaemonSet %s/%s is deleted orphaning its pods (replaced)", ns.Name, ds.Name)
	case !ds.Current:
		return false, fmt.Sprintf("DaemonSet %s/%s exists, as last seen (its watch is failing)", ns.Name, ds.Name)
	}
	return false, fmt.Sprintf("DaemonSet %s/%s exists (a restart, a rolling update, a pod deletion)", ns.Name, ds.Name)
}

// ownerRetry: how often the agent's pod is read again until its owner is
// known; freshRead: how long the agent waits, when it stops, for a read of
// the API that could change the verdict of its watches.
const (
	ownerRetry = 2 * time.Second
	freshRead  = time.Second
)

// installWatch follows the agent's namespace and DaemonSet through the API
// (one watch each, by name), from the start, so that it knows when it is
// told to stop whether egressnat is being uninstalled, even when the API
// refuses it by then.
type installWatch struct {
	clients   *kube.Clients
	namespace string
	podName   string
	log       *zap.Logger
	// health is the watches' own (not the agent's: their restarts must
	// not make the agent recompute).
	health kube.WatchHealth

	mu      sync.Mutex
	dsName  string
	ns, ds  cache.SharedIndexInformer
	verdict string // the last verdict logged
}

func newInstallWatch(clients *kube.Clients, namespace, podName string, log *zap.Logger) *installWatch {
	return &installWatch{clients: clients, namespace: namespace, podName: podName, log: log}
}

// run watches until ctx ends: the namespace at once, the DaemonSet once
// the pod's owner is known.
func (w *installWatch) run(ctx context.Context) {
	ns := w.clients.OneNamespaceInformer(w.namespace, &w.health)
	w.handle(ns)
	w.mu.Lock()
	w.ns = ns
	w.mu.Unlock()
	go ns.RunWithContext(ctx)
	if w.podName == "" {
		w.log.Info("no pod name (POD_NAME): only the deletion of the agent's namespace tells an uninstall", zap.String("namespace", w.namespace))
		return
	}
	name := w.owner(ctx)
	if name == "" {
		return
	}
	ds := w.clients.OneDaemonSetInformer(w.namespace, name, &w.health)
	w.handle(ds)
	w.mu.Lock()
	w.dsName, w.ds = name, ds
	w.mu.Unlock()
	ds.RunWithContext(ctx)
}

// handle logs when the verdict changes, as the informer's events come.
func (w *installWatch) handle(inf cache.SharedIndexInformer) {
	changed := func() {
		uninstall, why := IsUninstall(w.facts())
		w.mu.Lock()
		was := w.verdict
		w.verdict = why
		w.mu.Unlock()
		if uninstall && was != why {
			w.log.Info("egressnat is being uninstalled: this node's kernel state is removed when the agent stops", zap.String("reason", why))
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { changed() }, UpdateFunc: func(any, any) { changed() }, DeleteFunc: func(any) { changed() },
	})
}

// owner reads the agent's pod until it knows its DaemonSet: "" when the
// pod has none, when it cannot be read for good (not found, forbidden), or
// when ctx ends.
func (w *installWatch) owner(ctx context.Context) string {
	for {
		name, err := w.readOwner(ctx)
		switch {
		case err == nil && name == "":
			w.log.Info("the agent's pod has no DaemonSet owner: only the deletion of its namespace tells an uninstall",
				zap.String("pod", w.namespace+"/"+w.podName))
			return ""
		case err == nil:
			return name
		case apierrors.IsNotFound(err) || apierrors.IsForbidden(err):
			w.log.Warn("read the agent's pod for its DaemonSet: only the deletion of its namespace tells an uninstall",
				zap.String("pod", w.namespace+"/"+w.podName), zap.Error(err))
			return ""
		}
		w.log.Debug("read the agent's pod for its DaemonSet; retrying", zap.Error(err))
		select {
		case <-ctx.Done():
			return ""
		case <-time.After(ownerRetry):
		}
	}
}

// readOwner reads the agent's pod and returns the DaemonSet that controls
// it ("" when none does).
func (w *installWatch) readOwner(ctx context.Context) (string, error) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pod, err := w.clients.Core.CoreV1().Pods(w.namespace).Get(rctx, w.podName, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == "DaemonSet" && ref.APIVersion == appsv1.SchemeGroupVersion.String() {
		return ref.Name, nil
	}
	return "", nil
}

// facts is what the watches saw.
func (w *installWatch) facts() InstallFacts {
	w.mu.Lock()
	ns, ds, dsName := w.ns, w.ds, w.dsName
	w.mu.Unlock()
	return InstallFacts{
		Namespace: w.cached(ns, "namespace", w.namespace, w.namespace),
		DaemonSet: w.cached(ds, "daemonset", dsName, w.namespace+"/"+dsName),
	}
}

// cached is what the informer inf (called informer in w.health) holds of
// the object name, under key.
func (w *installWatch) cached(inf cache.SharedIndexInformer, informer, name, key string) ObjectFacts {
	f := ObjectFacts{Name: name}
	if inf == nil || !inf.HasSynced() {
		return f
	}
	stale, _ := w.health.Stale(informer)
	obj, exists, err := inf.GetStore().GetByKey(key)
	if err != nil {
		return f
	}
	f.Seen, f.Current = true, !stale
	setExists(&f, obj, exists)
	return f
}

func setExists(f *ObjectFacts, obj any, exists bool) {
	f.Exists = exists
	if !exists {
		return
	}
	if m, err := meta.Accessor(obj); err == nil {
		f.Deleting = m.GetDeletionTimestamp() != nil
		f.Orphaning = slices.Contains(m.GetFinalizers(), metav1.FinalizerOrphanDependents)
	}
}

// decide is IsUninstall of what the watches saw, or, when that is not an
// uninstall, of a fresh read of the API where it answers within freshRead
// (a watch may lag, or be failing): what it reads supersedes what the
// watches saw. Without a pod name (outside a DaemonSet: the lab, a
// binary run by hand) there is no read: no DaemonSet to follow, and the
// namespace's deletion comes long before its pods are stopped.
func (w *installWatch) decide(ctx context.Context) (bool, string) {
	f := w.facts()
	if ok, why := IsUninstall(f); ok || w.podName == "" {
		return ok, why
	}
	ctx, cancel := context.WithTimeout(ctx, freshRead)
	defer cancel()
	ns, err := w.clients.Core.CoreV1().Namespaces().Get(ctx, w.namespace, metav1.GetOptions{})
	if fresh, ok := freshFacts(w.namespace, ns, err); ok {
		f.Namespace = fresh
	}
	if f.DaemonSet.Name == "" && w.podName != "" {
		if name, err := w.readOwner(ctx); err == nil && name != "" {
			f.DaemonSet = ObjectFacts{Name: name}
		}
	}
	if f.DaemonSet.Name != "" {
		ds, err := w.clients.Core.AppsV1().DaemonSets(w.namespace).Get(ctx, f.DaemonSet.Name, metav1.GetOptions{})
		if fresh, ok := freshFacts(f.DaemonSet.Name, ds, err); ok {
			f.DaemonSet = fresh
		}
	}
	return IsUninstall(f)
}

// freshFacts are the facts of a read that answered (found or not found).
func freshFacts(name string, obj metav1.Object, err error) (ObjectFacts, bool) {
	f := ObjectFacts{Name: name, Seen: true, Current: true}
	switch {
	case apierrors.IsNotFound(err):
		return f, true
	case err != nil:
		return ObjectFacts{}, false
	}
	setExists(&f, obj, true)
	return f, true
}

// Cleaner removes everything the dataplane put in the kernel
// (nft.Dataplane.Cleanup).
type Cleaner interface {
	Cleanup(ctx context.Context) error
}

// UninstallConfig says what Uninstall removes.
type UninstallConfig struct {
	Dataplane Cleaner
	// StateDir is the agent's --state-dir; "" none.
	StateDir string
	// ProcSysNet is the host's /proc/sys/net, writable, where the sysctls
	// recorded in StateDir are restored; "" restores none.
	ProcSysNet string
	// BPFDir is where the eBPF classifier pins its map and links
	// (--bpf-dir); "" none. Its pins are removed, the program detached.
	BPFDir string
	Log    *zap.Logger
}

// stateFiles are the files egressnat keeps in the state directory, besides
// the sysctl record (removed by its restore).
var stateFiles = []string{networksFile, destsFile, uplinkFile, BootBinary}

// Uninstall removes everything egressnat put on this node: through the
// dataplane's Cleanup the nftables tables (ip and arp: the guard table and
// the ARP lease included), the ip rules and route tables, the floating IPs
// and their conntrack entries; the sysctls it changed, back to their
// values before (nft.RestoreSysctls, from the record prepare-node and the
// agent keep); and its files in the state directory (the guard table's
// networks, the saved uplink, the boot unit's copy of the agent). The
// state files go only once the kernel is clean: otherwise the boot guard
// and `egressnat-agent --cleanup` still need them. Each step runs even
// when another failed; the errors are joined.
func Uninstall(ctx context.Context, cfg UninstallConfig) error {
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	var errs []error
	cleanErr := cfg.Dataplane.Cleanup(ctx)
	if cleanErr != nil {
		errs = append(errs, fmt.Errorf("remove the kernel state: %w", cleanErr))
	} else {
		log.Info("uninstall: nftables tables, ip rules, routes and floating IPs removed")
	}
	if cfg.BPFDir != "" {
		// After the table: nothing dispatches on the classes any more.
		if removed, err := removeClassifier(cfg.BPFDir); err != nil {
			errs = append(errs, fmt.Errorf("remove the eBPF classifier: %w", err))
		} else if removed {
			log.Info("uninstall: eBPF classifier detached and unpinned", zap.String("dir", cfg.BPFDir))
		}
	}
	if cfg.StateDir != "" && cfg.ProcSysNet != "" {
		res, err := nft.RestoreSysctls(cfg.StateDir, cfg.ProcSysNet)
		for _, c := range res.Restored {
			log.Info("uninstall: sysctl restored", zap.String("sysctl", c.Path), zap.String("value", c.Before), zap.String("was", c.Set))
		}
		for _, c := range res.Kept {
			log.Warn("uninstall: sysctl changed since by something else, left as it is", zap.String("sysctl", c.Path),
				zap.String("value", c.Set), zap.String("egressnatSet", c.Before))
		}
		if !res.Recorded && err == nil {
			log.Info("uninstall: no sysctl record: the sysctls stay as they are (set before this version recorded them?)",
				zap.String("record", filepath.Join(cfg.StateDir, nft.SysctlRecordFile)))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("restore the sysctls: %w", err))
		}
	}
	if cfg.StateDir != "" && cleanErr == nil {
		if err := removeStateFiles(cfg.StateDir); err != nil {
			errs = append(errs, err)
		} else {
			log.Info("uninstall: state files removed", zap.String("dir", cfg.StateDir))
		}
	}
	return errors.Join(errs...)
}

// removeStateFiles removes egressnat's files from dir (and the temporary
// files a crash left of them), then dir itself when nothing else is in it
// and it can go (in the DaemonSet it is a mount point, which stays).
func removeStateFiles(dir string) error {
	var errs []error
	for _, f := range stateFiles {
		leftovers, _ := filepath.Glob(filepath.Join(dir, f+".*"))
		// Only os.CreateTemp's: a random number after the dot.
		leftovers = slices.DeleteFunc(leftovers, func(p string) bool {
			n := strings.TrimPrefix(filepath.Base(p), f+".")
			return n == "" || strings.Trim(n, "0123456789") != ""
		})
		for _, p := range append(leftovers, filepath.Join(dir, f)) {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
			}
		}
	}
	if len(errs) == 0 {
		_ = os.Remove(dir) // only when empty; a mount point stays
	}
	return errors.Join(errs...)
}

// uninstallNode removes the node's state when the agent, told to stop,
// found egressnat being uninstalled (runUntilStopped). It has until
// budget.
func (a *agent) uninstallNode(budget time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	start := time.Now()
	err := Uninstall(ctx, UninstallConfig{Dataplane: a.cfg.Dataplane, StateDir: a.cfg.StateDir, ProcSysNet: a.cfg.ProcSysNet,
		BPFDir: a.cfg.BPFDir, Log: a.log})
	if err != nil {
		a.log.Error("uninstall incomplete: run egressnat-agent --cleanup on this node", zap.Error(err), zap.Duration("took", time.Since(start)))
		return fmt.Errorf("uninstall: %w", err)
	}
	a.log.Info("uninstall done: nothing of egressnat is left on this node", zap.Duration("took", time.Since(start)))
	return nil
}
