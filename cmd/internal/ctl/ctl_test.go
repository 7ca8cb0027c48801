package ctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TestGroupFlows: flows whose replies go to a floating IP they did not come
// from are grouped under it; others (unNATed, other addresses) are not.
func TestGroupFlows(t *testing.T) {
	fip := netip.MustParseAddr("192.0.2.100")
	other := netip.MustParseAddr("192.0.2.101")
	flows := []Flow{
		{Proto: "tcp", Source: ap("10.244.2.5:40002"), Destination: ap("203.0.113.10:8080"), ReplyTo: ap("192.0.2.100:40002"), State: "ESTABLISHED", Timeout: 431999},
		{Proto: "udp", Source: ap("10.244.1.3:5353"), Destination: ap("203.0.113.10:53"), ReplyTo: ap("192.0.2.100:5353"), Timeout: 29},
		{Proto: "tcp", Source: ap("192.0.2.100:22"), Destination: ap("192.0.2.1:5000"), ReplyTo: ap("192.0.2.100:22")},    // the node's own
		{Proto: "tcp", Source: ap("10.244.2.6:1000"), Destination: ap("198.51.100.1:80"), ReplyTo: ap("192.0.2.12:1000")}, // masqueraded
	}
	groups := GroupFlows(flows, []netip.Addr{other, fip})
	if len(groups) != 2 || groups[0].FloatingIP != other || groups[1].FloatingIP != fip {
		t.Fatalf("groups: %+v", groups)
	}
	if len(groups[0].Flows) != 0 || len(groups[1].Flows) != 2 || groups[1].Flows[0].Proto != "udp" {
		t.Fatalf("flows: %+v", groups)
	}
	var b bytes.Buffer
	if err := WriteFlowGroups(&b, groups); err != nil {
		t.Fatal(err)
	}
	want := `192.0.2.101: 0 flows

192.0.2.100: 2 flows
  PROTO   SOURCE             DESTINATION         SNAT TO             STATE         TIMEOUT
  udp     10.244.1.3:5353    203.0.113.10:53     192.0.2.100:5353    -             29s
  tcp     10.244.2.5:40002   203.0.113.10:8080   192.0.2.100:40002   ESTABLISHED   431999s
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := WriteFlowGroups(&b, nil); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "holds no floating IP") {
		t.Errorf("no groups: %q", b.String())
	}
}

// TestPrepareNode: every interface, all and default get send_redirects 0,
// conntrack liberal tracking 1; values already right are not written.
func TestPrepareNode(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"ipv4/conf/all/send_redirects":          "1",
		"ipv4/conf/default/send_redirects":      "1",
		"ipv4/conf/eth0/send_redirects":         "1",
		"ipv4/conf/lo/send_redirects":           "0",
		"ipv4/conf/eth0/src_valid_mark":         "0",
		"ipv4/conf/lo/src_valid_mark":           "0",
		"netfilter/nf_conntrack_tcp_be_liberal": "0",
	}
	for p, v := range files {
		path := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var out bytes.Buffer
	if err := PrepareNode(dir, "eth0", &out); err != nil {
		t.Fatal(err)
	}
	for p := range files {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		want := "0"
		if strings.HasPrefix(p, "netfilter") || p == "ipv4/conf/eth0/src_valid_mark" {
			want = "1" // src_valid_mark on the uplink only
		}
		if strings.TrimSpace(string(b)) != want {
			t.Errorf("%s = %q, want %s", p, b, want)
		}
	}
	if strings.Contains(out.String(), "lo/") || strings.Count(out.String(), "\n") != 5 {
		t.Errorf("changes reported:\n%s", out.String())
	}
	out.Reset()
	if err := PrepareNode(dir, "eth0", &out); err != nil || out.Len() != 0 {
		t.Errorf("second run changed %q (%v)", out.String(), err)
	}
	want := []SysctlWrite{
		{"ipv4/conf/all/send_redirects", "0"}, {"ipv4/conf/default/send_redirects", "0"},
		{"ipv4/conf/a/send_redirects", "0"}, {"ipv4/conf/b/send_redirects", "0"},
		{"ipv4/conf/b/src_valid_mark", "1"},
		{"netfilter/nf_conntrack_tcp_be_liberal", "1"},
	}
	if got := GatewaySysctls([]string{"b", "a"}, "b"); !slices.Equal(got, want) {
		t.Errorf("GatewaySysctls: %v", got)
	}
}

// TestInterleavedArgs: flags may come before, between or after the
// positional arguments; after --, everything is positional.
func TestInterleavedArgs(t *testing.T) {
	root := newApp("egressnatctl", io.Discard, io.Discard).command()
	explain, _, err := root.Find([]string{"explain"})
	if err != nil {
		t.Fatal(err)
	}
	if err := explain.ParseFlags([]string{"pod", "--to", "1.2.3.4", "ns/name", "-o", "json", "--", "-x"}); err != nil {
		t.Fatal(err)
	}
	to, _ := explain.Flags().GetString("to")
	o, _ := explain.Flags().GetString("output")
	if pos := explain.Flags().Args(); to != "1.2.3.4" || o != "json" || !slices.Equal(pos, []string{"pod", "ns/name", "-x"}) {
		t.Errorf("pos %v to %q o %q", pos, to, o)
	}
}

// TestUsageErrors: bad invocations exit 2 with a one-line reason; help 0.
func TestUsageErrors(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "absent")) // no context namespace
	for _, tc := range []struct {
		args []string
		code int
		want string // in the first line of stderr; for code 0, in stdout
	}{
		{nil, 2, "no command given"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"explain", "pod", "nons"}, 2, "want NAMESPACE/NAME"},
		{[]string{"explain", "node", "a/b"}, 2, "usage: explain pod"},
		{[]string{"explain", "pod", "a/b", "--to", "2001:db8::1"}, 2, "want an IPv4 address"},
		{[]string{"status", "-o", "xml"}, 2, "want table, json or yaml"},
		{[]string{"ruleset", "--mark-mask", "0"}, 2, "non-zero"},
		{[]string{"status", "--bogus"}, 2, "unknown flag: --bogus"},
		{[]string{"help"}, 0, "explain pod NAMESPACE/NAME"},
		{[]string{"status", "-h"}, 0, "Usage:\n  egressnatctl status [flags]"},
	} {
		var out, errOut bytes.Buffer
		code := Main(context.Background(), "egressnatctl", tc.args, &out, &errOut)
		first, _, _ := strings.Cut(errOut.String(), "\n")
		if tc.code == 0 {
			first = out.String()
		}
		if code != tc.code || !strings.Contains(first, tc.want) {
			t.Errorf("%v: code %d, stderr first line %q, stdout %q; want %d and %q", tc.args, code, first, out.String(), tc.code, tc.want)
		}
	}
}

func sel(kv ...string) v1.LabelSelector {
	m := map[string]v1.LabelValue{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = v1.LabelValue(kv[i+1])
	}
	return v1.LabelSelector{MatchLabels: m}
}

func policy(name, gw string, dests []string, sources ...v1.EgressSource) *v1.EgressNATPolicy {
	p := &v1.EgressNATPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.EgressNATPolicySpec{
		Sources: sources, Action: v1.ActionSNAT, GatewayRef: v1.GatewayRef{Namespace: "kube-system", Name: gw}}}
	for _, d := range dests {
		p.Spec.Destinations = append(p.Spec.Destinations, v1.EgressDestination{CIDR: d})
	}
	return p
}

// TestExplainAgreesWithSelector: for every pod, Explain's verdict per
// policy is the agents' predicate (CompiledPolicy.Selects), and a selected
// pod names the first matching source.
func TestExplainAgreesWithSelector(t *testing.T) {
	s := &Snapshot{
		Namespaces: map[string]map[string]string{"a": {"team": "a"}, "b": {"team": "b"}},
		PodPhases:  map[string]string{},
		Gateways: []*v1.NetworkGatewayGroup{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "gw"},
			Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: []string{"192.0.2.100"}},
			Status:     v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{"192.0.2.100": "n1"}},
		}},
		Policies: []*v1.EgressNATPolicy{
			policy("one", "gw", []string{"203.0.113.0/24"},
				v1.EgressSource{NamespaceSelector: sel("team", "a"), PodSelector: sel("app", "x")},
				v1.EgressSource{NamespaceSelector: sel(), PodSelector: sel("app", "y")}),
			policy("two", "gw", []string{"203.0.113.0/25"},
				v1.EgressSource{NamespaceSelector: sel("team", "b"), PodSelector: sel()}),
		},
	}
	ip := netip.MustParseAddr("10.244.0.1")
	for _, p := range []selector.Pod{
		{Namespace: "a", Name: "x", Node: "n1", IP: ip, Labels: map[string]string{"app": "x"}},
		{Namespace: "a", Name: "y", Node: "n2", IP: ip, Labels: map[string]string{"app": "y"}},
		{Namespace: "b", Name: "x", Node: "n2", IP: ip, Labels: map[string]string{"app": "x"}},
		{Namespace: "b", Name: "y", Node: "n2", IP: ip, Labels: map[string]string{"app": "y"}},
		{Namespace: "c", Name: "y", Node: "n2", IP: ip, Labels: map[string]string{"app": "y"}},
	} {
		s.Pods = append(s.Pods, p)
	}
	for _, p := range s.Pods {
		e, err := Explain(s, p.Namespace, p.Name, netip.MustParseAddr("203.0.113.5"))
		if err != nil {
			t.Fatal(err)
		}
		for i, pe := range e.Policies {
			cp, err := selector.Compile(s.Policies[i])
			if err != nil {
				t.Fatal(err)
			}
			nsLabels, ok := s.Namespaces[p.Namespace]
			want := ok && cp.Selects(p, nsLabels)
			if pe.Selected != want {
				t.Errorf("%s/%s policy %s: explain says %v, selector %v", p.Namespace, p.Name, pe.Policy, pe.Selected, want)
			}
			if pe.Selected != (pe.MatchedSource >= 0) {
				t.Errorf("%s/%s policy %s: selected %v but matched source %d", p.Namespace, p.Name, pe.Policy, pe.Selected, pe.MatchedSource)
			}
		}
	}
	explain := func(ns, name string, to netip.Addr) *Explanation {
		t.Helper()
		e, err := Explain(s, ns, name, to)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e := explain("a", "y", netip.Addr{})
	if e.Policies[0].MatchedSource != 1 || !strings.Contains(e.Policies[0].Effect, "routed from n2 to n1 (which holds it) and SNATed there") {
		t.Errorf("a/y: %+v", e.Policies[0])
	}
	e = explain("b", "y", netip.MustParseAddr("203.0.113.5"))
	if !strings.Contains(e.ToVerdict, "covered by 2 policies") || !strings.Contains(e.ToVerdict, "two applies (longest prefix, /25)") {
		t.Errorf("overlap: %s", e.ToVerdict)
	}
	e = explain("c", "y", netip.Addr{})
	if !strings.Contains(e.Verdict, "namespace c does not exist") {
		t.Errorf("missing namespace: %s", e.Verdict)
	}
	if _, err := Explain(s, "a", "nope", netip.Addr{}); err == nil || err.Error() != "pod a/nope not found" {
		t.Errorf("missing pod: %v", err)
	}
}

// TestWriteRuleset: the text layout of a ruleset read from a kernel.
func TestWriteRuleset(t *testing.T) {
	rs := &Ruleset{Table: "egressnat", Exists: true, RulePriority: 29000, FirstTable: 2701, LastTable: 2763,
		Chains: []ChainDump{{Name: "prerouting", Type: "filter", Hook: "prerouting", Priority: "mangle", Policy: "accept",
			Rules: []RuleDump{{Text: "ip saddr @src-web ip daddr @dst-web counter packets 1 bytes 84 drop", Comment: "policy web: drop"}}}},
		Sets:     []SetDump{{Name: "src-web", Elements: []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"}}},
		Counters: []PolicyCounter{{Policy: "web", Mode: "Drop", Packets: 1, Bytes: 84}},
		IPRules:  []string{"29000:\tfrom all fwmark 0x100/0x3f00 lookup 2701"},
	}
	var b bytes.Buffer
	if err := WriteRuleset(&b, rs, 5); err != nil {
		t.Fatal(err)
	}
	want := `nftables table ip egressnat

  chain prerouting (type filter hook prerouting priority mangle; policy accept)
    ip saddr @src-web ip daddr @dst-web counter packets 1 bytes 84 drop  # policy web: drop

  set src-web (6 elements)
    10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4
    10.0.0.5
    ... and 1 more (--all-elements shows them)

POLICY   MODE   PACKETS   BYTES
web      Drop   1         84

ip rules at priority 29000
  29000:	from all fwmark 0x100/0x3f00 lookup 2701

routes in tables 2701-2763
  (none)
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	if got := rs.FloatingIPs(); len(got) != 0 {
		t.Errorf("floating: %v", got)
	}
}

