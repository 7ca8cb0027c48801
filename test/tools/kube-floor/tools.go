//go:build tools

// Package kubefloortools pins the kube-apiserver and kubectl of the oldest
// Kubernetes release egressnat supports, which test/floor runs. It is a
// separate module so that the product's go.mod never depends on
// k8s.io/kubernetes, and the current release's tools (test/tools/kube)
// never on this one.
package kubefloortools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
