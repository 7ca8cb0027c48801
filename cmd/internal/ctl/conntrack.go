package ctl

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/egressnat/egressnat/nft"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
)

// Flow is one conntrack entry as egressnatctl shows it.
type Flow struct {
	Proto string `json:"proto"`
	// Original direction: the pod and the external peer.
	Source      netip.AddrPort `json:"source"`
	Destination netip.AddrPort `json:"destination"`
	// ReplyTo is where replies go: the floating IP and port the flow was
	// SNATed to.
	ReplyTo netip.AddrPort `json:"replyTo"`
	State   string         `json:"state,omitempty"`
	Timeout uint32         `json:"timeout"`
}

// FlowGroup is the flows SNATed to one floating IP.
type FlowGroup struct {
	FloatingIP netip.Addr `json:"floatingIP"`
	Flows      []Flow     `json:"flows"`
}

// ReadFlows dumps the IPv4 conntrack table (of the network namespace fd,
// or the current one when fd < 1). It needs CAP_NET_ADMIN.
func ReadFlows(fd int) ([]Flow, error) {
	cfg := &mdnetlink.Config{}
	if fd > 0 {
		cfg.NetNS = fd
	}
	c, err := conntrack.Dial(cfg)
	if err != nil {
		return nil, permissionHint(fmt.Errorf("conntrack: %w", err))
	}
	defer c.Close()
	flows, err := c.DumpFilter(conntrack.NewFilter().Family(netfilter.ProtoIPv4), nil)
	if err != nil {
		return nil, permissionHint(fmt.Errorf("conntrack dump: %w", err))
	}
	out := make([]Flow, 0, len(flows))
	for _, f := range flows {
		out = append(out, FlowFromConntrack(f))
	}
	return out, nil
}

// FlowFromConntrack converts a ti-mo/conntrack flow.
func FlowFromConntrack(f conntrack.Flow) Flow {
	o, r := f.TupleOrig, f.TupleReply
	fl := Flow{
		Proto:       protoName(o.Proto.Protocol),
		Source:      netip.AddrPortFrom(o.IP.SourceAddress, o.Proto.SourcePort),
		Destination: netip.AddrPortFrom(o.IP.DestinationAddress, o.Proto.DestinationPort),
		ReplyTo:     netip.AddrPortFrom(r.IP.DestinationAddress, r.Proto.DestinationPort),
		Timeout:     f.Timeout,
	}
	if o.Proto.Protocol == 1 {
		fl.Source = netip.AddrPortFrom(o.IP.SourceAddress, o.Proto.ICMPID)
		fl.ReplyTo = netip.AddrPortFrom(r.IP.DestinationAddress, r.Proto.ICMPID)
	}
	if f.ProtoInfo.TCP != nil {
		fl.State = tcpState(f.ProtoInfo.TCP.State)
	}
	return fl
}

func protoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 132:
		return "sctp"
	}
	return fmt.Sprint(p)
}

func tcpState(s uint8) string {
	names := []string{"NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"}
	if int(s) < len(names) {
		return names[s]
	}
	return fmt.Sprint(s)
}

// GroupFlows returns, for each floating IP, the flows SNATed to it: their
// replies go to the floating IP while they came from another address.
// Groups follow floating's order (sorted); flows are sorted by source. It
// is pure.
func GroupFlows(flows []Flow, floating []netip.Addr) []FlowGroup {
	out := make([]FlowGroup, 0, len(floating))
	idx := map[netip.Addr]int{}
	for _, ip := range floating {
		if _, dup := idx[ip]; dup {
			continue
		}
		idx[ip] = len(out)
		out = append(out, FlowGroup{FloatingIP: ip, Flows: []Flow{}})
	}
	for _, f := range flows {
		i, ok := idx[f.ReplyTo.Addr()]
		if !ok || f.Source.Addr() == f.ReplyTo.Addr() {
			continue
		}
		out[i].Flows = append(out[i].Flows, f)
	}
	for i := range out {
		slices.SortFunc(out[i].Flows, func(a, b Flow) int {
			if c := a.Source.Compare(b.Source); c != 0 {
				return c
			}
			if c := a.Destination.Compare(b.Destination); c != 0 {
				return c
			}
			return strings.Compare(a.Proto, b.Proto)
		})
	}
	return out
}

