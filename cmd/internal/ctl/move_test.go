package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/kube/kubefake"
	"github.com/egressnat/egressnat/gateway"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TestMoveRequestArgs: the arguments after GROUP make the request, which
// formats to an annotation value that parses back to it; bad ones are
// usage errors.
func TestMoveRequestArgs(t *testing.T) {
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		args  []string
		all   bool
		want  gateway.MoveRequest
		value string // the annotation value without its id
		err   string
	}{
		{args: []string{"192.0.2.100"}, want: gateway.MoveRequest{IPs: map[netip.Addr]string{ip("192.0.2.100"): ""}}, value: "192.0.2.100"},
		{args: []string{"192.0.2.101=worker-3", "192.0.2.100"},
			want:  gateway.MoveRequest{IPs: map[netip.Addr]string{ip("192.0.2.100"): "", ip("192.0.2.101"): "worker-3"}},
			value: "192.0.2.100,192.0.2.101=worker-3"},
		{args: []string{" 192.0.2.100 = n1.example.com"}, want: gateway.MoveRequest{IPs: map[netip.Addr]string{ip("192.0.2.100"): "n1.example.com"}},
			value: "192.0.2.100=n1.example.com"},
		{all: true, want: gateway.MoveRequest{All: true}, value: "*"},

		{err: "name the floating IPs to move (IP, or IP=NODE), or --all"},
		{args: []string{""}, err: "names no floating IP"},
		{args: []string{"192.0.2.100"}, all: true, err: "--all moves every floating IP of the group: name no IP with it"},
		{args: []string{"*"}, err: "write --all"},
		{args: []string{"192.0.2.100,192.0.2.101"}, err: "want IP or IP=NODE, one per argument"},
		{args: []string{"192.0.2.100;myid"}, err: "want IP or IP=NODE, one per argument"},
		{args: []string{"web"}, err: `"web": not an IPv4 address`},
		{args: []string{"2001:db8::1"}, err: "not an IPv4 address"},
		{args: []string{"192.0.2.100="}, err: "no node after '='"},
		{args: []string{"192.0.2.100", "192.0.2.100=n1"}, err: "192.0.2.100 is named twice"},
		{args: []string{"192.0.2.100=Worker_1"}, err: "192.0.2.100=Worker_1: not a node name"},
	} {
		r, err := moveRequest(tc.args, tc.all)
		if tc.err != "" {
			if _, ok := err.(usageError); !ok || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q all=%v: %v (%T), want a usage error with %q", tc.args, tc.all, err, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(r, tc.want) || r.String() != tc.value {
			t.Errorf("%q all=%v: %+v %q, %v; want %+v %q", tc.args, tc.all, r, r.String(), err, tc.want, tc.value)
			continue
		}
		r.ID = newMoveID()
		back, err := gateway.ParseMoveRequest(r.String())
		if err != nil || !reflect.DeepEqual(back, r) {
			t.Errorf("%q: %q parses to %+v, %v; want %+v", tc.args, r.String(), back, err, r)
		}
	}
	if a, b := newMoveID(), newMoveID(); a == "" || a == b {
		t.Errorf("ids %q, %q: want fresh ones", a, b)
	}
}

func TestSplitGroupRef(t *testing.T) {
	for _, tc := range []struct {
		ref, flagNS, ns, name, err string
	}{
		{"default", "", "kube-system", "default", ""},
		{"gw", "team-a", "team-a", "gw", ""},
		{"team-a/gw", "", "team-a", "gw", ""},
		{"team-a/gw", "team-a", "team-a", "gw", ""},
		{"team-a/gw", "other", "", "", "-n other names another namespace"},
		{"/gw", "", "", "", "want GROUP as NAME or NAMESPACE/NAME"},
		{"a/", "", "", "", "want GROUP as NAME or NAMESPACE/NAME"},
		{"a/b/c", "", "", "", "want GROUP as NAME or NAMESPACE/NAME"},
		{"", "", "", "", "want GROUP as NAME or NAMESPACE/NAME"},
	} {
		ns, name, err := splitGroupRef(tc.ref, tc.flagNS)
		if ns != tc.ns || name != tc.name || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("splitGroupRef(%q, %q) = %q, %q, %v; want %q, %q, %q", tc.ref, tc.flagNS, ns, name, err, tc.ns, tc.name, tc.err)
		}
		if _, ok := err.(usageError); err != nil && !ok {
			t.Errorf("splitGroupRef(%q, %q): %T is not a usage error", tc.ref, tc.flagNS, err)
		}
	}
}

