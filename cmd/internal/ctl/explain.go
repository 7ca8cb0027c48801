package ctl

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// Explanation says which policies select a pod and why, what happens to
// its traffic, and optionally to one destination.
type Explanation struct {
	Pod       string            `json:"pod"`
	Node      string            `json:"node,omitempty"`
	IP        string            `json:"ip,omitempty"`
	Phase     string            `json:"phase,omitempty"`
	PodLabels map[string]string `json:"podLabels,omitempty"`
	// NamespaceLabels of the pod's namespace; NamespaceMissing when the
	// namespace does not exist (its pods are never selected).
	NamespaceLabels  map[string]string `json:"namespaceLabels,omitempty"`
	NamespaceMissing bool              `json:"namespaceMissing,omitempty"`
	// Ineligible says why no policy can select the pod ("" when it can).
	Ineligible string              `json:"ineligible,omitempty"`
	Policies   []PolicyExplanation `json:"policies"`
	// To is the destination asked about, ToVerdict what happens to it.
	To        string `json:"to,omitempty"`
	ToVerdict string `json:"toVerdict,omitempty"`
	// Verdict is the one-line summary.
	Verdict string `json:"verdict"`
}

// PolicyExplanation is one policy's view of the pod.
type PolicyExplanation struct {
	Policy   string `json:"policy"`
	Invalid  string `json:"invalid,omitempty"`
	Selected bool   `json:"selected"`
	// MatchedSource is the index of the first source that selects the pod,
	// -1 when none does.
	MatchedSource int                 `json:"matchedSource"`
	Sources       []SourceExplanation `json:"sources"`
	Gateway       string              `json:"gateway"`
	GatewayFound  bool                `json:"gatewayFound"`
	EgressIP      string              `json:"egressIP,omitempty"`
	Holder        string              `json:"holder,omitempty"`
	Ready         string              `json:"ready"`
	Reason        string              `json:"reason,omitempty"`
	Destinations  []string            `json:"destinations"`
	// Mode is how the agent of the pod's node applies the policy
	// (selector.Decide): Gateway, Reroute or Drop; "" when it leaves the
	// policy out (invalid, no usable gateway, or no reachable holder and
	// status.whenUnavailable NodeIP).
	Mode string `json:"mode,omitempty"`
	// NextHop is the holder's InternalIP the pod's node routes to (Reroute;
	// "" when the Nodes could not be read).
	NextHop string `json:"nextHop,omitempty"`
	// Effect is what happens to the selected pod's traffic to the
	// destinations ("" when the policy does not select the pod).
	Effect string `json:"effect,omitempty"`
	// Covers is the longest destination CIDR containing To ("" when none
	// does or no To was given).
	Covers string `json:"covers,omitempty"`
}

// SourceExplanation is one source of a policy: does each selector match,
// and which requirements fail.
type SourceExplanation struct {
	Index             int      `json:"index"`
	NamespaceSelector string   `json:"namespaceSelector"`
	NamespaceMatches  bool     `json:"namespaceMatches"`
	NamespaceFailed   []string `json:"namespaceFailed,omitempty"`
	PodSelector       string   `json:"podSelector"`
	PodMatches        bool     `json:"podMatches"`
	PodFailed         []string `json:"podFailed,omitempty"`
}

