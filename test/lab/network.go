package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Pod network modes (Config.PodNetwork).
const (
	// PodNetworkRouted: every pod has its own veth to its node, a /32
	// address, and the nodes route each other's pod CIDRs "via <node IP>
	// dev eth0" (host-gw, Calico-like).
	PodNetworkRouted = "routed"
	// PodNetworkOverlay: flannel-style VXLAN; pods hang off the node's
	// bridge PodBridge and other nodes' pod CIDRs are reached through the
	// VXLAN device OverlayDev.
	PodNetworkOverlay = "overlay"
)

// Reverse-path filter modes of the nodes (Config.RPFilter).
const (
	RPFilterLoose  = "loose"  // rp_filter=2
	RPFilterStrict = "strict" // rp_filter=1
	RPFilterOff    = "off"    // rp_filter=0
)

// Masquerade flavours of the CNI on every node (Config.Masquerade).
const (
	// MasqueradeIPTablesNFT: "iptables-nft -t nat -A POSTROUTING -s
	// 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE".
	MasqueradeIPTablesNFT = "iptables-nft"
	// MasqueradeIPTablesLegacy: the same rule with iptables-legacy.
	MasqueradeIPTablesLegacy = "iptables-legacy"
	// MasqueradeNFT: native nftables, table "ip <MasqueradeTable>" with a
	// nat postrouting chain at priority srcnat holding "ip saddr
	// 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade".
	MasqueradeNFT = "nft"
	// MasqueradeNone: no masquerade; pod sources leave the node unchanged
	// (and the router drops the answers' way back: it has no pod routes).
	MasqueradeNone = "none"
)

const (
	// DefaultMTU is the MTU of the uplinks and of routed pods when the
	// Config sets none.
	DefaultMTU = 1500
	// VXLANOverhead is what the overlay takes off the uplink MTU (outer
	// IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14), as flannel does.
	VXLANOverhead = 50
	// MinMTU and MaxMTU bound Config.UplinkMTU, Config.PodMTU and the
	// overlay's MTU.
	MinMTU = 576
	MaxMTU = 9000

	// PodBridge is the node's pod bridge in overlay mode.
	PodBridge = "cni0"
	// OverlayDev is the node's VXLAN device in overlay mode: VNI OverlayVNI,
	// UDP port OverlayPort, local address the node IP, over the uplink.
	OverlayDev  = "flannel.1"
	OverlayVNI  = 1
	OverlayPort = 8472
	// MasqueradeTable is the nftables table (family ip) of MasqueradeNFT.
	MasqueradeTable = "lab-cni"
)

// networkDefaults fills and checks the pod network fields of c.
func (c *Config) networkDefaults() error {
	switch c.PodNetwork {
	case "":
		c.PodNetwork = PodNetworkRouted
	case PodNetworkRouted, PodNetworkOverlay:
	default:
		return fmt.Errorf("lab: PodNetwork %q: want %q or %q (IPIP is not offered: this kernel lacks it)",
			c.PodNetwork, PodNetworkRouted, PodNetworkOverlay)
	}
	switch c.RPFilter {
	case "":
		c.RPFilter = RPFilterLoose
	case RPFilterLoose, RPFilterStrict, RPFilterOff:
	default:
		return fmt.Errorf("lab: RPFilter %q: want %q, %q or %q", c.RPFilter, RPFilterLoose, RPFilterStrict, RPFilterOff)
	}
	switch c.Masquerade {
	case "":
		c.Masquerade = MasqueradeIPTablesNFT
	case MasqueradeIPTablesNFT, MasqueradeIPTablesLegacy, MasqueradeNFT, MasqueradeNone:
	default:
		return fmt.Errorf("lab: Masquerade %q: want %q, %q, %q or %q", c.Masquerade,
			MasqueradeIPTablesNFT, MasqueradeIPTablesLegacy, MasqueradeNFT, MasqueradeNone)
	}
	if c.UplinkMTU == 0 {
		c.UplinkMTU = DefaultMTU
	}
	if c.UplinkMTU < MinMTU || c.UplinkMTU > MaxMTU {
		return fmt.Errorf("lab: UplinkMTU %d: want %d..%d", c.UplinkMTU, MinMTU, MaxMTU)
	}
	if c.PodNetwork == PodNetworkOverlay && c.UplinkMTU-VXLANOverhead < MinMTU {
		return fmt.Errorf("lab: UplinkMTU %d leaves the overlay %d, below %d", c.UplinkMTU, c.UplinkMTU-VXLANOverhead, MinMTU)
	}
	if c.PodMTU == 0 {
		c.PodMTU = c.defaultPodMTU()
	}
	if c.PodMTU < MinMTU || c.PodMTU > MaxMTU {
		return fmt.Errorf("lab: PodMTU %d: want %d..%d", c.PodMTU, MinMTU, MaxMTU)
	}
	return nil
}

