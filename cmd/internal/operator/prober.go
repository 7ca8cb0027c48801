package operator

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/leader/probe"
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
	// RefusedGrace: a refused connection (the node's kernel answers, its
	// agent does not listen: it restarts) keeps the node Up for this long
	// after its agent last answered, no longer.
	RefusedGrace time.Duration
	// HeartbeatTimeout: an agent whose heartbeat (it advances only while
	// its sync loop makes progress) has not moved for this long is Down,
	// even though it answers.
	HeartbeatTimeout time.Duration
}

// DefaultProbeConfig detects a dead holder in about 300 to 450 ms, a dead
// agent on a live node in 5 s, a stuck agent in 10 s.
var DefaultProbeConfig = ProbeConfig{Port: 9797, Interval: 100 * time.Millisecond, SlowInterval: time.Second,
	Timeout: 100 * time.Millisecond, Misses: 3, RefusedGrace: 5 * time.Second, HeartbeatTimeout: 10 * time.Second}

func (c *ProbeConfig) defaults() {
	d := DefaultProbeConfig
	if c.Port == 0 {
		*c = d
		return
	}
	if c.RefusedGrace == 0 {
		c.RefusedGrace = d.RefusedGrace
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = d.HeartbeatTimeout
	}
}

// probeTarget is one node to probe.
type probeTarget struct {
	name string
	ip   netip.Addr
	fast bool
}

// answer is how a node answered one probe.
type answer int

const (
	silent   answer = iota // nothing within the timeout, or an unauthenticated reply
	refused                // the node's kernel refused the connection
	answered               // the agent answered with a valid reply
	// late: silent, but the probe took far longer than its timeout: this
	// replica did not run in time (CPU starvation), and the agent's reply
	// may have been waiting unread. It says nothing about the node: no
	// miss, no answer.
	late
)

type probeState struct {
	ip      netip.Addr
	known   bool // at least one probe finished
	healthy bool
	misses  int
	// since: when this replica started probing the node; lastAlive: the
	// agent's last valid answer; beat, beatAt: its heartbeat and when it
	// last moved.
	since, lastAlive, beatAt time.Time
	beat                     uint64
	why                      string
	next                     time.Time
	inFlight                 bool
	// urgent: probed at the next round, and its answer asks for a
	// reconcile (the operator waits on it to choose a holder).
	urgent bool
	// fast: probed at the fast interval (a holder or a standby).
	fast bool
}

// sender says what this replica signs its probes as: the key, its role
// (leader or standby), identity and term. ok is false while it has no key.
type sender func() (key []byte, role, identity string, term int64, ok bool)

// prober probes every node's agent over the node network with
// authenticated probes (package probe). Every operator replica runs one,
// leader or not, so that a new leader knows who is healthy; the agents
// count only the leader's probes as proof that they are not cut off
// (self-fencing).
type prober struct {
	cfg      ProbeConfig
	log      *zap.Logger
	targets  func() []probeTarget
	onChange func()
	now      func() time.Time
	sender   sender
	dial     func(ctx context.Context, ip netip.Addr, port int, timeout time.Duration, p probe.Probe, key []byte) (answer, uint64)

	counterMu sync.Mutex
	counter   uint64

	mu    sync.Mutex
	nodes map[string]*probeState
}

func newProber(cfg ProbeConfig, log *zap.Logger, targets func() []probeTarget, onChange func()) *prober {
	cfg.defaults()
	return &prober{cfg: cfg, log: log, targets: targets, onChange: onChange, now: time.Now, dial: dialProbe, nodes: map[string]*probeState{}}
}

// health returns whether the node is healthy and when its agent last
// answered.
func (p *prober) health(node string) (healthy bool, lastAlive time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.nodes[node]
	if !ok {
		return false, time.Time{}
	}
	return s.healthy, s.lastAlive
}

// suspect reports whether the node is probed at the slow interval and its
// last probe went unanswered (it is not Down yet: that takes Misses
// seconds); meanwhile it is not given a new floating IP. A node probed at
// the fast interval is Down within Misses intervals anyway: one missed
// probe (a timeout under load) does not hold it back.
func (p *prober) suspect(node string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.nodes[node]
	return ok && s.misses > 0 && !s.fast
}

// hurry probes the node at the next round, and asks for a reconcile when
// it answers (a node probed at the slow interval, about to be chosen).
func (p *prober) hurry(node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s, ok := p.nodes[node]; ok && !s.urgent {
		s.urgent, s.next = true, time.Time{}
	}
}

// known reports whether the probes reached a conclusion about the node
// (an answer, a refusal, or Misses silent probes in a row): a replica that
// just started knows nothing of the nodes yet.
func (p *prober) known(node string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.nodes[node]
	return ok && s.known
}

// silentSince returns, for a node Down because its probes went
// unanswered, when its agent last answered; zero otherwise (healthy, or
// Down for another reason: a refusing or stuck agent).
func (p *prober) silentSince(node string) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.nodes[node]
	if !ok || s.healthy || s.misses < p.cfg.Misses {
		return time.Time{}
	}
	return s.lastAlive
}

