package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/selector"
)

// TestRPPrefixes: the reverse-path table routes the cluster networks wider
// than one address, without those another covers.
func TestRPPrefixes(t *testing.T) {
	ps := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		in, want []netip.Prefix
	}{
		{nil, nil},
		{ps("192.0.2.11/32", "192.0.2.12/32"), nil},
		{ps("10.244.1.0/24", "10.244.0.0/16", "10.96.0.0/12", "192.0.2.11/32", "10.244.2.7/24"), ps("10.96.0.0/12", "10.244.0.0/16")},
		{ps("::ffff:10.1.0.0/112", "fd00::/64"), nil},
	}
	for _, tt := range tests {
		if got := rpPrefixes(tt.in); !slices.Equal(got, tt.want) {
			t.Errorf("rpPrefixes(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

// TestRPRules: a gateway marks the traffic rerouted to it in prerouting and
// clears the mark first in postrouting (before the null binding could take
// it for a reroute mark); a node that is no gateway, a one-bit mask, and
// the guard table have neither rule.
func TestRPRules(t *testing.T) {
	cfg, err := Config{Uplink: "eth0"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	gw := selector.NodeState{Policies: []selector.PolicyState{{Name: "web", Mode: selector.ModeGateway, EgressIP: a("192.0.2.100"),
		Destinations: []netip.Prefix{p("203.0.113.0/24")}}}}
	kinds := func(rs []rule) []ruleKind {
		var out []ruleKind
		for _, r := range rs {
			out = append(out, r.kind)
		}
		return out
	}
	rules := desiredRules(cfg, gw, nil, nil, false, false)
	pre, post := kinds(rules[chainPrerouting]), kinds(rules[chainPostrouting])
	if i := slices.Index(pre, ruleRPMark); i < 0 || i < slices.Index(pre, ruleInternalReturn) || i > slices.Index(pre, ruleDispatch) {
		t.Fatalf("prerouting %v: want the reverse-path mark after the internal return, before the dispatch", pre)
	}
	if len(post) == 0 || post[0] != ruleRPUnmark || slices.Index(post, ruleNullBinding) < 1 {
		t.Fatalf("postrouting %v: want the reverse-path mark cleared first", post)
	}
	for _, r := range rules[chainPrerouting] {
		if r.kind == ruleRPMark {
			if want := `ip saddr @internal iifname "eth0" fib daddr type != local meta mark set meta mark & 0xffffc0ff | 0x00003f00`; !strings.HasPrefix(r.String(), want) {
				t.Errorf("rule %s, want %s", r, want)
			}
		}
	}
	if m := selector.MarkValue(cfg.MarkMask, selector.RPMarkIndex(cfg.MarkMask)); m != 0x3f00 {
		t.Fatalf("reverse-path mark %#x", m)
	}

	reroute := selector.NodeState{Policies: []selector.PolicyState{{Name: "web", Mode: selector.ModeReroute, EgressIP: a("192.0.2.100"),
		NextHop: a("192.0.2.12"), Destinations: []netip.Prefix{p("203.0.113.0/24")}}}}
	oneBit := cfg
	oneBit.MarkMask = 0x100
	for name, rs := range map[string]map[string][]rule{
		"no gateway":    desiredRules(cfg, reroute, map[netip.Addr]int{a("192.0.2.12"): 1}, nil, false, false),
		"one-bit mask":  desiredRules(oneBit, gw, nil, nil, false, false),
		"guard table":   desiredRules(cfg, selector.NodeState{}, nil, nil, true, false),
		"empty gateway": desiredRules(cfg, selector.NodeState{FloatingIPs: []netip.Prefix{p("192.0.2.100/24")}}, nil, nil, false, false),
	} {
		all := append(kinds(rs[chainPrerouting]), kinds(rs[chainPostrouting])...)
		if slices.Contains(all, ruleRPMark) || slices.Contains(all, ruleRPUnmark) {
			t.Errorf("%s: reverse-path rules %v", name, all)
		}
	}
}

// overlayLab turns the release lab into the case strict reverse-path
// filtering breaks: the gateway reaches the remote pod's network through a
// VXLAN overlay device (as flannel's bridge + VXLAN mode does), not the
// uplink the rerouted packets come in on, and rp_filter is strict on it
// (the RHEL default).
func (l *relLab) overlayLab() {
	l.t.Helper()
	l.ip("gw", "link", "add", "enat-rel-vx", "type", "vxlan", "id", "42", "local", relGW, "remote", relPeer, "dstport", "4789", "dev", relUplink)
	l.ip("gw", "link", "set", "enat-rel-vx", "up")
	l.ip("gw", "route", "add", "10.244.3.0/24", "dev", "enat-rel-vx")
	l.ip("peer", "link", "add", "enat-rel-vx", "type", "vxlan", "id", "42", "local", relPeer, "remote", relGW, "dstport", "4789", "dev", relUplink)
	l.ip("peer", "link", "set", "enat-rel-vx", "up")
	l.ip("peer", "route", "add", "10.244.2.0/24", "dev", "enat-rel-vx")
	for _, k := range []string{"all", "default", relUplink, "enat-rel-vx", "enat-rel-c"} {
		l.exec("gw", "sysctl", "-qw", "net.ipv4.conf."+k+".rp_filter=1")
	}
}

func (l *relLab) sysctl(role, key string) string {
	l.t.Helper()
	return strings.TrimSpace(l.exec(role, "sysctl", "-n", key))
}

// TestStrictRPFilterOverlay: under strict rp_filter, with the remote pod's
// network behind an overlay device, the gateway drops every packet other
// nodes reroute to it (the reverse path of their source is not the uplink
// they came in by). With egressnat's reverse-path mark (src_valid_mark on
// the uplink, a table routing the cluster networks by the uplink for that
// mark only) they leave with the floating IP; rp_filter stays strict, the
// node's own pods and the drop of unknown rerouted sources are unchanged,
// and a cleanup removes the table, its rule and the rules.
func TestStrictRPFilterOverlay(t *testing.T) {
	l := newRelLab(t)
	seen := l.udpServers()
	l.rerouteFromPeer()
	l.overlayLab()
	unknownPod := "10.244.3.6" // on the peer, selected by no policy of the gateway
	l.ip("peer", "addr", "add", unknownPod+"/32", "dev", "lo")

	// Without egressnat: strict rp_filter drops the rerouted traffic
	// (the CNI's masquerade never sees it).
	l.expectRerouted(seen, 7000, relServer1, "")

	d := l.dataplane(-1)
	web := relGateway("web", relFloat1, relServer1+"/32")
	web.Sources = append(web.Sources, netip.MustParseAddr(remotePod))
	st := selector.NodeState{
		Policies:    []selector.PolicyState{web},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix(relFloat1 + "/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix(relPeer + "/32")},
	}
	mustApply(t, d, st)
	mustVerify(t, d, "after apply")
	l.expectRerouted(seen, 7001, relServer1, relFloat1)
	l.expectRerouted(seen, 7002, relServer1, relFloat1) // and again: not a first-packet accident
	// A rerouted source no gateway rule SNATs: dropped, never masqueraded.
	l.sendFrom("peer", unknownPod, 7003, relServer1)
	select {
	case got := <-seen[relServer1]:
		t.Fatalf("an unknown rerouted source left as %s: want it dropped", got)
	case <-time.After(relWaitLeak):
	}
	// The node's own pod: SNATed by the policy, its other traffic
	// masqueraded by the CNI as before.
	l.expectFrom(seen, 7004, relServer1, relFloat1)
	l.expectFrom(seen, 7005, relServer3, relGW)

	for _, k := range []string{"all", relUplink} {
		if v := l.sysctl("gw", "net.ipv4.conf."+k+".rp_filter"); v != "1" {
			t.Errorf("rp_filter of %s is %s: egressnat must leave it strict", k, v)
		}
	}
	if v := l.sysctl("gw", "net.ipv4.conf."+relUplink+".src_valid_mark"); v != "1" {
		t.Errorf("src_valid_mark of the uplink is %s, want 1", v)
	}
	if v := l.sysctl("gw", "net.ipv4.conf.all.src_valid_mark"); v != "0" {
		t.Errorf("src_valid_mark of all is %s: egressnat sets it on the uplink only", v)
	}
	rpTable := fmt.Sprint(selector.DefaultRouteTableBase + selector.RPMarkIndex(selector.DefaultMarkMask))
	if out := l.ip("gw", "-4", "route", "show", "table", rpTable); !strings.Contains(out, "10.244.0.0/16 dev "+relUplink) ||
		!strings.Contains(out, "10.96.0.0/12 dev "+relUplink) || strings.Contains(out, relPeer) {
		t.Errorf("reverse-path table %s:\n%s", rpTable, out)
	}
	if out := l.ip("gw", "-4", "rule", "show"); !strings.Contains(out, "fwmark 0x3f00/0x3f00 lookup "+rpTable) {
		t.Errorf("no reverse-path rule:\n%s", out)
	}

	// No longer a gateway: the reverse-path table and rule go, the rules too.
	st.Policies, st.FloatingIPs = nil, nil
	mustApply(t, d, st)
	if out := l.ip("gw", "-4", "route", "show", "table", "all"); strings.Contains(out, "table "+rpTable) {
		t.Errorf("reverse-path routes left:\n%s", out)
	}
	if out := l.ip("gw", "-4", "rule", "show"); strings.Contains(out, "lookup "+rpTable) {
		t.Errorf("reverse-path rule left:\n%s", out)
	}
	l.expectRerouted(seen, 7006, relServer1, "")
	if err := d.Cleanup(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}
