package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/egressnat/egressnat/test/cluster"
)

// The harness itself needs root and the lab (make badinput); these tests
// check its pure parts and run everywhere.

func TestCases(t *testing.T) {
	all := cases()
	if len(all) < 25 {
		t.Fatalf("%d inputs, want at least 25", len(all))
	}
	seen := map[string]bool{}
	for _, c := range all {
		if seen[c.Name] {
			t.Errorf("duplicate input %s", c.Name)
		}
		seen[c.Name] = true
		if c.YAML == "" && c.Apply == nil {
			t.Errorf("%s: no input", c.Name)
		}
		if (c.Apply == nil) != (c.Undo == nil) {
			t.Errorf("%s: Apply and Undo go together", c.Name)
		}
		for _, y := range []string{c.YAML, c.Setup} {
			if y == "" {
				continue
			}
			docs, err := cluster.SplitYAML([]byte(y))
			if err != nil {
				t.Errorf("%s: %v", c.Name, err)
				continue
			}
			for _, r := range refsOf(y) {
				if !strings.HasPrefix(r.Name, "bi-") {
					t.Errorf("%s: object %s is not named bi-* (the report check matches Event messages by name)", c.Name, r)
				}
			}
			if len(docs) == 0 {
				t.Errorf("%s: empty YAML", c.Name)
			}
		}
	}
}

func TestPolicyYAML(t *testing.T) {
	y := policyYAML(policySpec{name: "bi-x", dests: []string{"0.0.0.0/0"}})
	docs, err := cluster.SplitYAML([]byte(y))
	if err != nil || len(docs) != 1 {
		t.Fatalf("%v %d\n%s", err, len(docs), y)
	}
	spec := docs[0]["spec"].(map[string]any)
	if got := spec["gatewayRef"].(map[string]any)["name"]; got != baseGroup {
		t.Errorf("gatewayRef %v", got)
	}
	src := spec["sources"].([]any)[0].(map[string]any)
	if got := src["namespaceSelector"].(map[string]any)["matchLabels"].(map[string]any)["team"]; got != "sel" {
		t.Errorf("namespaceSelector %v", got)
	}
	docs, err = cluster.SplitYAML([]byte(policyYAML(policySpec{name: "bi-y", sources: manySources(16), dests: []string{"198.51.100.0/24"}})))
	if err != nil {
		t.Fatal(err)
	}
	srcs := docs[0]["spec"].(map[string]any)["sources"].([]any)
	ps := srcs[15].(map[string]any)["podSelector"].(map[string]any)
	if len(srcs) != 16 || len(ps["matchLabels"].(map[string]any)) != 16 || len(ps["matchExpressions"].([]any)) != 16 ||
		len(ps["matchExpressions"].([]any)[0].(map[string]any)["values"].([]any)) != 16 {
		t.Errorf("manySources(16) has not the CRD's maximums")
	}
	g, _ := cluster.SplitYAML([]byte(group("bi-e")))
	if ips := g[0]["spec"].(map[string]any)["floatingIPs"].([]any); len(ips) != 0 {
		t.Errorf("empty group lists %v", ips)
	}
}

func TestNormalizeNFT(t *testing.T) {
	in := `table ip egressnat {
	set src-a {
		type ipv4_addr
		elements = { 10.244.2.3, 10.244.0.2,
			     10.244.1.7 }
	}
	chain pre {
		ip saddr @src-a counter packets 12 bytes 840 meta mark set 0x100
	}
}`
	want := `table ip egressnat {
	set src-a {
		type ipv4_addr
		elements = { 10.244.0.2, 10.244.1.7, 10.244.2.3 }
	}
	chain pre {
		ip saddr @src-a counter meta mark set 0x100
	}
}`
	if got := normalizeNFT(in); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	swapped := strings.Replace(strings.Replace(in, "packets 12 bytes 840", "packets 99 bytes 1", 1),
		"10.244.2.3, 10.244.0.2", "10.244.0.2, 10.244.2.3", 1)
	if normalizeNFT(swapped) != want {
		t.Errorf("counters or element order change the normalized table")
	}
}

func TestCompareTraffic(t *testing.T) {
	probes := []probe{
		{name: "sel-w2 -> ext2", class: "sel", kind: "ext", ext: "ext2"},
		{name: "sel-w2 -> pod echo", class: "sel", kind: "pod"},
		{name: "node cp1 -> ext2", class: "node", kind: "ext", ext: "ext2"},
		{name: "app-w2 -> ext1", class: "app", kind: "ext", ext: "ext1"},
	}
	base := map[string]string{"sel-w2 -> ext2": "192.0.2.13", "sel-w2 -> pod echo": "10.244.2.2",
		"node cp1 -> ext2": "192.0.2.11", "app-w2 -> ext1": "192.0.2.13"}
	now := map[string]string{"sel-w2 -> ext2": "192.0.2.100", "sel-w2 -> pod echo": "192.0.2.100",
		"node cp1 -> ext2": "192.0.2.100", "app-w2 -> ext1": "fail: i/o timeout"}
	allow := map[string][]string{"sel/ext2": {"192.0.2.100"}, "app/ext1": {"fail"}}
	got := compareTraffic(probes, base, now, allow)
	if len(got) != 2 || !strings.Contains(got[0], "sel-w2 -> pod echo") || !strings.Contains(got[1], "node cp1 -> ext2") {
		t.Errorf("internal and node traffic have no allowances, external traffic of pods may: %q", got)
	}
	if got := compareTraffic(probes, base, now, nil); len(got) != 4 {
		t.Errorf("without allowances every change is harm: %q", got)
	}
}

func TestStateDiff(t *testing.T) {
	d := stateDiff(map[string]string{"w1": "a\nb\nc"}, map[string]string{"w1": "a\nc\nd"}, 4)
	if len(d) != 1 || d[0] != "w1: -b | +d" {
		t.Errorf("%q", d)
	}
}

func TestRejected(t *testing.T) {
	for _, s := range []string{
		`kubectl create -f -: exit status 1: The NetworkGatewayGroup "bi-zero" is invalid: spec.floatingIPs[0]: Invalid value: "string": must be a unicast address`,
		`kubectl create -f -: exit status 1: Error from server (Forbidden): error when creating "STDIN": admission webhook denied the request`,
	} {
		if !rejected(errors.New(s)) {
			t.Errorf("not a rejection: %s", s)
		}
	}
	if rejected(errors.New(`kubectl create -f -: exit status 1: The connection to the server 127.0.0.1:4000 was refused`)) {
		t.Error("an unreachable API server is no rejection")
	}
	r := result{name: "x", outcome: outHarmed, how: outUnreported, harms: []string{"while present: a"}}
	if got := r.line(); got != "badinput x: HARMED while present: a [input unreported]" {
		t.Errorf("%q", got)
	}
}

func TestRejection(t *testing.T) {
	err := errors.New(`kubectl create -f -: exit status 1: The NetworkGatewayGroup "bi-zero" is invalid: spec.floatingIPs[0]: Invalid value`)
	if got := rejection(err); got != `The NetworkGatewayGroup "bi-zero" is invalid: spec.floatingIPs[0]: Invalid value` {
		t.Errorf("%q", got)
	}
}
