// Command badinput proves that no object can hurt a node or the cluster's
// own traffic (issue #11). On a lab cluster (package cluster: real
// kube-apiserver, egressnat-operator and egressnat-agent, and a real
// kube-proxy in nftables mode on every node serving a Service) it makes
// hostile or mistaken inputs one at a time: floating IPs that are a node's,
// the router's, the subnet's network or broadcast address or unusable; one
// IP in two groups; groups in tenant namespaces; policies toward 0.0.0.0/0,
// the pod, Service and node networks; overlapping policies; references to
// missing gateways; malformed selectors and lists over the CRD maximums;
// more gateway nodes than the fwmark space holds; spoofed agent Leases.
//
// After each it checks:
//
//   - the answer: the API server rejected it, or within the report timeout
//     a concerned object has a False condition (or a True problem
//     condition such as Overlap) or a Warning Event explains it
//     ("reported"), else "unreported";
//   - harm while it exists: every node keeps its address, main routes and
//     standard ip rules, holds no other node's, the router's, network,
//     broadcast or off-subnet address, its Node keeps its InternalIP and
//     the baseline group reports it Up; pod-to-pod, pod-to-node,
//     pod-to-Service (ClusterIP through kube-proxy), node-to-node and
//     node/pod-to-external traffic is exactly as before (the source each
//     echo server sees), except where a case allows a selected pod's
//     external traffic another floating IP;
//   - after removing it: the nodes' nftables table, ip rules, addresses and
//     routes equal the baseline, and the traffic checks pass again.
//
// It prints one line per input, "badinput <name>: rejected|reported|
// unreported|HARMED <details>", and last "badinput tried=<n> harmed=<k>";
// it exits 1 when an input harmed, 2 when the harness itself failed.
// Every namespace, process and link it makes is removed on exit, also after
// a failure or Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

func main() {
	prefix := flag.String("prefix", "enat-bi-", "prefix of the lab's network namespaces")
	only := flag.String("only", "", "run only the inputs whose name matches this regular expression")
	list := flag.Bool("list", false, "list the inputs and exit")
	reportTimeout := flag.Duration("report-timeout", 5*time.Second, "how long an accepted input may take to be reported")
	verbose := flag.Bool("v", false, "print progress to stderr")
	control := flag.Bool("control", false, "first plant harm by hand (not through egressnat) and check that the checks catch it; not counted")
	flag.Parse()

	var re *regexp.Regexp
	if *only != "" {
		var err error
		if re, err = regexp.Compile(*only); err != nil {
			fmt.Fprintln(os.Stderr, "badinput: -only:", err)
			os.Exit(2)
		}
	}
	var todo []badCase
	for _, c := range cases() {
		if re == nil || re.MatchString(c.Name) {
			todo = append(todo, c)
		}
	}
	if *list {
		for _, c := range todo {
			fmt.Printf("%-36s %s\n", c.Name, c.About)
		}
		return
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "badinput: run as root (the lab uses network namespaces)")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, *prefix, todo, *reportTimeout, *verbose, *control))
}

func run(ctx context.Context, prefix string, todo []badCase, reportTimeout time.Duration, verbose, control bool) (code int) {
	began := time.Now()
	logf := func(f string, a ...any) {
		if verbose {
			fmt.Fprintf(os.Stderr, "badinput: "+f+"\n", a...)
		}
	}
	status := func(f string, a ...any) { fmt.Fprintf(os.Stderr, "badinput: "+f+"\n", a...) }

	var results []result
	fatal := ""
	defer func() {
		counts := map[string]int{}
		harmed := 0
		for _, r := range results {
			counts[r.how]++
			if r.outcome == outHarmed {
				harmed++
			}
		}
		if fatal != "" {
			fmt.Println("badinput error:", fatal)
		}
		fmt.Printf("badinput summary: rejected=%d reported=%d unreported=%d errors=%d wall=%s\n",
			counts[outRejected], counts[outReported], counts[outUnreported], counts[outError], time.Since(began).Round(time.Second))
		fmt.Printf("badinput tried=%d harmed=%d\n", len(results)-counts[outError], harmed)
		switch {
		case harmed > 0:
			code = 1
		case fatal != "" || counts[outError] > 0:
			code = 2
		}
	}()

	status("building kube-proxy %s if not cached (minutes, once)", apiserver.KubeVersion)
	if _, err := apiserver.KubeProxy(); err != nil {
		fatal = err.Error()
		return
	}
	status("starting the lab cluster (prefix %q) with kube-proxy on every node", prefix)
	c, err := cluster.Start(ctx, cluster.Options{Prefix: prefix, KubeProxy: true, Log: logf})
	if err != nil {
		fatal = "start cluster: " + err.Error()
		return
	}
	defer func() {
		if fatal != "" && verbose {
			fmt.Fprintln(os.Stderr, c.Logs())
		}
		if err := c.Close(); err != nil && fatal == "" {
			fatal = "close cluster: " + err.Error()
		}
		if left := lab.Namespaces(prefix); len(left) > 0 && fatal == "" {
			fatal = fmt.Sprintf("namespaces left behind: %v", left)
		}
	}()
	h, err := newHarness(c, reportTimeout, logf)
	if err != nil {
		fatal = err.Error()
		return
	}
	status("setting up pods, echo servers, Service %s and the baseline gateway and policy", svcIP)
	if err := h.setup(ctx); err != nil {
		fatal = "setup: " + err.Error()
		return
	}
	status("baseline ready after %s: %d probes; trying %d inputs", time.Since(began).Round(time.Second), len(h.probes), len(todo))
	if control {
		r, err := h.runCase(ctx, controlCase())
		if err != nil {
			fatal = "control: " + err.Error()
			return
		}
		if r.outcome != outHarmed {
			fatal = "control: planted harm was not detected: " + r.line()
			return
		}
		fmt.Println("badinput control: planted harm detected:", oneLine(strings.Join(r.harms, "; "), 600))
	}
	for _, cs := range todo {
		if ctx.Err() != nil {
			fatal = "interrupted"
			return
		}
		r, err := h.runCase(ctx, cs)
		if err != nil {
			r.outcome, r.how, r.report = outError, outError, err.Error()
		}
		results = append(results, r)
		fmt.Println(r.line())
		logf("%s took %s", cs.Name, r.took.Round(100*time.Millisecond))
		if err != nil {
			fatal = fmt.Sprintf("after %s: %v", cs.Name, err)
			return
		}
	}
	return 0
}
