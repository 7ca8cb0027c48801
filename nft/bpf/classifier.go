// Package bpf is egressnat's optional eBPF pod classifier: a tc program
// (tcx where the kernel has it, a clsact filter otherwise) on the
// pod-facing interfaces that writes each known pod's class into the
// packet's mark from a BPF map (pod IP → class), before routing. The
// nftables table dispatches on that mark instead of holding one set
// element per pod.
//
// The program and the map are pinned under a bpffs directory, so that
// traffic stays classified while the agent restarts; Remove unpins and
// detaches everything.
package bpf

//go:generate go tool bpf2go -cc clang -target bpfel classifier src/classifier.c -- -O2 -Wall -Werror -I/usr/include/x86_64-linux-gnu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Class is what the program writes into a pod's packets' mark: Mark under
// Mask (the other bits are kept).
type Class struct {
	Mark, Mask uint32
}

// Classifier owns the loaded program and its map, pinned under Dir.
type Classifier struct {
	dir  string
	objs classifierObjects
	// links: the tcx links this process attached or found pinned, by
	// interface index.
	links map[int]link.Link
}

// Names under Dir.
const (
	pinMap   = "pods"
	pinProg  = "classify"
	pinLinks = "links"
)

// Supported reports why the classifier cannot pin under dir (nil when it
// can): dir, or its parent when dir does not exist yet, must be a bpffs.
func Supported(dir string) error {
	var st unix.Statfs_t
	err := unix.Statfs(dir, &st)
	if errors.Is(err, unix.ENOENT) {
		err = unix.Statfs(filepath.Dir(dir), &st) // made by Load
	}
	if err != nil {
		return fmt.Errorf("bpffs %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not on a bpffs (the host's /sys/fs/bpf must be one: mount -t bpf bpf /sys/fs/bpf)", dir)
	}
	return nil
}

// Load loads the program and its map, or opens the ones pinned under dir
// by an earlier agent (their entries are kept).
func Load(dir string) (*Classifier, error) {
	if err := Supported(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, pinLinks), 0o700); err != nil {
		return nil, fmt.Errorf("pin directory: %w", err)
	}
	c := &Classifier{dir: dir, links: map[int]link.Link{}}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}
	spec, err := loadClassifier()
	if err != nil {
		return nil, fmt.Errorf("classifier spec: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
	}
	if err := spec.LoadAndAssign(&c.objs, opts); err != nil {
		return nil, fmt.Errorf("load classifier: %w", err)
	}
	return c, nil
}

// Close releases this process's handles; what is pinned stays.
func (c *Classifier) Close() error {
	var errs []error
	for _, l := range c.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, c.objs.Close())
	return errors.Join(errs...)
}

func key(ip netip.Addr) (uint32, error) {
	ip = ip.Unmap()
	if !ip.Is4() {
		return 0, fmt.Errorf("%s is not an IPv4 address", ip)
	}
	b := ip.As4()
	return binary.NativeEndian.Uint32(b[:]), nil
}

func addr(k uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], k)
	return netip.AddrFrom4(b)
}

// Entries returns the map's entries.
func (c *Classifier) Entries() (map[netip.Addr]Class, error) {
	out := map[netip.Addr]Class{}
	var k uint32
	var v classifierClass
	it := c.objs.Pods.Iterate()
	for it.Next(&k, &v) {
		out[addr(k)] = Class{Mark: v.Mark, Mask: v.Mask}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read pods map: %w", err)
	}
	return out, nil
}

// Sync makes the map hold exactly want: new and changed entries first,
// then the ones no longer wanted. It returns how many it wrote and
// deleted.
func (c *Classifier) Sync(want map[netip.Addr]Class) (written, deleted int, err error) {
	have, err := c.Entries()
	if err != nil {
		return 0, 0, err
	}
	var keys []uint32
	var vals []classifierClass
	for ip, cl := range want {
		if h, ok := have[ip.Unmap()]; ok && h == cl {
			continue
		}
		k, err := key(ip)
		if err != nil {
			return 0, 0, err
		}
		keys = append(keys, k)
		vals = append(vals, classifierClass{Mark: cl.Mark, Mask: cl.Mask})
	}
	if len(keys) > 0 {
		if n, err := c.objs.Pods.BatchUpdate(keys, vals, nil); err != nil {
			if !errors.Is(err, ebpf.ErrNotSupported) {
				return n, 0, fmt.Errorf("write pods map: %w", err)
			}
			for i := range keys {
				if err := c.objs.Pods.Put(keys[i], vals[i]); err != nil {
					return i, 0, fmt.Errorf("write pods map: %w", err)
				}
			}
		}
		written = len(keys)
	}
	for ip := range have {
		if _, ok := want[ip]; ok {
			continue
		}
		k, _ := key(ip)
		if err := c.objs.Pods.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return written, deleted, fmt.Errorf("delete from pods map: %w", err)
		}
		deleted++
	}
	return written, deleted, nil
}

