package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
)

// everywherePolicy is the seed's policy toward every destination
// (0.0.0.0/0): the cluster-internal destinations (pod and Service CIDRs,
// the nodes) must stay untouched whatever a policy says.
var everywherePolicy = strings.NewReplacer("name: egress", "name: everywhere", "cidr: 203.0.113.0/24", "cidr: 0.0.0.0/0").
	Replace(cluster.SeedPolicy)

// echoIn runs the lab's echo server (TCP and UDP on port) in a pod and
// waits until it answers.
func echoIn(t *testing.T, p *cluster.Pod, port int) {
	t.Helper()
	ps := fmt.Sprint(port)
	if _, err := c.Lab.Start(p.NetNS, "", c.Lab.EchoServerPath(), "-name", p.Name, "-tcp", ps, "-udp", ps, "-ctl", "0", "-no-icmp"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(ctxT(t), time.Second)
		_, err := lab.EchoTCP(ctx, p.NetNS, fmt.Sprintf("127.0.0.1:%d", port))
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo server in %s: %v", p.Name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// service creates a Service and removes it after the test, once every
// node's kube-proxy programmed it.
func service(t *testing.T, s cluster.ServiceSpec, backends ...*cluster.Pod) {
	t.Helper()
	if err := c.AddServiceSpec(ctxT(t), s, backends...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.DeleteService(context.Background(), s.Namespace, s.Name); err != nil {
			t.Errorf("cleanup service: %v", err)
		}
	})
	for _, n := range c.Lab.Nodes() {
		if err := c.WaitKubeProxy(ctxT(t), n.Name, s.ClusterIP.String(), 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
}

// echoSource asks the echo server at addr, from ns, which source it saw;
// it retries for a while (kube-proxy and egressnat converge).
func echoSource(t *testing.T, ns, proto, addr string) netip.AddrPort {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(ctxT(t), 2*time.Second)
		var s string
		var err error
		if proto == "udp" {
			s, err = lab.UDPExchange(ctx, ns, addr, "q")
		} else {
			s, err = lab.EchoTCP(ctx, ns, addr)
		}
		cancel()
		if err == nil {
			ap, perr := netip.ParseAddrPort(strings.TrimSpace(s))
			if perr != nil {
				t.Fatalf("%s %s from %s: answer %q: %v", proto, addr, ns, s, perr)
			}
			return ap
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %s from %s: %v (%s)", proto, addr, ns, err, c.ModeName())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestServices: with a policy toward every destination, selected pods
// reach ClusterIP Services and a DNS-style Service (UDP and TCP 53) by the
// real kube-proxy, unchanged (the backend sees the pod's own address);
// Services whose endpoint is a selected pod keep working from pods and
// from outside (NodePort, externalTrafficPolicy Cluster and Local: the
// replies of a selected pod to an outside client are not steered), and
// the selected pods' own traffic to the outside leaves with the floating
// IP.
func TestServices(t *testing.T) {
	apply(t, seedGateway)
	apply(t, everywherePolicy)
	namespace(t, "alice", alice)
	namespace(t, "bob", map[string]string{"user": "bob"})
	client := pod(t, "cp1", "alice", "client", frontend)   // rerouted to worker1
	backend := pod(t, "worker2", "alice", "api", frontend) // a selected endpoint
	other := pod(t, "worker1", "bob", "other", nil)        // unselected, on the gateway
	echoIn(t, backend, 8080)
	wantSource(t, client, ext1(), fip100)
	wantSource(t, backend, ext1(), fip100)

	api := netip.MustParseAddr("10.96.0.50")
	dns := netip.MustParseAddr("10.96.0.10")
	service(t, cluster.ServiceSpec{Namespace: "alice", Name: "api", ClusterIP: api,
		Ports: []cluster.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080}}}, backend)
	service(t, cluster.ServiceSpec{Namespace: "alice", Name: "dns", ClusterIP: dns,
		Ports: []cluster.ServicePort{{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: 8080},
			{Name: "dns-tcp", Protocol: corev1.ProtocolTCP, Port: 53, TargetPort: 8080}}}, backend)
	service(t, cluster.ServiceSpec{Namespace: "alice", Name: "api-np", ClusterIP: netip.MustParseAddr("10.96.0.51"), NodePort: true,
		Ports: []cluster.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080, NodePort: 30080}}}, backend)
	service(t, cluster.ServiceSpec{Namespace: "alice", Name: "api-local", ClusterIP: netip.MustParseAddr("10.96.0.52"), NodePort: true, LocalTraffic: true,
		Ports: []cluster.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080, NodePort: 30081}}}, backend)

	// From pods: the backend sees each pod's own address.
	for _, tc := range []struct {
		from        *cluster.Pod
		proto, addr string
	}{
		{client, "tcp", netip.AddrPortFrom(api, 80).String()},
		{client, "udp", netip.AddrPortFrom(dns, 53).String()},
		{client, "tcp", netip.AddrPortFrom(dns, 53).String()},
		{other, "tcp", netip.AddrPortFrom(api, 80).String()},
		{other, "udp", netip.AddrPortFrom(dns, 53).String()},
	} {
		if got := echoSource(t, tc.from.NetNS, tc.proto, tc.addr); got.Addr() != tc.from.IP {
			t.Errorf("%s %s from %s: the backend saw %s, want the pod's %s (%s)", tc.proto, tc.addr, tc.from.Name, got, tc.from.IP, c.ModeName())
		}
	}
	// From outside, by a node that is not the endpoint's (Cluster:
	// kube-proxy masquerades) and by the endpoint's own node (Local: the
	// backend sees the client, and answers it directly).
	ext := ext1()
	if got := echoSource(t, ext.NetNS, "tcp", netip.AddrPortFrom(worker1IP, 30080).String()); got.Addr() == fip100 {
		t.Errorf("NodePort via worker1: the backend saw the floating IP %s", got)
	}
	if got := echoSource(t, ext.NetNS, "tcp", netip.AddrPortFrom(worker2IP, 30081).String()); got.Addr() != ext.IP {
		t.Errorf("NodePort Local on worker2: the backend saw %s, want the client %s", got, ext.IP)
	}
	// And the selected pods' outside traffic is still steered.
	keepSource(t, client, ext1(), fip100)
	keepSource(t, backend, ext2(), fip100)
}

