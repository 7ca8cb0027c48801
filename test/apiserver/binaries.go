// Package apiserver runs a real etcd and kube-apiserver for tests and for the
// lab. It builds kube-apiserver and kubectl (and, for the harnesses that
// need it, kube-proxy) from the k8s.io/kubernetes module (pinned in
// test/tools/kube; the oldest supported release's in test/tools/kube-floor)
// once, caches them, installs Debian's etcd-server when etcd is missing,
// and stops everything it started when the test process ends, also after
// a failure.
package apiserver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// KubeVersion is the Kubernetes release whose binaries the tests run.
const KubeVersion = "v1.37.2"

// FloorKubeVersion is the oldest Kubernetes release egressnat supports
// (docs/operations.md), the latest patch of its minor: test/floor installs
// the manifests on its kube-apiserver. Its kube-apiserver and kubectl are
// built from test/tools/kube-floor, cached apart from KubeVersion's.
//
// 1.32, not older: the CRDs' validation rules use the CEL format library
// (introduced in 1.31) and the ip and cidr libraries (1.30), and an API
// server of release N compiles a new rule only with the libraries of
// release N-1 and older (k8s.io/apiserver/pkg/cel/environment,
// DefaultCompatibilityVersion: its minimum compatibility version), so that
// a rollback to N-1 still understands every stored rule.
const FloorKubeVersion = "v1.32.13"

// release is a Kubernetes release whose binaries are built from a tools
// module under test/tools.
type release struct {
	version string // e.g. v1.37.2
	module  string // the directory under test/tools that holds its go.mod
}

var (
	current = release{KubeVersion, "kube"}
	floor   = release{FloorKubeVersion, "kube-floor"}
)

