// Command kube-binaries builds and caches the kube-apiserver and kubectl the
// tests and the lab run, and prints their paths. With -kube-proxy it also
// builds kube-proxy, with -kube-router kube-router (the end-to-end suite's
// NetworkPolicy implementation), and prints their paths after.
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
	if *router {
		p, err := apiserver.KubeRouter()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-binaries:", err)
			os.Exit(1)
		}
		fmt.Println(p)
	}
}
