// Command devserver runs the test API server with the CRDs installed until
// interrupted and prints how to reach it: handy for trying kubectl by hand.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/egressnat/egressnat/test/apiserver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "devserver:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	s, err := apiserver.Start(ctx, apiserver.Options{})
	if err != nil {
		return err
	}
	defer s.Stop()
	root, err := apiserver.RepoRoot()
	if err != nil {
		return err
	}
	if err := s.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		return err
	}
	fmt.Printf("export KUBECONFIG=%s\nalias kubectl=%s\n", s.Kubeconfig, s.KubectlPath)
	<-ctx.Done()
	return nil
}
