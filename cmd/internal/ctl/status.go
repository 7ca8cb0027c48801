package ctl

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/selector"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/yaml"
)

// StatusReport is what `egressnatctl status` shows.
type StatusReport struct {
	Gateways []GatewayReport `json:"gateways"`
	Policies []PolicyReport  `json:"policies"`
	// Agents: each node's agent as its Lease in AgentNamespace says,
	// sorted by node (nil when the Leases were not read). AgentsError
	// says why they are unknown (the Leases could not be read: the
	// built-in view role does not read Leases).
	Agents         []AgentReport `json:"agents,omitempty"`
	AgentNamespace string        `json:"agentNamespace,omitempty"`
	AgentsError    string        `json:"agentsError,omitempty"`
}

// AgentReport is a node's agent as its Lease describes it.
type AgentReport struct {
	Node string `json:"node"`
	// Classifier is the pod classifier backend the agent runs: "nft" or
	// "ebpf"; "" when its Lease does not say (an agent of a version
	// before the eBPF classifier, which classifies with nftables).
	Classifier string `json:"classifier,omitempty"`
	// ClassifierFallback is why the eBPF backend the agent was asked for
	// (--classifier=ebpf) does not run, when it fell back to nft.
	ClassifierFallback string `json:"classifierFallback,omitempty"`
}

// Classifier backends (the agent's --classifier).
const (
	ClassifierNFT  = "nft"
	ClassifierEBPF = "ebpf"
)

// ParseClassifier splits the value of an agent Lease's annotation
// egressnat.io/classifier: the backend that runs, then after "; " why the
// eBPF backend asked for does not.
func ParseClassifier(v string) (backend, fallback string) {
	backend, fallback, _ = strings.Cut(v, ";")
	return strings.TrimSpace(backend), strings.TrimSpace(fallback)
}

// GatewayReport is one NetworkGatewayGroup as the operator reports it.
type GatewayReport struct {
	Namespace   string             `json:"namespace"`
	Name        string             `json:"name"`
	Ready       string             `json:"ready"` // True, False or Unknown
	Reason      string             `json:"reason,omitempty"`
	Message     string             `json:"message,omitempty"`
	FloatingIPs []FloatingIPReport `json:"floatingIPs"`
	Nodes       []NodeReport       `json:"nodes"`
	// Handovers are the planned moves under way (status.handovers).
	Handovers []v1.FloatingIPHandover `json:"handovers,omitempty"`
}

// FloatingIPReport is one floating IP and the node holding it ("" when
// none). Egress marks the first one: the egress IP of the gateway's
// policies.
type FloatingIPReport struct {
	IP           string `json:"ip"`
	Egress       bool   `json:"egress"`
	Holder       string `json:"holder,omitempty"`
	HolderHealth string `json:"holderHealth,omitempty"`
}

// NodeReport is a node's health as the operator reported it for a gateway.
type NodeReport struct {
	Node   string `json:"node"`
	Health string `json:"health"`
}

// PolicyReport is one EgressNATPolicy with its status and how many pods it
// selects now.
type PolicyReport struct {
	Name     string `json:"name"`
	Gateway  string `json:"gateway"`
	EgressIP string `json:"egressIP,omitempty"`
	Node     string `json:"node,omitempty"`
	Ready    string `json:"ready"` // True, False or Unknown
	Reason   string `json:"reason,omitempty"`
	Message  string `json:"message,omitempty"`
	// SelectedPods counts eligible pods (IPv4, not hostNetwork, not
	// terminated) that a source selects. -1 when the policy is invalid.
	SelectedPods int    `json:"selectedPods"`
	Invalid      string `json:"invalid,omitempty"`
}

