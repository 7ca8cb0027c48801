package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a command writing while the test
// reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer runs echo-server on 127.0.0.1 ephemeral ports and returns
// its TCP and UDP addresses.
func startServer(t *testing.T) (tcpAddr, udpAddr string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"echo-server", "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--quiet"}, pw, io.Discard)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("echo-server exited %d", code)
			}
		case <-time.After(5 * time.Second):
			t.Error("echo-server did not stop")
		}
	})
	sc := bufio.NewScanner(pr)
	for tcpAddr == "" || udpAddr == "" {
		if !sc.Scan() {
			t.Fatal("echo-server ended before listening")
		}
		line := sc.Text()
		if a, ok := strings.CutPrefix(line, "listening tcp="); ok {
			tcpAddr = a
		} else if a, ok := strings.CutPrefix(line, "listening udp="); ok {
			udpAddr = a
		} else {
			t.Fatalf("echo-server printed %q", line)
		}
	}
	go io.Copy(io.Discard, pr)
	return tcpAddr, udpAddr
}

func runCmd(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var out, errb syncBuffer
	code := run(context.Background(), args, &out, &errb)
	if errb.String() != "" {
		t.Logf("%v stderr: %s", args, errb.String())
	}
	return code, out.String()
}

var seenLine = regexp.MustCompile(`^seen=(127\.0\.0\.1:\d+) local=(127\.0\.0\.1:\d+)\n$`)

func TestEchoAndWhoami(t *testing.T) {
	tcpAddr, udpAddr := startServer(t)

	// Raw TCP: lines echoed, whoami answered with the peer's address.
	c, err := net.Dial("tcp", tcpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "hello\nwhoami\n")
	r := bufio.NewReader(c)
	if line, _ := r.ReadString('\n'); line != "hello\n" {
		t.Errorf("echo: %q", line)
	}
	if line, _ := r.ReadString('\n'); line != c.LocalAddr().String()+"\n" {
		t.Errorf("whoami: %q, want %s", line, c.LocalAddr())
	}

	// Raw UDP.
	u, err := net.Dial("udp", udpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	for req, want := range map[string]string{"ping": "ping", "whoami": u.LocalAddr().String() + "\n"} {
		u.Write([]byte(req))
		n, err := u.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Errorf("udp %s: %q, %v; want %q", req, buf[:n], err, want)
		}
	}

	// The client commands.
	for _, cmd := range []string{"connect", "udp"} {
		addr := tcpAddr
		if cmd == "udp" {
			addr = udpAddr
		}
		code, out := runCmd(t, cmd, "--timeout", "3s", addr)
		m := seenLine.FindStringSubmatch(out)
		if code != 0 || m == nil || m[1] != m[2] {
			t.Errorf("%s: exit %d, output %q; want seen=A local=A", cmd, code, out)
		}
	}
	code, out := runCmd(t, "connect", "--bind", "127.0.0.1", tcpAddr)
	if code != 0 || seenLine.FindString(out) == "" {
		t.Errorf("connect --bind: %d %q", code, out)
	}
}

var holdSummary = regexp.MustCompile(`(?m)^hold sent=(\d+) ok=(\d+) failures=(\d+) reconnects=(\d+) max_rtt_ms=(\d+) duration_ms=(\d+) seen=(\S+)$`)

func TestHold(t *testing.T) {
	tcpAddr, _ := startServer(t)
	code, out := runCmd(t, "hold", "--interval", "50ms", "--duration", "1s", tcpAddr)
	if code != 0 {
		t.Fatalf("hold exit %d:\n%s", code, out)
	}
	if !regexp.MustCompile(`^connected seen=127\.0\.0\.1:\d+ local=127\.0\.0\.1:\d+\n`).MatchString(out) {
		t.Errorf("first line: %q", out)
	}
	m := holdSummary.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no summary:\n%s", out)
	}
	sent, _ := strconv.Atoi(m[1])
	ok, _ := strconv.Atoi(m[2])
	if sent < 10 || ok < sent-2 || m[3] != "0" || m[4] != "0" {
		t.Errorf("summary %q: want ~20 sent, all but the last answered, no failure", m[0])
	}
}

