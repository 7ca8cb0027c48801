package chaos

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/lab"
)

// PayloadPrefix starts every datagram of a SourceObserver's senders:
// "enat-chaos <pod> <sel|unsel> <flow> <seq>".
const PayloadPrefix = "enat-chaos"

// Flows of every pod: "long" is one UDP socket for the whole run (one
// conntrack entry: it shows stale NAT bindings), "fresh" a new socket (new
// source port) every FreshEvery (it shows what the current rules do).
const (
	FlowLong  = "long"
	FlowFresh = "fresh"
)

// Expect is what the outside must see from a pod.
type Expect struct {
	// Selected: a policy selects the pod; Policy names it.
	Selected bool
	Policy   string
	// Source is the only acceptable source address: the policy's egress
	// IP for a selected pod, its node's address otherwise.
	Source netip.Addr
}

func (e Expect) String() string {
	if e.Selected {
		return fmt.Sprintf("selected by %s, want %s", e.Policy, e.Source)
	}
	return fmt.Sprintf("unselected, want node address %s", e.Source)
}

// Pod is a sender: a pod's network namespace and what it expects.
type Pod struct {
	Name  string // e.g. "alice/web-1"
	NetNS string
	Node  string
	IP    netip.Addr
	Expect
}

// SourceConfig configures a SourceObserver.
type SourceConfig struct {
	// ListenNS and Listen: the UDP listener on the external host (its
	// address and a port nothing else uses).
	ListenNS string
	Listen   netip.AddrPort
	// Interval between datagrams of one flow (default 20 ms); FreshEvery:
	// lifetime of a fresh flow's socket (default 1 s).
	Interval, FreshEvery time.Duration
	// ReportOutage: outages at least this long are logged (default 1 s).
	ReportOutage time.Duration
	// Logf receives violation reports; Context, when set, describes what
	// is going on (e.g. the active faults); Describe, when set, names an
	// address (e.g. "node worker2").
	Logf     func(format string, args ...any)
	Context  func() string
	Describe func(netip.Addr) string
	// Excused, when set, is asked every 10 ms for each pod: while it
	// returns true the pod's datagrams cannot get out through no fault of
	// the system under test (e.g. its node's cable is pulled), and that
	// time does not count as an outage. Sources are checked regardless.
	Excused func(p Pod) bool
}

// Outage is the longest gap of one pod's correct datagrams.
type Outage struct {
	Pod      string
	Duration time.Duration
	End      time.Time // zero while it lasts
}

// SourceStats summarizes a SourceObserver's findings.
type SourceStats struct {
	Sent, Received, Wrong, Unknown int
	// Violations counts episodes: runs of one flow's datagrams with the
	// same wrong source.
	Violations int
	// MaxSelected and MaxUnselected are the longest outages of pods
	// selected (resp. not) at the time; an outage still going on counts up
	// to now.
	MaxSelected, MaxUnselected Outage
}

type episode struct {
	src         netip.Addr
	first, last time.Time
	n           int
	firstSeq    string
}

type podState struct {
	Pod
	// prev are also accepted while inTransition, or until prevUntil.
	prev         []Expect
	inTransition bool
	prevUntil    time.Time
	paused       bool
	excused      bool
	lastOK       time.Time
	lastOKFlow   map[string]time.Time
	episodes     map[string]*episode
	sent, recv   int
	cancel       context.CancelFunc
}

// SourceObserver runs the senders and the checking listener; see the
// package comment.
type SourceObserver struct {
	cfg  SourceConfig
	conn net.PacketConn
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu    sync.Mutex
	pods  map[string]*podState
	stats SourceStats
}

