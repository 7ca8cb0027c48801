package lab

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"strings"
)

var switchTableRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,30}$`)

// SetSwitchFilter replaces the nftables table "bridge <table>" of the
// switch namespace with one chain on the bridge forward hook (priority 0,
// policy accept) holding rules, in one transaction: a rule set either
// applies whole or not at all. Rules match on the switch ports (iifname,
// oifname: a node's SwitchPort such as "n1", "rtr" for the router, a switch
// host's port) and on anything the bridge family can see, e.g.
//
//	iifname "n1" oifname "n0" tcp dport 6443 drop
//
// The table is the caller's alone; nothing else of the lab uses nftables in
// the switch. An empty rule list leaves an empty chain (everything passes).
func (l *Lab) SetSwitchFilter(ctx context.Context, table string, rules []string) error {
	if !switchTableRE.MatchString(table) {
		return fmt.Errorf("lab: invalid switch table name %q", table)
	}
	var b strings.Builder
	// Creating the table first makes the delete valid when it is absent.
	fmt.Fprintf(&b, "table bridge %s {}\ndelete table bridge %s\n", table, table)
	fmt.Fprintf(&b, "table bridge %s {\n\tchain port_filter {\n\t\ttype filter hook forward priority 0; policy accept;\n", table)
	for _, r := range rules {
		if strings.ContainsAny(r, "\n;{}") {
			return fmt.Errorf("lab: switch rule %q: one plain rule per entry", r)
		}
		fmt.Fprintf(&b, "\t\t%s\n", r)
	}
	b.WriteString("\t}\n}\n")
	return l.nftScript(ctx, l.swNS, b.String())
}

// DeleteSwitchFilter removes the table "bridge <table>" of the switch
// namespace; removing an absent table does nothing.
func (l *Lab) DeleteSwitchFilter(ctx context.Context, table string) error {
	if !switchTableRE.MatchString(table) {
		return fmt.Errorf("lab: invalid switch table name %q", table)
	}
	return l.nftScript(ctx, l.swNS, fmt.Sprintf("table bridge %s {}\ndelete table bridge %s\n", table, table))
}

// nftScript runs "nft -f -" with script inside lab namespace ns.
func (l *Lab) nftScript(ctx context.Context, ns, script string) error {
	if err := l.checkNS(ns); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("lab: nft -f in %s: %w: %s\nscript:\n%s", ns, err, strings.TrimSpace(string(out)), script)
	}
	return nil
}

// LinkMAC returns the hardware address of link dev inside lab namespace ns
// (e.g. a node's uplink, to tell which node answers an ARP request).
func (l *Lab) LinkMAC(ns, dev string) (net.HardwareAddr, error) {
	if err := l.checkNS(ns); err != nil {
		return nil, err
	}
	var mac net.HardwareAddr
	err := Do(ns, func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		mac = ifi.HardwareAddr
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: address of %s in %s: %w", dev, ns, err)
	}
	return mac, nil
}