// TestMoveCommandLine: bad invocations exit 2 before any connection; the
// help says what a move is and what it needs.
func TestMoveCommandLine(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "absent"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"move"}, "move: name a NetworkGatewayGroup"},
		{[]string{"move", "default"}, "name the floating IPs to move (IP, or IP=NODE), or --all to rebalance the group"},
		{[]string{"move", "default", "192.0.2.100", "--all"}, "--all moves every floating IP of the group"},
		{[]string{"move", "default", "192.0.2.300"}, `move: "192.0.2.300": not an IPv4 address`},
		{[]string{"move", "a/b", "-n", "c", "--all"}, "-n c names another namespace"},
		{[]string{"move", "default", "--all", "--wait", "-1s"}, "--wait -1s: want a duration of 0 or more"},
		{[]string{"move", "default", "--all", "--wait", "soon"}, `invalid argument "soon" for "--wait" flag`},
	} {
		stdout, stderr, code := runMain(t, "egressnatctl", tc.args...)
		first, _, _ := strings.Cut(stderr, "\n")
		if code != 2 || stdout != "" || !strings.HasPrefix(first, "egressnatctl: ") || !strings.Contains(first, tc.want) ||
			!strings.Contains(stderr, "See 'egressnatctl move --help' for usage.") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 2 and %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
	stdout, _, code := runMain(t, "egressnatctl", "move", "--help")
	for _, want := range []string{"Usage:\n  egressnatctl move GROUP (IP[=NODE]... | --all) [flags]", "make before break", "never automatic",
		"egressnat-gateway-admin", "--all", "--wait duration", "(default 1m0s)", "-n, --namespace string", "move kube-system/default --all"} {
		if code != 0 || !strings.Contains(stdout, want) {
			t.Errorf("move --help: exit %d, lacks %q:\n%s", code, want, stdout)
		}
	}
}

// TestMoveOnTheWire: the request is a merge patch of the group in the
// namespace of GROUP, else of -n, else kube-system (not the context's).
func TestMoveOnTheWire(t *testing.T) {
	a, b := newFakeAPI(t, false), newFakeAPI(t, false)
	t.Setenv("KUBECONFIG", writeKubeconfig(t, a.URL, b.URL, "https://tls.example"))
	const ngg = "/apis/networking.gke.io/v1/namespaces/%s/networkgatewaygroups/%s"
	for _, tc := range []struct {
		args []string
		api  *fakeAPI
		path string
	}{
		{[]string{"move", "default", "192.0.2.100"}, a, "/apis/networking.gke.io/v1/namespaces/kube-system/networkgatewaygroups/default"},
		{[]string{"move", "gw", "-n", "team-a", "--all"}, a, "/apis/networking.gke.io/v1/namespaces/team-a/networkgatewaygroups/gw"},
		{[]string{"move", "team-a/gw", "--all"}, a, "/apis/networking.gke.io/v1/namespaces/team-a/networkgatewaygroups/gw"},
		{[]string{"--context", "b", "move", "default", "--all"}, b, "/apis/networking.gke.io/v1/namespaces/kube-system/networkgatewaygroups/default"},
	} {
		// The fake answers 404 without naming the object: no CRDs.
		_, stderr, code := runMain(t, "egressnatctl", tc.args...)
		reqs := tc.api.requests()
		if code != 1 || stderr != "egressnatctl: "+ErrCRDsMissing.Error()+"\n" || len(reqs) != 1 || reqs[0].Method != "PATCH" ||
			reqs[0].URL.Path != tc.path || reqs[0].Header.Get("Content-Type") != "application/merge-patch+json" {
			t.Errorf("%v: exit %d, %q, %d requests %v; want PATCH %s", tc.args, code, stderr, len(reqs), reqs, tc.path)
		}
	}
}

