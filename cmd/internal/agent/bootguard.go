package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
)

// Files in Config.StateDir, kept across restarts and reboots (one CIDR per
// line): the cluster-internal destinations and the policy destinations of
// the last apply. At its start, before it can reach the API server, the
// agent installs the guard table from them (Dataplane.Guard).
const (
	networksFile = "cluster-networks"
	destsFile    = "policy-destinations"
)

// guardAtStart installs the guard table when the node has none (a reboot,
// a flushed ruleset), from the saved cluster networks and the flags'.
func (a *agent) guardAtStart(ctx context.Context) {
	saved, err := loadNetworks(a.cfg.StateDir, networksFile)
	if err != nil {
		a.log.Warn("read the saved cluster networks", zap.Error(err))
	}
	dests, err := loadNetworks(a.cfg.StateDir, destsFile)
	if err != nil {
		a.log.Warn("read the saved policy destinations", zap.Error(err))
	}
	nets := slices.Concat(saved, a.cfg.PodCIDRs, a.cfg.ServiceCIDRs)
	if _, err := a.cfg.Dataplane.Guard(ctx, nets, dests); err != nil {
		a.log.Error("install the guard table", zap.Error(err))
	}
	a.saved = [2]string{formatNetworks(saved), formatNetworks(dests)}
}

// saveState saves what the guard table needs after a reboot: the cluster
// networks and the policy destinations of an apply (none: nothing applied,
// the files go).
func (a *agent) saveState(st *selector.NodeState) {
	var nets, dests []netip.Prefix
	if st != nil {
		nets = st.Excluded
		for _, p := range st.Policies {
			dests = append(dests, p.Destinations...)
		}
	}
	a.saveNetworks(networksFile, 0, nets)
	a.saveNetworks(destsFile, 1, dests)
}

// saveNetworks writes the cluster-internal destinations of an apply when
// they changed since the last write (atomically: a crash leaves the old
// file or the new one); none removes the file.
func (a *agent) saveNetworks(file string, slot int, nets []netip.Prefix) {
	if a.cfg.StateDir == "" {
		return
	}
	text := formatNetworks(nets)
	if text == a.saved[slot] {
		return
	}
	path := filepath.Join(a.cfg.StateDir, file)
	if text == "" {
		// Nothing applied (no policy, no floating IP: the table is gone):
		// no node reroutes here, no guard is needed after a reboot.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.log.Warn("remove a saved file", zap.String("file", path), zap.Error(err))
			return
		}
	} else if err := writeAtomic(path, text); err != nil {
		a.log.Warn("save for the guard table", zap.String("file", path), zap.Error(err))
		return
	}
	a.saved[slot] = text
}

func formatNetworks(nets []netip.Prefix) string {
	lines := make([]string, 0, len(nets))
	for _, p := range nets {
		lines = append(lines, p.String()+"\n")
	}
	slices.Sort(lines)
	return strings.Join(slices.Compact(lines), "")
}

// loadNetworks reads a saved list of CIDRs; none when dir is "" or holds
// no such file yet.
func loadNetworks(dir, file string) ([]netip.Prefix, error) {
	if dir == "" {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l == "" {
			continue
		}
		p, err := netip.ParsePrefix(l)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		out = append(out, p)
	}
	return out, nil
}

func writeAtomic(path, text string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // gone by the rename when it succeeded
	if _, err := tmp.WriteString(text); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
