package lab

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// Do runs fn on a dedicated OS thread switched into the network namespace
// ns (a name under /run/netns) and switches the thread back afterwards.
// Sockets created by fn stay in ns. Only fn itself runs in ns: goroutines
// it starts run elsewhere. If switching back fails the thread is left
// locked and the Go runtime discards it, so the process never runs
// anything else in ns by accident.
func Do(ns string, fn func() error) error {
	if ns == "" {
		return errors.New("lab: empty network namespace name")
	}
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("lab: get current netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("lab: open netns %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			// setns failed: the thread is still where it was.
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("lab: enter netns %s: %w", ns, err)
			return
		}
		ferr := runSafe(fn)
		if err := netns.Set(orig); err != nil {
			// Stay locked: the thread dies with this goroutine.
			ch <- fmt.Errorf("lab: leave netns %s: %w (fn: %v)", ns, err, ferr)
			return
		}
		runtime.UnlockOSThread()
		ch <- ferr
	}()
	return <-ch
}

func runSafe(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("lab: panic in namespace: %v", r)
		}
	}()
	return fn()
}

// literal checks that addr is "ip:port" with a literal IPv4 address, so no
// name resolution (which may run on other threads) is involved.
func literal(addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("lab: address %q must be a literal ip:port: %w", addr, err)
	}
	if !ap.Addr().Is4() {
		return fmt.Errorf("lab: address %q is not IPv4", addr)
	}
	return nil
}

// socketIn opens a socket for the literal "ip:port" addr inside namespace
// ns; the socket stays in ns.
func socketIn[T any](ns, addr string, open func() (T, error)) (T, error) {
	var out T
	if err := literal(addr); err != nil {
		return out, err
	}
	err := Do(ns, func() error {
		var err error
		out, err = open()
		return err
	})
	return out, err
}

// DialTCP connects to addr (literal "ip:port") from inside namespace ns.
func DialTCP(ctx context.Context, ns, addr string) (net.Conn, error) {
	var d net.Dialer
	return socketIn(ns, addr, func() (net.Conn, error) { return d.DialContext(ctx, "tcp4", addr) })
}

// DialUDP returns a connected UDP socket to addr inside namespace ns.
func DialUDP(ctx context.Context, ns, addr string) (net.Conn, error) {
	var d net.Dialer
	return socketIn(ns, addr, func() (net.Conn, error) { return d.DialContext(ctx, "udp4", addr) })
}

// ListenTCP listens on addr (literal "ip:port", port may be 0) inside
// namespace ns. Accepted connections belong to ns as well.
func ListenTCP(ns, addr string) (net.Listener, error) {
	return socketIn(ns, addr, func() (net.Listener, error) { return net.Listen("tcp4", addr) })
}

// ListenUDP opens a UDP socket bound to addr inside namespace ns.
func ListenUDP(ns, addr string) (net.PacketConn, error) {
	return socketIn(ns, addr, func() (net.PacketConn, error) { return net.ListenPacket("udp4", addr) })
}

// EchoTCP dials the echo server at addr from namespace ns, sends one line
// and returns the answer ("<src-ip>:<src-port>" as the server saw it).
func EchoTCP(ctx context.Context, ns, addr string) (string, error) {
	c, err := DialTCP(ctx, ns, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return EchoLine(ctx, c, "hello")
}

// EchoLine writes msg plus a newline on c and reads one answer line.
func EchoLine(ctx context.Context, c net.Conn, msg string) (string, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
		defer c.SetDeadline(time.Time{})
	}
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// UDPExchange sends msg to addr from namespace ns and returns the first
// reply. The datagram is resent every second until a reply arrives or ctx
// ends.
func UDPExchange(ctx context.Context, ns, addr, msg string) (string, error) {
	c, err := DialUDP(ctx, ns, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := c.Write([]byte(msg)); err != nil {
			return "", err
		}
		dl := time.Now().Add(time.Second)
		if d, ok := ctx.Deadline(); ok && d.Before(dl) {
			dl = d
		}
		c.SetReadDeadline(dl)
		n, err := c.Read(buf)
		if err == nil {
			return string(buf[:n]), nil
		}
		if ctx.Err() != nil {
			return "", fmt.Errorf("lab: udp %s from %s: %w (last: %v)", addr, ns, ctx.Err(), err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			// e.g. ECONNREFUSED from an ICMP error: retry until ctx ends.
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}

// UDPSend sends one datagram msg to addr from namespace ns, from a new
// socket (a new flow each time), and waits for nothing.
func UDPSend(ns, addr, msg string) error {
	c, err := DialUDP(context.Background(), ns, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(msg))
	return err
}

// PingPayloadPrefix starts the payload of every echo request sent by Ping;
// the echo server indexes such requests by the id that follows it.
const PingPayloadPrefix = "enat-lab-ping "

// Ping sends ICMP echo requests from namespace ns to dst (one every 300 ms)
// until a reply arrives or ctx ends. It returns the id carried in the
// payload, which [External.ICMPSource] resolves to the source address the
// server saw; the id is returned also with an error (the request may have
// arrived even if no reply came back).
func Ping(ctx context.Context, ns string, dst netip.Addr) (string, error) {
	id, err := randomID()
	if err != nil {
		return "", err
	}
	var pc *icmp.PacketConn
	if err := Do(ns, func() error {
		var err error
		pc, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return "", err
	}
	defer pc.Close()
	var b [2]byte
	rand.Read(b[:])
	icmpID := int(binary.BigEndian.Uint16(b[:]))
	payload := []byte(PingPayloadPrefix + id)
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 1500)
	for seq := 1; ; seq++ {
		msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: icmpID, Seq: seq, Data: payload}}
		wb, err := msg.Marshal(nil)
		if err != nil {
			return "", err
		}
		if _, err := pc.WriteTo(wb, to); err != nil {
			return "", fmt.Errorf("lab: ping %s from %s: %w", dst, ns, err)
		}
		dl := time.Now().Add(300 * time.Millisecond)
		if d, ok := ctx.Deadline(); ok && d.Before(dl) {
			dl = d
		}
		pc.SetReadDeadline(dl)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				break
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && string(e.Data) == string(payload) {
				return id, nil
			}
		}
		if ctx.Err() != nil {
			return id, fmt.Errorf("lab: ping %s from %s: no reply: %w", dst, ns, ctx.Err())
		}
	}
}

func randomID() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}