// CacheDir is where built binaries are kept: $EGRESSNAT_CACHE, else
// ~/.cache/egressnat.
func CacheDir() string {
	if d := os.Getenv("EGRESSNAT_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "egressnat")
}

// Binaries returns the paths of kube-apiserver and kubectl, building them
// first when they are not cached. Concurrent callers (parallel test
// packages) wait for one build under a file lock.
func Binaries() (apiserverPath, kubectlPath string, err error) {
	dir := current.binDir()
	apiserverPath = filepath.Join(dir, "kube-apiserver")
	kubectlPath = filepath.Join(dir, "kubectl")
	err = buildCached(current, []buildTarget{
		{apiserverPath, "k8s.io/kubernetes/cmd/kube-apiserver", nil},
		{kubectlPath, "k8s.io/kubernetes/cmd/kubectl", nil},
	})
	if err != nil {
		return "", "", err
	}
	return apiserverPath, kubectlPath, nil
}

// FloorBinaries returns the paths of the kube-apiserver and kubectl of
// FloorKubeVersion, building them first (minutes on a cold cache) when
// they are not cached. Their version is stamped, so that the API server
// reports it (GET /version) as a release build does.
func FloorBinaries() (apiserverPath, kubectlPath string, err error) {
	dir := floor.binDir()
	apiserverPath = filepath.Join(dir, "kube-apiserver")
	kubectlPath = filepath.Join(dir, "kubectl")
	err = buildCached(floor, []buildTarget{
		{apiserverPath, "k8s.io/kubernetes/cmd/kube-apiserver", floor.versionLDFlags()},
		{kubectlPath, "k8s.io/kubernetes/cmd/kubectl", floor.versionLDFlags()},
	})
	if err != nil {
		return "", "", err
	}
	return apiserverPath, kubectlPath, nil
}

// KubeRouterVersion is the kube-router whose NetworkPolicy controller the
// lab runs (its firewall only: no routing, no service proxy).
// sigs.k8s.io/kube-network-policies, the first choice, needs the nftables
// queue expression, which the test machines' kernel lacks
// (CONFIG_NFT_QUEUE); kube-router enforces NetworkPolicies with iptables
// and ipset. Lab use only: security flaws are reported for this version
// (it is not shipped, and runs in throwaway network namespaces).
const KubeRouterVersion = "v2.1.0"

// KubeRouter returns the path of kube-router, built with go install from
// its own module (its go.mod, not test/tools/kube) and cached, building
// it first when it is not cached (minutes on a cold cache).
func KubeRouter() (string, error) {
	dir := filepath.Join(CacheDir(), "kube-router-"+KubeRouterVersion)
	p := filepath.Join(dir, "kube-router")
	if exists(p) {
		return p, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cache dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("take build lock: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	if exists(p) {
		return p, nil
	}
	tmp := filepath.Join(dir, "tmp")
	cmd := exec.Command("go", "install", "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@"+KubeRouterVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "GOFLAGS=-mod=mod")
	cmd.Dir = os.TempDir()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	fmt.Fprintf(os.Stderr, "apiserver: building kube-router %s (minutes on a cold cache)\n", KubeRouterVersion)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build kube-router: %w", err)
	}
	if err := os.Rename(filepath.Join(tmp, "kube-router"), p); err != nil {
		return "", fmt.Errorf("install kube-router: %w", err)
	}
	os.RemoveAll(tmp)
	return p, nil
}

// KubeProxy returns the path of kube-proxy, built from the same
// k8s.io/kubernetes module as the API server (test/tools/kube) with its
// version stamped, building it first when it is not cached (minutes on a
// cold cache). Only the harnesses that run kube-proxy (make badinput) ask
// for it, so `make test` does not pay for its build.
func KubeProxy() (string, error) {
	p := filepath.Join(current.binDir(), "kube-proxy")
	if err := buildCached(current, []buildTarget{{p, "k8s.io/kubernetes/cmd/kube-proxy", current.versionLDFlags()}}); err != nil {
		return "", err
	}
	return p, nil
}

// NodeBinaries are the Kubernetes components a real lab cluster runs
// besides the API server and kube-proxy.
type NodeBinaries struct {
	Kubelet, ControllerManager, Scheduler string
}

// ClusterBinaries returns the paths of kubelet, kube-controller-manager and
// kube-scheduler, built from the same k8s.io/kubernetes module as the API
// server with the version stamped, building them first when they are not
// cached (minutes each on a cold cache).
func ClusterBinaries() (NodeBinaries, error) {
	dir := current.binDir()
	b := NodeBinaries{
		Kubelet:           filepath.Join(dir, "kubelet"),
		ControllerManager: filepath.Join(dir, "kube-controller-manager"),
		Scheduler:         filepath.Join(dir, "kube-scheduler"),
	}
	err := buildCached(current, []buildTarget{
		{b.Kubelet, "k8s.io/kubernetes/cmd/kubelet", current.versionLDFlags()},
		{b.ControllerManager, "k8s.io/kubernetes/cmd/kube-controller-manager", current.versionLDFlags()},
		{b.Scheduler, "k8s.io/kubernetes/cmd/kube-scheduler", current.versionLDFlags()},
	})
	return b, err
}

// binDir is where the release's binaries are cached:
// $EGRESSNAT_CACHE/kube-<version>.
func (r release) binDir() string { return filepath.Join(CacheDir(), "kube-"+r.version) }

// versionLDFlags stamps the release into a component's version (kube-proxy
// reports it, e.g. in its Events and /metrics; kube-apiserver at /version).
func (r release) versionLDFlags() []string {
	return []string{"-ldflags", "-X k8s.io/component-base/version.gitVersion=" + r.version}
}

type buildTarget struct {
	out, pkg string
	flags    []string // extra go build flags
}

// buildCached builds every target whose binary is missing from the
// release's tools module, under a file lock in the release's binDir so
// that concurrent callers wait for one build.
func buildCached(r release, targets []buildTarget) error {
	dir := r.binDir()
	missing := false
	for _, b := range targets {
		if !exists(b.out) {
			missing = true
		}
	}
	if !missing {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create cache dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("take build lock: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	toolsDir, err := toolsModule(r)
	if err != nil {
		return err
	}
	for _, b := range targets {
		if exists(b.out) {
			continue
		}
		tmp := b.out + ".tmp"
		args := append(append([]string{"build", "-o", tmp}, b.flags...), b.pkg)
		cmd := exec.Command("go", args...)
		cmd.Dir = toolsDir
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		fmt.Fprintf(os.Stderr, "apiserver: building %s %s (minutes on a cold cache)\n", b.pkg, r.version)
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build %s: %w", b.pkg, err)
		}
		if err := os.Rename(tmp, b.out); err != nil {
			return fmt.Errorf("install %s: %w", b.out, err)
		}
	}
	return nil
}

// Etcd returns the path of etcd, installing Debian's etcd-server with
// apt-get when it is missing.
func Etcd() (string, error) {
	if p, err := exec.LookPath("etcd"); err == nil {
		return p, nil
	}
	fmt.Fprintln(os.Stderr, "apiserver: etcd not found, installing Debian's etcd-server")
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "etcd-server"}} {
		cmd := exec.Command("apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return "", fmt.Errorf("apt-get %v: %w", args, err)
		}
	}
	p, err := exec.LookPath("etcd")
	if err != nil {
		return "", fmt.Errorf("etcd still missing after installing etcd-server: %w", err)
	}
	return p, nil
}

// RepoRoot finds the repository root (the directory holding
// test/tools/kube/go.mod) from the working directory upwards.
func RepoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if exists(filepath.Join(d, "test", "tools", "kube", "go.mod")) {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", errors.New("repository root not found above the working directory")
		}
		d = parent
	}
}

func toolsModule(r release) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "test", "tools", r.module), nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
