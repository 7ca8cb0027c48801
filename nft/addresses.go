package nft

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Gratuitous ARP after taking a floating IP (or unmuting one: see
// selector.NodeState.Muted; a muted IP is never announced), as keepalived
// does: one announcement at once, then more at growing intervals for
// about five seconds, so that a peer that missed one (a busy switch, a
// host whose entry was being refreshed) still learns the new holder. The
// offsets are from the moment the address was added or unmuted (the first
// round goes at once, whatever its offset); tests shorten them.
var garpSchedule = []time.Duration{
	0,
	100 * time.Millisecond,
	300 * time.Millisecond,
	700 * time.Millisecond,
	1500 * time.Millisecond,
	3 * time.Second,
	5 * time.Second,
}

// arpProbes is how many ARP probes Apply sends for a new floating IP,
// spread evenly over Config.ARPProbeWait.
var arpProbes = 2

// GratuitousARPs is how many frames announce one floating IP (fewer when
// the IP is given up before its schedule ends).
func GratuitousARPs() int { return len(garpSchedule) }

// addresses owns the floating IPs on the uplink and their gratuitous ARP.
type addresses struct {
	cfg Config
	log *zap.Logger
	// announced: floating IPs announced by this process (under the
	// Dataplane's lock).
	announced map[netip.Addr]bool
	wg        *sync.WaitGroup
	done      <-chan struct{}
	// leaseFresh tells whether an IP's ARP lease is live (arpLease.fresh);
	// a repeat of the gratuitous ARP is sent only then. nil: always.
	leaseFresh func(netip.Addr) bool

	// mu guards active. A background announcement sends for an IP only
	// while active holds its generation, and sends under mu: once stop
	// returns, no frame claims an IP given up.
	mu     sync.Mutex
	active map[netip.Addr]uint64
	gen    uint64
}

// uplinkAddrs lists the IPv4 addresses on the uplink, by address.
func uplinkAddrs(h *netlink.Handle, link netlink.Link) (map[netip.Addr]netlink.Addr, error) {
	list, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	out := make(map[netip.Addr]netlink.Addr, len(list))
	for _, a := range list {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			out[ip] = a
		}
	}
	return out, nil
}

// Label is the address label egressnat gives the floating IPs it adds to
// uplink: "<uplink>:enat", or "egressnat" when that would not fit the
// kernel's 15 characters. It is how an agent knows, after a restart or a
// lost table, which addresses are its own: it never removes another.
func Label(uplink string) string {
	if l := uplink + ":enat"; len(l) <= 15 {
		return l
	}
	return "egressnat"
}

func (ad *addresses) addrFor(p netip.Prefix) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), 32)}, Label: Label(ad.cfg.Uplink)}
}

// owned returns the addresses on the uplink that are egressnat's: those
// with its label and those recorded in its table.
func (ad *addresses) owned(have map[netip.Addr]netlink.Addr, recorded []netip.Addr) map[netip.Addr]bool {
	label := Label(ad.cfg.Uplink)
	out := map[netip.Addr]bool{}
	for a, na := range have {
		if na.Label == label {
			out[a] = true
		}
	}
	for _, a := range recorded {
		if _, present := have[a]; present {
			out[a] = true
		}
	}
	return out
}

// addFloating adds the floating IPs that are missing on the uplink and
// returns the ones it added.
func (ad *addresses) add(h *netlink.Handle, link netlink.Link, have map[netip.Addr]netlink.Addr, want []netip.Prefix, res *Result) ([]netip.Addr, error) {
	var added []netip.Addr
	for _, p := range want {
		if _, ok := have[p.Addr()]; ok {
			continue
		}
		if err := h.AddrAdd(link, ad.addrFor(p)); err != nil && !errors.Is(err, unix.EEXIST) {
			return added, fmt.Errorf("add address %s to %s: %w", p, link.Attrs().Name, err)
		}
		added = append(added, p.Addr())
		res.AddrsAdded++
		ad.log.Info("floating ip added", zap.Stringer("ip", p), zap.String("uplink", link.Attrs().Name))
	}
	return added, nil
}

