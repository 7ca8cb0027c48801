package ctl

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/nft/bpf"
)

// TestDefaultBPFDir: ruleset's --bpf-dir is $EGRESSNAT_BPF_DIR where it is
// set (the agent's pod of manifests/ebpf, whose bpffs is mounted under
// /host), else the agent's default.
func TestDefaultBPFDir(t *testing.T) {
	env := map[string]string{}
	if got := defaultBPFDir(func(k string) string { return env[k] }); got != "/sys/fs/bpf/egressnat" {
		t.Errorf("unset: %q", got)
	}
	env[BPFDirEnv] = "/host/sys/fs/bpf/egressnat"
	if got := defaultBPFDir(func(k string) string { return env[k] }); got != "/host/sys/fs/bpf/egressnat" {
		t.Errorf("set: %q", got)
	}
}

// TestWriteRulesetBPF: what ruleset shows of an inspected classifier,
// after the nftables table: the interfaces by index with how the program
// is attached, and the map's entries by pod IP with their mark and mask,
// at most maxElems of each like set elements; one line when nothing is
// pinned; the same in JSON.
func TestWriteRulesetBPF(t *testing.T) {
	snap := bpf.Snapshot{
		Entries: map[netip.Addr]bpf.Class{
			netip.MustParseAddr("10.244.1.7"):  {Mark: 0x00020000, Mask: 0x00ff0000},
			netip.MustParseAddr("10.244.1.5"):  {Mark: 0x00010000, Mask: 0x00ff0000},
			netip.MustParseAddr("10.244.1.10"): {Mark: 0x00010000, Mask: 0x00ff0000},
		},
		Interfaces: []bpf.AttachedInterface{{Index: 9, Name: "veth2", Mode: "tcx"}, {Index: 4, Name: "veth1", Mode: "tcx"}, {Index: 12, Mode: "tc"}},
	}
	c := BPFFromSnapshot("/sys/fs/bpf/egressnat", snap)
	wantEntries := []BPFEntry{{"10.244.1.5", 0x10000, 0xff0000}, {"10.244.1.7", 0x20000, 0xff0000}, {"10.244.1.10", 0x10000, 0xff0000}}
	if fmt.Sprint(c.Entries) != fmt.Sprint(wantEntries) || !c.Pinned || c.Dir != "/sys/fs/bpf/egressnat" {
		t.Fatalf("classifier %+v, want entries %v", c, wantEntries)
	}
	rs := &Ruleset{Table: "egressnat", RulePriority: 29000, FirstTable: 2701, LastTable: 2763, BPF: c}
	var b bytes.Buffer
	if err := WriteRuleset(&b, rs, 2); err != nil {
		t.Fatal(err)
	}
	want := `nftables: no table ip egressnat on this node (no policy or floating IP applied here, or the agent uses another --table)

BPF classifier pinned under /sys/fs/bpf/egressnat

  attached to 3 interfaces
    veth1 (index 4): tcx
    veth2 (index 9): tcx
    ... and 1 more (--all-elements shows them)

  map pods (3 entries: pod IP -> mark/mask)
    10.244.1.5 -> 0x00010000/0x00ff0000
    10.244.1.7 -> 0x00020000/0x00ff0000
    ... and 1 more (--all-elements shows them)

ip rules at priority 29000
  (none)

routes in tables 2701-2763
  (none)
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := WriteRuleset(&b, rs, 0); err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"    if12 (index 12): tc\n", "    10.244.1.10 -> 0x00010000/0x00ff0000\n"} {
		if !strings.Contains(b.String(), line) {
			t.Errorf("all elements: no line %q:\n%s", line, b.String())
		}
	}

	// An empty map, attached nowhere.
	b.Reset()
	writeBPF(&b, BPFFromSnapshot("/d", bpf.Snapshot{}), 32)
	if want := "\nBPF classifier pinned under /d\n\n  attached to no interface\n\n  map pods (0 entries: pod IP -> mark/mask)\n"; b.String() != want {
		t.Errorf("empty: %q, want %q", b.String(), want)
	}
	// Nothing pinned: one line.
	b.Reset()
	writeBPF(&b, &BPFClassifier{Dir: "/sys/fs/bpf/egressnat"}, 32)
	if want := "\nBPF classifier: nothing pinned under /sys/fs/bpf/egressnat (the agent classifies pods with nftables, or runs with another --bpf-dir)\n"; b.String() != want {
		t.Errorf("not pinned: %q, want %q", b.String(), want)
	}

	// JSON: numbers for the marks, every entry.
	j, err := json.Marshal(rs)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{`"bpf":{"dir":"/sys/fs/bpf/egressnat","pinned":true,"interfaces":[{"index":4,"name":"veth1","mode":"tcx"},`,
		`{"index":12,"mode":"tc"}]`, `{"ip":"10.244.1.10","mark":65536,"mask":16711680}`} {
		if !strings.Contains(string(j), s) {
			t.Errorf("JSON lacks %s:\n%s", s, j)
		}
	}
	if j, _ := json.Marshal(&Ruleset{}); strings.Contains(string(j), "bpf") {
		t.Errorf("JSON of a ruleset read without --bpf-dir: %s", j)
	}
}
