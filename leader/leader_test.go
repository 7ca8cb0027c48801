package leader_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/leader"
	"github.com/egressnat/egressnat/test/apiserver"
	"go.uber.org/zap/zaptest"
)

// TestOneLeaderAndTakeover runs two candidates against a real API server:
// exactly one leads; when it stops, the other takes over within the lease
// duration.
func TestOneLeaderAndTakeover(t *testing.T) {
	if testing.Short() {
		t.Skip("needs kube-apiserver and etcd (skipped under -short)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	srv, err := apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	client, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	leading := map[string]bool{}
	terms := map[string]int64{}
	maxConcurrent := 0
	events := make(chan string, 10)
	run := func(ctx context.Context, id string) {
		err := leader.Run(ctx, leader.Config{
			Client: client, Namespace: "default", Name: "egressnat-test", Identity: id,
			LeaseDuration: 2 * time.Second, RenewDeadline: 1500 * time.Millisecond, RetryPeriod: 200 * time.Millisecond,
			Log: zaptest.NewLogger(t),
			OnLeading: func(ctx context.Context, term int64) {
				mu.Lock()
				leading[id] = true
				n := 0
				for _, l := range leading {
					if l {
						n++
					}
				}
				maxConcurrent = max(maxConcurrent, n)
				terms[id] = term
				mu.Unlock()
				events <- id
				<-ctx.Done()
				mu.Lock()
				leading[id] = false
				mu.Unlock()
			},
		})
		if err != nil {
			t.Error(err)
		}
	}
	ctxA, stopA := context.WithCancel(ctx)
	ctxB, stopB := context.WithCancel(ctx)
	defer stopB()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); run(ctxA, "a") }()
	first := <-events
	go func() { defer wg.Done(); run(ctxB, "b") }()
	time.Sleep(3 * time.Second) // b campaigns while a leads
	select {
	case id := <-events:
		t.Fatalf("%s became leader while %s led", id, first)
	default:
	}
	if first != "a" {
		t.Fatalf("first leader %s, want a (it started alone)", first)
	}
	start := time.Now()
	stopA() // a releases the lease on cancel
	select {
	case id := <-events:
		if id != "b" {
			t.Fatalf("new leader %s, want b", id)
		}
		t.Logf("takeover after %v", time.Since(start))
	case <-time.After(10 * time.Second):
		t.Fatal("b did not take over")
	}
	stopB()
	wg.Wait()
	if maxConcurrent != 1 {
		t.Fatalf("%d leaders at once", maxConcurrent)
	}
	// Agents trust the newest term's leader only: b's term is newer.
	if terms["b"] <= terms["a"] {
		t.Fatalf("terms a=%d b=%d: the new leader's term must be greater", terms["a"], terms["b"])
	}
}
