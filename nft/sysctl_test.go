package nft

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestSysctlRestorePlan: a sysctl still at egressnat's value goes back; one
// at its value before needs nothing; one changed since by something else
// is left alone; one gone (its interface removed) is skipped.
func TestSysctlRestorePlan(t *testing.T) {
	rec := []SysctlChange{
		{Path: "ipv4/conf/all/send_redirects", Before: "1", Set: "0"},
		{Path: "ipv4/conf/eth0/src_valid_mark", Before: "0", Set: "1"},
		{Path: "ipv4/conf/veth9/send_redirects", Before: "1", Set: "0"},
		{Path: "netfilter/nf_conntrack_tcp_be_liberal", Before: "0", Set: "1"},
	}
	for _, tc := range []struct {
		name        string
		current     map[string]string
		write, kept []string
	}{
		{name: "all as egressnat set them", current: map[string]string{
			"ipv4/conf/all/send_redirects": "0", "ipv4/conf/eth0/src_valid_mark": "1",
			"ipv4/conf/veth9/send_redirects": "0", "netfilter/nf_conntrack_tcp_be_liberal": "1"},
			write: []string{"ipv4/conf/all/send_redirects", "ipv4/conf/eth0/src_valid_mark", "ipv4/conf/veth9/send_redirects", "netfilter/nf_conntrack_tcp_be_liberal"}},
		{name: "interface gone, one already back", current: map[string]string{
			"ipv4/conf/all/send_redirects": "1", "ipv4/conf/eth0/src_valid_mark": "1", "netfilter/nf_conntrack_tcp_be_liberal": "1"},
			write: []string{"ipv4/conf/eth0/src_valid_mark", "netfilter/nf_conntrack_tcp_be_liberal"}},
		{name: "changed since by something else", current: map[string]string{
			"ipv4/conf/all/send_redirects": "0", "ipv4/conf/eth0/src_valid_mark": "2", "netfilter/nf_conntrack_tcp_be_liberal": "1"},
			write: []string{"ipv4/conf/all/send_redirects", "netfilter/nf_conntrack_tcp_be_liberal"},
			kept:  []string{"ipv4/conf/eth0/src_valid_mark=2"}},
		{name: "nothing readable", current: map[string]string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			write, kept := SysctlRestorePlan(rec, tc.current)
			var gotW, gotK []string
			for _, c := range write {
				gotW = append(gotW, c.Path)
			}
			for _, c := range kept {
				gotK = append(gotK, c.Path+"="+c.Set)
			}
			if !reflect.DeepEqual(gotW, tc.write) || !reflect.DeepEqual(gotK, tc.kept) {
				t.Errorf("write %v kept %v, want %v and %v", gotW, gotK, tc.write, tc.kept)
			}
		})
	}
}