// Attach attaches the program to the ingress of the interface ifindex (in
// the calling thread's network namespace): a tcx link, pinned, where the
// kernel has tcx; a clsact qdisc and a direct-action filter otherwise.
// Attaching twice is a no-op.
func (c *Classifier) Attach(ifindex int) (mode string, err error) {
	if _, ok := c.links[ifindex]; ok {
		return "tcx", nil
	}
	pin := filepath.Join(c.dir, pinLinks, fmt.Sprint(ifindex))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		c.links[ifindex] = l
		return "tcx", nil
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: c.objs.Classify, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		if err := l.Pin(pin); err != nil {
			l.Close()
			return "", fmt.Errorf("pin tcx link: %w", err)
		}
		c.links[ifindex] = l
		return "tcx", nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return "", fmt.Errorf("attach tcx: %w", err)
	}
	return "tc", c.attachTC(ifindex)
}

// filterName marks the clsact filters egressnat adds; filterPriority and
// filterHandle are their place (a priority of egressnat's, so that the
// filter never replaces another tool's at the usual pref 1 handle 1).
const (
	filterName     = "egressnat-classify"
	filterPriority = 0x2e63 // "." "c"
	filterHandle   = 0x2e63
)

func (c *Classifier) attachTC(ifindex int) error {
	qd := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0),
		Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := netlink.QdiscReplace(qd); err != nil {
		return fmt.Errorf("clsact qdisc: %w", err)
	}
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS,
		Handle: filterHandle, Protocol: unix.ETH_P_ALL, Priority: filterPriority}, Fd: c.objs.Classify.FD(), Name: filterName, DirectAction: true}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("bpf filter: %w", err)
	}
	return nil
}

// Detach removes the program from the interface ifindex (its pinned tcx
// link, or egressnat's clsact filter).
func (c *Classifier) Detach(ifindex int) error {
	pin := filepath.Join(c.dir, pinLinks, fmt.Sprint(ifindex))
	if l, ok := c.links[ifindex]; ok {
		delete(c.links, ifindex)
		err := errors.Join(l.Unpin(), l.Close())
		return err
	}
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		return errors.Join(l.Unpin(), l.Close())
	}
	filters, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return fmt.Errorf("list filters: %w", err)
	}
	for _, f := range filters {
		if nameOf(f) == filterName {
			if err := netlink.FilterDel(f); err != nil {
				return fmt.Errorf("delete filter: %w", err)
			}
		}
	}
	return nil
}

func nameOf(f netlink.Filter) string {
	if bf, ok := f.(*netlink.BpfFilter); ok {
		return bf.Name
	}
	return ""
}

// Remove unpins the map and the links under dir (what Load and Attach
// pinned), removes dir, and deletes the clsact filters named
// "egressnat-classify" (the tc fallback's) from every interface of the
// calling thread's network namespace: the program goes with its last
// link or filter, the map with its last user. The clsact qdiscs stay:
// other programs' filters may hang from them, and an empty one costs
// nothing.
func Remove(dir string) error {
	errs := []error{deleteFilters()}
	links, _ := os.ReadDir(filepath.Join(dir, pinLinks))
	for _, e := range links {
		p := filepath.Join(dir, pinLinks, e.Name())
		if l, err := link.LoadPinnedLink(p, nil); err == nil {
			errs = append(errs, l.Unpin(), l.Close())
		} else {
			errs = append(errs, os.Remove(p))
		}
	}
	for _, p := range []string{filepath.Join(dir, pinLinks), filepath.Join(dir, pinMap), dir} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
