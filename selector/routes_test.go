package selector

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func assign(kv ...any) map[netip.Addr]int {
	m := map[netip.Addr]int{}
	for i := 0; i < len(kv); i += 2 {
		m[netip.MustParseAddr(kv[i].(string))] = kv[i+1].(int)
	}
	return m
}

func TestMarkValue(t *testing.T) {
	tests := []struct {
		mask  uint32
		index int
		want  uint32
	}{
		{0x3f00, 1, 0x100},
		{0x3f00, 2, 0x200},
		{0x3f00, 3, 0x300},
		{0x3f00, 63, 0x3f00},
		{0x3f00, 64, 0},
		{0x3f00, 0, 0},
		{0x3f00, -1, 0},
		{0x0, 1, 0},
		{0x8001, 1, 0x1},    // non-contiguous mask: lowest bit first
		{0x8001, 2, 0x8000}, // second bit
		{0x8001, 3, 0x8001},
		{0xffffffff, 65535, 0xffff},
		{0xffffffff, 65536, 0x10000}, // the reverse-path mark
		{0xffffffff, 65537, 0},
	}
	for _, tt := range tests {
		got := MarkValue(tt.mask, tt.index)
		if got != tt.want {
			t.Errorf("MarkValue(%#x, %d) = %#x, want %#x", tt.mask, tt.index, got, tt.want)
		}
	}
	// One index is reserved for the reverse-path mark, but with one bit,
	// and one for the replies, but with fewer than three.
	for mask, want := range map[uint32][3]int{0: {0, 0, 0}, 0x100: {1, 0, 0}, 0x300: {2, 3, 0}, 0x700: {5, 7, 6}, 0x3f00: {61, 63, 62},
		0xffff0000: {65533, 65535, 65534}, 0xffffffff: {65534, 65536, 65535}} {
		if got := MarkCapacity(mask); got != want[0] {
			t.Errorf("MarkCapacity(%#x) = %d, want %d", mask, got, want[0])
		}
		if got := RPMarkIndex(mask); got != want[1] {
			t.Errorf("RPMarkIndex(%#x) = %d, want %d", mask, got, want[1])
		}
		if got := ReplyMarkIndex(mask); got != want[2] {
			t.Errorf("ReplyMarkIndex(%#x) = %d, want %d", mask, got, want[2])
		}
		if rp := RPMarkIndex(mask); rp != 0 && rp <= MarkCapacity(mask) {
			t.Errorf("%#x: the reverse-path index %d is a next hop's", mask, rp)
		}
		if r := ReplyMarkIndex(mask); r != 0 && r <= MarkCapacity(mask) {
			t.Errorf("%#x: the reply index %d is a next hop's", mask, r)
		}
	}
}

func TestAllocateMarks(t *testing.T) {
	tests := []struct {
		name     string
		mask     uint32
		nextHops []netip.Addr
		existing map[netip.Addr]int
		want     map[netip.Addr]int
		wantErr  string
	}{
		{
			name: "empty",
			mask: 0x3f00,
			want: assign(),
		},
		{
			name:     "fresh lowest first in address order",
			mask:     0x3f00,
			nextHops: addrs("192.0.2.3", "192.0.2.2"),
			want:     assign("192.0.2.2", 1, "192.0.2.3", 2),
		},
		{
			name:     "duplicates collapse",
			mask:     0x3f00,
			nextHops: addrs("192.0.2.2", "192.0.2.2"),
			want:     assign("192.0.2.2", 1),
		},
		{
			name:     "existing kept",
			mask:     0x3f00,
			nextHops: addrs("192.0.2.2", "192.0.2.3"),
			existing: assign("192.0.2.3", 1, "192.0.2.2", 5),
			want:     assign("192.0.2.3", 1, "192.0.2.2", 5),
		},
		{
			name:     "new takes lowest never-held index, stale not reused while free ones exist",
			mask:     0x3f00,
			nextHops: addrs("192.0.2.2", "192.0.2.9"),
			existing: assign("192.0.2.2", 2, "192.0.2.4", 1),
			want:     assign("192.0.2.2", 2, "192.0.2.9", 3),
		},
		{
			name:     "stale reused when mask is full",
			mask:     0x0300, // 3 values, 2 for next hops (3 is the reverse-path mark)
			nextHops: addrs("192.0.2.1", "192.0.2.9"),
			existing: assign("192.0.2.1", 1, "192.0.2.7", 2),
			want:     assign("192.0.2.1", 1, "192.0.2.9", 2),
		},
		{
			name:     "exhausted",
			mask:     0x0300,
			nextHops: addrs("192.0.2.1", "192.0.2.2", "192.0.2.3"),
			wantErr:  "holds 2 next hops, 3 needed",
		},
		{
			name:     "zero mask",
			mask:     0,
			nextHops: addrs("192.0.2.1"),
			wantErr:  "holds 0 next hops",
		},
		{
			name:     "out of range existing ignored",
			mask:     0x0300,
			nextHops: addrs("192.0.2.1", "192.0.2.2"),
			existing: assign("192.0.2.1", 7, "192.0.2.2", 3), // 3: the reverse-path mark (held by an older version)
			want:     assign("192.0.2.1", 1, "192.0.2.2", 2),
		},
		{
			name:     "index claimed twice: lower address keeps it",
			mask:     0x3f00,
			nextHops: addrs("192.0.2.1", "192.0.2.2"),
			existing: assign("192.0.2.2", 4, "192.0.2.1", 4),
			want:     assign("192.0.2.1", 4, "192.0.2.2", 1),
		},
		{
			name:     "all stale, no wanted",
			mask:     0x3f00,
			existing: assign("192.0.2.2", 4),
			want:     assign(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AllocateMarks(tt.mask, tt.nextHops, tt.existing)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
			// Pure and stable: the result fed back as existing is a fixed point.
			again, err := AllocateMarks(tt.mask, tt.nextHops, got)
			if err != nil || !maps.Equal(again, got) {
				t.Fatalf("not stable: %v (%v), first %v", again, err, got)
			}
		})
	}
}

