// Command kube-binaries builds and caches the kube-apiserver and kubectl the
// tests and the lab run, and prints their paths. With -kube-proxy it also
// builds kube-proxy, with -kube-router kube-router (the end-to-end suite's
// NetworkPolicy implementation), with -cluster kubelet,
// kube-controller-manager and kube-scheduler, with -controller-manager
// kube-controller-manager alone (test/deploy's ClusterRole aggregation),
// with -floor the kube-apiserver and kubectl of the oldest supported
// release (test/floor), and prints their paths after.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/egressnat/egressnat/test/apiserver"
)

func main() {
	proxy := flag.Bool("kube-proxy", false, "also build and cache kube-proxy")
	router := flag.Bool("kube-router", false, "also build and cache kube-router (the lab's NetworkPolicy implementation)")
	cluster := flag.Bool("cluster", false, "also build and cache kubelet, kube-controller-manager and kube-scheduler (make cluster)")
	kcm := flag.Bool("controller-manager", false, "also build and cache kube-controller-manager (test/deploy)")
	floor := flag.Bool("floor", false, "also build and cache the kube-apiserver and kubectl of "+apiserver.FloorKubeVersion+" (test/floor)")
	flag.Parse()
	a, k, err := apiserver.Binaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-binaries:", err)
		os.Exit(1)
	}
	fmt.Println(a)
	fmt.Println(k)
	if *proxy {
		p, err := apiserver.KubeProxy()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(p)
	}
	if *cluster {
		b, err := apiserver.ClusterBinaries()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(b.Kubelet)
		fmt.Println(b.ControllerManager)
		fmt.Println(b.Scheduler)
	}
	if *kcm {
		p, err := apiserver.ControllerManager()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(p)
	}
	if *floor {
		a, k, err := apiserver.FloorBinaries()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(a)
		fmt.Println(k)
	}
	if *router {
		p, err := apiserver.KubeRouter()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(p)
	}
}
