package bpf

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Route is one route of the main table as the classifier needs it.
type Route struct {
	Dst       netip.Prefix
	LinkIndex int
}

// PodInterfaces returns the interfaces, by index, the routes send this
// node's pods' addresses to: for each pod, the interface of the
// longest-prefix route covering it (pods no route covers are skipped);
// never the interface exclude (the uplink) nor index 0. Of several routes
// to one prefix the first counts, as the kernel lists them in order of
// preference. It covers routed pod networks (a /32 per pod via its
// host-side veth: the veth) and bridged ones (the pod CIDR on cni0: the
// bridge; see WithBridgePorts). Only IPv4 routes and pods count.
func PodInterfaces(routes []Route, pods []netip.Addr, exclude int) map[int]bool {
	byPrefix := make(map[netip.Prefix]int, len(routes))
	var lengths [33]bool // the prefix lengths routes have
	for _, r := range routes {
		if !r.Dst.IsValid() || !r.Dst.Addr().Is4() {
			continue
		}
		p := r.Dst.Masked()
		if _, ok := byPrefix[p]; !ok {
			byPrefix[p] = r.LinkIndex
			lengths[p.Bits()] = true
		}
	}
	out := map[int]bool{}
	for _, ip := range pods {
		ip = ip.Unmap()
		if !ip.Is4() {
			continue
		}
		for bits := 32; bits >= 0; bits-- {
			if !lengths[bits] {
				continue
			}
			p, _ := ip.Prefix(bits)
			if idx, ok := byPrefix[p]; ok {
				if idx > 0 && idx != exclude {
					out[idx] = true
				}
				break
			}
		}
	}
	return out
}

// WithBridgePorts returns ifaces plus the ports of those of them that
// are bridges (but never the interface exclude), in the calling thread's
// network namespace. Give it PodInterfaces' result when pods may be
// bridged: with br_netfilter (bridge-nf-call-iptables=1, as Kubernetes
// nodes with a bridge CNI have it), the IPv4 prerouting hooks and the
// routing decision of a packet a pod sends to the bridge run in the
// bridge's own input path, before the bridge's tc ingress, so that a
// mark written there is too late; a port's tc ingress runs before both.
func WithBridgePorts(ifaces map[int]bool, exclude int) (map[int]bool, error) {
	links, err := dump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := maps.Clone(ifaces)
	if out == nil {
		out = map[int]bool{}
	}
	bridges := map[int]bool{}
	for _, l := range links {
		if ifaces[l.Attrs().Index] && l.Type() == "bridge" {
			bridges[l.Attrs().Index] = true
		}
	}
	for _, l := range links {
		if a := l.Attrs(); bridges[a.MasterIndex] && a.Index != exclude {
			out[a.Index] = true
		}
	}
	return out, nil
}

// BridgePorts returns ifaces with every bridge among them replaced by its
// ports (but never the interface exclude), in the calling thread's network
// namespace: where the program goes. A port's tc ingress runs before
// anything else sees a bridged pod's packet. The bridge's own runs too late
// under br_netfilter (bridge-nf-call-iptables=1, see WithBridgePorts),
// after the IPv4 prerouting hooks: it would write the class again after
// egressnat's table read and cleared it, for every later hook (a
// NetworkPolicy implementation's marks) to see. Without br_netfilter the
// ports' mark reaches the bridge's IPv4 input unchanged.
func BridgePorts(ifaces map[int]bool, exclude int) (map[int]bool, error) {
	links, err := dump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	bridges := map[int]bool{}
	for _, l := range links {
		if ifaces[l.Attrs().Index] && l.Type() == "bridge" {
			bridges[l.Attrs().Index] = true
		}
	}
	out := map[int]bool{}
	for idx := range ifaces {
		if !bridges[idx] {
			out[idx] = true
		}
	}
	for _, l := range links {
		if a := l.Attrs(); bridges[a.MasterIndex] && a.Index != exclude {
			out[a.Index] = true
		}
	}
	return out, nil
}

// dumpRetries bounds the retries of a netlink dump that a concurrent
// change interrupted.
const dumpRetries = 5

