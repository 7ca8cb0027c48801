package cluster

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/egressnat/egressnat/test/lab"
)

// Stream is a long-lived TCP connection from a pod to an external echo
// server that sends a message every interval; every reply carries the
// source ip:port the server saw.
type Stream struct {
	Pod *Pod

	conn   net.Conn
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	source  string      // the first reply
	sent    []time.Time // send time of message i
	replies []time.Time // receive time of reply i
	err     error       // first error: reset, EOF, or another source
}

// StartStream connects and starts sending; it returns after the first
// reply.
func StartStream(ctx context.Context, p *Pod, ext *lab.External, interval time.Duration) (*Stream, error) {
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	defer dcancel()
	conn, err := lab.DialTCP(dctx, p.NetNS, ext.TCPAddr())
	if err != nil {
		return nil, fmt.Errorf("stream from %s: %w", p.Name, err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	s := &Stream{Pod: p, conn: conn, cancel: cancel, done: make(chan struct{})}
	first := make(chan struct{})
	go s.read(first)
	go s.write(sctx, interval)
	select {
	case <-first:
	case <-time.After(3 * time.Second):
		s.Close()
		return nil, fmt.Errorf("stream from %s: no first reply", p.Name)
	}
	if err := s.Err(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Stream) write(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for i := 0; ; i++ {
		s.mu.Lock()
		s.sent = append(s.sent, time.Now())
		s.mu.Unlock()
		if _, err := fmt.Fprintf(s.conn, "%d\n", i); err != nil {
			s.fail(fmt.Errorf("send %d: %w", i, err))
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Stream) read(first chan struct{}) {
	defer close(s.done)
	r := bufio.NewReader(s.conn)
	for {
		line, err := r.ReadString('\n')
		now := time.Now()
		if err != nil {
			s.fail(fmt.Errorf("receive: %w", err))
			if first != nil {
				close(first)
			}
			return
		}
		line = strings.TrimSpace(line)
		s.mu.Lock()
		if s.source == "" {
			s.source = line
		} else if line != s.source && s.err == nil {
			s.err = fmt.Errorf("source changed from %s to %s", s.source, line)
		}
		s.replies = append(s.replies, now)
		s.mu.Unlock()
		if first != nil {
			close(first)
			first = nil
		}
	}
}

func (s *Stream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

// Source is the ip:port the server saw on the first reply.
func (s *Stream) Source() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.source
}

// Err is the first failure: a reset, an end of stream, or a changed source.
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Replies counts the replies so far.
func (s *Stream) Replies() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.replies)
}

// RecoveredAfter returns how long after t0 the first reply to a message
// sent after t0 arrived (replies come in order: reply i answers message
// i), and false when none has arrived yet.
func (s *Stream) RecoveredAfter(t0 time.Time) (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, at := range s.replies {
		if i < len(s.sent) && s.sent[i].After(t0) {
			return at.Sub(t0), true
		}
	}
	return 0, false
}

// MaxWait returns the longest time a message sent between from and to
// waited for its reply (one still unanswered counts until now): how long
// the connection stalled.
func (s *Stream) MaxWait(from, to time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var worst time.Duration
	now := time.Now()
	for i, sent := range s.sent {
		if sent.Before(from) || sent.After(to) {
			continue
		}
		end := now
		if i < len(s.replies) {
			end = s.replies[i]
		}
		worst = max(worst, end.Sub(sent))
	}
	return worst
}

// WaitRecovered waits until RecoveredAfter(t0) reports a reply.
func (s *Stream) WaitRecovered(t0 time.Time, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	for {
		if err := s.Err(); err != nil {
			return 0, err
		}
		if d, ok := s.RecoveredAfter(t0); ok {
			return d, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("stream from %s: no reply %v after the fault", s.Pod.Name, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Close ends the stream.
func (s *Stream) Close() {
	s.cancel()
	s.conn.Close()
	<-s.done
}
