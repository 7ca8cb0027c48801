package kube

import (
	"context"
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// TestListSlimRestartsOnExpiredContinue: a continue token the server no
// longer honours restarts the list from the current state, without
// duplicates.
func TestListSlimRestartsOnExpiredContinue(t *testing.T) {
	defer SetListPageSize(2)()
	all := []string{"a", "b", "c", "d", "e"}
	var calls []metav1.ListOptions
	expired := false
	list := func(o metav1.ListOptions) (*corev1.PodList, error) {
		calls = append(calls, o)
		if o.Limit != 2 || o.ResourceVersion != "" {
			return nil, fmt.Errorf("unexpected options %+v", o)
		}
		start := 0
		if o.Continue != "" {
			if o.Continue == "2" && !expired {
				expired = true
				return nil, apierrors.NewResourceExpired("continue token expired")
			}
			fmt.Sscan(o.Continue, &start)
		}
		l := &corev1.PodList{ListMeta: metav1.ListMeta{ResourceVersion: "42"}}
		for i := start; i < start+2 && i < len(all); i++ {
			l.Items = append(l.Items, corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: all[i], Namespace: "ns",
				Annotations: map[string]string{"big": "yes"}}})
		}
		if start+2 < len(all) {
			l.Continue = fmt.Sprint(start + 2)
		}
		return l, nil
	}
	slim := func(obj any) (any, error) {
		p := obj.(*corev1.Pod)
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}}, nil
	}
	got, err := listSlim(context.Background(), func(error) {}, list, metav1.ListOptions{ResourceVersion: "0", Limit: 500}, slim)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, obj := range got.Items {
		p := obj.(*corev1.Pod)
		if p.Annotations != nil {
			t.Errorf("pod %s not slimmed", p.Name)
		}
		names = append(names, p.Name)
	}
	if fmt.Sprint(names) != fmt.Sprint(all) || got.ResourceVersion != "42" {
		t.Errorf("got %v at %q, want %v at 42", names, got.ResourceVersion, all)
	}
	if len(calls) != 5 { // a, expired, a (again), c, e
		t.Errorf("%d list calls, want 5: %+v", len(calls), calls)
	}

	// Errors a retry cannot fix come back at once.
	forbidden := func(metav1.ListOptions) (*corev1.PodList, error) {
		return nil, apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, "", fmt.Errorf("no"))
	}
	if _, err := listSlim(context.Background(), func(error) {}, forbidden, metav1.ListOptions{}, slim); !apierrors.IsForbidden(err) {
		t.Errorf("got %v, want forbidden", err)
	}
}
