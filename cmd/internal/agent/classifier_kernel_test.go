package agent

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap/zaptest"

	"github.com/egressnat/egressnat/nft/bpf"
)

// noCleanup is a dataplane whose table is already gone.
type noCleanup struct{}

func (noCleanup) Cleanup(context.Context) error { return nil }

// TestClassifierRemovedKernel: an uninstall (Uninstall with BPFDir), and
// an agent of the nft backend after its first Apply
// (ClassifierLeftovers), detach and unpin the eBPF classifier an agent
// pinned: no pin, no directory, no program on the interface.
func TestClassifierRemovedKernel(t *testing.T) {
	for i, how := range []string{"uninstall", "nft agent"} {
		t.Run(how, func(t *testing.T) {
			_, fd := unNetNS(t, 10+i)
			fs := t.TempDir()
			if out, err := exec.Command("mount", "-t", "bpf", "bpf", fs).CombinedOutput(); err != nil {
				t.Fatalf("mount bpffs: %v %s", err, out)
			}
			t.Cleanup(func() { exec.Command("umount", fs).Run() }) //nolint:errcheck
			dir := filepath.Join(fs, "egressnat")
			inNetNS(t, fd, func() {
				c, err := bpf.Load(dir)
				if err != nil {
					t.Fatal(err)
				}
				l, err := netlink.LinkByName("eth1")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c.Attach(l.Attrs().Index); err != nil {
					t.Fatal(err)
				}
				if err := c.Update(map[netip.Addr]bpf.Class{netip.MustParseAddr("10.244.1.2"): {Mark: 0x20000, Mask: 0xff0000}}, nil); err != nil {
					t.Fatal(err)
				}
				c.Close() // the agent stops; the pins keep it attached
				snap, err := bpf.Inspect(dir)
				if err != nil || len(snap.Interfaces) != 1 || len(snap.Entries) != 1 {
					t.Fatalf("before: %+v %v", snap, err)
				}

				switch how {
				case "uninstall":
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					if err := Uninstall(ctx, UninstallConfig{Dataplane: noCleanup{}, BPFDir: dir, Log: zaptest.NewLogger(t)}); err != nil {
						t.Fatal(err)
					}
				case "nft agent":
					lo := &ClassifierLeftovers{Dir: dir, Log: zaptest.NewLogger(t)}
					lo.SetPods(nil)
				}
				if _, err := os.Stat(dir); !os.IsNotExist(err) {
					t.Fatalf("%s still there: %v", dir, err)
				}
				snap, err = bpf.Inspect(dir)
				if err != nil || len(snap.Interfaces)+len(snap.Entries) != 0 {
					t.Fatalf("after: %+v %v", snap, err)
				}
				// Not attached any more: a classifier loaded anew finds
				// nothing on the interface.
				c2, err := bpf.Load(dir)
				if err != nil {
					t.Fatal(err)
				}
				defer c2.Close()
				if at, err := c2.Attached(); err != nil || len(at) != 0 {
					t.Fatalf("still attached: %v %v", at, err)
				}
				if err := bpf.Remove(dir); err != nil {
					t.Fatal(err)
				}
			})
		})
	}
}
