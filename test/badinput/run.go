package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	probeproto "github.com/egressnat/egressnat/leader/probe"
	"github.com/egressnat/egressnat/test/lab"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
)

// Outcomes of a case.
const (
	outRejected   = "rejected"
	outReported   = "reported"
	outUnreported = "unreported"
	outHarmed     = "HARMED"
	outError      = "ERROR" // the harness could not try the input
)

type result struct {
	name    string
	outcome string
	// report is how the input was refused or explained ("" when not).
	report string
	// how is rejected, reported or unreported, also for a harmed case.
	how   string
	harms []string
	notes []string
	took  time.Duration
}

func (r result) line() string {
	var detail string
	switch r.outcome {
	case outHarmed:
		detail = strings.Join(r.harms, "; ")
		if len(r.harms) > 6 {
			detail = strings.Join(r.harms[:6], "; ") + fmt.Sprintf("; … %d more", len(r.harms)-6)
		}
		detail = oneLine(detail, 900) + " [input " + r.how
		if r.report != "" {
			detail += ": " + oneLine(r.report, 200)
		}
		detail += "]"
	case outUnreported:
		detail = "accepted with no False condition, problem condition or Warning Event within the report timeout"
	default:
		detail = oneLine(r.report, 320)
	}
	if len(r.notes) > 0 {
		detail += " (" + strings.Join(r.notes, "; ") + ")"
	}
	return fmt.Sprintf("badinput %s: %s %s", r.name, r.outcome, strings.TrimSpace(detail))
}

