package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
	"k8s.io/utils/clock"
)

// fence decides whether this node must give up its floating IPs because it
// is cut off: the operator leader has not probed it for FenceAfter and the
// API server does not answer either. Only the current leader's
// authenticated probes count (package probe): a pod, a scanner or a
// standby replica that still reaches the node proves nothing. When the
// partition heals, the node holds only what a fresh read of the API
// confirms, until its watch caches agree with such a read.
type fence struct {
	cfg   Config
	log   *zap.Logger
	clock clock.WithTickerAndDelayedExecution
	// readyz asks the API server whether it is ready; an error means it
	// cannot be reached.
	readyz func(ctx context.Context) error
	// resetConns drops the API connections after a failed check, so that
	// the next request dials afresh instead of waiting on a dead one.
	resetConns func()
	// kick asks for a sync.
	kick func()
	// holding reports whether the node currently holds floating IPs.
	holding func() bool
	// release gives the floating IPs up at once, through the dataplane's
	// fast path (not behind a sync and its backoff).
	release func(ctx context.Context)
	// cached returns the floating IPs the watch cache's group statuses
	// give to this node.
	cached func() map[netip.Addr]bool
	// event reports a fence rising (true) or lifting (false).
	event func(fenced bool, detail string)
	// readGroups reads the groups from the API server, not the cache
	// (listGroups; tests replace it).
	readGroups func(ctx context.Context) ([]*v1.NetworkGatewayGroup, error)
	// beat is the agent's heartbeat, sent in probe replies.
	beat func() uint64

	key      atomic.Pointer[[]byte]
	verifier probe.Verifier

	mu           sync.Mutex
	lastProbe    time.Time
	fenced       bool
	recovering   bool
	lastKick     time.Time
	lastAPICheck time.Time
	apiReachable bool
	fencedSince  time.Time
	lastTick     time.Time // the last watch tick evaluated
}

func newFence(cfg Config, log *zap.Logger, clk clock.WithTickerAndDelayedExecution, kick func(), holding func() bool) *fence {
	return &fence{cfg: cfg, log: log, clock: clk, readyz: func(ctx context.Context) error {
		return cfg.Clients.Core.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
	}, resetConns: cfg.Clients.ResetConnections, kick: kick, holding: holding, lastProbe: clk.Now(), apiReachable: true,
		beat:       func() uint64 { return 0 },
		readGroups: func(ctx context.Context) ([]*v1.NetworkGatewayGroup, error) { return listGroups(ctx, cfg.Clients) }}
}

// sinceProbe returns how long ago the last probe that counts arrived.
func (f *fence) sinceProbe() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clock.Since(f.lastProbe)
}

// probed records a probe that counts: the current leader's.
func (f *fence) probed() {
	f.mu.Lock()
	f.lastProbe = f.clock.Now()
	f.mu.Unlock()
}

// serveProbes answers the operators' probes until ctx ends.
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
		go f.handleProbe(c)
	}
}

// handleProbe reads one probe from c. A valid probe is answered with the
// heartbeat, and holds the fence down when it is the current leader's;
// anything else is closed without a word.
func (f *fence) handleProbe(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	line, err := bufio.NewReaderSize(io.LimitReader(c, probe.MaxLine), probe.MaxLine).ReadString('\n')
	if err != nil {
		return
	}
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return
	}
	k := f.key.Load()
	if k == nil {
		// No key yet (the agent just started): say so; the operator
		// counts it as a refused connection.
		_, _ = io.WriteString(c, probe.NoKey)
		return
	}
	p, err := probe.Decode(*k, line)
	if err != nil {
		f.log.Debug("probe refused", zap.String("from", c.RemoteAddr().String()), zap.Error(err))
		return
	}
	laddr, _ := netip.AddrFromSlice(local.IP)
	v, err := f.verifier.Accept(p, laddr)
	if v == Rejected {
		f.log.Debug("probe refused", zap.String("from", c.RemoteAddr().String()), zap.Error(err))
		return
	}
	if err != nil {
		f.log.Debug("probe does not count", zap.String("from", c.RemoteAddr().String()), zap.Error(err))
	}
	if v == Counts {
		f.probed()
	}
	_, _ = c.Write(probe.EncodeReply(*k, p, f.beat()))
}

// Verdicts of probe.Verifier, named here for readability.
const (
	Rejected = probe.Rejected
	Counts   = probe.Counts
)

// stallGap: a gap this long between two fence ticks (100 ms apart) means
// the agent itself did not run (stopped, starved of CPU).
const stallGap = time.Second

// watch re-evaluates the fence every tick until ctx ends.
func (f *fence) watch(ctx context.Context) {
	t := f.clock.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	f.mu.Lock()
	f.lastTick = f.clock.Now()
	f.mu.Unlock()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		f.checkStall()
		now := f.clock.Now()
		f.evaluate(ctx)
		f.mu.Lock()
		f.lastTick = now
		f.mu.Unlock()
	}
}

// checkStall reports a stall when the fence's ticker has not run for
// stallGap. Whatever runs first after the agent resumes calls it (the
// fence's ticker, the ARP renewal, the sync), so that nothing acts on the
// old state before the stall is known.
func (f *fence) checkStall() {
	f.mu.Lock()
	now := f.clock.Now()
	gap := now.Sub(f.lastTick)
	if f.lastTick.IsZero() || gap < stallGap {
		f.mu.Unlock()
		return
	}
	f.lastTick = now // reported once
	f.mu.Unlock()
	f.stalled(gap)
}

