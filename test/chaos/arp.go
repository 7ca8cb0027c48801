// Package chaos holds the outside observers of the chaos campaign
// (test/cluster/cmd/chaos): they watch the lab cluster from where a user's
// network sees it, never from inside a node.
//
//   - ARPObserver asks, from a host on the node switch (the router), who
//     answers ARP for each floating IP, every Period, and collects every
//     answer: two MACs answering one round is a dual holder.
//   - SourceObserver has pods send UDP datagrams to an external host and
//     checks there the source address of each one: a selected pod's must be
//     its policy's egress IP, an unselected pod's its node's address. It
//     also measures the longest time a pod's datagrams did not get out.
package chaos

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/lab"
	"golang.org/x/sys/unix"
)

const ethPARP = 0x0806

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// ObserverMACBase is the locally administered prefix of the source MACs of
// the ARP observer's requests; the last byte numbers the round, so every
// answer (sent to the requester's MAC) belongs to exactly one round and
// goes to a MAC no host owns: no kernel on the observer's side learns
// anything from it.
//
// The requests are ordinary ones from ARPConfig.SenderIP, an address of the
// node subnet nothing else uses. They must not be RFC 5227 probes (sender
// IP 0.0.0.0): a node probing a floating IP before taking it treats another
// host's probe for it as a conflict and backs off, so probes would change
// what they measure. Nodes answering learn SenderIP at the observer's MAC,
// which nothing ever talks to.
var ObserverMACBase = net.HardwareAddr{0x02, 0xc4, 0xa0, 0x5e, 0x00, 0x00}

// SwitchExemptRules are switch filter rules (lab.SetSwitchFilter) to put
// first in a chaos table so that partitions made with that table never hide
// a holder from an ARP observer sending from senderIP: its requests and
// their answers always pass, and nothing else.
func SwitchExemptRules(senderIP netip.Addr) []string {
	return []string{
		"arp saddr ip " + senderIP.String() + " accept",
		"arp daddr ip " + senderIP.String() + " accept",
	}
}

// ARPConfig configures an ARPObserver.
type ARPConfig struct {
	// NetNS and Dev: where the probes are sent from (e.g. the router's
	// namespace and its link to the switch, "eth0").
	NetNS, Dev string
	// SenderIP of the requests: an address on the probed subnet that no
	// host uses (see ObserverMACBase).
	SenderIP netip.Addr
	// IPs to watch.
	IPs []netip.Addr
	// Period between rounds (default 50 ms). A round collects the answers
	// that arrive until the next round starts.
	Period time.Duration
	// Names maps a MAC (net.HardwareAddr.String()) to a host name for the
	// reports.
	Names map[string]string
	// Logf receives violation reports; Context, when set, describes what
	// is going on (e.g. the active faults) for them.
	Logf    func(format string, args ...any)
	Context func() string
}

// ARPStats summarizes an ARPObserver's findings.
type ARPStats struct {
	Rounds int
	// Violations counts dual-holder spans: runs of consecutive rounds in
	// which one IP was answered by more than one MAC.
	Violations int
	// MaxDual is the longest such span, from its first dual round to the
	// first round after it with one answer or none (an open span at Stop
	// ends one period after its last dual round).
	MaxDual   time.Duration
	MaxDualIP netip.Addr
	// MaxUnheld is the longest run of rounds in which nobody answered for
	// an IP (information: an IP nobody holds is an outage, not a dual
	// holder).
	MaxUnheld   time.Duration
	MaxUnheldIP netip.Addr
}

type arpRound struct {
	sent    time.Time
	closed  bool
	answers map[netip.Addr]map[string]bool
}

type ipTrack struct {
	dualSince   time.Time
	dualLast    time.Time
	dualMACs    map[string]bool
	unheldSince time.Time
	last        []string // MACs of the last evaluated round
	lastAt      time.Time
}

// ARPObserver samples who answers ARP for the floating IPs; see the package
// comment.
type ARPObserver struct {
	cfg    ARPConfig
	fd     int
	ifidx  int
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	rounds  [256]*arpRound
	pending []*arpRound
	seq     int
	track   map[netip.Addr]*ipTrack
	stats   ARPStats
}

