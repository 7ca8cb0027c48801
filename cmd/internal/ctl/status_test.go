package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"
)

// TestParseClassifier: the annotation egressnat.io/classifier is the
// backend, then after "; " why the eBPF backend asked for does not run.
func TestParseClassifier(t *testing.T) {
	for _, tc := range []struct{ in, backend, fallback string }{
		{"nft", "nft", ""},
		{"ebpf", "ebpf", ""},
		{"nft; ebpf unavailable: /sys/fs/bpf is not a bpffs", "nft", "ebpf unavailable: /sys/fs/bpf is not a bpffs"},
		// A reason may itself hold "; ": only the first separates.
		{"nft; load: a; b", "nft", "load: a; b"},
		{"", "", ""},
	} {
		b, f := ParseClassifier(tc.in)
		if b != tc.backend || f != tc.fallback {
			t.Errorf("ParseClassifier(%q) = %q, %q; want %q, %q", tc.in, b, f, tc.backend, tc.fallback)
		}
	}
}

func lease(ns, name string, annotations map[string]string) *coordinationv1.Lease {
	return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annotations}}
}

func classifier(v string) map[string]string { return map[string]string{kube.AnnotationClassifier: v} }

// TestLoadAgents: the agents' Leases of the namespace asked, by node (not
// the operators' leader Lease, nor Leases of another namespace); a
// Lease list the user may not read (the built-in view role) leaves the
// agents unknown with the reason, not an error.
func TestLoadAgents(t *testing.T) {
	core := k8sfake.NewClientset(
		lease("egressnat-system", "egressnat-agent-n1", classifier("ebpf")),
		lease("egressnat-system", "egressnat-agent-n2", nil),
		lease("egressnat-system", "egressnat-operator", nil),
		lease("other", "egressnat-agent-n3", classifier("nft")),
	)
	l := &Loader{Core: core, Host: "https://test"}
	s := &Snapshot{}
	l.LoadAgents(context.Background(), s, "egressnat-system")
	if s.AgentLeasesErr != "" || s.AgentNamespace != "egressnat-system" || len(s.AgentLeases) != 2 ||
		s.AgentLeases["n1"][kube.AnnotationClassifier] != "ebpf" || s.AgentLeases["n2"] != nil {
		t.Fatalf("leases %v, namespace %q, error %q", s.AgentLeases, s.AgentNamespace, s.AgentLeasesErr)
	}
	if _, ok := s.AgentLeases["n2"]; !ok {
		t.Errorf("n2 (a Lease without annotations) missing: %v", s.AgentLeases)
	}

	core.PrependReactor("list", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, "", errors.New("no"))
	})
	l.LoadAgents(context.Background(), s, "egressnat-system")
	if s.AgentLeases != nil || !strings.Contains(s.AgentLeasesErr, "forbidden") {
		t.Fatalf("forbidden: leases %v, error %q", s.AgentLeases, s.AgentLeasesErr)
	}
	r := BuildStatus(s)
	if len(r.Agents) != 0 || r.AgentsError != s.AgentLeasesErr {
		t.Errorf("forbidden: report agents %v, error %q", r.Agents, r.AgentsError)
	}
}

