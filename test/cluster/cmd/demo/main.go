// Command demo runs egressnat's main job on the built-in lab: it starts a
// cluster in network namespaces on this machine (a control-plane host with
// etcd and kube-apiserver, nodes cp1, worker1 and worker2, a router and
// external servers), runs the real operator and agents, applies the seed's
// scenario and shows, for each pod, the source IP the external server saw.
// Then it tears everything down; --keep leaves the lab running until Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

const prefix = "enat-demo-"

var scenario = cluster.SeedScenario

func main() {
	keep := flag.Bool("keep", false, "leave the lab running after the walkthrough, until Ctrl-C")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: run as root (the lab uses network namespaces)")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(f string, a ...any) { fmt.Printf("\n==> "+f+"\n", a...) }

func run(ctx context.Context, keep bool) (err error) {
	step("Starting the lab cluster")
	c, err := cluster.Start(ctx, cluster.Options{Prefix: prefix, Log: func(f string, a ...any) { fmt.Printf("    "+f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer func() {
		step("Tearing down")
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if left := lab.Namespaces(prefix); len(left) > 0 {
			if err == nil {
				err = fmt.Errorf("namespaces left behind: %v", left)
			}
			return
		}
		fmt.Println("    every namespace, link and process of the lab is gone")
	}()
	if err := walkthrough(ctx, c); err != nil {
		fmt.Println(c.Logs())
		return err
	}
	if keep {
		step("The lab keeps running; Ctrl-C tears it down")
		fmt.Printf(`    export KUBECONFIG=%s
    alias kubectl=%s
    kubectl get egressnat -A
    ip netns exec %sworker1 nft list table ip egressnat     # the gateway node
    ip netns exec %sworker2 nft list table ip egressnat     # a source node
    ip netns exec %sworker2 ip rule; ip netns exec %sworker2 ip route show table all | grep 'table 27'
`, c.API.Kubeconfig, c.API.KubectlPath, prefix, prefix, prefix, prefix)
		<-ctx.Done()
	}
	return nil
}

func walkthrough(ctx context.Context, c *cluster.Cluster) error {
	fmt.Println("    nodes: cp1 192.0.2.11 (control plane), worker1 192.0.2.12, worker2 192.0.2.13")
	fmt.Println("    external servers: ext1 203.0.113.10, ext2 198.51.100.10; they answer with the source they saw")

	step("Creating namespaces and pods through the API, as a kubelet would")
	for ns, labels := range map[string]map[string]string{
		"alice": {"user": "alice"}, "paul": {"user": "paul"}, "carol": {"user": "carol"},
	} {
		if err := c.EnsureNamespace(ctx, ns, labels); err != nil {
			return err
		}
	}
	pods := []struct {
		node, ns, name string
		labels         map[string]string
	}{
		{"worker2", "alice", "frontend", map[string]string{"role": "frontend"}},
		{"worker1", "alice", "frontend-2", map[string]string{"role": "frontend"}},
		{"cp1", "paul", "frontend", map[string]string{"role": "frontend"}},
		{"worker2", "alice", "backend", map[string]string{"role": "backend"}},
		{"worker2", "carol", "frontend", map[string]string{"role": "frontend"}},
	}
	var created []*cluster.Pod
	var labels []string
	for _, p := range pods {
		cp, err := c.AddPod(ctx, p.node, p.ns, p.name, p.labels)
		if err != nil {
			return err
		}
		created = append(created, cp)
		labels = append(labels, "role="+p.labels["role"])
	}

	step("Applying the seed's scenario with kubectl")
	fmt.Print(indent(scenario))
	out, err := c.Kubectl(ctx, scenario, "apply", "-f", "-")
	if err != nil {
		return err
	}
	fmt.Print(indent(out))
	if err := waitReady(ctx, c); err != nil {
		return err
	}
	// Ready means the operator assigned the egress IP; the agents program
	// it right after. Wait until the selected pods' connections leave with
	// it (alice's and paul's frontends, created first).
	for _, p := range created[:3] {
		if _, err := c.WaitSource(ctx, p, c.Lab.Externals()[0], netip.MustParseAddr("192.0.2.100"), 15*time.Second); err != nil {
			return fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err)
		}
	}

	step("Each pod opens a TCP connection to both external servers")
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    POD\tLABELS\tNODE\tPOD IP\tSEEN BY 203.0.113.10 (policy)\tSEEN BY 198.51.100.10 (not in policy)")
	for i, p := range created {
		var seen []string
		for _, ext := range c.Lab.Externals() {
			src, err := c.Source(ctx, p, ext)
			s := src.String()
			if err != nil {
				s = "error: " + err.Error()
			}
			seen = append(seen, s+note(src.Addr().String()))
		}
		fmt.Fprintf(tw, "    %s/%s\t%s\t%s\t%s\t%s\t%s\n", p.Namespace, strings.TrimPrefix(p.Name, p.Namespace+"-"), labels[i], p.Node, p.IP, seen[0], seen[1])
	}
	tw.Flush()
	fmt.Println("    alice and paul's frontends leave with 192.0.2.100 (the group's first floating IP, held by worker1),")
	fmt.Println("    also from worker2 and cp1; everything else keeps the node's own IP.")

	step("kubectl get egressnat -A")
	if out, err = c.Kubectl(ctx, "", "get", "egressnat", "-A"); err != nil {
		return err
	}
	fmt.Print(indent(out))
	step("kubectl get networkgatewaygroup default -n kube-system -o yaml")
	if out, err = c.Kubectl(ctx, "", "get", "networkgatewaygroup", "default", "-n", "kube-system", "-o", "yaml"); err != nil {
		return err
	}
	fmt.Print(indent(out))
	step("kubectl get egressnatpolicy egress -o yaml")
	if out, err = c.Kubectl(ctx, "", "get", "egressnatpolicy", "egress", "-o", "yaml"); err != nil {
		return err
	}
	fmt.Print(indent(out))
	for _, n := range []string{"worker1", "worker2"} {
		step("nft list table ip egressnat on %s", n)
		b, err := c.Lab.Exec(ctx, c.Lab.Node(n).NetNS, "nft", "list", "table", "ip", "egressnat")
		if err != nil {
			return fmt.Errorf("nft on %s: %w: %s", n, err, b)
		}
		fmt.Print(indent(string(b)))
	}
	return nil
}

func note(ip string) string {
	switch ip {
	case "192.0.2.100":
		return " (floating IP)"
	case "192.0.2.11", "192.0.2.12", "192.0.2.13":
		return " (node IP)"
	}
	return ""
}

func waitReady(ctx context.Context, c *cluster.Cluster) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := c.Kubectl(ctx, "", "get", "enp", "egress", "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err == nil && out == "True" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("policy not Ready after 30s (last: %q, %v)", out, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("    " + l + "\n")
	}
	return b.String()
}
