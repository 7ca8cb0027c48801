package lab

import (
	"os"
	"os/exec"
	"testing"
)

// SkipUnlessRoot skips t under go test -short, and unless the process is
// root and the ip tool exists.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("lab: needs root and network namespaces (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("lab: needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("lab: needs the ip tool")
	}
}

// NewT builds a lab for a test: it skips as SkipUnlessRoot does, fails the
// test if the lab cannot be built, and registers a cleanup that prints the
// tail of every process log when the test failed and then closes the lab
// (also after t.Fatal or a panic in the test).
func NewT(t testing.TB, cfg Config) *Lab {
	t.Helper()
	SkipUnlessRoot(t)
	l, err := New(cfg)
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			l.DumpLogs(t.Logf)
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	return l
}

// DumpLogs prints the last 16 KiB of the log of every process the lab
// started.
func (l *Lab) DumpLogs(logf func(format string, args ...any)) {
	for _, p := range l.Procs() {
		logf("--- log of %v in %s (%s):\n%s", p.Args, p.NetNS, p.LogPath, p.tail(16<<10))
	}
}