// moveFake serves g from a fake dynamic client; every watch it opens is
// announced on watching.
func moveFake(t *testing.T, g *v1.NetworkGatewayGroup) (l *Loader, dyn *dynamicfake.FakeDynamicClient, watching <-chan struct{}) {
	t.Helper()
	c, _, dyn := kubefake.Clients(t, g)
	w := make(chan struct{}, 16)
	dyn.PrependWatchReactor("networkgatewaygroups", func(a k8stesting.Action) (bool, watch.Interface, error) {
		wi, err := dyn.Tracker().Watch(kube.GatewayGVR, a.GetNamespace())
		w <- struct{}{}
		return true, wi, err
	})
	return &Loader{Core: c.Core, Dynamic: dyn, Host: "https://test"}, dyn, w
}

// setGroupStatus changes the group's status as the operator would, in
// the fake's tracker (so that reactors may call it).
func setGroupStatus(t *testing.T, dyn *dynamicfake.FakeDynamicClient, ns, name string, change func(*v1.NetworkGatewayGroupStatus)) {
	t.Helper()
	u, err := dyn.Tracker().Get(kube.GatewayGVR, ns, name)
	if err != nil {
		t.Error(err)
		return
	}
	g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
	if err != nil {
		t.Error(err)
		return
	}
	change(&g.Status)
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(g)
	if err != nil {
		t.Error(err)
		return
	}
	if err := dyn.Tracker().Update(kube.GatewayGVR, &unstructured.Unstructured{Object: m}, ns); err != nil {
		t.Error(err)
	}
}

var moveEpoch = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// testGroup: kube-system/default, 192.0.2.100 and .101 on worker1, .102
// on worker2, and an old move in recentMoves.
func testGroup() *v1.NetworkGatewayGroup {
	return &v1.NetworkGatewayGroup{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1.GroupVersion.String(), Kind: "NetworkGatewayGroup"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "default"},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: []string{"192.0.2.100", "192.0.2.101", "192.0.2.102"}},
		Status: v1.NetworkGatewayGroupStatus{
			Nodes:       map[string]v1.NodeHealth{"worker1": v1.NodeUp, "worker2": v1.NodeUp},
			FloatingIPs: map[string]string{"192.0.2.100": "worker1", "192.0.2.101": "worker1", "192.0.2.102": "worker2"},
			RecentMoves: []v1.FloatingIPMove{{IP: "192.0.2.100", From: "worker2", To: "worker1", Reason: "node worker2 Down",
				Time: metav1.NewTime(moveEpoch.Add(-time.Hour))}},
		},
	}
}

