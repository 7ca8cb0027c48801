package image

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// throwaway is a containerd of the test's own (root, state, sockets under
// a temporary directory, CRI off), driven with ctr.
type throwaway struct {
	dir, addr string
	cmd       *exec.Cmd
}

func startContainerd(t *testing.T) *throwaway {
	t.Helper()
	if testing.Short() {
		t.Skip("starts containerd (skipped under -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	for _, c := range []string{"containerd", "ctr"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("no %s: %v", c, err)
		}
	}
	// A short path: the socket's must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &throwaway{dir: dir, addr: filepath.Join(dir, "c.sock")}
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.addr, c.addr+".ttrpc", filepath.Join(dir, "opt"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	// containerd 1.6's shims put their sockets under /run/containerd/s
	// whatever the state directory: removed after, when made here.
	var made []string
	for _, d := range []string{"/run/containerd", "/run/containerd/s"} {
		if _, err := os.Stat(d); os.IsNotExist(err) {
			made = append([]string{d}, made...)
		}
	}
	c.cmd = exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	c.cmd.Stdout, c.cmd.Stderr = log, log
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			c.cmd.Process.Kill()
			<-done
		}
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("containerd log (tail):\n%s", tail(string(b), 30))
		}
		os.RemoveAll(dir)
		for _, d := range made {
			os.Remove(d) // only when empty
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := c.ctr("version"); err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatal("containerd did not answer within 20s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *throwaway) ctr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ctr", append([]string{"--address", c.addr, "-n", "k8s.io"}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// run is `ctr run` with runc's state and the IO fifos under c.dir, not
// under /run/containerd with a real containerd's.
func (c *throwaway) run(args ...string) []string {
	return append([]string{"run", "--runc-root", filepath.Join(c.dir, "runc"), "--fifo-dir", filepath.Join(c.dir, "fifo")}, args...)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestContainerdImport: `ctr -n k8s.io images import ARCHIVE` names each
// image from its index (no --base-name) and unpacks it; when runc is
// there, the images run: pause as uid 65535 until SIGTERM, netutil's
// client as nonroot.
func TestContainerdImport(t *testing.T) {
	c := startContainerd(t)
	dir := t.TempDir()
	var results []Result
	for _, build := range []func(context.Context, string) (Result, error){BuildPause, BuildNetutil} {
		r, err := build(context.Background(), filepath.Join(dir, fmt.Sprint(len(results), ".tar")))
		if err != nil {
			t.Fatal(err)
		}
		results = append(results, r)
	}
	spec, err := Product(ProductOptions{BinDir: productBins(t), Output: filepath.Join(dir, "egressnat.tar")})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	results = append(results, r)

	for _, r := range results {
		if out, err := c.ctr("images", "import", r.Path); err != nil {
			t.Fatal(err)
		} else if !strings.Contains(out, "unpacking "+r.Name+" ("+r.Digest+")...done") {
			t.Errorf("import %s: %q", r.Name, out)
		}
	}
	out, err := c.ctr("images", "ls")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]string{} // name -> digest
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 3 && f[0] != "REF" {
			names[f[0]] = f[2]
		}
	}
	if len(names) != len(results) {
		t.Errorf("images ls:\n%s", out)
	}
	for _, r := range results {
		if names[r.Name] != r.Digest {
			t.Errorf("image %s: digest %q, want %s", r.Name, names[r.Name], r.Digest)
		}
	}

	if _, err := exec.LookPath("runc"); err != nil {
		t.Log("no runc: images not run")
		return
	}
	// pause: runs as 65535, stops on SIGTERM.
	t.Cleanup(func() {
		c.ctr("task", "kill", "-s", "SIGKILL", "egressnat-pause")
		c.ctr("task", "delete", "egressnat-pause")
		c.ctr("containers", "rm", "egressnat-pause")
	})
	if _, err := c.ctr(c.run("-d", PauseName, "egressnat-pause")...); err != nil {
		t.Skipf("cannot run containers here: %v", err)
	}
	out, err = c.ctr("task", "ls")
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "egressnat-pause" {
			fmt.Sscan(f[1], &pid)
		}
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("pause task: %v\n%s", err, out)
	}
	for _, want := range []string{"Uid:\t65535\t", "Gid:\t65535\t", "NSpid:\t" + fmt.Sprint(pid) + "\t1\n"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("pause process lacks %q:\n%s", want, status)
		}
	}
	if _, err := c.ctr("task", "kill", "-s", "SIGTERM", "egressnat-pause"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := c.ctr("task", "ls")
		if strings.Contains(out, "STOPPED") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pause still running 10s after SIGTERM:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// netutil connect, in the host's network namespace, to a listener of
	// the test: it prints the address the server saw, as nonroot.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				line, _ := bufio.NewReader(conn).ReadString('\n')
				if line == "whoami\n" {
					fmt.Fprintf(conn, "%s\n", conn.RemoteAddr())
				}
			}()
		}
	}()
	out, err = c.ctr(c.run("--rm", "--net-host", NetutilName, "egressnat-netutil", "/netutil", "connect", ln.Addr().String())...)
	if err != nil || !strings.HasPrefix(out, "seen=127.0.0.1:") {
		t.Errorf("netutil connect in a container: %q, %v", out, err)
	}
	// The product image runs (as its nonroot user): egressnatctl --help.
	out, err = c.ctr(c.run("--rm", spec.Name, "egressnat-ctl", "/egressnatctl", "--help")...)
	if err != nil || !strings.Contains(out, "egressnatctl") {
		t.Errorf("egressnatctl --help in a container: %q, %v", out, err)
	}
}