// StartSource opens the listener and starts checking; add senders with Add.
func StartSource(cfg SourceConfig) (*SourceObserver, error) {
	if cfg.Interval <= 0 {
		cfg.Interval = 20 * time.Millisecond
	}
	if cfg.FreshEvery <= 0 {
		cfg.FreshEvery = time.Second
	}
	if cfg.ReportOutage <= 0 {
		cfg.ReportOutage = time.Second
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.Context == nil {
		cfg.Context = func() string { return "" }
	}
	if cfg.Describe == nil {
		cfg.Describe = func(netip.Addr) string { return "" }
	}
	conn, err := lab.ListenUDP(cfg.ListenNS, cfg.Listen.String())
	if err != nil {
		return nil, fmt.Errorf("source observer: listen in %s: %w", cfg.ListenNS, err)
	}
	ctx, stop := context.WithCancel(context.Background())
	o := &SourceObserver{cfg: cfg, conn: conn, ctx: ctx, stop: stop, pods: map[string]*podState{}}
	o.wg.Add(2)
	go o.receive()
	go o.excuse()
	return o, nil
}

// Add starts the senders of a pod.
func (o *SourceObserver) Add(p Pod) error {
	if strings.ContainsAny(p.Name, " \n") {
		return fmt.Errorf("source observer: pod name %q", p.Name)
	}
	o.mu.Lock()
	if _, ok := o.pods[p.Name]; ok {
		o.mu.Unlock()
		return fmt.Errorf("source observer: pod %s added twice", p.Name)
	}
	ctx, cancel := context.WithCancel(o.ctx)
	ps := &podState{Pod: p, lastOK: time.Now(), lastOKFlow: map[string]time.Time{}, episodes: map[string]*episode{}, cancel: cancel}
	o.pods[p.Name] = ps
	o.mu.Unlock()
	long, err := lab.DialUDP(ctx, p.NetNS, o.cfg.Listen.String())
	if err != nil {
		cancel()
		o.mu.Lock()
		delete(o.pods, p.Name)
		o.mu.Unlock()
		return fmt.Errorf("source observer: socket in pod %s: %w", p.Name, err)
	}
	o.wg.Add(1)
	go o.send(ctx, ps, long)
	return nil
}

func (o *SourceObserver) send(ctx context.Context, ps *podState, long net.Conn) {
	defer o.wg.Done()
	defer long.Close()
	var fresh net.Conn
	var born time.Time
	defer func() {
		if fresh != nil {
			fresh.Close()
		}
	}()
	t := time.NewTicker(o.cfg.Interval)
	defer t.Stop()
	for seq := 0; ; seq++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		o.mu.Lock()
		paused, sel := ps.paused, ps.Selected
		o.mu.Unlock()
		if paused {
			continue
		}
		tag := "unsel"
		if sel {
			tag = "sel"
		}
		if fresh == nil || time.Since(born) >= o.cfg.FreshEvery {
			if fresh != nil {
				fresh.Close()
			}
			fresh, _ = lab.DialUDP(ctx, ps.NetNS, o.cfg.Listen.String())
			born = time.Now()
		}
		n := 0
		for _, f := range []struct {
			flow string
			c    net.Conn
		}{{FlowLong, long}, {FlowFresh, fresh}} {
			if f.c == nil {
				continue
			}
			// Errors (an ICMP error reported on a connected socket) are
			// not the sender's concern: the listener sees what arrived.
			if _, err := fmt.Fprintf(f.c, "%s %s %s %s %d", PayloadPrefix, ps.Name, tag, f.flow, seq); err == nil {
				n++
			}
		}
		o.mu.Lock()
		ps.sent += n
		o.stats.Sent += n
		o.mu.Unlock()
	}
}

func (o *SourceObserver) receive() {
	defer o.wg.Done()
	buf := make([]byte, 2048)
	for o.ctx.Err() == nil {
		o.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, from, err := o.conn.ReadFrom(buf)
		if err != nil {
			continue
		}
		now := time.Now()
		ua, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		src, _ := netip.AddrFromSlice(ua.IP)
		o.check(now, src.Unmap(), uint16(ua.Port), string(buf[:n]))
	}
}

func (o *SourceObserver) describe(a netip.Addr) string {
	if d := o.cfg.Describe(a); d != "" {
		return a.String() + " (" + d + ")"
	}
	return a.String()
}