// dump runs list again while the kernel reports the dump interrupted.
func dump[T any](list func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpRetries {
		var out []T
		if out, err = list(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

// MainRoutes reads the IPv4 unicast routes of the main table that have an
// output interface (multipath routes have none), in the calling thread's
// network namespace.
func MainRoutes() ([]Route, error) {
	rs, err := dump(func() ([]netlink.Route, error) {
		return netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := make([]Route, 0, len(rs))
	for _, r := range rs {
		if r.Type != unix.RTN_UNICAST || r.LinkIndex <= 0 {
			continue
		}
		dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if r.Dst != nil {
			a, ok := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			if !ok || !a.Unmap().Is4() {
				continue
			}
			dst = netip.PrefixFrom(a.Unmap(), ones)
		}
		out = append(out, Route{Dst: dst, LinkIndex: r.LinkIndex})
	}
	return out, nil
}

// Watch subscribes to link and IPv4 route changes in the calling thread's
// network namespace and calls kick, which must not block, after each
// change, until ctx is done. It returns once subscribed, or the error
// subscribing; the subscriptions' goroutines end with ctx. A subscription
// that breaks (an error, messages lost to a full socket buffer) is made
// again, with kick called right away and once more when it is back: the
// caller must then reconcile from a fresh read, as changes may have been
// missed.
func Watch(ctx context.Context, kick func()) error {
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stop := func() {
		cancel()
		go func() {
			wg.Wait()
			ns.Close()
		}()
	}
	links := func(ch chan<- netlink.LinkUpdate, done <-chan struct{}, onErr func(error)) error {
		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: onErr})
	}
	routes := func(ch chan<- netlink.RouteUpdate, done <-chan struct{}, onErr func(error)) error {
		return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: onErr})
	}
	if err := follow(ctx, &wg, kick, links, func(netlink.LinkUpdate) bool { return true }); err != nil {
		stop()
		return fmt.Errorf("subscribe to links: %w", err)
	}
	ipv4 := func(u netlink.RouteUpdate) bool { return u.Family != unix.AF_INET6 }
	if err := follow(ctx, &wg, kick, routes, ipv4); err != nil {
		stop()
		return fmt.Errorf("subscribe to routes: %w", err)
	}
	context.AfterFunc(ctx, stop)
	return nil
}

// subscribeFunc subscribes ch to a kind of netlink update until done is
// closed; the library closes ch when the subscription ends, and calls
// onErr on errors.
type subscribeFunc[T any] func(ch chan<- T, done <-chan struct{}, onErr func(error)) error

// Bounds of the wait between attempts to subscribe again.
var (
	resubscribeMin = 100 * time.Millisecond
	resubscribeMax = 5 * time.Second
)

// follow subscribes, then, in a goroutine counted in wg, calls kick for
// every update relevant keeps, and subscribes again whenever the
// subscription breaks, until ctx is done.
func follow[T any](ctx context.Context, wg *sync.WaitGroup, kick func(), subscribe subscribeFunc[T], relevant func(T) bool) error {
	type sub struct {
		ch     chan T
		done   chan struct{}
		broken chan struct{}
	}
	start := func() (sub, error) {
		s := sub{ch: make(chan T, 64), done: make(chan struct{}), broken: make(chan struct{}, 1)}
		onErr := func(error) {
			select {
			case s.broken <- struct{}{}:
			default:
			}
		}
		if err := subscribe(s.ch, s.done, onErr); err != nil {
			close(s.done)
			return sub{}, err
		}
		return s, nil
	}
	s, err := start()
	if err != nil {
		return err
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			var err error
			select {
			case u, ok := <-s.ch:
				if ok {
					if relevant(u) {
						kick()
					}
					continue
				}
			case <-s.broken:
			case <-ctx.Done():
			}
			// Ended or broken: close it and let its goroutine finish (it
			// closes ch).
			close(s.done)
			for range s.ch {
			}
			if ctx.Err() != nil {
				return
			}
			kick()
			wait := resubscribeMin
			for {
				if s, err = start(); err == nil {
					break
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
				wait = min(2*wait, resubscribeMax)
			}
			kick()
		}
	}()
	return nil
}

// pinnedLink is a file under dir/links: a tcx link Attach pinned, named
// after the index of its interface.
type pinnedLink struct {
	path string
	// name is the index in the file's name (-1 when it is no number).
	name int
	// l is nil when the file is no link.
	l link.Link
	// ifindex is the interface the link is attached to, 0 when it is not
	// attached in this network namespace to the interface it is named
	// after: its interface was deleted (the link is defunct, and the
	// index may since name another interface), or it is no tcx ingress
	// link.
	ifindex int
}

// loadPins opens the links pinned under dir/links (none when there is
// no such directory). The caller closes them with closePins.
func loadPins(dir string) ([]pinnedLink, error) {
	entries, err := os.ReadDir(filepath.Join(dir, pinLinks))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read pinned links: %w", err)
	}
	pins := make([]pinnedLink, 0, len(entries))
	for _, e := range entries {
		p := pinnedLink{path: filepath.Join(dir, pinLinks, e.Name()), name: -1}
		if n, err := strconv.Atoi(e.Name()); err == nil {
			p.name = n
		}
		if l, err := link.LoadPinnedLink(p.path, nil); err == nil {
			p.l = l
			p.ifindex = liveIndex(l, p.name)
		}
		pins = append(pins, p)
	}
	return pins, nil
}