// flakyServer answers whoami, then echoes n lines and closes each
// connection (n < 0: swallows every line and never answers).
func flakyServer(t *testing.T, n int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for i := 0; ; {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if line == "whoami\n" {
						io.WriteString(c, c.RemoteAddr().String()+"\n")
						continue
					}
					if n < 0 {
						continue
					}
					if i == n {
						return
					}
					i++
					io.WriteString(c, line)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestHoldFailures(t *testing.T) {
	addr := flakyServer(t, 3)
	code, out := runCmd(t, "hold", "--interval", "20ms", "--duration", "5s", addr)
	if code != 1 || !regexp.MustCompile(`(?m)^failed seq=4 at_ms=\d+ err=.+$`).MatchString(out) {
		t.Errorf("closed after 3 lines: exit %d, output:\n%s", code, out)
	}
	if m := holdSummary.FindStringSubmatch(out); m == nil || m[2] != "3" || m[3] != "1" || m[4] != "0" {
		t.Errorf("summary: %q", m)
	}

	code, out = runCmd(t, "hold", "--interval", "20ms", "--duration", "1s", "--reconnect", addr)
	if code != 1 || !regexp.MustCompile(`(?m)^reconnected seen=127\.0\.0\.1:\d+ local=\S+ outage_ms=\d+$`).MatchString(out) {
		t.Errorf("--reconnect: exit %d, output:\n%s", code, out)
	}
	if m := holdSummary.FindStringSubmatch(out); m == nil || m[4] == "0" || m[3] == "0" {
		t.Errorf("--reconnect summary: %q", m)
	}

	addr = flakyServer(t, -1)
	code, out = runCmd(t, "hold", "--interval", "20ms", "--timeout", "300ms", "--duration", "5s", addr)
	if code != 1 || !strings.Contains(out, "failed seq=1 ") || !strings.Contains(out, "err=no reply within 300ms") {
		t.Errorf("no echo: exit %d, output:\n%s", code, out)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		nil, {"nope"}, {"connect"}, {"connect", "a:1", "b:2"}, {"echo-server"}, {"hold", "--bogus", "a:1"},
	} {
		if code, _ := runCmd(t, args...); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	// Nothing listens on a port just closed: exit 1.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	if code, _ := runCmd(t, "connect", "--timeout", "2s", addr); code != 1 {
		t.Errorf("connect to a closed port: exit %d, want 1", code)
	}
}

// TestBinary: the built command serves until SIGTERM and its client
// prints the address the server saw.
func TestBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "netutil")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	srv := exec.Command(bin, "echo-server", "--tcp", "127.0.0.1:0")
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncBuffer
	srv.Stderr = &stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Process.Kill()
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() {
		t.Fatal("no output")
	}
	addr, ok := strings.CutPrefix(sc.Text(), "listening tcp=")
	if !ok {
		t.Fatalf("first line %q", sc.Text())
	}
	out, err := exec.Command(bin, "connect", addr).Output()
	if err != nil || !seenLine.Match(out) {
		t.Errorf("connect: %q, %v", out, err)
	}
	srv.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- srv.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("echo-server on SIGTERM: %v, want exit 0", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("echo-server still running 5s after SIGTERM")
	}
	if !regexp.MustCompile(`(?m)^tcp open 127\.0\.0\.1:\d+$`).MatchString(stderr.String()) ||
		!regexp.MustCompile(`(?m)^tcp close 127\.0\.0\.1:\d+ lines=1$`).MatchString(stderr.String()) {
		t.Errorf("log:\n%s", stderr.String())
	}
}

// TestStream: count datagrams, in order, each with the tag, its sequence
// number and a send time that does not go back.
func TestStream(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	code, out := runCmd(t, "stream", "--interval", "2ms", "--tag", "p1", "--count", "5", pc.LocalAddr().String())
	if code != 0 || !strings.Contains(out, "stream tag=p1 sent=5 errors=0") {
		t.Fatalf("exit %d, output %q", code, out)
	}
	var last int64
	buf := make([]byte, 200)
	for i := 0; i < 5; i++ {
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		f := strings.Fields(string(buf[:n]))
		if len(f) != 4 || f[0] != "stream" || f[1] != "p1" || f[2] != strconv.Itoa(i) {
			t.Fatalf("datagram %d: %q", i, buf[:n])
		}
		ts, err := strconv.ParseInt(f[3], 10, 64)
		if err != nil || ts < last || time.Since(time.Unix(0, ts)) > time.Minute {
			t.Fatalf("datagram %d: send time %q after %d", i, f[3], last)
		}
		last = ts
	}
	if code, _ := runCmd(t, "stream", "--tag", "a b", "127.0.0.1:9"); code != 1 {
		t.Errorf("a tag with a space: exit %d, want 1", code)
	}
}
