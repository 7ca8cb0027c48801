package version

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// TestStamp: the three binaries built with the Makefile's -ldflags print the
// stamped version with --version and exit 0. It builds them: not under
// -short.
func TestStamp(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin := t.TempDir()
	const pkg = "github.com/egressnat/egressnat/cmd/internal/version"
	ldflags := "-X " + pkg + ".Version=v9.8.7 -X " + pkg + ".Commit=abc1234"
	build := exec.Command("go", "build", "-ldflags", ldflags, "-o", bin+"/",
		"github.com/egressnat/egressnat/cmd/egressnat-agent", "github.com/egressnat/egressnat/cmd/egressnat-operator",
		"github.com/egressnat/egressnat/cmd/egressnatctl")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, name := range []string{"egressnat-agent", "egressnat-operator", "egressnatctl"} {
		out, err := exec.Command(filepath.Join(bin, name), "--version").CombinedOutput()
		want := name + " v9.8.7 (commit abc1234, " + runtime.Version() + ")\n"
		if err != nil || string(out) != want {
			t.Errorf("%s --version: %v, %q; want %q", name, err, out, want)
		}
	}
}
