//go:build tools

// Package kubetools pins the kube-apiserver, kubectl and kube-proxy binaries
// that the test harness builds. It is a separate module so that the
// product's go.mod never depends on k8s.io/kubernetes.
package kubetools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
