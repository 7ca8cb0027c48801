// Package kubefake builds kube.Clients on client-go's fake clientsets, for
// the controllers' in-process tests. Only tests import it: the binaries do
// not link the fake clientsets.
package kubefake

import (
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
)

// Clients returns clients backed by client-go's fake clientsets, holding
// objs: core objects in the typed one, egressnat objects in the dynamic
// one.
func Clients(t testing.TB, objs ...runtime.Object) (*kube.Clients, *k8sfake.Clientset, *dynamicfake.FakeDynamicClient) {
	t.Helper()
	var core, custom []runtime.Object
	for _, o := range objs {
		switch o.(type) {
		case *v1.NetworkGatewayGroup, *v1.EgressNATPolicy:
			custom = append(custom, o)
		default:
			core = append(core, o)
		}
	}
	sch := runtime.NewScheme()
	if err := v1.AddToScheme(sch); err != nil {
		t.Fatal(err)
	}
	cs := k8sfake.NewClientset(core...)
	dyn := dynamicfake.NewSimpleDynamicClient(sch, custom...)
	return &kube.Clients{Core: cs, Dynamic: dyn}, cs, dyn
}

// Eventually polls cond until it holds, failing the test after 10 s. It is
// for what happens in other goroutines (informers, the controllers'
// loops), never a pause standing in for a condition.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}
