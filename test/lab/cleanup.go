package lab

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// LockDir holds one lock file per prefix of a live lab.
const LockDir = "/run/egressnat-lab"

const netnsDir = "/run/netns"

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,19}$`)

func validatePrefix(prefix string) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("lab: invalid prefix %q (want [a-z][a-z0-9-]{0,19})", prefix)
	}
	return nil
}

// prefixLock is an exclusive flock on LockDir/<prefix>.lock. The file also
// records every namespace the holder creates (one "ns <name>" line each,
// written before the namespace is created), so that a later lab or
// CleanupStale removes exactly what a crashed holder left behind and never
// a namespace some other tool named with a similar prefix.
type prefixLock struct {
	prefix string
	path   string
	f      *os.File
	// stale lists the namespaces recorded by a previous holder that did
	// not finish its cleanup; staleDirs its temporary work directories.
	stale     []string
	staleDirs []string
}

func lockPrefix(prefix string) (*prefixLock, error) {
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(LockDir, prefix+".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lab: prefix %q is in use by a live lab (%s)", prefix, path)
		}
		return nil, fmt.Errorf("lab: lock %s: %w", path, err)
	}
	lk := &prefixLock{prefix: prefix, path: path, f: f}
	b, _ := io.ReadAll(f)
	for _, line := range strings.Split(string(b), "\n") {
		if ns, ok := strings.CutPrefix(line, "ns "); ok && strings.HasPrefix(ns, prefix) && !strings.ContainsRune(ns, '/') {
			lk.stale = append(lk.stale, ns)
		}
		if d, ok := strings.CutPrefix(line, "dir "); ok && filepath.IsAbs(d) &&
			strings.HasPrefix(filepath.Base(d), prefix+"lab-") {
			lk.staleDirs = append(lk.staleDirs, d)
		}
	}
	return lk, nil
}

// reset forgets the stale records (once they are deleted) and records the
// new holder.
func (lk *prefixLock) reset() error {
	if err := lk.f.Truncate(0); err != nil {
		return err
	}
	lk.stale, lk.staleDirs = nil, nil
	_, err := fmt.Fprintf(lk.f, "pid %d\n", os.Getpid())
	return err
}

// removeStaleDirs removes the temporary work directories of the previous
// holder.
func (lk *prefixLock) removeStaleDirs() {
	for _, d := range lk.staleDirs {
		unmountUnder(d) //nolint:errcheck // best effort, as the removal
		os.RemoveAll(d)
	}
}

// record notes a namespace about to be created ("ns"), or a temporary
// work directory to remove ("dir").
func (lk *prefixLock) record(kind, name string) error {
	if _, err := fmt.Fprintf(lk.f, "%s %s\n", kind, name); err != nil {
		return err
	}
	return lk.f.Sync()
}

// release drops the lock; the file (and its records) is removed only when
// clean is set.
func (lk *prefixLock) release(clean bool) {
	if lk == nil || lk.f == nil {
		return
	}
	if clean {
		os.Remove(lk.path)
	}
	lk.f.Close()
	lk.f = nil
}

// Namespaces lists the network namespaces (names under /run/netns) that
// start with prefix, sorted.
func Namespaces(prefix string) []string {
	ents, _ := os.ReadDir(netnsDir)
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// CleanupStale removes what a crashed earlier lab with this prefix left
// behind: it kills every process inside the namespaces that lab recorded
// as created and deletes them. It refuses while a live lab holds the
// prefix. (New does the same by itself.)
func CleanupStale(prefix string) error {
	if err := validatePrefix(prefix); err != nil {
		return err
	}
	lk, err := lockPrefix(prefix)
	if err != nil {
		return err
	}
	err = deleteNamespaces(lk.stale)
	if err == nil {
		lk.removeStaleDirs()
	}
	lk.release(err == nil)
	return err
}

// deleteNamespaces kills every process inside the namespaces, then deletes
// them. Missing namespaces are ignored.
func deleteNamespaces(names []string) error {
	var existing []string
	for _, ns := range names {
		if _, err := os.Stat(filepath.Join(netnsDir, ns)); err == nil {
			existing = append(existing, ns)
		}
	}
	if len(existing) == 0 {
		return nil
	}
	killNamespacePids(existing)
	var errs []error
	for _, ns := range existing {
		var out []byte
		var err error
		for try := 0; try < 5; try++ {
			out, err = exec.Command("ip", "netns", "delete", ns).CombinedOutput()
			if err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			if _, serr := os.Stat(filepath.Join(netnsDir, ns)); serr != nil {
				continue
			}
			errs = append(errs, fmt.Errorf("lab: ip netns delete %s: %w: %s", ns, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

type nsKey struct{ dev, ino uint64 }

// NamespacePids returns the ids of processes whose network namespace is
// one of names (like "ip netns pids").
func NamespacePids(names ...string) []int {
	want := map[nsKey]bool{}
	for _, ns := range names {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(netnsDir, ns), &st); err == nil {
			want[nsKey{st.Dev, st.Ino}] = true
		}
	}
	if len(want) == 0 {
		return nil
	}
	ents, _ := os.ReadDir("/proc")
	var pids []int
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st); err != nil {
			continue
		}
		if want[nsKey{st.Dev, st.Ino}] {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killNamespacePids SIGKILLs every process in the namespaces and waits
// (up to 5 s) until they are gone or zombies.
func killNamespacePids(names []string) {
	pids := NamespacePids(names...)
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for time.Now().Before(deadline) && alive(pid) {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// alive tells whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}
