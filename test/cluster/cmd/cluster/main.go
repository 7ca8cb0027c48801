// Command cluster (make cluster) runs a real Kubernetes cluster on this
// machine and installs egressnat on it as a user would: nodes cp1, worker1
// and worker2 in network namespaces, each with Debian's containerd and
// runc, the CNI plugins and a kubelet; etcd, kube-apiserver,
// kube-controller-manager and kube-scheduler on cp1; kube-proxy on every
// node. The egressnat image (built offline, see make image), a pause image
// and a small client image are imported into every node's runtime, and
// "kubectl apply -k manifests/" installs egressnat. Then the seed scenario
// runs on real pods and the source each pod's traffic leaves with is
// shown. It tears everything down at the end; --keep leaves the cluster
// running until Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/lab"
)

const prefix = "enat-kc-"

func main() {
	keep := flag.Bool("keep", false, "leave the cluster running after the walkthrough, until Ctrl-C")
	mode := flag.String("mode", "", "lab mode (pod network, rp_filter, masquerade, MTUs, kube-proxy mode), e.g. overlay/strict/kp-iptables")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "cluster: run as root (the lab uses network namespaces, cgroups and mounts)")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *keep, *mode); err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

func step(f string, a ...any) { fmt.Printf("\n==> "+f+"\n", a...) }

func run(ctx context.Context, keep bool, mode string) (err error) {
	network, kp, err := cluster.ParseMode(mode)
	if err != nil {
		return err
	}
	logf := func(f string, a ...any) { fmt.Printf("    "+f+"\n", a...) }
	step("Building the images (egressnat, pause, netutil)")
	dir, err := os.MkdirTemp("", "egressnat-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	images, err := cluster.BuildImages(ctx, dir)
	if err != nil {
		return err
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	step("Starting the cluster and installing egressnat (kubectl apply -k manifests/)")
	c, err := cluster.Start(ctx, cluster.Options{Prefix: prefix, Network: network, KubeProxyMode: kp, Log: logf,
		Real: &cluster.RealOptions{Images: images.All(), Manifests: filepath.Join(root, "manifests")}})
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
		fmt.Println("    every namespace, link, process, cgroup and mount of the cluster is gone")
	}()
	if err := cluster.SeedWalkthrough(ctx, c, os.Stdout); err != nil {
		fmt.Println(c.RealLogs(ctx))
		return err
	}
	if keep {
		step("The cluster keeps running; Ctrl-C tears it down")
		fmt.Printf(`    export KUBECONFIG=%s
    alias kubectl=%s
    kubectl get nodes -o wide; kubectl -n egressnat-system get pods -o wide
    kubectl get egressnat -A
    ip netns exec %sworker1 nft list table ip egressnat
`, c.API.Kubeconfig, c.API.KubectlPath, prefix)
		<-ctx.Done()
	}
	return nil
}
