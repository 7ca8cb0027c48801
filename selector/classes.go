package selector

import (
	"maps"
	"slices"
)

// Pod classes of the eBPF classifier (see nft and nft/bpf): the program
// writes each of this node's pods' class into its packets' mark, under a
// class mask, and nftables dispatches on it. Class index KnownClass marks a
// pod the agent knows that no class dispatches (let through, not held);
// the others name the chain of one Reroute or Drop policy, or the chain of
// the addresses several policies select.
const (
	// KnownClass is the class index of a known pod without a class of
	// its own.
	KnownClass = 1
	// DefaultClassMask holds the mark bits of the classes: clear of
	// DefaultMarkMask and of kube-proxy (0x4000, 0x8000); inside Calico's
	// default mark mask (0xffff0000), so Calico users choose another one.
	DefaultClassMask uint32 = 0x00ff0000
)

// ClassCapacity is how many chains mask can give a class: every class
// index but 0 (unclassified) and KnownClass.
func ClassCapacity(mask uint32) int {
	return max(MaxMarkIndex(mask)-KnownClass, 0)
}

// AllocateClasses gives chains a class index in [KnownClass+1,
// MaxMarkIndex(mask)], stably: a chain keeps the index existing (read back
// from the kernel) gives it. A new chain takes the lowest index existing
// does not hold, never one it holds for another chain: pods may still
// carry that class until the classifier's map is rewritten, and must not
// be dispatched to the new chain meanwhile. A chain for which no index is
// left gets none (it is dispatched by address instead); the indexes of
// chains no longer wanted are free for a later allocation, once existing
// no longer holds them. Chains are given indexes in sorted order.
func AllocateClasses(mask uint32, chains []string, existing map[string]int) map[string]int {
	top := MaxMarkIndex(mask)
	want := slices.Sorted(slices.Values(chains))
	want = slices.Compact(want)
	held := map[int]string{}
	for _, ch := range slices.Sorted(maps.Keys(existing)) {
		idx := existing[ch]
		if idx <= KnownClass || idx > top {
			continue
		}
		if _, dup := held[idx]; !dup {
			held[idx] = ch
		}
	}
	out := map[string]int{}
	for _, ch := range want {
		if idx, ok := existing[ch]; ok && held[idx] == ch {
			out[ch] = idx
		}
	}
	next := KnownClass + 1
	for _, ch := range want {
		if _, ok := out[ch]; ok {
			continue
		}
		for next <= top {
			if _, taken := held[next]; !taken {
				break
			}
			next++
		}
		if next > top {
			break
		}
		out[ch] = next
		next++
	}
	return out
}
