package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/test/lab"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// fault is one planned fault: apply, hold for dur, undo.
type fault struct {
	id     int
	kind   string
	target string
	dur    time.Duration
	delay  time.Duration // wait before applying (a fault overlapping another)
	locks  []string
	note   string
	detail string // what apply found or did (e.g. which replica led)
	apply  func(ctx context.Context) error
	undo   func(ctx context.Context) error

	applied, undone time.Time
}

// Fault kinds, in the order of the -only flag's help.
var faultKinds = []string{
	"link-down", "part-operator", "part-api", "part-node", "oneway",
	"api-stop", "leader-kill", "agent-kill", "mid-apply", "reboot", "cpu-starve",
}

// planner draws faults; every random choice is made here, in the
// campaign's goroutine, from the seeded generator.
type planner struct {
	w              *world
	sc             *scenario
	rng            *rand.Rand
	kinds          []string
	minDur, maxDur time.Duration
	nextID         int
}

func (p *planner) dur(min time.Duration) time.Duration {
	lo := max(p.minDur, min)
	hi := max(p.maxDur, lo)
	return lo + time.Duration(p.rng.Int64N(int64(hi-lo)+1))
}

// free reports whether none of the locks is held.
func (p *planner) free(locks ...string) bool {
	p.w.mu.Lock()
	defer p.w.mu.Unlock()
	for _, l := range locks {
		if p.w.locks[l] > 0 {
			return false
		}
	}
	return true
}

// reserve takes f's locks; release gives them back.
func (w *world) reserve(f *fault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, l := range f.locks {
		w.locks[l]++
	}
}

func (w *world) release(f *fault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, l := range f.locks {
		if w.locks[l]--; w.locks[l] <= 0 {
			delete(w.locks, l)
		}
	}
}

func (p *planner) pickNode(names []string, locks func(string) []string) string {
	var ok []string
	for _, n := range names {
		if p.free(locks(n)...) {
			ok = append(ok, n)
		}
	}
	if len(ok) == 0 {
		return ""
	}
	return ok[p.rng.IntN(len(ok))]
}

// next plans a fault of a random kind whose targets are free, or nil.
func (p *planner) next() *fault {
	kinds := slices.Clone(p.kinds)
	p.rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	for _, k := range kinds {
		if f := p.plan(k); f != nil {
			p.nextID++
			f.id = p.nextID
			p.w.reserve(f)
			return f
		}
	}
	return nil
}