// check judges one datagram.
func (o *SourceObserver) check(now time.Time, src netip.Addr, port uint16, payload string) {
	f := strings.Fields(payload)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stats.Received++
	if len(f) != 5 || f[0] != PayloadPrefix {
		o.stats.Unknown++
		return
	}
	ps := o.pods[f[1]]
	if ps == nil {
		o.stats.Unknown++
		return
	}
	flow, seq := f[3], f[4]
	ps.recv++
	if len(ps.prev) > 0 && !ps.inTransition && now.After(ps.prevUntil) {
		ps.prev = nil
	}
	ok := src == ps.Source
	for _, e := range ps.prev {
		ok = ok || src == e.Source
	}
	ep := ps.episodes[flow]
	if !ok {
		o.stats.Wrong++
		if ep != nil && ep.src == src {
			ep.n++
			ep.last = now
			return
		}
		if ep != nil {
			o.endEpisode(ps, flow, ep, "source changed")
		}
		ep = &episode{src: src, first: now, last: now, n: 1, firstSeq: seq}
		ps.episodes[flow] = ep
		o.stats.Violations++
		want := ps.Expect.String()
		for _, e := range ps.prev {
			want += " (or, in transition, " + e.String() + ")"
		}
		o.cfg.Logf("VIOLATION source: pod %s (%s, node %s) flow %s seq %s (payload tag %s) left with %s:%d, %s; %s",
			ps.Name, ps.IP, ps.Node, flow, seq, f[2], o.describe(src), port, want, o.cfg.Context())
		return
	}
	if ep != nil {
		o.endEpisode(ps, flow, ep, "right source again")
	}
	ps.lastOKFlow[flow] = now
	if !ps.excused && !ps.paused {
		o.recordGap(ps, now.Sub(ps.lastOK), now)
	}
	ps.lastOK = now
}

func (o *SourceObserver) endEpisode(ps *podState, flow string, ep *episode, why string) {
	o.cfg.Logf("# source violation of pod %s flow %s ended (%s): %d datagrams from %s over %d ms",
		ps.Name, flow, why, ep.n, o.describe(ep.src), ep.last.Sub(ep.first).Milliseconds())
	delete(ps.episodes, flow)
}

// recordGap records an outage of gap ending at end (zero: still going on);
// o.mu is held.
func (o *SourceObserver) recordGap(ps *podState, gap time.Duration, end time.Time) {
	max := &o.stats.MaxUnselected
	if ps.Selected {
		max = &o.stats.MaxSelected
	}
	if gap > max.Duration {
		*max = Outage{Pod: ps.Name, Duration: gap, End: end}
	}
	if gap >= o.cfg.ReportOutage && !end.IsZero() {
		o.cfg.Logf("# outage: pod %s (%s) got no datagram out with the right source for %d ms until now; %s",
			ps.Name, ps.Expect.String(), gap.Milliseconds(), o.cfg.Context())
	}
}

// excuse keeps lastOK current for paused and excused pods.
func (o *SourceObserver) excuse() {
	defer o.wg.Done()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
		}
		o.mu.Lock()
		pods := make([]*podState, 0, len(o.pods))
		for _, ps := range o.pods {
			pods = append(pods, ps)
		}
		o.mu.Unlock()
		for _, ps := range pods {
			o.mu.Lock()
			p := ps.Pod
			o.mu.Unlock()
			ex := o.cfg.Excused != nil && o.cfg.Excused(p)
			o.mu.Lock()
			ps.excused = ex
			if ex || ps.paused {
				ps.lastOK = time.Now()
			}
			o.mu.Unlock()
		}
	}
}

