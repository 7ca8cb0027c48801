package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/gateway"
	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/watch"
)

// defaultMoveWait is how long move waits for the operator unless --wait
// says otherwise.
const defaultMoveWait = 60 * time.Second

func (a *app) moveCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "move GROUP (IP[=NODE]... | --all)",
		Short: "Move floating IPs of a gateway to other nodes, gracefully: move GROUP IP[=NODE]... or --all",
		Long: fmt.Sprintf(`Ask the operator to move floating IPs of the NetworkGatewayGroup GROUP:
NAME in the namespace of -n (default %[2]s, where groups live; the
kubeconfig context's namespace is not used), or NAMESPACE/NAME.

  IP        to the best other node that can hold it
  IP=NODE   to the node NODE
  --all     rebalance: every IP goes where a fresh assignment would put it

A move is graceful, make before break: the new node prepares the address
while the old holder keeps it (and stops answering ARP for it); then the
operator gives the IP to the new node and records the move in
status.recentMoves. Moves are never automatic: an IP stays on its node for
as long as that node can hold it, so a node that joins or comes back gets
none of the IPs already held until you ask (after a failover: --all).

The request is the annotation %[3]s on the group, which
needs patch on networkgatewaygroups in its namespace: the role
egressnat-gateway-admin (a RoleBinding there).

With --wait (default 60s) the command waits for the operator to act on the
request, prints what it did and the moves that happened, and exits 1 when
the time runs out first (the handovers under way carry on: %[1]s status
shows them) or when an IP named did not reach its node. --wait 0 returns
once the request is written.`, a.prog, v1.DefaultGatewayNamespace, v1.AnnotationMoveRequest),
		Example: fmt.Sprintf("  %[1]s move default 192.0.2.100\n  %[1]s move default 192.0.2.100=worker2 192.0.2.101=worker3\n"+
			"  %[1]s move kube-system/default --all\n  %[1]s move gw -n team-a --all --wait 2m", a.prog),
		ValidArgsFunction: cobra.NoFileCompletions,
	}
	all := c.Flags().Bool("all", false, "rebalance every floating IP of the group (no IP is named then)")
	wait := c.Flags().Duration("wait", defaultMoveWait, "how long to wait for the operator to act and the moves to end (0: do not wait)")
	c.RunE = runE(func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return usagef("move: name a NetworkGatewayGroup: move GROUP (IP[=NODE]... | --all)")
		}
		ns, name, err := splitGroupRef(args[0], *a.kube.Namespace)
		if err != nil {
			return err
		}
		req, err := moveRequest(args[1:], *all)
		if err != nil {
			return err
		}
		if *wait < 0 {
			return usagef("--wait %s: want a duration of 0 or more", *wait)
		}
		req.ID = newMoveID()
		l, err := a.loader()
		if err != nil {
			return err
		}
		return runMove(cmd.Context(), l, a.stdout, a.prog, ns, name, req, *wait)
	})
	return c
}

// splitGroupRef splits move's GROUP: NAMESPACE/NAME, or NAME in the
// namespace of -n (flagNS), else in kube-system.
func splitGroupRef(ref, flagNS string) (namespace, name string, err error) {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok {
		ns, name = flagNS, ref
		if ns == "" {
			ns = v1.DefaultGatewayNamespace
		}
	} else if flagNS != "" && flagNS != ns {
		return "", "", usagef("move %s: -n %s names another namespace", ref, flagNS)
	}
	if ns == "" || name == "" || strings.Contains(name, "/") {
		return "", "", usagef("move: want GROUP as NAME or NAMESPACE/NAME, got %q", ref)
	}
	return ns, name, nil
}

// moveRequest builds the request of move's arguments after GROUP: IP or
// IP=NODE, one per argument, or none with --all. ID is left empty.
func moveRequest(args []string, all bool) (gateway.MoveRequest, error) {
	switch {
	case all && len(args) > 0:
		return gateway.MoveRequest{}, usagef("move: --all moves every floating IP of the group: name no IP with it, got %q", strings.Join(args, " "))
	case all:
		return gateway.MoveRequest{All: true}, nil
	case len(args) == 0:
		return gateway.MoveRequest{}, usagef("move: name the floating IPs to move (IP, or IP=NODE), or --all to rebalance the group")
	}
	for _, arg := range args {
		if strings.TrimSpace(arg) == "*" {
			return gateway.MoveRequest{}, usagef("move: %q: write --all to rebalance every floating IP", arg)
		}
		if strings.ContainsAny(arg, ",;*") {
			return gateway.MoveRequest{}, usagef("move: %q: want IP or IP=NODE, one per argument", arg)
		}
	}
	r, err := gateway.ParseMoveRequest(strings.Join(args, ","))
	if err != nil {
		return gateway.MoveRequest{}, usagef("move: %v", err)
	}
	for _, ip := range slices.SortedFunc(maps.Keys(r.IPs), netip.Addr.Compare) {
		node := r.IPs[ip]
		if node == "" {
			continue
		}
		if errs := validation.IsDNS1123Subdomain(node); len(errs) > 0 {
			return gateway.MoveRequest{}, usagef("move: %s=%s: not a node name: %s", ip, node, strings.Join(errs, "; "))
		}
	}
	return r, nil
}

