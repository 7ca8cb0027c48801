package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fixed parts of the address plan.
var (
	NodeSubnet  = netip.MustParsePrefix("192.0.2.0/24")
	RouterIP    = netip.MustParseAddr("192.0.2.1")
	ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	// FloatingIPFirst..FloatingIPLast is a part of NodeSubnet the lab
	// never assigns, for floating IPs.
	FloatingIPFirst = netip.MustParseAddr("192.0.2.100")
	FloatingIPLast  = netip.MustParseAddr("192.0.2.199")
)

const (
	// DefaultPrefix names the namespaces of a lab whose Config has no Prefix.
	DefaultPrefix = "enat-"
	// Uplink is the name of every node's link to the switch.
	Uplink = "eth0"
	// DefaultEchoPort is the TCP and UDP port of the echo servers.
	DefaultEchoPort = 8080
	// DefaultControlPort is the TCP port of the echo servers' query protocol.
	DefaultControlPort = 8081

	firstNodeHost = 11
	maxNodes      = 89 // 192.0.2.11 .. 192.0.2.99
)

// NodeConfig describes one node.
type NodeConfig struct {
	Name         string
	ControlPlane bool
}

// ExternalConfig describes one external server: its address with the
// prefix length of its link to the router (the router takes the first
// address of that prefix).
type ExternalConfig struct {
	Name string
	Addr netip.Prefix
}

// Config of a lab. The zero value gives the default lab.
type Config struct {
	// Prefix of every namespace name; DefaultPrefix when empty. Give every
	// test package its own.
	Prefix string
	// Nodes; default cp1 (control plane), worker1, worker2.
	Nodes []NodeConfig
	// Externals; default ext1 203.0.113.10/24 and ext2 198.51.100.10/24.
	Externals []ExternalConfig
	// EchoServer is the path of a built echoserver binary; the lab builds
	// one into its work directory when empty (see BuildEchoServer).
	EchoServer string
	// EchoTCPPorts and EchoUDPPorts the echo servers listen on; default
	// DefaultEchoPort. ControlPort defaults to DefaultControlPort.
	EchoTCPPorts []int
	EchoUDPPorts []int
	ControlPort  int
	// WorkDir keeps logs and the echo server binary; a temporary directory
	// removed by Close (unless KeepWorkDir) when empty.
	WorkDir     string
	KeepWorkDir bool

	// PodNetwork is how pods are wired and how nodes reach each other's
	// pods: PodNetworkRouted (default; "" means routed) or
	// PodNetworkOverlay.
	//
	// Routed: every pod has its own veth (HostVeth on the node, holding the
	// node's PodGateway/32 and a /32 route to the pod), the pod has its
	// address /32 and a default route via PodGateway, and every node
	// routes each other node's PodCIDR "via <node IP> dev eth0".
	//
	// Overlay (flannel VXLAN style): every node has the bridge PodBridge
	// ("cni0", PodGateway/24, fixed MAC 0a:58:0a:f4:<i>:01); the host end of
	// each pod's veth is a port of it (no address); the pod has its address
	// /24 and a default route via PodGateway. The VXLAN device OverlayDev
	// ("flannel.1": VNI 1, UDP port 8472, local <node IP>, dev eth0,
	// nolearning, MAC 0a:58:0a:f4:<i>:00, address 10.244.<i>.0/32) reaches
	// every other node j by "route 10.244.<j>.0/24 via 10.244.<j>.0 dev
	// flannel.1 onlink", a permanent neighbour entry for 10.244.<j>.0 with
	// j's flannel.1 MAC and "bridge fdb append <that MAC> dev flannel.1 dst
	// <node j IP>". No pod CIDR is routed via eth0.
	//
	// There is no IPIP mode: this kernel lacks CONFIG_NET_IPIP ("ip link
	// add t type ipip" says "Unknown device type").
	PodNetwork string
	// UplinkMTU is the MTU of the L2 segment of the nodes: every node's
	// eth0 and its switch port, the router's eth0 and its switch port "rtr",
	// and switch hosts. 0 means DefaultMTU (1500). The externals' links
	// keep 1500 (the router is in between).
	UplinkMTU int
	// PodMTU is the MTU of every pod's eth0 and of the node end of its veth
	// (and of PodBridge in overlay mode). 0 means DefaultMTU in routed mode
	// and UplinkMTU - VXLANOverhead in overlay mode. OverlayDev always gets
	// UplinkMTU - VXLANOverhead, so e.g. PodMTU 1500 with UplinkMTU 1450
	// (routed) or with the overlay makes the pods depend on path MTU
	// discovery.
	PodMTU int
	// RPFilter is the reverse-path filter of every node: RPFilterLoose
	// (default, 2), RPFilterStrict (1) or RPFilterOff (0), written to
	// net.ipv4.conf.all.rp_filter and net.ipv4.conf.default.rp_filter when
	// the node is created, before its links exist. The router stays loose.
	RPFilter string
	// Masquerade is the CNI's masquerade of pod traffic leaving the cluster
	// CIDR, on every node: MasqueradeIPTablesNFT (default; "iptables-nft
	// -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j
	// MASQUERADE"), MasqueradeIPTablesLegacy (the same rule with
	// iptables-legacy), MasqueradeNFT (nftables table "ip lab-cni", chain
	// postrouting, nat hook at priority srcnat: "ip saddr 10.244.0.0/16 ip
	// daddr != 10.244.0.0/16 masquerade") or MasqueradeNone.
	Masquerade string
}