func (c *Config) defaultPodMTU() int {
	if c.PodNetwork == PodNetworkOverlay {
		return c.UplinkMTU - VXLANOverhead
	}
	return DefaultMTU
}

// ModeName names the pod network settings of c, defaults filled in, for
// test names and logs: "<PodNetwork>/<RPFilter>/<Masquerade>", then
// "/mtu<UplinkMTU>" when the uplink MTU is not DefaultMTU and
// "/podmtu<PodMTU>" when the pod MTU is not the mode's default, e.g.
// "routed/loose/iptables-nft" (the zero Config) or
// "overlay/strict/iptables-legacy/mtu1450". Invalid values appear as given.
func (c Config) ModeName() string {
	c.networkDefaults() // an invalid value is named as it is
	parts := []string{c.PodNetwork, c.RPFilter, c.Masquerade}
	if c.UplinkMTU != DefaultMTU {
		parts = append(parts, "mtu"+strconv.Itoa(c.UplinkMTU))
	}
	if c.PodMTU != c.defaultPodMTU() {
		parts = append(parts, "podmtu"+strconv.Itoa(c.PodMTU))
	}
	return strings.Join(parts, "/")
}

// Config returns the lab's configuration with every default filled in
// (PodNetwork, RPFilter, Masquerade, UplinkMTU, PodMTU, nodes, externals,
// ports, the echo server path).
func (l *Lab) Config() Config {
	c := l.cfg
	c.Nodes = append([]NodeConfig(nil), c.Nodes...)
	c.Externals = append([]ExternalConfig(nil), c.Externals...)
	c.EchoTCPPorts = append([]int(nil), c.EchoTCPPorts...)
	c.EchoUDPPorts = append([]int(nil), c.EchoUDPPorts...)
	return c
}

// rpFilterValue is the sysctl value of an RPFilter mode.
func rpFilterValue(mode string) string {
	switch mode {
	case RPFilterStrict:
		return "1"
	case RPFilterOff:
		return "0"
	}
	return "2"
}

// overlayMAC is the fixed MAC address of node index i's OverlayDev
// (0a:58 followed by its address 10.244.i.0, as the CNI bridge plugin
// derives MACs).
func overlayMAC(i int) net.HardwareAddr {
	return net.HardwareAddr{0x0a, 0x58, 10, 244, byte(i), 0}
}

// bridgeMAC is the fixed MAC address of node index i's PodBridge
// (derived from its address 10.244.i.1), so that it does not follow the
// lowest port MAC as pods come and go.
func bridgeMAC(i int) net.HardwareAddr {
	return net.HardwareAddr{0x0a, 0x58, 10, 244, byte(i), 1}
}

// overlayAddr is node n's address on OverlayDev: 10.244.<i>.0.
func overlayAddr(n *Node) netip.Addr { return n.PodCIDR.Addr() }

// setupNodeNetwork gives node n its uplink address, default route, pod
// network (routes to the other nodes' pods) and the CNI masquerade.
func (l *Lab) setupNodeNetwork(n *Node) error {
	cmds := []string{
		"link set lo up", "link set eth0 up",
		"addr add " + netip.PrefixFrom(n.IP, NodeSubnet.Bits()).String() + " dev eth0",
		"route add default via " + RouterIP.String() + " dev eth0",
	}
	var fdb []string
	switch l.cfg.PodNetwork {
	case PodNetworkOverlay:
		gw := netip.PrefixFrom(n.PodGateway, n.PodCIDR.Bits())
		cmds = append(cmds,
			"link add "+PodBridge+" address "+bridgeMAC(n.Index).String()+" type bridge",
			"link set "+PodBridge+" mtu "+strconv.Itoa(l.cfg.PodMTU),
			"addr add "+gw.String()+" dev "+PodBridge,
			"link set "+PodBridge+" up",
			fmt.Sprintf("link add %s address %s mtu %d type vxlan id %d local %s dev %s dstport %d nolearning",
				OverlayDev, overlayMAC(n.Index), l.cfg.UplinkMTU-VXLANOverhead, OverlayVNI, n.IP, Uplink, OverlayPort),
			"addr add "+overlayAddr(n).String()+"/32 dev "+OverlayDev,
			"link set "+OverlayDev+" up",
		)
		for _, o := range l.nodes {
			if o == n {
				continue
			}
			cmds = append(cmds,
				"route add "+o.PodCIDR.String()+" via "+overlayAddr(o).String()+" dev "+OverlayDev+" onlink",
				"neigh add "+overlayAddr(o).String()+" lladdr "+o.OverlayMAC.String()+" dev "+OverlayDev+" nud permanent",
			)
			fdb = append(fdb, "fdb append "+o.OverlayMAC.String()+" dev "+OverlayDev+" dst "+o.IP.String())
		}
	default:
		for _, o := range l.nodes {
			if o != n {
				cmds = append(cmds, "route add "+o.PodCIDR.String()+" via "+o.IP.String()+" dev eth0")
			}
		}
	}
	if err := l.ipBatch(n.NetNS, cmds); err != nil {
		return err
	}
	if len(fdb) > 0 {
		if err := l.batch("bridge", n.NetNS, fdb); err != nil {
			return err
		}
	}
	return l.setupMasquerade(n)
}