func TestNextHops(t *testing.T) {
	st := NodeState{Policies: []PolicyState{
		{Name: "a", Mode: ModeReroute, NextHop: netip.MustParseAddr("192.0.2.3")},
		{Name: "b", Mode: ModeGateway, EgressIP: netip.MustParseAddr("192.0.2.10")},
		{Name: "c", Mode: ModeReroute, NextHop: netip.MustParseAddr("192.0.2.2")},
		{Name: "d", Mode: ModeReroute, NextHop: netip.MustParseAddr("192.0.2.3")},
		{Name: "e", Mode: ModeDrop, NextHop: netip.MustParseAddr("192.0.2.4")},
	}}
	got := NextHops(st)
	want := addrs("192.0.2.2", "192.0.2.3")
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// TestLimitNextHops: within capacity every next hop is kept; beyond it the
// ones with a mark in the kernel keep theirs, then the lowest addresses.
func TestLimitNextHops(t *testing.T) {
	a := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, x := range s {
			out = append(out, netip.MustParseAddr(x))
		}
		return out
	}
	const mask = 0x3 // 3 marks, 2 for next hops
	kept, dropped := LimitNextHops(mask, a("192.0.2.2", "192.0.2.1"), nil)
	if !slices.Equal(kept, a("192.0.2.1", "192.0.2.2")) || dropped != nil {
		t.Fatalf("within capacity: kept %v dropped %v", kept, dropped)
	}
	kept, dropped = LimitNextHops(mask, a("192.0.2.5", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"),
		map[netip.Addr]int{netip.MustParseAddr("192.0.2.5"): 1, netip.MustParseAddr("192.0.2.9"): 2})
	if !slices.Equal(kept, a("192.0.2.1", "192.0.2.5")) || !slices.Equal(dropped, a("192.0.2.2", "192.0.2.3", "192.0.2.4")) {
		t.Fatalf("beyond capacity: kept %v dropped %v", kept, dropped)
	}
	if _, err := AllocateMarks(mask, kept, nil); err != nil {
		t.Fatalf("the kept next hops do not fit: %v", err)
	}
}

func TestUnroutableHolders(t *testing.T) {
	holders := map[string]netip.Addr{
		"n1": netip.MustParseAddr("192.0.2.11"), "n2": netip.MustParseAddr("192.0.2.12"),
		"n3": netip.MustParseAddr("192.0.2.13"), "n4": netip.MustParseAddr("192.0.2.14"),
	}
	if got := UnroutableHolders(0x3, holders); !slices.Equal(got, []string{"n3", "n4"}) {
		t.Fatalf("got %v, want [n3 n4]", got)
	}
	if got := UnroutableHolders(0x3f00, holders); got != nil {
		t.Fatalf("got %v, want none", got)
	}
}