// annotation is the group's move request as the fake holds it.
func annotation(t *testing.T, dyn *dynamicfake.FakeDynamicClient) string {
	t.Helper()
	u, err := dyn.Resource(kube.GatewayGVR).Namespace("kube-system").Get(context.Background(), "default", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return u.GetAnnotations()[v1.AnnotationMoveRequest]
}

// TestMoveWaits: the patch sets the annotation alone; the command waits
// for the operator to act on it, then for the handover to end, and
// prints the message and the move.
func TestMoveWaits(t *testing.T) {
	g := testGroup()
	g.Annotations = map[string]string{"keep": "me"}
	l, dyn, watching := moveFake(t, g)
	var patches []string
	dyn.PrependReactor("patch", "networkgatewaygroups", func(a k8stesting.Action) (bool, runtime.Object, error) {
		p := a.(k8stesting.PatchAction)
		if p.GetPatchType() != "application/merge-patch+json" || p.GetSubresource() != "" {
			t.Errorf("patch %s of %q", p.GetPatchType(), p.GetSubresource())
		}
		patches = append(patches, string(p.GetPatch()))
		return false, nil, nil
	})
	req, err := moveRequest([]string{"192.0.2.100=worker2"}, false)
	if err != nil {
		t.Fatal(err)
	}
	req.ID = newMoveID()
	value := req.String()

	operator := make(chan struct{})
	go func() {
		defer close(operator)
		<-watching
		if got := annotation(t, dyn); got != value {
			t.Errorf("annotation %q, want %q", got, value)
		}
		// Another change first: not yet acted on.
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) { s.AssignedCount = 3 })
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.ObservedMoveRequest, s.MoveRequestMessage = value, "moving 192.0.2.100 from worker1 to worker2"
			s.Handovers = []v1.FloatingIPHandover{
				{IP: "192.0.2.100", From: "worker1", To: "worker2", Reason: "requested (egressnat.io/move-request)", Since: metav1.NewMicroTime(moveEpoch)},
				// Not requested: not waited for.
				{IP: "192.0.2.101", From: "worker1", To: "worker2", Reason: "node worker1 cordoned", Since: metav1.NewMicroTime(moveEpoch)},
			}
		})
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.Handovers = s.Handovers[1:]
			s.FloatingIPs["192.0.2.100"] = "worker2"
			s.RecentMoves = append(s.RecentMoves,
				v1.FloatingIPMove{IP: "192.0.2.100", From: "worker1", To: "worker2", Reason: "requested (egressnat.io/move-request)", Time: metav1.NewTime(moveEpoch.Add(time.Second))})
		})
	}()
	var out bytes.Buffer
	err = runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	<-operator
	want := "move request written on kube-system/default: " + value + "\n" +
		"operator: moving 192.0.2.100 from worker1 to worker2\n" +
		"handover 192.0.2.100 worker1 -> worker2: requested (egressnat.io/move-request)\n" +
		"192.0.2.100: worker1 -> worker2 (requested (egressnat.io/move-request))\n"
	if err != nil || out.String() != want {
		t.Fatalf("runMove: %v\n%s\nwant:\n%s", err, out.String(), want)
	}

	// The patch: metadata.annotations only, the others kept.
	if len(patches) != 1 {
		t.Fatalf("%d patches", len(patches))
	}
	var p map[string]any
	if err := json.Unmarshal([]byte(patches[0]), &p); err != nil {
		t.Fatal(err)
	}
	if want := map[string]any{"metadata": map[string]any{"annotations": map[string]any{v1.AnnotationMoveRequest: value}}}; !reflect.DeepEqual(p, want) {
		t.Errorf("patch %s", patches[0])
	}
	u, err := dyn.Resource(kube.GatewayGVR).Namespace("kube-system").Get(context.Background(), "default", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	back, err := gateway.ParseMoveRequest(u.GetAnnotations()[v1.AnnotationMoveRequest])
	if err != nil || !reflect.DeepEqual(back, req) || u.GetAnnotations()["keep"] != "me" {
		t.Errorf("annotations %v: %+v, %v; want %+v", u.GetAnnotations(), back, err, req)
	}
}

// TestMoveAll: --all waits for every handover of the group.
func TestMoveAll(t *testing.T) {
	l, dyn, watching := moveFake(t, testGroup())
	req := gateway.MoveRequest{All: true, ID: newMoveID()}
	value := req.String()
	go func() {
		<-watching
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.ObservedMoveRequest, s.MoveRequestMessage = value, "rebalancing: moving 192.0.2.101 from worker1 to worker2"
			s.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.101", From: "worker1", To: "worker2", Reason: "requested rebalance", Since: metav1.NewMicroTime(moveEpoch)}}
		})
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.Handovers = nil
			s.FloatingIPs["192.0.2.101"] = "worker2"
			s.RecentMoves = append(s.RecentMoves, v1.FloatingIPMove{IP: "192.0.2.101", From: "worker1", To: "worker2", Reason: "requested rebalance", Time: metav1.NewTime(moveEpoch)})
		})
	}()
	var out bytes.Buffer
	err := runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	if want := "move request written on kube-system/default: " + value + "\n" +
		"operator: rebalancing: moving 192.0.2.101 from worker1 to worker2\n" +
		"handover 192.0.2.101 worker1 -> worker2: requested rebalance\n" +
		"192.0.2.101: worker1 -> worker2 (requested rebalance)\n"; err != nil || out.String() != want {
		t.Errorf("runMove: %v\n%s\nwant:\n%s", err, out.String(), want)
	}
	if got := annotation(t, dyn); got != value || !strings.HasPrefix(got, "*;") {
		t.Errorf("annotation %q, want %q", got, value)
	}
}