// BuildStatus computes the status report of a snapshot. It is pure.
func BuildStatus(s *Snapshot) StatusReport {
	r := StatusReport{Gateways: []GatewayReport{}, Policies: []PolicyReport{}}
	for _, g := range s.Gateways {
		gr := GatewayReport{Namespace: g.Namespace, Name: g.Name, Ready: "Unknown",
			FloatingIPs: []FloatingIPReport{}, Nodes: []NodeReport{}}
		if c := apimeta.FindStatusCondition(g.Status.Conditions, "Ready"); c != nil {
			gr.Ready, gr.Reason, gr.Message = string(c.Status), c.Reason, c.Message
		}
		for i, ip := range g.Spec.FloatingIPs {
			fr := FloatingIPReport{IP: ip, Egress: i == 0, Holder: holderOf(g, ip)}
			if fr.Holder != "" {
				fr.HolderHealth = "Unknown"
				if h, ok := g.Status.Nodes[fr.Holder]; ok {
					fr.HolderHealth = string(h)
				}
			}
			gr.FloatingIPs = append(gr.FloatingIPs, fr)
		}
		for _, n := range sortedKeys(g.Status.Nodes) {
			gr.Nodes = append(gr.Nodes, NodeReport{Node: n, Health: string(g.Status.Nodes[n])})
		}
		gr.Handovers = slices.Clone(g.Status.Handovers)
		r.Gateways = append(r.Gateways, gr)
	}
	for _, p := range s.Policies {
		pr := PolicyReport{Name: p.Name, Gateway: p.Spec.GatewayRef.Namespace + "/" + p.Spec.GatewayRef.Name,
			EgressIP: p.Status.EgressIP, Node: p.Status.GatewayNode, Ready: "Unknown"}
		if c := apimeta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady); c != nil {
			pr.Ready, pr.Reason, pr.Message = string(c.Status), c.Reason, c.Message
		}
		cp, err := selector.Compile(p)
		if err != nil {
			pr.SelectedPods, pr.Invalid = -1, err.Error()
		} else {
			for _, pod := range s.Pods {
				nsLabels, ok := s.Namespaces[pod.Namespace]
				if ok && cp.Selects(pod, nsLabels) {
					pr.SelectedPods++
				}
			}
		}
		r.Policies = append(r.Policies, pr)
	}
	if s.AgentLeases == nil && s.AgentLeasesErr == "" {
		return r // not read: the report says nothing of the agents
	}
	r.Agents, r.AgentNamespace, r.AgentsError = []AgentReport{}, s.AgentNamespace, s.AgentLeasesErr
	for _, node := range sortedKeys(s.AgentLeases) {
		ar := AgentReport{Node: node}
		ar.Classifier, ar.ClassifierFallback = ParseClassifier(s.AgentLeases[node][kube.AnnotationClassifier])
		r.Agents = append(r.Agents, ar)
	}
	return r
}

// holderOf reads status.floatingIPs, whose keys the operator writes in
// canonical form.
func holderOf(g *v1.NetworkGatewayGroup, ip string) string {
	if h, ok := g.Status.FloatingIPs[ip]; ok {
		return h
	}
	if a, err := parseAddr(ip); err == nil {
		return g.Status.FloatingIPs[a.String()]
	}
	return ""
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Output formats.
const (
	FormatTable = "table"
	FormatJSON  = "json"
	FormatYAML  = "yaml"
)

// writeData writes v as indented JSON (FormatJSON) or YAML (FormatYAML);
// ok is false for any other format, which the caller writes.
func writeData(w io.Writer, v any, format string) (ok bool, err error) {
	var b []byte
	switch format {
	case FormatJSON:
		if b, err = json.MarshalIndent(v, "", "  "); err == nil {
			b = append(b, '\n')
		}
	case FormatYAML:
		b, err = yaml.Marshal(v)
	default:
		return false, nil
	}
	if err != nil {
		return true, err
	}
	_, err = w.Write(b)
	return true, err
}

// WriteStatus writes the report as aligned tables, JSON or YAML.
func WriteStatus(w io.Writer, r StatusReport, format string) error {
	if ok, err := writeData(w, r, format); ok {
		return err
	}
	switch format {
	case FormatTable, "":
		return writeStatusTables(w, r, time.Now())
	}
	return fmt.Errorf("unknown output format %q: want table, json or yaml", format)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func readyText(status, reason string) string {
	if reason == "" {
		return status
	}
	return status + " (" + reason + ")"
}

// writeStatusTables writes the tables; now dates the handovers.
func writeStatusTables(w io.Writer, r StatusReport, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	if len(r.Gateways) == 0 {
		fmt.Fprintln(tw, "No NetworkGatewayGroups.")
	} else {
		fmt.Fprintln(tw, "GATEWAY\tREADY\tFLOATING IP\tEGRESS\tHOLDER\tHOLDER HEALTH")
		for _, g := range r.Gateways {
			key := g.Namespace + "/" + g.Name
			for _, f := range g.FloatingIPs {
				egress := ""
				if f.Egress {
					egress = "yes"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", key, readyText(g.Ready, g.Reason), f.IP, dash(egress),
					orNone(f.Holder), dash(f.HolderHealth))
			}
		}
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "GATEWAY\tNODE\tHEALTH")
		for _, g := range r.Gateways {
			if len(g.Nodes) == 0 {
				fmt.Fprintf(tw, "%s/%s\t%s\t%s\n", g.Namespace, g.Name, "<none reported>", "-")
			}
			for _, n := range g.Nodes {
				fmt.Fprintf(tw, "%s/%s\t%s\t%s\n", g.Namespace, g.Name, n.Node, n.Health)
			}
		}
	}
	fmt.Fprintln(tw)
	if len(r.Policies) == 0 {
		fmt.Fprintln(tw, "No EgressNATPolicies.")
	} else {
		fmt.Fprintln(tw, "POLICY\tGATEWAY\tEGRESS IP\tNODE\tREADY\tPODS")
		for _, p := range r.Policies {
			pods := fmt.Sprint(p.SelectedPods)
			ready := readyText(p.Ready, p.Reason)
			if p.Invalid != "" {
				pods, ready = "-", "Invalid"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.Gateway, dash(p.EgressIP), orNone(p.Node), ready, pods)
		}
	}
	writeClassifiers(tw, r)
	if err := tw.Flush(); err != nil {
		return err
	}
	// Reasons for what is not ready, below the tables where they do not
	// stretch the columns.
	var notes []string
	for _, g := range r.Gateways {
		if g.Ready != "True" && g.Message != "" {
			notes = append(notes, fmt.Sprintf("gateway %s/%s: %s", g.Namespace, g.Name, g.Message))
		}
		for _, h := range g.Handovers {
			notes = append(notes, fmt.Sprintf("gateway %s/%s: handover %s", g.Namespace, g.Name, handoverText(h, now)))
		}
	}
	for _, p := range r.Policies {
		switch {
		case p.Invalid != "":
			notes = append(notes, fmt.Sprintf("policy %s: invalid: %s", p.Name, p.Invalid))
		case p.Ready != "True" && p.Message != "":
			notes = append(notes, fmt.Sprintf("policy %s: %s", p.Name, p.Message))
		}
	}
	notes = append(notes, fallbackNotes(r.Agents)...)
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, n)
		}
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "<none>"
	}
	return s
}

