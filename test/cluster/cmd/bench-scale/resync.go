package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/lab"
)

// procPid finds the process of a binary started through `ip netns exec`
// (which normally execs into it, so the pid is the binary's own).
func procPid(p *lab.Proc, binary string) (int, error) {
	pid := p.Pid()
	if pid == 0 {
		return 0, fmt.Errorf("%s not started", binary)
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && filepath.Base(exe) == binary {
		return pid, nil
	}
	// A wrapper that forked: look for its child running the binary.
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
		if err != nil {
			continue
		}
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", child)); err == nil && filepath.Base(exe) == binary {
				return child, nil
			}
		}
	}
	return 0, fmt.Errorf("no %s process under pid %d", binary, pid)
}

// memory is VmHWM (peak resident set) and VmRSS in MiB.
type memory struct{ hwm, rss float64 }

func procMemory(pid int) (memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, err
	}
	defer f.Close()
	var m memory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		switch k {
		case "VmHWM":
			m.hwm = kb / 1024
		case "VmRSS":
			m.rss = kb / 1024
		}
	}
	return m, sc.Err()
}

func (s *scale) agentMemory(node string) (memory, error) {
	pid, err := procPid(s.c.Agents[node], "egressnat-agent")
	if err != nil {
		return memory{}, err
	}
	return procMemory(pid)
}

var inetRE = regexp.MustCompile(`inet (\d+\.\d+\.\d+\.\d+/\d+)`)

// removeFloating deletes the floating-range addresses (192.0.2.100-199)
// from the node's uplink, as after a reboot.
func (s *scale) removeFloating(ctx context.Context, node string) ([]string, error) {
	n := s.c.Lab.Node(node)
	out, err := s.c.Lab.Exec(ctx, n.NetNS, "ip", "-4", "-o", "addr", "show", "dev", n.Uplink)
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, m := range inetRE.FindAllStringSubmatch(string(out), -1) {
		p, err := netip.ParsePrefix(m[1])
		if err != nil {
			continue
		}
		b := p.Addr().As4()
		if b[0] == 192 && b[1] == 0 && b[2] == 2 && b[3] >= 100 && b[3] <= 199 {
			if _, err := s.c.Lab.Exec(ctx, n.NetNS, "ip", "addr", "del", m[1], "dev", n.Uplink); err != nil {
				return removed, err
			}
			removed = append(removed, p.Addr().String())
		}
	}
	return removed, nil
}

type resyncResult struct {
	node                string
	took                time.Duration // agent start -> nft table as before
	floatingBack        time.Duration // agent start -> floating IPs back on the uplink
	floating            int
	want                *tableDump
	cachesSynced        time.Duration // from the agent's log, relative to start
	firstSync           time.Duration // from the agent's log: end of the first sync
	firstSyncTook       string        // the agent's own took= of that sync
	syncs               int           // syncs the agent logged in this run
	peakBefore, peakNew memory
}

// resync kills the node's agent (when it runs), deletes its table and
// floating IPs, starts it again and times it until the kernel's table has
// the same content as want (compared by signature), seen through the
// watch and confirmed by a dump.
func (s *scale) resync(ctx context.Context, node string, w *watch, want *tableDump) (*resyncResult, error) {
	r := &resyncResult{node: node, want: want}
	n := s.c.Lab.Node(node)
	if p := s.c.Agents[node]; p != nil && p.Running() {
		m, err := s.agentMemory(node)
		if err != nil {
			logf("WARNING: memory of agent %s: %v", node, err)
		}
		r.peakBefore = m
		if err := p.Kill(); err != nil {
			return nil, err
		}
	}
	if d, err := dumpTable(n.NetNS); err != nil {
		return nil, err
	} else if d.exists {
		if _, err := s.c.Lab.Exec(ctx, n.NetNS, "nft", "delete", "table", "ip", tableName); err != nil {
			return nil, err
		}
	}
	removed, err := s.removeFloating(ctx, node)
	if err != nil {
		return nil, err
	}
	r.floating = len(removed)
	time.Sleep(200 * time.Millisecond)
	if c := w.counts(); c.total != 0 {
		logf("WARNING: watch of %s still counts %d elements after the table was deleted", node, c.total)
	}
	t0 := time.Now()
	if err := s.c.StartAgent(node); err != nil {
		return nil, err
	}
	deadline := t0.Add(3 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-w.wake:
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			d, _ := dumpTable(n.NetNS)
			return nil, fmt.Errorf("%s: table not back %v after the agent started: have %v, want %v", node, time.Since(t0), d, want)
		}
		// The eBPF classifier's classes may go to other chains in a table
		// rebuilt from nothing: those sets are not compared.
		if c := w.counts(); c.total < want.classFree().total {
			continue
		}
		d, err := dumpTable(n.NetNS)
		if err != nil {
			return nil, err
		}
		if d.classFree().signature() == want.classFree().signature() {
			last := w.counts().last
			r.took = last.Sub(t0)
			break
		}
	}
	// Floating IPs come back after the table.
	for len(removed) > 0 && time.Now().Before(deadline) {
		out, err := s.c.Lab.Exec(ctx, n.NetNS, "ip", "-4", "-o", "addr", "show", "dev", n.Uplink)
		if err != nil {
			return nil, err
		}
		all := true
		for _, a := range removed {
			if !strings.Contains(string(out), "inet "+a+"/") {
				all = false
			}
		}
		if all {
			r.floatingBack = time.Since(t0)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The agent logs its sync after the whole apply (addresses, conntrack).
	for end := time.Now().Add(10 * time.Second); ; {
		*r = resyncResult{node: r.node, want: r.want, took: r.took, floatingBack: r.floatingBack, floating: r.floating, peakBefore: r.peakBefore}
		s.parseAgentLog(node, t0, r)
		if r.syncs > 0 || time.Now().After(end) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return r, nil
}

// parseAgentLog reads the agent's console log of its last run: when its
// caches were synced and when its first sync ended (and its took=).
func (s *scale) parseAgentLog(node string, t0 time.Time, r *resyncResult) {
	b, err := os.ReadFile(s.c.Agents[node].LogPath)
	if err != nil {
		return
	}
	text := string(b)
	if i := strings.LastIndex(text, "\n=== "); i >= 0 {
		text = text[i+1:]
	}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 {
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", f[0])
		if err != nil {
			continue
		}
		msg := f[2]
		if len(f) > 3 && !strings.HasPrefix(f[3], "{") { // a caller field
			msg = f[3]
		}
		switch {
		case msg == "agent caches synced" && r.cachesSynced == 0:
			r.cachesSynced = ts.Sub(t0)
		case msg == "synced":
			r.syncs++
			if r.firstSync == 0 {
				r.firstSync = ts.Sub(t0)
				var fields map[string]any
				if err := json.Unmarshal([]byte(f[len(f)-1]), &fields); err == nil {
					r.firstSyncTook = fmt.Sprint(fields["took"])
				}
			}
		}
	}
}