// TestMoveNotDone: the operator acted but an IP named did not get where
// it was asked to: exit 1, naming it.
func TestMoveNotDone(t *testing.T) {
	l, dyn, watching := moveFake(t, testGroup())
	req, err := moveRequest([]string{"192.0.2.9", "192.0.2.102=worker1", "192.0.2.101"}, false)
	if err != nil {
		t.Fatal(err)
	}
	req.ID = newMoveID()
	go func() {
		<-watching
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.ObservedMoveRequest = req.String()
			s.MoveRequestMessage = "192.0.2.9 is not a floating IP of this group; 192.0.2.101: no other node can hold it; moving 192.0.2.102 from worker2 to worker1"
			s.FloatingIPs["192.0.2.102"] = "worker1" // at once, without a handover
		})
	}()
	var out bytes.Buffer
	err = runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	if want := "move not done: 192.0.2.9 did not move (held by <none>); 192.0.2.101 did not move (held by worker1)"; err == nil || err.Error() != want {
		t.Errorf("runMove: %v, want %q", err, want)
	}
	if !strings.Contains(out.String(), "operator: 192.0.2.9 is not a floating IP of this group;") || !strings.HasSuffix(out.String(), "\nno floating IP moved\n") {
		t.Errorf("output:\n%s", out.String())
	}
}

// TestMoveTimeout: when the time runs out, what is pending: the operator
// not acting at all, or a handover not ended (after the moves done).
func TestMoveTimeout(t *testing.T) {
	l, _, _ := moveFake(t, testGroup())
	req := gateway.MoveRequest{All: true, ID: newMoveID()}
	var out bytes.Buffer
	start := time.Now()
	err := runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 200*time.Millisecond)
	if err == nil || !strings.HasPrefix(err.Error(), "timed out after 200ms: the operator has not acted on the request") ||
		!strings.Contains(err.Error(), v1.AnnotationMoveRequest) || time.Since(start) > 5*time.Second {
		t.Errorf("not acted on: %v after %s", err, time.Since(start))
	}
	l, dyn, watching := moveFake(t, testGroup())
	req, _ = moveRequest([]string{"192.0.2.100", "192.0.2.101"}, false)
	req.ID = newMoveID()
	since := time.Now().Add(-42 * time.Second)
	go func() {
		<-watching
		setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
			s.ObservedMoveRequest, s.MoveRequestMessage = req.String(), "moving 192.0.2.100 from worker1 to worker2, 192.0.2.101 from worker1 to worker2"
			s.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.101", From: "worker1", To: "worker2", Reason: "requested", Since: metav1.NewMicroTime(since)}}
			s.FloatingIPs["192.0.2.100"] = "worker2"
			s.RecentMoves = append(s.RecentMoves, v1.FloatingIPMove{IP: "192.0.2.100", From: "worker1", To: "worker2", Reason: "requested", Time: metav1.NewTime(since)})
		})
	}()
	out.Reset()
	err = runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, time.Second)
	if err == nil || !strings.HasPrefix(err.Error(), "timed out after 1s with handovers under way") ||
		!strings.Contains(err.Error(), ": 192.0.2.101 worker1 -> worker2 since 4") { // 42s or 43s
		t.Errorf("handover pending: %v", err)
	}
	if !strings.HasSuffix(out.String(), "handover 192.0.2.101 worker1 -> worker2: requested\n192.0.2.100: worker1 -> worker2 (requested)\n") {
		t.Errorf("handover pending, output:\n%s", out.String())
	}
	// The API server failing all along: said too.
	l, dyn, _ = moveFake(t, testGroup())
	var watches int
	dyn.PrependWatchReactor("networkgatewaygroups", func(k8stesting.Action) (bool, watch.Interface, error) {
		watches++
		return true, nil, errors.New("connection refused")
	})
	err = runMove(context.Background(), l, &bytes.Buffer{}, "egressnatctl", "kube-system", "default", req, 1200*time.Millisecond)
	if err == nil || !strings.HasPrefix(err.Error(), "timed out after 1.2s: the operator has not acted on the request") ||
		!strings.HasSuffix(err.Error(), "; the API server failed meanwhile: cannot reach the Kubernetes API at https://test: connection refused") ||
		watches < 2 || watches > 4 { // every retryDelay
		t.Errorf("API failing: %v after %d watches", err, watches)
	}
}

