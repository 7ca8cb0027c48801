package operator

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// ProbeConfig tunes the health probes.
type ProbeConfig struct {
	// Port of the agents' health listener.
	Port int
	// Interval between probes of a node holding floating IPs; SlowInterval
	// for the others (they only need to be known healthy when chosen).
	Interval, SlowInterval time.Duration
	// Timeout of one probe; Misses consecutive silent probes make a node Down.
	Timeout time.Duration
	Misses  int
}

// DefaultProbeConfig detects a dead holder in about 300 to 450 ms.
var DefaultProbeConfig = ProbeConfig{Port: 9797, Interval: 100 * time.Millisecond, SlowInterval: time.Second, Timeout: 100 * time.Millisecond, Misses: 3}

// probeTarget is one node to probe.
type probeTarget struct {
	name string
	ip   netip.Addr
	fast bool
}

type probeState struct {
	ip        netip.Addr
	known     bool // at least one probe finished
	healthy   bool
	misses    int
	lastAlive time.Time
	next      time.Time
	inFlight  bool
}

// prober probes every node's agent health port over the node network. Every
// operator replica runs one, leader or not: the agents count the probes of
// any replica as proof that they are not cut off (self-fencing).
type prober struct {
	cfg      ProbeConfig
	log      *zap.Logger
	targets  func() []probeTarget
	onChange func()
	now      func() time.Time
	dial     func(ctx context.Context, ip netip.Addr, port int, timeout time.Duration) bool

	mu    sync.Mutex
	nodes map[string]*probeState
}

func newProber(cfg ProbeConfig, log *zap.Logger, targets func() []probeTarget, onChange func()) *prober {
	return &prober{cfg: cfg, log: log, targets: targets, onChange: onChange, now: time.Now, dial: dialProbe, nodes: map[string]*probeState{}}
}

// health returns whether the node answers probes and when it last did.
func (p *prober) health(node string) (healthy bool, lastAlive time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.nodes[node]
	if !ok {
		return false, time.Time{}
	}
	return s.healthy, s.lastAlive
}

// run probes until ctx ends.
func (p *prober) run(ctx context.Context) {
	tick := time.NewTicker(p.cfg.Interval / 2)
	defer tick.Stop()
	for {
		p.round(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// round starts the probes that are due.
func (p *prober) round(ctx context.Context) {
	now := p.now()
	targets := p.targets()
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := make(map[string]bool, len(targets))
	for _, t := range targets {
		seen[t.name] = true
		s, ok := p.nodes[t.name]
		if !ok || s.ip != t.ip {
			s = &probeState{ip: t.ip}
			p.nodes[t.name] = s
		}
		if s.inFlight || now.Before(s.next) {
			continue
		}
		interval := p.cfg.SlowInterval
		if t.fast || !s.healthy {
			interval = p.cfg.Interval
		}
		s.next = now.Add(interval)
		s.inFlight = true
		go p.probe(ctx, t.name, t.ip)
	}
	for name := range p.nodes {
		if !seen[name] {
			delete(p.nodes, name)
		}
	}
}

func (p *prober) probe(ctx context.Context, node string, ip netip.Addr) {
	alive := p.dial(ctx, ip, p.cfg.Port, p.cfg.Timeout)
	p.mu.Lock()
	s, ok := p.nodes[node]
	if !ok || s.ip != ip {
		p.mu.Unlock()
		return
	}
	s.inFlight = false
	wasHealthy, wasKnown := s.healthy, s.known
	s.known = true
	if alive {
		s.misses, s.healthy, s.lastAlive = 0, true, p.now()
	} else if s.misses++; s.misses >= p.cfg.Misses {
		s.healthy = false
	}
	changed := s.healthy != wasHealthy || !wasKnown
	healthy, misses := s.healthy, s.misses
	p.mu.Unlock()
	if changed && ctx.Err() == nil {
		if healthy {
			p.log.Info("node answers health probes", zap.String("node", node), zap.String("ip", ip.String()))
		} else {
			p.log.Warn("node stopped answering health probes", zap.String("node", node), zap.String("ip", ip.String()), zap.Int("misses", misses))
		}
		p.onChange()
	}
}

// dialProbe opens a TCP connection to the node's health port. An accepted
// connection and a refused one both prove the node and the path alive: the
// kernel refuses while the agent restarts. Only silence is a miss.
func dialProbe(ctx context.Context, ip netip.Addr, port int, timeout time.Duration) bool {
	d := net.Dialer{Timeout: timeout}
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip.String(), strconv.Itoa(port)))
	if err == nil {
		c.Close()
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}