// Node is a lab host.
type Node struct {
	Name         string
	NetNS        string
	Index        int
	ControlPlane bool
	// IP is the uplink address, in NodeSubnet.
	IP netip.Addr
	// Uplink is the link to the switch ("eth0").
	Uplink string
	// PodCIDR is 10.244.<Index>.0/24, PodGateway its .1.
	PodCIDR    netip.Prefix
	PodGateway netip.Addr
	// SwitchPort is the switch-side end of the uplink (in the switch
	// namespace).
	SwitchPort string
	// PodBridge is the bridge the pods hang off in overlay mode ("cni0");
	// empty in routed mode, where each pod has its own Pod.HostVeth.
	PodBridge string
	// OverlayDev ("flannel.1") and OverlayMAC, its fixed MAC address, in
	// overlay mode; empty in routed mode.
	OverlayDev string
	OverlayMAC net.HardwareAddr
}

// External is an external server running the echo server.
type External struct {
	Name        string
	NetNS       string
	IP          netip.Addr
	Gateway     netip.Addr // router address on its link
	TCPPorts    []int
	UDPPorts    []int
	ControlPort int
	Echo        *Proc
}

// TCPAddr is "ip:port" of the first echo TCP port.
func (e *External) TCPAddr() string { return netip.AddrPortFrom(e.IP, uint16(e.TCPPorts[0])).String() }

// UDPAddr is "ip:port" of the first echo UDP port.
func (e *External) UDPAddr() string { return netip.AddrPortFrom(e.IP, uint16(e.UDPPorts[0])).String() }

// Pod is a pod namespace attached to a node.
type Pod struct {
	Name     string
	Node     string
	NetNS    string
	IP       netip.Addr
	HostVeth string // node-side veth
	// NodeDev is the node's device toward the pod: HostVeth in routed
	// mode, the node's PodBridge in overlay mode.
	NodeDev string
}

// Lab is a running lab network. All methods are safe for concurrent use.
type Lab struct {
	prefix  string
	cfg     Config
	workDir string
	ownDir  bool
	lock    *prefixLock

	swNS, rtrNS string
	nodes       []*Node
	externals   []*External

	mu     sync.Mutex
	closed bool
	// bpffs: the bpffs BPFFS mounted ("" none).
	bpffs     string
	closeOnce sync.Once
	closeErr  error
	nsSet     map[string]bool
	nsOrder   []string
	pods      map[string]*Pod
	podHosts  map[string]map[int]bool // node -> used host numbers
	vethSeq   int
	procSeq   int
	procs     []*Proc
	relays    map[*relay]bool
	hosts     map[string]*Host // extra switch hosts (AddSwitchHost)
	hostSeq   int
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)

