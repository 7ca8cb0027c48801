package main

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/ctl"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/gateway"
)

// TestMoveRealAPI: egressnatctl move against a real kube-apiserver: the
// merge patch of the annotation, then the wait on the group's watch while
// the test, as the operator would, writes the status subresource: the
// request observed with a handover, then the handover done.
func TestMoveRealAPI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dyn, err := dynamic.NewForConfig(srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	ri := dyn.Resource(kube.GatewayGVR).Namespace("kube-system")
	g := &v1.NetworkGatewayGroup{TypeMeta: metav1.TypeMeta{APIVersion: v1.GroupVersion.String(), Kind: "NetworkGatewayGroup"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "moves"},
		Spec:       v1.NetworkGatewayGroupSpec{FloatingIPs: []string{"192.0.2.120"}}}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(g)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ri.Create(ctx, &unstructured.Unstructured{Object: m}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ri.Delete(context.Background(), "moves", metav1.DeleteOptions{}) }) //nolint:errcheck
	writeStatus := func(change func(*v1.NetworkGatewayGroupStatus)) {
		t.Helper()
		u, err := ri.Get(ctx, "moves", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cur, err := kube.FromUnstructured[v1.NetworkGatewayGroup](u)
		if err != nil {
			t.Fatal(err)
		}
		change(&cur.Status)
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cur)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ri.UpdateStatus(ctx, &unstructured.Unstructured{Object: m}, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	writeStatus(func(st *v1.NetworkGatewayGroupStatus) { st.FloatingIPs = map[string]string{"192.0.2.120": "worker1"} })

	// --wait 0: the request is written and parses back.
	if out, errOut, code := ctlRun(t, "move", "kube-system/moves", "192.0.2.120=worker2", "--wait", "0"); code != 0 {
		t.Fatalf("move --wait 0: exit %d: %s %s", code, out, errOut)
	}
	u, err := ri.Get(ctx, "moves", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	first := u.GetAnnotations()[v1.AnnotationMoveRequest]
	req, err := gateway.ParseMoveRequest(first)
	if err != nil || req.IPs[mustAddr("192.0.2.120")] != "worker2" || req.ID == "" {
		t.Fatalf("annotation %q: %+v %v", first, req, err)
	}

	// With the wait: the command follows the status the "operator" writes.
	var out, errOut bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- ctl.Main(ctx, "egressnatctl", []string{"--kubeconfig", srv.Kubeconfig, "move", "moves", "-n", "kube-system", "192.0.2.120", "--wait", "30s"}, &out, &errOut)
	}()
	var value string
	deadline := time.Now().Add(20 * time.Second)
	for value == "" || value == first {
		if time.Now().After(deadline) {
			t.Fatalf("no new request written: %q", value)
		}
		u, err := ri.Get(ctx, "moves", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		value = u.GetAnnotations()[v1.AnnotationMoveRequest]
		time.Sleep(20 * time.Millisecond)
	}
	writeStatus(func(st *v1.NetworkGatewayGroupStatus) {
		st.ObservedMoveRequest, st.MoveRequestMessage = value, "moving 192.0.2.120 from worker1 to worker2"
		st.Handovers = []v1.FloatingIPHandover{{IP: "192.0.2.120", From: "worker1", To: "worker2", Reason: "requested (egressnat.io/move-request)",
			Since: metav1.NewMicroTime(time.Now())}}
	})
	writeStatus(func(st *v1.NetworkGatewayGroupStatus) {
		st.Handovers = nil
		st.FloatingIPs = map[string]string{"192.0.2.120": "worker2"}
		st.RecentMoves = []v1.FloatingIPMove{{IP: "192.0.2.120", From: "worker1", To: "worker2", Reason: "planned: requested (egressnat.io/move-request)",
			Time: metav1.Now()}}
	})
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("move: exit %d: %s %s", code, out.String(), errOut.String())
		}
	case <-ctx.Done():
		t.Fatal("move did not return")
	}
	for _, want := range []string{"operator: moving 192.0.2.120 from worker1 to worker2", "192.0.2.120: worker1 -> worker2 (planned: requested"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output %q lacks %q", out.String(), want)
		}
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
