package nft

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// SysctlRecordFile is the file, in the agent's state directory, that keeps
// the value each net sysctl had before egressnat first changed it
// (RecordSysctls), so that an uninstall puts it back (RestoreSysctls).
const SysctlRecordFile = "sysctls-before"

// SysctlChange is one net sysctl egressnat changes: Path under
// /proc/sys/net (e.g. ipv4/conf/all/send_redirects), the value it had
// Before, and the value egressnat Set.
type SysctlChange struct {
	Path, Before, Set string
}

const sysctlRecordHeader = "# egressnat: net sysctls as they were before egressnat changed them (restored on uninstall)\n" +
	"# path under /proc/sys/net, value before, value egressnat set\n"

// sysctlValue normalizes a value read from /proc/sys (several fields are
// separated by tabs there) to one line without tabs.
func sysctlValue(b []byte) string {
	return strings.Join(strings.Fields(string(bytes.TrimSpace(b))), " ")
}

// LoadSysctlRecord reads the record in stateDir; none when there is no
// record (nothing changed yet, or already restored).
func LoadSysctlRecord(stateDir string) ([]SysctlChange, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, SysctlRecordFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []SysctlChange
	for i, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		f := strings.Split(l, "\t")
		if len(f) != 3 || f[0] == "" || !filepath.IsLocal(f[0]) {
			return nil, fmt.Errorf("%s line %d: want path, value before and value set separated by tabs, got %q", SysctlRecordFile, i+1, l)
		}
		out = append(out, SysctlChange{Path: f[0], Before: f[1], Set: f[2]})
	}
	return out, nil
}

// MergeSysctlRecord returns the record with changes added, pure: a path
// already recorded keeps its first value before (egressnat changed it
// then; what it reads now may be its own value) and takes the value set
// last; the entries whose sysctl is gone (exists false: an interface
// removed since) are dropped. changed reports whether the result differs
// from record.
func MergeSysctlRecord(record, changes []SysctlChange, exists func(path string) bool) (out []SysctlChange, changed bool) {
	at := map[string]int{}
	for _, c := range record {
		if _, dup := at[c.Path]; dup || !exists(c.Path) {
			changed = true
			continue
		}
		at[c.Path] = len(out)
		out = append(out, c)
	}
	for _, c := range changes {
		if c.Before == c.Set {
			continue
		}
		if i, ok := at[c.Path]; ok {
			if out[i].Set != c.Set {
				out[i].Set, changed = c.Set, true
			}
			continue
		}
		at[c.Path] = len(out)
		out = append(out, c)
		changed = true
	}
	slices.SortFunc(out, func(a, b SysctlChange) int { return strings.Compare(a.Path, b.Path) })
	return out, changed
}

// RecordSysctls adds changes (about to be made under netDir, the
// /proc/sys/net to change) to the record in stateDir, before they are
// made: the first value before of each path is kept, entries of sysctls
// gone from netDir are dropped. The file is replaced atomically.
func RecordSysctls(stateDir, netDir string, changes []SysctlChange) error {
	record, err := LoadSysctlRecord(stateDir)
	if err != nil {
		return fmt.Errorf("read the sysctl record: %w", err)
	}
	changes = slices.Clone(changes)
	for i, c := range changes {
		changes[i].Before, changes[i].Set = sysctlValue([]byte(c.Before)), sysctlValue([]byte(c.Set))
	}
	out, changed := MergeSysctlRecord(record, changes, func(p string) bool {
		_, err := os.Stat(filepath.Join(netDir, p))
		return err == nil
	})
	if !changed {
		return nil
	}
	var b strings.Builder
	b.WriteString(sysctlRecordHeader)
	for _, c := range out {
		fmt.Fprintf(&b, "%s\t%s\t%s\n", c.Path, c.Before, c.Set)
	}
	if err := WriteFileAtomic(filepath.Join(stateDir, SysctlRecordFile), b.String()); err != nil {
		return fmt.Errorf("write the sysctl record: %w", err)
	}
	return nil
}

// SysctlRestorePlan decides, pure, what restoring the record does given
// the current values (by path; a path missing: the sysctl is gone, e.g.
// its interface was removed). A sysctl still at the value egressnat set
// goes back to its value before (write); one at its value before needs
// nothing; one at a third value was changed since by something else, which
// may rely on it: it is left alone (kept).
func SysctlRestorePlan(record []SysctlChange, current map[string]string) (write, kept []SysctlChange) {
	for _, c := range record {
		cur, ok := current[c.Path]
		switch {
		case !ok, cur == c.Before:
		case cur == c.Set:
			write = append(write, c)
		default:
			kept = append(kept, SysctlChange{Path: c.Path, Before: c.Before, Set: cur})
		}
	}
	return write, kept
}

// SysctlRestore tells what RestoreSysctls did.
type SysctlRestore struct {
	// Restored: written back to Before. Kept: changed since by something
	// else (Set is the value found), left alone.
	Restored, Kept []SysctlChange
	// Recorded: a record was found.
	Recorded bool
}

// RestoreSysctls puts the sysctls of the record in stateDir back under
// netDir (the host's /proc/sys/net) as SysctlRestorePlan says, then
// removes the record. On an error the record stays, for another try.
func RestoreSysctls(stateDir, netDir string) (SysctlRestore, error) {
	var res SysctlRestore
	record, err := LoadSysctlRecord(stateDir)
	if err != nil {
		return res, fmt.Errorf("read the sysctl record: %w", err)
	}
	if _, err := os.Stat(filepath.Join(stateDir, SysctlRecordFile)); err == nil {
		res.Recorded = true
	}
	current := map[string]string{}
	var errs []error
	for _, c := range record {
		b, err := os.ReadFile(filepath.Join(netDir, c.Path))
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			errs = append(errs, err)
		default:
			current[c.Path] = sysctlValue(b)
		}
	}
	write, kept := SysctlRestorePlan(record, current)
	res.Kept = kept
	for _, c := range write {
		if err := os.WriteFile(filepath.Join(netDir, c.Path), []byte(c.Before+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", c.Path, err))
			continue
		}
		res.Restored = append(res.Restored, c)
	}
	if len(errs) > 0 {
		return res, errors.Join(errs...)
	}
	if err := os.Remove(filepath.Join(stateDir, SysctlRecordFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("remove the sysctl record: %w", err)
	}
	return res, nil
}

// WriteFileAtomic writes text to path through a temporary file in the same
// directory, synced before the rename (a crash leaves the old file or the
// new one), creating the directory. The agent's state files use it too.
func WriteFileAtomic(path, text string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // gone by the rename when it succeeded
	_, err = tmp.WriteString(text)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
