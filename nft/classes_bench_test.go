package nft

import (
	"fmt"
	"net/netip"
	"os/exec"
	"testing"

	"go.uber.org/zap"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
)

// loadState: 100,000 of this node's pods, every tenth selected by one of
// 100 Reroute policies (10,000 selected), the rest known and unselected.
func loadState(pods int) selector.NodeState {
	var st selector.NodeState
	for i := range 100 {
		st.Policies = append(st.Policies, selector.PolicyState{Name: fmt.Sprintf("l-%03d", i), Mode: selector.ModeReroute,
			EgressIP: a(floatIP), NextHop: netip.AddrFrom4([4]byte{192, 0, 2, byte(20 + i%10)}),
			Destinations: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 32)}})
	}
	for n := range pods {
		ip := netip.AddrFrom4([4]byte{10, 128 + byte(n>>16), byte(n >> 8), byte(n)})
		st.LocalPods = append(st.LocalPods, ip)
		if n%10 == 0 {
			p := &st.Policies[(n/10)%100]
			p.Sources = append(p.Sources, ip)
		}
	}
	st.PodNetworks = []netip.Prefix{netip.MustParsePrefix("10.128.0.0/9")}
	return st
}

// BenchmarkLoadPods: the time to load 100,000 pod entries from an empty
// kernel (one full Apply; run as root: a throwaway network namespace), by
// classifier: "nft" puts every pod in the known-pods set and the selected
// ones in pre-src and their policy's source set; "ebpf" puts every pod in
// the classifier's map and the selected ones in their policy's source set.
// Between iterations the table and the map are emptied (not timed).
func BenchmarkLoadPods(b *testing.B) {
	for _, backend := range []string{"nft", "ebpf"} {
		b.Run(backend, func(b *testing.B) {
			if testing.Short() {
				b.Skip("kernel benchmark")
			}
			l := newLab(b)
			l.build()
			cfg := Config{Uplink: "eth0", NetNSFd: l.fd("a"), Logger: zap.NewNop()}
			var c *bpf.Classifier
			if backend == "ebpf" {
				fs := b.TempDir()
				if out, err := exec.Command("mount", "-t", "bpf", "bpf", fs).CombinedOutput(); err != nil {
					b.Fatalf("mount bpffs: %v %s", err, out)
				}
				b.Cleanup(func() { exec.Command("umount", fs).Run() }) //nolint:errcheck
				var err error
				if c, err = bpf.Load(fs + "/egressnat"); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { c.Close() })
				cfg.Classifier = c
			}
			st := loadState(100000)
			b.ResetTimer()
			for range b.N {
				d, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				if err := d.Apply(b.Context(), st); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				r := d.LastResult()
				if backend == "ebpf" && r.ClassesWritten != len(st.LocalPods) {
					b.Fatalf("wrote %d map entries, want %d", r.ClassesWritten, len(st.LocalPods))
				}
				if err := d.Cleanup(b.Context()); err != nil {
					b.Fatal(err)
				}
				if c != nil {
					have, err := c.Entries()
					if err != nil {
						b.Fatal(err)
					}
					var all []netip.Addr
					for a := range have {
						all = append(all, a)
					}
					if err := c.Update(nil, all); err != nil {
						b.Fatal(err)
					}
				}
				d.Close()
				b.StartTimer()
			}
		})
	}
}