// stalled starts the observation of probes afresh after the agent itself
// did not run for gap: the probes it missed meanwhile say nothing about the
// network (the kernel kept answering ARP for its addresses all along), and
// fencing at once would drop every IP it holds; if it is cut off, it
// fences FenceAfter from now.
//
// Its floating IPs may have moved meanwhile (the operator saw it silent,
// its ARP lease ran out): it recovers as after a heal, holding (and
// renewing the ARP lease of) only what a fresh read of the API confirms,
// until its caches agree with such a read.
func (f *fence) stalled(gap time.Duration) {
	f.mu.Lock()
	now := f.clock.Now()
	if now.After(f.lastProbe) {
		f.lastProbe = now
	}
	if !f.fenced {
		f.recovering, f.lastKick = true, now
	}
	f.mu.Unlock()
	f.log.Warn("the agent did not run for a while; observing the operator leader's probes afresh and confirming its floating IPs with the API",
		zap.Duration("gap", gap))
	f.kick()
}

// leaseLapsed starts a recovery when the leader's probes come back after
// the node's ARP lease ran out for want of them: the leader moves a silent
// node's IPs once its lease has surely run out, so they may be elsewhere
// now. The node renews the lease (answers ARP) again only for what a fresh
// read of the API confirms, as after a heal; otherwise it would answer
// for an IP its new holder answers for too, until its watch caught up.
func (f *fence) leaseLapsed() {
	f.mu.Lock()
	if !f.fenced {
		f.recovering, f.lastKick = true, f.clock.Now()
	}
	f.mu.Unlock()
	f.log.Warn("the ARP lease ran out without the operator leader's probes; confirming the floating IPs with the API before answering ARP again")
	f.kick()
}

func (f *fence) evaluate(ctx context.Context) {
	f.mu.Lock()
	sinceProbe := f.clock.Since(f.lastProbe)
	fenced, recovering := f.fenced, f.recovering
	// While recovering, sync every 500 ms: each sync confirms the
	// holdings against a fresh read, until the caches agree.
	kick := recovering && f.clock.Since(f.lastKick) >= 500*time.Millisecond
	if kick {
		f.lastKick = f.clock.Now()
	}
	f.mu.Unlock()
	if kick {
		f.kick()
	}

	if sinceProbe <= f.cfg.FenceAfter {
		if fenced {
			f.lift("the operator leader's probes are back")
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
		f.fenced, f.recovering, f.fencedSince = true, false, f.clock.Now()
		f.mu.Unlock()
		f.log.Warn("cut off from the operator leader and the API server: releasing floating IPs",
			zap.Duration("sinceProbe", sinceProbe))
		if f.release != nil {
			f.release(ctx)
		}
		f.kick()
		if f.event != nil {
			f.event(true, fmt.Sprintf("no health probe for %v and the API server does not answer", sinceProbe.Round(time.Millisecond)))
		}
	case fenced && reachable:
		f.lift("the API server answers again")
	}
}

func (f *fence) lift(why string) {
	f.mu.Lock()
	f.fenced, f.recovering, f.lastKick = false, true, f.clock.Now()
	fencedFor := f.clock.Since(f.fencedSince)
	f.mu.Unlock()
	f.log.Info("no longer cut off; holding floating IPs again only as a fresh read of the API confirms",
		zap.String("why", why), zap.Duration("fencedFor", fencedFor))
	if f.event != nil {
		f.event(false, fmt.Sprintf("%s after %v", why, fencedFor.Round(time.Millisecond)))
	}
	f.kick()
}

// apiUp asks the API server's /readyz, at most every 300 ms. A failed
// check drops the client's connections: after a partition, a connection
// that died with it must not hold up the first requests after the heal.
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
	if err != nil && f.resetConns != nil {
		f.resetConns()
	}
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
	return f.fenced, f.recovering
}

// restrict removes from st what this node may not hold: everything while
// fenced; while recovering, what a fresh read of the groups does not
// confirm. Recovery ends when the watch cache gives this node exactly the
// floating IPs a fresh read gives it (the caches caught up with the read).
// Policies whose egress IP the node gives up drop their traffic (fail
// closed) instead of leaving with the node IP.
func (f *fence) restrict(ctx context.Context, st selector.NodeState) selector.NodeState {
	f.checkStall()
	fenced, recovering := f.state()
	if !fenced && !recovering {
		return st
	}
	confirmed := map[netip.Addr]bool{}
	if !fenced {
		fresh, err := f.confirmedHoldings(ctx)
		switch {
		case err != nil:
			f.log.Warn("cannot confirm floating IPs; holding none", zap.Error(err))
			if f.resetConns != nil {
				f.resetConns()
			}
		case f.cached != nil && maps.Equal(fresh, f.cached()):
			f.mu.Lock()
			done := f.recovering && !f.fenced
			f.recovering = false
			f.mu.Unlock()
			if done {
				f.log.Info("watch caches agree with a fresh read of the API; recovery over",
					zap.Strings("ips", addrList(slices.SortedFunc(maps.Keys(fresh), netip.Addr.Compare))))
			}
			return st
		default:
			confirmed = fresh
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
	groups, err := f.readGroups(ctx)
	if err != nil {
		return nil, err
	}
	return holdingsOf(groups, f.cfg.Node), nil
}

// listGroups reads every NetworkGatewayGroup from the API server (not the
// cache), giving up after a second.
func listGroups(ctx context.Context, clients *kube.Clients) ([]*v1.NetworkGatewayGroup, error) {
	return kube.ListFresh[v1.NetworkGatewayGroup](ctx, clients, kube.GatewayGVR)
}

// holdingsOf returns the floating IPs the groups' statuses give to node.
func holdingsOf(groups []*v1.NetworkGatewayGroup, node string) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	for _, g := range groups {
		for ipStr, n := range g.Status.FloatingIPs {
			if ip, err := netip.ParseAddr(ipStr); err == nil && n == node {
				out[ip.Unmap()] = true
			}
		}
	}
	return out
}