// TestExplainAgreesWithAgent: for every pod, on the pod's node, what
// Explain says of each policy (mode, egress IP, next hop, selection, the
// effect on the pod's traffic, which of overlapping policies applies) is
// what the agent of that node computes (selector.Desired) from the same
// objects: gateways held by the pod's node, by another node, by a node
// without an InternalIP, by no node with status.whenUnavailable Drop,
// unset or NodeIP, missing or unusable gateways, overlapping destinations;
// once with the agents' --fallback-to-node-ip off, once on (with the
// statuses an operator with the same flag writes).
func TestExplainAgreesWithAgent(t *testing.T) {
	t0 := metav1.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	web := v1.EgressSource{NamespaceSelector: sel("team", "a"), PodSelector: sel("app", "web")}
	group := func(name string, holders map[string]string, fips ...string) *v1.NetworkGatewayGroup {
		return &v1.NetworkGatewayGroup{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: name},
			Spec: v1.NetworkGatewayGroupSpec{FloatingIPs: fips}, Status: v1.NetworkGatewayGroupStatus{FloatingIPs: holders}}
	}
	pol := func(name, gw string, when v1.UnavailableAction, minutes int, dests ...string) *v1.EgressNATPolicy {
		p := policy(name, gw, dests, web)
		p.CreationTimestamp = metav1.NewTime(t0.Add(time.Duration(minutes) * time.Minute))
		p.Status.WhenUnavailable = when
		return p
	}
	nodeIPs := map[string]netip.Addr{
		"n1": netip.MustParseAddr("192.0.2.11"), "n2": netip.MustParseAddr("192.0.2.12"), "n3": netip.MustParseAddr("192.0.2.13"),
	}
	base := func() *Snapshot {
		return &Snapshot{
			Namespaces: map[string]map[string]string{"a": {"team": "a"}},
			PodPhases:  map[string]string{},
			NodeIPs:    nodeIPs,
			Gateways: []*v1.NetworkGatewayGroup{
				group("gw-n1", map[string]string{"192.0.2.101": "n1"}, "192.0.2.101"),
				group("gw-n2", map[string]string{"192.0.2.102": "n2", "192.0.2.112": "n1"}, "192.0.2.102", "192.0.2.112"),
				group("gw-none", nil, "192.0.2.103"),
				group("gw-n9", map[string]string{"192.0.2.109": "n9"}, "192.0.2.109"), // n9 has no InternalIP
				group("gw-empty", nil),
				group("gw-v6", nil, "2001:db8::1"),
			},
			Policies: []*v1.EgressNATPolicy{
				pol("gateway-n1", "gw-n1", v1.UnavailableDrop, 0, "203.0.113.0/24"),
				pol("reroute-n2", "gw-n2", v1.UnavailableDrop, 0, "198.51.100.0/24"),
				pol("drop", "gw-none", v1.UnavailableDrop, 0, "10.0.0.0/8"),
				pol("drop-unset", "gw-none", "", 0, "10.1.0.0/16"),
				pol("nodeip", "gw-none", v1.UnavailableNodeIP, 0, "172.16.0.0/12", "10.1.2.0/24"),
				pol("unreachable", "gw-n9", v1.UnavailableDrop, 0, "100.64.0.0/10"),
				pol("missing", "removed", v1.UnavailableDrop, 0, "192.168.0.0/16", "198.51.100.0/25"),
				pol("empty", "gw-empty", v1.UnavailableDrop, 0, "192.168.1.0/24"),
				pol("v6", "gw-v6", v1.UnavailableDrop, 0, "192.168.2.0/24"),
				pol("invalid", "gw-n1", v1.UnavailableDrop, 0, "203.0.113.0/33"),
				// Overlapping 203.0.113.0/24 and gateway-n1: longest prefix,
				// then oldest, then name.
				pol("wide", "gw-n2", v1.UnavailableDrop, 0, "203.0.113.0/24"),
				pol("narrow", "gw-none", v1.UnavailableDrop, 2, "203.0.113.0/25"),
				pol("twin", "gw-n2", v1.UnavailableDrop, 1, "203.0.113.0/25"),
				pol("host", "gw-none", v1.UnavailableNodeIP, 0, "203.0.113.200/32"),
			},
			Pods: []selector.Pod{
				{Namespace: "a", Name: "web-1", Node: "n1", IP: netip.MustParseAddr("10.244.1.5"), Labels: map[string]string{"app": "web"}},
				{Namespace: "a", Name: "web-2", Node: "n2", IP: netip.MustParseAddr("10.244.2.5"), Labels: map[string]string{"app": "web"}},
				{Namespace: "a", Name: "web-3", Node: "n3", IP: netip.MustParseAddr("10.244.3.5"), Labels: map[string]string{"app": "web"}},
				{Namespace: "a", Name: "db", Node: "n3", IP: netip.MustParseAddr("10.244.3.6"), Labels: map[string]string{"app": "db"}},
			},
		}
	}
	destinations := []string{"203.0.113.10", "203.0.113.200", "198.51.100.1", "10.1.2.3", "10.1.3.3", "10.2.0.1",
		"172.16.0.1", "100.64.0.1", "192.168.1.1", "192.168.2.1", "192.0.2.200"}

	for _, fallback := range []bool{false, true} {
		s := base()
		if fallback {
			for _, p := range s.Policies {
				p.Status.WhenUnavailable = v1.UnavailableNodeIP
			}
		}
		// What the agents must do, for web-3 on n3 (not a holder): every
		// case is met.
		want := map[string]string{"gateway-n1": "Reroute", "reroute-n2": "Reroute", "drop": "Drop", "drop-unset": "Drop",
			"nodeip": "", "unreachable": "Drop", "missing": "", "empty": "", "v6": "", "invalid": "",
			"wide": "Reroute", "narrow": "Drop", "twin": "Reroute", "host": ""}
		if fallback {
			for _, name := range []string{"drop", "drop-unset", "unreachable", "narrow"} {
				want[name] = ""
			}
		}
		byName := map[string]*v1.EgressNATPolicy{}
		for _, p := range s.Policies {
			byName[p.Name] = p
		}
		for _, pod := range s.Pods {
			in := selector.Input{Node: pod.Node, Policies: s.Policies, Groups: s.Gateways, Namespaces: s.Namespaces,
				Pods: s.Pods, NodeIPs: nodeIPs, FallbackToNodeIP: fallback}
			st, err := selector.Desired(in)
			if err != nil {
				t.Fatal(err)
			}
			agent := map[string]selector.PolicyState{}
			for _, ps := range st.Policies {
				agent[ps.Name] = ps
			}
			where := fmt.Sprintf("fallback %v, pod %s on %s", fallback, pod.Name, pod.Node)
			e, err := Explain(s, pod.Namespace, pod.Name, netip.Addr{})
			if err != nil {
				t.Fatal(err)
			}
			for _, pe := range e.Policies {
				ps, applied := agent[pe.Policy]
				if pod.Name == "web-3" && pe.Mode != want[pe.Policy] {
					t.Errorf("%s: policy %s: explain says mode %q, want %q", where, pe.Policy, pe.Mode, want[pe.Policy])
				}
				if (pe.Mode != "") != applied {
					t.Errorf("%s: policy %s: explain says mode %q, agent applies it: %v", where, pe.Policy, pe.Mode, applied)
					continue
				}
				if selected := applied && slices.Contains(ps.Sources, pod.IP); applied && pe.Selected != selected {
					t.Errorf("%s: policy %s: explain says selected %v, agent %v", where, pe.Policy, pe.Selected, selected)
				}
				if applied {
					nh := ""
					if ps.NextHop.IsValid() {
						nh = ps.NextHop.String()
					}
					if pe.Mode != string(ps.Mode) || pe.EgressIP != ps.EgressIP.String() || pe.NextHop != nh {
						t.Errorf("%s: policy %s: explain says %s %s via %q, agent %s %s via %q", where, pe.Policy,
							pe.Mode, pe.EgressIP, pe.NextHop, ps.Mode, ps.EgressIP, nh)
					}
				}
				if !pe.Selected {
					continue
				}
				var ok bool
				switch {
				case !applied:
					ok = strings.Contains(pe.Effect, "keeps the cluster's normal egress (the node IP)")
				case ps.Mode == selector.ModeDrop:
					ok = strings.HasPrefix(pe.Effect, "is dropped: ")
				default:
					ok = strings.HasPrefix(pe.Effect, "leaves with "+ps.EgressIP.String()+", ")
				}
				if !ok {
					t.Errorf("%s: policy %s: effect %q, agent applies it %v in mode %q", where, pe.Policy, pe.Effect, applied, ps.Mode)
				}
			}

			// Which policy applies to a destination: the winner among the
			// policies of the agent's state listing the pod and covering it.
			for _, d := range destinations {
				to := netip.MustParseAddr(d)
				e, err := Explain(s, pod.Namespace, pod.Name, to)
				if err != nil {
					t.Fatal(err)
				}
				var contenders []*v1.EgressNATPolicy
				for _, ps := range st.Policies {
					if slices.Contains(ps.Sources, pod.IP) && slices.ContainsFunc(ps.Destinations, func(p netip.Prefix) bool { return p.Contains(to) }) {
						contenders = append(contenders, byName[ps.Name])
					}
				}
				if len(contenders) == 0 {
					if !strings.HasSuffix(e.ToVerdict, "keeps the cluster's normal egress (the node IP)") || strings.Contains(e.ToVerdict, " applies (") {
						t.Errorf("%s, to %s: agent applies no policy, explain: %s", where, d, e.ToVerdict)
					}
					continue
				}
				w := selector.Winner(contenders, to)
				name := contenders[w.Index].Name
				if !strings.Contains(e.ToVerdict, "covered by policy "+name+" (") && !strings.Contains(e.ToVerdict, "; "+name+" applies (") {
					t.Errorf("%s, to %s: agent's winner is %s, explain: %s", where, d, name, e.ToVerdict)
				}
				if dropped := agent[name].Mode == selector.ModeDrop; dropped != strings.Contains(e.ToVerdict, "traffic to it is dropped") {
					t.Errorf("%s, to %s: winner %s in mode %s, explain: %s", where, d, name, agent[name].Mode, e.ToVerdict)
				}
			}
		}
	}

	// The overlap texts, for web-3 on n3 without fallback.
	s := base()
	for to, want := range map[string]string{
		"203.0.113.10":  "; twin applies (prefixes tie at /25; created first): traffic to it leaves with 192.0.2.102, routed from n3 to n2 (which holds it, next hop 192.0.2.12) and SNATed there",
		"203.0.113.200": "gateway-n1 (203.0.113.0/24, egress IP 192.0.2.101), wide (203.0.113.0/24, egress IP 192.0.2.102), host (203.0.113.200/32, egress IP 192.0.2.103, not applied); gateway-n1 applies (prefixes tie at /24, so do creation times; first by name)",
		"10.1.2.3":      "drop-unset applies (longest prefix, /16): traffic to it is dropped: no node holds the egress IP 192.0.2.103",
		"198.51.100.1":  "reroute-n2 applies (the only one applied)",
		"192.168.2.1":   "covered by 2 policies: missing (192.168.0.0/16, egress IP -, not applied), v6 (192.168.2.0/24, egress IP -, not applied); none of them is applied, so traffic to it keeps the cluster's normal egress (the node IP)",
		"172.16.0.1":    "covered by policy nodeip (172.16.0.0/12); traffic to it is not SNATed: no node holds the egress IP 192.0.2.103 and status.whenUnavailable is NodeIP, so it keeps",
		"100.64.0.1":    "traffic to it is dropped: n9 holds the egress IP 192.0.2.109 but has no InternalIP, so n3 cannot route to it",
	} {
		e, err := Explain(s, "a", "web-3", netip.MustParseAddr(to))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(e.ToVerdict, want) {
			t.Errorf("to %s: %s\nwant it to contain %s", to, e.ToVerdict, want)
		}
	}
}

