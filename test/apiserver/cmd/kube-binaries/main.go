// Command kube-binaries builds and caches the kube-apiserver and kubectl the
// tests and the lab run, and prints their paths. With -kube-proxy it also
// builds kube-proxy (for make badinput) and prints its path last.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/egressnat/egressnat/test/apiserver"
)

func main() {
	proxy := flag.Bool("kube-proxy", false, "also build and cache kube-proxy")
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
}
