// Command egressnatctl is the operators' tool for egressnat (also usable as
// the kubectl plugin kubectl-egressnat). Its commands arrive with the
// operability work; today it prints usage.
package main

import (
	"fmt"
	"os"
)

const usage = `egressnatctl: inspect egressnat

Usage:
  egressnatctl status                      gateways, holders and policies (coming)
  egressnatctl explain pod NAMESPACE/NAME  why a pod is or is not selected (coming)
  egressnatctl ruleset                     this node's nftables table and routes (coming)
`

func main() {
	fmt.Fprint(os.Stderr, usage)
	if len(os.Args) > 1 && (os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help") {
		return
	}
	os.Exit(2)
}