func (p *planner) plan(kind string) *fault {
	w, c, sc := p.w, p.w.c, p.sc
	f := &fault{kind: kind}
	switch kind {
	case "link-down":
		n := p.pickNode(sc.nodes, func(n string) []string { return []string{"link:" + n} })
		if n == "" {
			return nil
		}
		f.target, f.dur, f.locks = n, p.dur(0), []string{"link:" + n}
		f.apply = func(context.Context) error {
			w.isolate(n, 1)
			if err := c.Partition(n); err != nil {
				w.isolate(n, -1)
				return err
			}
			return nil
		}
		f.undo = func(context.Context) error {
			if err := c.Heal(n); err != nil {
				return err
			}
			w.isolate(n, -1)
			return nil
		}
	case "part-operator", "part-api":
		lk := map[string]string{"part-operator": "po:", "part-api": "pa:"}[kind]
		n := p.pickNode(sc.workers, func(n string) []string { return []string{lk + n} })
		if n == "" {
			return nil
		}
		cp, np := w.ports[sc.cp], w.ports[n]
		var rules []switchRule
		if kind == "part-operator" {
			// The operators' health probes: cp1 -> node:9797 only.
			rules = []switchRule{{cp, np, "tcp dport 9797"}, {np, cp, "tcp sport 9797"}}
			f.note = "probes from " + sc.cp + " to :9797 dropped"
		} else {
			rules = []switchRule{{np, cp, "tcp dport 6443"}, {cp, np, "tcp sport 6443"}}
			f.note = "node <-> API server :6443 dropped"
		}
		f.target, f.dur, f.locks = n, p.dur(0), []string{lk + n}
		f.apply = func(ctx context.Context) error { return w.setRules(ctx, f.id, rules) }
		f.undo = func(ctx context.Context) error { return w.setRules(ctx, f.id, nil) }
	case "part-node":
		var pairs [][2]string
		for i, a := range sc.workers {
			for _, b := range sc.workers[i+1:] {
				if p.free("pn:" + a + ":" + b) {
					pairs = append(pairs, [2]string{a, b})
				}
			}
		}
		if len(pairs) == 0 {
			return nil
		}
		pr := pairs[p.rng.IntN(len(pairs))]
		a, b := w.ports[pr[0]], w.ports[pr[1]]
		rules := []switchRule{{a, b, ""}, {b, a, ""}}
		f.target, f.dur, f.locks = pr[0]+"<->"+pr[1], p.dur(0), []string{"pn:" + pr[0] + ":" + pr[1]}
		f.apply = func(ctx context.Context) error { return w.setRules(ctx, f.id, rules) }
		f.undo = func(ctx context.Context) error { return w.setRules(ctx, f.id, nil) }
	case "oneway":
		ends := append(slices.Clone(sc.nodes), "router")
		var pairs [][2]string
		for _, a := range ends {
			for _, b := range ends {
				if a != b && p.free("ow:"+a+":"+b) {
					pairs = append(pairs, [2]string{a, b})
				}
			}
		}
		if len(pairs) == 0 {
			return nil
		}
		pr := pairs[p.rng.IntN(len(pairs))]
		port := func(e string) string {
			if e == "router" {
				return "rtr"
			}
			return w.ports[e]
		}
		rules := []switchRule{{port(pr[0]), port(pr[1]), ""}}
		f.target, f.dur, f.locks = pr[0]+"->"+pr[1], p.dur(0), []string{"ow:" + pr[0] + ":" + pr[1]}
		f.note = "frames one way only"
		f.apply = func(ctx context.Context) error { return w.setRules(ctx, f.id, rules) }
		f.undo = func(ctx context.Context) error { return w.setRules(ctx, f.id, nil) }
	case "api-stop":
		if !p.free("api") {
			return nil
		}
		f.target, f.dur, f.locks = "kube-apiserver", p.dur(0), []string{"api"}
		f.apply = func(context.Context) error {
			w.setAPIDown(true)
			c.API.StopAPIServer()
			return nil
		}
		f.undo = func(ctx context.Context) error {
			if err := c.API.StartAPIServer(ctx); err != nil {
				return err
			}
			w.setAPIDown(false)
			return nil
		}
	case "leader-kill":
		if !p.free("api", "operator") {
			return nil
		}
		f.target, f.dur, f.locks = "leader", p.dur(0), []string{"api", "operator"}
		idx := -1
		f.apply = func(ctx context.Context) error {
			lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			leader, err := c.Leader(lctx)
			if err != nil {
				return fmt.Errorf("find the leader: %w", err)
			}
			i, err := strconv.Atoi(strings.TrimPrefix(leader, "operator-"))
			if err != nil || i < 0 || i >= len(c.Operators) {
				return fmt.Errorf("leader %q is no operator replica", leader)
			}
			w.setDetail(f, "killed "+leader+" (the leader)")
			idx = i
			w.cmu.Lock()
			defer w.cmu.Unlock()
			return c.Operators[i].Kill()
		}
		f.undo = func(context.Context) error {
			if idx < 0 {
				return nil // never killed
			}
			w.cmu.Lock()
			defer w.cmu.Unlock()
			return c.StartOperator(idx)
		}
	case "agent-kill", "cpu-starve":
		n := p.pickNode(sc.nodes, func(n string) []string { return []string{"agent:" + n} })
		if n == "" {
			return nil
		}
		f.target, f.dur, f.locks = n, p.dur(0), []string{"agent:" + n}
		if kind == "agent-kill" {
			f.note = "kill -9"
			f.apply = func(context.Context) error { return w.killAgent(n) }
			f.undo = func(context.Context) error { return w.startAgent(n) }
		} else {
			f.note = "SIGSTOP (cgroup v1 machine: no cpu.max)"
			f.apply = func(context.Context) error { return w.signalAgent(n, syscall.SIGSTOP) }
			f.undo = func(context.Context) error { return w.signalAgent(n, syscall.SIGCONT) }
		}
	case "mid-apply":
		return p.planMidApply(f)
	case "reboot":
		n := p.pickNode(sc.nodes, func(n string) []string { return []string{"agent:" + n, "link:" + n, "api"} })
		if n == "" {
			return nil
		}
		f.target, f.dur, f.locks = n, p.dur(2*time.Second), []string{"agent:" + n, "link:" + n, "api"}
		f.note = "cable out, agent killed, kernel state wiped; back: cable in, agent started"
		if w.bootGuard {
			f.note = "cable out, agent killed, kernel state wiped; back: boot unit, cable in, agent started"
		}
		f.apply = func(ctx context.Context) error {
			for _, pod := range sc.podsOn(n) {
				w.src.Pause(pod)
			}
			w.isolate(n, 1)
			if err := c.Partition(n); err != nil {
				return err
			}
			if err := w.killAgent(n); err != nil {
				return err
			}
			return c.WipeNodeState(ctx, n)
		}
		f.undo = func(ctx context.Context) error {
			// The boot: the boot unit runs before the network starts
			// (Before=network-pre.target), the agent's pod long after.
			if w.bootGuard {
				if err := c.BootGuard(ctx, n); err != nil {
					return err
				}
			}
			if err := c.Heal(n); err != nil {
				return err
			}
			w.isolate(n, -1)
			defer func() {
				for _, pod := range sc.podsOn(n) {
					w.src.Resume(pod)
				}
			}()
			if err := w.startAgent(n); err != nil {
				return err
			}
			// The node's pods come back once its agent has applied its
			// state (a pod started before that is an agent startup
			// question, not a reboot one).
			t0 := time.Now()
			var err error
			for time.Since(t0) < 15*time.Second {
				rctx, cancel := context.WithTimeout(ctx, time.Second)
				err = c.AgentReady(rctx, n)
				cancel()
				if err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				w.violation("agent on %s not ready 15 s after the reboot: %v", n, err)
			} else {
				w.debugf("# agent on %s ready %d ms after it started", n, time.Since(t0).Milliseconds())
			}
			return nil
		}
	default:
		return nil
	}
	return f
}

