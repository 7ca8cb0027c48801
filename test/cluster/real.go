package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RealOptions make a real cluster (Options.Real).
type RealOptions struct {
	// Images are OCI archives imported into every node's containerd
	// (the pause image PauseImage among them).
	Images []string
	// Manifests is applied with "kubectl apply -k" once every node is
	// Ready (e.g. the repository's manifests/ or an overlay); nothing is
	// applied when empty.
	Manifests string
}

// startReal makes the cluster real (see kubelet.go for a node): the
// Service default/kubernetes gets the API server as its endpoint,
// kube-controller-manager and kube-scheduler run on the control-plane
// host, kube-proxy and a kubelet with containerd on every node; then
// ro.Manifests is applied and its DaemonSets and Deployments awaited.
func (c *Cluster) startReal(ctx context.Context, ro RealOptions) error {
	o := c.opts
	bins, err := apiserver.ClusterBinaries()
	if err != nil {
		return err
	}
	cp := c.controlPlane()
	if err := c.apiEndpoints(ctx, cp.IP, 6443); err != nil {
		return err
	}
	// The control plane and the kubelets run as cluster admins (a lab
	// shortcut: a production kubelet has its node credentials).
	adminKubeconfig := filepath.Join(c.Lab.WorkDir(), "admin-in-network.kubeconfig")
	if err := apiserver.WriteKubeconfig(adminKubeconfig, c.API.InNetworkURL, c.API.AdminToken); err != nil {
		return err
	}
	for _, n := range c.Lab.Nodes() {
		if err := c.createNode(ctx, n); err != nil {
			return err
		}
	}
	o.Log("starting kube-controller-manager and kube-scheduler on %s", cp.Name)
	kcm, err := c.Lab.Start(cp.NetNS, filepath.Join(c.Lab.WorkDir(), "kube-controller-manager.log"), bins.ControllerManager,
		"--kubeconfig="+adminKubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--cluster-name=egressnat-lab",
		// Published to every namespace as kube-root-ca.crt: the pods'
		// in-cluster clients verify the API server with it.
		"--root-ca-file="+filepath.Join(c.API.Dir, "certs", "apiserver.crt"),
		"--service-account-private-key-file="+filepath.Join(c.API.Dir, "sa.key"),
		"--use-service-account-credentials=false",
		"--v=1")
	if err != nil {
		return fmt.Errorf("start kube-controller-manager: %w", err)
	}
	c.realProcs = append(c.realProcs, kcm)
	sched, err := c.Lab.Start(cp.NetNS, filepath.Join(c.Lab.WorkDir(), "kube-scheduler.log"), bins.Scheduler,
		"--kubeconfig="+adminKubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1", "--v=1")
	if err != nil {
		return fmt.Errorf("start kube-scheduler: %w", err)
	}
	c.realProcs = append(c.realProcs, sched)
	o.Log("starting kube-proxy (%s mode) on every node", o.KubeProxyMode)
	c.opts.KubeProxy = true
	if err := c.StartKubeProxies(ctx); err != nil {
		return err
	}
	c.RealNodes = map[string]*RealNode{}
	for _, n := range c.Lab.Nodes() {
		o.Log("starting containerd and the kubelet on %s", n.Name)
		rn, err := c.startRealNode(ctx, n, bins, adminKubeconfig, ro.Images)
		if err != nil {
			return err
		}
		c.RealNodes[n.Name] = rn
	}
	if err := c.WaitNodesReady(ctx, 2*time.Minute); err != nil {
		return err
	}
	if c.opts.NetworkPolicy {
		o.Log("starting kube-router's NetworkPolicy firewall on every node")
		if err := c.StartKubeRouters(ctx); err != nil {
			return err
		}
	}
	if ro.Manifests != "" {
		o.Log("kubectl apply -k %s", ro.Manifests)
		if out, err := c.Kubectl(ctx, "", "apply", "-k", ro.Manifests); err != nil {
			return fmt.Errorf("kubectl apply -k %s: %w: %s", ro.Manifests, err, out)
		}
		if err := c.WaitRollouts(ctx, SystemNamespace, 3*time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// createNode creates node n's Node object before its kubelet registers (a
// kubelet takes over an existing Node): the lab's pod CIDR in spec.podCIDRs
// (as kube-controller-manager's node IPAM would set it) and, on the control
// plane, the role label and NoSchedule taint kubeadm gives it.
func (c *Cluster) createNode(ctx context.Context, n *lab.Node) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{"kubernetes.io/hostname": n.Name}}}
	if n.PodCIDR.IsValid() {
		node.Spec = corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}}
	}
	if n.ControlPlane {
		node.Labels["node-role.kubernetes.io/control-plane"] = ""
		node.Spec.Taints = []corev1.Taint{{Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule}}
	}
	if _, err := c.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create node %s: %w", n.Name, err)
	}
	return nil
}

// WaitNodesReady waits until every lab node's kubelet reports Ready.
func (c *Cluster) WaitNodesReady(ctx context.Context, timeout time.Duration) error {
	return waitFor(ctx, timeout, func() error {
		for _, n := range c.Lab.Nodes() {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			ready := false
			for _, cond := range node.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					ready = true
				}
			}
			if !ready {
				if rn := c.RealNodes[n.Name]; rn != nil && !rn.Kubelet.Running() {
					return fmt.Errorf("kubelet on %s exited: %s", n.Name, tail(rn.Kubelet.Log(), 3000))
				}
				return fmt.Errorf("node %s not Ready", n.Name)
			}
		}
		return nil
	})
}

// WaitRollouts waits until every DaemonSet and Deployment of namespace has
// rolled out (kubectl rollout status).
func (c *Cluster) WaitRollouts(ctx context.Context, namespace string, timeout time.Duration) error {
	for _, kind := range []string{"daemonset", "deployment"} {
		out, err := c.Kubectl(ctx, "", "-n", namespace, "get", kind, "-o", "name")
		if err != nil {
			return fmt.Errorf("list %ss: %w: %s", kind, err, out)
		}
		for _, name := range strings.Fields(out) {
			if out, err := c.Kubectl(ctx, "", "-n", namespace, "rollout", "status", name, "--timeout="+timeout.String()); err != nil {
				return fmt.Errorf("rollout of %s: %w: %s\n%s", name, err, out, c.describePods(ctx, namespace))
			}
		}
	}
	return nil
}

// describePods returns kubectl's view of namespace's pods, for errors.
func (c *Cluster) describePods(ctx context.Context, namespace string) string {
	out, _ := c.Kubectl(ctx, "", "-n", namespace, "get", "pods", "-o", "wide")
	ev, _ := c.Kubectl(ctx, "", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp")
	return out + "\n" + tail(ev, 4000)
}
