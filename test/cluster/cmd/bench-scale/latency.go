package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/lab"
)

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// latencySynthetic measures, for latencyPods new Pod objects (created
// without an IP first), the time from their status.podIP update to the
// address appearing in an element of the node's table, as the kernel's
// nftables notifications tell it. Updates are paced at latencyRate per
// second.
func (s *scale) latencySynthetic(ctx context.Context, watches map[string]*watch) (own, all, fromSend []float64, err error) {
	n := s.cfg.latencyPods
	P := s.cfg.policies
	var pods []*synthPod
	for j := range n {
		pods = append(pods, &synthPod{ns: nsName(j % P), name: fmt.Sprintf("lat-%05d", j),
			node: s.nodes[j%len(s.nodes)], policy: j % P})
	}
	if err := parallel(ctx, "latency pods", n, s.cfg.workers, func(ctx context.Context, i int) error {
		return s.createPod(ctx, pods[i], map[string]string{"app": "bench"})
	}); err != nil {
		return nil, nil, nil, err
	}
	s.pods = append(s.pods, pods...)
	if s.holders, err = s.readHolders(ctx); err != nil {
		return nil, nil, nil, err
	}
	time.Sleep(3 * time.Second) // let the agents digest the IP-less pods

	type rec struct {
		send, done time.Time
		err        error
	}
	recs := make([]rec, n)
	interval := time.Duration(float64(time.Second) / s.cfg.latencyRate)
	logf("updating status.podIP of %d pods, one every %v", n, interval)
	var wg sync.WaitGroup
	tick := time.NewTicker(interval)
	for i, p := range pods {
		if i > 0 {
			select {
			case <-ctx.Done():
				tick.Stop()
				wg.Wait()
				return nil, nil, nil, ctx.Err()
			case <-tick.C:
			}
		}
		p.ip = s.allocIP()
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs[i].send = time.Now()
			recs[i].err = retry(ctx, func() error { return s.setPodIP(ctx, p, s.hostIP(p.node)) })
			recs[i].done = time.Now()
		}()
	}
	tick.Stop()
	wg.Wait()
	for i := range recs {
		if recs[i].err != nil {
			return nil, nil, nil, fmt.Errorf("set pod IP of %s: %w", pods[i].name, recs[i].err)
		}
	}
	gwNode := func(p *synthPod) string { return s.holders[gatewayName(p.policy%s.cfg.gateways)] }
	deadline := time.Now().Add(30 * time.Second)
	for {
		missing := 0
		for _, p := range pods {
			_, ok1 := watches[p.node].seenAt(p.ip)
			_, ok2 := watches[gwNode(p)].seenAt(p.ip)
			if !ok1 || !ok2 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			logf("WARNING: %d of %d pod IPs not seen in the kernel 30 s after the last update", missing, n)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var api []float64
	negative := 0
	for i, p := range pods {
		api = append(api, ms(recs[i].done.Sub(recs[i].send)))
		t1, ok1 := watches[p.node].seenAt(p.ip)
		t2, ok2 := watches[gwNode(p)].seenAt(p.ip)
		if !ok1 || !ok2 {
			continue
		}
		own = append(own, ms(t1.Sub(recs[i].done)))
		fromSend = append(fromSend, ms(t1.Sub(recs[i].send)))
		if t1.Before(recs[i].done) {
			negative++
		}
		all = append(all, ms(later(t1, t2).Sub(recs[i].done)))
	}
	logf("API status update itself took %s", dist(api))
	if negative > 0 {
		logf("%d pods were in the kernel before the bench got the API response (negative latency kept as is)", negative)
	}
	return own, all, fromSend, nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// livePod is a real pod (network namespace) sending UDP to ext1 every
// sendInterval from one socket, from before the API knows its address.
type livePod struct {
	idx      int
	selected bool       // by the real pods' policy (label egress=yes)
	want     netip.Addr // the source its datagrams must leave with
	pod      *synthPod
	lab      *lab.Pod
	conn     net.Conn
	stop     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	sent     int       // datagrams sent
	early    int       // datagrams that arrived before the pod IP update was sent
	armed    time.Time // update sent
	t0       time.Time // update answered by the API
	arrived  time.Time // first datagram that arrived with the wanted source
	leak     int       // datagrams of a selected pod that left with another source than the floating IP
	wrong    int       // datagrams of an unselected pod that left with another source than its node's
}

type liveResult struct {
	firstPacket, inSet []float64
	// firstUnselected: the cost of the hold, for the unselected pods: the
	// API's answer to their first datagram out (with the node IP).
	firstUnselected    []float64
	pods, unselected   int
	failed             int
	leaked, leakedPods int
	early, wrong       int
}

// latencyReal measures, for realPods real pods spread over the nodes (one
// in four not selected by the policy), the time from status.podIP update
// to the first datagram from the pod that reaches an external listener
// with the wanted source (the floating IP; the node IP for an unselected
// pod). Every pod starts sending before its address is in the API, every
// sendInterval on one UDP flow; a datagram of a selected pod that reaches
// the listener with another source than the floating IP, before or after
// the update, is a leak. Up to realBatch pods are measured at once.
func (s *scale) latencyReal(ctx context.Context, watches map[string]*watch) (*liveResult, error) {
	n := s.cfg.realPods
	ext := s.c.Lab.External("ext1")
	fip := netip.MustParseAddr(floatingIP(0))
	pods := make([]*livePod, n)
	for i := range n {
		node := s.nodes[i%len(s.nodes)]
		p := &livePod{idx: i, selected: i%4 != 3, pod: &synthPod{ns: liveNamespace, name: fmt.Sprintf("live-%03d", i), node: node}, want: fip}
		if !p.selected {
			p.want = s.c.Lab.Node(node).IP
		}
		pods[i] = p
	}
	logf("creating %d real pods (network namespaces) and their Pod objects without IP", n)
	if err := parallel(ctx, "real pods", n, 4, func(ctx context.Context, i int) error {
		p := pods[i]
		if p.lab == nil {
			lp, err := s.c.Lab.AddPod(p.pod.node, p.pod.name)
			if err != nil {
				return err
			}
			p.lab, p.pod.ip = lp, lp.IP
		}
		egress := "no"
		if p.selected {
			egress = "yes"
		}
		return s.createPod(ctx, p.pod, map[string]string{"egress": egress})
	}); err != nil {
		return nil, err
	}
	pc, err := lab.ListenUDP(ext.NetNS, netip.AddrPortFrom(ext.IP, 9300).String())
	if err != nil {
		return nil, err
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 256)
		for {
			k, from, err := pc.ReadFrom(buf)
			now := time.Now()
			if err != nil {
				return
			}
			f := strings.Fields(string(buf[:k]))
			if len(f) != 2 {
				continue
			}
			i, err := strconv.Atoi(f[0])
			if err != nil || i < 0 || i >= n {
				continue
			}
			ua, ok := from.(*net.UDPAddr)
			if !ok {
				continue
			}
			src, _ := netip.AddrFromSlice(ua.IP)
			src = src.Unmap()
			p := pods[i]
			p.mu.Lock()
			if p.armed.IsZero() {
				p.early++
			}
			switch {
			case src != p.want && p.selected:
				p.leak++
			case src != p.want:
				p.wrong++
			case p.arrived.IsZero():
				p.arrived = now
			}
			p.mu.Unlock()
		}
	}()
	res := &liveResult{pods: n}
	dst := netip.AddrPortFrom(ext.IP, 9300).String()
	for b := 0; b < n; b += s.cfg.realBatch {
		batch := pods[b:min(n, b+s.cfg.realBatch)]
		for _, p := range batch {
			c, err := lab.DialUDP(ctx, p.lab.NetNS, dst)
			if err != nil {
				return nil, err
			}
			p.conn, p.stop = c, make(chan struct{})
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				t := time.NewTicker(s.cfg.sendInterval)
				defer t.Stop()
				for seq := 0; ; seq++ {
					fmt.Fprintf(p.conn, "%d %d", p.idx, seq)
					p.mu.Lock()
					p.sent++
					p.mu.Unlock()
					select {
					case <-p.stop:
						return
					case <-t.C:
					}
				}
			}()
		}
		// Every pod sends before its address is in the API: at least 20
		// datagrams each (which the nodes hold: none may leave).
		for _, p := range batch {
			for {
				p.mu.Lock()
				sent := p.sent
				p.mu.Unlock()
				if sent >= 20 || ctx.Err() != nil {
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
		for _, p := range batch {
			p.mu.Lock()
			p.armed = time.Now()
			p.mu.Unlock()
			err := retry(ctx, func() error { return s.setPodIP(ctx, p.pod, s.hostIP(p.pod.node)) })
			p.mu.Lock()
			p.t0 = time.Now()
			p.mu.Unlock()
			if err != nil {
				return nil, err
			}
			time.Sleep(50 * time.Millisecond)
		}
		deadline := time.Now().Add(15 * time.Second)
		for _, p := range batch {
			for {
				p.mu.Lock()
				done := !p.arrived.IsZero()
				p.mu.Unlock()
				if done || time.Now().After(deadline) {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		for _, p := range batch {
			close(p.stop)
			p.wg.Wait()
			p.conn.Close()
		}
	}
	for _, p := range pods {
		p.mu.Lock()
		switch {
		case p.arrived.IsZero():
			res.failed++
		case p.selected:
			res.firstPacket = append(res.firstPacket, ms(p.arrived.Sub(p.t0)))
		default:
			res.firstUnselected = append(res.firstUnselected, ms(p.arrived.Sub(p.t0)))
		}
		if !p.selected {
			res.unselected++
		}
		if p.leak > 0 {
			res.leakedPods++
			res.leaked += p.leak
		}
		res.early += p.early
		res.wrong += p.wrong
		p.mu.Unlock()
		if t, ok := watches[p.pod.node].seenAt(p.pod.ip); ok && p.selected {
			res.inSet = append(res.inSet, ms(t.Sub(p.t0)))
		}
	}
	return res, nil
}
