package realcluster

import (
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/lab"
)

// streamLog receives the stream pods' datagrams ("stream TAG SEQ
// UNIX_NANOS", netutil stream) on the external host and keeps, per tag,
// what arrived from which source.
type streamLog struct {
	pc net.PacketConn

	mu      sync.Mutex
	want    map[string]netip.Addr // the source each tag must be seen from
	recs    map[string][]datagram
	foreign []string // datagrams of no known tag
	// forgotten tags are no longer checked (forget).
	forgotten map[string]bool
	done      bool
}

type datagram struct {
	seq        int
	sent, recv time.Time
	src        netip.Addr
}

func listenStreams(ext *lab.External) (*streamLog, error) {
	pc, err := lab.ListenUDP(ext.NetNS, fmt.Sprintf("0.0.0.0:%d", streamPort))
	if err != nil {
		return nil, err
	}
	s := &streamLog{pc: pc, want: map[string]netip.Addr{}, recs: map[string][]datagram{}, forgotten: map[string]bool{}}
	go s.read()
	return s, nil
}

func (s *streamLog) read() {
	buf := make([]byte, 512)
	for {
		n, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		now := time.Now()
		src := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
		f := strings.Fields(string(buf[:n]))
		s.mu.Lock()
		if len(f) != 4 || f[0] != "stream" {
			s.foreign = append(s.foreign, fmt.Sprintf("%q from %s", buf[:n], src))
			s.mu.Unlock()
			continue
		}
		seq, err1 := strconv.Atoi(f[2])
		ns, err2 := strconv.ParseInt(f[3], 10, 64)
		if err1 != nil || err2 != nil {
			s.foreign = append(s.foreign, fmt.Sprintf("%q from %s", buf[:n], src))
		} else {
			s.recs[f[1]] = append(s.recs[f[1]], datagram{seq: seq, sent: time.Unix(0, ns), recv: now, src: src})
		}
		s.mu.Unlock()
	}
}

// expect says tag's datagrams must come from want.
func (s *streamLog) expect(tag string, want netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.want[tag] = want
}

// forget stops checking the tags match selects (their pods are gone).
func (s *streamLog) forget(match func(tag string) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for tag := range s.want {
		if match(tag) {
			delete(s.want, tag)
			s.forgotten[tag] = true
		}
	}
}

func (s *streamLog) tags() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for tag := range s.want {
		out = append(out, tag)
	}
	sort.Strings(out)
	return out
}

func (s *streamLog) count(tag string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.recs[tag])
}

func (s *streamLog) first(tag string) datagram {
	s.mu.Lock()
	defer s.mu.Unlock()
	var first datagram
	for i, d := range s.recs[tag] {
		if i == 0 || d.seq < first.seq {
			first = d
		}
	}
	return first
}

// lastSent is the send time of tag's latest delivered datagram.
func (s *streamLog) lastSent(tag string) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	var last time.Time
	for _, d := range s.recs[tag] {
		if d.sent.After(last) {
			last = d.sent
		}
	}
	return last
}

// wrong lists the datagrams received since from a source other than
// their tag's (and any datagram of an unknown tag).
func (s *streamLog) wrong(since time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := append([]string(nil), s.foreign...)
	for tag, recs := range s.recs {
		want, known := s.want[tag]
		for _, d := range recs {
			if d.recv.Before(since) {
				continue
			}
			switch {
			case s.forgotten[tag]: // its pod died with its node
			case !known:
				out = append(out, fmt.Sprintf("%s #%d from %s: a tag no pod was given", tag, d.seq, d.src))
			case d.src != want:
				out = append(out, fmt.Sprintf("%s #%d from %s (want %s)", tag, d.seq, d.src, want))
			}
		}
	}
	return out
}

// maxGaps is, per expected tag, the longest time between two datagrams
// received after since (by arrival).
func (s *streamLog) maxGaps(since time.Time) map[string]time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]time.Duration{}
	for tag := range s.want {
		var prev time.Time
		for _, d := range s.recs[tag] {
			if d.recv.Before(since) {
				prev = d.recv
				continue
			}
			if !prev.IsZero() && d.recv.Sub(prev) > out[tag] {
				out[tag] = d.recv.Sub(prev)
			}
			prev = d.recv
		}
	}
	return out
}

func (s *streamLog) close() {
	s.mu.Lock()
	s.done = true
	s.mu.Unlock()
	s.pc.Close()
}

func (s *streamLog) closed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.done
}