// runCase tries one input: make it, classify the answer, check for harm
// while it exists, remove it, check that the nodes return to the baseline
// and that traffic is as before. A returned error means the lab could not
// be brought back: the run stops.
func (h *harness) runCase(ctx context.Context, cs badCase) (res result, fatal error) {
	start := time.Now()
	res.name = cs.Name
	defer func() { res.took = time.Since(start) }()
	h.extraConcerns = nil
	since := time.Now()
	undone := false
	undo := func() {
		if undone {
			return
		}
		undone = true
		if err := h.remove(ctx, cs); err != nil {
			res.notes = append(res.notes, "removal: "+oneLine(err.Error(), 200))
		}
	}
	defer undo()

	holder, err := h.baseHolder(ctx)
	if err != nil {
		return res, fmt.Errorf("baseline group: %w", err)
	}
	var rejErr error
	var setupErr error
	if cs.Setup != "" {
		// The companions are part of the input: when the API server
		// refuses them (e.g. a group outside the gateway namespaces), the
		// input is rejected.
		if _, err := h.c.Kubectl(ctx, cs.Setup, "create", "-f", "-"); err != nil {
			if rejected(err) {
				rejErr = err
			} else {
				setupErr = fmt.Errorf("setup: %w", err)
			}
		}
	}
	if setupErr == nil && rejErr == nil && cs.YAML != "" {
		if _, err := h.c.Kubectl(ctx, cs.YAML, "create", "-f", "-"); err != nil {
			if rejected(err) {
				rejErr = err
			} else {
				setupErr = err
			}
		}
	}
	if setupErr == nil && rejErr == nil && cs.Apply != nil {
		if err := cs.Apply(ctx, h); err != nil {
			if rejected(err) || apierrors.IsInvalid(err) || apierrors.IsForbidden(err) || apierrors.IsBadRequest(err) {
				rejErr = err
			} else {
				setupErr = err
			}
		}
	}
	if setupErr != nil {
		res.outcome, res.how, res.report = outError, outError, oneLine(setupErr.Error(), 400)
		undo()
		if left := h.waitBaseline(ctx, 20*time.Second); len(left) > 0 {
			res.notes = append(res.notes, "left: "+strings.Join(left, "; "))
		}
		return res, nil
	}

	if rejErr != nil {
		res.how, res.report = outRejected, rejection(rejErr)
	} else {
		// Let the operator and the agents act first, so that a transient
		// condition (a policy seen before its group) is no report.
		if _, err := h.settle(ctx, 10*time.Second); err != nil {
			res.notes = append(res.notes, err.Error())
		}
		refs := append(append(append(refsOf(cs.YAML), refsOf(cs.Setup)...), cs.Concerns...), h.extraConcerns...)
		if r := h.waitReport(ctx, refs, since, cs.Valid); r != "" {
			res.how, res.report = outReported, r
		} else {
			res.how = outUnreported
		}
	}
	during, err := h.harm(ctx, cs.Allow)
	if err != nil {
		return res, err
	}
	for _, d := range during {
		res.harms = append(res.harms, "while present: "+d)
	}

	undo()
	if moved := h.holderMoved(ctx, holder); moved != "" {
		// The assignment is sticky: the nodes' state cannot return to the
		// baseline, and the move itself is the harm.
		res.harms = append(res.harms, moved)
		if _, err := h.settle(ctx, 10*time.Second); err != nil {
			res.notes = append(res.notes, err.Error())
		}
	} else {
		for _, l := range h.waitBaseline(ctx, 20*time.Second) {
			res.harms = append(res.harms, "left after removal: "+l)
		}
	}
	after, err := h.harm(ctx, nil)
	if err != nil {
		return res, err
	}
	for _, d := range after {
		res.harms = append(res.harms, "after removal: "+d)
	}
	res.outcome = res.how
	if len(res.harms) > 0 {
		res.outcome = outHarmed
		note, err := h.heal(ctx)
		if note != "" {
			res.notes = append(res.notes, note)
		}
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// remove deletes what the case made (also what a rejected or failed case
// may have made in part).
func (h *harness) remove(ctx context.Context, cs badCase) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	var errs []error
	for _, y := range []string{cs.YAML, cs.Setup} {
		if y == "" {
			continue
		}
		if _, err := h.c.Kubectl(ctx, y, "delete", "--ignore-not-found", "--wait=true", "--timeout=60s", "-f", "-"); err != nil {
			errs = append(errs, err)
		}
	}
	if cs.Undo != nil {
		if err := cs.Undo(ctx, h); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// heal brings the lab back after a harmful input: it flushes the ARP
// caches a gratuitous ARP may have poisoned, then waits until traffic and
// the nodes' state are the baseline's again. When only the state stays
// different, the baseline state is taken again (noted); when traffic does
// not recover the run cannot go on.
func (h *harness) heal(ctx context.Context) (string, error) {
	nses := []string{h.c.Lab.RouterNS()}
	for _, n := range h.nodes {
		nses = append(nses, n.NetNS)
	}
	for _, e := range h.c.Lab.Externals() {
		nses = append(nses, e.NetNS)
	}
	for _, p := range h.c.Lab.Pods() {
		nses = append(nses, p.NetNS)
	}
	repaired := h.repairNodes(ctx)
	if err := h.c.Lab.FlushNeighbors(nses...); err != nil {
		return "", fmt.Errorf("heal: %w", err)
	}
	var lastTraffic []string
	err := pollUntil(ctx, 30*time.Second, func() (bool, string) {
		now, err := h.traffic(ctx)
		if err != nil {
			return false, err.Error()
		}
		lastTraffic = append(h.nodeHarm(ctx), compareTraffic(h.probes, h.baseTraffic, now, nil)...)
		return len(lastTraffic) == 0, strings.Join(lastTraffic, "; ")
	})
	if err != nil {
		return "", fmt.Errorf("the lab did not recover (ARP caches flushed%s, 30s): %s", repaired, oneLine(strings.Join(lastTraffic, "; "), 600))
	}
	if left := h.waitBaseline(ctx, 10*time.Second); len(left) > 0 {
		st, err := h.settle(ctx, 10*time.Second)
		if err != nil {
			return "", fmt.Errorf("heal: %w", err)
		}
		h.baseState = st
		return "lab healed: ARP caches flushed" + repaired + "; kernel state re-baselined", nil
	}
	return "lab healed: ARP caches flushed" + repaired, nil
}

// repairNodes puts back what the lab configured on a node and an input
// took away: the node's own address and the main table's routes. It
// returns what it did ("" when nothing).
func (h *harness) repairNodes(ctx context.Context) string {
	var did []string
	for _, n := range h.nodes {
		own := netip.PrefixFrom(n.IP, lab.NodeSubnet.Bits()).String()
		if addrs, err := h.exec(ctx, n.NetNS, "ip", "-4", "-o", "addr", "show", "dev", n.Uplink); err == nil &&
			!strings.Contains(addrs, "inet "+own+" ") {
			if _, err := h.exec(ctx, n.NetNS, "ip", "addr", "add", own, "dev", n.Uplink); err == nil {
				did = append(did, fmt.Sprintf("re-added %s on %s", own, n.Name))
			}
		}
		main, err := h.exec(ctx, n.NetNS, "ip", "-4", "route", "show", "table", "main")
		if err != nil {
			continue
		}
		have := lineSet(main)
		for _, l := range strings.Split(h.baseMain[n.Name], "\n") {
			if strings.TrimSpace(l) == "" || have[l] {
				continue
			}
			var args []string
			for _, f := range strings.Fields(l) {
				if f != "linkdown" && f != "dead" {
					args = append(args, f)
				}
			}
			if _, err := h.exec(ctx, n.NetNS, append([]string{"ip", "route", "replace"}, args...)...); err == nil {
				did = append(did, fmt.Sprintf("restored route %q on %s", strings.Join(args, " "), n.Name))
			}
		}
	}
	if len(did) == 0 {
		return ""
	}
	return "; " + strings.Join(did, ", ")
}

// --- Inputs that are not plain objects ---

func agentLease(node string) string { return "egressnat-agent-" + node }

const annotationSubnets = "egressnat.io/uplink-subnets"

// setLeaseSubnets overwrites the uplink-subnets annotation of a node's
// agent Lease as an administrator would (the admin token), saving the
// original annotations once.
func (h *harness) setLeaseSubnets(ctx context.Context, node, subnets string) error {
	leases := h.c.Client.CoordinationV1().Leases(agentNS)
	for try := 0; ; try++ {
		l, err := leases.Get(ctx, agentLease(node), metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get lease of %s: %w", node, err)
		}
		if _, ok := h.savedLease[node]; !ok {
			saved := map[string]string{}
			for k, v := range l.Annotations {
				saved[k] = v
			}
			h.savedLease[node] = saved
		}
		if l.Annotations == nil {
			l.Annotations = map[string]string{}
		}
		l.Annotations[annotationSubnets] = subnets
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		if err == nil || !apierrors.IsConflict(err) || try >= 5 {
			return err
		}
	}
}

func (h *harness) restoreLeaseOf(ctx context.Context, node string) error {
	saved, ok := h.savedLease[node]
	if !ok {
		return nil
	}
	leases := h.c.Client.CoordinationV1().Leases(agentNS)
	for try := 0; ; try++ {
		l, err := leases.Get(ctx, agentLease(node), metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get lease of %s: %w", node, err)
		}
		if l.Annotations == nil {
			l.Annotations = map[string]string{}
		}
		l.Annotations[annotationSubnets] = saved[annotationSubnets]
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		if err == nil {
			delete(h.savedLease, node)
			return nil
		}
		if !apierrors.IsConflict(err) || try >= 5 {
			return err
		}
	}
}

const spoofGroup = "bi-spoofed"

// spoofLease makes node's agent Lease claim subnets, then creates a group
// with a floating IP only that claim would allow.
func spoofLease(node, subnets string) func(context.Context, *harness) error {
	return func(ctx context.Context, h *harness) error {
		if err := h.setLeaseSubnets(ctx, node, subnets); err != nil {
			return err
		}
		h.extraConcerns = append(h.extraConcerns, objRef{Kind: "NetworkGatewayGroup", Namespace: gatewayNS, Name: spoofGroup})
		_, err := h.c.Kubectl(ctx, group(spoofGroup, "198.51.100.50"), "create", "-f", "-")
		return err
	}
}

func restoreLease(node string) func(context.Context, *harness) error {
	return func(ctx context.Context, h *harness) error {
		_, err := h.c.Kubectl(ctx, group(spoofGroup, "198.51.100.50"), "delete", "--ignore-not-found", "--wait=true", "-f", "-")
		return errors.Join(err, h.restoreLeaseOf(ctx, node))
	}
}

// holderMoved tells (in words) when the baseline floating IP is no longer
// on the node that held it before the input: a healthy node lost it.
func (h *harness) holderMoved(ctx context.Context, before string) string {
	now, err := h.baseHolder(ctx)
	if err != nil {
		return "baseline group: " + err.Error()
	}
	if now == before {
		return ""
	}
	return fmt.Sprintf("baseline floating IP %s moved from %s to %s (sticky: the nodes' state is compared again from here on)", baseIP, before, now)
}

// baseHolder is the node the baseline group's status gives its IP.
func (h *harness) baseHolder(ctx context.Context) (string, error) {
	g, err := h.dyn.Resource(groupGVR).Namespace(gatewayNS).Get(ctx, baseGroup, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	m, _, _ := unstructured.NestedStringMap(g.Object, "status", "floatingIPs")
	if m[baseIP] == "" {
		return "", fmt.Errorf("no node holds %s", baseIP)
	}
	return m[baseIP], nil
}

var holderSpoofed string

func spoofHolderLease(subnets string) func(context.Context, *harness) error {
	return func(ctx context.Context, h *harness) error {
		node, err := h.baseHolder(ctx)
		if err != nil {
			return err
		}
		holderSpoofed = node
		h.extraConcerns = append(h.extraConcerns, objRef{Kind: "Node", Name: node, Baseline: true},
			objRef{Kind: "Lease", Namespace: agentNS, Name: agentLease(node), Baseline: true})
		return h.setLeaseSubnets(ctx, node, subnets)
	}
}

func restoreHolderLease(ctx context.Context, h *harness) error {
	if holderSpoofed == "" {
		return nil
	}
	err := h.restoreLeaseOf(ctx, holderSpoofed)
	holderSpoofed = ""
	return err
}

// fakeNode i: a Node named bi-fake-NN with InternalIP 192.0.2.(30+i) on a
// lab switch host that answers the operators' health probes, its agent
// Lease (the admin writes it), a group bi-many-NN with floating IP
// 192.0.2.(130+i), and a policy bi-many-NN sending the selected pods'
// traffic to 198.51.100.(100+i)/32 through it.
func fakeName(i int) string { return fmt.Sprintf("bi-many-%02d", i) }
func fakeNode(i int) string { return fmt.Sprintf("bi-fake-%02d", i) }

func applyManyGateways(ctx context.Context, h *harness) error {
	var addrs []netip.Addr
	a := netip.MustParseAddr("192.0.2.30")
	for range manyGateways {
		addrs = append(addrs, a)
		a = a.Next()
	}
	host, err := h.c.Lab.AddSwitchHost("fakes", addrs...)
	if err != nil {
		return err
	}
	ln, err := lab.ListenTCP(host.NetNS, fmt.Sprintf("0.0.0.0:%d", 9797))
	if err != nil {
		return err
	}
	h.fakeListener = ln
	// The fake agents answer the operators' authenticated probes with the
	// key from the probe Secret (as an agent does), with a heartbeat that
	// moves.
	sec, err := h.c.Client.CoreV1().Secrets(agentNS).Get(ctx, probeproto.SecretName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("probe secret: %w", err)
	}
	key := sec.Data[probeproto.SecretKey]
	var beat atomic.Uint64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(time.Second))
				line, err := bufio.NewReader(io.LimitReader(c, probeproto.MaxLine)).ReadString('\n')
				if err != nil {
					return
				}
				if p, err := probeproto.Decode(key, line); err == nil {
					_, _ = c.Write(probeproto.EncodeReply(key, p, beat.Add(1)))
				}
			}()
		}
	}()
	leases := h.c.Client.CoordinationV1().Leases(agentNS)
	now := metav1.NewMicroTime(time.Now())
	for i, ip := range addrs {
		if err := h.c.RegisterNode(ctx, fakeNode(i), ip, false, netip.Prefix{}); err != nil {
			return err
		}
		_, err := leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: agentLease(fakeNode(i)), Namespace: agentNS,
				Labels:      map[string]string{"egressnat.io/component": "agent"},
				Annotations: map[string]string{annotationSubnets: netip.PrefixFrom(ip, 24).String(), "egressnat.io/uplink": "eth0"}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(fakeNode(i)), LeaseDurationSeconds: ptr.To(int32(3600)),
				AcquireTime: &now, RenewTime: &now},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("lease of %s: %w", fakeNode(i), err)
		}
	}
	// The groups first, and the policies once the operator has assigned
	// the groups' IPs (so that no policy is reported for a group it did
	// not see yet).
	var groups, policies strings.Builder
	fip := netip.MustParseAddr("192.0.2.130")
	dst := netip.MustParseAddr("198.51.100.100")
	for i := range manyGateways {
		name := fakeName(i)
		groups.WriteString("---\n" + group(name, fip.String()))
		policies.WriteString("---\n" + policyYAML(policySpec{name: name, dests: []string{dst.String() + "/32"}, gwName: name}))
		h.extraConcerns = append(h.extraConcerns, objRef{Kind: "EgressNATPolicy", Name: name})
		fip, dst = fip.Next(), dst.Next()
	}
	h.manyYAML = groups.String() + policies.String()
	if _, err := h.c.Kubectl(ctx, groups.String(), "create", "-f", "-"); err != nil {
		return err
	}
	if err := pollUntil(ctx, 30*time.Second, func() (bool, string) {
		list, err := h.dyn.Resource(groupGVR).Namespace(gatewayNS).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		ready := 0
		for _, g := range list.Items {
			if strings.HasPrefix(g.GetName(), "bi-many-") {
				if n, _, _ := unstructured.NestedInt64(g.Object, "status", "assignedCount"); n == 1 {
					ready++
				}
			}
		}
		return ready == manyGateways, fmt.Sprintf("%d of %d groups assigned", ready, manyGateways)
	}); err != nil {
		return fmt.Errorf("the %d groups: %w", manyGateways, err)
	}
	_, err = h.c.Kubectl(ctx, policies.String(), "create", "-f", "-")
	return err
}

func undoManyGateways(ctx context.Context, h *harness) error {
	var errs []error
	if h.manyYAML != "" {
		if _, err := h.c.Kubectl(ctx, h.manyYAML, "delete", "--ignore-not-found", "--wait=true", "--timeout=60s", "-f", "-"); err != nil {
			errs = append(errs, err)
		}
		h.manyYAML = ""
	}
	leases := h.c.Client.CoordinationV1().Leases(agentNS)
	for i := range manyGateways {
		if err := leases.Delete(ctx, agentLease(fakeNode(i)), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
		if err := h.c.Client.CoreV1().Nodes().Delete(ctx, fakeNode(i), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	if h.fakeListener != nil {
		h.fakeListener.Close()
		h.fakeListener = nil
	}
	if h.c.Lab.SwitchHost("fakes") != nil {
		if err := h.c.Lab.RemoveSwitchHost("fakes"); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
