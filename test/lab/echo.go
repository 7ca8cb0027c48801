package lab

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// EchoServerPackage is the import path of the echo server.
const EchoServerPackage = "github.com/egressnat/egressnat/test/lab/echoserver"

// BuildEchoServer builds the echo server into dir and returns the path of
// the binary. It needs the go tool and this module's source tree.
func BuildEchoServer(dir string) (string, error) {
	out := filepath.Join(dir, "echoserver")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-o", out, EchoServerPackage)
	if _, file, _, ok := runtime.Caller(0); ok {
		if st, err := os.Stat(filepath.Dir(file)); err == nil && st.IsDir() {
			cmd.Dir = filepath.Dir(file)
		}
	}
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("lab: build echo server: %w: %s", err, b)
	}
	return out, nil
}

func (e *External) controlAddr() string {
	return fmt.Sprintf("127.0.0.1:%d", e.ControlPort)
}

// Query sends one line of the echo server's control protocol and returns
// the answer line. Commands: "ping" (answer "pong"), "icmp <id>" (source of
// the last echo request sent by Ping with that id, or "none"), "icmpid <n>"
// (source of the last echo request with ICMP identifier n, or "none").
// The query is made from inside the server's own namespace.
func (e *External) Query(ctx context.Context, line string) (string, error) {
	c, err := DialTCP(ctx, e.NetNS, e.controlAddr())
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		return "", err
	}
	ans, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(ans, "\n"), nil
}

func (e *External) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		ans, err := e.Query(ctx, "ping")
		cancel()
		if err == nil && ans == "pong" {
			return nil
		}
		last = err
		if e.Echo != nil && !e.Echo.Running() {
			return fmt.Errorf("lab: echo server in %s exited: %v", e.NetNS, e.Echo.Err())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("lab: echo server in %s not ready: %v", e.NetNS, last)
}

// ICMPSource returns the source address the server saw on the echo request
// that Ping sent with id, waiting until it was recorded or ctx ends.
func (e *External) ICMPSource(ctx context.Context, id string) (netip.Addr, error) {
	return e.pollSource(ctx, "icmp "+id)
}

// ICMPSourceByID is like ICMPSource for an echo request with ICMP
// identifier n as the server received it (e.g. sent by the ping tool).
func (e *External) ICMPSourceByID(ctx context.Context, n int) (netip.Addr, error) {
	return e.pollSource(ctx, fmt.Sprintf("icmpid %d", n))
}

func (e *External) pollSource(ctx context.Context, q string) (netip.Addr, error) {
	for {
		ans, err := e.Query(ctx, q)
		if err != nil {
			return netip.Addr{}, err
		}
		if ans != "none" {
			return netip.ParseAddr(ans)
		}
		select {
		case <-ctx.Done():
			return netip.Addr{}, fmt.Errorf("lab: %s: %q not seen: %w", e.Name, q, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