// planMidApply: a change that makes agents apply (a pod's labels flip, or
// a policy's destinations change), then kill -9 of an agent concerned 0-50
// ms later; it starts again after the fault's duration.
func (p *planner) planMidApply(f *fault) *fault {
	w, c, sc := p.w, p.w.c, p.sc
	if !p.free("api") {
		return nil
	}
	delay := time.Duration(p.rng.Int64N(int64(50*time.Millisecond) + 1))
	flip := p.rng.IntN(2) == 0 && p.free("flip")
	var node string
	if flip {
		// The flipping pod's node marks its traffic; the gateway node
		// SNATs it (its source set must follow too).
		node = sc.flip.Node
		if p.rng.IntN(2) == 0 {
			if gw := w.status.holder(sc.egressA); gw != "" {
				node = gw
			}
		}
		if !p.free("agent:" + node) {
			return nil
		}
		f.locks = []string{"api", "flip", "agent:" + node}
	} else {
		if !p.free("poledit") {
			return nil
		}
		node = p.pickNode(sc.nodes, func(n string) []string { return []string{"agent:" + n} })
		if node == "" {
			return nil
		}
		f.locks = []string{"api", "poledit", "agent:" + node}
	}
	f.target, f.dur = node, p.dur(0)
	if flip {
		f.note = fmt.Sprintf("flip %s's role, kill -9 this agent %d ms later", sc.flip.key(), delay.Milliseconds())
	} else {
		f.note = fmt.Sprintf("toggle %s in %s, kill -9 this agent %d ms later", sc.extraDst, sc.policyB, delay.Milliseconds())
	}
	if flip {
		f.apply = func(ctx context.Context) error {
			cur, _ := w.src.Expectation(sc.flip.key())
			labels := map[string]string{"role": "frontend"}
			if cur.Selected {
				labels["role"] = "db"
			}
			next := sc.expect(sc.flip.Namespace, labels, sc.flip.Node)
			w.src.SetExpect(sc.flip.key(), next)
			if err := c.SetPodLabels(ctx, sc.flip.pod, labels); err != nil {
				w.src.SetExpect(sc.flip.key(), cur)
				w.src.SettleExpect(sc.flip.key(), 3*time.Second)
				return fmt.Errorf("label %s: %w", sc.flip.key(), err)
			}
			time.Sleep(delay)
			w.setDetail(f, fmt.Sprintf("%s now role=%s (%s)", sc.flip.key(), labels["role"], next))
			return w.killAgent(node)
		}
		f.undo = func(ctx context.Context) error {
			err := w.startAgent(node)
			// From here the agent can catch up, once its node and the
			// flipping pod's node reach the API server (a pulled cable
			// or a cut may still hide the change from them): the old
			// source is accepted for 3 s more.
			w.settleWhenReachable(context.WithoutCancel(ctx), sc.flip.key(), sc.cp, 3*time.Second, node, sc.flip.Node)
			return err
		}
	} else {
		f.apply = func(ctx context.Context) error {
			added, err := togglePolicyDestination(ctx, w, sc.policyB, sc.extraDst)
			if err != nil {
				return err
			}
			time.Sleep(delay)
			verb := "removed from"
			if added {
				verb = "added to"
			}
			w.setDetail(f, fmt.Sprintf("%s %s %s", sc.extraDst, verb, sc.policyB))
			return w.killAgent(node)
		}
		f.undo = func(context.Context) error { return w.startAgent(node) }
	}
	return f
}

