package nft

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/selector"
)

// routeState is the policy routing egressnat holds in the kernel.
type routeState struct {
	rules  []netlink.Rule          // fwmark rules at our priority into our tables
	routes map[int][]netlink.Route // our tables
	owners map[netip.Addr]int      // next hop -> index, from default routes via the uplink
}

func (d *Dataplane) tableFor(index int) int { return d.cfg.RouteTableBase + index }

// ourTable reports whether table is one of ours and its index.
func (d *Dataplane) ourTable(table int) (int, bool) {
	idx := table - d.cfg.RouteTableBase
	return idx, idx >= 1 && idx <= selector.MarkCapacity(d.cfg.MarkMask)
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

func (d *Dataplane) readRoutes(h *netlink.Handle, uplinkIndex int) (*routeState, error) {
	rs := &routeState{routes: map[int][]netlink.Route{}, owners: map[netip.Addr]int{}}
	rules, err := retryDump(func() ([]netlink.Rule, error) {
		return h.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Priority: d.cfg.RulePriority}, netlink.RT_FILTER_PRIORITY)
	})
	if err != nil {
		return nil, fmt.Errorf("list ip rules: %w", err)
	}
	for _, r := range rules {
		if _, ok := d.ourTable(r.Table); ok {
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
		idx, ok := d.ourTable(r.Table)
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

func (d *Dataplane) wantRoute(index int, nh netip.Addr, uplinkIndex int) *netlink.Route {
	return &netlink.Route{
		Family:    netlink.FAMILY_V4,
		Table:     d.tableFor(index),
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw:        net.IP(nh.AsSlice()),
		LinkIndex: uplinkIndex,
		Scope:     netlink.SCOPE_UNIVERSE,
		Type:      unix.RTN_UNICAST,
		Protocol:  unix.RTPROT_STATIC,
	}
}

func (d *Dataplane) wantRule(index int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = d.cfg.RulePriority
	r.Mark = selector.MarkValue(d.cfg.MarkMask, index)
	mask := d.cfg.MarkMask
	r.Mask = &mask
	r.Table = d.tableFor(index)
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
func (d *Dataplane) addRoutes(h *netlink.Handle, rs *routeState, marks map[netip.Addr]int, uplinkIndex int, res *Result) error {
	nhs := make([]netip.Addr, 0, len(marks))
	for nh := range marks {
		nhs = append(nhs, nh)
	}
	slices.SortFunc(nhs, netip.Addr.Compare)
	for _, nh := range nhs {
		idx := marks[nh]
		table := d.tableFor(idx)
		ok := false
		for _, r := range rs.routes[table] {
			if routeMatches(r, nh, uplinkIndex) {
				ok = true
			}
		}
		if !ok {
			if err := h.RouteReplace(d.wantRoute(idx, nh, uplinkIndex)); err != nil {
				return fmt.Errorf("add route table %d via %s: %w", table, nh, err)
			}
			res.RoutesChanged++
			d.log.Info("route added", zap.Int("table", table), zap.Stringer("gateway", nh))
		}
		want := d.wantRule(idx)
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
			d.log.Info("ip rule added", zap.Int("table", table), zap.String("mark", fmt.Sprintf("%#x", want.Mark)), zap.Stringer("gateway", nh))
		}
	}
	return nil
}

// removeStaleRoutes deletes our rules and routes that the wanted marks do not
// use. Call it after the nftables rules stopped producing the stale marks.
func (d *Dataplane) removeStaleRoutes(h *netlink.Handle, rs *routeState, marks map[netip.Addr]int, uplinkIndex int, res *Result) error {
	wantTable := map[int]netip.Addr{}
	for nh, idx := range marks {
		wantTable[d.tableFor(idx)] = nh
	}
	var errs []error
	for _, r := range rs.rules {
		idx, _ := d.ourTable(r.Table)
		if _, ok := wantTable[r.Table]; ok && ruleMatches(r, d.wantRule(idx)) {
			continue
		}
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete ip rule table %d: %w", r.Table, err))
			continue
		}
		res.IPRulesChanged++
		d.log.Info("ip rule deleted", zap.Int("table", r.Table), zap.String("mark", fmt.Sprintf("%#x", r.Mark)))
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
			d.log.Info("route deleted", zap.Int("table", table), zap.Stringer("route", r))
		}
	}
	return errors.Join(errs...)
}