// TestMoveReplaced: another request replacing this one before the
// operator acted on it ends the wait.
func TestMoveReplaced(t *testing.T) {
	l, dyn, watching := moveFake(t, testGroup())
	req := gateway.MoveRequest{All: true, ID: newMoveID()}
	go func() {
		<-watching
		_, err := dyn.Resource(kube.GatewayGVR).Namespace("kube-system").Patch(context.Background(), "default", "application/merge-patch+json",
			[]byte(`{"metadata":{"annotations":{"egressnat.io/move-request":"192.0.2.100;other"}}}`), metav1.PatchOptions{})
		if err != nil {
			t.Error(err)
		}
	}()
	err := runMove(context.Background(), l, &bytes.Buffer{}, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	if err == nil || err.Error() != "another move request (192.0.2.100;other) replaced this one before the operator acted on it" {
		t.Errorf("runMove: %v", err)
	}
}

// TestMoveWatchRecovers: a watch that ends, or whose resource version
// has expired, is followed by a fresh read of the group and a new watch.
func TestMoveWatchRecovers(t *testing.T) {
	l, dyn, _ := moveFake(t, testGroup())
	req := gateway.MoveRequest{All: true, ID: newMoveID()}
	value := req.String()
	var watches []string
	dyn.PrependWatchReactor("networkgatewaygroups", func(a k8stesting.Action) (bool, watch.Interface, error) {
		o := a.(k8stesting.WatchAction).GetWatchRestrictions()
		watches = append(watches, o.Fields.String())
		w := watch.NewFake()
		switch len(watches) {
		case 1: // ends at once
			w.Stop()
		case 2: // expired; meanwhile the operator acted and the moves ended
			setGroupStatus(t, dyn, "kube-system", "default", func(s *v1.NetworkGatewayGroupStatus) {
				s.ObservedMoveRequest, s.MoveRequestMessage = value, "nothing to move: every IP is where a fresh assignment puts it"
			})
			go w.Error(&apierrors.NewResourceExpired("too old resource version").ErrStatus)
		default:
			t.Errorf("watch %d: the group was read afresh and done", len(watches))
		}
		return true, w, nil
	})
	var gets int
	dyn.PrependReactor("get", "networkgatewaygroups", func(k8stesting.Action) (bool, runtime.Object, error) {
		gets++
		return false, nil, nil
	})
	var out bytes.Buffer
	err := runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	if want := "move request written on kube-system/default: " + value + "\n" +
		"operator: nothing to move: every IP is where a fresh assignment puts it\nno floating IP moved\n"; err != nil || out.String() != want {
		t.Errorf("runMove: %v\n%s\nwant:\n%s", err, out.String(), want)
	}
	if len(watches) != 2 || watches[0] != "metadata.name=default" || gets != 1 {
		t.Errorf("watches %q, %d gets", watches, gets)
	}
}

// TestMoveNoWait: --wait 0 writes the request and returns.
func TestMoveNoWait(t *testing.T) {
	l, dyn, _ := moveFake(t, testGroup())
	req := gateway.MoveRequest{IPs: map[netip.Addr]string{netip.MustParseAddr("192.0.2.102"): ""}, ID: newMoveID()}
	var out bytes.Buffer
	if err := runMove(context.Background(), l, &out, "egressnatctl", "kube-system", "default", req, 0); err != nil ||
		out.String() != "move request written on kube-system/default: "+req.String()+"\nnot waiting (--wait 0): egressnatctl status shows the handovers under way\n" {
		t.Errorf("runMove: %v, %q", err, out.String())
	}
	var verbs []string
	for _, a := range dyn.Actions() {
		verbs = append(verbs, a.GetVerb())
	}
	if !slices.Equal(verbs, []string{"patch"}) {
		t.Errorf("--wait 0: requests %q, want a patch alone", verbs)
	}
	if got := annotation(t, dyn); got != req.String() {
		t.Errorf("annotation %q", got)
	}
}

// TestMoveRequestErrors: a missing group, missing rights.
func TestMoveRequestErrors(t *testing.T) {
	l, dyn, _ := moveFake(t, testGroup())
	req := gateway.MoveRequest{All: true, ID: "x"}
	if err := runMove(context.Background(), l, &bytes.Buffer{}, "egressnatctl", "kube-system", "nope", req, 0); err == nil ||
		err.Error() != "NetworkGatewayGroup kube-system/nope not found" {
		t.Errorf("missing group: %v", err)
	}
	dyn.PrependReactor("patch", "networkgatewaygroups", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "networking.gke.io", Resource: "networkgatewaygroups"}, "default", errors.New("RBAC: no"))
	})
	err := runMove(context.Background(), l, &bytes.Buffer{}, "egressnatctl", "kube-system", "default", req, 0)
	if err == nil || !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "patch on networkgatewaygroups in kube-system: the role egressnat-gateway-admin") {
		t.Errorf("forbidden: %v", err)
	}

	// Allowed to patch, not to watch: no retry.
	l, dyn, _ = moveFake(t, testGroup())
	dyn.PrependWatchReactor("networkgatewaygroups", func(k8stesting.Action) (bool, watch.Interface, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "networking.gke.io", Resource: "networkgatewaygroups"}, "", errors.New("RBAC: no"))
	})
	start := time.Now()
	err = runMove(context.Background(), l, &bytes.Buffer{}, "egressnatctl", "kube-system", "default", req, 10*time.Second)
	if err == nil || !apierrors.IsForbidden(err) || !strings.HasPrefix(err.Error(), "watch NetworkGatewayGroup kube-system/default: ") || time.Since(start) > 5*time.Second {
		t.Errorf("watch forbidden: %v after %s", err, time.Since(start))
	}
}