func closePins(pins []pinnedLink) {
	for _, p := range pins {
		if p.l != nil {
			p.l.Close()
		}
	}
}

// liveIndex returns the interface the tcx ingress link l is attached to
// if that is the interface want of the calling thread's network
// namespace, else 0. The kernel reports index 0 for a link whose
// interface was deleted.
func liveIndex(l link.Link, want int) int {
	info, err := l.Info()
	if err != nil {
		return 0
	}
	tcx := info.TCX()
	if tcx == nil || uint32(tcx.AttachType) != uint32(ebpf.AttachTCXIngress) {
		return 0
	}
	idx := int(tcx.Ifindex)
	if idx == 0 || idx != want {
		return 0
	}
	if _, err := netlink.LinkByIndex(idx); err != nil {
		return 0
	}
	return idx
}

// tcFilters returns egressnat's clsact ingress filters (named
// filterName) in the calling thread's network namespace, by interface
// index.
func tcFilters() (map[int][]netlink.Filter, error) {
	qdiscs, err := dump(func() ([]netlink.Qdisc, error) { return netlink.QdiscList(nil) })
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	out := map[int][]netlink.Filter{}
	for _, q := range qdiscs {
		if q.Type() != "clsact" {
			continue
		}
		idx := q.Attrs().LinkIndex
		filters, err := dump(func() ([]netlink.Filter, error) {
			return netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}}, netlink.HANDLE_MIN_INGRESS)
		})
		if errors.Is(err, unix.ENODEV) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("list filters of interface %d: %w", idx, err)
		}
		for _, f := range filters {
			if nameOf(f) == filterName {
				out[idx] = append(out[idx], f)
			}
		}
	}
	return out, nil
}

// deleteFilters deletes egressnat's clsact filters from every interface
// of the calling thread's network namespace; the clsact qdiscs stay.
func deleteFilters() error {
	filters, err := tcFilters()
	if err != nil {
		return err
	}
	var errs []error
	for _, fs := range filters {
		errs = append(errs, delFilters(fs))
	}
	return errors.Join(errs...)
}

func delFilters(fs []netlink.Filter) error {
	for _, f := range fs {
		if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete filter on interface %d: %w", f.Attrs().LinkIndex, err)
		}
	}
	return nil
}

// attachments returns how the program under dir is attached in the
// calling thread's network namespace: the interfaces with a live pinned
// tcx link ("tcx") and those with egressnat's clsact filter ("tc").
func attachments(dir string) (tcx, tc map[int]bool, err error) {
	pins, err := loadPins(dir)
	if err != nil {
		return nil, nil, err
	}
	defer closePins(pins)
	tcx = map[int]bool{}
	for _, p := range pins {
		if p.ifindex > 0 {
			tcx[p.ifindex] = true
		}
	}
	filters, err := tcFilters()
	if err != nil {
		return nil, nil, err
	}
	tc = map[int]bool{}
	for idx := range filters {
		tc[idx] = true
	}
	return tcx, tc, nil
}

// Attached returns the interfaces, by index, the program is attached to
// in the calling thread's network namespace: those of the tcx links
// pinned under dir/links that are still attached to the interface they
// are named after (a link whose interface was deleted does not count,
// even when the index names another interface since), and those with a
// clsact ingress filter named "egressnat-classify".
func (c *Classifier) Attached() (map[int]bool, error) {
	tcx, tc, err := attachments(c.dir)
	if err != nil {
		return nil, err
	}
	for idx := range tc {
		tcx[idx] = true
	}
	return tcx, nil
}