// fakeSysctls writes files under a fake /proc/sys/net.
func fakeSysctls(t *testing.T, dir string, values map[string]string) {
	t.Helper()
	for p, v := range values {
		path := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func readSysctl(t *testing.T, dir, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, p))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestRecordAndRestoreSysctls, on a fake /proc/sys/net: the record keeps
// the first value before of each sysctl (a second change of the same one,
// after egressnat's own value was read back, does not overwrite it), drops
// the sysctls of interfaces gone; the restore puts back what egressnat
// changed, leaves alone what something else changed since, and removes
// the record. A second restore finds nothing to do.
func TestRecordAndRestoreSysctls(t *testing.T) {
	net, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	fakeSysctls(t, net, map[string]string{
		"ipv4/conf/all/send_redirects": "1", "ipv4/conf/eth0/send_redirects": "1",
		"ipv4/conf/veth1/send_redirects": "1", "ipv4/conf/eth0/src_valid_mark": "0",
		"netfilter/nf_conntrack_tcp_be_liberal": "0", "ipv4/tcp_rmem": "4096\t131072\t6291456",
	})
	change := func(changes ...SysctlChange) {
		t.Helper()
		if err := RecordSysctls(state, net, changes); err != nil {
			t.Fatal(err)
		}
		for _, c := range changes {
			fakeSysctls(t, net, map[string]string{c.Path: c.Set})
		}
	}
	change(SysctlChange{"ipv4/conf/all/send_redirects", "1", "0"}, SysctlChange{"ipv4/conf/eth0/send_redirects", "1", "0"},
		SysctlChange{"ipv4/conf/veth1/send_redirects", "1", "0"}, SysctlChange{"netfilter/nf_conntrack_tcp_be_liberal", "0", "1"})
	// Someone puts one back; egressnat changes it again (its value
	// before is now its own old value 1 again: the same), and changes a
	// sysctl seen for the first time. The interface veth1 is gone.
	fakeSysctls(t, net, map[string]string{"ipv4/conf/all/send_redirects": "1"})
	if err := os.RemoveAll(filepath.Join(net, "ipv4/conf/veth1")); err != nil {
		t.Fatal(err)
	}
	change(SysctlChange{"ipv4/conf/all/send_redirects", "1", "0"}, SysctlChange{"ipv4/conf/eth0/src_valid_mark", "0", "1"})
	// A sysctl egressnat changes twice keeps its first value before and
	// takes the value set last.
	change(SysctlChange{"ipv4/tcp_rmem", "4096\t131072\t6291456", "4096 87380 6291456"})
	change(SysctlChange{"ipv4/tcp_rmem", "4096 87380 6291456", "1 2 3"})

	rec, err := LoadSysctlRecord(state)
	if err != nil {
		t.Fatal(err)
	}
	want := []SysctlChange{
		{"ipv4/conf/all/send_redirects", "1", "0"}, {"ipv4/conf/eth0/send_redirects", "1", "0"},
		{"ipv4/conf/eth0/src_valid_mark", "0", "1"}, {"ipv4/tcp_rmem", "4096 131072 6291456", "1 2 3"},
		{"netfilter/nf_conntrack_tcp_be_liberal", "0", "1"},
	}
	if !reflect.DeepEqual(rec, want) {
		t.Fatalf("record:\n%v\nwant\n%v", rec, want)
	}

	// Something else sets liberal tracking to its own value since: kept.
	fakeSysctls(t, net, map[string]string{"netfilter/nf_conntrack_tcp_be_liberal": "2"})
	res, err := RestoreSysctls(state, net)
	if err != nil {
		t.Fatal(err)
	}
	for p, v := range map[string]string{
		"ipv4/conf/all/send_redirects": "1", "ipv4/conf/eth0/send_redirects": "1", "ipv4/conf/eth0/src_valid_mark": "0",
		"netfilter/nf_conntrack_tcp_be_liberal": "2", "ipv4/tcp_rmem": "4096 131072 6291456",
	} {
		if got := readSysctl(t, net, p); got != v {
			t.Errorf("after the restore %s = %q, want %q", p, got, v)
		}
	}
	if !res.Recorded || len(res.Restored) != 4 || len(res.Kept) != 1 || res.Kept[0].Path != "netfilter/nf_conntrack_tcp_be_liberal" {
		t.Errorf("restore: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(state, SysctlRecordFile)); !os.IsNotExist(err) {
		t.Errorf("the record is still there after the restore: %v", err)
	}
	if res, err := RestoreSysctls(state, net); err != nil || res.Recorded || len(res.Restored) != 0 {
		t.Errorf("a second restore: %+v %v", res, err)
	}
}

// TestRestoreSysctlsKeepsRecordOnError: a sysctl that cannot be written
// back leaves the record in place for another try.
func TestRestoreSysctlsKeepsRecordOnError(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes read-only files")
	}
	net, state := t.TempDir(), t.TempDir()
	fakeSysctls(t, net, map[string]string{"ipv4/conf/all/send_redirects": "1"})
	if err := RecordSysctls(state, net, []SysctlChange{{"ipv4/conf/all/send_redirects", "1", "0"}}); err != nil {
		t.Fatal(err)
	}
	fakeSysctls(t, net, map[string]string{"ipv4/conf/all/send_redirects": "0"})
	if err := os.Chmod(filepath.Join(net, "ipv4/conf/all/send_redirects"), 0o444); err != nil {
		t.Fatal(err)
	}
	if _, err := RestoreSysctls(state, net); err == nil {
		t.Fatal("restore of a read-only sysctl succeeded")
	}
	if rec, err := LoadSysctlRecord(state); err != nil || len(rec) != 1 {
		t.Fatalf("record after a failed restore: %v %v", rec, err)
	}
}

// TestLoadSysctlRecordRejectsDamage: a damaged line is an error (the
// restore then changes nothing), not a silent skip; a path leaving the
// directory is refused.
func TestLoadSysctlRecordRejectsDamage(t *testing.T) {
	for _, text := range []string{"ipv4/conf/all/send_redirects 1 0\n", "../../etc/passwd\t1\t0\n", "/etc/x\t1\t0\n"} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, SysctlRecordFile), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		if rec, err := LoadSysctlRecord(dir); err == nil {
			t.Errorf("%q loaded as %v", text, rec)
		}
	}
}