// StartARP opens a raw socket in cfg.NetNS and starts sampling.
func StartARP(cfg ARPConfig) (*ARPObserver, error) {
	if cfg.Period <= 0 {
		cfg.Period = 50 * time.Millisecond
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.Context == nil {
		cfg.Context = func() string { return "" }
	}
	if !cfg.SenderIP.Is4() || cfg.SenderIP.IsUnspecified() {
		return nil, fmt.Errorf("arp observer: sender IP %s: want an unused IPv4 address of the subnet", cfg.SenderIP)
	}
	for _, ip := range cfg.IPs {
		if !ip.Is4() || ip == cfg.SenderIP {
			return nil, fmt.Errorf("arp observer: cannot watch %s", ip)
		}
	}
	o := &ARPObserver{cfg: cfg, fd: -1, track: map[netip.Addr]*ipTrack{}}
	for _, ip := range cfg.IPs {
		o.track[ip] = &ipTrack{}
	}
	err := lab.Do(cfg.NetNS, func() error {
		ifi, err := net.InterfaceByName(cfg.Dev)
		if err != nil {
			return err
		}
		o.ifidx = ifi.Index
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(ethPARP)))
		if err != nil {
			return err
		}
		o.fd = fd
		return nil
	})
	if err != nil {
		if o.fd >= 0 {
			unix.Close(o.fd)
		}
		return nil, fmt.Errorf("arp observer in %s: %w", cfg.NetNS, err)
	}
	setup := func() error {
		if err := unix.Bind(o.fd, &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: o.ifidx}); err != nil {
			return fmt.Errorf("bind: %w", err)
		}
		// The answers go to MACs the device does not own: receive them
		// whatever the device does with frames for other hosts.
		mreq := unix.PacketMreq{Ifindex: int32(o.ifidx), Type: unix.PACKET_MR_PROMISC}
		if err := unix.SetsockoptPacketMreq(o.fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
			return fmt.Errorf("promiscuous membership: %w", err)
		}
		// Our own requests need not come back.
		_ = unix.SetsockoptInt(o.fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
		tv := unix.NsecToTimeval((20 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(o.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}
	if err := setup(); err != nil {
		unix.Close(o.fd)
		return nil, fmt.Errorf("arp observer in %s: %w", cfg.NetNS, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	o.cancel = cancel
	o.wg.Add(2)
	go o.receive(ctx)
	go o.sample(ctx)
	return o, nil
}

// requestFrame is a broadcast ARP request for ip from mac and sender.
func requestFrame(mac net.HardwareAddr, sender, ip netip.Addr) []byte {
	f := make([]byte, 0, 42)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	f = append(f, mac...)
	f = append(f, 0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01)
	f = append(f, mac...)
	s := sender.As4()
	f = append(f, s[:]...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	a := ip.As4()
	return append(f, a[:]...)
}

func (o *ARPObserver) sample(ctx context.Context) {
	defer o.wg.Done()
	t := time.NewTicker(o.cfg.Period)
	defer t.Stop()
	to := &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: o.ifidx, Halen: 6}
	copy(to.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	for {
		now := time.Now()
		o.mu.Lock()
		// Close and judge the rounds started before this one.
		for _, r := range o.pending {
			r.closed = true
			o.evaluate(r)
		}
		tag := byte(o.seq)
		o.seq++
		r := &arpRound{sent: now, answers: map[netip.Addr]map[string]bool{}}
		o.rounds[tag] = r
		o.pending = []*arpRound{r}
		o.stats.Rounds++
		o.mu.Unlock()
		mac := append(net.HardwareAddr(nil), ObserverMACBase...)
		mac[5] = tag
		for _, ip := range o.cfg.IPs {
			unix.Sendto(o.fd, requestFrame(mac, o.cfg.SenderIP, ip), 0, to) //nolint:errcheck // a lost probe is a round without answers
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (o *ARPObserver) receive(ctx context.Context) {
	defer o.wg.Done()
	buf := make([]byte, 1600)
	for ctx.Err() == nil {
		n, _, err := unix.Recvfrom(o.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			if ctx.Err() == nil {
				o.cfg.Logf("# arp observer: receive: %v", err)
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		f := buf[:n]
		if n < 42 || binary.BigEndian.Uint16(f[12:14]) != ethPARP || binary.BigEndian.Uint16(f[20:22]) != 2 {
			continue
		}
		sha := net.HardwareAddr(append([]byte(nil), f[22:28]...))
		spa := netip.AddrFrom4([4]byte(f[28:32]))
		tha := f[32:38]
		tpa := netip.AddrFrom4([4]byte(f[38:42]))
		if string(tha[:5]) != string(ObserverMACBase[:5]) || tpa != o.cfg.SenderIP {
			continue // not an answer to us
		}
		o.mu.Lock()
		if r := o.rounds[tha[5]]; r != nil && !r.closed {
			if _, watched := o.track[spa]; watched {
				if r.answers[spa] == nil {
					r.answers[spa] = map[string]bool{}
				}
				r.answers[spa][sha.String()] = true
			}
		}
		o.mu.Unlock()
	}
}

func (o *ARPObserver) name(mac string) string {
	if n := o.cfg.Names[mac]; n != "" {
		return n + "(" + mac + ")"
	}
	return mac
}

func (o *ARPObserver) names(macs map[string]bool) string {
	var s []string
	for m := range macs {
		s = append(s, o.name(m))
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// evaluate judges a closed round; o.mu is held.
func (o *ARPObserver) evaluate(r *arpRound) {
	for _, ip := range o.cfg.IPs {
		tr := o.track[ip]
		macs := r.answers[ip]
		tr.last = tr.last[:0]
		for m := range macs {
			tr.last = append(tr.last, m)
		}
		sort.Strings(tr.last)
		tr.lastAt = r.sent
		if len(macs) > 1 {
			if tr.dualSince.IsZero() {
				tr.dualSince, tr.dualMACs = r.sent, map[string]bool{}
				o.stats.Violations++
				o.cfg.Logf("VIOLATION dual holder: %s answered by %s; %s", ip, o.names(macs), o.cfg.Context())
			}
			for m := range macs {
				tr.dualMACs[m] = true
			}
			tr.dualLast = r.sent
		} else if !tr.dualSince.IsZero() {
			o.endDual(ip, tr, r.sent.Sub(tr.dualSince), fmt.Sprintf("now %s", o.names(macs)))
		}
		if len(macs) == 0 {
			if tr.unheldSince.IsZero() {
				tr.unheldSince = r.sent
			}
		} else if !tr.unheldSince.IsZero() {
			o.endUnheld(ip, r.sent.Sub(tr.unheldSince))
			tr.unheldSince = time.Time{}
		}
	}
}

func (o *ARPObserver) endDual(ip netip.Addr, tr *ipTrack, d time.Duration, now string) {
	if d > o.stats.MaxDual {
		o.stats.MaxDual, o.stats.MaxDualIP = d, ip
	}
	o.cfg.Logf("# dual holder of %s ended after %d ms (holders seen: %s; %s)", ip, d.Milliseconds(), o.names(tr.dualMACs), now)
	tr.dualSince, tr.dualMACs = time.Time{}, nil
}

func (o *ARPObserver) endUnheld(ip netip.Addr, d time.Duration) {
	if d > o.stats.MaxUnheld {
		o.stats.MaxUnheld, o.stats.MaxUnheldIP = d, ip
	}
}

// Holders returns, for each watched IP, the MACs that answered the last
// judged round, and that round's time.
func (o *ARPObserver) Holders() (map[netip.Addr][]string, time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := map[netip.Addr][]string{}
	var at time.Time
	for ip, tr := range o.track {
		out[ip] = append([]string(nil), tr.last...)
		at = tr.lastAt
	}
	return out, at
}

// Stats returns the findings so far; open spans count up to their last
// round.
func (o *ARPObserver) Stats() ARPStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.stats
	for ip, tr := range o.track {
		if !tr.dualSince.IsZero() {
			if d := tr.dualLast.Sub(tr.dualSince) + o.cfg.Period; d > s.MaxDual {
				s.MaxDual, s.MaxDualIP = d, ip
			}
		}
		if !tr.unheldSince.IsZero() {
			if d := tr.lastAt.Sub(tr.unheldSince) + o.cfg.Period; d > s.MaxUnheld {
				s.MaxUnheld, s.MaxUnheldIP = d, ip
			}
		}
	}
	return s
}

// Reset forgets every finding (e.g. those of a warm-up); spans in progress
// start over from the next round.
func (o *ARPObserver) Reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stats = ARPStats{}
	for _, tr := range o.track {
		tr.dualSince, tr.dualMACs, tr.unheldSince = time.Time{}, nil, time.Time{}
	}
}

// Stop ends sampling, closes the socket and returns the final stats; an
// open dual-holder span is closed and reported.
func (o *ARPObserver) Stop() ARPStats {
	o.cancel()
	o.wg.Wait()
	unix.Close(o.fd)
	o.mu.Lock()
	for ip, tr := range o.track {
		if !tr.dualSince.IsZero() {
			o.endDual(ip, tr, tr.dualLast.Sub(tr.dualSince)+o.cfg.Period, "still dual when the observer stopped")
		}
		if !tr.unheldSince.IsZero() {
			o.endUnheld(ip, tr.lastAt.Sub(tr.unheldSince)+o.cfg.Period)
			tr.unheldSince = time.Time{}
		}
	}
	o.mu.Unlock()
	return o.Stats()
}
