package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/egressnat/egressnat/selector"
	"github.com/egressnat/egressnat/test/lab"
)

var (
	floatingPrefix = regexp.MustCompile(`inet (192\.0\.2\.1\d\d/\d+)`)
	lookupTable    = regexp.MustCompile(`lookup (\d+)`)
	routeTable     = regexp.MustCompile(`\btable (\d+)\b`)
)

// WipeNodeState removes from a node's kernel what egressnat put there, as
// a reboot would: the floating-range addresses (192.0.2.100-199) on its
// uplink, the agent's ip rules (priority selector.DefaultRulePriority) and
// every route of its route tables (selector.DefaultRouteTableBase + 1 ...),
// the nftables table "ip egressnat", the conntrack table and the neighbour
// cache. The lab's own setup (node address, routes, CNI masquerade) stays.
// Stop the node's agent first, or it puts everything back.
func (c *Cluster) WipeNodeState(ctx context.Context, node string) error {
	n := c.Lab.Node(node)
	if n == nil {
		return fmt.Errorf("no node %s", node)
	}
	var errs []error
	run := func(args ...string) (string, error) {
		out, err := c.Lab.Exec(ctx, n.NetNS, args...)
		return string(out), err
	}
	out, err := run("ip", "-4", "addr", "show", "dev", n.Uplink)
	if err != nil {
		return err
	}
	for _, m := range floatingPrefix.FindAllStringSubmatch(out, -1) {
		if _, err := run("ip", "addr", "del", m[1], "dev", n.Uplink); err != nil {
			errs = append(errs, err)
		}
	}
	prio := strconv.Itoa(selector.DefaultRulePriority)
	tables := map[int]bool{}
	rules, err := run("ip", "-4", "rule", "show", "priority", prio)
	if err != nil {
		return err
	}
	nrules := 0
	for _, line := range strings.Split(rules, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		nrules++
		if m := lookupTable.FindStringSubmatch(line); m != nil {
			t, _ := strconv.Atoi(m[1])
			tables[t] = true
		}
	}
	routes, err := run("ip", "-4", "route", "show", "table", "all")
	if err != nil {
		return err
	}
	for _, m := range routeTable.FindAllStringSubmatch(routes, -1) {
		t, _ := strconv.Atoi(m[1])
		if t > selector.DefaultRouteTableBase && t <= selector.DefaultRouteTableBase+64 {
			tables[t] = true
		}
	}
	for range nrules {
		if _, err := run("ip", "-4", "rule", "del", "priority", prio); err != nil {
			errs = append(errs, err)
			break
		}
	}
	for t := range tables {
		if t == 254 || t == 255 || t == 253 || t == 0 {
			continue // never main, local, default
		}
		if _, err := run("ip", "-4", "route", "flush", "table", strconv.Itoa(t)); err != nil &&
			!strings.Contains(err.Error(), "FIB table does not exist") {
			errs = append(errs, err)
		}
	}
	if _, err := run("nft", "delete", "table", "ip", "egressnat"); err != nil &&
		!strings.Contains(err.Error(), "No such file or directory") {
		errs = append(errs, err)
	}
	if _, err := run("conntrack", "-F"); err != nil {
		errs = append(errs, err)
	}
	if _, err := run("ip", "neigh", "flush", "all"); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// AgentReady asks the node's agent for /readyz (on AgentHealthPort inside
// the node's namespace): nil once its caches synced and its last sync
// succeeded.
func (c *Cluster) AgentReady(ctx context.Context, node string) error {
	n := c.Lab.Node(node)
	if n == nil {
		return fmt.Errorf("no node %s", node)
	}
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return lab.DialTCP(ctx, n.NetNS, "127.0.0.1:"+strconv.Itoa(AgentHealthPort))
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent on %s not ready: %d %s", node, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return nil
}

// WaitAgentReady waits until the node's agent is ready (AgentReady).
func (c *Cluster) WaitAgentReady(ctx context.Context, node string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := c.AgentReady(ctx, node)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent on %s not ready after %v: %w", node, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// NodeHasTable reports whether the nftables table "ip egressnat" exists
// on the node.
func (c *Cluster) NodeHasTable(ctx context.Context, node string) (bool, error) {
	n := c.Lab.Node(node)
	if n == nil {
		return false, fmt.Errorf("no node %s", node)
	}
	out, err := c.Lab.Exec(ctx, n.NetNS, "nft", "list", "tables", "ip")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(line) == "table ip egressnat" {
			return true, nil
		}
	}
	return false, nil
}
