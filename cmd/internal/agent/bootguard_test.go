package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestGuardAtStart: an apply saves the cluster networks in the state
// directory (again only when they change); the next agent on the node
// installs the guard table from them, with the flags' CIDRs, before it
// reaches the API server.
func TestGuardAtStart(t *testing.T) {
	dir := t.TempDir()
	ta := newTestAgent(t, cluster()...)
	ta.cfg.StateDir = dir
	ta.guardAtStart(context.Background())
	if got := ta.dp.history(); !slices.Equal(got, []string{"guard []"}) {
		t.Fatalf("a first start without saved networks: %v", got)
	}
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if len(st.Excluded) == 0 {
		t.Fatal("no cluster networks in the applied state")
	}
	path := filepath.Join(dir, networksFile)
	saved, err := loadNetworks(dir)
	if err != nil || !slices.Equal(saved, sortedPrefixes(st.Excluded)) {
		t.Fatalf("saved %v %v, want %v", saved, err, st.Excluded)
	}
	// Unchanged networks are not written again.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	ta.saveNetworks(st.Excluded)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("unchanged networks written again: %v", err)
	}
	ta.saveNetworks(append(slices.Clone(st.Excluded), netip.MustParsePrefix("10.96.0.0/16")))
	if saved, _ := loadNetworks(dir); len(saved) != len(st.Excluded)+1 {
		t.Fatalf("changed networks not written: %v", saved)
	}

	// Nothing to apply any more: the file goes (no guard after a reboot).
	ta.saveNetworks(nil)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("saved networks kept after the cleanup: %v", err)
	}
	ta.saveNetworks(st.Excluded)

	// The next agent (a restart, a reboot) guards with them and the flags'.
	next := newTestAgent(t, cluster()...)
	next.cfg.StateDir = dir
	next.cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")}
	next.guardAtStart(context.Background())
	saved, _ = loadNetworks(dir)
	want := "guard " + fmt.Sprint(append(saved, netip.MustParsePrefix("10.250.0.0/16")))
	if got := next.dp.history(); !slices.Equal(got, []string{want}) {
		t.Fatalf("start after a reboot: %v, want [%s]", got, want)
	}

	// A damaged file: the guard uses the flags, the agent goes on.
	if err := os.WriteFile(path, []byte("not a cidr\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	broken := newTestAgent(t, cluster()...)
	broken.cfg.StateDir = dir
	broken.cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")}
	broken.guardAtStart(context.Background())
	if got := broken.dp.history(); !slices.Equal(got, []string{"guard [10.250.0.0/16]"}) {
		t.Fatalf("start with a damaged file: %v", got)
	}
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return slices.Compact(out)
}
