package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RulesetOptions say where the agent's state is: the flags the agent runs
// with.
type RulesetOptions struct {
	Table          string
	RulePriority   int
	RouteTableBase int
	MarkMask       uint32
	// NetNSFd is an open network namespace to read; below 1 the current one.
	NetNSFd int
	// BPFDir is the agent's --bpf-dir, where the eBPF classifier is
	// pinned; "" reads no classifier.
	BPFDir string
}

// Ruleset is the agent's state in one node's kernel.
type Ruleset struct {
	Table    string          `json:"table"`
	Exists   bool            `json:"exists"`
	Chains   []ChainDump     `json:"chains"`
	Sets     []SetDump       `json:"sets"`
	Counters []PolicyCounter `json:"counters"`
	IPRules  []string        `json:"ipRules"`
	Routes   []string        `json:"routes"`
	// BPF is the eBPF pod classifier under RulesetOptions.BPFDir (nil
	// when not asked for).
	BPF *BPFClassifier `json:"bpf,omitempty"`
	// RulePriority and the route table range, for the headings.
	RulePriority          int `json:"rulePriority"`
	FirstTable, LastTable int `json:"-"`
}

// ChainDump is one chain with its rules rendered.
type ChainDump struct {
	Name     string     `json:"name"`
	Type     string     `json:"type"`
	Hook     string     `json:"hook"`
	Priority string     `json:"priority"`
	Policy   string     `json:"policy"`
	Rules    []RuleDump `json:"rules"`
}

// RuleDump is one rule: its text in nft syntax and its comment.
type RuleDump struct {
	Handle  uint64 `json:"handle"`
	Text    string `json:"text"`
	Comment string `json:"comment,omitempty"`
}

// SetDump is one set and its elements.
type SetDump struct {
	Name     string   `json:"name"`
	Interval bool     `json:"interval"`
	Elements []string `json:"elements"`
}

