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
	if up, err := SavedUplink(dir); err != nil || up == "" || up != ta.cfg.Uplink {
		t.Fatalf("saved uplink %q %v, want %q", up, err, ta.cfg.Uplink)
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
	for _, f := range []string{networksFile, destsFile, uplinkFile} {
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

// TestBootGuardReportsDamage: the boot unit's call guards with what it can
// read and says what it could not (its exit status and log are all a
// person sees at boot).
func TestBootGuardReportsDamage(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, networksFile), []byte("10.244.0.0/16\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, destsFile), []byte("203.0.113.0/24\nnonsense\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dp := &fakeDataplane{}
	extra := []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
	_, err := BootGuard(context.Background(), dp, dir, extra)
	if err == nil || !strings.Contains(err.Error(), destsFile) {
		t.Fatalf("damaged destinations not reported: %v", err)
	}
	if got := dp.history(); !slices.Equal(got, []string{"guard [10.244.0.0/16 10.96.0.0/12] []"}) {
		t.Fatalf("guard calls %v", got)
	}
	if up, err := SavedUplink(dir); up != "" || err != nil {
		t.Fatalf("no uplink saved: %q %v", up, err)
	}
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return slices.Compact(out)
}

// TestKeepBootBinary: the copy for the boot unit is written when missing
// or different, left alone when the same, and executable.
func TestKeepBootBinary(t *testing.T) {
	dir, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	exe := filepath.Join(dir, "agent")
	if err := os.WriteFile(exe, []byte("version 1"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, false} {
		copied, err := KeepBootBinary(state, exe)
		if err != nil || copied != want {
			t.Fatalf("call %d: copied=%v err=%v, want copied=%v", i, copied, err, want)
		}
	}
	dst := filepath.Join(state, BootBinary)
	if fi, err := os.Stat(dst); err != nil || fi.Mode().Perm()&0o100 == 0 {
		t.Fatalf("copy not executable: %v %v", fi, err)
	}
	if err := os.WriteFile(exe, []byte("version 2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if copied, err := KeepBootBinary(state, exe); err != nil || !copied {
		t.Fatalf("a new version not copied: %v %v", copied, err)
	}
	if b, _ := os.ReadFile(dst); string(b) != "version 2" {
		t.Fatalf("copy holds %q", b)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}
	if _, err := KeepBootBinary(state, filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing executable not reported")
	}
}