// TestLargeTransfersRerouted: a selected pod on a node that is not the
// gateway moves a megabyte each way with an outside server through the
// gateway, whatever the pod and uplink MTUs (make test runs the suite with
// overlay pods at 1450 on 1500 uplinks, and pods at 1500 behind 1450
// uplinks): path MTU discovery works along the rerouted path and back.
func TestLargeTransfersRerouted(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	p := pod(t, "worker2", "alice", "bulk", frontend)
	wantSource(t, p, ext1(), fip100)

	ext := ext1()
	ln, err := lab.ListenTCP(ext.NetNS, netip.AddrPortFrom(ext.IP, 9100).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan netip.Addr, 4)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			if ap, err := netip.ParseAddrPort(conn.RemoteAddr().String()); err == nil {
				peers <- ap.Addr()
			}
			go func() {
				defer conn.Close()
				io.Copy(conn, conn) //nolint:errcheck
			}()
		}
	}()

	payload := make([]byte, 1<<20)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(ctxT(t), 60*time.Second)
	defer cancel()
	conn, err := lab.DialTCP(ctx, p.NetNS, netip.AddrPortFrom(ext.IP, 9100).String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl) //nolint:errcheck
	}
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, werr = conn.Write(payload)
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.CloseWrite() //nolint:errcheck
		}
	}()
	got, rerr := io.ReadAll(conn)
	wg.Wait()
	if werr != nil || rerr != nil {
		t.Fatalf("bulk transfer (%s): write %v, read %v after %d bytes", c.ModeName(), werr, rerr, len(got))
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("bulk transfer (%s): %d bytes back, not the megabyte sent", c.ModeName(), len(got))
	}
	select {
	case src := <-peers:
		if src != fip100 {
			t.Fatalf("the server saw the bulk connection from %s, want %s", src, fip100)
		}
	default:
		t.Fatal("the server accepted no connection")
	}
	// Pods with a larger MTU than the uplinks: the transfer went through
	// because the pod learned the path MTU (ICMP from its node, on the
	// rerouted path), not by luck.
	if cfg := c.Lab.Config(); cfg.PodMTU > cfg.UplinkMTU {
		out, err := c.Lab.Exec(ctxT(t), p.NetNS, "ip", "-4", "route", "get", ext.IP.String())
		if err != nil || !strings.Contains(string(out), fmt.Sprintf("mtu %d", cfg.UplinkMTU)) {
			t.Fatalf("pods at MTU %d behind %d uplinks: the pod's route to %s shows no learned path MTU (%v):\n%s",
				cfg.PodMTU, cfg.UplinkMTU, ext.IP, err, out)
		}
	}
}

