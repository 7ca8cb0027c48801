// Command netutil is the small network tool of egressnat's test image
// (egressnat.test/netutil:v1): an echo server for the "external" side and
// clients for pods, meant for `kubectl exec POD -- /netutil ...` (the image
// has no shell). Static, no files needed.
//
// Protocol (TCP lines and UDP datagrams alike): the request "whoami" is
// answered with the peer's address as the server sees it, "IP:PORT\n";
// anything else is echoed back unchanged.
//
// Commands (flags go before the address):
//
//	netutil echo-server [--tcp ADDR] [--udp ADDR] [--quiet]
//	    Serves the protocol on a TCP and/or UDP address (e.g. :8080) until
//	    SIGTERM/SIGINT. Prints one line per address once it listens:
//	      listening tcp=IP:PORT
//	      listening udp=IP:PORT
//	    and logs to stderr "tcp open PEER", "tcp close PEER lines=N",
//	    "udp from PEER bytes=N" (not with --quiet).
//
//	netutil connect [--timeout 5s] [--bind IP] HOST:PORT
//	    TCP: connects, asks whoami, prints
//	      seen=IP:PORT local=IP:PORT
//	    seen is the source address the server saw (after any NAT), local
//	    the client's own end.
//
//	netutil udp [--timeout 5s] [--tries 3] [--bind IP] HOST:PORT
//	    The same over UDP: one whoami datagram per try until a reply,
//	    tries spread over the timeout; prints the same line.
//
//	netutil hold [--interval 100ms] [--timeout 5s] [--duration 0]
//	             [--reconnect] [--verbose] [--bind IP] HOST:PORT
//	    Keeps one TCP connection to an echo server and sends "seq N" every
//	    interval; each line must come back, in order, within timeout.
//	    Prints, as they happen:
//	      connected seen=IP:PORT local=IP:PORT
//	      failed seq=N at_ms=T err=TEXT          (the connection broke,
//	          a reply was wrong, or line N got no reply within timeout;
//	          T is milliseconds since the hold started)
//	      reconnected seen=IP:PORT local=IP:PORT outage_ms=T  (--reconnect)
//	      ok seq=N rtt_ms=T                      (--verbose, every reply)
//	    and when the duration is over (0: until SIGTERM/SIGINT), or at the
//	    first failure without --reconnect:
//	      hold sent=N ok=N failures=N reconnects=N max_rtt_ms=N duration_ms=N seen=IP:PORT
//	    Exits 0 when there was no failure and at least one reply, else 1.
//
//	netutil stream [--interval 10ms] [--tag NAME] [--count 0] HOST:PORT
//	    Sends one UDP datagram every interval, from the moment it starts
//	    (a pod's first packets, before anything knows its IP), until
//	    SIGTERM/SIGINT or count datagrams (0: no limit):
//	      stream TAG SEQ UNIX_NANOS
//	    (TAG defaults to the host name, which is the pod's name; SEQ counts
//	    from 0; UNIX_NANOS is the send time). Sending errors (no route yet)
//	    are counted, not fatal. At the end it prints
//	      stream tag=TAG sent=N errors=N
//
//	netutil sleep
//	    Does nothing until SIGTERM/SIGINT (a client pod's command).
//
// Exit status: 0 success, 1 failure (the reason on stderr, "netutil: ..."),
// 2 usage.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