func (c *Config) defaults() error {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if err := validatePrefix(c.Prefix); err != nil {
		return err
	}
	if len(c.Nodes) == 0 {
		c.Nodes = []NodeConfig{{Name: "cp1", ControlPlane: true}, {Name: "worker1"}, {Name: "worker2"}}
	}
	if len(c.Nodes) > maxNodes {
		return fmt.Errorf("lab: at most %d nodes", maxNodes)
	}
	if len(c.Externals) == 0 {
		c.Externals = []ExternalConfig{
			{Name: "ext1", Addr: netip.MustParsePrefix("203.0.113.10/24")},
			{Name: "ext2", Addr: netip.MustParsePrefix("198.51.100.10/24")},
		}
	}
	if len(c.EchoTCPPorts) == 0 {
		c.EchoTCPPorts = []int{DefaultEchoPort}
	}
	if len(c.EchoUDPPorts) == 0 {
		c.EchoUDPPorts = []int{DefaultEchoPort}
	}
	if c.ControlPort == 0 {
		c.ControlPort = DefaultControlPort
	}
	if err := c.networkDefaults(); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, n := range c.Nodes {
		if !nameRE.MatchString(n.Name) || n.Name == "sw" || n.Name == "rtr" ||
			strings.HasPrefix(n.Name, "p-") || strings.HasPrefix(n.Name, "x-") {
			return fmt.Errorf("lab: invalid node name %q", n.Name)
		}
		if seen[n.Name] {
			return fmt.Errorf("lab: duplicate node %q", n.Name)
		}
		seen[n.Name] = true
	}
	var prefixes []netip.Prefix
	for _, e := range c.Externals {
		if !nameRE.MatchString(e.Name) || seen["x-"+e.Name] {
			return fmt.Errorf("lab: invalid or duplicate external name %q", e.Name)
		}
		seen["x-"+e.Name] = true
		if !e.Addr.Addr().Is4() || e.Addr.Bits() > 30 || e.Addr.Bits() < 8 ||
			e.Addr.Addr() == e.Addr.Masked().Addr().Next() {
			return fmt.Errorf("lab: external %s: bad address %s", e.Name, e.Addr)
		}
		for _, p := range append(prefixes, NodeSubnet, ClusterCIDR) {
			if p.Overlaps(e.Addr.Masked()) {
				return fmt.Errorf("lab: external %s: %s overlaps %s", e.Name, e.Addr, p)
			}
		}
		prefixes = append(prefixes, e.Addr.Masked())
	}
	return nil
}

// New builds a lab. On error everything created so far is removed. It
// needs root. Leftovers of a crashed earlier lab with the same prefix are
// removed first.
func New(cfg Config) (l *Lab, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root")
	}
	lk, err := lockPrefix(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	l = &Lab{
		prefix:   cfg.Prefix,
		cfg:      cfg,
		lock:     lk,
		swNS:     cfg.Prefix + "sw",
		rtrNS:    cfg.Prefix + "rtr",
		nsSet:    map[string]bool{},
		pods:     map[string]*Pod{},
		podHosts: map[string]map[int]bool{},
		relays:   map[*relay]bool{},
	}
	defer func() {
		if r := recover(); r != nil {
			l.Close()
			panic(r)
		}
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
			}
			l = nil
		}
	}()
	if err := deleteNamespaces(lk.stale); err != nil {
		return l, fmt.Errorf("lab: removing namespaces of a crashed lab: %w", err)
	}
	lk.removeStaleDirs()
	if err := lk.reset(); err != nil {
		return l, err
	}
	if cfg.WorkDir == "" {
		d, err := os.MkdirTemp("", l.prefix+"lab-")
		if err != nil {
			return l, err
		}
		l.workDir, l.ownDir = d, !cfg.KeepWorkDir
		if l.ownDir {
			if err := lk.record("dir", d); err != nil {
				return l, err
			}
		}
	} else {
		if err := os.MkdirAll(cfg.WorkDir, 0o755); err != nil {
			return l, err
		}
		l.workDir = cfg.WorkDir
	}
	if l.cfg.EchoServer == "" {
		p, err := BuildEchoServer(l.workDir)
		if err != nil {
			return l, err
		}
		l.cfg.EchoServer = p
	}
	if err := l.build(); err != nil {
		return l, err
	}
	return l, nil
}

