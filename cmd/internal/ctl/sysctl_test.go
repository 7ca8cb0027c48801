package ctl

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/nft"
)

// TestPrepareNodeRecords, on a fake /proc/sys/net: prepare-node records
// the values before in the agent's state directory ($EGRESSNAT_STATE_DIR,
// as the DaemonSet's init container has it) before it changes them; a
// second run (the agent's pod restarted: egressnat's own values read back)
// keeps the first values; the uninstall's restore (nft.RestoreSysctls)
// puts every value back as it was.
func TestPrepareNodeRecords(t *testing.T) {
	dir, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	before := map[string]string{
		"ipv4/conf/all/send_redirects":          "1",
		"ipv4/conf/default/send_redirects":      "1",
		"ipv4/conf/eth0/send_redirects":         "1",
		"ipv4/conf/lo/send_redirects":           "0",
		"ipv4/conf/eth0/src_valid_mark":         "0",
		"ipv4/conf/lo/src_valid_mark":           "0",
		"netfilter/nf_conntrack_tcp_be_liberal": "0",
	}
	for p, v := range before {
		path := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv(StateDirEnv, state)
	var out bytes.Buffer
	if err := PrepareNode(dir, "eth0", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "recorded the values before in "+filepath.Join(state, nft.SysctlRecordFile)) {
		t.Errorf("output:\n%s", out.String())
	}
	rec, err := nft.LoadSysctlRecord(state)
	if err != nil || len(rec) != 5 {
		t.Fatalf("record %v %v, want the 5 values changed", rec, err)
	}
	out.Reset()
	if err := PrepareNodeRecording(dir, "eth0", state, &out); err != nil || out.Len() != 0 {
		t.Fatalf("second run: %v %q", err, out.String())
	}
	if again, _ := nft.LoadSysctlRecord(state); len(again) != 5 || again[0] != rec[0] {
		t.Fatalf("the second run changed the record: %v", again)
	}
	if _, err := nft.RestoreSysctls(state, dir); err != nil {
		t.Fatal(err)
	}
	for p, v := range before {
		if b, _ := os.ReadFile(filepath.Join(dir, p)); strings.TrimSpace(string(b)) != v {
			t.Errorf("%s = %q after the restore, want %s", p, b, v)
		}
	}

	// A state directory that cannot be written: nothing is changed.
	blocked := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocked, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := PrepareNodeRecording(dir, "eth0", blocked, &out); err == nil {
		t.Fatal("prepare-node succeeded without its record")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "ipv4/conf/all/send_redirects")); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("send_redirects changed without a record: %q", b)
	}
}
