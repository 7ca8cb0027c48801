package ctl

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/egressnat/egressnat/nft"
)

// SysctlWrite is one value to write under the net sysctl directory.
type SysctlWrite struct {
	Path  string // relative to the directory, e.g. ipv4/conf/all/send_redirects
	Value string
}

// GatewaySysctls lists what a gateway node needs, given the interfaces
// under ipv4/conf (all and default included) and the uplink: no ICMP
// redirects anywhere (they would send pods' traffic past the gateway),
// liberal TCP window tracking (a flow picked up mid-stream after a failover
// is not marked invalid), and on the uplink only the packet's mark in the
// reverse-path check (src_valid_mark: strict rp_filter then accepts the
// traffic other nodes reroute to it, which the agent marks). rp_filter
// itself is never changed. It is pure.
func GatewaySysctls(interfaces []string, uplink string) []SysctlWrite {
	ifs := append([]string{"all", "default"}, interfaces...)
	slices.Sort(ifs[2:])
	ifs = slices.Compact(ifs)
	var out []SysctlWrite
	for _, i := range ifs {
		out = append(out, SysctlWrite{Path: filepath.Join("ipv4", "conf", i, "send_redirects"), Value: "0"})
	}
	if uplink != "" {
		out = append(out, SysctlWrite{Path: filepath.Join("ipv4", "conf", uplink, "src_valid_mark"), Value: "1"})
	}
	return append(out, SysctlWrite{Path: filepath.Join("netfilter", "nf_conntrack_tcp_be_liberal"), Value: "1"})
}

// StateDirEnv names the environment variable that gives PrepareNode the
// agent's state directory (the DaemonSet's init container sets it to the
// agent's --state-dir, mounted there too).
const StateDirEnv = "EGRESSNAT_STATE_DIR"

// PrepareNode writes the gateway sysctls under dir (the host's
// /proc/sys/net) where they differ and reports each change to w. The agent
// container's own /proc/sys is read-only, so its init container runs this;
// the agent then finds the values set and writes nothing. The values
// before are recorded in the state directory $EGRESSNAT_STATE_DIR when it
// is set (see PrepareNodeRecording).
func PrepareNode(dir, uplink string, w io.Writer) error {
	return PrepareNodeRecording(dir, uplink, os.Getenv(StateDirEnv), w)
}

// PrepareNodeRecording is PrepareNode with the agent's state directory
// given: unless it is "", the values before are recorded there first
// (nft.RecordSysctls: the first value before of each sysctl is kept), so
// that an uninstall restores them; when they cannot be recorded, nothing
// is changed.
func PrepareNodeRecording(dir, uplink, stateDir string, w io.Writer) error {
	entries, err := os.ReadDir(filepath.Join(dir, "ipv4", "conf"))
	if err != nil {
		return fmt.Errorf("list interfaces: %w", err)
	}
	var ifs []string
	for _, e := range entries {
		if e.IsDir() && e.Name() != "all" && e.Name() != "default" {
			ifs = append(ifs, e.Name())
		}
	}
	conntrackLoaded := false
	var errs []error
	var changes []nft.SysctlChange
	for _, s := range GatewaySysctls(ifs, uplink) {
		path := filepath.Join(dir, s.Path)
		cur, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) && filepath.Dir(s.Path) == "netfilter" && !conntrackLoaded {
			// nf_conntrack is not loaded yet: a conntrack netlink request
			// makes the kernel load it; then the file exists.
			conntrackLoaded = true
			_, _ = ReadFlows(-1)
			cur, err = os.ReadFile(path)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", path, err))
			continue
		}
		if string(bytes.TrimSpace(cur)) == s.Value {
			continue
		}
		changes = append(changes, nft.SysctlChange{Path: s.Path, Before: string(bytes.TrimSpace(cur)), Set: s.Value})
	}
	if len(changes) > 0 && stateDir != "" {
		if err := nft.RecordSysctls(stateDir, dir, changes); err != nil {
			return errors.Join(append(errs, err)...)
		}
		fmt.Fprintf(w, "recorded the values before in %s\n", filepath.Join(stateDir, nft.SysctlRecordFile))
	}
	for _, c := range changes {
		path := filepath.Join(dir, c.Path)
		if err := os.WriteFile(path, []byte(c.Set+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("write %s: %w", path, err))
			continue
		}
		fmt.Fprintf(w, "set %s = %s (was %s)\n", c.Path, c.Set, c.Before)
	}
	return errors.Join(errs...)
}