// TestLoadNextHops: the InternalIPs of the nodes that status.floatingIPs
// names, as the agents read them; next hops unknown (nil) without the right
// to read Nodes.
func TestLoadNextHops(t *testing.T) {
	node := func(name string, addrs ...corev1.NodeAddress) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{Addresses: addrs}}
	}
	internal := func(ip string) corev1.NodeAddress {
		return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip}
	}
	s := &Snapshot{Gateways: []*v1.NetworkGatewayGroup{
		{Status: v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{"192.0.2.100": "n1", "192.0.2.101": "n2"}}},
		{Status: v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{"192.0.2.102": "n1", "192.0.2.103": "gone", "192.0.2.104": ""}}},
	}}
	core := k8sfake.NewClientset(
		node("n1", corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "203.0.113.1"}, internal("192.0.2.11")),
		node("n2"), // no InternalIP
		node("n3", internal("192.0.2.13")),
	)
	l := &Loader{Core: core, Host: "https://test"}
	if err := l.loadNextHops(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if want := map[string]netip.Addr{"n1": netip.MustParseAddr("192.0.2.11")}; !maps.Equal(s.NodeIPs, want) {
		t.Fatalf("NodeIPs %v, want %v", s.NodeIPs, want)
	}

	core.PrependReactor("get", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "n1", errors.New("no"))
	})
	s.NodeIPs = nil
	if err := l.loadNextHops(context.Background(), s); err != nil || s.NodeIPs != nil {
		t.Fatalf("forbidden: NodeIPs %v, err %v; want nil, nil", s.NodeIPs, err)
	}
	core.PrependReactor("get", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewInternalError(errors.New("etcd is down"))
	})
	if err := l.loadNextHops(context.Background(), s); err == nil || !strings.Contains(err.Error(), "etcd is down") {
		t.Fatalf("server error: %v", err)
	}
}

