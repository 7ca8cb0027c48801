package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/test/lab"
	"golang.org/x/sys/unix"
)

// The per-packet measures use plain blocking sockets on locked OS threads at
// both ends (the Go poller would add its own wake-ups to every round trip):
// the server runs in the external server's namespace, the client in a pod.

// ppServer answers request/response connections ('R': echo every byte)
// and bulk connections ('B': count bytes until EOF, then send back the
// count and the time from first to last byte).
type ppServer struct {
	ln   net.Listener
	addr string
}

func startPPServer(netns string, ip netip.Addr) (*ppServer, error) {
	ln, err := lab.ListenTCP(netns, netip.AddrPortFrom(ip, 9200).String())
	if err != nil {
		return nil, err
	}
	s := &ppServer{ln: ln, addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveConn(c)
		}
	}()
	return s, nil
}

func (s *ppServer) Close() { s.ln.Close() }

// blockingFD turns a connection into a blocking file descriptor.
func blockingFD(c net.Conn) (*os.File, int, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil, 0, errors.New("not TCP")
	}
	f, err := tc.File()
	c.Close()
	if err != nil {
		return nil, 0, err
	}
	return f, int(f.Fd()), nil // Fd puts the file in blocking mode
}

func readFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Read(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.EOF
		}
		b = b[n:]
	}
	return nil
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func serveConn(c net.Conn) {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		c.Close()
		return
	}
	f, fd, err := blockingFD(c)
	if err != nil {
		return
	}
	defer f.Close()
	defer pinThread()()
	switch mode[0] {
	case 'R':
		var b [1]byte
		for readFull(fd, b[:]) == nil {
			if writeAll(fd, b[:]) != nil {
				return
			}
		}
	case 'B':
		buf := make([]byte, 256<<10)
		var total int64
		var first, last time.Time
		for {
			n, err := unix.Read(fd, buf)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n == 0 {
				break
			}
			last = time.Now()
			if first.IsZero() {
				first = last
			}
			total += int64(n)
		}
		var out [16]byte
		binary.BigEndian.PutUint64(out[:8], uint64(total))
		binary.BigEndian.PutUint64(out[8:], uint64(last.Sub(first)))
		writeAll(fd, out[:])
	}
}

// pinCPU is the CPU both ends of a per-packet run are pinned to (-1: no
// pinning). On one CPU the client, the server and the kernel's packet
// processing (veth delivers on the sending CPU) take turns, so the rate
// follows the CPU work per packet; across CPUs every round trip would add
// two cross-CPU wake-ups whose cost varies far more than the rules' cost.
var pinCPU = -1

// pinThread locks the goroutine to its OS thread and pins the thread;
// release restores the thread's affinity and unlocks it. The thread must
// survive: the lab starts processes with a parent-death signal bound to
// the thread that forked them, so a thread that exits (a goroutine ending
// while locked) would kill an agent or operator started from it.
func pinThread() (release func()) {
	runtime.LockOSThread()
	if pinCPU < 0 {
		return runtime.UnlockOSThread
	}
	var orig, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return runtime.UnlockOSThread
	}
	set.Set(pinCPU)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return runtime.UnlockOSThread
	}
	return func() {
		unix.SchedSetaffinity(0, &orig) //nolint:errcheck
		runtime.UnlockOSThread()
	}
}

// rrRate runs a 1-byte ping-pong on one TCP connection from the pod for d
// (after a 300 ms warm-up) and returns transactions per second.
func rrRate(ctx context.Context, podNS, addr string, d time.Duration) (float64, error) {
	c, err := lab.DialTCP(ctx, podNS, addr)
	if err != nil {
		return 0, err
	}
	if _, err := c.Write([]byte{'R'}); err != nil {
		c.Close()
		return 0, err
	}
	f, fd, err := blockingFD(c)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	type result struct {
		rate float64
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		defer pinThread()()
		b := []byte{1}
		warm := time.Now().Add(300 * time.Millisecond)
		var start time.Time
		var end time.Time
		n := 0
		for {
			if err := writeAll(fd, b); err != nil {
				ch <- result{err: err}
				return
			}
			if err := readFull(fd, b); err != nil {
				ch <- result{err: err}
				return
			}
			now := time.Now()
			if start.IsZero() {
				if now.After(warm) {
					start, end = now, now.Add(d)
				}
				continue
			}
			n++
			if now.After(end) {
				ch <- result{rate: float64(n) / now.Sub(start).Seconds()}
				return
			}
		}
	}()
	r := <-ch
	return r.rate, r.err
}

