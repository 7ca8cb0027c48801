// Package realcluster is the end-to-end suite on a real cluster (make
// test-cluster): kubelets with containerd, runc and the CNI plugins on every
// lab node, kube-controller-manager, kube-scheduler and kube-proxy, and
// egressnat installed from the offline-built image with "kubectl apply -k
// manifests/" as a user would, running as pods. The tests run in order on
// one cluster; each later one builds on the state the earlier ones left
// (the install, the seed scenario, the streams), and the last two take a
// node away and uninstall.
package realcluster

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/egressnat/egressnat/test/cluster"
	"github.com/egressnat/egressnat/test/image"
)

var (
	c *cluster.Cluster
	// netutilBin is netutil built for this machine: the lab's external
	// hosts run its echo server.
	netutilBin string
)

const prefix = "enat-rc-"

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("realcluster: skipped under -short (needs root, a real cluster and minutes)")
		os.Exit(0)
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "realcluster: needs root")
		return 1
	}
	dir, err := os.MkdirTemp("", "egressnat-realcluster-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "realcluster:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	t0 := time.Now()
	images, err := cluster.BuildImages(ctx, dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "realcluster:", err)
		return 1
	}
	if err := image.GoBuild(ctx, "", dir, "", "github.com/egressnat/egressnat/test/image/netutil"); err != nil {
		fmt.Fprintln(os.Stderr, "realcluster:", err)
		return 1
	}
	netutilBin = filepath.Join(dir, "netutil")
	fmt.Fprintf(os.Stderr, "realcluster: images built in %s (egressnat %s, %d bytes)\n", time.Since(t0).Round(time.Second), images.Egressnat.Digest, images.Egressnat.Size)
	network, kp, err := cluster.ParseMode(os.Getenv("EGRESSNAT_E2E_MODE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "realcluster:", err)
		return 1
	}
	// No manifests here: TestInstall applies them, after it has recorded
	// every node's kernel state for TestUninstall to compare with.
	return cluster.TestMainOptions(m, cluster.Options{Prefix: prefix, Network: network, KubeProxyMode: kp,
		Real: &cluster.RealOptions{Images: images.All()}}, &c)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