// maxNodeNames bounds the node names a line of the classifier table or a
// fallback note lists; -o yaml lists them all.
const maxNodeNames = 8

// classifierRow is the label of a node's row in the classifier table:
// its backend, "nft (fallback)" when it was asked for ebpf, "unknown"
// when its Lease does not say.
func classifierRow(a AgentReport) string {
	switch {
	case a.Classifier == "":
		return "unknown"
	case a.ClassifierFallback != "" && a.Classifier != ClassifierEBPF:
		return a.Classifier + " (fallback)"
	}
	return a.Classifier
}

// writeClassifiers writes which pod classifier each node's agent runs:
// one row per backend with its nodes (ebpf, nft after a fallback, nft,
// then anything else), or why that is unknown.
func writeClassifiers(w io.Writer, r StatusReport) {
	if r.Agents == nil && r.AgentsError == "" {
		return // not read
	}
	ns := r.AgentNamespace
	if ns == "" {
		ns = DefaultNamespace
	}
	fmt.Fprintln(w)
	switch {
	case r.AgentsError != "":
		fmt.Fprintf(w, "Classifiers unknown: cannot read the agents' Leases in %s: %s\n", ns, r.AgentsError)
		return
	case len(r.Agents) == 0:
		fmt.Fprintf(w, "No agent Leases in %s (no agent runs, or they run in another namespace: -n).\n", ns)
		return
	}
	nodes := map[string][]string{}
	for _, a := range r.Agents {
		row := classifierRow(a)
		nodes[row] = append(nodes[row], a.Node)
	}
	order := []string{ClassifierEBPF, ClassifierNFT + " (fallback)", ClassifierNFT}
	rank := func(row string) int {
		if i := slices.Index(order, row); i >= 0 {
			return i
		}
		if row == "unknown" {
			return len(order) + 1
		}
		return len(order) // another backend: a newer agent's
	}
	rows := sortedKeys(nodes)
	slices.SortStableFunc(rows, func(a, b string) int { return rank(a) - rank(b) })
	fmt.Fprintln(w, "CLASSIFIER\tNODES")
	for _, row := range rows {
		fmt.Fprintf(w, "%s\t%s\n", row, nodeList(nodes[row]))
	}
}

// fallbackNotes says, per reason, which nodes run nft instead of the ebpf
// they were asked for.
func fallbackNotes(agents []AgentReport) []string {
	type key struct{ backend, reason string }
	var keys []key
	nodes := map[key][]string{}
	for _, a := range agents {
		if a.ClassifierFallback == "" {
			continue
		}
		k := key{a.Classifier, a.ClassifierFallback}
		if nodes[k] == nil {
			keys = append(keys, k)
		}
		nodes[k] = append(nodes[k], a.Node)
	}
	slices.SortFunc(keys, func(a, b key) int {
		return cmp.Or(strings.Compare(a.backend, b.backend), strings.Compare(a.reason, b.reason))
	})
	var notes []string
	for _, k := range keys {
		what := "classifier " + k.backend + " instead of ebpf"
		if k.backend == ClassifierEBPF {
			what = "classifier ebpf"
		}
		notes = append(notes, fmt.Sprintf("%s on %s: %s", what, nodeList(nodes[k]), k.reason))
	}
	return notes
}

// nodeList is "a, b, c", at most maxNodeNames of them (then "and N more").
func nodeList(nodes []string) string {
	if len(nodes) <= maxNodeNames {
		return strings.Join(nodes, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(nodes[:maxNodeNames], ", "), len(nodes)-maxNodeNames)
}