func (l *Lab) build() error {
	for i, nc := range l.cfg.Nodes {
		ip := netip.AddrFrom4([4]byte{192, 0, 2, byte(firstNodeHost + i)})
		var bridge, overlay string
		var omac net.HardwareAddr
		if l.cfg.PodNetwork == PodNetworkOverlay {
			bridge, overlay, omac = PodBridge, OverlayDev, overlayMAC(i)
		}
		l.nodes = append(l.nodes, &Node{
			Name:         nc.Name,
			NetNS:        l.prefix + nc.Name,
			Index:        i,
			ControlPlane: nc.ControlPlane,
			IP:           ip,
			Uplink:       Uplink,
			PodCIDR:      netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
			PodGateway:   netip.AddrFrom4([4]byte{10, 244, byte(i), 1}),
			SwitchPort:   "n" + strconv.Itoa(i),
			PodBridge:    bridge,
			OverlayDev:   overlay,
			OverlayMAC:   omac,
		})
	}
	for _, ec := range l.cfg.Externals {
		l.externals = append(l.externals, &External{
			Name:        ec.Name,
			NetNS:       l.prefix + "x-" + ec.Name,
			IP:          ec.Addr.Addr(),
			Gateway:     ec.Addr.Masked().Addr().Next(),
			TCPPorts:    append([]int(nil), l.cfg.EchoTCPPorts...),
			UDPPorts:    append([]int(nil), l.cfg.EchoUDPPorts...),
			ControlPort: l.cfg.ControlPort,
		})
	}

	// Namespaces, then sysctls (before any link exists, so new links
	// inherit the "default" values).
	all := []string{l.swNS, l.rtrNS}
	for _, n := range l.nodes {
		all = append(all, n.NetNS)
	}
	for _, e := range l.externals {
		all = append(all, e.NetNS)
	}
	for _, ns := range all {
		if err := l.addNS(ns); err != nil {
			return err
		}
	}
	forwarder := []string{
		"net.ipv4.ip_forward=1",
		"net.ipv4.conf.all.rp_filter=2",
		"net.ipv4.conf.default.rp_filter=2",
	}
	if err := l.sysctl(l.swNS, "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0"); err != nil {
		return err
	}
	if err := l.sysctl(l.rtrNS, forwarder...); err != nil {
		return err
	}
	rp := rpFilterValue(l.cfg.RPFilter)
	node := []string{
		"net.ipv4.ip_forward=1",
		"net.ipv4.conf.all.rp_filter=" + rp,
		"net.ipv4.conf.default.rp_filter=" + rp,
	}
	for _, n := range l.nodes {
		if err := l.sysctl(n.NetNS, node...); err != nil {
			return err
		}
	}

	// Links, each created inside its namespace with the peer created
	// directly in the other one.
	sw := []string{"link set lo up", "link add br0 type bridge", "link set br0 up"}
	mtu := strconv.Itoa(l.cfg.UplinkMTU)
	for _, n := range l.nodes {
		if err := l.ip(n.NetNS, "link", "add", Uplink, "mtu", mtu, "type", "veth", "peer", "name", n.SwitchPort, "mtu", mtu, "netns", l.swNS); err != nil {
			return err
		}
		sw = append(sw, "link set "+n.SwitchPort+" master br0", "link set "+n.SwitchPort+" up")
	}
	if err := l.ip(l.rtrNS, "link", "add", "eth0", "mtu", mtu, "type", "veth", "peer", "name", "rtr", "mtu", mtu, "netns", l.swNS); err != nil {
		return err
	}
	sw = append(sw, "link set rtr master br0", "link set rtr up")
	rtr := []string{"link set lo up", "link set eth0 up", "addr add " + netip.PrefixFrom(RouterIP, NodeSubnet.Bits()).String() + " dev eth0"}
	for j, e := range l.externals {
		xl := "x" + strconv.Itoa(j)
		if err := l.ip(e.NetNS, "link", "add", "eth0", "type", "veth", "peer", "name", xl, "netns", l.rtrNS); err != nil {
			return err
		}
		bits := l.cfg.Externals[j].Addr.Bits()
		rtr = append(rtr, "link set "+xl+" up", "addr add "+netip.PrefixFrom(e.Gateway, bits).String()+" dev "+xl)
	}
	if err := l.ipBatch(l.swNS, sw); err != nil {
		return err
	}
	if err := l.ipBatch(l.rtrNS, rtr); err != nil {
		return err
	}
	for j, e := range l.externals {
		bits := l.cfg.Externals[j].Addr.Bits()
		if err := l.ipBatch(e.NetNS, []string{
			"link set lo up", "link set eth0 up",
			"addr add " + netip.PrefixFrom(e.IP, bits).String() + " dev eth0",
			"route add default via " + e.Gateway.String() + " dev eth0",
		}); err != nil {
			return err
		}
	}
	for _, n := range l.nodes {
		if err := l.setupNodeNetwork(n); err != nil {
			return err
		}
	}

	// Echo servers.
	for _, e := range l.externals {
		p, err := l.Start(e.NetNS, filepath.Join(l.workDir, e.NetNS+"-echoserver.log"), l.cfg.EchoServer,
			"-name", e.Name, "-tcp", joinInts(e.TCPPorts), "-udp", joinInts(e.UDPPorts), "-ctl", strconv.Itoa(e.ControlPort))
		if err != nil {
			return err
		}
		e.Echo = p
	}
	for _, e := range l.externals {
		if err := e.waitReady(10 * time.Second); err != nil {
			return fmt.Errorf("%w; log:\n%s", err, e.Echo.tail(4096))
		}
	}
	return nil
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// checkNS refuses any namespace the lab did not create.
func (l *Lab) checkNS(ns string) error {
	if ns == "" || !strings.HasPrefix(ns, l.prefix) {
		return fmt.Errorf("lab: refusing namespace %q: not a lab namespace (prefix %q)", ns, l.prefix)
	}
	l.mu.Lock()
	ok := l.nsSet[ns]
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("lab: refusing namespace %q: not created by this lab", ns)
	}
	return nil
}

