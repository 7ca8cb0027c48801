// Package version is the version of the egressnat binaries, stamped at
// build time:
//
//	go build -ldflags "-X github.com/egressnat/egressnat/cmd/internal/version.Version=v0.1.0 \
//	  -X github.com/egressnat/egressnat/cmd/internal/version.Commit=abc1234" ./cmd/...
//
// (make build does it). What is not stamped comes from the build info: the
// module version of `go install ...@v0.1.0`, the VCS revision of a build in
// a git work tree.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set with -ldflags -X.
var (
	// Version is the release, e.g. v0.1.0 (git describe --tags).
	Version = "dev"
	// Commit is the git commit the binary was built from.
	Commit = ""
)

// Info is a binary's version.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

// Get returns this binary's version.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return resolve(Version, Commit, bi)
}

// String is "v0.1.0 (commit abc1234, go1.26.8)".
func (i Info) String() string {
	if i.Commit == "" {
		return fmt.Sprintf("%s (%s)", i.Version, i.GoVersion)
	}
	return fmt.Sprintf("%s (commit %s, %s)", i.Version, i.Commit, i.GoVersion)
}

// String is what a binary's --version prints: "egressnat-agent v0.1.0
// (commit abc1234, go1.26.8)".
func String(prog string) string { return prog + " " + Get().String() }

// resolve fills what -ldflags did not stamp from the build info.
func resolve(version, commit string, bi *debug.BuildInfo) Info {
	i := Info{Version: version, Commit: commit, GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if i.Version == "" {
		i.Version = "dev"
	}
	if bi == nil {
		return i
	}
	if i.Version == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		i.Version = bi.Main.Version
	}
	if i.Commit != "" {
		return i
	}
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			i.Commit = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if len(i.Commit) > 12 {
		i.Commit = i.Commit[:12]
	}
	if i.Commit != "" && modified {
		i.Commit += "-dirty"
	}
	return i
}
