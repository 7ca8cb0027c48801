// Command echoserver is the external server of the egressnat test lab. It
// tells every client the source address it sees:
//
//   - TCP (-tcp ports): for every line received, writes "<src-ip>:<src-port>\n";
//   - UDP (-udp ports): answers every datagram with "<src-ip>:<src-port>";
//   - ICMP: records the source of every echo request (a raw socket; the
//     kernel answers the ping itself), by the id in a payload that starts
//     with "enat-lab-ping " and by ICMP identifier;
//   - control (-ctl port, TCP): one command per line:
//     "ping" → "pong"; "icmp <id>" → source IP or "none";
//     "icmpid <n>" → source IP or "none".
//
// It logs every connection, datagram and echo request to stdout.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

const pingPrefix = "enat-lab-ping "

var (
	mu       sync.Mutex
	byToken  = map[string]string{}
	byICMPID = map[int]string{}
)

func main() {
	name := flag.String("name", "echo", "name for the log")
	tcpPorts := flag.String("tcp", "8080", "comma-separated TCP echo ports")
	udpPorts := flag.String("udp", "8080", "comma-separated UDP echo ports")
	ctl := flag.Int("ctl", 8081, "TCP control port (0: none)")
	noICMP := flag.Bool("no-icmp", false, "do not record ICMP echo requests")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix(*name + " ")
	log.SetOutput(os.Stdout)

	for _, p := range ports(*tcpPorts) {
		ln, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", p))
		if err != nil {
			log.Fatal(err)
		}
		go acceptLoop(ln, serveEcho)
	}
	for _, p := range ports(*udpPorts) {
		pc, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", p))
		if err != nil {
			log.Fatal(err)
		}
		go serveUDP(pc)
	}
	if !*noICMP {
		pc, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		if err != nil {
			log.Fatal(err)
		}
		go serveICMP(pc)
	}
	if *ctl != 0 {
		ln, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", *ctl))
		if err != nil {
			log.Fatal(err)
		}
		go acceptLoop(ln, serveControl)
	}
	log.Printf("ready: tcp %s udp %s ctl %d", *tcpPorts, *udpPorts, *ctl)
	select {}
}

func ports(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p <= 0 || p > 65535 {
			log.Fatalf("bad port %q", f)
		}
		out = append(out, p)
	}
	return out
}

func acceptLoop(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go serve(c)
	}
}

func serveEcho(c net.Conn) {
	defer c.Close()
	src := c.RemoteAddr().String()
	log.Printf("tcp open %s -> %s", src, c.LocalAddr())
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		if _, err := fmt.Fprintf(c, "%s\n", src); err != nil {
			break
		}
	}
	log.Printf("tcp close %s after %d lines (%v)", src, n, sc.Err())
}

func serveUDP(pc net.PacketConn) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			log.Fatal(err)
		}
		log.Printf("udp %s -> %s: %d bytes", from, pc.LocalAddr(), n)
		pc.WriteTo([]byte(from.String()), from)
	}
}

func serveICMP(pc *icmp.PacketConn) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			log.Fatal(err)
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEcho {
			continue
		}
		e, ok := m.Body.(*icmp.Echo)
		if !ok {
			continue
		}
		src := from.String()
		if ia, ok := from.(*net.IPAddr); ok {
			src = ia.IP.String()
		}
		token := ""
		if d := string(e.Data); strings.HasPrefix(d, pingPrefix) {
			token = strings.TrimSpace(strings.TrimPrefix(d, pingPrefix))
		}
		mu.Lock()
		byICMPID[e.ID] = src
		if token != "" {
			byToken[token] = src
		}
		mu.Unlock()
		log.Printf("icmp echo from %s id %d seq %d token %q", src, e.ID, e.Seq, token)
	}
}

func serveControl(c net.Conn) {
	defer c.Close()
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		ans := "error"
		switch {
		case len(f) == 1 && f[0] == "ping":
			ans = "pong"
		case len(f) == 2 && f[0] == "icmp":
			mu.Lock()
			ans = byToken[f[1]]
			mu.Unlock()
		case len(f) == 2 && f[0] == "icmpid":
			id, err := strconv.Atoi(f[1])
			if err == nil {
				mu.Lock()
				ans = byICMPID[id]
				mu.Unlock()
			}
		}
		if ans == "" {
			ans = "none"
		}
		if _, err := fmt.Fprintf(c, "%s\n", ans); err != nil {
			return
		}
	}
}
