// Command kube-binaries builds and caches the kube-apiserver and kubectl the
// tests and the lab run, and prints their paths.
package main

import (
	"fmt"
	"os"

	"github.com/egressnat/egressnat/test/apiserver"
)

func main() {
	a, k, err := apiserver.Binaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-binaries:", err)
		os.Exit(1)
	}
	fmt.Println(a)
	fmt.Println(k)
}