// Explain explains the selection of pod namespace/name in s; to is the
// destination to check (invalid for none). The pod must be in s.Pods. It
// is pure.
func Explain(s *Snapshot, namespace, name string, to netip.Addr) (*Explanation, error) {
	i := slices.IndexFunc(s.Pods, func(p selector.Pod) bool { return p.Namespace == namespace && p.Name == name })
	if i < 0 {
		return nil, &PodNotFoundError{Namespace: namespace, Name: name}
	}
	pod := s.Pods[i]
	nsLabels, nsOK := s.Namespaces[namespace]
	e := &Explanation{
		Pod: namespace + "/" + name, Node: pod.Node, Phase: s.PodPhases[namespace+"/"+name],
		PodLabels: pod.Labels, NamespaceLabels: nsLabels, NamespaceMissing: !nsOK,
		Policies: []PolicyExplanation{},
	}
	if pod.IP.IsValid() {
		e.IP = pod.IP.String()
	}
	switch {
	case pod.HostNetwork:
		e.Ineligible = "it uses the host network: its traffic is the node's own and keeps the node IP"
	case pod.Terminated:
		e.Ineligible = fmt.Sprintf("it has terminated (phase %s): its IP may belong to another pod by now", e.Phase)
	case !pod.IP.Is4():
		e.Ineligible = "it has no IPv4 address yet (not scheduled or not started); the agents select it as soon as it has one"
	case !nsOK:
		e.Ineligible = fmt.Sprintf("its namespace %s does not exist", namespace)
	}
	if to.IsValid() {
		e.To = to.String()
	}

	gateways := map[string]*v1.NetworkGatewayGroup{}
	for _, g := range s.Gateways {
		gateways[g.Namespace+"/"+g.Name] = g
	}
	var checks map[string]selector.GroupCheck
	if s.GatewayNamespaces != nil {
		// As the agents check the groups; of the nodes, explain knows
		// the holders' addresses.
		var facts []selector.NodeFacts
		for name, ip := range s.NodeIPs {
			f := selector.NodeFacts{Name: name}
			f.AddNodeAddress("InternalIP", ip.String())
			facts = append(facts, f)
		}
		checks = selector.CheckGroups(s.Gateways, s.GatewayNamespaces, selector.ReservedFrom(facts))
	}
	for _, pol := range s.Policies {
		// The agents' own decision for the pod's node. egressnatctl does not
		// know the agents' --fallback-to-node-ip; status.whenUnavailable,
		// which the operator writes from the same flag, says it.
		f := selector.FactsOf(pol, gateways[pol.Spec.GatewayRef.Namespace+"/"+pol.Spec.GatewayRef.Name])
		f.Node, f.NodeIPs, f.NodeIPsKnown = pod.Node, s.NodeIPs, s.NodeIPs != nil
		f.SetGatewayCheck(checks)
		e.Policies = append(e.Policies, explainPolicy(pol, pod, nsLabels, nsOK, f, to))
	}
	e.Verdict = verdict(e, pod)
	if to.IsValid() {
		e.ToVerdict = toVerdict(e, s.Policies, to)
	}
	return e, nil
}

func explainPolicy(pol *v1.EgressNATPolicy, pod selector.Pod, nsLabels map[string]string, nsOK bool,
	f selector.PolicyFacts, to netip.Addr) PolicyExplanation {
	pe := PolicyExplanation{
		Policy: pol.Name, MatchedSource: -1, Sources: []SourceExplanation{}, Destinations: []string{},
		Gateway: f.Gateway, GatewayFound: f.GatewayFound, Ready: "Unknown",
	}
	if c := apimeta.FindStatusCondition(pol.Status.Conditions, v1.ConditionReady); c != nil {
		pe.Ready, pe.Reason = string(c.Status), c.Reason
	}
	for _, d := range pol.Spec.Destinations {
		pe.Destinations = append(pe.Destinations, d.CIDR)
	}
	if i := selector.CoveringDestination(pol.Spec.Destinations, to); to.IsValid() && i >= 0 {
		pe.Covers = pol.Spec.Destinations[i].CIDR
	}
	d := selector.Decide(f)
	if d.Accepted {
		pe.EgressIP, pe.Holder = d.EgressIP.String(), d.Holder
	}
	cp, err := selector.Compile(pol)
	if err != nil {
		pe.Invalid = err.Error()
		return pe
	}
	for i, src := range pol.Spec.Sources {
		se := SourceExplanation{Index: i}
		se.NamespaceSelector, se.NamespaceMatches, se.NamespaceFailed = evalSelector(src.NamespaceSelector, nsLabels)
		se.PodSelector, se.PodMatches, se.PodFailed = evalSelector(src.PodSelector, pod.Labels)
		if !nsOK {
			se.NamespaceMatches, se.NamespaceFailed = false, []string{"the namespace does not exist"}
		}
		if se.NamespaceMatches && se.PodMatches && pe.MatchedSource < 0 {
			pe.MatchedSource = i
		}
		pe.Sources = append(pe.Sources, se)
	}
	if d.Applied {
		pe.Mode = string(d.Mode)
	}
	if d.NextHop.IsValid() {
		pe.NextHop = d.NextHop.String()
	}
	// The agents' own predicate decides; the per-source view explains it.
	pe.Selected = nsOK && cp.Selects(pod, nsLabels)
	if pe.Selected {
		pe.Effect = effect(pe, d, pod)
	}
	return pe
}