// newMoveID is a fresh request id: the time in nanoseconds, base 36, so
// that asking for the same move twice makes a new annotation value.
func newMoveID() string { return strconv.FormatInt(time.Now().UnixNano(), 36) }

// runMove writes the request on the group and, unless wait is 0, waits
// for the operator to act on it and for the handovers to end. prog names
// the command in hints.
func runMove(ctx context.Context, l *Loader, w io.Writer, prog, namespace, name string, req gateway.MoveRequest, wait time.Duration) error {
	value := req.String()
	before, err := l.RequestMove(ctx, namespace, name, value)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "move request written on %s/%s: %s\n", namespace, name, value)
	if wait == 0 {
		fmt.Fprintf(w, "not waiting (--wait 0): %s status shows the handovers under way\n", prog)
		return nil
	}
	waitCtx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	m := &moveWaiter{w: w, prog: prog, req: req, value: value, before: before, seen: map[string]bool{}}
	last, err := l.watchGroup(waitCtx, before, m.check)
	switch {
	case err == nil:
		return m.finish(last)
	case ctx.Err() != nil:
		return fmt.Errorf("move: %w", ctx.Err())
	case errors.Is(err, context.DeadlineExceeded):
		terr := m.timedOut(last, wait, time.Now())
		if f, ok := errors.AsType[apiFailing](err); ok {
			return fmt.Errorf("%w; the API server failed meanwhile: %v", terr, f.last)
		}
		return terr
	}
	return err
}

// apiFailing is the end of a wait (ctx's error) while the API server
// failed (last: its last failure).
type apiFailing struct{ ctxErr, last error }

func (e apiFailing) Error() string {
	return fmt.Sprintf("%v (the API server failed: %v)", e.ctxErr, e.last)
}
func (e apiFailing) Unwrap() error { return e.ctxErr }

// RequestMove writes value as the annotation egressnat.io/move-request
// of the group (a merge patch of metadata.annotations) and returns the
// group as the patch left it: what the operator has not acted on yet.
func (l *Loader) RequestMove(ctx context.Context, namespace, name, value string) (*v1.NetworkGatewayGroup, error) {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{v1.AnnotationMoveRequest: value}}})
	if err != nil {
		return nil, fmt.Errorf("move request: %w", err)
	}
	u, err := l.Dynamic.Resource(kube.GatewayGVR).Namespace(namespace).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if st := apierrors.APIStatus(nil); errors.As(err, &st) && (st.Status().Details == nil || st.Status().Details.Name == "") {
			return nil, ErrCRDsMissing // the resource, not the object
		}
		return nil, fmt.Errorf("NetworkGatewayGroup %s/%s not found", namespace, name)
	case apierrors.IsForbidden(err):
		return nil, fmt.Errorf("%w (writing a move request needs patch on networkgatewaygroups in %s: the role egressnat-gateway-admin)", err, namespace)
	case err != nil:
		return nil, l.apiError(err)
	}
	g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
	if err != nil {
		return nil, fmt.Errorf("move request: %w", err)
	}
	return g, nil
}

// retryDelay spaces the watch's retries after a failure a retry can fix.
const retryDelay = 500 * time.Millisecond