// bulkRate sends as fast as it can for d on one TCP connection and returns
// the rate the server received, in MB/s (10^6 bytes).
func bulkRate(ctx context.Context, podNS, addr string, d time.Duration) (float64, error) {
	c, err := lab.DialTCP(ctx, podNS, addr)
	if err != nil {
		return 0, err
	}
	if _, err := c.Write([]byte{'B'}); err != nil {
		c.Close()
		return 0, err
	}
	f, fd, err := blockingFD(c)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	type result struct {
		rate float64
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		defer pinThread()()
		buf := make([]byte, 128<<10)
		end := time.Now().Add(d)
		for time.Now().Before(end) {
			if err := writeAll(fd, buf); err != nil {
				ch <- result{err: err}
				return
			}
		}
		unix.Shutdown(fd, unix.SHUT_WR)
		var out [16]byte
		if err := readFull(fd, out[:]); err != nil {
			ch <- result{err: err}
			return
		}
		total := binary.BigEndian.Uint64(out[:8])
		el := time.Duration(binary.BigEndian.Uint64(out[8:]))
		if el <= 0 {
			ch <- result{err: errors.New("no data")}
			return
		}
		ch <- result{rate: float64(total) / el.Seconds() / 1e6}
	}()
	r := <-ch
	return r.rate, r.err
}

// ppNode switches the source node between the configurations of the
// per-packet measure. The node's agent is stopped for the whole measure
// (so that it neither repairs what we change nor adds background work to
// one configuration only); the full ruleset is the one it made, saved with
// `nft list table` and restored with `nft -f`.
type ppNode struct {
	s         *scale
	node      string
	netns     string
	saved     string // nft list output
	savedSig  string
	want      *tableDump
	linear    string // iptables-restore input
	rules     int
	hasTable  bool
	hasLinear bool
	// prog, with the eBPF classifier: its program, attached to ifaces
	// with the table, detached without it.
	prog   *bpf.Classifier
	ifaces map[int]bool
}

const linearChain = "ENAT-BENCH-LINEAR"

func (p *ppNode) exec(ctx context.Context, argv ...string) error {
	_, err := p.s.c.Lab.Exec(ctx, p.netns, argv...)
	return err
}

func (p *ppNode) setTable(ctx context.Context, want bool) error {
	if want == p.hasTable {
		return nil
	}
	if !want {
		if err := p.exec(ctx, "nft", "delete", "table", "ip", tableName); err != nil {
			return err
		}
		if err := p.attach(map[int]bool{}); err != nil {
			return err
		}
		p.hasTable = false
		return nil
	}
	if err := p.attach(p.ifaces); err != nil {
		return err
	}
	if err := p.exec(ctx, "nft", "-f", p.saved); err != nil {
		return err
	}
	d, err := dumpTable(p.netns)
	if err != nil {
		return err
	}
	if d.signature() != p.savedSig {
		return fmt.Errorf("table restored with nft -f differs from the agent's: %s; %s", d, p.want.diff(d))
	}
	p.hasTable = true
	return nil
}

// attach attaches the classifier's program to exactly ifaces (nothing
// without the eBPF classifier).
func (p *ppNode) attach(ifaces map[int]bool) error {
	if p.prog == nil {
		return nil
	}
	return lab.Do(p.netns, func() error {
		_, _, err := p.prog.Reconcile(ifaces)
		return err
	})
}