// removeFloating deletes the given addresses from the uplink.
func (ad *addresses) remove(h *netlink.Handle, link netlink.Link, have map[netip.Addr]netlink.Addr, ips []netip.Addr, res *Result) error {
	var errs []error
	for _, ip := range ips {
		a, ok := have[ip]
		if !ok {
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete address %s from %s: %w", ip, link.Attrs().Name, err))
			continue
		}
		res.AddrsDeleted++
		ad.log.Info("floating ip removed", zap.Stringer("ip", ip), zap.String("uplink", link.Attrs().Name))
	}
	return errors.Join(errs...)
}

// ARP frames.

const (
	ethPARP    = 0x0806
	ethPIPv4   = 0x0800
	arpRequest = 1
	arpReply   = 2
	// arpFrameLen: ethernet header (14) and an ARP packet for ethernet and
	// IPv4 (28).
	arpFrameLen = 42
)

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// arpFrame builds an ARP request for ethernet and IPv4, sent to broadcast
// from mac, target MAC zero.
func arpFrame(mac net.HardwareAddr, sender, target netip.Addr) []byte {
	f := make([]byte, 0, arpFrameLen)
	f = append(f, broadcastMAC...)  // destination
	f = append(f, mac...)           // source
	f = append(f, 0x08, 0x06)       // EtherType ARP
	f = append(f, 0x00, 0x01)       // hardware type ethernet
	f = append(f, 0x08, 0x00)       // protocol IPv4
	f = append(f, 6, 4)             // address lengths
	f = append(f, 0x00, arpRequest) // operation request
	s, t := sender.As4(), target.As4()
	f = append(f, mac...)           // sender MAC
	f = append(f, s[:]...)          // sender IP
	f = append(f, 0, 0, 0, 0, 0, 0) // target MAC
	f = append(f, t[:]...)          // target IP
	return f
}

// garpFrame builds a gratuitous ARP request: sender and target IP are ip,
// sender MAC is mac, target MAC zero, sent to broadcast.
func garpFrame(mac net.HardwareAddr, ip netip.Addr) []byte {
	return arpFrame(mac, ip, ip)
}

// probeFrame builds an ARP probe (RFC 5227): sender IP 0.0.0.0, so that no
// peer learns anything from it, target IP the address probed.
func probeFrame(mac net.HardwareAddr, ip netip.Addr) []byte {
	return arpFrame(mac, netip.IPv4Unspecified(), ip)
}

// arpPacket is an ARP packet for ethernet and IPv4, decoded.
type arpPacket struct {
	op       uint16
	senderHW net.HardwareAddr
	senderIP netip.Addr
	targetHW net.HardwareAddr
	targetIP netip.Addr
}

// parseARP decodes an ethernet frame carrying an ARP request or reply for
// IPv4.
func parseARP(f []byte) (arpPacket, bool) {
	if len(f) < arpFrameLen || binary.BigEndian.Uint16(f[12:14]) != ethPARP {
		return arpPacket{}, false
	}
	a := f[14:]
	if binary.BigEndian.Uint16(a[0:2]) != 1 || binary.BigEndian.Uint16(a[2:4]) != ethPIPv4 || a[4] != 6 || a[5] != 4 {
		return arpPacket{}, false
	}
	p := arpPacket{op: binary.BigEndian.Uint16(a[6:8])}
	if p.op != arpRequest && p.op != arpReply {
		return arpPacket{}, false
	}
	p.senderHW = slices.Clone(net.HardwareAddr(a[8:14]))
	p.senderIP = netip.AddrFrom4([4]byte(a[14:18]))
	p.targetHW = slices.Clone(net.HardwareAddr(a[18:24]))
	p.targetIP = netip.AddrFrom4([4]byte(a[24:28]))
	return p, true
}

// probeConflict tells whether an ARP frame seen while probing shows that
// another host uses, or is about to take, one of the probed addresses
// (RFC 5227 2.1.1): a request or reply from another MAC whose sender IP is
// probed, or another host's probe (sender IP 0.0.0.0) for a probed
// address. It returns the address and the other host's MAC.
func probeConflict(f []byte, ours net.HardwareAddr, probing map[netip.Addr]bool) (netip.Addr, net.HardwareAddr, bool) {
	p, ok := parseARP(f)
	if !ok || bytes.Equal(p.senderHW, ours) || bytes.Equal(f[6:12], ours) {
		return netip.Addr{}, nil, false
	}
	switch {
	case probing[p.senderIP]:
		return p.senderIP, p.senderHW, true
	case p.senderIP.IsUnspecified() && p.op == arpRequest && probing[p.targetIP]:
		return p.targetIP, p.senderHW, true
	}
	return netip.Addr{}, nil, false
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Classic BPF programs for the packet sockets.
var (
	// dropAll keeps the receive queue of a socket that only sends empty.
	dropAll = []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}
	// arpOnly accepts ARP for ethernet and IPv4 (EtherType 0x0806,
	// hardware type 1, protocol 0x0800), whole; the rest is matched in
	// user space (probeConflict).
	arpOnly = []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_ABS, K: 12},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 3, K: ethPARP},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 14},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: 1<<16 | ethPIPv4},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffff},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
	}
)

