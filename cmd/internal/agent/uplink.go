package agent

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressnat/egressnat/nft"
)

// Uplink returns the uplink interface (name, or the interface of the IPv4
// default route when name is empty) and its own IPv4 subnets: primary
// addresses with their prefix length. Floating IPs, added as secondary
// addresses, are not among them. See UplinkGateways for its routers.
func Uplink(name string) (string, []netip.Prefix, error) {
	var link netlink.Link
	var err error
	if name != "" {
		if link, err = netlink.LinkByName(name); err != nil {
			return "", nil, fmt.Errorf("find uplink %s: %w", name, err)
		}
	} else {
		def, err := nft.DefaultRouteLink()
		if err != nil {
			return "", nil, err
		}
		if link, err = netlink.LinkByName(def); err != nil {
			return "", nil, fmt.Errorf("find uplink %s: %w", def, err)
		}
	}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return "", nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if a.Flags&unix.IFA_F_SECONDARY != 0 {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, ones))
	}
	if len(out) == 0 {
		return "", nil, fmt.Errorf("uplink %s has no IPv4 address", link.Attrs().Name)
	}
	return link.Attrs().Name, out, nil
}

// UplinkGateways returns the gateways of the IPv4 default routes through
// the uplink (usually one), sorted: no floating IP may be one of them.
func UplinkGateways(uplink string) ([]netip.Addr, error) {
	link, err := netlink.LinkByName(uplink)
	if err != nil {
		return nil, fmt.Errorf("find uplink %s: %w", uplink, err)
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN, LinkIndex: link.Attrs().Index},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_OIF)
	if err != nil {
		return nil, fmt.Errorf("list routes of %s: %w", uplink, err)
	}
	var out []netip.Addr
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() != "0.0.0.0/0" {
			continue
		}
		if gw, ok := netip.AddrFromSlice(r.Gw.To4()); ok {
			out = append(out, gw)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}
