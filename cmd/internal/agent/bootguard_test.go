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

// TestGuardAtStart: an apply saves the cluster networks and the policy
// destinations in the state directory (again only when they change; a
// cleanup removes them); the next agent on the node installs the guard
// table from them, with the flags' CIDRs, before it reaches the API server.
func TestGuardAtStart(t *testing.T) {
	dir := t.TempDir()
	ta := newTestAgent(t, cluster()...)
	ta.cfg.StateDir = dir
	ta.guardAtStart(context.Background())
	if got := ta.dp.history(); !slices.Equal(got, []string{"guard [] []"}) {
		t.Fatalf("a first start without saved networks: %v", got)
	}
	ta.mustSync(t)
	st := ta.lastApplied(t)
	if len(st.Excluded) == 0 {
		t.Fatal("no cluster networks in the applied state")
	}
	nets, err := loadNetworks(dir, networksFile)
	if err != nil || !slices.Equal(nets, sortedPrefixes(st.Excluded)) {
		t.Fatalf("saved networks %v %v, want %v", nets, err, st.Excluded)
	}
	var want []netip.Prefix
	for _, p := range st.Policies {
		want = append(want, p.Destinations...)
	}
	dests, err := loadNetworks(dir, destsFile)
	if err != nil || len(dests) == 0 || !slices.Equal(dests, sortedPrefixes(want)) {
		t.Fatalf("saved destinations %v %v, want %v", dests, err, want)
	}
	// Unchanged networks are not written again.
	path := filepath.Join(dir, networksFile)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	ta.saveState(&st)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("unchanged networks written again: %v", err)
	}
	more := st
	more.Excluded = append(slices.Clone(st.Excluded), netip.MustParsePrefix("10.96.0.0/16"))
	ta.saveState(&more)
	if saved, _ := loadNetworks(dir, networksFile); len(saved) != len(st.Excluded)+1 {
		t.Fatalf("changed networks not written: %v", saved)
	}
	// Nothing to apply any more: the files go (no guard after a reboot).
	ta.saveState(nil)
	for _, f := range []string{networksFile, destsFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); !os.IsNotExist(err) {
			t.Fatalf("%s kept after the cleanup: %v", f, err)
		}
	}
	ta.saveState(&st)

	// The next agent (a restart, a reboot) guards with them and the flags'.
	next := newTestAgent(t, cluster()...)
	next.cfg.StateDir = dir
	next.cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")}
	next.guardAtStart(context.Background())
	nets, _ = loadNetworks(dir, networksFile)
	wantCall := "guard " + fmt.Sprint(append(nets, netip.MustParsePrefix("10.250.0.0/16"))) + " " + fmt.Sprint(dests)
	if got := next.dp.history(); !slices.Equal(got, []string{wantCall}) {
		t.Fatalf("start after a reboot: %v, want [%s]", got, wantCall)
	}

	// A damaged file: the guard uses what it can, the agent goes on.
	if err := os.WriteFile(path, []byte("not a cidr\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	broken := newTestAgent(t, cluster()...)
	broken.cfg.StateDir = dir
	broken.cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")}
	broken.guardAtStart(context.Background())
	if got := broken.dp.history(); !slices.Equal(got, []string{"guard [10.250.0.0/16] " + fmt.Sprint(dests)}) {
		t.Fatalf("start with a damaged file: %v", got)
	}
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return slices.Compact(out)
}
