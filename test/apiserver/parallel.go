package apiserver

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
)

// Parallel runs fn(ctx, 0..n-1) on workers goroutines, as tests that write
// many objects to the API server do, and fails t with the first error
// (the remaining indexes are then skipped).
func Parallel(t testing.TB, ctx context.Context, n, workers int, fn func(ctx context.Context, i int) error) {
	t.Helper()
	var next atomic.Int64
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(ctx, i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					next.Store(int64(n))
					return
				}
			}
		})
	}
	wg.Wait()
	if first != nil {
		t.Fatal(first)
	}
}
