package agent

import (
	"context"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
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
	kube.KeepProbeKey(ctx, kube.ProbeKeyLoop{
		Client: a.cfg.Clients.Core, Namespace: a.cfg.Namespace, Name: name,
		// The operator creates it at its start; a loaded key serves
		// until the next reload.
		Retry: 200 * time.Millisecond, RetryWithKey: 30 * time.Second,
		Loaded: func(key []byte, _ bool) { a.fence.key.Store(&key) },
		Failed: func(err error) { a.log.Warn("load the probe key", zap.Error(err)) },
		Clock:  a.clock,
	})
}
