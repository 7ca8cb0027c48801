package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/agent"
	"github.com/egressnat/egressnat/nft"
	"go.uber.org/zap"
)

// runCleanup is --cleanup: what an agent does when it stops during an
// uninstall (agent.Uninstall), by hand, on a node whose agent is gone:
// run as root on the node, e.g. the copy the agent kept for the boot unit
// (/var/lib/egressnat/egressnat-agent --cleanup). The uplink is the flag's,
// else the one saved in the state directory, else the default route's.
func runCleanup(log *zap.Logger, cfg bootGuardConfig, procSysNet, bpfDir string) error {
	up := cfg.uplink
	if up == "" && cfg.stateDir != "" {
		saved, err := agent.SavedUplink(cfg.stateDir)
		if err != nil {
			return err
		}
		up = saved
	}
	if up == "" {
		var err error
		if up, err = nft.DefaultRouteLink(); err != nil {
			return fmt.Errorf("find the uplink (its floating IPs are removed): %w", err)
		}
	}
	dp, err := cfg.dataplane(log, up)
	if err != nil {
		return err
	}
	defer dp.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	log.Info("cleanup: removing everything egressnat put on this node", zap.String("uplink", up),
		zap.String("stateDir", cfg.stateDir), zap.String("procSysNet", procSysNet))
	if err := agent.Uninstall(ctx, agent.UninstallConfig{Dataplane: dp, StateDir: cfg.stateDir, ProcSysNet: procSysNet, BPFDir: bpfDir, Log: log}); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	log.Info("cleanup done")
	return nil
}