// evalSelector renders a selector, says whether it matches set, and lists
// the requirements that fail.
func evalSelector(s v1.LabelSelector, set map[string]string) (text string, matches bool, failed []string) {
	sel, err := s.AsSelector()
	if err != nil {
		return "invalid: " + err.Error(), false, []string{err.Error()}
	}
	text = sel.String()
	if sel.Empty() {
		text = "{} (everything)"
	}
	reqs, _ := sel.Requirements()
	for _, r := range reqs {
		if r.Matches(labels.Set(set)) {
			continue
		}
		have := fmt.Sprintf("no label %s", r.Key())
		if v, ok := set[r.Key()]; ok {
			have = fmt.Sprintf("has %s=%s", r.Key(), v)
		}
		failed = append(failed, fmt.Sprintf("%s (%s)", r.String(), have))
	}
	return text, sel.Matches(labels.Set(set)), failed
}

// effect says what happens to the pod's traffic to the destinations of a
// policy that selects it, following the decision d.
func effect(pe PolicyExplanation, d selector.Decision, pod selector.Pod) string {
	keeps := "so it keeps the cluster's normal egress (the node IP)"
	switch {
	case !pe.GatewayFound:
		return fmt.Sprintf("is not SNATed: gateway %s does not exist, %s", pe.Gateway, keeps)
	case !d.Accepted:
		return fmt.Sprintf("is not SNATed: %s, %s", d.AcceptedMessage, keeps)
	case d.Applied && d.Mode == selector.ModeGateway:
		return fmt.Sprintf("leaves with %s, SNATed on %s (the pod's own node holds it)", d.EgressIP, d.Holder)
	case d.Applied && d.Mode == selector.ModeReroute:
		via := ""
		if d.NextHop.IsValid() {
			via = ", next hop " + d.NextHop.String()
		}
		return fmt.Sprintf("leaves with %s, routed from %s to %s (which holds it%s) and SNATed there", d.EgressIP, dash(pod.Node), d.Holder, via)
	}
	why := fmt.Sprintf("no node holds the egress IP %s", d.EgressIP)
	if d.Holder != "" {
		why = fmt.Sprintf("%s holds the egress IP %s but has no InternalIP, so %s cannot route to it", d.Holder, d.EgressIP, dash(pod.Node))
	}
	if d.Fallback {
		return fmt.Sprintf("is not SNATed: %s and status.whenUnavailable is NodeIP, %s", why, keeps)
	}
	return fmt.Sprintf("is dropped: %s (agents started with --fallback-to-node-ip let it leave with the node IP instead)", why)
}

func selectingPolicies(e *Explanation) []PolicyExplanation {
	var out []PolicyExplanation
	for _, p := range e.Policies {
		if p.Selected {
			out = append(out, p)
		}
	}
	return out
}

func verdict(e *Explanation, pod selector.Pod) string {
	if e.Ineligible != "" {
		return fmt.Sprintf("pod %s is not selected by any EgressNATPolicy: %s", e.Pod, e.Ineligible)
	}
	sel := selectingPolicies(e)
	if len(sel) == 0 {
		if len(e.Policies) == 0 {
			return fmt.Sprintf("pod %s is not selected: there is no EgressNATPolicy; its traffic keeps the cluster's normal egress (the node IP)", e.Pod)
		}
		return fmt.Sprintf("pod %s is not selected by any of the %d EgressNATPolicies (no source matches); its traffic keeps the cluster's normal egress (the node IP)", e.Pod, len(e.Policies))
	}
	names := make([]string, len(sel))
	for i, p := range sel {
		names[i] = p.Policy
	}
	return fmt.Sprintf("pod %s is selected by %s", e.Pod, strings.Join(names, ", "))
}

// toVerdict says what happens to the pod's traffic to to. Of several
// policies covering it, the one selector.Winner picks among those the
// pod's node applies.
func toVerdict(e *Explanation, policies []*v1.EgressNATPolicy, to netip.Addr) string {
	var covering []PolicyExplanation
	for _, p := range selectingPolicies(e) {
		if p.Covers != "" {
			covering = append(covering, p)
		}
	}
	switch len(covering) {
	case 0:
		why := "no policy selects the pod"
		if e.Ineligible == "" && len(selectingPolicies(e)) > 0 {
			why = "it is in none of the destinations of the policies selecting the pod"
		}
		return fmt.Sprintf("%s: not covered, %s; traffic to it keeps the cluster's normal egress (the node IP)", e.To, why)
	case 1:
		p := covering[0]
		return fmt.Sprintf("%s: covered by policy %s (%s); traffic to it %s", e.To, p.Policy, p.Covers, p.Effect)
	}
	byName := make(map[string]*v1.EgressNATPolicy, len(policies))
	for _, p := range policies {
		byName[p.Name] = p
	}
	var parts []string
	var applied []PolicyExplanation
	var contenders []*v1.EgressNATPolicy
	for _, p := range covering {
		part := fmt.Sprintf("%s (%s, egress IP %s", p.Policy, p.Covers, dash(p.EgressIP))
		if p.Mode == "" {
			part += ", not applied"
		} else {
			applied = append(applied, p)
			contenders = append(contenders, byName[p.Policy])
		}
		parts = append(parts, part+")")
	}
	head := fmt.Sprintf("%s: covered by %d policies: %s", e.To, len(covering), strings.Join(parts, ", "))
	if len(contenders) == 0 {
		return head + "; none of them is applied, so traffic to it keeps the cluster's normal egress (the node IP)"
	}
	w := selector.Winner(contenders, to)
	var why string
	switch w.By {
	case selector.WonAlone:
		why = "the only one applied"
	case selector.WonByPrefix:
		why = fmt.Sprintf("longest prefix, /%d", w.Prefix.Bits())
	case selector.WonByAge:
		why = fmt.Sprintf("prefixes tie at /%d; created first", w.Prefix.Bits())
	default:
		why = fmt.Sprintf("prefixes tie at /%d, so do creation times; first by name", w.Prefix.Bits())
	}
	win := applied[w.Index]
	return fmt.Sprintf("%s; %s applies (%s): traffic to it %s", head, win.Policy, why, win.Effect)
}

