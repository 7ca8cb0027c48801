package nft

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/google/nftables"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
)

// The eBPF classifier (Config.Classifier). A tc program on the pod-facing
// interfaces writes each of this node's pods' class into its packets' mark
// (under Config.ClassMask) from a BPF map the Dataplane keeps, and the
// table dispatches on it: `meta mark & <class mask> vmap @pre-class`
// before `ip saddr vmap @pre-src`. Each Reroute or Drop policy chain and
// chainMulti get a class (selector.AllocateClasses); pods of a chain left
// without one (more chains than the mask holds) keep their element in
// pre-src as in the nftables mode. The known pods are in the map too
// (selector.KnownClass at least): the hold rule lets a packet go when its
// class is one of the classes set (a live class), so the known-pods set
// stays empty, and a pod whose interface the program is not attached to
// yet is held like one the agent does not know. chainClassClear clears
// the class bits right after.
//
// pre-class and classes are keyed by marks (`type mark`); their keys are
// handled as netip.Addr like the other sets' (classKey: the four bytes
// nftables compares `meta mark & mask` with, host order).

// PodClassifier is the eBPF classifier's map as the Dataplane writes it
// (a *bpf.Classifier).
type PodClassifier interface {
	Entries() (map[netip.Addr]bpf.Class, error)
	Update(put map[netip.Addr]bpf.Class, del []netip.Addr) error
}

// setClasses: the live classes; setPreClass: each class's chain (eBPF
// mode only). Their keys are marks.
const (
	setClasses  = "classes"
	setPreClass = "pre-class"
)

// MarkKeyed reports whether our set or map name is keyed by marks (the
// eBPF classifier's classes) rather than by IPv4 addresses.
func MarkKeyed(name string) bool { return keyType(name).Name == nftables.TypeMark.Name }

// keyType is the key type of the set name: a mark for the eBPF mode's
// class sets, an IPv4 address for the others.
func keyType(name string) nftables.SetDatatype {
	if name == setClasses || name == setPreClass {
		return nftables.TypeMark
	}
	return nftables.TypeIPAddr
}

