package nft

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Gratuitous ARP: how many, and how far apart.
var (
	garpCount    = 3
	garpInterval = 80 * time.Millisecond
)

// GratuitousARPs is how many frames announce one floating IP.
func GratuitousARPs() int { return garpCount }

// addresses owns the floating IPs on the uplink and their gratuitous ARP.
type addresses struct {
	cfg Config
	log *zap.Logger
	// announced: floating IPs announced by this process.
	announced map[netip.Addr]bool
	wg        *sync.WaitGroup
	done      <-chan struct{}
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

// garpFrame builds a gratuitous ARP request as an ethernet frame: sender and
// target IP are ip, sender MAC is mac, target MAC zero, sent to broadcast.
func garpFrame(mac net.HardwareAddr, ip netip.Addr) []byte {
	f := make([]byte, 0, 42)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff) // destination: broadcast
	f = append(f, mac...)                             // source
	f = append(f, 0x08, 0x06)                         // EtherType ARP
	f = append(f, 0x00, 0x01)                         // hardware type ethernet
	f = append(f, 0x08, 0x00)                         // protocol IPv4
	f = append(f, 6, 4)                               // address lengths
	f = append(f, 0x00, 0x01)                         // operation request
	a := ip.As4()
	f = append(f, mac...)  // sender MAC
	f = append(f, a[:]...) // sender IP
	f = append(f, 0, 0, 0, 0, 0, 0)
	f = append(f, a[:]...) // target IP
	return f
}

const ethPARP = 0x0806

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// garpSocket opens an AF_PACKET socket bound to the uplink, in the
// configured network namespace.
func (ad *addresses) garpSocket(ifindex int) (int, error) {
	fd := -1
	err := ad.cfg.inNetNS(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(ethPARP)))
		return err
	})
	if err != nil {
		return -1, err
	}
	// Sending only: a filter that drops everything keeps the receive queue
	// empty.
	drop := []unix.SockFilter{{Code: 0x06, K: 0}} // ret #0
	prog := unix.SockFprog{Len: 1, Filter: &drop[0]}
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

// announce sends gratuitous ARP for ips on the uplink: the first round now,
// the others from a goroutine that stops when ctx ends or the Dataplane
// closes.
func (ad *addresses) announce(ctx context.Context, link netlink.Link, ips []netip.Addr) error {
	if len(ips) == 0 {
		return nil
	}
	attrs := link.Attrs()
	if len(attrs.HardwareAddr) != 6 {
		return fmt.Errorf("garp on %s: no ethernet address", attrs.Name)
	}
	fd, err := ad.garpSocket(attrs.Index)
	if err != nil {
		return fmt.Errorf("garp socket on %s: %w", attrs.Name, err)
	}
	frames := make([][]byte, 0, len(ips))
	for _, ip := range ips {
		frames = append(frames, garpFrame(attrs.HardwareAddr, ip))
	}
	to := &unix.SockaddrLinklayer{Protocol: htons(ethPARP), Ifindex: attrs.Index, Halen: 6}
	copy(to.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	send := func() error {
		var errs []error
		for i, f := range frames {
			if err := unix.Sendto(fd, f, 0, to); err != nil {
				errs = append(errs, fmt.Errorf("garp %s: %w", ips[i], err))
			}
		}
		return errors.Join(errs...)
	}
	if err := send(); err != nil {
		_ = unix.Close(fd)
		return err
	}
	for _, ip := range ips {
		ad.log.Info("gratuitous arp sent", zap.Stringer("ip", ip), zap.String("uplink", attrs.Name))
	}
	ad.wg.Add(1)
	go func() {
		defer ad.wg.Done()
		defer unix.Close(fd)
		t := time.NewTicker(garpInterval)
		defer t.Stop()
		for range garpCount - 1 {
			select {
			case <-ctx.Done():
				return
			case <-ad.done:
				return
			case <-t.C:
			}
			if err := send(); err != nil {
				ad.log.Warn("gratuitous arp failed", zap.Error(err))
			}
		}
	}()
	return nil
}