// arpSocket opens an AF_PACKET socket for ARP bound to the uplink, in the
// configured network namespace, with filter attached before it receives
// anything (it is created without a protocol and bound with one).
func (ad *addresses) arpSocket(ifindex int, filter []unix.SockFilter) (int, error) {
	fd := -1
	err := ad.cfg.inNetNS(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, err
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog); err != nil {
		_ = unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: ifindex}); err != nil {
		_ = unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func broadcastTo(ifindex int) *unix.SockaddrLinklayer {
	to := &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: ifindex, Halen: 6}
	copy(to.Addr[:], broadcastMAC)
	return to
}

// ARP probe.

// probeResult is what one probe window found: the addresses another host
// answered for, with its MAC.
type probeResult struct {
	conflicts map[netip.Addr]net.HardwareAddr
	waited    time.Duration
	err       error
}

// startProbe probes ips on the uplink in the background (see probe); the
// caller reads the result from the channel. Nothing to probe, or probing
// disabled: the result is ready at once.
func (ad *addresses) startProbe(ctx context.Context, link netlink.Link, ips []netip.Addr) <-chan probeResult {
	ch := make(chan probeResult, 1)
	if len(ips) == 0 || ad.cfg.ARPProbeWait <= 0 {
		ch <- probeResult{}
		return ch
	}
	go func() { ch <- ad.probe(ctx, link, ips) }()
	return ch
}