// nextCounter returns a counter above every one this process sent: it
// starts at the wall clock in nanoseconds, so that a restarted replica does
// not reuse a counter an agent has seen.
func (p *prober) nextCounter() uint64 {
	p.counterMu.Lock()
	defer p.counterMu.Unlock()
	if n := uint64(time.Now().UnixNano()); n > p.counter {
		p.counter = n
	} else {
		p.counter++
	}
	return p.counter
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
			s = &probeState{ip: t.ip, since: now}
			p.nodes[t.name] = s
		}
		if t.fast && !s.fast && s.next.After(now.Add(p.cfg.Interval)) {
			// It just became a holder (or a standby): probe it at the
			// fast interval from now, not at the end of its slow one (a
			// failure in that second would be found a second late).
			s.next = now
		}
		s.fast = t.fast
		if s.inFlight || now.Before(s.next) {
			continue
		}
		interval := p.cfg.SlowInterval
		if t.fast || !s.healthy || s.urgent {
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

// lateSlack: a silent probe that took longer than its timeout plus this
// was not judged in time by this replica (see late).
const lateSlack = 50 * time.Millisecond

// probe sends one probe and records the answer.
func (p *prober) probe(ctx context.Context, node string, ip netip.Addr) {
	a, beat := silent, uint64(0)
	if p.sender != nil {
		if key, role, id, term, ok := p.sender(); ok {
			pr := probe.Probe{Role: role, Identity: id, Term: term, Counter: p.nextCounter(), Node: ip}
			start := p.now()
			a, beat = p.dial(ctx, ip, p.cfg.Port, p.cfg.Timeout, pr, key)
			if a == silent && p.now().Sub(start) > p.cfg.Timeout+lateSlack {
				a = late
			}
		}
	}
	p.record(ctx, node, ip, a, beat)
}

// record updates a node's health with one probe's answer.
func (p *prober) record(ctx context.Context, node string, ip netip.Addr, a answer, beat uint64) {
	now := p.now()
	p.mu.Lock()
	s, ok := p.nodes[node]
	if !ok || s.ip != ip {
		p.mu.Unlock()
		return
	}
	s.inFlight = false
	if a == late {
		p.mu.Unlock()
		p.log.Debug("probe judged late: neither a miss nor an answer", zap.String("node", node), zap.String("ip", ip.String()))
		return
	}
	wasHealthy, wasKnown := s.healthy, s.known
	s.known = true
	switch a {
	case answered:
		s.misses, s.lastAlive = 0, now
		if beat != s.beat || s.beatAt.IsZero() {
			s.beat, s.beatAt = beat, now
		}
		s.healthy = now.Sub(s.beatAt) <= p.cfg.HeartbeatTimeout
		s.why = fmt.Sprintf("agent heartbeat stuck at %d for %v", s.beat, now.Sub(s.beatAt).Round(time.Millisecond))
	case refused:
		// The kernel answers: the node is up, its agent restarts. That
		// keeps the node Up only for a while after the agent last
		// answered (or after this replica started probing it).
		s.misses = 0
		last := s.lastAlive
		if last.IsZero() {
			last = s.since
		}
		s.healthy = now.Sub(last) <= p.cfg.RefusedGrace
		s.why = fmt.Sprintf("agent refuses probes for %v", now.Sub(last).Round(time.Millisecond))
	default:
		s.misses++
		s.why = fmt.Sprintf("%d probes unanswered", s.misses)
		if s.misses >= p.cfg.Misses {
			s.healthy = false
		}
	}
	changed := s.healthy != wasHealthy || (!wasKnown && (s.healthy || s.misses >= p.cfg.Misses))
	if !wasKnown && !changed {
		s.known = false // not conclusive yet
	}
	hurried := s.urgent && a == answered
	if hurried {
		s.urgent = false
	}
	healthy, why := s.healthy, s.why
	p.mu.Unlock()
	if changed && ctx.Err() == nil {
		if healthy {
			p.log.Info("node answers health probes", zap.String("node", node), zap.String("ip", ip.String()))
		} else {
			p.log.Warn("node is not healthy", zap.String("node", node), zap.String("ip", ip.String()), zap.String("why", why))
		}
		p.onChange()
	} else if hurried && ctx.Err() == nil {
		p.onChange()
	}
}

// dialProbe sends probe pr to the node's probe port and reads the agent's
// reply. A valid reply is answered (with the agent's heartbeat); a refused
// connection is refused; anything else (timeout, reset, closed without a
// reply, a reply that does not authenticate) is silent.
func dialProbe(ctx context.Context, ip netip.Addr, port int, timeout time.Duration, pr probe.Probe, key []byte) (answer, uint64) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip.String(), strconv.Itoa(port)))
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return refused, 0
		}
		return silent, 0
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write(pr.Encode(key)); err != nil {
		return silent, 0
	}
	line, err := bufio.NewReaderSize(io.LimitReader(c, probe.MaxLine), probe.MaxLine).ReadString('\n')
	if err != nil {
		return silent, 0
	}
	if line == probe.NoKey {
		return refused, 0 // an agent that has no key yet: like a restart
	}
	r, err := probe.DecodeReply(key, pr, line)
	if err != nil {
		return silent, 0
	}
	return answered, r.Heartbeat
}
