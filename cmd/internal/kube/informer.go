package kube

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metainternalversion "k8s.io/apimachinery/pkg/apis/meta/internalversion"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// listRetry is how often a failed list is retried.
const listRetry = 250 * time.Millisecond

// newInformer builds a shared informer whose list and watch retry every
// listRetry while the API server is unreachable, instead of failing.
// client-go's reflector backs off exponentially (up to 30 s) after failed
// lists and watches, which
// would leave the caches stale for up to 30 s after an API server outage;
// this informer is current again a fraction of a second after it returns.
// Errors a retry cannot fix (forbidden, unknown resource) fail at once, so
// the reflector reports them. The informer opts out of streaming lists
// (WatchList): their retries use that same growing backoff.
//
// health (may be nil) learns when the informer, called name, may be
// behind the API (see WatchHealth).
func newInformer(name string, health *WatchHealth, list func(context.Context, metav1.ListOptions) (runtime.Object, error),
	watchFn func(context.Context, metav1.ListOptions) (watch.Interface, error), obj runtime.Object) cache.SharedIndexInformer {
	failed := func(err error) { health.failed(name, err) }
	lw := &listWatch{ListWatch: cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return retry(ctx, failed, func() (runtime.Object, error) { return list(ctx, o) })
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := retry(ctx, failed, func() (watch.Interface, error) { return watchFn(ctx, o) })
			if err != nil {
				return nil, err
			}
			health.watching(name)
			return health.track(name, w), nil
		},
	}}
	return cache.NewSharedIndexInformer(lw, obj, 0, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
}

// retry calls fn every listRetry until it succeeds, ctx ends, or it fails
// in a way a retry cannot fix; failed learns of every failure.
func retry[T any](ctx context.Context, failed func(error), fn func() (T, error)) (T, error) {
	for {
		out, err := fn()
		if err != nil && ctx.Err() == nil {
			failed(err)
		}
		// A resource version the server does not have yet is the
		// reflector's to handle: it lists again from the latest state
		// (retrying the same version would wait on the server's cache).
		if err == nil || ctx.Err() != nil || apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) ||
			apierrors.IsNotFound(err) || apierrors.IsBadRequest(err) || apierrors.IsGone(err) || apierrors.IsResourceExpired(err) ||
			apierrors.HasStatusCause(err, metav1.CauseTypeResourceVersionTooLarge) {
			return out, err
		}
		select {
		case <-ctx.Done():
			var zero T
			return zero, ctx.Err()
		case <-time.After(listRetry):
		}
	}
}

// listWatch is a cache.ListWatch that tells the reflector to list rather
// than stream (see newInformer).
type listWatch struct{ cache.ListWatch }

// IsWatchListSemanticsUnSupported makes the reflector use list and watch.
func (*listWatch) IsWatchListSemanticsUnSupported() bool { return true }

// PodInformer watches every pod and keeps them whole. Callers that keep
// only a few fields should use SlimPodInformer: this one holds every full
// pod of a list at once before a transform can run.
func (c *Clients) PodInformer() cache.SharedIndexInformer {
	pods := c.Core.CoreV1().Pods(metav1.NamespaceAll)
	return newInformer("pods", c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return pods.List(ctx, o) },
		pods.Watch, &corev1.Pod{})
}

// listPageSize is how many pods one list request of SlimPodInformer asks
// for. 2,000 full pods are a few MiB; at 20,000 pods, pages of 500 made the
// agent's start 0.6 s slower (40 round trips to a busy API server) for
// little less memory.
var listPageSize int64 = 2000

// SlimPodInformer watches every pod and stores slim(pod) for each. It lists
// in pages of listPageSize and slims each page as it arrives, so that only
// one page of full pods is alive at a time: client-go's reflector gathers a
// whole list before an informer's transform runs, and the full pods of a
// list of tens of thousands made the agent's peak memory.
//
// slim is the informer's transform too, for the pods that arrive by watch.
// It must pass any other object (a tombstone) through, and should drop the
// containers: the transform then knows a pod without containers for one
// the list slimmed already (the API serves none without) and keeps it as
// it is instead of copying all of them once more. Setting slim again with
// SetTransform works, at the cost of that copy.
//
// Its lists ask for the most recent state (resourceVersion ""), whatever
// resource version the reflector asks for: that is never older than what
// the reflector has seen, and it is the state an API server pages (it
// answers resourceVersion "0" in one piece from its cache).
func (c *Clients) SlimPodInformer(slim cache.TransformFunc) cache.SharedIndexInformer {
	pods := c.Core.CoreV1().Pods(metav1.NamespaceAll)
	inf := newInformer("pods", c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
		return listSlim(ctx, func(err error) { c.Watches.failed("pods", err) }, func(o metav1.ListOptions) (*corev1.PodList, error) { return pods.List(ctx, o) }, o, slim)
	}, pods.Watch, &corev1.Pod{})
	_ = inf.SetTransform(func(obj any) (any, error) { // fails only once the informer runs
		if p, ok := obj.(*corev1.Pod); ok && len(p.Spec.Containers) == 0 {
			return obj, nil // slimmed by listSlim
		}
		return slim(obj)
	})
	return inf
}

