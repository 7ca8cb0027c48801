package ctl

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/nft/bpf"
)

// The agent's --bpf-dir: where the eBPF pod classifier pins its map and
// links. In the agent's pod of manifests/ebpf the host's bpffs is mounted
// elsewhere, and BPFDirEnv names the agent's directory there.
const (
	DefaultBPFDir = "/sys/fs/bpf/egressnat"
	BPFDirEnv     = "EGRESSNAT_BPF_DIR"
)

// defaultBPFDir is ruleset's --bpf-dir default: $EGRESSNAT_BPF_DIR, else
// DefaultBPFDir.
func defaultBPFDir(getenv func(string) string) string {
	if d := getenv(BPFDirEnv); d != "" {
		return d
	}
	return DefaultBPFDir
}

// BPFClassifier is the eBPF pod classifier pinned under a directory: the
// interfaces its program is attached to and the entries of its map.
type BPFClassifier struct {
	Dir string `json:"dir"`
	// Pinned: the directory exists. When it does not, the node's agent
	// classifies pods with nftables (or pins under another --bpf-dir).
	Pinned     bool           `json:"pinned"`
	Interfaces []BPFInterface `json:"interfaces"`
	// Entries, by pod IP.
	Entries []BPFEntry `json:"entries"`
}

// BPFInterface is an interface the classifier's program is attached to.
type BPFInterface struct {
	Index int `json:"index"`
	// Name is "" when the interface could not be found by its index.
	Name string `json:"name,omitempty"`
	// Mode is "tcx" (a pinned tcx link) or "tc" (a clsact filter).
	Mode string `json:"mode"`
}

// BPFEntry is one entry of the classifier's map: the program writes Mark
// under Mask into the mark of the packets from IP.
type BPFEntry struct {
	IP   string `json:"ip"`
	Mark uint32 `json:"mark"`
	Mask uint32 `json:"mask"`
}

// BPFFromSnapshot is what ruleset shows of a bpf.Inspect of dir: entries
// sorted by address, interfaces by index. It is pure.
func BPFFromSnapshot(dir string, s bpf.Snapshot) *BPFClassifier {
	c := &BPFClassifier{Dir: dir, Pinned: true, Interfaces: []BPFInterface{}, Entries: []BPFEntry{}}
	for _, i := range s.Interfaces {
		c.Interfaces = append(c.Interfaces, BPFInterface{Index: i.Index, Name: i.Name, Mode: i.Mode})
	}
	slices.SortStableFunc(c.Interfaces, func(a, b BPFInterface) int {
		return cmp.Or(cmp.Compare(a.Index, b.Index), cmp.Compare(a.Mode, b.Mode))
	})
	for _, ip := range slices.SortedFunc(maps.Keys(s.Entries), netip.Addr.Compare) {
		cl := s.Entries[ip]
		c.Entries = append(c.Entries, BPFEntry{IP: ip.String(), Mark: cl.Mark, Mask: cl.Mask})
	}
	return c
}

// readBPF reads the classifier pinned under o.BPFDir, the interfaces in
// o's network namespace. It needs CAP_NET_ADMIN (the tc filters) and read
// access to the pins (root).
func readBPF(o RulesetOptions) (*BPFClassifier, error) {
	if _, err := os.Stat(o.BPFDir); errors.Is(err, os.ErrNotExist) {
		return &BPFClassifier{Dir: o.BPFDir, Interfaces: []BPFInterface{}, Entries: []BPFEntry{}}, nil
	} else if err != nil {
		return nil, permissionHint(fmt.Errorf("BPF classifier: %w", err))
	}
	var s bpf.Snapshot
	err := inNetNS(o.NetNSFd, func() (err error) {
		s, err = bpf.Inspect(o.BPFDir)
		return err
	})
	if err != nil {
		return nil, permissionHint(fmt.Errorf("BPF classifier under %s: %w", o.BPFDir, err))
	}
	return BPFFromSnapshot(o.BPFDir, s), nil
}

// inNetNS runs fn on an OS thread that has entered the network namespace
// fd (directly when fd < 1: the current one), for what reads the calling
// thread's namespace, as bpf.Inspect does.
func inNetNS(fd int, fn func() error) error { return nft.InNetNS(fd, fn) }

// writeBPF writes the classifier: the interfaces and the map's entries,
// at most maxElems of each (0 for all).
func writeBPF(w io.Writer, c *BPFClassifier, maxElems int) {
	if !c.Pinned {
		fmt.Fprintf(w, "\nBPF classifier: nothing pinned under %s (the agent classifies pods with nftables, or runs with another --bpf-dir)\n", c.Dir)
		return
	}
	fmt.Fprintf(w, "\nBPF classifier pinned under %s\n", c.Dir)
	limit := func(n int) (shown, more int) {
		if maxElems > 0 && n > maxElems {
			return maxElems, n - maxElems
		}
		return n, 0
	}
	if len(c.Interfaces) == 0 {
		fmt.Fprintln(w, "\n  attached to no interface")
	} else {
		fmt.Fprintf(w, "\n  attached to %d %s\n", len(c.Interfaces), plural(len(c.Interfaces), "interface"))
		n, more := limit(len(c.Interfaces))
		for _, i := range c.Interfaces[:n] {
			name := i.Name
			if name == "" {
				name = fmt.Sprintf("if%d", i.Index)
			}
			fmt.Fprintf(w, "    %s (index %d): %s\n", name, i.Index, i.Mode)
		}
		if more > 0 {
			fmt.Fprintf(w, "    ... and %d more (--all-elements shows them)\n", more)
		}
	}
	entries := "entries"
	if len(c.Entries) == 1 {
		entries = "entry"
	}
	fmt.Fprintf(w, "\n  map pods (%d %s: pod IP -> mark/mask)\n", len(c.Entries), entries)
	n, more := limit(len(c.Entries))
	for _, e := range c.Entries[:n] {
		fmt.Fprintf(w, "    %s -> 0x%08x/0x%08x\n", e.IP, e.Mark, e.Mask)
	}
	if more > 0 {
		fmt.Fprintf(w, "    ... and %d more (--all-elements shows them)\n", more)
	}
}
