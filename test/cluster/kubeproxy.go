package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ServiceCIDR is the API server's --service-cluster-ip-range (package
// apiserver): ClusterIPs come from here.
var ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")

// KubeProxyHealthzPort and KubeProxyMetricsPort are bound on each node's
// loopback (inside its network namespace).
const (
	KubeProxyHealthzPort = 10256
	KubeProxyMetricsPort = 10249
)

// StartKubeProxies runs a real kube-proxy (built from the k8s.io/kubernetes
// module like the API server, see apiserver.KubeProxy) on every lab node in
// nftables mode, as the ServiceAccount kube-system/kube-proxy bound to the
// bootstrap ClusterRole system:node-proxier (as kubeadm sets it up), and
// waits until each has created its table. Each runs inside its node's
// network namespace by nsenter --net (the mounts stay the host's); it
// changes no sysctl outside that namespace: conntrack limits and timeouts
// are left as they are (0), and net.* sysctls are per network namespace.
// Close (and the lab's Close) stops them.
func (c *Cluster) StartKubeProxies(ctx context.Context) error {
	bin, err := apiserver.KubeProxy()
	if err != nil {
		return err
	}
	c.kubeProxyBin = bin
	if err := c.kubeProxyIdentity(ctx); err != nil {
		return err
	}
	for _, n := range c.Lab.Nodes() {
		if err := c.StartKubeProxy(n.Name); err != nil {
			return err
		}
	}
	for _, n := range c.Lab.Nodes() {
		if err := c.WaitKubeProxy(ctx, n.Name, "", 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cluster) kubeProxyIdentity(ctx context.Context) (err error) {
	c.kubeProxyKubeconfig, err = c.systemIdentity(ctx, "kube-proxy", "system:node-proxier")
	return err
}

// systemIdentity creates the ServiceAccount kube-system/<name>, binds it to
// clusterRole, and writes a kubeconfig for it into the lab's work
// directory; it returns the kubeconfig's path.
func (c *Cluster) systemIdentity(ctx context.Context, name, clusterRole string) (string, error) {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "kube-system"}}
	if _, err := c.Client.CoreV1().ServiceAccounts("kube-system").Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("create %s service account: %w", name, err)
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "egressnat-lab-" + name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: clusterRole},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: name, Namespace: "kube-system"}},
	}
	if _, err := c.Client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("bind %s to %s: %w", name, clusterRole, err)
	}
	path := filepath.Join(c.Lab.WorkDir(), name+".kubeconfig")
	return path, ServiceAccountKubeconfig(ctx, c.Client, c.API.InNetworkURL, "kube-system", name, path)
}

// KubeProxyArgs are the flags StartKubeProxy gives kube-proxy on node, in
// mode ("nftables" or "iptables").
func KubeProxyArgs(kubeconfig, node, mode string) []string {
	return []string{
		"--kubeconfig=" + kubeconfig,
		"--proxy-mode=" + mode,
		"--hostname-override=" + node,
		"--cluster-cidr=" + lab.ClusterCIDR.String(),
		fmt.Sprintf("--healthz-bind-address=127.0.0.1:%d", KubeProxyHealthzPort),
		fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", KubeProxyMetricsPort),
		// Leave every conntrack sysctl as it is (nf_conntrack_max and the
		// hashsize are global to the machine).
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--conntrack-udp-timeout=0",
		"--conntrack-udp-timeout-stream=0",
		// Lowering the OOM score needs CAP_SYS_RESOURCE, which the lab
		// machine may lack.
		"--oom-score-adj=0",
		"--v=1",
	}
}

// StartKubeProxy starts (or starts again) the kube-proxy of a node; call
// StartKubeProxies first.
func (c *Cluster) StartKubeProxy(node string) error {
	n := c.Lab.Node(node)
	if n == nil {
		return fmt.Errorf("no node %s", node)
	}
	if c.kubeProxyBin == "" {
		return fmt.Errorf("kube-proxy on %s: call StartKubeProxies first", node)
	}
	if c.KubeProxies == nil {
		c.KubeProxies = map[string]*lab.Proc{}
	}
	if old := c.KubeProxies[node]; old != nil {
		old.Stop() //nolint:errcheck
	}
	argv := append([]string{c.kubeProxyBin}, KubeProxyArgs(c.kubeProxyKubeconfig, node, c.opts.KubeProxyMode)...)
	p, err := c.Lab.StartNsenter(n.NetNS, filepath.Join(c.Lab.WorkDir(), "kube-proxy-"+node+".log"), argv...)
	if err != nil {
		return fmt.Errorf("start kube-proxy on %s: %w", node, err)
	}
	c.KubeProxies[node] = p
	return nil
}

// KubeProxyTable returns the node's "table ip kube-proxy" (nftables mode)
// or its iptables nat table once kube-proxy wrote its KUBE-SERVICES chain
// (iptables mode), or an error.
func (c *Cluster) KubeProxyTable(ctx context.Context, node string) (string, error) {
	n := c.Lab.Node(node)
	if n == nil {
		return "", fmt.Errorf("no node %s", node)
	}
	if c.opts.KubeProxyMode == "iptables" {
		out, err := c.Lab.Exec(ctx, n.NetNS, "iptables-save", "-t", "nat")
		if err == nil && !strings.Contains(string(out), "-A KUBE-SERVICES") {
			return "", fmt.Errorf("no KUBE-SERVICES rules yet")
		}
		return string(out), err
	}
	out, err := c.Lab.Exec(ctx, n.NetNS, "nft", "list", "table", "ip", "kube-proxy")
	return string(out), err
}

