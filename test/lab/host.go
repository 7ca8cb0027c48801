package lab

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
)

// Host is an extra host on the node switch: namespace <prefix>h-<name>,
// its eth0 on the switch holding one or more addresses of NodeSubnet. It
// stands in for machines that are not lab nodes, e.g. many Node objects'
// InternalIPs answering the operators' health probes without an agent.
type Host struct {
	Name       string
	NetNS      string
	Addrs      []netip.Addr
	SwitchPort string // its port on the switch (in the switch namespace)
}

// AddSwitchHost creates a host on the switch with the given addresses
// (each in NodeSubnet, not the router's, a node's, the floating range's,
// nor the subnet's network or broadcast address).
func (l *Lab) AddSwitchHost(name string, addrs ...netip.Addr) (*Host, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: invalid host name %q", name)
	}
	if len(addrs) == 0 {
		return nil, errors.New("lab: a switch host needs an address")
	}
	taken := map[netip.Addr]string{RouterIP: "the router"}
	for _, n := range l.nodes {
		taken[n.IP] = "node " + n.Name
	}
	l.mu.Lock()
	for _, h := range l.hosts {
		for _, a := range h.Addrs {
			taken[a] = "host " + h.Name
		}
	}
	l.mu.Unlock()
	last := netip.AddrFrom4([4]byte{192, 0, 2, 255})
	for _, a := range addrs {
		switch {
		case !NodeSubnet.Contains(a) || a == NodeSubnet.Addr() || a == last:
			return nil, fmt.Errorf("lab: host %s: %s is not a host address of %s", name, a, NodeSubnet)
		case a.Compare(FloatingIPFirst) >= 0 && a.Compare(FloatingIPLast) <= 0:
			return nil, fmt.Errorf("lab: host %s: %s is in the floating IP range", name, a)
		case taken[a] != "":
			return nil, fmt.Errorf("lab: host %s: %s belongs to %s", name, a, taken[a])
		}
		taken[a] = "host " + name
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	if l.hosts == nil {
		l.hosts = map[string]*Host{}
	}
	if _, ok := l.hosts[name]; ok {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: host %q exists", name)
	}
	l.hostSeq++
	h := &Host{Name: name, NetNS: l.prefix + "h-" + name, Addrs: append([]netip.Addr(nil), addrs...),
		SwitchPort: "h" + strconv.Itoa(l.hostSeq)}
	if l.nsSet[h.NetNS] {
		l.hostSeq--
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: namespace %s exists", h.NetNS)
	}
	l.hosts[name] = h
	l.mu.Unlock()
	if err := l.setupHost(h); err != nil {
		if rerr := l.RemoveSwitchHost(name); rerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, rerr)
		}
		return nil, err
	}
	return h, nil
}

func (l *Lab) setupHost(h *Host) error {
	if err := l.addNS(h.NetNS); err != nil {
		return err
	}
	mtu := strconv.Itoa(l.cfg.UplinkMTU)
	if err := l.ip(h.NetNS, "link", "add", "eth0", "mtu", mtu, "type", "veth", "peer", "name", h.SwitchPort, "mtu", mtu, "netns", l.swNS); err != nil {
		return err
	}
	if err := l.ipBatch(l.swNS, []string{"link set " + h.SwitchPort + " master br0", "link set " + h.SwitchPort + " up"}); err != nil {
		return err
	}
	cmds := []string{"link set lo up", "link set eth0 up"}
	for _, a := range h.Addrs {
		cmds = append(cmds, "addr add "+netip.PrefixFrom(a, NodeSubnet.Bits()).String()+" dev eth0")
	}
	cmds = append(cmds, "route add default via "+RouterIP.String()+" dev eth0")
	return l.ipBatch(h.NetNS, cmds)
}

// SwitchHost returns the switch host with that name, or nil.
func (l *Lab) SwitchHost(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.hosts[name]
}

// RemoveSwitchHost kills the processes in the host, deletes its switch
// port and its namespace.
func (l *Lab) RemoveSwitchHost(name string) error {
	l.mu.Lock()
	h := l.hosts[name]
	var procs []*Proc
	if h != nil {
		for _, pr := range l.procs {
			if pr.NetNS == h.NetNS {
				procs = append(procs, pr)
			}
		}
	}
	l.mu.Unlock()
	if h == nil {
		return fmt.Errorf("lab: no host %q", name)
	}
	for _, pr := range procs {
		pr.Kill()
	}
	var errs []error
	killNamespacePids([]string{h.NetNS})
	if out, err := exec.Command("ip", "-n", l.swNS, "link", "del", h.SwitchPort).CombinedOutput(); err != nil &&
		!strings.Contains(string(out), "Cannot find device") {
		errs = append(errs, fmt.Errorf("lab: delete switch port %s: %w: %s", h.SwitchPort, err, out))
	}
	if err := deleteNamespaces([]string{h.NetNS}); err != nil {
		errs = append(errs, err)
	}
	l.mu.Lock()
	delete(l.hosts, name)
	delete(l.nsSet, h.NetNS)
	for i, ns := range l.nsOrder {
		if ns == h.NetNS {
			l.nsOrder = append(l.nsOrder[:i], l.nsOrder[i+1:]...)
			break
		}
	}
	l.mu.Unlock()
	return errors.Join(errs...)
}

// FlushNeighbors empties the neighbour (ARP) caches of lab namespaces,
// e.g. to undo a gratuitous ARP that poisoned them.
func (l *Lab) FlushNeighbors(nses ...string) error {
	var errs []error
	for _, ns := range nses {
		if err := l.ip(ns, "neigh", "flush", "all"); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// EchoServerPath is the echo server binary the lab runs (also usable in
// pods and on nodes with Start).
func (l *Lab) EchoServerPath() string { return l.cfg.EchoServer }