// SetExpect changes what a pod must show (e.g. its labels changed): until
// SettleExpect, the old expectation is accepted as well.
func (o *SourceObserver) SetExpect(pod string, e Expect) {
	o.mu.Lock()
	defer o.mu.Unlock()
	ps := o.pods[pod]
	if ps == nil {
		return
	}
	if !ps.inTransition && time.Now().After(ps.prevUntil) {
		ps.prev = nil
	}
	if ps.Expect.Source != e.Source {
		ps.prev = append(ps.prev, ps.Expect)
	}
	ps.Expect = e
	ps.inTransition = true
}

// SettleExpect ends a pod's transition grace after from now.
func (o *SourceObserver) SettleExpect(pod string, grace time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ps := o.pods[pod]; ps != nil && ps.inTransition {
		ps.inTransition = false
		ps.prevUntil = time.Now().Add(grace)
	}
}

// Expectation returns what a pod must currently show.
func (o *SourceObserver) Expectation(pod string) (Expect, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	ps := o.pods[pod]
	if ps == nil {
		return Expect{}, false
	}
	return ps.Expect, true
}

// Pause stops a pod's senders (its node is rebooting: it has no pods);
// Resume starts them again. Neither counts as an outage.
func (o *SourceObserver) Pause(pod string)  { o.setPaused(pod, true) }
func (o *SourceObserver) Resume(pod string) { o.setPaused(pod, false) }

func (o *SourceObserver) setPaused(pod string, v bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ps := o.pods[pod]; ps != nil {
		ps.paused = v
		ps.lastOK = time.Now()
	}
}

// Pods lists the senders.
func (o *SourceObserver) Pods() []Pod {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []Pod
	for _, ps := range o.pods {
		out = append(out, ps.Pod)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Problems lists, now, every pod whose flows did not each deliver a datagram
// with the right source within the last d, and every open violation
// episode; empty when all is well. Paused pods are skipped.
func (o *SourceObserver) Problems(d time.Duration) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	var out []string
	for _, ps := range o.pods {
		if ps.paused {
			continue
		}
		for _, flow := range []string{FlowLong, FlowFresh} {
			if t := ps.lastOKFlow[flow]; now.Sub(t) > d {
				last := "never"
				if !t.IsZero() {
					last = strconv.FormatInt(now.Sub(t).Milliseconds(), 10) + " ms ago"
				}
				out = append(out, fmt.Sprintf("pod %s flow %s: last datagram with the right source %s (%s)", ps.Name, flow, last, ps.Expect.String()))
			}
			if ep := ps.episodes[flow]; ep != nil {
				out = append(out, fmt.Sprintf("pod %s flow %s: still leaving with %s (%d datagrams over %d ms; %s)",
					ps.Name, flow, o.describe(ep.src), ep.n, ep.last.Sub(ep.first).Milliseconds(), ps.Expect.String()))
			}
		}
	}
	sort.Strings(out)
	return out
}

// Reset forgets every finding so far (e.g. those of a warm-up) and starts
// every pod's outage clock now.
func (o *SourceObserver) Reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stats = SourceStats{}
	now := time.Now()
	for _, ps := range o.pods {
		ps.lastOK = now
		ps.episodes = map[string]*episode{}
	}
}

// Stats returns the findings so far; outages still going on count up to
// now.
func (o *SourceObserver) Stats() SourceStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.stats
	now := time.Now()
	for _, ps := range o.pods {
		if ps.paused || ps.excused {
			continue
		}
		gap := now.Sub(ps.lastOK)
		max := &s.MaxUnselected
		if ps.Selected {
			max = &s.MaxSelected
		}
		if gap > max.Duration {
			*max = Outage{Pod: ps.Name, Duration: gap}
		}
	}
	return s
}

// Stop ends the senders and the listener, reports open violation episodes
// and returns the final stats.
func (o *SourceObserver) Stop() SourceStats {
	s := o.Stats()
	o.stop()
	o.conn.Close()
	o.wg.Wait()
	o.mu.Lock()
	for _, ps := range o.pods {
		for flow, ep := range ps.episodes {
			o.endEpisode(ps, flow, ep, "still open when the observer stopped")
		}
	}
	o.mu.Unlock()
	return s
}