func (p *ppNode) setLinear(ctx context.Context, want bool) error {
	if want == p.hasLinear {
		return nil
	}
	if want {
		if err := p.exec(ctx, "iptables-restore", "-w", "--noflush", p.linear); err != nil {
			return err
		}
		p.hasLinear = true
		return nil
	}
	for _, argv := range [][]string{
		{"iptables", "-w", "-t", "mangle", "-D", "PREROUTING", "-j", linearChain},
		{"iptables", "-w", "-t", "mangle", "-F", linearChain},
		{"iptables", "-w", "-t", "mangle", "-X", linearChain},
	} {
		if err := p.exec(ctx, argv...); err != nil {
			return err
		}
	}
	p.hasLinear = false
	return nil
}

// writeLinear writes the kube-static-egress-ip style chain: one rule per
// (pod of this node, destination of its policy), padded to at least min
// rules with addresses no pod has.
func (p *ppNode) writeLinear(dir string, min int) error {
	var b strings.Builder
	b.WriteString("*mangle\n:" + linearChain + " - [0:0]\n")
	n := 0
	for _, sp := range p.s.pods {
		if sp.node != p.node || !sp.ip.IsValid() {
			continue
		}
		for k := range p.s.cfg.dests {
			fmt.Fprintf(&b, "-A %s -s %s/32 -d %s -j MARK --set-xmark 0x100000/0x100000\n", linearChain, sp.ip, destination(sp.policy, k))
			n++
		}
	}
	for pad := uint32(0); n < min; pad++ {
		a := 0x0af4ffff - pad // down from 10.244.255.255, above the synthetic pods
		ip := netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)})
		fmt.Fprintf(&b, "-A %s -s %s/32 -d %s -j MARK --set-xmark 0x100000/0x100000\n", linearChain, ip, destination(int(pad), 0))
		n++
	}
	b.WriteString("-A PREROUTING -j " + linearChain + "\nCOMMIT\n")
	p.linear = filepath.Join(dir, "bench-linear.rules")
	p.rules = n
	return os.WriteFile(p.linear, []byte(b.String()), 0o644)
}

type ppConfig struct {
	name        string
	table       bool
	linear      bool
	pod         string // pod namespace
	description string
}

type ppSample struct{ rr, mbps []float64 }

// measurePackets runs every configuration rounds times, interleaved (the
// order rotates each round), and returns the samples per configuration.
func measurePackets(ctx context.Context, p *ppNode, srv *ppServer, configs []ppConfig, rounds int, d time.Duration) (map[string]*ppSample, error) {
	out := map[string]*ppSample{}
	for _, c := range configs {
		out[c.name] = &ppSample{}
	}
	// A discarded warm-up run: the first connections of the process pay
	// for thread creation and cold caches.
	if err := p.setTable(ctx, configs[0].table); err != nil {
		return nil, err
	}
	if _, err := rrRate(ctx, configs[0].pod, srv.addr, time.Second); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	if _, err := bulkRate(ctx, configs[0].pod, srv.addr, time.Second); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	for r := range rounds {
		for k := range configs {
			c := configs[(k+r)%len(configs)]
			if err := p.setLinear(ctx, c.linear); err != nil {
				return nil, err
			}
			if err := p.setTable(ctx, c.table); err != nil {
				return nil, err
			}
			time.Sleep(200 * time.Millisecond)
			rr, err := rrRate(ctx, c.pod, srv.addr, d)
			if err != nil {
				return nil, fmt.Errorf("%s: request/response: %w", c.name, err)
			}
			mb, err := bulkRate(ctx, c.pod, srv.addr, d)
			if err != nil {
				return nil, fmt.Errorf("%s: bulk: %w", c.name, err)
			}
			out[c.name].rr = append(out[c.name].rr, rr)
			out[c.name].mbps = append(out[c.name].mbps, mb)
			logf("  round %d %-12s %8.0f transactions/s %8.1f MB/s", r+1, c.name, rr, mb)
		}
	}
	return out, nil
}
