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

	"go.uber.org/zap"
)

// networksFile, in Config.StateDir, keeps the cluster-internal
// destinations of the last apply (one CIDR per line) across restarts and
// reboots: at its start, before it can reach the API server, the agent
// installs the guard table from it (Dataplane.Guard).
const networksFile = "cluster-networks"

// guardAtStart installs the guard table when the node has none (a reboot,
// a flushed ruleset), from the saved cluster networks and the flags'.
func (a *agent) guardAtStart(ctx context.Context) {
	saved, err := loadNetworks(a.cfg.StateDir)
	if err != nil {
		a.log.Warn("read the saved cluster networks", zap.Error(err))
	}
	nets := slices.Concat(saved, a.cfg.PodCIDRs, a.cfg.ServiceCIDRs)
	if _, err := a.cfg.Dataplane.Guard(ctx, nets); err != nil {
		a.log.Error("install the guard table", zap.Error(err))
	}
	a.savedNets = formatNetworks(saved)
}

// saveNetworks writes the cluster-internal destinations of an apply when
// they changed since the last write (atomically: a crash leaves the old
// file or the new one); none removes the file.
func (a *agent) saveNetworks(nets []netip.Prefix) {
	if a.cfg.StateDir == "" {
		return
	}
	text := formatNetworks(nets)
	if text == a.savedNets {
		return
	}
	path := filepath.Join(a.cfg.StateDir, networksFile)
	if text == "" {
		// Nothing applied (no policy, no floating IP: the table is gone):
		// no node reroutes here, no guard is needed after a reboot.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.log.Warn("remove the saved cluster networks", zap.Error(err))
			return
		}
	} else if err := writeAtomic(path, text); err != nil {
		a.log.Warn("save the cluster networks", zap.Error(err))
		return
	}
	a.savedNets = text
}

func formatNetworks(nets []netip.Prefix) string {
	lines := make([]string, 0, len(nets))
	for _, p := range nets {
		lines = append(lines, p.String()+"\n")
	}
	slices.Sort(lines)
	return strings.Join(slices.Compact(lines), "")
}

// loadNetworks reads the saved cluster networks; none when dir is "" or
// holds no file yet.
func loadNetworks(dir string) ([]netip.Prefix, error) {
	if dir == "" {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, networksFile))
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
			return nil, fmt.Errorf("%s: %w", networksFile, err)
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
