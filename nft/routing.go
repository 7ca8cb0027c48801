package nft

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// routing owns the policy routing: the fwmark ip rules at our priority and
// the route tables they point to (one per next hop), and the sysctls a
// gateway needs.
type routing struct {
	cfg Config
	log *zap.Logger
}

// routeState is the policy routing egressnat holds in the kernel.
type routeState struct {
	rules  []netlink.Rule          // fwmark rules at our priority into our tables
	routes map[int][]netlink.Route // our tables
	owners map[netip.Addr]int      // next hop -> index, from default routes via the uplink
}

func (rt routing) tableFor(index int) int { return rt.cfg.RouteTableBase + index }

// ourTable reports whether table is one of ours and its index.
func (rt routing) ourTable(table int) (int, bool) {
	idx := table - rt.cfg.RouteTableBase
	return idx, idx >= 1 && idx <= selector.MaxMarkIndex(rt.cfg.MarkMask)
}

func retryDump[T any](f func() (T, error)) (T, error) {
	var v T
	var err error
	for range 5 {
		v, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

func (rt routing) read(h *netlink.Handle, uplinkIndex int) (*routeState, error) {
	rs := &routeState{routes: map[int][]netlink.Route{}, owners: map[netip.Addr]int{}}
	rules, err := retryDump(func() ([]netlink.Rule, error) {
		return h.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Priority: rt.cfg.RulePriority}, netlink.RT_FILTER_PRIORITY)
	})
	if err != nil {
		return nil, fmt.Errorf("list ip rules: %w", err)
	}
	for _, r := range rules {
		if _, ok := rt.ourTable(r.Table); ok {
			rs.rules = append(rs.rules, r)
		}
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		idx, ok := rt.ourTable(r.Table)
		if !ok {
			continue
		}
		rs.routes[r.Table] = append(rs.routes[r.Table], r)
		if isDefault(r.Dst) && r.LinkIndex == uplinkIndex && r.Gw != nil {
			if gw, ok := netip.AddrFromSlice(r.Gw.To4()); ok {
				if old, dup := rs.owners[gw]; !dup || idx < old {
					rs.owners[gw] = idx
				}
			}
		}
	}
	return rs, nil
}

func (rt routing) wantRoute(index int, nh netip.Addr, uplinkIndex int) *netlink.Route {
	return &netlink.Route{
		Family:    netlink.FAMILY_V4,
		Table:     rt.tableFor(index),
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw:        net.IP(nh.AsSlice()),
		LinkIndex: uplinkIndex,
		Scope:     netlink.SCOPE_UNIVERSE,
		Type:      unix.RTN_UNICAST,
		Protocol:  unix.RTPROT_STATIC,
	}
}

func (rt routing) wantRule(index int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = rt.cfg.RulePriority
	r.Mark = selector.MarkValue(rt.cfg.MarkMask, index)
	mask := rt.cfg.MarkMask
	r.Mask = &mask
	r.Table = rt.tableFor(index)
	return r
}

func routeMatches(r netlink.Route, nh netip.Addr, uplinkIndex int) bool {
	gw, _ := netip.AddrFromSlice(r.Gw.To4())
	return isDefault(r.Dst) && r.LinkIndex == uplinkIndex && gw == nh && r.Src == nil &&
		len(r.MultiPath) == 0 && (r.Type == unix.RTN_UNICAST || r.Type == 0)
}

func ruleMatches(r netlink.Rule, want *netlink.Rule) bool {
	return r.Table == want.Table && r.Mark == want.Mark && r.Mask != nil && *r.Mask == *want.Mask &&
		r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && !r.Invert &&
		r.Goto == -1 && r.IPProto == 0 && r.Dport == nil && r.Sport == nil && r.UIDRange == nil &&
		(r.Type == 0 || r.Type == unix.FR_ACT_TO_TBL)
}

// rpIndex is the mark index of the reverse-path table (0: none with this
// mask).
func (rt routing) rpIndex() int { return selector.RPMarkIndex(rt.cfg.MarkMask) }

// wantRPRoute routes p by the uplink in the reverse-path table: the route
// the strict reverse-path check of a packet rerouted here (marked
// rpMark in prerouting, src_valid_mark on the uplink) finds for its
// source. Only the check uses it: a packet rerouted here goes to an
// outside destination, which no route of this table covers.
//
// The reply table's routes have a next hop (via) and are used for
// forwarding: the replies to traffic rerouted here (marked in prerouting,
// ruleRPReply) go back to the node that sent it by the uplink.
func (rt routing) wantRPRoute(idx int, p rpRoute, uplinkIndex int) *netlink.Route {
	r := &netlink.Route{
		Family:    netlink.FAMILY_V4,
		Table:     rt.tableFor(idx),
		Dst:       &net.IPNet{IP: net.IP(p.dst.Addr().AsSlice()), Mask: net.CIDRMask(p.dst.Bits(), 32)},
		LinkIndex: uplinkIndex,
		Scope:     netlink.SCOPE_LINK,
		Type:      unix.RTN_UNICAST,
		Protocol:  unix.RTPROT_STATIC,
	}
	if p.via.IsValid() {
		r.Gw, r.Scope = net.IP(p.via.AsSlice()), netlink.SCOPE_UNIVERSE
	}
	return r
}

