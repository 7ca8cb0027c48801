package lab

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

type relay struct {
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]bool
	done  bool
	once  sync.Once
}

func (r *relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return false
	}
	r.conns[c] = true
	return true
}

func (r *relay) untrack(c net.Conn) {
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
}

func (r *relay) close() {
	r.once.Do(func() {
		r.ln.Close()
		r.mu.Lock()
		r.done = true
		for c := range r.conns {
			c.Close()
		}
		r.conns = nil
		r.mu.Unlock()
	})
}

// ServeLoopback listens on 127.0.0.1:0 in the root namespace (a listening
// socket changes nothing there) and forwards every connection to addr
// (literal "ip:port") dialled from inside lab namespace ns. It returns the
// local "127.0.0.1:port" and a function that stops the relay and closes
// its connections; Close stops it too.
func (l *Lab) ServeLoopback(ns, addr string) (string, func(), error) {
	if err := l.checkNS(ns); err != nil {
		return "", nil, err
	}
	if err := literal(addr); err != nil {
		return "", nil, err
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	r := &relay{ln: ln, conns: map[net.Conn]bool{}}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		ln.Close()
		return "", nil, errors.New("lab: closed")
	}
	l.relays[r] = true
	l.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go r.serve(c, ns, addr)
		}
	}()
	stop := func() {
		r.close()
		l.mu.Lock()
		delete(l.relays, r)
		l.mu.Unlock()
	}
	return ln.Addr().String(), stop, nil
}

func (r *relay) serve(c net.Conn, ns, addr string) {
	if !r.track(c) {
		c.Close()
		return
	}
	defer r.untrack(c)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := DialTCP(ctx, ns, addr)
	cancel()
	if err != nil {
		return
	}
	if !r.track(up) {
		up.Close()
		return
	}
	defer r.untrack(up)
	defer up.Close()
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}
	wg.Add(2)
	go pipe(up, c)
	go pipe(c, up)
	wg.Wait()
}