// listSlim lists every pod page by page and returns slim(pod) of each. The
// list holds pointers, which the reflector hands on as they are (it would
// copy every item of a []corev1.Pod).
func listSlim(ctx context.Context, failed func(error), list func(metav1.ListOptions) (*corev1.PodList, error),
	o metav1.ListOptions, slim cache.TransformFunc) (*metainternalversion.List, error) {
	o.ResourceVersion, o.ResourceVersionMatch, o.Continue, o.Limit = "", "", "", listPageSize
	out := &metainternalversion.List{}
	for {
		page, err := retry(ctx, failed, func() (*corev1.PodList, error) { return list(o) })
		if (apierrors.IsResourceExpired(err) || apierrors.IsGone(err)) && o.Continue != "" {
			// The continue token outlived the server's history:
			// start again from the current state.
			o.Continue, out = "", &metainternalversion.List{}
			continue
		}
		if err != nil {
			return nil, err
		}
		if out.Items == nil {
			n := int64(len(page.Items))
			if page.RemainingItemCount != nil {
				n += *page.RemainingItemCount
			}
			out.Items = make([]runtime.Object, 0, n)
		}
		for i := range page.Items {
			obj, err := slim(&page.Items[i])
			if err != nil {
				return nil, fmt.Errorf("slim pod %s/%s: %w", page.Items[i].Namespace, page.Items[i].Name, err)
			}
			p, ok := obj.(*corev1.Pod)
			if !ok {
				return nil, fmt.Errorf("slim pod %s/%s: got %T", page.Items[i].Namespace, page.Items[i].Name, obj)
			}
			if p == &page.Items[i] {
				p = p.DeepCopy() // do not keep the page alive
			}
			out.Items = append(out.Items, p)
		}
		out.ResourceVersion = page.ResourceVersion
		if page.Continue == "" {
			return out, nil
		}
		o.Continue = page.Continue
	}
}

// NamespaceInformer watches every namespace.
func (c *Clients) NamespaceInformer() cache.SharedIndexInformer {
	ns := c.Core.CoreV1().Namespaces()
	return newInformer("namespaces", c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return ns.List(ctx, o) },
		ns.Watch, &corev1.Namespace{})
}

// NodeInformer watches every node.
func (c *Clients) NodeInformer() cache.SharedIndexInformer {
	nodes := c.Core.CoreV1().Nodes()
	return newInformer("nodes", c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return nodes.List(ctx, o) },
		nodes.Watch, &corev1.Node{})
}

// LeaseInformer watches the Leases of one namespace.
func (c *Clients) LeaseInformer(namespace string) cache.SharedIndexInformer {
	leases := c.Core.CoordinationV1().Leases(namespace)
	return newInformer("leases", c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return leases.List(ctx, o) },
		leases.Watch, &coordinationv1.Lease{})
}

// OneDaemonSetInformer watches the DaemonSet name of namespace and no
// other: its list and watch select it by name (a field selector, which
// RBAC may grant by resourceNames). health is its own, not c.Watches: its
// informer is called "daemonset" there.
func (c *Clients) OneDaemonSetInformer(namespace, name string, health *WatchHealth) cache.SharedIndexInformer {
	ds := c.Core.AppsV1().DaemonSets(namespace)
	sel := fields.OneTermEqualSelector("metadata.name", name).String()
	return newInformer("daemonset", health, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
		o.FieldSelector = sel
		return ds.List(ctx, o)
	}, func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
		o.FieldSelector = sel
		return ds.Watch(ctx, o)
	}, &appsv1.DaemonSet{})
}

// OneNamespaceInformer watches the namespace name and no other, as
// OneDaemonSetInformer does; its informer is called "namespace" in health.
func (c *Clients) OneNamespaceInformer(name string, health *WatchHealth) cache.SharedIndexInformer {
	ns := c.Core.CoreV1().Namespaces()
	sel := fields.OneTermEqualSelector("metadata.name", name).String()
	return newInformer("namespace", health, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
		o.FieldSelector = sel
		return ns.List(ctx, o)
	}, func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
		o.FieldSelector = sel
		return ns.Watch(ctx, o)
	}, &corev1.Namespace{})
}

// DynamicInformer watches a custom resource in every namespace.
func (c *Clients) DynamicInformer(gvr schema.GroupVersionResource) cache.SharedIndexInformer {
	r := c.Dynamic.Resource(gvr)
	return newInformer(gvr.Resource, c.Watches, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return r.List(ctx, o) },
		r.Watch, &unstructured.Unstructured{})
}

// RunInformers runs the informers until ctx ends.
func RunInformers(ctx context.Context, infs ...cache.SharedIndexInformer) {
	for _, inf := range infs {
		go inf.RunWithContext(ctx)
	}
}

// WaitForSync waits until every informer has synced; false when ctx ended
// first.
func WaitForSync(ctx context.Context, infs ...cache.SharedIndexInformer) bool {
	synced := make([]cache.InformerSynced, len(infs))
	for i, inf := range infs {
		synced[i] = inf.HasSynced
	}
	return cache.WaitForCacheSync(ctx.Done(), synced...)
}

// SlimPod keeps only the fields the agent reads (name, namespace, labels,
// node, host network, phase and addresses), so that tens of thousands of
// pods cost little memory. It drops the containers (see SlimPodInformer)
// and passes any other object through.
func SlimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: p.Labels,
			ResourceVersion: p.ResourceVersion, UID: p.UID},
		Spec:   corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status: corev1.PodStatus{Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs},
	}, nil
}