// rpRoute is a route of the reverse-path table: dst on the uplink, via a
// node when valid.
type rpRoute struct {
	dst netip.Prefix
	via netip.Addr
}

func rpRouteMatches(r netlink.Route, p rpRoute, uplinkIndex int) bool {
	if r.Dst == nil || r.LinkIndex != uplinkIndex || r.Src != nil || len(r.MultiPath) != 0 ||
		(r.Type != unix.RTN_UNICAST && r.Type != 0) {
		return false
	}
	if gw, _ := netip.AddrFromSlice(r.Gw.To4()); gw.Unmap() != p.via {
		return false
	}
	dst, ok := netip.AddrFromSlice(r.Dst.IP.To4())
	ones, _ := r.Dst.Mask.Size()
	return ok && netip.PrefixFrom(dst, ones) == p.dst
}

// wanted is the policy routing an Apply wants: a table per next hop
// (marks) and the reverse-path table (rp: its prefixes, none without).
type wanted struct {
	marks map[netip.Addr]int
	rp    []rpRoute
	reply []rpRoute
}

// replyIndex is the mark index of the reply table (0: none with this
// mask).
func (rt routing) replyIndex() int { return selector.ReplyMarkIndex(rt.cfg.MarkMask) }

// special are the reverse-path and reply tables a state wants, by mark
// index, with their routes.
func (rt routing) special(w wanted) map[int][]rpRoute {
	out := map[int][]rpRoute{}
	if idx := rt.rpIndex(); idx != 0 && len(w.rp) > 0 {
		out[idx] = w.rp
	}
	if idx := rt.replyIndex(); idx != 0 && len(w.reply) > 0 {
		out[idx] = w.reply
	}
	return out
}

// tables maps every wanted table to the test its routes must pass.
func (rt routing) tables(w wanted, uplinkIndex int) map[int]func(netlink.Route) bool {
	out := map[int]func(netlink.Route) bool{}
	for nh, idx := range w.marks {
		out[rt.tableFor(idx)] = func(r netlink.Route) bool {
			// The route RouteReplace repointed counts as ours too.
			return routeMatches(r, nh, uplinkIndex) || isDefault(r.Dst) && r.Priority == 0 && r.Tos == 0
		}
	}
	for idx, routes := range rt.special(w) {
		out[rt.tableFor(idx)] = func(r netlink.Route) bool {
			return slices.ContainsFunc(routes, func(p rpRoute) bool { return rpRouteMatches(r, p, uplinkIndex) })
		}
	}
	return out
}

// add adds or repoints the default route of every wanted next hop's
// table, the routes of the reverse-path table, and the missing fwmark
// rules. It removes nothing.
func (rt routing) add(h *netlink.Handle, rs *routeState, w wanted, uplinkIndex int, res *Result) error {
	nhs := make([]netip.Addr, 0, len(w.marks))
	for nh := range w.marks {
		nhs = append(nhs, nh)
	}
	slices.SortFunc(nhs, netip.Addr.Compare)
	for _, nh := range nhs {
		idx := w.marks[nh]
		table := rt.tableFor(idx)
		ok := false
		for _, r := range rs.routes[table] {
			if routeMatches(r, nh, uplinkIndex) {
				ok = true
			}
		}
		if !ok {
			if err := h.RouteReplace(rt.wantRoute(idx, nh, uplinkIndex)); err != nil {
				return fmt.Errorf("add route table %d via %s: %w", table, nh, err)
			}
			res.RoutesChanged++
			rt.log.Info("route added", zap.Int("table", table), zap.Stringer("gateway", nh))
		}
		if err := rt.addRule(h, rs, idx, zap.Stringer("gateway", nh), res); err != nil {
			return err
		}
	}
	special := rt.special(w)
	for _, idx := range slices.Sorted(maps.Keys(special)) {
		table := rt.tableFor(idx)
		what := "reverse-path check"
		if idx == rt.replyIndex() {
			what = "replies to rerouted traffic"
		}
		for _, p := range special[idx] {
			if slices.ContainsFunc(rs.routes[table], func(r netlink.Route) bool { return rpRouteMatches(r, p, uplinkIndex) }) {
				continue
			}
			if err := h.RouteReplace(rt.wantRPRoute(idx, p, uplinkIndex)); err != nil {
				return fmt.Errorf("add route table %d %s via %s: %w", table, p.dst, p.via, err)
			}
			res.RoutesChanged++
			rt.log.Info("route added", zap.Int("table", table), zap.Stringer("dst", p.dst), zap.Stringer("via", p.via), zap.String("for", what))
		}
		if err := rt.addRule(h, rs, idx, zap.String("for", what), res); err != nil {
			return err
		}
	}
	return nil
}

