package kube

import (
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestAPIConnections: the clients ping their HTTP/2 connections after 1 s
// without a frame and give a ping 1 s (unless the environment says
// otherwise), and ResetConnections closes every connection to the API
// server, so that a connection that died in a partition is not reused.
func TestAPIConnections(t *testing.T) {
	for _, k := range []string{http2ReadIdleTimeout, http2PingTimeout} {
		t.Setenv(k, "") // restored after the test
		os.Unsetenv(k)
	}
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"major":"1","minor":"37","gitVersion":"v1.37.2"}`))
	}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		switch s {
		case http.StateNew:
			open[c] = true
		case http.StateClosed, http.StateHijacked:
			delete(open, c)
		}
	}
	srv.Start()
	defer srv.Close()
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+srv.URL+`"}}]
users: [{name: u, user: {}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	clients, err := NewClients(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{http2ReadIdleTimeout: "1", http2PingTimeout: "1"} {
		if got := os.Getenv(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if _, err := clients.Core.Discovery().ServerVersion(); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(open)
	}
	if count() == 0 {
		t.Fatal("no connection to the API server after a request")
	}
	clients.ResetConnections()
	deadline := time.Now().Add(5 * time.Second)
	for count() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open after ResetConnections", count())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The next request dials afresh.
	if _, err := clients.Core.Discovery().ServerVersion(); err != nil {
		t.Fatalf("request after the reset: %v", err)
	}
	// A value set by the environment wins.
	t.Setenv(http2PingTimeout, "7")
	if _, err := NewClients(kubeconfig); err != nil {
		t.Fatal(err)
	}
	if got := os.Getenv(http2PingTimeout); got != "7" {
		t.Errorf("%s = %q after NewClients, want the environment's 7", http2PingTimeout, got)
	}
}