// WriteExplanation writes e as text, JSON or YAML.
func WriteExplanation(w io.Writer, e *Explanation, format string) error {
	switch format {
	case FormatJSON:
		b, err := json.MarshalIndent(e, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	case FormatYAML:
		b, err := yaml.Marshal(e)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	case "", "text", FormatTable:
		writeExplanationText(w, e)
		return nil
	}
	return fmt.Errorf("unknown output format %q: want text, json or yaml", format)
}

func formatLabels(m map[string]string) string {
	if len(m) == 0 {
		return "<none>"
	}
	return labels.Set(m).String()
}

func writeExplanationText(w io.Writer, e *Explanation) {
	fmt.Fprintf(w, "Pod %s\n", e.Pod)
	fmt.Fprintf(w, "  node:   %s\n", dash(e.Node))
	fmt.Fprintf(w, "  IP:     %s\n", orNone(e.IP))
	fmt.Fprintf(w, "  phase:  %s\n", dash(e.Phase))
	fmt.Fprintf(w, "  labels: %s\n", formatLabels(e.PodLabels))
	if e.NamespaceMissing {
		fmt.Fprintf(w, "  namespace: %s does not exist\n", strings.SplitN(e.Pod, "/", 2)[0])
	} else {
		fmt.Fprintf(w, "  namespace labels: %s\n", formatLabels(e.NamespaceLabels))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, e.Verdict+".")
	if e.Ineligible == "" {
		for _, p := range e.Policies {
			fmt.Fprintln(w)
			writePolicyText(w, p)
		}
	}
	if e.To != "" {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "To "+e.ToVerdict+".")
	}
}

func writePolicyText(w io.Writer, p PolicyExplanation) {
	switch {
	case p.Invalid != "":
		fmt.Fprintf(w, "EgressNATPolicy %s: invalid, not applied: %s\n", p.Policy, p.Invalid)
		return
	case p.Selected:
		fmt.Fprintf(w, "EgressNATPolicy %s: SELECTED by source %d\n", p.Policy, p.MatchedSource)
	default:
		fmt.Fprintf(w, "EgressNATPolicy %s: not selected\n", p.Policy)
	}
	for _, s := range p.Sources {
		fmt.Fprintf(w, "  source %d: namespaceSelector %s %s; podSelector %s %s\n", s.Index,
			s.NamespaceSelector, matchText(s.NamespaceMatches, s.NamespaceFailed),
			s.PodSelector, matchText(s.PodMatches, s.PodFailed))
	}
	gw := fmt.Sprintf("  gateway %s", p.Gateway)
	switch {
	case !p.GatewayFound:
		gw += " (not found)"
	case p.EgressIP == "":
		gw += " (no floating IP)"
	default:
		gw += fmt.Sprintf(", egress IP %s held by %s", p.EgressIP, orNone(p.Holder))
	}
	fmt.Fprintf(w, "%s; Ready %s\n", gw, readyText(p.Ready, p.Reason))
	fmt.Fprintf(w, "  destinations: %s\n", strings.Join(p.Destinations, ", "))
	if p.Selected {
		fmt.Fprintf(w, "  traffic to them %s\n", p.Effect)
	}
}

func matchText(ok bool, failed []string) string {
	if ok {
		return "matches"
	}
	return "fails on " + strings.Join(failed, ", ")
}
