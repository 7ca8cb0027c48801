package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestExitsOnSignal: the built binary keeps running until SIGTERM (or
// SIGINT) and then exits 0 at once.
func TestExitsOnSignal(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "pause")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(bin)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			t.Fatalf("pause exited on its own: %v", err)
		case <-time.After(300 * time.Millisecond):
		}
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%v: pause exited with %v, want 0", sig, err)
			}
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("%v: pause still running after 5s", sig)
		}
	}
	out, err := exec.Command(bin, "-v").Output()
	if err != nil || string(out) != "pause egressnat\n" {
		t.Errorf("pause -v: %q, %v", out, err)
	}
}

// TestReap: reap collects exited children (the zombies PID 1 inherits).
func TestReap(t *testing.T) {
	var pids []int
	for range 3 {
		cmd := exec.Command("/bin/sh", "-c", "exit 3")
		if err := cmd.Start(); err != nil {
			t.Skip("no /bin/sh:", err)
		}
		pids = append(pids, cmd.Process.Pid)
	}
	deadline := time.Now().Add(5 * time.Second)
	reaped := 0
	for reaped < len(pids) && time.Now().Before(deadline) {
		reaped += reap()
		time.Sleep(10 * time.Millisecond)
	}
	if reaped != len(pids) {
		t.Fatalf("reaped %d children, want %d", reaped, len(pids))
	}
	for _, pid := range pids {
		// Reaped: the pid is no longer a child (no zombie left behind).
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil); !errors.Is(err, syscall.ECHILD) {
			t.Errorf("pid %d: wait4 = %v, want ECHILD", pid, err)
		}
	}
}