// watchGroup calls check with each state of the group after from, until
// check returns true or an error, or ctx ends; it returns the last state
// seen (from when none came). It watches from from's resource version on,
// watches again when the watch ends, and reads the group afresh when that
// version has expired. Failures a retry may fix are retried until ctx
// ends, which then returns an apiFailing.
func (l *Loader) watchGroup(ctx context.Context, from *v1.NetworkGatewayGroup, check func(*v1.NetworkGatewayGroup) (bool, error)) (*v1.NetworkGatewayGroup, error) {
	ri := l.Dynamic.Resource(kube.GatewayGVR).Namespace(from.Namespace)
	last, rv, reread := from, from.ResourceVersion, false
	// failing: the last failure retried, nil once a watch opens.
	var failing error
	ended := func() error {
		if failing != nil {
			return apiFailing{ctx.Err(), l.apiError(failing)}
		}
		return ctx.Err()
	}
	// pause waits before a retry; false when ctx ended.
	pause := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(retryDelay):
			return true
		}
	}
	// visit checks a state of the group.
	visit := func(g *v1.NetworkGatewayGroup) (bool, error) {
		last, rv = g, g.ResourceVersion
		return check(g)
	}
	for {
		if reread {
			u, err := ri.Get(ctx, from.Name, metav1.GetOptions{})
			switch {
			case ctx.Err() != nil:
				return last, ended()
			case apierrors.IsNotFound(err):
				return last, fmt.Errorf("NetworkGatewayGroup %s/%s was deleted", from.Namespace, from.Name)
			case retriable(err):
				failing = err
				if !pause() {
					return last, ended()
				}
				continue
			case err != nil:
				return last, l.apiError(err)
			}
			g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
			if err != nil {
				return last, err
			}
			reread = false
			if done, err := visit(g); done || err != nil {
				return last, err
			}
		}
		wi, err := ri.Watch(ctx, metav1.ListOptions{
			FieldSelector:       fields.OneTermEqualSelector("metadata.name", from.Name).String(),
			ResourceVersion:     rv,
			AllowWatchBookmarks: true,
		})
		switch {
		case ctx.Err() != nil:
			return last, ended()
		case apierrors.IsGone(err) || apierrors.IsResourceExpired(err):
			reread = true
			continue
		case retriable(err):
			failing = err
			if !pause() {
				return last, ended()
			}
			continue
		case err != nil:
			return last, fmt.Errorf("watch NetworkGatewayGroup %s/%s: %w", from.Namespace, from.Name, l.apiError(err))
		}
		failing = nil
		done, err := func() (bool, error) {
			defer wi.Stop()
			for events := 0; ; events++ {
				var ev watch.Event
				var ok bool
				select {
				case <-ctx.Done():
					return false, ended()
				case ev, ok = <-wi.ResultChan():
				}
				if !ok {
					// The server ended the watch: watch again from rv, not
					// at once if this one brought nothing.
					if events == 0 && !pause() {
						return false, ended()
					}
					return false, nil
				}
				switch ev.Type {
				case watch.Added, watch.Modified:
					g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](ev.Object)
					if err != nil {
						return false, err
					}
					if g.Name != from.Name {
						continue
					}
					if done, err := visit(g); done || err != nil {
						return done, err
					}
				case watch.Deleted:
					if m, err := apimeta.Accessor(ev.Object); err == nil && m.GetName() == from.Name {
						return false, fmt.Errorf("NetworkGatewayGroup %s/%s was deleted", from.Namespace, from.Name)
					}
				case watch.Bookmark:
					if m, err := apimeta.Accessor(ev.Object); err == nil {
						rv = m.GetResourceVersion()
					}
				case watch.Error:
					err := apierrors.FromObject(ev.Object)
					if apierrors.IsGone(err) || apierrors.IsResourceExpired(err) {
						reread = true
						return false, nil
					}
					failing = err
					if !pause() {
						return false, ended()
					}
					return false, nil
				}
			}
		}()
		if done || err != nil {
			return last, err
		}
	}
}

// retriable: a failure of the connection or of an overloaded or
// restarting API server, which a later try may not meet.
func retriable(err error) bool {
	if err == nil {
		return false
	}
	var st apierrors.APIStatus
	if !errors.As(err, &st) {
		return true
	}
	return apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) || apierrors.IsTooManyRequests(err) ||
		apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || apierrors.IsUnexpectedServerError(err)
}

// moveWaiter follows a move request through the group's states: the
// operator acting on it (status.observedMoveRequest), then the handovers
// of the IPs it names ending.
type moveWaiter struct {
	w      io.Writer
	prog   string
	req    gateway.MoveRequest
	value  string
	before *v1.NetworkGatewayGroup
	// observed: the operator has acted on value.
	observed bool
	// seen: the handovers already printed, by IP and target.
	seen map[string]bool
}

// check is watchGroup's: true once the operator has acted on the request
// and no handover names one of its IPs.
func (m *moveWaiter) check(g *v1.NetworkGatewayGroup) (bool, error) {
	if !m.observed {
		if g.Status.ObservedMoveRequest != m.value {
			if cur := g.Annotations[v1.AnnotationMoveRequest]; cur != m.value {
				if cur == "" {
					return false, errors.New("the move request was removed before the operator acted on it")
				}
				return false, fmt.Errorf("another move request (%s) replaced this one before the operator acted on it", cur)
			}
			return false, nil
		}
		m.observed = true
		fmt.Fprintf(m.w, "operator: %s\n", dash(g.Status.MoveRequestMessage))
	}
	pending := pendingHandovers(g, m.req)
	for _, h := range pending {
		if key := h.IP + "=" + h.To; !m.seen[key] {
			m.seen[key] = true
			fmt.Fprintf(m.w, "handover %s %s -> %s: %s\n", h.IP, orNone(h.From), orNone(h.To), h.Reason)
		}
	}
	return len(pending) == 0, nil
}

