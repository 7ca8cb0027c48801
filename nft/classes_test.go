package nft

import (
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
)

func TestPlanClasses(t *testing.T) {
	a := netip.MustParseAddr
	p1, p2, p3, p4 := a("10.244.1.1"), a("10.244.1.2"), a("10.244.1.3"), a("10.244.1.4")
	st := selector.NodeState{
		Policies: []selector.PolicyState{
			{Name: "a", Mode: selector.ModeReroute, NextHop: a("192.0.2.12"), Sources: []netip.Addr{p1, p3}},
			{Name: "b", Mode: selector.ModeDrop, Sources: []netip.Addr{p2, p3}},
		},
		PodNetworks: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}
	local := []netip.Addr{p1, p2, p3, p4}
	cls := func(mask uint32, idx int) bpf.Class {
		return bpf.Class{Mark: selector.MarkValue(mask, idx), Mask: mask}
	}
	key := func(mask uint32, idx int) netip.Addr { return classKey(selector.MarkValue(mask, idx)) }
	noNets := st
	noNets.PodNetworks = nil
	for _, tc := range []struct {
		name      string
		mask      uint32
		st        selector.NodeState
		existing  map[string]int
		index     map[string]int
		jumps     map[netip.Addr]string
		entries   map[netip.Addr]int
		liveCount int
	}{
		{name: "every chain a class", mask: 0xff0000, st: st,
			index:   map[string]int{"multi": 2, "pp-a": 3, "pp-b": 4},
			jumps:   map[netip.Addr]string{},
			entries: map[netip.Addr]int{p1: 3, p2: 4, p3: 2, p4: 1}, liveCount: 4},
		{name: "kept from the kernel", mask: 0xff0000, st: st, existing: map[string]int{"pp-b": 9, "pp-gone": 2},
			index:   map[string]int{"multi": 3, "pp-a": 4, "pp-b": 9},
			jumps:   map[netip.Addr]string{},
			entries: map[netip.Addr]int{p1: 4, p2: 9, p3: 3, p4: 1}, liveCount: 4},
		{name: "more chains than classes: by address", mask: 0x30000, st: st,
			index:   map[string]int{"multi": 2, "pp-a": 3},
			jumps:   map[netip.Addr]string{p2: "pp-b"},
			entries: map[netip.Addr]int{p1: 3, p2: 1, p3: 2, p4: 1}, liveCount: 3},
		{name: "no pod networks: every pod with a chain by address too", mask: 0xff0000, st: noNets,
			index:   map[string]int{"multi": 2, "pp-a": 3, "pp-b": 4},
			jumps:   map[netip.Addr]string{p1: "pp-a", p2: "pp-b", p3: chainMulti},
			entries: map[netip.Addr]int{p1: 3, p2: 4, p3: 2, p4: 1}, liveCount: 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := planClasses(tc.mask, tc.st, preSrcTargets(tc.st), local, tc.existing)
			if !maps.Equal(cp.index, tc.index) {
				t.Errorf("index %v, want %v", cp.index, tc.index)
			}
			if !maps.Equal(cp.jumps, tc.jumps) {
				t.Errorf("pre-src %v, want %v", cp.jumps, tc.jumps)
			}
			want := map[netip.Addr]bpf.Class{}
			for p, idx := range tc.entries {
				want[p] = cls(tc.mask, idx)
			}
			if !maps.Equal(cp.entries, want) {
				t.Errorf("map %v, want %v", cp.entries, want)
			}
			for ch, idx := range tc.index {
				if cp.classJumps[key(tc.mask, idx)] != ch {
					t.Errorf("pre-class lacks %d -> %s: %v", idx, ch, cp.classJumps)
				}
			}
			if len(cp.classJumps) != len(tc.index) || len(cp.live) != tc.liveCount || !slices.Contains(cp.live, key(tc.mask, selector.KnownClass)) {
				t.Errorf("pre-class %v, classes %v", cp.classJumps, cp.live)
			}
		})
	}

	// transitional: what the kernel holds and still dispatches to a chain
	// of the state stays until the map is written; a removed chain's class
	// goes at once.
	cp := planClasses(0xff0000, st, preSrcTargets(st), local, map[string]int{"pp-a": 7})
	haveClass := map[netip.Addr]string{key(0xff0000, 7): "pp-a", key(0xff0000, 8): "pp-gone", key(0xff0000, 5): "pp-b"}
	haveSrc := map[netip.Addr]string{p2: "pp-b", p4: "pp-gone"}
	classJumps, jumps, live, ok := cp.transitional(haveClass, haveSrc, st)
	if !ok {
		t.Fatal("transitional: nothing kept")
	}
	if classJumps[key(0xff0000, 5)] != "pp-b" || classJumps[key(0xff0000, 8)] != "" || classJumps[key(0xff0000, 7)] != "pp-a" {
		t.Errorf("transitional pre-class %v", classJumps)
	}
	if jumps[p2] != "pp-b" || jumps[p4] != "" {
		t.Errorf("transitional pre-src %v", jumps)
	}
	if !slices.Contains(live, key(0xff0000, 5)) || slices.Contains(live, key(0xff0000, 8)) {
		t.Errorf("transitional classes %v", live)
	}
	if _, _, _, ok := cp.transitional(cp.classJumps, cp.jumps, st); ok {
		t.Error("transitional from the plan itself keeps something")
	}
}

func TestClassIndex(t *testing.T) {
	for _, mask := range []uint32{0xff0000, 0x30000, 0x0f0f0000, 0x1} {
		for idx := 1; idx <= selector.MaxMarkIndex(mask); idx++ {
			if got := classIndex(mask, selector.MarkValue(mask, idx)); got != idx {
				t.Fatalf("classIndex(%#x, MarkValue(%d)) = %d", mask, idx, got)
			}
		}
	}
	if err := CheckClassMask(0xff0000, 0x3f00); err != nil {
		t.Error(err)
	}
	for _, bad := range []uint32{0x10000, 0x3f00 | 0x10000} {
		if CheckClassMask(bad, 0x3f00) == nil {
			t.Errorf("CheckClassMask(%#x) accepted", bad)
		}
	}
}