// WriteFlowGroups writes one aligned table per floating IP.
func WriteFlowGroups(w io.Writer, groups []FlowGroup) error {
	if len(groups) == 0 {
		fmt.Fprintln(w, "This node holds no floating IP (none in the agent's table); nothing is SNATed here.")
		return nil
	}
	for i, g := range groups {
		if i > 0 {
			fmt.Fprintln(w)
		}
		noun := "flows"
		if len(g.Flows) == 1 {
			noun = "flow"
		}
		fmt.Fprintf(w, "%s: %d %s\n", g.FloatingIP, len(g.Flows), noun)
		if len(g.Flows) == 0 {
			continue
		}
		tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
		fmt.Fprintln(tw, "  PROTO\tSOURCE\tDESTINATION\tSNAT TO\tSTATE\tTIMEOUT")
		for _, f := range g.Flows {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%ds\n", f.Proto, f.Source, f.Destination, f.ReplyTo, dash(f.State), f.Timeout)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// ConntrackReport is what egressnatctl conntrack shows: the flows SNATed to
// each floating IP, and the check the agent makes on failover.
type ConntrackReport struct {
	FloatingIPs []FlowGroup  `json:"floatingIPs"`
	Check       Verification `json:"check"`
}

// Verification is, by hand, the conntrack check the agent makes when this
// node takes floating IPs (nft.Dataplane.VerifyTaken, without flushing):
// for each floating IP, how many entries translate to it and how many of
// its Gateway policies' entries do not; and those entries.
type Verification struct {
	IPs []IPCheck `json:"ips"`
	// Wrong: entries of this node's Gateway policies whose replies do not
	// go to the policy's egress IP (picked up before the SNAT rule
	// existed, null-bound while this node rerouted them, or masqueraded
	// to the node IP). The agent flushes them when it takes an IP.
	Wrong []WrongFlow `json:"wrong"`
}

// IPCheck is the check of one floating IP.
type IPCheck struct {
	FloatingIP netip.Addr `json:"floatingIP"`
	// Policies: the Gateway policies whose SNAT rule translates to it.
	Policies []string `json:"policies"`
	// Translated: entries SNATed to it (all of them, as in FloatingIPs).
	Translated int `json:"translated"`
	// PolicyFlows: entries its policies' rules decide (translated or
	// not); Wrong of them are not translated to it.
	PolicyFlows int `json:"policyFlows"`
	Wrong       int `json:"wrong"`
}

// WrongFlow is an entry of a Gateway policy not translated to its egress
// IP.
type WrongFlow struct {
	Flow
	Policy string     `json:"policy"`
	Want   netip.Addr `json:"want"`
}

// SNATExpecter says which Gateway policy decides a flow on this node and
// the egress IP it SNATs to (nft.SNATCheck).
type SNATExpecter interface {
	Expect(src, dst netip.Addr) (policy string, egress netip.Addr, ok bool)
}

// CheckFlows checks flows against the table's SNAT rules (exp): one
// IPCheck per floating IP (floating, then the egress IPs of policies,
// sorted) and the entries not translated to their egress IP, sorted by
// source. policies names the Gateway policies of each egress IP. It is
// pure.
func CheckFlows(flows []Flow, floating []netip.Addr, policies map[netip.Addr][]string, exp SNATExpecter) Verification {
	ips := slices.Clone(floating)
	for ip := range policies {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	ips = slices.Compact(ips)
	v := Verification{IPs: make([]IPCheck, 0, len(ips)), Wrong: []WrongFlow{}}
	idx := map[netip.Addr]int{}
	for _, ip := range ips {
		idx[ip] = len(v.IPs)
		ps := slices.Clone(policies[ip])
		if ps == nil {
			ps = []string{}
		}
		v.IPs = append(v.IPs, IPCheck{FloatingIP: ip, Policies: ps})
	}
	for _, f := range flows {
		reply := f.ReplyTo.Addr()
		if i, ok := idx[reply]; ok && f.Source.Addr() != reply {
			v.IPs[i].Translated++
		}
		if exp == nil {
			continue
		}
		policy, egress, ok := exp.Expect(f.Source.Addr(), f.Destination.Addr())
		if !ok {
			continue
		}
		i, known := idx[egress]
		if !known {
			i = len(v.IPs)
			idx[egress] = i
			v.IPs = append(v.IPs, IPCheck{FloatingIP: egress, Policies: []string{}})
		}
		v.IPs[i].PolicyFlows++
		if reply != egress {
			v.IPs[i].Wrong++
			v.Wrong = append(v.Wrong, WrongFlow{Flow: f, Policy: policy, Want: egress})
		}
	}
	slices.SortFunc(v.IPs, func(a, b IPCheck) int { return a.FloatingIP.Compare(b.FloatingIP) })
	slices.SortFunc(v.Wrong, func(a, b WrongFlow) int {
		if c := a.Source.Compare(b.Source); c != 0 {
			return c
		}
		if c := a.Destination.Compare(b.Destination); c != 0 {
			return c
		}
		return strings.Compare(a.Proto, b.Proto)
	})
	return v
}

// WriteVerification writes the check: one line per floating IP, then the
// entries not translated to their egress IP.
func WriteVerification(w io.Writer, v Verification) error {
	if len(v.IPs) == 0 {
		return nil
	}
	fmt.Fprintln(w, "Conntrack check of the Gateway policies (what the agent verifies when it takes a floating IP):")
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "  FLOATING IP\tPOLICIES\tSNATED TO IT\tOF ITS POLICIES\tNOT TRANSLATED")
	for _, c := range v.IPs {
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%d\t%d\n", c.FloatingIP, dash(strings.Join(c.Policies, ",")), c.Translated, c.PolicyFlows, c.Wrong)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(v.Wrong) == 0 {
		fmt.Fprintln(w, "\nEvery entry of a Gateway policy is translated to its egress IP.")
		return nil
	}
	noun := "entries"
	if len(v.Wrong) == 1 {
		noun = "entry"
	}
	fmt.Fprintf(w, "\n%d %s not translated to their egress IP (they leave with another address; the agent flushes them when it takes the IP):\n", len(v.Wrong), noun)
	tw = tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "  PROTO\tSOURCE\tDESTINATION\tREPLY TO\tWANT\tPOLICY\tSTATE\tTIMEOUT")
	for _, f := range v.Wrong {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%ds\n", f.Proto, f.Source, f.Destination, f.ReplyTo, f.Want, f.Policy, dash(f.State), f.Timeout)
	}
	return tw.Flush()
}

// WriteConntrackReport writes the flows of each floating IP, then the check.
func WriteConntrackReport(w io.Writer, r ConntrackReport) error {
	if err := WriteFlowGroups(w, r.FloatingIPs); err != nil {
		return err
	}
	if len(r.Check.IPs) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	return WriteVerification(w, r.Check)
}

// ReadConntrackReport reads the agent's table and the conntrack table of
// the node (o.NetNSFd) and builds the report; floating are the floating IPs
// to show (default: the ones in the table's floating set and its SNAT
// rules). It needs CAP_NET_ADMIN.
func ReadConntrackReport(ctx context.Context, o RulesetOptions, floating []netip.Addr) (ConntrackReport, error) {
	t, err := nft.ReadTable(ctx, o.NetNSFd, o.Table)
	if err != nil {
		return ConntrackReport{}, permissionHint(fmt.Errorf("read nftables table %s: %w", o.Table, err))
	}
	if len(floating) == 0 {
		rs := &Ruleset{}
		renderTable(t, rs)
		floating = rs.FloatingIPs()
	}
	flows, err := ReadFlows(o.NetNSFd)
	if err != nil {
		return ConntrackReport{}, err
	}
	check := t.SNATCheck()
	return ConntrackReport{
		FloatingIPs: GroupFlows(flows, floating),
		Check:       CheckFlows(flows, floating, check.Policies(), check),
	}, nil
}
