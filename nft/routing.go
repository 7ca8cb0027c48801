package nft

import (
	"bytes"
	"errors"
	"fmt"
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
	return idx, idx >= 1 && idx <= selector.MarkCapacity(rt.cfg.MarkMask)
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

// addRoutes adds or repoints the default route of every wanted table and adds
// the missing fwmark rules. It removes nothing.
func (rt routing) add(h *netlink.Handle, rs *routeState, marks map[netip.Addr]int, uplinkIndex int, res *Result) error {
	nhs := make([]netip.Addr, 0, len(marks))
	for nh := range marks {
		nhs = append(nhs, nh)
	}
	slices.SortFunc(nhs, netip.Addr.Compare)
	for _, nh := range nhs {
		idx := marks[nh]
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
		want := rt.wantRule(idx)
		found := false
		for _, r := range rs.rules {
			if ruleMatches(r, want) {
				found = true
			}
		}
		if !found {
			if err := h.RuleAdd(want); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add ip rule fwmark %#x table %d: %w", want.Mark, table, err)
			}
			res.IPRulesChanged++
			rt.log.Info("ip rule added", zap.Int("table", table), zap.String("mark", fmt.Sprintf("%#x", want.Mark)), zap.Stringer("gateway", nh))
		}
	}
	return nil
}

// removeStaleRoutes deletes our rules and routes that the wanted marks do not
// use. Call it after the nftables rules stopped producing the stale marks.
func (rt routing) removeStale(h *netlink.Handle, rs *routeState, marks map[netip.Addr]int, uplinkIndex int, res *Result) error {
	wantTable := map[int]netip.Addr{}
	for nh, idx := range marks {
		wantTable[rt.tableFor(idx)] = nh
	}
	var errs []error
	for _, r := range rs.rules {
		idx, _ := rt.ourTable(r.Table)
		if _, ok := wantTable[r.Table]; ok && ruleMatches(r, rt.wantRule(idx)) {
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
		nh, wanted := wantTable[table]
		for _, r := range rs.routes[table] {
			if wanted && routeMatches(r, nh, uplinkIndex) {
				continue
			}
			if wanted && isDefault(r.Dst) && r.Priority == 0 && r.Tos == 0 {
				continue // the route RouteReplace repointed
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
// (they would send pods' traffic past the gateway) and liberal TCP window
// tracking, so that a flow conntrack picks up mid-stream after a failover is
// never marked invalid for a window it did not see open.
func (rt routing) gatewaySysctls() map[string]string {
	return map[string]string{
		"/proc/sys/net/ipv4/conf/all/send_redirects":                              "0",
		filepath.Join("/proc/sys/net/ipv4/conf", rt.cfg.Uplink, "send_redirects"): "0",
		"/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal":                     "1",
	}
}

// gatewaySettings writes the gateway sysctls that differ and returns how
// many values it changed.
func (rt routing) gatewaySettings() (int, error) {
	changed := 0
	err := rt.cfg.inNetNS(func() error {
		for path, want := range rt.gatewaySysctls() {
			cur, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read %s: %w", path, err)
			}
			if string(bytes.TrimSpace(cur)) == want {
				continue
			}
			if err := os.WriteFile(path, []byte(want+"\n"), 0o644); err != nil {
				return fmt.Errorf("write %s: %w", path, err)
			}
			changed++
		}
		return nil
	})
	return changed, err
}