// TestStatusHandovers: status lists the handovers under way below the
// tables, and in JSON only when there are some.
func TestStatusHandovers(t *testing.T) {
	g := testGroup()
	g.Status.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.100", From: "worker1", To: "worker2",
		Reason: "node worker1 cordoned (spec.unschedulable)", Since: metav1.NewMicroTime(moveEpoch)}}
	r := BuildStatus(&Snapshot{Gateways: []*v1.NetworkGatewayGroup{g, testGroup()}})
	r.Gateways[1].Name = "other"
	var b bytes.Buffer
	if err := writeStatusTables(&b, r, moveEpoch.Add(3*time.Second+400*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if want := "\ngateway kube-system/default: handover 192.0.2.100 worker1 -> worker2 since 3s: node worker1 cordoned (spec.unschedulable)\n"; !strings.HasSuffix(b.String(), want) ||
		strings.Count(b.String(), "handover") != 1 {
		t.Errorf("tables:\n%s\nwant them to end with %q", b.String(), want)
	}
	b.Reset()
	if err := WriteStatus(&b, r, FormatJSON); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Gateways []map[string]json.RawMessage `json:"gateways"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	var hs []v1.FloatingIPHandover
	if err := json.Unmarshal(got.Gateways[0]["handovers"], &hs); err != nil || len(hs) != 1 || !hs[0].Since.Equal(&g.Status.Handovers[0].Since) ||
		hs[0].IP != "192.0.2.100" || hs[0].From != "worker1" || hs[0].To != "worker2" || hs[0].Reason != g.Status.Handovers[0].Reason {
		t.Errorf("handovers %+v, %v", hs, err)
	}
	if _, ok := got.Gateways[1]["handovers"]; ok {
		t.Errorf("a gateway without handovers has the key")
	}
	if a := age(time.Time{}, moveEpoch); a != "-" {
		t.Errorf("age of zero: %q", a)
	}
	if a := age(moveEpoch.Add(time.Minute), moveEpoch); a != "0s" {
		t.Errorf("age of a time to come: %q", a)
	}
}
