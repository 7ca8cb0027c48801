package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"sort"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// KillNode fails a node as a power loss would look from the network: its
// switch port goes down and its agent is killed (the kernel state it leaves
// is unreachable behind the dead link).
func (c *Cluster) KillNode(node string) error {
	if err := c.Lab.SetLinkDown(node); err != nil {
		return err
	}
	if p := c.Agents[node]; p != nil {
		return p.Kill()
	}
	return nil
}

// Partition cuts a node off the network; its processes keep running.
func (c *Cluster) Partition(node string) error { return c.Lab.SetLinkDown(node) }

// Heal reconnects a partitioned node.
func (c *Cluster) Heal(node string) error { return c.Lab.SetLinkUp(node) }

// ReviveNode brings a killed node back the way a rebooted node returns: its
// agent starts while the node is still cut off, releases the floating IPs
// it cannot confirm (self-fencing), then the link comes up.
func (c *Cluster) ReviveNode(ctx context.Context, node string, timeout time.Duration) error {
	if err := c.StartAgent(node); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		held, err := c.NodeFloatingIPs(ctx, node)
		if err != nil {
			return err
		}
		if len(held) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still holds %v %v after its agent started while cut off", node, held, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c.Lab.SetLinkUp(node)
}

var floatingAddr = regexp.MustCompile(`inet (192\.0\.2\.1\d\d)/\d+`)

// NodeFloatingIPs lists the floating-range addresses (192.0.2.100-199) on a
// node's uplink, read from its kernel.
func (c *Cluster) NodeFloatingIPs(ctx context.Context, node string) ([]netip.Addr, error) {
	n := c.Lab.Node(node)
	out, err := c.Lab.Exec(ctx, n.NetNS, "ip", "-4", "addr", "show", "dev", n.Uplink)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w: %s", node, err, out)
	}
	var ips []netip.Addr
	for _, m := range floatingAddr.FindAllStringSubmatch(string(out), -1) {
		ips = append(ips, netip.MustParseAddr(m[1]))
	}
	return ips, nil
}

// Holders maps every floating-range address found on any node to the nodes
// holding it, sorted.
func (c *Cluster) Holders(ctx context.Context) (map[netip.Addr][]string, error) {
	out := map[netip.Addr][]string{}
	for _, n := range c.Lab.Nodes() {
		ips, err := c.NodeFloatingIPs(ctx, n.Name)
		if err != nil {
			return nil, err
		}
		for _, ip := range ips {
			out[ip] = append(out[ip], n.Name)
		}
	}
	for _, v := range out {
		sort.Strings(v)
	}
	return out, nil
}

// Leader returns the identity holding the operator's leader Lease.
func (c *Cluster) Leader(ctx context.Context) (string, error) {
	l, err := c.Client.CoordinationV1().Leases(SystemNamespace).Get(ctx, "egressnat-operator", metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if l.Spec.HolderIdentity == nil {
		return "", nil
	}
	return *l.Spec.HolderIdentity, nil
}

// RestartOperators stops every operator replica and starts them again with
// extra flags.
func (c *Cluster) RestartOperators(args ...string) error {
	for _, p := range c.Operators {
		if p != nil {
			p.Stop() //nolint:errcheck
		}
	}
	c.opts.OperatorArgs = args
	for i := range c.Operators {
		if err := c.StartOperator(i); err != nil {
			return err
		}
	}
	return nil
}