// finish prints the moves of the request's IPs since it was written, and
// fails when an IP it names did not reach the node asked for (did not
// move, for an IP without a node).
func (m *moveWaiter) finish(g *v1.NetworkGatewayGroup) error {
	m.printMoves(g)
	var unmet []string
	for _, ip := range slices.SortedFunc(maps.Keys(m.req.IPs), netip.Addr.Compare) {
		was, is := holderOf(m.before, ip.String()), holderOf(g, ip.String())
		switch node := m.req.IPs[ip]; {
		case node != "" && is != node:
			unmet = append(unmet, fmt.Sprintf("%s is held by %s, not %s", ip, orNone(is), node))
		case node == "" && is == was:
			unmet = append(unmet, fmt.Sprintf("%s did not move (held by %s)", ip, orNone(is)))
		}
	}
	if len(unmet) > 0 {
		return fmt.Errorf("move not done: %s", strings.Join(unmet, "; "))
	}
	return nil
}

// timedOut prints the moves done so far and says what is still pending.
func (m *moveWaiter) timedOut(g *v1.NetworkGatewayGroup, wait time.Duration, now time.Time) error {
	if !m.observed {
		if c := apimeta.FindStatusCondition(g.Status.Conditions, v1.ConditionAccepted); c != nil && c.Status == metav1.ConditionFalse {
			return fmt.Errorf("timed out after %s: the operator ignores the group (Accepted False, %s: %s)", wait, c.Reason, c.Message)
		}
		return fmt.Errorf("timed out after %s: the operator has not acted on the request (status.observedMoveRequest is %q): "+
			"is the operator running and leading, at a version that knows %s?", wait, g.Status.ObservedMoveRequest, v1.AnnotationMoveRequest)
	}
	m.printMoves(g)
	var pending []string
	for _, h := range pendingHandovers(g, m.req) {
		pending = append(pending, handoverText(h, now))
	}
	return fmt.Errorf("timed out after %s with handovers under way (the operator carries on; %s status shows them): %s",
		wait, m.prog, strings.Join(pending, "; "))
}

// printMoves prints the moves of the request's IPs that status.recentMoves
// did not list when the request was written, oldest first; or that none
// happened.
func (m *moveWaiter) printMoves(g *v1.NetworkGatewayGroup) {
	moves := newMoves(m.before, g, m.req)
	if len(moves) == 0 {
		fmt.Fprintln(m.w, "no floating IP moved")
	}
	for _, mv := range moves {
		fmt.Fprintf(m.w, "%s: %s -> %s (%s)\n", mv.IP, orNone(mv.From), orNone(mv.To), mv.Reason)
	}
}

// requested: whether the request names ip (every IP of the group for
// --all).
func requested(req gateway.MoveRequest, ip string) bool {
	if req.All {
		return true
	}
	a, err := parseAddr(ip)
	if err != nil {
		return false
	}
	_, ok := req.IPs[a]
	return ok
}

// pendingHandovers are the group's handovers of the IPs req names.
func pendingHandovers(g *v1.NetworkGatewayGroup, req gateway.MoveRequest) []v1.FloatingIPHandover {
	var out []v1.FloatingIPHandover
	for _, h := range g.Status.Handovers {
		if requested(req, h.IP) {
			out = append(out, h)
		}
	}
	return out
}

// newMoves are the entries of after's status.recentMoves that before's
// did not hold, for the IPs req names, by time then IP.
func newMoves(before, after *v1.NetworkGatewayGroup, req gateway.MoveRequest) []v1.FloatingIPMove {
	var out []v1.FloatingIPMove
	for _, mv := range after.Status.RecentMoves {
		old := slices.ContainsFunc(before.Status.RecentMoves, func(b v1.FloatingIPMove) bool {
			return b.IP == mv.IP && b.From == mv.From && b.To == mv.To && b.Reason == mv.Reason && b.Time.Equal(&mv.Time)
		})
		if !old && requested(req, mv.IP) {
			out = append(out, mv)
		}
	}
	slices.SortStableFunc(out, func(a, b v1.FloatingIPMove) int {
		if c := a.Time.Compare(b.Time.Time); c != 0 {
			return c
		}
		return strings.Compare(a.IP, b.IP)
	})
	return out
}

// handoverText is "192.0.2.100 worker1 -> worker2 since 3s: <reason>".
func handoverText(h v1.FloatingIPHandover, now time.Time) string {
	return fmt.Sprintf("%s %s -> %s since %s: %s", h.IP, orNone(h.From), orNone(h.To), age(h.Since.Time, now), h.Reason)
}

// age is how long before now t was, to the second: "0s" for a time to
// come (a clock ahead of this one), "-" for none.
func age(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return max(now.Sub(t).Round(time.Second), 0).String()
}