// addRule adds the fwmark rule of mark index idx when it is missing.
func (rt routing) addRule(h *netlink.Handle, rs *routeState, idx int, what zap.Field, res *Result) error {
	want := rt.wantRule(idx)
	for _, r := range rs.rules {
		if ruleMatches(r, want) {
			return nil
		}
	}
	if err := h.RuleAdd(want); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add ip rule fwmark %#x table %d: %w", want.Mark, want.Table, err)
	}
	res.IPRulesChanged++
	rt.log.Info("ip rule added", zap.Int("table", want.Table), zap.String("mark", fmt.Sprintf("%#x", want.Mark)), what)
	return nil
}

// removeStale deletes our rules and routes that w does not want. Call it
// after the nftables rules stopped producing the stale marks.
func (rt routing) removeStale(h *netlink.Handle, rs *routeState, w wanted, uplinkIndex int, res *Result) error {
	want := rt.tables(w, uplinkIndex)
	var errs []error
	for _, r := range rs.rules {
		idx, _ := rt.ourTable(r.Table)
		if _, ok := want[r.Table]; ok && ruleMatches(r, rt.wantRule(idx)) {
			continue
		}
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete ip rule table %d: %w", r.Table, err))
			continue
		}
		res.IPRulesChanged++
		rt.log.Info("ip rule deleted", zap.Int("table", r.Table), zap.String("mark", fmt.Sprintf("%#x", r.Mark)))
	}
	tables := make([]int, 0, len(rs.routes))
	for t := range rs.routes {
		tables = append(tables, t)
	}
	slices.Sort(tables)
	for _, table := range tables {
		keep := want[table]
		for _, r := range rs.routes[table] {
			if keep != nil && keep(r) {
				continue
			}
			if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete route table %d: %w", table, err))
				continue
			}
			res.RoutesChanged++
			rt.log.Info("route deleted", zap.Int("table", table), zap.Stringer("route", r))
		}
	}
	return errors.Join(errs...)
}

// gatewaySysctls are the settings a gateway node needs: no ICMP redirects
// (they would send pods' traffic past the gateway); liberal TCP window
// tracking, so that a flow conntrack picks up mid-stream after a failover is
// never marked invalid for a window it did not see open; and, on the uplink
// only, the packet's mark in the reverse-path check (src_valid_mark), so
// that strict rp_filter accepts the traffic other nodes reroute here (marked
// in prerouting, its source found by the reverse-path table) whatever route
// the pod network has for its source (an overlay device, another node).
// rp_filter itself is left as the host has it.
func (rt routing) gatewaySysctls() map[string]string {
	return map[string]string{
		"/proc/sys/net/ipv4/conf/all/send_redirects":                              "0",
		filepath.Join("/proc/sys/net/ipv4/conf", rt.cfg.Uplink, "send_redirects"): "0",
		"/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal":                     "1",
		filepath.Join("/proc/sys/net/ipv4/conf", rt.cfg.Uplink, "src_valid_mark"): "1",
	}
}

// gatewaySettings writes the gateway sysctls that differ and returns how
// many values it changed. With Config.SysctlRecordDir, the values before
// are recorded there first (RecordSysctls), for an uninstall to restore.
func (rt routing) gatewaySettings() (int, error) {
	changed := 0
	err := rt.cfg.inNetNS(func() error {
		var changes []SysctlChange
		for path, want := range rt.gatewaySysctls() {
			cur, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read %s: %w", path, err)
			}
			if string(bytes.TrimSpace(cur)) == want {
				continue
			}
			rel, _ := filepath.Rel(procSysNet, path)
			changes = append(changes, SysctlChange{Path: rel, Before: string(bytes.TrimSpace(cur)), Set: want})
		}
		if len(changes) > 0 && rt.cfg.SysctlRecordDir != "" {
			if err := RecordSysctls(rt.cfg.SysctlRecordDir, procSysNet, changes); err != nil {
				return err
			}
		}
		for _, c := range changes {
			path := filepath.Join(procSysNet, c.Path)
			if err := os.WriteFile(path, []byte(c.Set+"\n"), 0o644); err != nil {
				return fmt.Errorf("write %s: %w", path, err)
			}
			changed++
		}
		return nil
	})
	return changed, err
}

// procSysNet is where the net sysctls of the current network namespace are.
const procSysNet = "/proc/sys/net"

// DefaultRouteLink returns the name of the interface of the IPv4 default
// route in the current network namespace: the uplink when none is given
// (the agent's --uplink, egressnatctl prepare-node's).
func DefaultRouteLink() (string, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if isDefault(r.Dst) && r.LinkIndex > 0 {
			l, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("find the default route's link: %w", err)
			}
			return l.Attrs().Name, nil
		}
	}
	return "", errors.New("no IPv4 default route: pass --uplink")
}
