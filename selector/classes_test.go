package selector

import (
	"maps"
	"testing"
)

func TestAllocateClasses(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mask     uint32
		chains   []string
		existing map[string]int
		want     map[string]int
	}{
		{name: "fresh, sorted from 2", mask: 0xff0000, chains: []string{"pp-b", "multi", "pp-a"},
			want: map[string]int{"multi": 2, "pp-a": 3, "pp-b": 4}},
		{name: "kept", mask: 0xff0000, chains: []string{"pp-a", "pp-b"}, existing: map[string]int{"pp-b": 7, "pp-a": 9},
			want: map[string]int{"pp-a": 9, "pp-b": 7}},
		{name: "a freed index is not reused in the same round", mask: 0x30000, chains: []string{"pp-new"},
			existing: map[string]int{"pp-old": 2, "pp-kept": 3}, want: map[string]int{}},
		{name: "new takes the lowest index not held", mask: 0xff0000, chains: []string{"pp-a", "pp-c"},
			existing: map[string]int{"pp-a": 2, "pp-gone": 3}, want: map[string]int{"pp-a": 2, "pp-c": 4}},
		{name: "overflow: the first chains in order get one", mask: 0x30000, chains: []string{"c", "b", "a"},
			want: map[string]int{"a": 2, "b": 3}},
		{name: "invalid existing indexes ignored", mask: 0x30000, chains: []string{"a", "b"},
			existing: map[string]int{"a": 1, "b": 9}, want: map[string]int{"a": 2, "b": 3}},
		{name: "an index claimed twice: the first name keeps it", mask: 0xff0000, chains: []string{"a", "b"},
			existing: map[string]int{"a": 5, "b": 5}, want: map[string]int{"a": 5, "b": 2}},
		{name: "one bit: no class", mask: 0x10000, chains: []string{"a"}, want: map[string]int{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := AllocateClasses(tc.mask, tc.chains, tc.existing)
			if !maps.Equal(got, tc.want) {
				t.Errorf("AllocateClasses = %v, want %v", got, tc.want)
			}
		})
	}
	if got := ClassCapacity(DefaultClassMask); got != 254 {
		t.Errorf("ClassCapacity(default) = %d, want 254", got)
	}
}