// WaitKubeProxy polls until the node's kube-proxy table exists and, when
// contains is not empty, holds that text (e.g. a ClusterIP).
func (c *Cluster) WaitKubeProxy(ctx context.Context, node, contains string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if p := c.KubeProxies[node]; p != nil && !p.Running() {
			return fmt.Errorf("kube-proxy on %s exited: %v; log:\n%s", node, p.Err(), tail(p.Log(), 4096))
		}
		table, err := c.KubeProxyTable(ctx, node)
		if err == nil && (contains == "" || strings.Contains(table, contains)) {
			return nil
		}
		last = fmt.Sprint(err)
		if err == nil {
			last = "table without " + contains
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			log := ""
			if p := c.KubeProxies[node]; p != nil {
				log = tail(p.Log(), 4096)
			}
			return fmt.Errorf("kube-proxy on %s not ready after %s (%s); log:\n%s", node, timeout, last, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// AddService creates a selector-less TCP Service with clusterIP (in
// ServiceCIDR) and an EndpointSlice naming the backends' pod IPs on
// targetPort, as the EndpointSlice controller would for pods the lab has
// no kubelet for. The kube-proxies then program it.
func (c *Cluster) AddService(ctx context.Context, namespace, name string, clusterIP netip.Addr, port, targetPort int, backends ...*Pod) error {
	return c.AddServiceSpec(ctx, ServiceSpec{Namespace: namespace, Name: name, ClusterIP: clusterIP,
		Ports: []ServicePort{{Name: "echo", Protocol: corev1.ProtocolTCP, Port: port, TargetPort: targetPort}}}, backends...)
}

// ServiceSpec is a Service AddServiceSpec creates.
type ServiceSpec struct {
	Namespace, Name string
	ClusterIP       netip.Addr
	Ports           []ServicePort
	// NodePort makes it a NodePort Service (each port's NodePort);
	// LocalTraffic sets externalTrafficPolicy Local.
	NodePort, LocalTraffic bool
}

// ServicePort is one port of a ServiceSpec.
type ServicePort struct {
	Name             string
	Protocol         corev1.Protocol
	Port, TargetPort int
	NodePort         int // NodePort Services: in 30000-32767
}

// AddServiceSpec creates a selector-less Service and its EndpointSlice
// (see AddService).
func (c *Cluster) AddServiceSpec(ctx context.Context, s ServiceSpec, backends ...*Pod) error {
	if !ServiceCIDR.Contains(s.ClusterIP) {
		return fmt.Errorf("service %s/%s: %s is not in the service CIDR %s", s.Namespace, s.Name, s.ClusterIP, ServiceCIDR)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  s.ClusterIP.String(),
			ClusterIPs: []string{s.ClusterIP.String()},
		},
	}
	if s.NodePort {
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
		if s.LocalTraffic {
			svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		}
	}
	var slicePorts []discoveryv1.EndpointPort
	for _, p := range s.Ports {
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: int32(p.Port),
			TargetPort: intstr.FromInt32(int32(p.TargetPort)), NodePort: int32(p.NodePort)})
		name, proto, tp := p.Name, p.Protocol, int32(p.TargetPort)
		slicePorts = append(slicePorts, discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &tp})
	}
	if _, err := c.Client.CoreV1().Services(s.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service %s/%s: %w", s.Namespace, s.Name, err)
	}
	ready := true
	var eps []discoveryv1.Endpoint
	for _, b := range backends {
		node := b.Node
		eps = append(eps, discoveryv1.Endpoint{Addresses: []string{b.IP.String()}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: b.Namespace, Name: strings.TrimPrefix(b.Name, b.Namespace+"-")}})
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name + "-lab", Namespace: s.Namespace, Labels: map[string]string{
			discoveryv1.LabelServiceName: s.Name,
			discoveryv1.LabelManagedBy:   "egressnat-lab",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       slicePorts,
	}
	if _, err := c.Client.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create endpoint slice of %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// DeleteService deletes a Service and its lab EndpointSlice.
func (c *Cluster) DeleteService(ctx context.Context, namespace, name string) error {
	err := c.Client.CoreV1().Services(namespace).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	err = c.Client.DiscoveryV1().EndpointSlices(namespace).Delete(ctx, name+"-lab", metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return nil
}

// RegisterNode creates a Node object as a kubelet would (labels, the
// InternalIP, Ready), for a machine that is not a lab node (e.g. a
// lab.Host address). podCIDR may be invalid (none).
func (c *Cluster) RegisterNode(ctx context.Context, name string, ip netip.Addr, controlPlane bool, podCIDR netip.Prefix) error {
	n := &lab.Node{Name: name, IP: ip, ControlPlane: controlPlane, PodCIDR: podCIDR}
	return c.registerNode(ctx, n)
}
