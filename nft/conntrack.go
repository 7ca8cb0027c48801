package nft

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
)

// ctMatcher says which conntrack entries an Apply invalidated.
type ctMatcher struct {
	// replyDst: entries whose reply goes to one of these addresses (flows
	// SNATed to a floating IP this node gave up).
	replyDst map[netip.Addr]bool
	// bySource: entries whose original source is the key and whose original
	// destination lies in one of the span sets (pods added to or removed
	// from a policy, or whose policy's destinations changed).
	bySource map[netip.Addr][]spanSet
	// gateways: entries of a policy this node newly serves as gateway that
	// are not SNATed to its egress IP (they were masqueraded, or null-bound
	// for rerouting, before).
	gateways []gatewayMatch
	// translated: entries whose original source is the key, whose original
	// destination lies in one of the span sets, and that are translated
	// (their reply does not go back to the source): masqueraded flows of
	// sources this node must reroute untranslated.
	translated map[netip.Addr][]spanSet
	// snatAllowed: for each floating IP this node holds, the (source,
	// destination) pairs its Gateway policies SNAT to it. An entry
	// translated to one of them that no such pair allows is stray: its
	// source left the policy (or the destination did) while an agent
	// crashed between the table change and the conntrack clean-up, and
	// conntrack would keep SNATing the flow to the floating IP. Set on the
	// first Apply only.
	snatAllowed map[netip.Addr][]gatewayMatch
	// untranslated: set on the first Apply only; see nullStray.
	untranslated *nullStray
}

// nullStray finds untranslated flows (a null binding: the node rerouted
// them to a gateway) from a cluster-internal source, not one of the node's
// own addresses, to a policy's destination, that the node no longer
// reroutes: a pod left a Reroute policy while an agent crashed between the
// table change and the conntrack clean-up. Conntrack would keep the flow
// untranslated, and its packets, no longer marked, would leave by the main
// route with the pod's own address.
type nullStray struct {
	internal, dests spanSet
	local           map[netip.Addr]bool
	reroute         map[netip.Addr][]spanSet // source -> its Reroute policies' destinations
}

func (n *nullStray) match(f *conntrack.Flow) bool {
	src, dst := f.TupleOrig.IP.SourceAddress, f.TupleOrig.IP.DestinationAddress
	if f.TupleReply.IP.DestinationAddress != src || f.TupleReply.IP.SourceAddress != dst {
		return false // translated (SNAT or DNAT)
	}
	if n.local[src] || !n.internal.contains(src) || !n.dests.contains(dst) {
		return false
	}
	for _, ss := range n.reroute[src] {
		if ss.contains(dst) {
			return false
		}
	}
	return true
}

func (m *ctMatcher) addTranslated(a netip.Addr, dests spanSet) {
	if len(dests) == 0 {
		return
	}
	if m.translated == nil {
		m.translated = map[netip.Addr][]spanSet{}
	}
	m.translated[a] = append(m.translated[a], dests)
}

type gatewayMatch struct {
	sources map[netip.Addr]bool
	dests   spanSet
	egress  netip.Addr
}

func (m *ctMatcher) empty() bool {
	return len(m.replyDst) == 0 && len(m.bySource) == 0 && len(m.gateways) == 0 && len(m.translated) == 0 &&
		len(m.snatAllowed) == 0 && m.untranslated == nil
}

func (m *ctMatcher) addSource(a netip.Addr, dests spanSet) {
	if len(dests) == 0 {
		return
	}
	if m.bySource == nil {
		m.bySource = map[netip.Addr][]spanSet{}
	}
	m.bySource[a] = append(m.bySource[a], dests)
}

func (m *ctMatcher) match(f *conntrack.Flow) bool {
	src := f.TupleOrig.IP.SourceAddress
	dst := f.TupleOrig.IP.DestinationAddress
	if m.replyDst[f.TupleReply.IP.DestinationAddress] {
		return true
	}
	for _, ss := range m.bySource[src] {
		if ss.contains(dst) {
			return true
		}
	}
	if f.TupleReply.IP.DestinationAddress != src {
		for _, ss := range m.translated[src] {
			if ss.contains(dst) {
				return true
			}
		}
	}
	for _, g := range m.gateways {
		if g.sources[src] && g.dests.contains(dst) && f.TupleReply.IP.DestinationAddress != g.egress {
			return true
		}
	}
	if m.untranslated != nil && m.untranslated.match(f) {
		return true
	}
	if allowed, held := m.snatAllowed[f.TupleReply.IP.DestinationAddress]; held && src != f.TupleReply.IP.DestinationAddress {
		for _, g := range allowed {
			if g.sources[src] && g.dests.contains(dst) {
				return false
			}
		}
		return true
	}
	return false
}

// conntrackCleaner owns the clean-up of conntrack entries a change made
// wrong; it runs only after the change succeeded.
type conntrackCleaner struct {
	cfg Config
}

func (ct conntrackCleaner) dial() (*conntrack.Conn, error) {
	cfg := &netlink.Config{}
	if !ct.cfg.inCurrentNetNS() {
		cfg.NetNS = ct.cfg.NetNSFd
	}
	return conntrack.Dial(cfg)
}

// flush deletes the IPv4 entries m matches and returns how many.
func (ct conntrackCleaner) flush(ctx context.Context, m *ctMatcher) (int, error) {
	if m.empty() {
		return 0, nil
	}
	c, err := ct.dial()
	if err != nil {
		return 0, fmt.Errorf("conntrack dial: %w", err)
	}
	defer c.Close()
	n := 0
	var errs []error
	err = eachFlow(ctx, c, func(f *conntrack.Flow) error {
		if !m.match(f) {
			return nil
		}
		deleted, err := deleteFlow(c, f)
		if err != nil {
			if errs = append(errs, err); len(errs) > 10 {
				return errors.Join(errs...)
			}
		}
		if deleted {
			n++
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	return n, errors.Join(errs...)
}
