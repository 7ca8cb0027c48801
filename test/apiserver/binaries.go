// Package apiserver runs a real etcd and kube-apiserver for tests and for the
// lab. It builds kube-apiserver and kubectl (and, for the harnesses that
// need it, kube-proxy) from the k8s.io/kubernetes module (pinned in
// test/tools/kube) once, caches them, installs Debian's
// etcd-server when etcd is missing, and stops everything it started when the
// test process ends, also after a failure.
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
	dir := binDir()
	apiserverPath = filepath.Join(dir, "kube-apiserver")
	kubectlPath = filepath.Join(dir, "kubectl")
	err = buildCached(dir, []buildTarget{
		{apiserverPath, "k8s.io/kubernetes/cmd/kube-apiserver", nil},
		{kubectlPath, "k8s.io/kubernetes/cmd/kubectl", nil},
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
	dir := binDir()
	p := filepath.Join(dir, "kube-proxy")
	if err := buildCached(dir, []buildTarget{{p, "k8s.io/kubernetes/cmd/kube-proxy", versionLDFlags()}}); err != nil {
		return "", err
	}
	return p, nil
}

func binDir() string { return filepath.Join(CacheDir(), "kube-"+KubeVersion) }

// versionLDFlags stamps KubeVersion into a component's version (kube-proxy
// reports it, e.g. in its Events and /metrics).
func versionLDFlags() []string {
	return []string{"-ldflags", "-X k8s.io/component-base/version.gitVersion=" + KubeVersion}
}

type buildTarget struct {
	out, pkg string
	flags    []string // extra go build flags
}

// buildCached builds every target whose binary is missing from the tools
// module, under a file lock in dir so that concurrent callers wait for one
// build.
func buildCached(dir string, targets []buildTarget) error {
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
	toolsDir, err := toolsModule()
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
		fmt.Fprintf(os.Stderr, "apiserver: building %s %s (minutes on a cold cache)\n", b.pkg, KubeVersion)
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

func toolsModule() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "test", "tools", "kube"), nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
