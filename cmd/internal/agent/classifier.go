package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/egressnat/egressnat/cmd/internal/metrics"
	"github.com/egressnat/egressnat/nft/bpf"
)

// Attacher is the eBPF classifier's program as the agent keeps it
// attached (a *bpf.Classifier).
type Attacher interface {
	Reconcile(want map[int]bool) (attached, detached int, err error)
	Entries() (map[netip.Addr]bpf.Class, error)
}

// ClassifierConfig configures a PodClassifier.
type ClassifierConfig struct {
	Program Attacher
	// Uplink is never a pod-facing interface.
	Uplink string
	// Period of the check that re-attaches the program where something
	// else detached it (drift); zero: a minute.
	Period  time.Duration
	Metrics *metrics.Agent
	Log     *zap.Logger
	// Routes and Watch read the main table and follow link and route
	// changes (bpf.MainRoutes, bpf.Watch); nil: those.
	Routes func() ([]bpf.Route, error)
	Watch  func(ctx context.Context, kick func()) error
	// UplinkIndex returns the uplink's index; nil: netlink.
	UplinkIndex func(name string) (int, error)
	// Ports replaces the bridges among the interfaces by their ports
	// (bpf.BridgePorts: with br_netfilter, a bridge's own tc ingress runs
	// after prerouting); nil: that.
	Ports func(ifaces map[int]bool, exclude int) (map[int]bool, error)
}

// PodClassifier keeps the eBPF classifier attached to the interfaces that
// reach this node's known pods (their routes: each pod's veth, or the
// ports of the CNI bridge) as pods come and go (SetPods, after each Apply) and interfaces
// and routes change (a netlink subscription), and detached from the ones
// that no longer do. A known pod whose interface the program is not
// attached to yet is held by the table's hold rule (fail closed), never
// let through unclassified.
type PodClassifier struct {
	cfg  ClassifierConfig
	pods atomic.Pointer[[]netip.Addr]
	kick chan struct{}
}

// NewPodClassifier returns a PodClassifier; Run does the work.
func NewPodClassifier(cfg ClassifierConfig) *PodClassifier {
	if cfg.Period <= 0 {
		cfg.Period = time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Routes == nil {
		cfg.Routes = bpf.MainRoutes
	}
	if cfg.Watch == nil {
		cfg.Watch = bpf.Watch
	}
	if cfg.Ports == nil {
		cfg.Ports = bpf.BridgePorts
	}
	if cfg.UplinkIndex == nil {
		cfg.UplinkIndex = func(name string) (int, error) {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return 0, err
			}
			return l.Attrs().Index, nil
		}
	}
	return &PodClassifier{cfg: cfg, kick: make(chan struct{}, 1)}
}

// SetPods sets this node's known pods and wakes Run when they changed.
func (p *PodClassifier) SetPods(pods []netip.Addr) {
	if old := p.pods.Load(); old != nil && slices.Equal(*old, pods) {
		return
	}
	c := slices.Clone(pods)
	p.pods.Store(&c)
	p.Kick()
}

// Kick wakes Run.
func (p *PodClassifier) Kick() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Run attaches and detaches until ctx is done. It must run on a thread
// in the node's network namespace (the agent's).
func (p *PodClassifier) Run(ctx context.Context) error {
	if err := p.cfg.Watch(ctx, p.Kick); err != nil {
		return fmt.Errorf("watch links and routes: %w", err)
	}
	tick := time.NewTicker(p.cfg.Period)
	defer tick.Stop()
	for {
		periodic := false
		select {
		case <-ctx.Done():
			return nil
		case <-p.kick:
		case <-tick.C:
			periodic = true
		}
		if p.pods.Load() == nil {
			continue // no Apply yet: nothing is known
		}
		if err := p.reconcile(periodic); err != nil {
			p.cfg.Log.Warn("eBPF classifier: attach failed; its pods are held until it succeeds", zap.Error(err))
			// Retried on the next change or tick, and soon.
			time.AfterFunc(time.Second, p.Kick)
		}
	}
}

// reconcile attaches the program to the pod-facing interfaces and detaches
// it from the others. Attachments repaired by the periodic check count as
// drift.
func (p *PodClassifier) reconcile(periodic bool) error {
	routes, err := p.cfg.Routes()
	if err != nil {
		return fmt.Errorf("read routes: %w", err)
	}
	up, err := p.cfg.UplinkIndex(p.cfg.Uplink)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", p.cfg.Uplink, err)
	}
	want, err := p.cfg.Ports(bpf.PodInterfaces(routes, *p.pods.Load(), up), up)
	if err != nil {
		return fmt.Errorf("bridge ports: %w", err)
	}
	attached, detached, err := p.cfg.Program.Reconcile(want)
	if attached+detached > 0 {
		p.cfg.Log.Info("eBPF classifier attachments changed", zap.Int("attached", attached), zap.Int("detached", detached),
			zap.Int("interfaces", len(want)))
	}
	if periodic && attached > 0 {
		p.cfg.Log.Warn("eBPF classifier was detached outside egressnat: attached again", zap.Int("interfaces", attached))
		if p.cfg.Metrics != nil {
			p.cfg.Metrics.Drift.Inc()
		}
	}
	if p.cfg.Metrics != nil {
		p.cfg.Metrics.ClassifierInterfaces.Set(float64(len(want)))
		if periodic {
			if e, err := p.cfg.Program.Entries(); err == nil {
				p.cfg.Metrics.ClassifierEntries.Set(float64(len(e)))
			}
		}
	}
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	return nil
}

// removeClassifier detaches and unpins the eBPF classifier pinned under
// dir, if there is one. It reports whether there was.
func removeClassifier(dir string) (bool, error) {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err := bpf.Remove(dir); err != nil {
		return true, err
	}
	return true, nil
}

// ClassifierLeftovers, with the nftables backend, removes what an earlier
// agent of the eBPF backend pinned under Dir, once the first Apply of this
// one succeeded (before it, the table still dispatches on the classes the
// program writes).
type ClassifierLeftovers struct {
	Dir  string
	Log  *zap.Logger
	done atomic.Bool
}

// SetPods is called after each successful Apply.
func (c *ClassifierLeftovers) SetPods([]netip.Addr) {
	if c.done.Swap(true) {
		return
	}
	removed, err := removeClassifier(c.Dir)
	switch {
	case err != nil:
		c.Log.Warn("nft classifier: could not remove the eBPF classifier an earlier agent left", zap.String("dir", c.Dir), zap.Error(err))
		c.done.Store(false) // again after the next Apply
	case removed:
		c.Log.Info("nft classifier: the eBPF classifier an earlier agent left is detached and unpinned", zap.String("dir", c.Dir))
	}
}
