package ctl

import (
	"bytes"
	"context"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	WriteFlowGroups(&b, nil) //nolint:errcheck
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
	if err := PrepareNode(dir, &out); err != nil {
		t.Fatal(err)
	}
	for p := range files {
		b, _ := os.ReadFile(filepath.Join(dir, p))
		want := "0"
		if strings.HasPrefix(p, "netfilter") {
			want = "1"
		}
		if strings.TrimSpace(string(b)) != want {
			t.Errorf("%s = %q, want %s", p, b, want)
		}
	}
	if strings.Contains(out.String(), "lo/") || strings.Count(out.String(), "\n") != 4 {
		t.Errorf("changes reported:\n%s", out.String())
	}
	out.Reset()
	if err := PrepareNode(dir, &out); err != nil || out.Len() != 0 {
		t.Errorf("second run changed %q (%v)", out.String(), err)
	}
	want := []SysctlWrite{
		{"ipv4/conf/all/send_redirects", "0"}, {"ipv4/conf/default/send_redirects", "0"},
		{"ipv4/conf/a/send_redirects", "0"}, {"ipv4/conf/b/send_redirects", "0"},
		{"netfilter/nf_conntrack_tcp_be_liberal", "1"},
	}
	if got := GatewaySysctls([]string{"b", "a"}); !slices.Equal(got, want) {
		t.Errorf("GatewaySysctls: %v", got)
	}
}

func TestParseInterleaved(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	to := fs.String("to", "", "")
	o := fs.String("o", "", "")
	pos, err := parseInterleaved(fs, []string{"pod", "--to", "1.2.3.4", "ns/name", "-o", "json", "--", "-x"})
	if err != nil || *to != "1.2.3.4" || *o != "json" || !slices.Equal(pos, []string{"pod", "ns/name", "-x"}) {
		t.Errorf("pos %v to %q o %q err %v", pos, *to, *o, err)
	}
}

// TestUsageErrors: bad invocations exit 2 with a one-line reason; help 0.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "no command given"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"explain", "pod", "nons"}, 2, "want NAMESPACE/NAME"},
		{[]string{"explain", "node", "a/b"}, 2, "usage: explain pod"},
		{[]string{"explain", "pod", "a/b", "--to", "2001:db8::1"}, 2, "want an IPv4 address"},
		{[]string{"status", "-o", "xml"}, 2, "want table, json or yaml"},
		{[]string{"ruleset", "--mark-mask", "0"}, 2, "non-zero"},
		{[]string{"status", "--bogus"}, 2, "flag provided but not defined: -bogus"},
		{[]string{"help"}, 0, ""},
		{[]string{"status", "-h"}, 0, ""},
	} {
		var out, errOut bytes.Buffer
		code := Main(context.Background(), "egressnatctl", tc.args, &out, &errOut)
		first, _, _ := strings.Cut(errOut.String(), "\n")
		if code != tc.code || !strings.Contains(first, tc.want) {
			t.Errorf("%v: code %d, stderr first line %q; want %d and %q", tc.args, code, first, tc.code, tc.want)
		}
		if tc.code == 0 && !strings.Contains(out.String(), "explain pod NAMESPACE/NAME") {
			t.Errorf("%v: help not printed: %q", tc.args, out.String())
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
// policy is the agents' predicate (selector.PodSelected), and a selected
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
			nsLabels, ok := s.Namespaces[p.Namespace]
			want := ok && selector.PodSelected(p, nsLabels, s.Policies[i])
			if pe.Selected != want {
				t.Errorf("%s/%s policy %s: explain says %v, selector %v", p.Namespace, p.Name, pe.Policy, pe.Selected, want)
			}
			if pe.Selected != (pe.MatchedSource >= 0) {
				t.Errorf("%s/%s policy %s: selected %v but matched source %d", p.Namespace, p.Name, pe.Policy, pe.Selected, pe.MatchedSource)
			}
		}
	}
	e, _ := Explain(s, "a", "y", netip.Addr{})
	if e.Policies[0].MatchedSource != 1 || !strings.Contains(e.Policies[0].Effect, "routed from n2 to n1 (which holds it)") {
		t.Errorf("a/y: %+v", e.Policies[0])
	}
	e, _ = Explain(s, "b", "y", netip.MustParseAddr("203.0.113.5"))
	if !strings.Contains(e.ToVerdict, "covered by 2 policies") || !strings.Contains(e.ToVerdict, "not defined") {
		t.Errorf("overlap: %s", e.ToVerdict)
	}
	e, _ = Explain(s, "c", "y", netip.Addr{})
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