const usage = `usage:
  netutil echo-server [--tcp ADDR] [--udp ADDR] [--quiet]
  netutil connect [--timeout 5s] [--bind IP] HOST:PORT
  netutil udp [--timeout 5s] [--tries 3] [--bind IP] HOST:PORT
  netutil hold [--interval 100ms] [--timeout 5s] [--duration 0] [--reconnect] [--verbose] [--bind IP] HOST:PORT
  netutil stream [--interval 10ms] [--tag NAME] [--count 0] HOST:PORT
  netutil sleep
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errUsage marks a command line error (exit status 2).
var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "echo-server":
		err = echoServer(ctx, args[1:], stdout, stderr)
	case "connect":
		err = connect(ctx, args[1:], stdout, stderr)
	case "udp":
		err = udp(ctx, args[1:], stdout, stderr)
	case "hold":
		err = hold(ctx, args[1:], stdout, stderr)
	case "stream":
		err = stream(ctx, args[1:], stdout, stderr)
	case "sleep":
		<-ctx.Done()
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "netutil: unknown command %q\n%s", args[0], usage)
		return 2
	}
	switch {
	case errors.Is(err, errUsage):
		return 2
	case err != nil:
		fmt.Fprintf(stderr, "netutil: %v\n", err)
		return 1
	}
	return 0
}

// flags parses a command's flags and its single HOST:PORT argument.
func flags(fs *flag.FlagSet, args []string, stderr io.Writer) (string, error) {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return "", errUsage
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(stderr, "netutil %s: want one HOST:PORT (flags before it)\n", fs.Name())
		return "", errUsage
	}
	return fs.Arg(0), nil
}

// answer is the server's reply to one request (a line without its newline,
// or a datagram).
func answer(req []byte, peer net.Addr) []byte {
	if strings.TrimRight(string(req), "\r\n") == "whoami" {
		return []byte(peer.String() + "\n")
	}
	return req
}

func echoServer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("echo-server", flag.ContinueOnError)
	tcpAddr := fs.String("tcp", "", "TCP address to serve, e.g. :8080")
	udpAddr := fs.String("udp", "", "UDP address to serve, e.g. :8080")
	quiet := fs.Bool("quiet", false, "no per-connection and per-datagram log")
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() != 0 || *tcpAddr == "" && *udpAddr == "" {
		fmt.Fprintln(stderr, "netutil echo-server: want --tcp and/or --udp")
		return errUsage
	}
	logf := func(format string, a ...any) {
		if !*quiet {
			fmt.Fprintf(stderr, format+"\n", a...)
		}
	}
	var lc net.ListenConfig
	errs := make(chan error, 2)
	n := 0
	if *tcpAddr != "" {
		ln, err := lc.Listen(ctx, "tcp", *tcpAddr)
		if err != nil {
			return fmt.Errorf("listen tcp: %w", err)
		}
		defer ln.Close()
		fmt.Fprintf(stdout, "listening tcp=%s\n", ln.Addr())
		n++
		go func() { errs <- serveTCP(ctx, ln, logf) }()
	}
	if *udpAddr != "" {
		pc, err := lc.ListenPacket(ctx, "udp", *udpAddr)
		if err != nil {
			return fmt.Errorf("listen udp: %w", err)
		}
		defer pc.Close()
		fmt.Fprintf(stdout, "listening udp=%s\n", pc.LocalAddr())
		n++
		go func() { errs <- serveUDP(ctx, pc, logf) }()
	}
	for range n {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

// serveTCP serves the protocol on ln until ctx is done.
func serveTCP(ctx context.Context, ln net.Listener, logf func(string, ...any)) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	closeAll := func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	}
	stop := context.AfterFunc(ctx, closeAll)
	defer func() {
		stop()
		closeAll()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			peer := c.RemoteAddr()
			logf("tcp open %s", peer)
			lines := 0
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadBytes('\n')
				if len(line) > 0 {
					lines++
					if _, werr := c.Write(answer(line, peer)); werr != nil {
						break
					}
				}
				if err != nil {
					break
				}
			}
			c.Close()
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			logf("tcp close %s lines=%d", peer, lines)
		}()
	}
}

// serveUDP serves the protocol on pc until ctx is done.
func serveUDP(ctx context.Context, pc net.PacketConn, logf func(string, ...any)) error {
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	buf := make([]byte, 65536)
	for {
		n, peer, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("udp read: %w", err)
		}
		logf("udp from %s bytes=%d", peer, n)
		if _, err := pc.WriteTo(answer(buf[:n], peer), peer); err != nil {
			logf("udp reply to %s: %v", peer, err)
		}
	}
}

// dialer binds to bind (an IP, optional) and times out after timeout.
func dialer(bind string, network string, timeout time.Duration) (*net.Dialer, error) {
	d := &net.Dialer{Timeout: timeout}
	if bind == "" {
		return d, nil
	}
	ip := net.ParseIP(bind)
	if ip == nil {
		return nil, fmt.Errorf("--bind %q: not an IP", bind)
	}
	if network == "udp" {
		d.LocalAddr = &net.UDPAddr{IP: ip}
	} else {
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	return d, nil
}

// whoami asks on c (a TCP connection) for the address the server sees.
func whoami(c net.Conn, r *bufio.Reader, timeout time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "whoami\n"); err != nil {
		return "", fmt.Errorf("whoami: %w", err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("whoami: %w", err)
	}
	return strings.TrimSpace(line), nil
}

func connect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("connect", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "connect and reply timeout")
	bind := fs.String("bind", "", "local IP to connect from")
	addr, err := flags(fs, args, stderr)
	if err != nil {
		return err
	}
	d, err := dialer(*bind, "tcp", *timeout)
	if err != nil {
		return err
	}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	seen, err := whoami(c, bufio.NewReader(c), *timeout)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "seen=%s local=%s\n", seen, c.LocalAddr())
	return nil
}

func udp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("udp", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "total time to wait for a reply")
	tries := fs.Int("tries", 3, "datagrams to send, spread over the timeout")
	bind := fs.String("bind", "", "local IP to send from")
	addr, err := flags(fs, args, stderr)
	if err != nil {
		return err
	}
	if *tries < 1 {
		return fmt.Errorf("--tries %d: want at least 1", *tries)
	}
	d, err := dialer(*bind, "udp", *timeout)
	if err != nil {
		return err
	}
	c, err := d.DialContext(ctx, "udp", addr)
	if err != nil {
		return fmt.Errorf("udp: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	per := *timeout / time.Duration(*tries)
	buf := make([]byte, 1024)
	var lastErr error
	for range *tries {
		if _, err := io.WriteString(c, "whoami"); err != nil {
			// ECONNREFUSED from an earlier try's ICMP: try again.
			lastErr = err
			time.Sleep(per)
			continue
		}
		c.SetReadDeadline(time.Now().Add(per))
		n, err := c.Read(buf)
		if err != nil {
			lastErr = err
			if ctx.Err() != nil {
				break
			}
			continue
		}
		fmt.Fprintf(stdout, "seen=%s local=%s\n", strings.TrimSpace(string(buf[:n])), c.LocalAddr())
		return nil
	}
	return fmt.Errorf("udp: no reply from %s after %d tries: %w", addr, *tries, lastErr)
}

// holdStats is what hold counts; the reader goroutine and the sender share it.
type holdStats struct {
	mu       sync.Mutex
	sent     []time.Time // send time of line i+1 ("seq i+1")
	acked    int         // replies received in order on the current connection
	ok       int         // replies received in all
	maxRTT   time.Duration
	base     int // lines sent before the current connection
	failures int
}

func hold(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hold", flag.ContinueOnError)
	interval := fs.Duration("interval", 100*time.Millisecond, "time between lines")
	timeout := fs.Duration("timeout", 5*time.Second, "connect timeout, and longest wait for a line's echo")
	duration := fs.Duration("duration", 0, "how long to hold (0: until SIGTERM/SIGINT)")
	reconnect := fs.Bool("reconnect", false, "after a failure, connect again and go on")
	verbose := fs.Bool("verbose", false, "print every reply")
	bind := fs.String("bind", "", "local IP to connect from")
	addr, err := flags(fs, args, stderr)
	if err != nil {
		return err
	}
	if *interval <= 0 || *timeout <= 0 {
		return errors.New("--interval and --timeout must be positive")
	}
	d, err := dialer(*bind, "tcp", *timeout)
	if err != nil {
		return err
	}
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	start := time.Now()
	var out sync.Mutex // one line at a time on stdout
	printf := func(format string, a ...any) {
		out.Lock()
		fmt.Fprintf(stdout, format+"\n", a...)
		out.Unlock()
	}
	st := &holdStats{}
	seen := ""

	// dial connects (retrying every interval until ctx is done when
	// retry) and asks whoami.
	dial := func(retry bool) (net.Conn, *bufio.Reader, error) {
		for {
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				r := bufio.NewReader(c)
				s, werr := whoami(c, r, *timeout)
				if werr == nil {
					seen = s
					return c, r, nil
				}
				c.Close()
				err = werr
			}
			if !retry || ctx.Err() != nil {
				return nil, nil, err
			}
			select {
			case <-ctx.Done():
				return nil, nil, ctx.Err()
			case <-time.After(*interval):
			}
		}
	}
	c, r, err := dial(false)
	if err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	printf("connected seen=%s local=%s", seen, c.LocalAddr())

	// read checks the echoes on one connection; it reports the first
	// error on its channel.
	read := func(c net.Conn, r *bufio.Reader, errc chan<- error) {
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				errc <- err
				return
			}
			now := time.Now()
			st.mu.Lock()
			want := st.base + st.acked + 1
			if want > len(st.sent) || strings.TrimSpace(line) != fmt.Sprintf("seq %d", want) {
				st.mu.Unlock()
				errc <- fmt.Errorf("reply %q, want %q", strings.TrimSpace(line), fmt.Sprintf("seq %d", want))
				return
			}
			rtt := now.Sub(st.sent[want-1])
			st.acked++
			st.ok++
			st.maxRTT = max(st.maxRTT, rtt)
			st.mu.Unlock()
			if *verbose {
				printf("ok seq=%d rtt_ms=%d", want, rtt.Milliseconds())
			}
		}
	}
	errc := make(chan error, 1)
	go read(c, r, errc)
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	reconnects := 0
	fail := func(err error) {
		st.mu.Lock()
		st.failures++
		seq := st.base + st.acked + 1
		st.mu.Unlock()
		printf("failed seq=%d at_ms=%d err=%s", seq, time.Since(start).Milliseconds(),
			strings.ReplaceAll(err.Error(), "\n", " "))
	}
loop:
	for {
		var failure error
		select {
		case <-ctx.Done():
			break loop
		case err := <-errc:
			failure = err
		case now := <-tick.C:
			st.mu.Lock()
			oldest := st.base + st.acked // index of the oldest unanswered line
			late := oldest < len(st.sent) && now.Sub(st.sent[oldest]) > *timeout
			seq := len(st.sent) + 1
			if !late {
				st.sent = append(st.sent, now)
			}
			st.mu.Unlock()
			if late {
				failure = fmt.Errorf("no reply within %v", *timeout)
				break
			}
			c.SetWriteDeadline(now.Add(*timeout))
			if _, err := fmt.Fprintf(c, "seq %d\n", seq); err != nil {
				failure = err
			}
		}
		if failure == nil {
			continue
		}
		if ctx.Err() != nil { // the error is the end of the hold
			break
		}
		fail(failure)
		c.Close()
		if !*reconnect {
			break
		}
		down := time.Now()
		nc, nr, err := dial(true)
		if err != nil { // only when ctx is done
			break
		}
		reconnects++
		c, r = nc, nr
		st.mu.Lock()
		st.base, st.acked = len(st.sent), 0
		st.mu.Unlock()
		printf("reconnected seen=%s local=%s outage_ms=%d", seen, c.LocalAddr(), time.Since(down).Milliseconds())
		errc = make(chan error, 1)
		go read(c, r, errc)
	}
	c.Close()
	st.mu.Lock()
	sent, ok, failures, maxRTT := len(st.sent), st.ok, st.failures, st.maxRTT
	st.mu.Unlock()
	printf("hold sent=%d ok=%d failures=%d reconnects=%d max_rtt_ms=%d duration_ms=%d seen=%s",
		sent, ok, failures, reconnects, maxRTT.Milliseconds(), time.Since(start).Milliseconds(), seen)
	if failures > 0 || ok == 0 {
		return fmt.Errorf("hold: %d failure(s), %d of %d lines answered", failures, ok, sent)
	}
	return nil
}

// stream sends "stream TAG SEQ UNIX_NANOS" datagrams to addr every
// interval (see the package comment).
func stream(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	interval := fs.Duration("interval", 10*time.Millisecond, "time between datagrams")
	tag := fs.String("tag", "", "first field of every datagram (default: the host name)")
	count := fs.Int("count", 0, "datagrams to send (0: until SIGTERM/SIGINT)")
	addr, err := flags(fs, args, stderr)
	if err != nil {
		return err
	}
	if *interval <= 0 || *count < 0 {
		return fmt.Errorf("--interval %s --count %d: want a positive interval and a count of at least 0", *interval, *count)
	}
	if *tag == "" {
		if *tag, err = os.Hostname(); err != nil {
			return fmt.Errorf("stream: no --tag and no host name: %w", err)
		}
	}
	if strings.ContainsAny(*tag, " \t\n") {
		return fmt.Errorf("--tag %q: no spaces", *tag)
	}
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	// Unconnected: a send that fails (no route yet) does not stick to the
	// socket as a connected one's ICMP errors would.
	pc, err := net.ListenUDP("udp", nil)
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	defer pc.Close()
	t := time.NewTicker(*interval)
	defer t.Stop()
	sent, errs := 0, 0
	for seq := 0; *count == 0 || seq < *count; seq++ {
		msg := fmt.Sprintf("stream %s %d %d", *tag, seq, time.Now().UnixNano())
		if _, err := pc.WriteToUDP([]byte(msg), dst); err != nil {
			errs++
		} else {
			sent++
		}
		select {
		case <-ctx.Done():
			fmt.Fprintf(stdout, "stream tag=%s sent=%d errors=%d\n", *tag, sent, errs)
			return nil
		case <-t.C:
		}
	}
	fmt.Fprintf(stdout, "stream tag=%s sent=%d errors=%d\n", *tag, sent, errs)
	return nil
}