// forget closes this process's handle on the tcx link of ifindex, if it
// has one.
func (c *Classifier) forget(ifindex int) error {
	l, ok := c.links[ifindex]
	if !ok {
		return nil
	}
	delete(c.links, ifindex)
	return l.Close()
}

// Reconcile attaches the program to every interface of want and detaches
// it from every other interface it is attached to in the calling
// thread's network namespace, including the pinned links of interfaces
// that no longer exist (they are unpinned, also when their index now
// names an interface of want, which is then attached anew). It returns
// how many interfaces it attached and detached; an error names the
// interfaces it could not attach or detach, and the others are done.
// Reconciling twice changes nothing the second time.
func (c *Classifier) Reconcile(want map[int]bool) (attached, detached int, err error) {
	pins, err := loadPins(c.dir)
	if err != nil {
		return 0, 0, err
	}
	defer closePins(pins)
	var errs []error
	have := map[int]bool{}
	pinned := map[int]bool{}
	for _, p := range pins {
		if p.ifindex > 0 && want[p.ifindex] {
			have[p.ifindex] = true
			pinned[p.ifindex] = true
			continue
		}
		// Unpinned, and this process's handles closed, the link is
		// released: that detaches it.
		if err := errors.Join(c.forget(p.name), os.Remove(p.path)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", p.path, err))
			continue
		}
		detached++
	}
	// Handles on links unpinned by someone else keep them attached.
	for idx := range c.links {
		if !pinned[idx] {
			errs = append(errs, c.forget(idx))
		}
	}
	filters, err := tcFilters()
	if err != nil {
		return attached, detached, errors.Join(append(errs, err)...)
	}
	for idx, fs := range filters {
		if want[idx] {
			have[idx] = true
			continue
		}
		if err := delFilters(fs); err != nil {
			errs = append(errs, err)
			continue
		}
		detached++
	}
	for idx := range want {
		if idx <= 0 || have[idx] {
			continue
		}
		if _, err := c.Attach(idx); err != nil {
			errs = append(errs, fmt.Errorf("interface %d: %w", idx, err))
			continue
		}
		attached++
	}
	return attached, detached, errors.Join(errs...)
}

// Snapshot is what is pinned under a classifier's directory and where the
// program is attached.
type Snapshot struct {
	Entries    map[netip.Addr]Class
	Interfaces []AttachedInterface
}

// AttachedInterface is an interface the program is attached to.
type AttachedInterface struct {
	Index int
	Name  string
	// Mode is "tcx" (a pinned tcx link) or "tc" (a clsact filter).
	Mode string
}

// Inspect reads, without loading the program, what is pinned under dir:
// the map's entries, and the interfaces the program is attached to in
// the calling thread's network namespace (by index, then mode), as
// Attached finds them. A dir that does not exist gives an empty Snapshot
// and no error.
func Inspect(dir string) (Snapshot, error) {
	s := Snapshot{Entries: map[netip.Addr]Class{}}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, pinMap), &ebpf.LoadPinOptions{ReadOnly: true})
	switch {
	case err == nil:
		defer m.Close()
		var k uint32
		var v classifierClass
		it := m.Iterate()
		for it.Next(&k, &v) {
			s.Entries[addr(k)] = Class{Mark: v.Mark, Mask: v.Mask}
		}
		if err := it.Err(); err != nil {
			return Snapshot{}, fmt.Errorf("read pods map: %w", err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return Snapshot{}, fmt.Errorf("open pods map: %w", err)
	}
	tcx, tc, err := attachments(dir)
	if err != nil {
		return Snapshot{}, err
	}
	for mode, idxs := range map[string]map[int]bool{"tcx": tcx, "tc": tc} {
		for idx := range idxs {
			a := AttachedInterface{Index: idx, Mode: mode}
			if l, err := netlink.LinkByIndex(idx); err == nil {
				a.Name = l.Attrs().Name
			}
			s.Interfaces = append(s.Interfaces, a)
		}
	}
	slices.SortFunc(s.Interfaces, func(a, b AttachedInterface) int {
		return cmp.Or(cmp.Compare(a.Index, b.Index), cmp.Compare(a.Mode, b.Mode))
	})
	return s, nil
}
