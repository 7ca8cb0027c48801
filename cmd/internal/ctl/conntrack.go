package ctl

import (
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"

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