func (l *Lab) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

func (l *Lab) addNS(ns string) error {
	if !strings.HasPrefix(ns, l.prefix) {
		return fmt.Errorf("lab: namespace %q without prefix", ns)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return errors.New("lab: closed")
	}
	// Record first: Close (or CleanupStale after a crash) deletes it even
	// if "ip netns add" fails midway.
	l.nsSet[ns] = true
	l.nsOrder = append(l.nsOrder, ns)
	err := l.lock.record("ns", ns)
	l.mu.Unlock()
	if err != nil {
		return fmt.Errorf("lab: record namespace: %w", err)
	}
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fmt.Errorf("lab: ip netns add %s: %w: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ip runs "ip -n ns args..."; it never runs ip without a lab namespace.
func (l *Lab) ip(ns string, args ...string) error {
	if err := l.checkNS(ns); err != nil {
		return err
	}
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("lab: ip -n %s %s: %w: %s", ns, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ipBatch runs several ip commands in namespace ns with one "ip -n ns -batch".
func (l *Lab) ipBatch(ns string, cmds []string) error { return l.batch("ip", ns, cmds) }

// batch runs several commands of tool (ip, bridge) in namespace ns with
// one "<tool> -n ns -batch -".
func (l *Lab) batch(tool, ns string, cmds []string) error {
	if err := l.checkNS(ns); err != nil {
		return err
	}
	cmd := exec.Command(tool, "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("lab: %s -n %s -batch: %w: %s\ncommands:\n%s", tool, ns, err, strings.TrimSpace(string(out)), strings.Join(cmds, "\n"))
	}
	return nil
}

// sysctl sets sysctls inside ns; unknown keys are ignored.
func (l *Lab) sysctl(ns string, kv ...string) error {
	_, err := l.Exec(context.Background(), ns, append([]string{"sysctl", "-q", "-e", "-w"}, kv...)...)
	return err
}

// Prefix is the namespace name prefix of the lab.
func (l *Lab) Prefix() string { return l.prefix }

// WorkDir holds the logs of the lab's processes.
func (l *Lab) WorkDir() string { return l.workDir }

// SwitchNS is the namespace of the switch (bridge br0).
func (l *Lab) SwitchNS() string { return l.swNS }

// RouterNS is the namespace of the upstream router.
func (l *Lab) RouterNS() string { return l.rtrNS }

// Nodes lists the nodes in config order.
func (l *Lab) Nodes() []*Node { return append([]*Node(nil), l.nodes...) }

// Node returns the node with that name, or nil.
func (l *Lab) Node(name string) *Node {
	for _, n := range l.nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Externals lists the external servers in config order.
func (l *Lab) Externals() []*External { return append([]*External(nil), l.externals...) }

// External returns the external server with that name, or nil.
func (l *Lab) External(name string) *External {
	for _, e := range l.externals {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// NetNSes lists every namespace the lab currently has, sorted.
func (l *Lab) NetNSes() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for ns := range l.nsSet {
		out = append(out, ns)
	}
	sort.Strings(out)
	return out
}

// Procs lists the processes started in the lab (echo servers included).
func (l *Lab) Procs() []*Proc {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Proc(nil), l.procs...)
}

// AddPod creates pod name on node: namespace <prefix>p-<name>, a veth pair
// to the node, the next free address of the node's pod CIDR, default route
// via the node's pod gateway (see Config.PodNetwork for the wiring).
func (l *Lab) AddPod(node, name string) (*Pod, error) {
	n := l.Node(node)
	if n == nil {
		return nil, fmt.Errorf("lab: no node %q", node)
	}
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: invalid pod name %q", name)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	if _, ok := l.pods[name]; ok {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: pod %q exists", name)
	}
	used := l.podHosts[node]
	if used == nil {
		used = map[int]bool{}
		l.podHosts[node] = used
	}
	host := 0
	for h := 2; h < 255; h++ {
		if !used[h] {
			host = h
			break
		}
	}
	if host == 0 {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: node %s has no free pod address", node)
	}
	used[host] = true
	l.vethSeq++
	p := &Pod{
		Name:     name,
		Node:     node,
		NetNS:    l.prefix + "p-" + name,
		IP:       netip.AddrFrom4([4]byte{10, 244, byte(n.Index), byte(host)}),
		HostVeth: "vp" + strconv.Itoa(l.vethSeq),
	}
	p.NodeDev = p.HostVeth
	if n.PodBridge != "" {
		p.NodeDev = n.PodBridge
	}
	l.pods[name] = p
	l.mu.Unlock()

	err := l.setupPod(n, p)
	if err != nil {
		l.RemovePod(name)
		return nil, err
	}
	return p, nil
}

func (l *Lab) setupPod(n *Node, p *Pod) error {
	if err := l.addNS(p.NetNS); err != nil {
		return err
	}
	mtu := strconv.Itoa(l.cfg.PodMTU)
	if err := l.ip(p.NetNS, "link", "add", "eth0", "mtu", mtu, "type", "veth", "peer", "name", p.HostVeth, "mtu", mtu, "netns", n.NetNS); err != nil {
		return err
	}
	return l.setupPodNetwork(n, p)
}

// Pod returns the pod with that name, or nil.
func (l *Lab) Pod(name string) *Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pods[name]
}

// Pods lists the current pods sorted by name.
func (l *Lab) Pods() []*Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*Pod
	for _, p := range l.pods {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// RemovePod kills the processes in the pod, deletes its veth (and with it
// the node's route to it) and its namespace, and frees its address.
func (l *Lab) RemovePod(name string) error {
	l.mu.Lock()
	p := l.pods[name]
	l.mu.Unlock()
	if p == nil {
		return fmt.Errorf("lab: no pod %q", name)
	}
	n := l.Node(p.Node)
	var errs []error
	l.mu.Lock()
	var procs []*Proc
	for _, pr := range l.procs {
		if pr.NetNS == p.NetNS {
			procs = append(procs, pr)
		}
	}
	l.mu.Unlock()
	for _, pr := range procs {
		pr.Kill()
	}
	killNamespacePids([]string{p.NetNS})
	// Delete the node side first: synchronous, unlike the veth teardown
	// that follows a namespace deletion.
	if out, err := exec.Command("ip", "-n", n.NetNS, "link", "del", p.HostVeth).CombinedOutput(); err != nil &&
		!strings.Contains(string(out), "Cannot find device") {
		errs = append(errs, fmt.Errorf("lab: delete %s on %s: %w: %s", p.HostVeth, n.Name, err, out))
	}
	if err := deleteNamespaces([]string{p.NetNS}); err != nil {
		errs = append(errs, err)
	}
	l.mu.Lock()
	delete(l.pods, name)
	delete(l.podHosts[p.Node], int(p.IP.As4()[3]))
	delete(l.nsSet, p.NetNS)
	for i, ns := range l.nsOrder {
		if ns == p.NetNS {
			l.nsOrder = append(l.nsOrder[:i], l.nsOrder[i+1:]...)
			break
		}
	}
	l.mu.Unlock()
	return errors.Join(errs...)
}

// SetLinkDown pulls the node's cable: the switch port of its uplink goes
// down, the node sees NO-CARRIER on eth0 and keeps its addresses and
// routes (flagged linkdown), and nothing reaches or leaves it on the
// switch.
func (l *Lab) SetLinkDown(node string) error {
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("lab: no node %q", node)
	}
	return l.ip(l.swNS, "link", "set", n.SwitchPort, "down")
}

// SetLinkUp plugs the node's cable back in.
func (l *Lab) SetLinkUp(node string) error {
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("lab: no node %q", node)
	}
	return l.ip(l.swNS, "link", "set", n.SwitchPort, "up")
}

// Close kills every process the lab started and every other process left
// in its namespaces, closes its relays, deletes every namespace it
// created, removes its work directory unless kept, and releases the
// prefix. It is idempotent.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		procs := append([]*Proc(nil), l.procs...)
		relays := make([]*relay, 0, len(l.relays))
		for r := range l.relays {
			relays = append(relays, r)
		}
		order := append([]string(nil), l.nsOrder...)
		l.mu.Unlock()
		var errs []error
		for _, r := range relays {
			r.close()
		}
		for _, p := range procs {
			if err := p.Kill(); err != nil {
				errs = append(errs, err)
			}
		}
		for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
			order[i], order[j] = order[j], order[i]
		}
		if err := deleteNamespaces(order); err != nil {
			errs = append(errs, err)
		}
		l.mu.Lock()
		l.nsSet = map[string]bool{}
		l.nsOrder = nil
		l.mu.Unlock()
		if l.workDir != "" {
			if err := unmountUnder(l.workDir); err != nil {
				errs = append(errs, err)
			}
		}
		if l.ownDir && l.workDir != "" {
			os.RemoveAll(l.workDir)
		}
		l.closeErr = errors.Join(errs...)
		// Keep the records for CleanupStale if a namespace survived.
		l.lock.release(l.closeErr == nil && len(l.lock.stale) == 0)
	})
	return l.closeErr
}
