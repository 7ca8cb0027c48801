package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
)

// fence decides whether this node must give up its floating IPs because it
// is cut off: no operator replica has probed it for FenceAfter and the API
// server does not answer either. When the partition heals, the node holds
// nothing until a fresh read of the API confirms what it holds (the watch
// caches may still be stale).
type fence struct {
	cfg   Config
	log   *zap.Logger
	clock clock.WithTickerAndDelayedExecution
	// readyz asks the API server whether it is ready; an error means it
	// cannot be reached.
	readyz func(ctx context.Context) error
	// kick asks for a sync.
	kick func()
	// holding reports whether the node currently holds floating IPs.
	holding func() bool
	// releaseEarly drops the floating IPs when the fence rises before the
	// agent could compute its state (it started cut off).
	releaseEarly func(ctx context.Context)
	// event reports a fence rising (true) or lifting (false).
	event func(fenced bool, detail string)

	mu           sync.Mutex
	lastProbe    time.Time
	fenced       bool
	recoverUntil time.Time
	lastAPICheck time.Time
	apiReachable bool
	fencedSince  time.Time
}

func newFence(cfg Config, log *zap.Logger, clk clock.WithTickerAndDelayedExecution, kick func(), holding func() bool) *fence {
	return &fence{cfg: cfg, log: log, clock: clk, readyz: func(ctx context.Context) error {
		return cfg.Clients.Core.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
	}, kick: kick, holding: holding, lastProbe: clk.Now(), apiReachable: true}
}

// probed records a health probe from an operator replica.
func (f *fence) probed() {
	f.mu.Lock()
	f.lastProbe = f.clock.Now()
	f.mu.Unlock()
}

// serveProbes accepts the operators' health probes until ctx ends.
func (f *fence) serveProbes(ctx context.Context, l net.Listener) {
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Warn("accept health probe", zap.Error(err))
			continue
		}
		f.probed()
		c.Close()
	}
}

// watch re-evaluates the fence every tick until ctx ends.
func (f *fence) watch(ctx context.Context) {
	t := f.clock.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		f.evaluate(ctx)
	}
}

func (f *fence) evaluate(ctx context.Context) {
	f.mu.Lock()
	sinceProbe := f.clock.Since(f.lastProbe)
	fenced := f.fenced
	f.mu.Unlock()

	if sinceProbe <= f.cfg.FenceAfter {
		if fenced {
			f.lift("health probes are back")
		}
		return
	}
	// Only a node holding floating IPs needs to fence; others do not ask
	// the API server anything.
	if !fenced && !f.holding() {
		return
	}
	reachable := f.apiUp(ctx)
	switch {
	case !fenced && !reachable:
		f.mu.Lock()
		f.fenced, f.fencedSince = true, f.clock.Now()
		f.mu.Unlock()
		f.log.Warn("cut off from the operators and the API server: releasing floating IPs",
			zap.Duration("sinceProbe", sinceProbe))
		f.kick()
		if f.event != nil {
			f.event(true, fmt.Sprintf("no health probe for %v and the API server does not answer", sinceProbe.Round(time.Millisecond)))
		}
		if f.releaseEarly != nil {
			f.releaseEarly(ctx)
		}
	case fenced && reachable:
		f.lift("the API server answers again")
	}
}

func (f *fence) lift(why string) {
	f.mu.Lock()
	f.fenced = false
	f.recoverUntil = f.clock.Now().Add(f.cfg.RecoveryPeriod)
	fencedFor := f.clock.Since(f.fencedSince)
	f.mu.Unlock()
	f.log.Info("no longer cut off; holding floating IPs again only as the API confirms",
		zap.String("why", why), zap.Duration("fencedFor", fencedFor))
	if f.event != nil {
		f.event(false, fmt.Sprintf("%s after %v", why, fencedFor.Round(time.Millisecond)))
	}
	f.kick()
	// Once the recovery ends, the next sync holds what the caches say.
	f.clock.AfterFunc(f.cfg.RecoveryPeriod, f.kick)
}

// apiUp asks the API server's /readyz, at most every 300 ms.
func (f *fence) apiUp(ctx context.Context) bool {
	f.mu.Lock()
	if f.clock.Since(f.lastAPICheck) < 300*time.Millisecond {
		r := f.apiReachable
		f.mu.Unlock()
		return r
	}
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	err := f.readyz(ctx)
	f.mu.Lock()
	f.lastAPICheck, f.apiReachable = f.clock.Now(), err == nil
	f.mu.Unlock()
	return err == nil
}

// state reports whether the node is fenced, and whether it is recovering
// from a fence (holdings must be confirmed by a fresh read).
func (f *fence) state() (fenced, recovering bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fenced, f.clock.Now().Before(f.recoverUntil)
}

// restrict removes from st what this node may not hold: everything while
// fenced; while recovering, what a fresh read of the groups does not confirm.
// Policies whose egress IP the node gives up drop their traffic (fail
// closed) instead of leaving with the node IP.
func (f *fence) restrict(ctx context.Context, st selector.NodeState) selector.NodeState {
	fenced, recovering := f.state()
	if !fenced && !recovering {
		return st
	}
	confirmed := map[netip.Addr]bool{}
	if !fenced {
		var err error
		if confirmed, err = f.confirmedHoldings(ctx); err != nil {
			f.log.Warn("cannot confirm floating IPs; holding none", zap.Error(err))
			confirmed = map[netip.Addr]bool{}
		}
	}
	out := st
	out.FloatingIPs = nil
	for _, p := range st.FloatingIPs {
		if confirmed[p.Addr()] {
			out.FloatingIPs = append(out.FloatingIPs, p)
		}
	}
	out.Policies = make([]selector.PolicyState, len(st.Policies))
	for i, p := range st.Policies {
		if p.Mode == selector.ModeGateway && !confirmed[p.EgressIP] {
			p.Mode = selector.ModeDrop
		}
		out.Policies[i] = p
	}
	return out
}

// confirmedHoldings reads the groups from the API server (not the cache)
// and returns the floating IPs their status gives to this node.
func (f *fence) confirmedHoldings(ctx context.Context) (map[netip.Addr]bool, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	list, err := f.cfg.Clients.Dynamic.Resource(kube.GatewayGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list gateways: %w", err)
	}
	out := map[netip.Addr]bool{}
	for i := range list.Items {
		g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](&list.Items[i])
		if err != nil {
			return nil, err
		}
		for ipStr, node := range g.Status.FloatingIPs {
			if ip, err := netip.ParseAddr(ipStr); err == nil && node == f.cfg.Node {
				out[ip] = true
			}
		}
	}
	return out, nil
}
