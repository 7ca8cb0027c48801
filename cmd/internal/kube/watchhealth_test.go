package kube

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
)

// TestWatchHealth runs an informer through a failed first list, a watch,
// a watch the server ends and a watch that cannot start again: it is stale
// exactly until a watch runs, and OnChange tells each change once.
func TestWatchHealth(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	lists, listFails := 0, 1
	var watchers []*watch.FakeWatcher
	watchDown, downAttempts := false, 0
	refused := errors.New("dial tcp 192.0.2.1:6443: connect: connection refused")
	list := func(context.Context, metav1.ListOptions) (runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		lists++
		if lists <= listFails {
			return nil, refused
		}
		return &corev1.NodeList{ListMeta: metav1.ListMeta{ResourceVersion: "1"}}, nil
	}
	watchFn := func(context.Context, metav1.ListOptions) (watch.Interface, error) {
		mu.Lock()
		defer mu.Unlock()
		if watchDown {
			downAttempts++
			return nil, refused
		}
		w := watch.NewFake()
		watchers = append(watchers, w)
		return w, nil
	}
	h := &WatchHealth{}
	var changes []string
	h.OnChange = func(informer string, stale bool, err error, _ time.Time) {
		mu.Lock()
		defer mu.Unlock()
		changes = append(changes, informer+" "+map[bool]string{true: "stale", false: "current"}[stale]+": "+err.Error())
	}
	stale := func() bool { s, _ := h.Stale("nodes"); return s }
	watching := func(n int) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return len(watchers) == n && !stale() }
	}
	inf := newInformer("nodes", h, list, watchFn, &corev1.Node{})
	go inf.RunWithContext(ctx)

	eventually(t, "the first watch", watching(1))
	// The server ends the watch, and the next ones fail: stale until a
	// watch runs again.
	mu.Lock()
	watchDown = true
	watchers[0].Stop()
	mu.Unlock()
	eventually(t, "stale after the watch ended", stale)
	eventually(t, "watches retried", func() bool { mu.Lock(); defer mu.Unlock(); return downAttempts >= 2 })
	if !stale() {
		t.Fatal("current while no watch runs")
	}
	mu.Lock()
	watchDown = false
	mu.Unlock()
	eventually(t, "watching again", watching(2))

	mu.Lock()
	defer mu.Unlock()
	want := []string{
		"nodes stale: " + refused.Error(), "nodes current: " + refused.Error(),
		"nodes stale: watch ended", "nodes stale: " + refused.Error(), "nodes current: " + refused.Error(),
	}
	if len(changes) != len(want) {
		t.Fatalf("changes %q, want %q", changes, want)
	}
	for i := range want {
		if changes[i] != want[i] {
			t.Fatalf("changes %q, want %q", changes, want)
		}
	}
	if s, _ := (*WatchHealth)(nil).Stale("nodes"); s {
		t.Fatal("a nil WatchHealth reports stale")
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
