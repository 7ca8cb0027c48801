package version

import (
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestResolve(t *testing.T) {
	vcs := func(rev, modified string) *debug.BuildInfo {
		return &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}}
	}
	for _, tc := range []struct {
		name            string
		version, commit string
		bi              *debug.BuildInfo
		want            string
	}{
		{"stamped", "v0.1.0", "abc1234", vcs("0123456789abcdef", "true"), "v0.1.0 (commit abc1234, GO)"},
		{"nothing", "dev", "", nil, "dev (GO)"},
		{"go install @version", "dev", "", &debug.BuildInfo{Main: debug.Module{Version: "v0.2.0"}}, "v0.2.0 (GO)"},
		{"git work tree", "dev", "", vcs("0123456789abcdef0123", "false"), "dev (commit 0123456789ab, GO)"},
		{"dirty work tree", "dev", "", vcs("0123456789abcdef0123", "true"), "dev (commit 0123456789ab-dirty, GO)"},
		{"stamped version, commit from vcs", "v0.3.0", "", vcs("abcdef", "false"), "v0.3.0 (commit abcdef, GO)"},
		{"empty version", "", "", nil, "dev (GO)"},
	} {
		got := resolve(tc.version, tc.commit, tc.bi)
		if want := strings.ReplaceAll(tc.want, "GO", runtime.Version()); got.String() != want {
			t.Errorf("%s: %q, want %q", tc.name, got.String(), want)
		}
		if got.Platform != runtime.GOOS+"/"+runtime.GOARCH {
			t.Errorf("%s: platform %q", tc.name, got.Platform)
		}
	}
	if s := String("egressnat-agent"); !strings.HasPrefix(s, "egressnat-agent ") || !strings.Contains(s, runtime.Version()) {
		t.Errorf("String: %q", s)
	}
}