// masqueradeScript is the nft script of MasqueradeNFT.
func masqueradeScript() string {
	c := ClusterCIDR.String()
	return "table ip " + MasqueradeTable + " {\n" +
		"\tchain postrouting {\n" +
		"\t\ttype nat hook postrouting priority srcnat; policy accept;\n" +
		"\t\tip saddr " + c + " ip daddr != " + c + " masquerade\n" +
		"\t}\n}\n"
}

// setupMasquerade installs the CNI masquerade of the chosen flavour on n.
func (l *Lab) setupMasquerade(n *Node) error {
	ctx := context.Background()
	switch l.cfg.Masquerade {
	case MasqueradeIPTablesNFT, MasqueradeIPTablesLegacy:
		_, err := l.Exec(ctx, n.NetNS, l.cfg.Masquerade, "-w", "-t", "nat", "-A", "POSTROUTING",
			"-s", ClusterCIDR.String(), "!", "-d", ClusterCIDR.String(), "-j", "MASQUERADE")
		return err
	case MasqueradeNFT:
		return l.nftScript(ctx, n.NetNS, masqueradeScript())
	}
	return nil
}

// setupPodNetwork wires pod p, whose veth peer p.HostVeth already sits in
// node n, into the node's pod network.
func (l *Lab) setupPodNetwork(n *Node, p *Pod) error {
	if l.cfg.PodNetwork == PodNetworkOverlay {
		if err := l.ipBatch(n.NetNS, []string{
			"link set " + p.HostVeth + " master " + PodBridge,
			"link set " + p.HostVeth + " up",
		}); err != nil {
			return err
		}
		return l.ipBatch(p.NetNS, []string{
			"link set lo up", "link set eth0 up",
			"addr add " + netip.PrefixFrom(p.IP, n.PodCIDR.Bits()).String() + " dev eth0",
			"route add default via " + n.PodGateway.String() + " dev eth0",
		})
	}
	if err := l.ipBatch(n.NetNS, []string{
		"link set " + p.HostVeth + " up",
		"addr add " + n.PodGateway.String() + "/32 dev " + p.HostVeth,
		"route add " + p.IP.String() + "/32 dev " + p.HostVeth + " src " + n.PodGateway.String(),
	}); err != nil {
		return err
	}
	return l.ipBatch(p.NetNS, []string{
		"link set lo up", "link set eth0 up",
		"addr add " + p.IP.String() + "/32 dev eth0",
		"route add " + n.PodGateway.String() + " dev eth0 scope link",
		"route add default via " + n.PodGateway.String() + " dev eth0",
	})
}

// ParseModeName reads a name ModeName writes (its parts in any order, each
// optional) back into the pod network fields of a Config; "" is the zero
// Config.
func ParseModeName(s string) (Config, error) {
	var c Config
	if s == "" {
		return c, nil
	}
	for _, part := range strings.Split(s, "/") {
		switch {
		case part == PodNetworkRouted || part == PodNetworkOverlay:
			c.PodNetwork = part
		case part == RPFilterLoose || part == RPFilterStrict || part == RPFilterOff:
			c.RPFilter = part
		case part == MasqueradeIPTablesNFT || part == MasqueradeIPTablesLegacy || part == MasqueradeNFT || part == MasqueradeNone:
			c.Masquerade = part
		case strings.HasPrefix(part, "podmtu"):
			n, err := strconv.Atoi(strings.TrimPrefix(part, "podmtu"))
			if err != nil {
				return Config{}, fmt.Errorf("lab: mode %q: %q is no pod MTU", s, part)
			}
			c.PodMTU = n
		case strings.HasPrefix(part, "mtu"):
			n, err := strconv.Atoi(strings.TrimPrefix(part, "mtu"))
			if err != nil {
				return Config{}, fmt.Errorf("lab: mode %q: %q is no uplink MTU", s, part)
			}
			c.UplinkMTU = n
		default:
			return Config{}, fmt.Errorf("lab: mode %q: unknown part %q", s, part)
		}
	}
	check := c
	if err := check.networkDefaults(); err != nil {
		return Config{}, err
	}
	return c, nil
}