// TestStatusClassifiers: status shows which classifier each node's agent
// runs: in the report (JSON and YAML) per node with the reason of a
// fallback; in the table one row per backend with its nodes (at most
// eight names), the fallbacks' reasons below, grouped by reason; and
// why it cannot say when the Leases could not be read, or that there are
// none.
func TestStatusClassifiers(t *testing.T) {
	const bpffs = "ebpf unavailable: /sys/fs/bpf is not a bpffs"
	s := &Snapshot{AgentNamespace: "egressnat-system", AgentLeases: map[string]map[string]string{
		"w1":  classifier("ebpf"),
		"w2":  classifier("nft; " + bpffs),
		"w3":  classifier("nft; " + bpffs),
		"w4":  classifier("nft; ebpf unavailable: load classifier: operation not permitted"),
		"cp1": classifier("nft"),
		"old": nil,
	}}
	r := BuildStatus(s)
	want := []AgentReport{
		{Node: "cp1", Classifier: "nft"},
		{Node: "old"},
		{Node: "w1", Classifier: "ebpf"},
		{Node: "w2", Classifier: "nft", ClassifierFallback: bpffs},
		{Node: "w3", Classifier: "nft", ClassifierFallback: bpffs},
		{Node: "w4", Classifier: "nft", ClassifierFallback: "ebpf unavailable: load classifier: operation not permitted"},
	}
	if fmt.Sprint(r.Agents) != fmt.Sprint(want) {
		t.Fatalf("agents:\n%+v\nwant\n%+v", r.Agents, want)
	}

	var b bytes.Buffer
	if err := WriteStatus(&b, r, FormatYAML); err != nil {
		t.Fatal(err)
	}
	var back StatusReport
	if err := yaml.UnmarshalStrict(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(back.Agents) != fmt.Sprint(want) || back.AgentNamespace != "egressnat-system" {
		t.Errorf("YAML round trip: %+v", back)
	}

	b.Reset()
	if err := writeStatusTables(&b, r, time.Now()); err != nil {
		t.Fatal(err)
	}
	wantText := `No NetworkGatewayGroups.

No EgressNATPolicies.

CLASSIFIER       NODES
ebpf             w1
nft (fallback)   w2, w3, w4
nft              cp1
unknown          old

classifier nft instead of ebpf on w2, w3: ebpf unavailable: /sys/fs/bpf is not a bpffs
classifier nft instead of ebpf on w4: ebpf unavailable: load classifier: operation not permitted
`
	if b.String() != wantText {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), wantText)
	}

	// Many nodes: eight names, then how many more.
	many := &Snapshot{AgentLeases: map[string]map[string]string{}}
	for i := range 20 {
		many.AgentLeases[fmt.Sprintf("n%02d", i)] = classifier("ebpf")
	}
	b.Reset()
	if err := writeStatusTables(&b, BuildStatus(many), time.Now()); err != nil {
		t.Fatal(err)
	}
	if want := "ebpf         n00, n01, n02, n03, n04, n05, n06, n07 and 12 more\n"; !strings.Contains(b.String(), want) {
		t.Errorf("20 nodes:\n%s\nwant the line %q", b.String(), want)
	}

	// Leases not read (a snapshot of LoadAll alone): nothing of them.
	b.Reset()
	if r := BuildStatus(&Snapshot{}); r.Agents != nil {
		t.Errorf("not read: agents %v", r.Agents)
	} else if err := writeStatusTables(&b, r, time.Now()); err != nil || b.String() != "No NetworkGatewayGroups.\n\nNo EgressNATPolicies.\n" {
		t.Errorf("not read: %q, %v", b.String(), err)
	}
	if j, _ := json.Marshal(BuildStatus(&Snapshot{})); strings.Contains(string(j), "agent") {
		t.Errorf("not read: JSON %s", j)
	}

	for _, tc := range []struct {
		name string
		s    *Snapshot
		want string
	}{
		{"unreadable", &Snapshot{AgentNamespace: "egressnat-system", AgentLeasesErr: "leases is forbidden"},
			"\nClassifiers unknown: cannot read the agents' Leases in egressnat-system: leases is forbidden\n"},
		{"none", &Snapshot{AgentNamespace: "egns", AgentLeases: map[string]map[string]string{}},
			"\nNo agent Leases in egns (no agent runs, or they run in another namespace: -n).\n"},
	} {
		b.Reset()
		if err := writeStatusTables(&b, BuildStatus(tc.s), time.Now()); err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(b.String(), tc.want) {
			t.Errorf("%s:\n%s\nwant it to end with %q", tc.name, b.String(), tc.want)
		}
	}
}