// TestNewPodNeverLeaks: a selected pod that sends from its first moment,
// before its Pod object says its address (its network exists, the API
// does not know it yet), never reaches the outside with its node's
// address: the node holds a pod it does not know from the policies'
// destinations; once the agents know the pod, it leaves with the floating
// IP. A pod that turns out unselected gets through too.
func TestNewPodNeverLeaks(t *testing.T) {
	apply(t, seedGateway)
	apply(t, seedPolicy)
	namespace(t, "alice", alice)
	warm := pod(t, "worker2", "alice", "warm", frontend)
	wantSource(t, warm, ext1(), fip100) // the policy is in force everywhere

	ext := ext1()
	pc, err := lab.ListenUDP(ext.NetNS, netip.AddrPortFrom(ext.IP, 9200).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	type seen struct {
		src  netip.Addr
		body string
	}
	got := make(chan seen, 4096)
	go func() {
		buf := make([]byte, 128)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if ap, err := netip.ParseAddrPort(from.String()); err == nil {
				got <- seen{ap.Addr(), string(buf[:n])}
			}
		}
	}()

	for _, tc := range []struct {
		name     string
		node     string
		labels   map[string]string
		want     netip.Addr
		selected bool
	}{
		{"fresh", "worker2", frontend, fip100, true},
		{"fresh-gw", "worker1", frontend, fip100, true},
		{"plain", "worker2", map[string]string{"role": "backend"}, worker2IP, false},
	} {
		p, err := c.AddPodNetwork(tc.node, "alice", tc.name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.DeletePod(context.Background(), p) }) //nolint:errcheck
		// The pod sends every 10 ms from now on, one socket per datagram
		// (each a new flow: a held first datagram must not be followed by
		// a lucky second one).
		ctx, stop := context.WithCancel(ctxT(t))
		sent := make(chan int, 1)
		go func() {
			n := 0
			defer func() { sent <- n }()
			for ctx.Err() == nil {
				n++
				err := lab.UDPSend(p.NetNS, netip.AddrPortFrom(ext.IP, 9200).String(), fmt.Sprintf("%s %d", tc.name, n))
				if err != nil && ctx.Err() == nil {
					t.Errorf("send from %s: %v", tc.name, err)
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
		time.Sleep(300 * time.Millisecond) // the pod sends before the API knows it
		created := time.Now()
		if err := c.CreatePodObject(ctxT(t), p, tc.labels); err != nil {
			stop()
			t.Fatal(err)
		}
		// Until a datagram arrives with the wanted source; every one before
		// must not have left with another address.
		deadline := time.After(15 * time.Second)
		var first time.Duration
	wait:
		for {
			select {
			case s := <-got:
				if !strings.HasPrefix(s.body, tc.name+" ") {
					continue
				}
				if s.src != tc.want {
					stop()
					t.Fatalf("%s (%s): a datagram %q left with %s, want only %s", tc.name, c.ModeName(), s.body, s.src, tc.want)
				}
				first = time.Since(created)
				break wait
			case <-deadline:
				stop()
				t.Fatalf("%s: nothing arrived from %s within 15 s of its Pod object", tc.name, tc.want)
			}
		}
		// A while longer: every later datagram has the wanted source too.
		after := time.After(time.Second)
	more:
		for {
			select {
			case s := <-got:
				if strings.HasPrefix(s.body, tc.name+" ") && s.src != tc.want {
					stop()
					t.Fatalf("%s: a later datagram %q left with %s, want %s", tc.name, s.body, s.src, tc.want)
				}
			case <-after:
				break more
			}
		}
		stop()
		t.Logf("%s on %s (selected %v): first datagram out %v after the Pod object, %d sent in all", tc.name, tc.node, tc.selected, first.Round(time.Millisecond), <-sent)
	}
}