// PolicyCounter is the counter of one policy's rule on this node.
type PolicyCounter struct {
	Policy  string `json:"policy"`
	Mode    string `json:"mode"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// ReadRuleset reads the agent's table, ip rules and routes from the kernel.
// It needs CAP_NET_ADMIN.
func ReadRuleset(ctx context.Context, o RulesetOptions) (*Ruleset, error) {
	rs := &Ruleset{Table: o.Table, Chains: []ChainDump{}, Sets: []SetDump{}, Counters: []PolicyCounter{},
		IPRules: []string{}, Routes: []string{}, RulePriority: o.RulePriority,
		FirstTable: o.RouteTableBase + 1, LastTable: o.RouteTableBase + selector.MaxMarkIndex(o.MarkMask)}
	t, err := nft.ReadTable(ctx, o.NetNSFd, o.Table)
	if err != nil {
		return nil, permissionHint(fmt.Errorf("read nftables table %s: %w", o.Table, err))
	}
	rs.Exists = t.Exists
	renderTable(t, rs)
	if err := readRouting(o, rs); err != nil {
		return nil, err
	}
	if o.BPFDir != "" {
		if rs.BPF, err = readBPF(o); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

func permissionHint(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w (run as root on the node, or in the agent's pod: kubectl -n egressnat-system exec <agent pod> -- /egressnatctl ruleset)", err)
	}
	return err
}

// renderTable renders a read of the table: chains with their rules, sets
// with their elements, and the counters of each policy's rules.
func renderTable(t *nft.Table, rs *Ruleset) {
	counters := map[[2]string]*PolicyCounter{}
	var order [][2]string
	for _, tc := range t.Chains {
		ch := tc.Chain
		cd := ChainDump{Name: ch.Name, Type: string(ch.Type), Rules: []RuleDump{}}
		if ch.Hooknum != nil {
			cd.Hook = hookName(*ch.Hooknum)
		}
		if ch.Priority != nil {
			cd.Priority = PriorityName(cd.Hook, int32(*ch.Priority))
		}
		if ch.Policy != nil {
			cd.Policy = "accept"
			if *ch.Policy == nftables.ChainPolicyDrop {
				cd.Policy = "drop"
			}
		}
		for _, r := range tc.Rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			cd.Rules = append(cd.Rules, RuleDump{Handle: r.Handle, Text: RenderRule(r.Exprs), Comment: comment})
			if pol, mode, ok := PolicyOfComment(comment); ok {
				k := [2]string{pol, mode}
				if counters[k] == nil {
					counters[k] = &PolicyCounter{Policy: pol, Mode: mode}
					order = append(order, k)
				}
				p, b := ruleCounter(r)
				counters[k].Packets += p
				counters[k].Bytes += b
			}
		}
		rs.Chains = append(rs.Chains, cd)
	}
	for _, k := range order {
		rs.Counters = append(rs.Counters, *counters[k])
	}
	for _, ts := range t.Sets {
		els := RenderElements(ts.Elements, ts.Set.Interval)
		if nft.MarkKeyed(ts.Set.Name) {
			els = RenderMarkElements(ts.Elements)
		}
		rs.Sets = append(rs.Sets, SetDump{Name: ts.Set.Name, Interval: ts.Set.Interval, Elements: els})
	}
}

func hookName(h nftables.ChainHook) string {
	switch h {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookInput:
		return "input"
	case *nftables.ChainHookForward:
		return "forward"
	case *nftables.ChainHookOutput:
		return "output"
	case *nftables.ChainHookPostrouting:
		return "postrouting"
	}
	return fmt.Sprintf("hook%d", h)
}

func netlinkHandle(fd int) (*netlink.Handle, error) {
	if fd > 0 {
		return netlink.NewHandleAt(netns.NsHandle(fd))
	}
	return netlink.NewHandle()
}

func readRouting(o RulesetOptions, rs *Ruleset) error {
	h, err := netlinkHandle(o.NetNSFd)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	rules, err := h.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Priority: o.RulePriority}, netlink.RT_FILTER_PRIORITY)
	if err != nil {
		return fmt.Errorf("list ip rules: %w", err)
	}
	slices.SortStableFunc(rules, func(a, b netlink.Rule) int { return a.Table - b.Table })
	for _, r := range rules {
		rs.IPRules = append(rs.IPRules, RenderIPRule(r))
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	slices.SortStableFunc(routes, func(a, b netlink.Route) int { return a.Table - b.Table })
	names := map[int]string{}
	for _, r := range routes {
		if r.Table < rs.FirstTable || r.Table > rs.LastTable {
			continue
		}
		if _, ok := names[r.LinkIndex]; !ok && r.LinkIndex > 0 {
			if l, err := h.LinkByIndex(r.LinkIndex); err == nil {
				names[r.LinkIndex] = l.Attrs().Name
			} else {
				names[r.LinkIndex] = fmt.Sprintf("if%d", r.LinkIndex)
			}
		}
		rs.Routes = append(rs.Routes, RenderRoute(r, names[r.LinkIndex]))
	}
	return nil
}

// RenderIPRule prints a rule as `ip rule` does.
func RenderIPRule(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d:\tfrom ", r.Priority)
	if r.Src != nil {
		b.WriteString(r.Src.String())
	} else {
		b.WriteString("all")
	}
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %s", r.Dst)
	}
	if r.Mark != 0 || r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
		if r.Mask != nil {
			fmt.Fprintf(&b, "/%#x", *r.Mask)
		}
	}
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.OifName != "" {
		fmt.Fprintf(&b, " oif %s", r.OifName)
	}
	fmt.Fprintf(&b, " lookup %d", r.Table)
	return b.String()
}

// RenderRoute prints a route as `ip route show table N` does, with its table.
func RenderRoute(r netlink.Route, dev string) string {
	dst := "default"
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 || !r.Dst.IP.IsUnspecified() {
			dst = r.Dst.String()
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table %d: %s", r.Table, dst)
	if r.Gw != nil {
		fmt.Fprintf(&b, " via %s", r.Gw)
	}
	if dev != "" {
		fmt.Fprintf(&b, " dev %s", dev)
	}
	if r.Src != nil {
		fmt.Fprintf(&b, " src %s", r.Src)
	}
	return b.String()
}

// WriteRuleset writes the ruleset readably: chains with their rules and
// comments, sets (at most maxElems elements each, 0 for all), per-policy
// counters, the eBPF classifier (its interfaces and map entries, at most
// maxElems of each), ip rules and routes.
func WriteRuleset(w io.Writer, rs *Ruleset, maxElems int) error {
	if !rs.Exists {
		fmt.Fprintf(w, "nftables: no table ip %s on this node (no policy or floating IP applied here, or the agent uses another --table)\n", rs.Table)
	} else {
		fmt.Fprintf(w, "nftables table ip %s\n", rs.Table)
		for _, ch := range rs.Chains {
			fmt.Fprintf(w, "\n  chain %s (type %s hook %s priority %s; policy %s)\n", ch.Name, ch.Type, ch.Hook, ch.Priority, ch.Policy)
			if len(ch.Rules) == 0 {
				fmt.Fprintln(w, "    (no rules)")
			}
			for _, r := range ch.Rules {
				fmt.Fprintf(w, "    %s", r.Text)
				if r.Comment != "" {
					fmt.Fprintf(w, "  # %s", r.Comment)
				}
				fmt.Fprintln(w)
			}
		}
		for _, s := range rs.Sets {
			kind := ""
			if s.Interval {
				kind = "interval, "
			}
			fmt.Fprintf(w, "\n  set %s (%s%d elements)\n", s.Name, kind, len(s.Elements))
			els := s.Elements
			more := 0
			if maxElems > 0 && len(els) > maxElems {
				els, more = els[:maxElems], len(els)-maxElems
			}
			for i := 0; i < len(els); i += 4 {
				fmt.Fprintf(w, "    %s\n", strings.Join(els[i:min(i+4, len(els))], ", "))
			}
			if more > 0 {
				fmt.Fprintf(w, "    ... and %d more (--all-elements shows them)\n", more)
			}
		}
		fmt.Fprintln(w)
		if len(rs.Counters) == 0 {
			fmt.Fprintln(w, "No policy rules on this node.")
		} else {
			tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
			fmt.Fprintln(tw, "POLICY\tMODE\tPACKETS\tBYTES")
			for _, c := range rs.Counters {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", c.Policy, c.Mode, c.Packets, c.Bytes)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
	}
	if rs.BPF != nil {
		writeBPF(w, rs.BPF, maxElems)
	}
	fmt.Fprintf(w, "\nip rules at priority %d\n", rs.RulePriority)
	if len(rs.IPRules) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	for _, r := range rs.IPRules {
		fmt.Fprintf(w, "  %s\n", r)
	}
	fmt.Fprintf(w, "\nroutes in tables %d-%d\n", rs.FirstTable, rs.LastTable)
	if len(rs.Routes) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	for _, r := range rs.Routes {
		fmt.Fprintf(w, "  %s\n", r)
	}
	return nil
}

// FloatingIPs returns the floating IPs the agent recorded in its table
// (set "floating") and the addresses its SNAT rules translate to.
func (rs *Ruleset) FloatingIPs() []netip.Addr {
	seen := map[netip.Addr]bool{}
	for _, s := range rs.Sets {
		if s.Name != "floating" {
			continue
		}
		for _, e := range s.Elements {
			if a, err := netip.ParseAddr(strings.SplitN(e, "/", 2)[0]); err == nil {
				seen[a] = true
			}
		}
	}
	for _, ch := range rs.Chains {
		for _, r := range ch.Rules {
			if _, after, ok := strings.Cut(r.Text, "snat to "); ok {
				if a, err := netip.ParseAddr(strings.Fields(after)[0]); err == nil {
					seen[a] = true
				}
			}
		}
	}
	out := make([]netip.Addr, 0, len(seen))
	for a := range seen {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// OpenNetNS opens a network namespace by name (under /run/netns) or path;
// "" returns -1, the current namespace.
func OpenNetNS(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	path := name
	if !strings.ContainsRune(name, '/') {
		path = filepath.Join("/run/netns", name)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	return fd, nil
}