// classKey is the element key of class mark value v.
func classKey(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func classOfKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// classIndex is the index of mark value v under mask (the inverse of
// selector.MarkValue).
func classIndex(mask, v uint32) int {
	idx, bit := 0, 1
	for m := mask; m != 0; m &= m - 1 {
		if v&(m&-m) != 0 {
			idx |= bit
		}
		bit <<= 1
	}
	return idx
}

// CheckClassMask reports why mask cannot hold the eBPF classifier's
// classes next to the mark mask markMask (nil when it can).
func CheckClassMask(mask, markMask uint32) error { return checkClassMask(mask, markMask) }

// checkClassMask reports why mask cannot hold classes next to markMask.
func checkClassMask(mask, markMask uint32) error {
	switch {
	case selector.MaxMarkIndex(mask) < selector.KnownClass+1:
		return fmt.Errorf("class mark mask %#08x: needs at least two bits", mask)
	case mask&markMask != 0:
		return fmt.Errorf("class mark mask %#08x overlaps the mark mask %#08x", mask, markMask)
	}
	return nil
}

// existingClasses reads the class index of each chain from the pre-class
// map's keys.
func existingClasses(mask uint32, classJumps map[netip.Addr]string) map[string]int {
	out := map[string]int{}
	for a, ch := range classJumps {
		out[ch] = classIndex(mask, classOfKey(a))
	}
	return out
}

// classPlan is what the eBPF mode wants of the table and of the map.
type classPlan struct {
	index      map[string]int           // chain -> class index
	classJumps map[netip.Addr]string    // pre-class: class key -> chain
	jumps      map[netip.Addr]string    // pre-src: the pods of chains without a class
	live       []netip.Addr             // the classes set, sorted
	entries    map[netip.Addr]bpf.Class // the classifier's map
	// net: every pod with a chain keeps its pre-src element too, a safety
	// net for a pod the program has not classified (an interface it is
	// not attached to yet). Without pod networks there is no hold rule
	// to hold such a pod, and it would leave unsteered.
	net bool
}

// classChains are the chains a class can dispatch to: chainMulti and
// each Reroute or Drop policy's.
func classChains(st selector.NodeState) []string {
	var out []string
	for name, def := range chainDefs(st, false) {
		if def.base == nil {
			out = append(out, name)
		}
	}
	return out
}

// planClasses computes the eBPF mode's table and map content from the
// jumps of every pod (preSrcTargets), this node's known pods, and the
// class of each chain in the kernel.
func planClasses(mask uint32, st selector.NodeState, podJumps map[netip.Addr]string, local []netip.Addr, existing map[string]int) classPlan {
	cp := classPlan{
		net:        len(st.PodNetworks) == 0,
		index:      selector.AllocateClasses(mask, classChains(st), existing),
		classJumps: map[netip.Addr]string{},
		jumps:      map[netip.Addr]string{},
		entries:    map[netip.Addr]bpf.Class{},
	}
	cp.live = append(cp.live, classKey(selector.MarkValue(mask, selector.KnownClass)))
	for ch, idx := range cp.index {
		k := classKey(selector.MarkValue(mask, idx))
		cp.classJumps[k] = ch
		cp.live = append(cp.live, k)
	}
	slices.SortFunc(cp.live, netip.Addr.Compare)
	cp.fill(mask, podJumps, local)
	return cp
}

// fill sets the map's entries and the jumps of pods of chains without a
// class, from the classes of cp.index.
func (cp *classPlan) fill(mask uint32, podJumps map[netip.Addr]string, local []netip.Addr) {
	for _, a := range local {
		cp.entry(mask, a, podJumps)
	}
	for a := range podJumps {
		if _, done := cp.entries[a]; !done {
			cp.entry(mask, a, podJumps)
		}
	}
}

// entry sets pod a's map entry and pre-src element from its chain (none:
// a known pod).
func (cp *classPlan) entry(mask uint32, a netip.Addr, podJumps map[netip.Addr]string) {
	idx := selector.KnownClass
	if ch, ok := podJumps[a]; ok {
		if i, ok := cp.index[ch]; ok {
			idx = i
		}
		if _, ok := cp.index[ch]; !ok || cp.net {
			cp.jumps[a] = ch
		}
	}
	cp.entries[a] = bpf.Class{Mark: selector.MarkValue(mask, idx), Mask: mask}
}

// transitional returns the pre-class and pre-src maps and the classes set
// to apply before the classifier's map is rewritten: cp's, plus what the
// kernel holds (haveClass, haveSrc) that still dispatches to a chain the
// state keeps, so that a pod is dispatched as before until its new class
// is in the map. ok is false when that is cp itself.
func (cp classPlan) transitional(haveClass, haveSrc map[netip.Addr]string, st selector.NodeState) (classJumps, jumps map[netip.Addr]string, live []netip.Addr, ok bool) {
	chains := chainDefs(st, false)
	keep := func(want, have map[netip.Addr]string, class bool) map[netip.Addr]string {
		out := maps.Clone(want)
		for a, ch := range have {
			if _, kept := chains[ch]; !kept {
				continue
			}
			if _, wanted := out[a]; wanted {
				continue
			}
			out[a] = ch
			ok = true
			if class {
				live = append(live, a)
			}
		}
		return out
	}
	live = slices.Clone(cp.live)
	classJumps, jumps = keep(cp.classJumps, haveClass, true), keep(cp.jumps, haveSrc, false)
	slices.SortFunc(live, netip.Addr.Compare)
	return classJumps, jumps, slices.Compact(live), ok
}

// classState is the eBPF mode's part of a Dataplane.
type classState struct {
	pc   PodClassifier
	mask uint32
	// entries: the map's content as last written; nil: unknown (read
	// before the next write).
	entries map[netip.Addr]bpf.Class
	// podJumps: the chain of every pod with one (preSrcTargets) as last
	// applied; index the class of each chain.
	podJumps map[netip.Addr]string
	index    map[string]int
	// local: the known pods as last applied; net: classPlan.net then.
	local []netip.Addr
	net   bool
}

// sync makes the map hold exactly want. It returns how many entries it
// wrote and deleted.
func (c *classState) sync(want map[netip.Addr]bpf.Class) (written, deleted int, err error) {
	if err := c.read(); err != nil {
		return 0, 0, err
	}
	var del []netip.Addr
	for a := range c.entries {
		if _, ok := want[a]; !ok {
			del = append(del, a)
		}
	}
	return c.update(want, del)
}

// read reads the map's content when it is not known.
func (c *classState) read() error {
	if c.entries != nil {
		return nil
	}
	have, err := c.pc.Entries()
	if err != nil {
		return fmt.Errorf("read classifier map: %w", err)
	}
	c.entries = have
	return nil
}

// update writes the entries of put that differ from the map's, then
// deletes the entries del names. It returns how many it wrote and deleted.
func (c *classState) update(put map[netip.Addr]bpf.Class, del []netip.Addr) (written, deleted int, err error) {
	if err := c.read(); err != nil {
		return 0, 0, err
	}
	changed := map[netip.Addr]bpf.Class{}
	for a, cl := range put {
		if have, ok := c.entries[a]; !ok || have != cl {
			changed[a] = cl
		}
	}
	var gone []netip.Addr
	for _, a := range del {
		if _, ok := c.entries[a]; ok {
			gone = append(gone, a)
		}
	}
	if len(changed)+len(gone) == 0 {
		return 0, 0, nil
	}
	if err := c.pc.Update(changed, gone); err != nil {
		c.entries = nil
		return 0, 0, fmt.Errorf("write classifier map: %w", err)
	}
	maps.Copy(c.entries, changed)
	for _, a := range gone {
		delete(c.entries, a)
	}
	return len(changed), len(gone), nil
}

// incremental computes what an incremental Apply changes for the pods it
// touches: those whose chain changes (affected; their chain is now
// mapWant's, none when absent) and the known pods added or removed
// (localTouched; localNow are the known pods after it, sorted). It returns
// their map entries and pre-src elements (cp.entries, cp.jumps), the pods
// to delete from the map, and every pod it looked at.
func (c *classState) incremental(podJumps map[netip.Addr]string, affected map[netip.Addr]bool, mapWant map[netip.Addr]string,
	localNow, localTouched []netip.Addr) (cp *classPlan, gone, touched []netip.Addr) {
	cp = &classPlan{index: c.index, jumps: map[netip.Addr]string{}, entries: map[netip.Addr]bpf.Class{}, net: c.net}
	seen := map[netip.Addr]bool{}
	for a := range affected {
		seen[a] = true
	}
	for _, a := range localTouched {
		seen[a] = true
	}
	for a := range seen {
		touched = append(touched, a)
		ch, jumped := podJumps[a]
		if affected[a] {
			ch, jumped = mapWant[a]
		}
		_, known := slices.BinarySearchFunc(localNow, a, netip.Addr.Compare)
		if !known && !jumped {
			gone = append(gone, a)
			continue
		}
		view := map[netip.Addr]string{}
		if jumped {
			view[a] = ch
		}
		cp.entry(c.mask, a, view)
	}
	return cp, gone, touched
}

// verifyClasses compares the classifier's map with what this Dataplane
// last wrote; on a difference the next Apply rewrites it (full path). ""
// means no difference, or no classifier.
func (d *Dataplane) verifyClasses(ctx context.Context) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cls == nil || d.cls.entries == nil {
		return "", ctx.Err()
	}
	have, err := d.cls.pc.Entries()
	if err != nil {
		return "", fmt.Errorf("read classifier map: %w", err)
	}
	if maps.Equal(have, d.cls.entries) {
		return "", nil
	}
	drift := fmt.Sprintf("classifier map differs: %d entries, %d written", len(have), len(d.cls.entries))
	d.cls.entries = nil
	d.recheck = true
	return drift, nil
}