// probe sends ARP probes for ips (arpProbes each, spread over
// Config.ARPProbeWait, all addresses at once) and listens for another host
// that uses one of them until the window ends, or until every address has
// a conflict.
func (ad *addresses) probe(ctx context.Context, link netlink.Link, ips []netip.Addr) probeResult {
	attrs := link.Attrs()
	start := time.Now()
	res := probeResult{conflicts: map[netip.Addr]net.HardwareAddr{}}
	if len(attrs.HardwareAddr) != 6 {
		// Not ethernet: nobody answers ARP there.
		ad.log.Debug("arp probe skipped: no ethernet address", zap.String("uplink", attrs.Name))
		return res
	}
	fd, err := ad.arpSocket(attrs.Index, arpOnly)
	if err != nil {
		res.err = fmt.Errorf("arp probe socket on %s: %w", attrs.Name, err)
		return res
	}
	defer unix.Close(fd)
	probing := make(map[netip.Addr]bool, len(ips))
	for _, ip := range ips {
		probing[ip] = true
	}
	to := broadcastTo(attrs.Index)
	wait := ad.cfg.ARPProbeWait
	deadline := start.Add(wait)
	sent := 0
	buf := make([]byte, 256)
	for {
		if err := ctx.Err(); err != nil {
			res.err = err
			return res
		}
		now := time.Now()
		if sent < arpProbes && !now.Before(start.Add(time.Duration(sent)*wait/time.Duration(arpProbes))) {
			var errs []error
			for _, ip := range ips {
				if _, found := res.conflicts[ip]; found {
					continue
				}
				if err := unix.Sendto(fd, probeFrame(attrs.HardwareAddr, ip), 0, to); err != nil {
					errs = append(errs, fmt.Errorf("arp probe %s: %w", ip, err))
				}
			}
			if err := errors.Join(errs...); err != nil {
				res.err = err
				return res
			}
			sent++
		}
		next := deadline
		if sent < arpProbes {
			next = start.Add(time.Duration(sent) * wait / time.Duration(arpProbes))
		}
		if !now.Before(deadline) {
			break
		}
		timeout := max(int(time.Until(next)/time.Millisecond), 0)
		if timeout == 0 && time.Until(next) > 0 {
			timeout = 1
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			res.err = fmt.Errorf("arp probe poll: %w", err)
			return res
		}
		if n <= 0 {
			continue
		}
		if pfd[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			res.err = fmt.Errorf("arp probe socket on %s: poll events %#x", attrs.Name, pfd[0].Revents)
			return res
		}
		for {
			m, from, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
			if err != nil {
				break // EAGAIN: drained
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			ip, mac, ok := probeConflict(buf[:m], attrs.HardwareAddr, probing)
			if !ok {
				continue
			}
			if _, dup := res.conflicts[ip]; !dup {
				res.conflicts[ip] = mac
			}
		}
		if len(res.conflicts) == len(ips) {
			break
		}
	}
	res.waited = time.Since(start)
	return res
}

// Gratuitous ARP.

// announce sends gratuitous ARP for ips on the uplink: the first round now,
// the others (garpSchedule) from a goroutine that stops when the Dataplane
// closes or every IP was given up (stop). The Apply's context does not end
// it: an Apply under a short deadline still announces the whole schedule.
func (ad *addresses) announce(link netlink.Link, ips []netip.Addr) error {
	if len(ips) == 0 {
		return nil
	}
	attrs := link.Attrs()
	if len(attrs.HardwareAddr) != 6 {
		return fmt.Errorf("garp on %s: no ethernet address", attrs.Name)
	}
	fd, err := ad.arpSocket(attrs.Index, dropAll)
	if err != nil {
		return fmt.Errorf("garp socket on %s: %w", attrs.Name, err)
	}
	frames := make(map[netip.Addr][]byte, len(ips))
	for _, ip := range ips {
		frames[ip] = garpFrame(attrs.HardwareAddr, ip)
	}
	to := broadcastTo(attrs.Index)
	schedule := slices.Clone(garpSchedule)
	start := time.Now()

	ad.mu.Lock()
	if ad.active == nil {
		ad.active = map[netip.Addr]uint64{}
	}
	ad.gen++
	gen := ad.gen
	for _, ip := range ips {
		ad.active[ip] = gen
	}
	ad.mu.Unlock()
	// send sends one round for the IPs still active in this generation,
	// and reports how many there were. A repeat (not the first round,
	// right after the Apply that renewed the lease) skips an IP whose ARP
	// lease is not live: the agent did not run for a while, and the IP may
	// have moved meanwhile.
	send := func(repeat bool) (int, error) {
		ad.mu.Lock()
		defer ad.mu.Unlock()
		var errs []error
		n := 0
		for _, ip := range ips {
			if ad.active[ip] != gen {
				continue
			}
			n++
			if repeat && ad.leaseFresh != nil && !ad.leaseFresh(ip) {
				continue
			}
			if err := unix.Sendto(fd, frames[ip], 0, to); err != nil {
				errs = append(errs, fmt.Errorf("garp %s: %w", ip, err))
			}
		}
		return n, errors.Join(errs...)
	}
	finish := func() {
		ad.mu.Lock()
		for _, ip := range ips {
			if ad.active[ip] == gen {
				delete(ad.active, ip)
			}
		}
		ad.mu.Unlock()
		_ = unix.Close(fd)
	}
	if len(schedule) == 0 {
		finish()
		return nil
	}
	if _, err := send(false); err != nil {
		finish()
		return err
	}
	for _, ip := range ips {
		ad.log.Info("gratuitous arp sent", zap.Stringer("ip", ip), zap.String("uplink", attrs.Name),
			zap.Int("repeats", len(schedule)-1))
	}
	if len(schedule) == 1 {
		finish()
		return nil
	}
	ad.wg.Add(1)
	go func() {
		defer ad.wg.Done()
		defer finish()
		t := time.NewTimer(0)
		defer t.Stop()
		<-t.C
		for _, at := range schedule[1:] {
			t.Reset(time.Until(start.Add(at)))
			select {
			case <-ad.done:
				return
			case <-t.C:
			}
			n, err := send(true)
			if err != nil {
				ad.log.Warn("gratuitous arp failed", zap.Error(err))
			}
			if n == 0 {
				return // every IP was given up
			}
		}
	}()
	return nil
}

// stop ends the announcements of ips (given up, released or muted): once
// it returns, no gratuitous ARP claims them.
func (ad *addresses) stop(ips []netip.Addr) {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	for _, ip := range ips {
		delete(ad.active, ip)
	}
}

// stopAll ends every announcement.
func (ad *addresses) stopAll() {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	clear(ad.active)
}