// togglePolicyDestination adds cidr to the policy's destinations, or
// removes it when present; it reports whether it added it.
func togglePolicyDestination(ctx context.Context, w *world, policy, cidr string) (bool, error) {
	ri := w.dyn.Resource(policyGVR)
	u, err := ri.Get(ctx, policy, metav1.GetOptions{})
	if err != nil {
		return false, err
	}
	dsts, _, _ := unstructured.NestedSlice(u.Object, "spec", "destinations")
	var out []any
	found := false
	for _, d := range dsts {
		if m, ok := d.(map[string]any); ok && m["cidr"] == cidr {
			found = true
			continue
		}
		out = append(out, d)
	}
	if !found {
		out = append(out, map[string]any{"cidr": cidr})
	}
	if err := unstructured.SetNestedSlice(u.Object, out, "spec", "destinations"); err != nil {
		return false, err
	}
	if _, err := ri.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		return false, err
	}
	return !found, nil
}

func (w *world) setDetail(f *fault, d string) {
	w.mu.Lock()
	f.detail = d
	w.mu.Unlock()
}

func (w *world) setAPIDown(v bool) {
	w.mu.Lock()
	w.apiDown = v
	w.mu.Unlock()
}

func (w *world) isolate(node string, d int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.isolated[node] += d; w.isolated[node] <= 0 {
		delete(w.isolated, node)
	}
}

func (w *world) agent(node string) *labProc {
	w.cmu.Lock()
	defer w.cmu.Unlock()
	return w.c.Agents[node]
}

func (w *world) killAgent(node string) error {
	p := w.agent(node)
	if p == nil {
		return fmt.Errorf("no agent on %s", node)
	}
	return p.Kill()
}

func (w *world) startAgent(node string) error {
	w.cmu.Lock()
	defer w.cmu.Unlock()
	if p := w.c.Agents[node]; p != nil && p.Running() {
		return fmt.Errorf("agent on %s still runs", node)
	}
	return w.c.StartAgent(node)
}

func (w *world) signalAgent(node string, sig syscall.Signal) error {
	p := w.agent(node)
	if p == nil || !p.Signal(sig) {
		return fmt.Errorf("agent on %s does not run", node)
	}
	return nil
}