// TestExplainChecksGroups: with the agents' gateway namespaces known,
// explain checks the groups as the agents do: a gateway in a namespace
// they do not honour, or whose egress IP is a holder's own address, does
// not SNAT the pod.
func TestExplainChecksGroups(t *testing.T) {
	tenant := &v1.NetworkGatewayGroup{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "gw"},
		Spec:   v1.NetworkGatewayGroupSpec{FloatingIPs: []string{"192.0.2.150"}},
		Status: v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{"192.0.2.150": "n1"}}}
	typo := &v1.NetworkGatewayGroup{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "typo"},
		Spec:   v1.NetworkGatewayGroupSpec{FloatingIPs: []string{"192.0.2.12"}},
		Status: v1.NetworkGatewayGroupStatus{FloatingIPs: map[string]string{"192.0.2.12": "n2"}}}
	pol := func(name, ns, gw string) *v1.EgressNATPolicy {
		return &v1.EgressNATPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.EgressNATPolicySpec{
			Sources: []v1.EgressSource{{}}, Action: v1.ActionSNAT, Destinations: []v1.EgressDestination{{CIDR: "203.0.113.0/24"}},
			GatewayRef: v1.GatewayRef{Namespace: ns, Name: gw}}}
	}
	s := &Snapshot{
		Gateways:   []*v1.NetworkGatewayGroup{tenant, typo},
		Policies:   []*v1.EgressNATPolicy{pol("p-tenant", "team-a", "gw"), pol("p-typo", "kube-system", "typo")},
		Namespaces: map[string]map[string]string{"app": nil},
		Pods:       []selector.Pod{{Namespace: "app", Name: "web", Node: "n1", IP: netip.MustParseAddr("10.244.1.5")}},
		NodeIPs:    map[string]netip.Addr{"n1": netip.MustParseAddr("192.0.2.11"), "n2": netip.MustParseAddr("192.0.2.12")},
	}
	unchecked, err := Explain(s, "app", "web", netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	s.GatewayNamespaces = []string{"kube-system"}
	checked, err := Explain(s, "app", "web", netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"is ignored", "InternalIP of node n2"} {
		if strings.Contains(unchecked.Policies[i].Effect, "not SNATed") {
			t.Fatalf("unchecked %s: %q (the test proves nothing)", unchecked.Policies[i].Policy, unchecked.Policies[i].Effect)
		}
		if e := checked.Policies[i].Effect; !strings.Contains(e, "not SNATed") || !strings.Contains(e, want) {
			t.Errorf("%s: %q, want not SNATed and %q", checked.Policies[i].Policy, e, want)
		}
	}
}
