package lab

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var echoBin string

// TestMain builds the echo server for the lab tests, which need root; under
// -short they skip (SkipUnlessRoot) and nothing is built.
func TestMain(m *testing.M) {
	flag.Parse()
	if os.Getenv(helperEnv) == "" && os.Geteuid() == 0 && !testing.Short() {
		dir, err := os.MkdirTemp("", "enat-lab-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		echoBin, err = BuildEchoServer(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
		code := m.Run()
		os.RemoveAll(dir)
		os.Exit(code)
	}
	if v := os.Getenv(helperEcho); v != "" {
		echoBin = v
	}
	os.Exit(m.Run())
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func srcIP(t *testing.T, hostPort string) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(hostPort)
	if err != nil {
		t.Fatalf("echo answer %q: %v", hostPort, err)
	}
	return ap.Addr()
}

func TestLab(t *testing.T) {
	t.Parallel()
	l := NewT(t, Config{Prefix: "enat-lt-", EchoServer: echoBin})
	w1, w2, cp := l.Node("worker1"), l.Node("worker2"), l.Node("cp1")
	if w1.IP.String() != "192.0.2.12" || w2.IP.String() != "192.0.2.13" || cp.IP.String() != "192.0.2.11" {
		t.Fatalf("node IPs %s %s %s", cp.IP, w1.IP, w2.IP)
	}
	a, err := l.AddPod("worker1", "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddPod("worker2", "b")
	if err != nil {
		t.Fatal(err)
	}
	if !w1.PodCIDR.Contains(a.IP) || !w2.PodCIDR.Contains(b.IP) {
		t.Fatalf("pod IPs %s %s", a.IP, b.IP)
	}
	ext1, ext2 := l.External("ext1"), l.External("ext2")
	if ext1.IP.String() != "203.0.113.10" || ext2.IP.String() != "198.51.100.10" {
		t.Fatalf("external IPs %s %s", ext1.IP, ext2.IP)
	}

	t.Run("TCPMasquerade", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		c, err := DialTCP(ctx, a.NetNS, ext1.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(c)
		var first string
		for i := 0; i < 5; i++ {
			fmt.Fprintf(c, "msg %d\n", i)
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			line = strings.TrimSpace(line)
			if got := srcIP(t, line); got != w1.IP {
				t.Fatalf("source %s, want node IP %s", got, w1.IP)
			}
			if i == 0 {
				first = line
			} else if line != first {
				t.Fatalf("source changed within a connection: %s then %s", first, line)
			}
		}
		ans, err := EchoTCP(ctx, b.NetNS, ext2.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		if got := srcIP(t, ans); got != w2.IP {
			t.Fatalf("source %s, want %s", got, w2.IP)
		}
	})

	t.Run("UDPMasquerade", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		ans, err := UDPExchange(ctx, b.NetNS, ext1.UDPAddr(), "hi")
		if err != nil {
			t.Fatal(err)
		}
		if got := srcIP(t, ans); got != w2.IP {
			t.Fatalf("source %s, want %s", got, w2.IP)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		id, err := Ping(ctx, a.NetNS, ext2.IP)
		if err != nil {
			t.Fatal(err)
		}
		src, err := ext2.ICMPSource(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if src != w1.IP {
			t.Fatalf("ICMP source %s, want %s", src, w1.IP)
		}
		if _, err := ext1.ICMPSource(ctxT(t, 200*time.Millisecond), id); err == nil {
			t.Fatal("ext1 saw a ping sent to ext2")
		}
	})

	t.Run("PodToPod", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		ln, err := ListenTCP(b.NetNS, netip.AddrPortFrom(b.IP, 9000).String())
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		got := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- err.Error()
				return
			}
			defer c.Close()
			got <- c.RemoteAddr().String()
			io.Copy(c, c)
		}()
		c, err := DialTCP(ctx, a.NetNS, netip.AddrPortFrom(b.IP, 9000).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if ans, err := EchoLine(ctx, c, "ping"); err != nil || ans != "ping" {
			t.Fatalf("pod-to-pod echo %q %v", ans, err)
		}
		if src := srcIP(t, <-got); src != a.IP {
			t.Fatalf("pod-to-pod source %s, want pod IP %s", src, a.IP)
		}
		// And back, by ping.
		if _, err := Ping(ctx, b.NetNS, a.IP); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("RouterKnowsNoPods", func(t *testing.T) {
		out, err := l.Exec(ctxT(t, 5*time.Second), l.RouterNS(), "ip", "route", "get", a.IP.String())
		if err == nil {
			t.Fatalf("router has a route to pod %s: %s", a.IP, out)
		}
	})

	t.Run("FloatingIPReachable", func(t *testing.T) {
		// A secondary address on a node's uplink is reached from outside:
		// the router ARPs for it on the switch.
		ctx := ctxT(t, 10*time.Second)
		fip := "192.0.2.100"
		if _, err := l.Exec(ctx, w2.NetNS, "ip", "addr", "add", fip+"/24", "dev", Uplink); err != nil {
			t.Fatal(err)
		}
		defer l.Exec(context.Background(), w2.NetNS, "ip", "addr", "del", fip+"/24", "dev", Uplink)
		pc, err := ListenUDP(w2.NetNS, fip+":7000")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		go func() {
			buf := make([]byte, 100)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(append([]byte("from "), buf[:n]...), from)
			}
		}()
		ans, err := UDPExchange(ctx, ext1.NetNS, fip+":7000", "x")
		if err != nil || ans != "from x" {
			t.Fatalf("floating IP: %q %v", ans, err)
		}
	})

	t.Run("RelayIntoNode", func(t *testing.T) {
		ctx := ctxT(t, 10*time.Second)
		addr := netip.AddrPortFrom(cp.IP, 6443).String()
		ln, err := ListenTCP(cp.NetNS, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					fmt.Fprintf(c, "hello from %s to %s\n", c.LocalAddr(), c.RemoteAddr())
					io.Copy(c, c)
				}()
			}
		}()
		local, stop, err := l.ServeLoopback(cp.NetNS, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
		if !strings.HasPrefix(local, "127.0.0.1:") {
			t.Fatalf("relay address %s", local)
		}
		for i := 0; i < 3; i++ {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", local)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(c)
			line, err := r.ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "hello from "+addr) {
				t.Fatalf("relay greeting %q %v", line, err)
			}
			fmt.Fprintf(c, "echo %d\n", i)
			if line, err := r.ReadString('\n'); err != nil || line != fmt.Sprintf("echo %d\n", i) {
				t.Fatalf("relay echo %q %v", line, err)
			}
			c.Close()
		}
	})

	t.Run("LinkDownUp", func(t *testing.T) {
		if err := l.SetLinkDown("worker1"); err != nil {
			t.Fatal(err)
		}
		if _, err := EchoTCP(ctxT(t, time.Second), a.NetNS, ext1.TCPAddr()); err == nil {
			t.Fatal("worker1 pod reached ext1 with worker1's link down")
		}
		if _, err := EchoTCP(ctxT(t, 5*time.Second), b.NetNS, ext1.TCPAddr()); err != nil {
			t.Fatalf("worker2 pod: %v", err)
		}
		if err := l.SetLinkUp("worker1"); err != nil {
			t.Fatal(err)
		}
		ans, err := EchoTCP(ctxT(t, 10*time.Second), a.NetNS, ext1.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		if srcIP(t, ans) != w1.IP {
			t.Fatalf("source %s", ans)
		}
	})

	t.Run("PodLifecycle", func(t *testing.T) {
		p, err := l.AddPod("cp1", "c")
		if err != nil {
			t.Fatal(err)
		}
		ip := p.IP
		if _, err := l.AddPod("cp1", "c"); err == nil {
			t.Fatal("duplicate pod accepted")
		}
		if err := l.RemovePod("c"); err != nil {
			t.Fatal(err)
		}
		if len(Namespaces(l.Prefix()+"p-c")) != 0 {
			t.Fatal("pod namespace left")
		}
		p, err = l.AddPod("cp1", "c")
		if err != nil {
			t.Fatal(err)
		}
		if p.IP != ip {
			t.Fatalf("re-added pod got %s, want the freed %s", p.IP, ip)
		}
		ans, err := EchoTCP(ctxT(t, 10*time.Second), p.NetNS, ext1.TCPAddr())
		if err != nil || srcIP(t, ans) != cp.IP {
			t.Fatalf("%q %v", ans, err)
		}
	})

	t.Run("Proc", func(t *testing.T) {
		p, err := l.Start(w1.NetNS, "", "sh", "-c", "echo started; exec sleep 1000")
		if err != nil {
			t.Fatal(err)
		}
		// outputs counts the lines the runs printed (the headers name the
		// command too: they do not count).
		outputs := func(want int) {
			t.Helper()
			deadline := time.Now().Add(5 * time.Second)
			for {
				n := 0
				for _, line := range strings.Split(p.Log(), "\n") {
					if line == "started" {
						n++
					}
				}
				if n == want {
					return
				}
				if n > want || time.Now().After(deadline) {
					t.Fatalf("log has %d outputs, want %d:\n%s", n, want, p.Log())
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		outputs(1)
		pid := p.Pid()
		if err := p.Restart(); err != nil {
			t.Fatal(err)
		}
		outputs(2)
		if p.Pid() == pid || !p.Running() || alive(pid) {
			t.Fatalf("restart: pid %d -> %d running %v", pid, p.Pid(), p.Running())
		}
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		if p.Running() {
			t.Fatal("still running after Stop")
		}
		outputs(2)
		if n := strings.Count(p.Log(), " start in "); n != 2 {
			t.Fatalf("log has %d starts:\n%s", n, p.Log())
		}
		if _, err := l.Exec(ctxT(t, 5*time.Second), "enat-elsewhere", "true"); err == nil {
			t.Fatal("Exec accepted a foreign namespace")
		}
	})

	t.Run("SwitchHostAndNsenter", func(t *testing.T) {
		for _, bad := range []string{"192.0.2.12", "192.0.2.1", "192.0.2.150", "192.0.2.255", "198.51.100.7"} {
			if _, err := l.AddSwitchHost("bad", netip.MustParseAddr(bad)); err == nil {
				t.Fatalf("AddSwitchHost accepted %s", bad)
			}
		}
		h, err := l.AddSwitchHost("h1", netip.MustParseAddr("192.0.2.30"), netip.MustParseAddr("192.0.2.31"))
		if err != nil {
			t.Fatal(err)
		}
		ln, err := ListenTCP(h.NetNS, "192.0.2.31:9797")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		c, err := DialTCP(ctxT(t, 5*time.Second), w1.NetNS, "192.0.2.31:9797")
		if err != nil {
			t.Fatalf("node to switch host: %v", err)
		}
		c.Close()

		// nsenter --net: the node's network namespace, this process's mounts.
		p, err := l.StartNsenter(w1.NetNS, "", "sleep", "60")
		if err != nil {
			t.Fatal(err)
		}
		nsIno := func(path string) uint64 {
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			return st.Ino
		}
		var netOK, mntOK bool
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) && !(netOK && mntOK) {
			pid := strconv.Itoa(p.Pid())
			netOK = nsIno("/proc/"+pid+"/ns/net") == nsIno(netnsDir+"/"+w1.NetNS)
			mntOK = nsIno("/proc/"+pid+"/ns/mnt") == nsIno("/proc/self/ns/mnt")
			time.Sleep(20 * time.Millisecond)
		}
		if !netOK || !mntOK {
			t.Fatalf("nsenter'd process: in the node's netns %v, in our mount namespace %v", netOK, mntOK)
		}
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := l.RemoveSwitchHost("h1"); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(netnsDir + "/" + h.NetNS); err == nil {
			t.Fatalf("%s left", h.NetNS)
		}
		if _, err := l.AddSwitchHost("h1", netip.MustParseAddr("192.0.2.30")); err != nil {
			t.Fatalf("add again after removal: %v", err)
		}
	})
}

// checkGone fails t if any namespace with the prefix or any of the pids
// remains.
func checkGone(t *testing.T, prefix string, pids []int) {
	t.Helper()
	if ns := Namespaces(prefix); len(ns) != 0 {
		t.Errorf("namespaces left: %v", ns)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if alive(pid) {
			t.Errorf("process %d left", pid)
		}
	}
	if _, err := os.Stat(LockDir + "/" + prefix + ".lock"); err == nil {
		t.Errorf("lock file of %s left", prefix)
	}
}

func labPids(l *Lab) []int {
	var pids []int
	for _, p := range l.Procs() {
		pids = append(pids, p.Pid())
	}
	return pids
}

func TestCloseLeavesNothing(t *testing.T) {
	SkipUnlessRoot(t)
	t.Parallel()
	const prefix = "enat-ltc-"
	l, err := New(Config{Prefix: prefix, EchoServer: echoBin, Nodes: []NodeConfig{{Name: "n1"}, {Name: "n2"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := New(Config{Prefix: prefix, EchoServer: echoBin}); err == nil {
		t.Fatal("second lab with the same prefix accepted")
	}
	if err := CleanupStale(prefix); err == nil {
		t.Fatal("CleanupStale accepted a live prefix")
	}
	p, err := l.AddPod("n1", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Start(p.NetNS, "", "sleep", "1000"); err != nil {
		t.Fatal(err)
	}
	// A process the lab did not start, in a lab namespace.
	stray := exec.Command("ip", "netns", "exec", l.Node("n2").NetNS, "sleep", "1000")
	stray.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	go stray.Wait()
	pids := append(labPids(l), stray.Process.Pid)
	// The stray is in the namespace once "ip netns exec" has run setns.
	for deadline := time.Now().Add(5 * time.Second); len(NamespacePids(l.NetNSes()...)) < len(pids); {
		if time.Now().After(deadline) {
			t.Fatalf("NamespacePids %v, want at least %v", NamespacePids(l.NetNSes()...), pids)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkGone(t, prefix, pids)
	if _, err := l.AddPod("n1", "y"); err == nil {
		t.Fatal("AddPod after Close accepted")
	}
}

func TestPanicLeavesNothing(t *testing.T) {
	SkipUnlessRoot(t)
	t.Parallel()
	const prefix = "enat-ltp-"
	var pids []int
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v", r)
			}
		}()
		// No EchoServer: the lab builds its own.
		l, err := New(Config{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if _, err := l.AddPod("worker1", "a"); err != nil {
			t.Fatal(err)
		}
		pids = labPids(l)
		panic("boom")
	}()
	checkGone(t, prefix, pids)
}

const (
	helperEnv  = "ENAT_LAB_HELPER"
	helperEcho = "ENAT_LAB_HELPER_ECHO"
)

// TestHelperProcess is run by other tests as a subprocess: it builds a lab
// and fails (t.Fatal) or crashes (os.Exit without cleanup).
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper for the failure tests")
	}
	prefix := os.Getenv("ENAT_LAB_HELPER_PREFIX")
	switch mode {
	case "fatal":
		l := NewT(t, Config{Prefix: prefix, EchoServer: echoBin})
		if _, err := l.AddPod("worker2", "a"); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("PIDS %s\n", joinPids(labPids(l)))
		t.Fatal("simulated failure")
	case "crash":
		l, err := New(Config{Prefix: prefix, EchoServer: echoBin})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.AddPod("worker2", "a"); err != nil {
			t.Fatal(err)
		}
		// A process that survives the crash (new session, no parent-death
		// signal): only CleanupStale can remove it.
		stray := exec.Command("ip", "netns", "exec", l.Node("worker1").NetNS, "sleep", "1000")
		stray.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := stray.Start(); err != nil {
			t.Fatal(err)
		}
		for len(NamespacePids(l.Node("worker1").NetNS)) == 0 {
			time.Sleep(10 * time.Millisecond)
		}
		fmt.Printf("PIDS %s\n", joinPids(append(labPids(l), stray.Process.Pid)))
		os.Exit(3)
	}
}

func joinPids(pids []int) string {
	s := make([]string, len(pids))
	for i, p := range pids {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ",")
}

func runHelper(t *testing.T, mode, prefix string) (pids []int, out string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "ENAT_LAB_HELPER_PREFIX="+prefix, helperEcho+"="+echoBin)
	b, err := cmd.CombinedOutput()
	out = string(b)
	if err == nil {
		t.Fatalf("helper %s succeeded:\n%s", mode, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "PIDS "); ok {
			for _, f := range strings.Split(rest, ",") {
				if p, err := strconv.Atoi(f); err == nil {
					pids = append(pids, p)
				}
			}
		}
	}
	if len(pids) == 0 {
		t.Fatalf("helper %s printed no pids:\n%s", mode, out)
	}
	return pids, out
}

func TestFatalLeavesNothing(t *testing.T) {
	SkipUnlessRoot(t)
	t.Parallel()
	const prefix = "enat-ltf-"
	pids, out := runHelper(t, "fatal", prefix)
	if !strings.Contains(out, "simulated failure") || !strings.Contains(out, "--- log of") {
		t.Errorf("helper output lacks the failure or the process logs:\n%s", out)
	}
	checkGone(t, prefix, pids)
}

func TestCrashThenCleanupStale(t *testing.T) {
	SkipUnlessRoot(t)
	t.Parallel()
	const prefix = "enat-lts-"
	pids, out := runHelper(t, "crash", prefix)
	if len(Namespaces(prefix)) == 0 {
		t.Fatalf("crash left no namespaces (helper output:\n%s)", out)
	}
	// A namespace with the prefix that no lab created survives.
	const foreign = prefix + "foreign"
	if out, err := exec.Command("ip", "netns", "add", foreign).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	defer exec.Command("ip", "netns", "delete", foreign).Run()
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), prefix+"lab-*"))
	if len(dirs) == 0 {
		t.Errorf("crash left no work directory")
	}
	if err := CleanupStale(prefix); err != nil {
		t.Fatal(err)
	}
	if dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), prefix+"lab-*")); len(dirs) != 0 {
		t.Errorf("work directories left: %v", dirs)
	}
	if ns := Namespaces(prefix); len(ns) != 1 || ns[0] != foreign {
		t.Fatalf("after CleanupStale: %v, want only %s", ns, foreign)
	}
	exec.Command("ip", "netns", "delete", foreign).Run()
	checkGone(t, prefix, pids)
}

func TestRefusesForeignNamespaces(t *testing.T) {
	l := &Lab{prefix: "enat-x-", nsSet: map[string]bool{"enat-x-a": true}}
	for _, ns := range []string{"", "enat-x-b", "other", "enat-y-a"} {
		if err := l.checkNS(ns); err == nil {
			t.Errorf("checkNS(%q) accepted", ns)
		}
		if err := l.ip(ns, "link", "show"); err == nil {
			t.Errorf("ip in %q accepted", ns)
		}
	}
	if err := validatePrefix("Bad/"); err == nil {
		t.Error("bad prefix accepted")
	}
}
