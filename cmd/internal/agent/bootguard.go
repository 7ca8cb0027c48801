package agent

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
)

// Files in Config.StateDir, kept across restarts and reboots: the
// cluster-internal destinations and the policy destinations of the last
// apply (one CIDR per line), and the uplink they were applied on. At its
// start, before it can reach the API server, the agent installs the guard
// table from them (Dataplane.Guard); so does the boot guard (BootGuard),
// before the node's network comes up.
const (
	networksFile = "cluster-networks"
	destsFile    = "policy-destinations"
	uplinkFile   = "uplink"
	// BootBinary is the copy of the agent's executable the boot unit runs
	// (KeepBootBinary): the node's boot needs no image or runtime.
	BootBinary = "egressnat-agent"
)

// KeepBootBinary copies the executable exe into stateDir as BootBinary
// when the copy there differs from it (atomically: the boot unit finds the
// old copy or the new one). copied reports whether it wrote.
func KeepBootBinary(stateDir, exe string) (copied bool, err error) {
	want, err := fileDigest(exe)
	if err != nil {
		return false, fmt.Errorf("read the agent's executable: %w", err)
	}
	dst := filepath.Join(stateDir, BootBinary)
	if have, err := fileDigest(dst); err == nil && have == want {
		return false, nil
	}
	src, err := os.Open(exe)
	if err != nil {
		return false, fmt.Errorf("read the agent's executable: %w", err)
	}
	defer src.Close()
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(stateDir, BootBinary+".*")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name()) // gone by the rename when it succeeded
	_, err = io.Copy(tmp, src)
	if err == nil {
		err = tmp.Chmod(0o755)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		return false, fmt.Errorf("copy the agent for the boot unit: %w", err)
	}
	return true, nil
}

func fileDigest(path string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	f, err := os.Open(path)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, err
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// Guarder installs the guard table (nft.Dataplane.Guard).
type Guarder interface {
	Guard(ctx context.Context, internal, dests []netip.Prefix) (bool, error)
}

// BootGuard installs the guard table from what the agent saved in
// stateDir, plus extra (the --pod-cidrs and --service-cidrs flags), when
// the node has no table. The agent calls it first thing; the boot unit
// (egressnat-agent --boot-guard) calls it before the node's network comes
// up, which closes the window between the network's start and the agent's.
// A damaged file is reported and the rest is used. installed reports
// whether a table was created.
func BootGuard(ctx context.Context, dp Guarder, stateDir string, extra []netip.Prefix) (installed bool, err error) {
	installed, _, err = bootGuard(ctx, dp, stateDir, extra)
	return installed, err
}

// bootGuard is BootGuard; read also returns the text of each saved list it
// read whole, by file name.
func bootGuard(ctx context.Context, dp Guarder, stateDir string, extra []netip.Prefix) (installed bool, read map[string]string, err error) {
	read = map[string]string{}
	saved, errNets := loadNetworks(stateDir, networksFile)
	if errNets == nil {
		read[networksFile] = formatNetworks(saved)
	}
	dests, errDests := loadNetworks(stateDir, destsFile)
	if errDests == nil {
		read[destsFile] = formatNetworks(dests)
	}
	installed, err = dp.Guard(ctx, slices.Concat(saved, extra), dests)
	if err != nil {
		err = fmt.Errorf("install the guard table: %w", err)
	}
	return installed, read, errors.Join(err, errNets, errDests)
}

// SavedUplink returns the uplink of the last apply saved in stateDir; ""
// when none was saved.
func SavedUplink(stateDir string) (string, error) {
	if stateDir == "" {
		return "", nil
	}
	b, err := os.ReadFile(filepath.Join(stateDir, uplinkFile))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read the saved uplink: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// guardAtStart installs the guard table when the node has none (a reboot,
// a flushed ruleset), from the saved cluster networks and the flags'.
func (a *agent) guardAtStart(ctx context.Context) {
	_, read, err := bootGuard(ctx, a.cfg.Dataplane, a.cfg.StateDir, slices.Concat(a.cfg.PodCIDRs, a.cfg.ServiceCIDRs))
	if err != nil {
		a.log.Error("guard at start", zap.Error(err))
	}
	a.saved = read
	if up, err := SavedUplink(a.cfg.StateDir); err == nil && up != "" {
		a.saved[uplinkFile] = up + "\n"
	}
}

// saveState saves what the guard table needs after a reboot: the cluster
// networks and the policy destinations of an apply, and the uplink (none:
// nothing applied, the files go).
func (a *agent) saveState(st *selector.NodeState) {
	var nets, dests []netip.Prefix
	if st != nil {
		nets = st.Excluded
		for _, p := range st.Policies {
			dests = append(dests, p.Destinations...)
		}
	}
	uplink := ""
	if len(nets) > 0 {
		uplink = a.cfg.Uplink + "\n"
	}
	a.saveFile(networksFile, formatNetworks(nets))
	a.saveFile(destsFile, formatNetworks(dests))
	a.saveFile(uplinkFile, uplink)
}

// saveFile writes one file of the state directory when its text changed
// since the last write (atomically: a crash leaves the old file or the
// new one); "" removes the file.
func (a *agent) saveFile(file, text string) {
	if a.cfg.StateDir == "" {
		return
	}
	if a.saved == nil {
		a.saved = map[string]string{}
	}
	if old, ok := a.saved[file]; ok && old == text {
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
	} else if err := nft.WriteFileAtomic(path, text); err != nil {
		a.log.Warn("save for the guard table", zap.String("file", path), zap.Error(err))
		return
	}
	a.saved[file] = text
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