// violation reports a violation found by the campaign itself (not by an
// observer).
func (w *world) violation(format string, args ...any) {
	w.mu.Lock()
	w.ownViolations++
	w.mu.Unlock()
	w.printf("VIOLATION %s", fmt.Sprintf(format, args...))
}

// runFault waits f.delay, applies f, holds it for f.dur and undoes it. A
// fault that fails to apply is skipped (it did not happen); one that fails
// to undo is retried, then recorded as a tool error.
func (w *world) runFault(ctx context.Context, f *fault, overlaps int, applied *int) {
	defer w.release(f)
	if f.delay > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(f.delay):
		}
	}
	if ctx.Err() != nil {
		return
	}
	ov := ""
	if overlaps > 0 {
		ov = fmt.Sprintf(" (overlaps #%d)", overlaps)
	}
	note := ""
	if f.note != "" {
		note = "  [" + f.note + "]"
	}
	// In effect (for the violation reports) from before it is applied.
	w.mu.Lock()
	f.applied = time.Now()
	w.active[f.id] = f
	w.mu.Unlock()
	w.printf("#%-3d %-13s %-16s %5.2fs%s%s", f.id, f.kind, f.target, f.dur.Seconds(), ov, note)
	actx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err := f.apply(actx)
	cancel()
	if err != nil {
		w.mu.Lock()
		delete(w.active, f.id)
		w.mu.Unlock()
		w.printf("#%-3d skipped (not counted): %v", f.id, err)
		// Whatever apply did halfway is undone.
		uctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if uerr := f.undo(uctx); uerr != nil {
			w.debugf("# undo of skipped #%d: %v", f.id, uerr)
		}
		return
	}
	w.mu.Lock()
	*applied++
	detail := f.detail
	w.mu.Unlock()
	if detail != "" {
		w.printf("#%-3d %s", f.id, detail)
	}
	select {
	case <-ctx.Done():
	case <-time.After(f.dur):
	}
	uctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var uerr error
	for try := 0; try < 3; try++ {
		if uerr = f.undo(uctx); uerr == nil {
			break
		}
		time.Sleep(time.Second)
	}
	w.mu.Lock()
	delete(w.active, f.id)
	f.undone = time.Now()
	w.recent = append(w.recent, f)
	w.mu.Unlock()
	if uerr != nil {
		w.toolError("undo #%d %s %s: %v", f.id, f.kind, f.target, uerr)
		return
	}
	w.debugf("#%-3d undone after %.2fs", f.id, f.undone.Sub(f.applied).Seconds())
}

// restoreAll puts everything back whatever happened: the switch table
// gone, every cable in, every agent continued and running, both operators
// and the API server running.
func (w *world) restoreAll(ctx context.Context) error {
	var errs []error
	w.mu.Lock()
	apiDown := w.apiDown
	w.mu.Unlock()
	if apiDown {
		// Stop first: a failed start may have left a process behind.
		w.c.API.StopAPIServer()
		if err := w.c.API.StartAPIServer(ctx); err != nil {
			errs = append(errs, err)
		} else {
			w.setAPIDown(false)
		}
	}
	if err := w.c.Lab.DeleteSwitchFilter(ctx, switchTable); err != nil {
		errs = append(errs, err)
	}
	w.mu.Lock()
	w.rules, w.cuts, w.isolated = map[int][]switchRule{}, map[[2]string]int{}, map[string]int{}
	w.mu.Unlock()
	for _, n := range w.c.Lab.Nodes() {
		if err := w.c.Heal(n.Name); err != nil {
			errs = append(errs, err)
		}
	}
	w.cmu.Lock()
	defer w.cmu.Unlock()
	for n, p := range w.c.Agents {
		p.Signal(syscall.SIGCONT)
		if !p.Running() {
			errs = append(errs, w.c.StartAgent(n))
		}
	}
	for i, p := range w.c.Operators {
		if p == nil || !p.Running() {
			errs = append(errs, w.c.StartOperator(i))
		}
	}
	return errors.Join(errs...)
}

type labProc = lab.Proc
