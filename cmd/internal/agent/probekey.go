package agent

import (
	"context"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/probe"
	"go.uber.org/zap"
)

// keepProbeKey loads the probe key from its Secret (the operator creates
// it), retrying every 200 ms until it loads, then reloads it every 30 s (a
// rotated key takes effect without a restart). Without a key no probe
// counts: a node holding floating IPs that cannot reach the API server
// fences.
func (a *agent) keepProbeKey(ctx context.Context) {
	name := a.cfg.ProbeSecret
	if name == "" {
		name = probe.SecretName
	}
	for {
		wait := 30 * time.Second
		key, _, err := kube.ProbeKey(ctx, a.cfg.Clients.Core, a.cfg.Namespace, name, false)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if a.fence.key.Load() == nil {
				wait = 200 * time.Millisecond // the operator creates it at its start
			}
			a.log.Warn("load the probe key", zap.Error(err))
		default:
			a.fence.key.Store(&key)
		}
		select {
		case <-ctx.Done():
			return
		case <-a.clock.After(wait):
		}
	}
}
