package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "kube-router", Namespace: "kube-system"}}
	if _, err := c.Client.CoreV1().ServiceAccounts("kube-system").Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create kube-router service account: %w", err)
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "egressnat-lab-kube-router"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "kube-router", Namespace: "kube-system"}},
	}
	if _, err := c.Client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("bind kube-router: %w", err)
	}
	kubeconfig := filepath.Join(c.Lab.WorkDir(), "kube-router.kubeconfig")
	if err := ServiceAccountKubeconfig(ctx, c.Client, c.API.InNetworkURL, "kube-system", "kube-router", kubeconfig); err != nil {
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
