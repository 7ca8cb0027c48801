// Command egressnatctl is the operators' tool for egressnat. Installed as
// kubectl-egressnat on the PATH it is also the kubectl plugin
// `kubectl egressnat`. See `egressnatctl help` and docs/troubleshooting.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/egressnat/egressnat/cmd/internal/ctl"
)

func main() {
	prog := filepath.Base(os.Args[0])
	if strings.HasPrefix(prog, "kubectl-") {
		prog = "kubectl " + strings.ReplaceAll(strings.TrimPrefix(prog, "kubectl-"), "_", "-")
	} else {
		prog = "egressnatctl"
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := ctl.Main(ctx, prog, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
