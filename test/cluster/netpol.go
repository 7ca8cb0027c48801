package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
)

// StartKubeRouters runs a real NetworkPolicy implementation on every lab
// node: kube-router's firewall (apiserver.KubeRouter; no routing, no
// service proxy, no CNI config), enforcing NetworkPolicy objects with
// iptables and ipset, as the ServiceAccount kube-system/kube-router (bound
// to cluster-admin: a lab). It waits until each has written its chains.
// Each runs inside its node's network namespace (nsenter --net); Close
// (and the lab's Close) stops them.
func (c *Cluster) StartKubeRouters(ctx context.Context) error {
	bin, err := apiserver.KubeRouter()
	if err != nil {
		return err
	}
	kubeconfig, err := c.systemIdentity(ctx, "kube-router", "cluster-admin")
	if err != nil {
		return err
	}
	for _, n := range c.Lab.Nodes() {
		argv := []string{bin, "--kubeconfig=" + kubeconfig, "--hostname-override=" + n.Name,
			"--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--enable-cni=false",
			"--health-port=0", "--metrics-port=0", "--iptables-sync-period=1m", "--v=1"}
		p, err := c.Lab.StartNsenter(n.NetNS, filepath.Join(c.Lab.WorkDir(), "kube-router-"+n.Name+".log"), argv...)
		if err != nil {
			return fmt.Errorf("start kube-router on %s: %w", n.Name, err)
		}
		c.KubeRouters = append(c.KubeRouters, p)
	}
	for i, n := range c.Lab.Nodes() {
		deadline := time.Now().Add(60 * time.Second)
		for {
			p := c.KubeRouters[i]
			if !p.Running() {
				return fmt.Errorf("kube-router on %s exited: %v; log:\n%s", n.Name, p.Err(), tail(p.Log(), 4096))
			}
			out, err := c.Lab.Exec(ctx, n.NetNS, "iptables-save", "-t", "filter")
			if err == nil && strings.Contains(string(out), "KUBE-ROUTER-FORWARD") {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("kube-router on %s wrote no chains in 60 s; log:\n%s", n.Name, tail(p.Log(), 4096))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}
