// Package cluster runs a whole egressnat cluster on one machine: the lab
// network (package lab), etcd and kube-apiserver on the control-plane host,
// Node, Namespace and Pod objects created through the API as a kubelet would,
// and the real egressnat-operator and egressnat-agent binaries inside their
// hosts' network namespaces, with the flags the manifests use. The end to end
// tests and `make demo` both use it.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/egressnat/egressnat/test/apiserver"
	"github.com/egressnat/egressnat/test/lab"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// SystemNamespace holds the leases of the operator and the agents.
const SystemNamespace = "egressnat-system"

// Options of a cluster.
type Options struct {
	// Prefix of the lab's namespaces; give every test package its own.
	Prefix string
	// BinDir holds egressnat-operator and egressnat-agent; they are built
	// into the work directory when empty.
	BinDir string
	// Operators is the number of operator replicas (default 2).
	Operators int
	// Nodes of the lab; default cp1 (control plane), worker1, worker2.
	Nodes []lab.NodeConfig
	// AgentArgs and OperatorArgs are added to the binaries' flags.
	AgentArgs, OperatorArgs []string
	// KubeProxy also runs a real kube-proxy on every node (see
	// StartKubeProxies); it is built on first use (minutes).
	KubeProxy bool
	// KubeProxyMode is its --proxy-mode: "nftables" (default) or
	// "iptables".
	KubeProxyMode string
	// NetworkPolicy also runs a real NetworkPolicy implementation on every
	// node (StartKubeRouters).
	NetworkPolicy bool
	// Network: the lab's pod network, reverse-path filtering, CNI
	// masquerade and MTUs (lab.Config's PodNetwork, RPFilter, Masquerade,
	// UplinkMTU and PodMTU; the rest is ignored). See ParseMode.
	Network lab.Config
	// Real makes a real cluster (see real.go): containerd, runc, the CNI
	// plugins and a kubelet on every node, kube-controller-manager and
	// kube-scheduler beside the API server, kube-proxy on every node; no
	// egressnat process is started by the harness: Real.Manifests is
	// applied with kubectl as a user would.
	Real *RealOptions
	// Classifier is the agents' --classifier: "nft" (default) or "ebpf"
	// (they pin under a bpffs of the lab's, a directory per node).
	Classifier string
	// Log receives progress lines; none when nil.
	Log func(format string, args ...any)
}

// Cluster is a running lab cluster.
type Cluster struct {
	Lab       *lab.Lab
	API       *apiserver.Server
	Client    kubernetes.Interface
	Agents    map[string]*lab.Proc // by node name
	Operators []*lab.Proc
	// KubeProxies run by StartKubeProxies, by node name.
	KubeProxies map[string]*lab.Proc
	// KubeRouters run by StartKubeRouters (NetworkPolicy), in node order.
	KubeRouters []*lab.Proc

	opts   Options
	binDir string
	// agentKubeconfig and operatorKubeconfig reach the API server from
	// inside the lab network as the manifests' ServiceAccounts.
	agentKubeconfig, operatorKubeconfig string
	kubeProxyBin, kubeProxyKubeconfig   string
	// RealNodes are the container runtimes and kubelets of a real
	// cluster (Options.Real), by node name.
	RealNodes map[string]*RealNode
	realNodes []*RealNode // in start order, for Close
	realProcs []*lab.Proc // kube-controller-manager, kube-scheduler
}

// Start builds and starts everything. On error, what was started is
// stopped again.
func Start(ctx context.Context, o Options) (c *Cluster, err error) {
	if o.Operators == 0 {
		o.Operators = 2
	}
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
	cl := &Cluster{opts: o, Agents: map[string]*lab.Proc{}}
	c = cl
	defer func() {
		if err != nil {
			cl.Close() // c itself is nil by then (return nil, err)
		}
	}()
	if err := lab.CleanupStale(o.Prefix); err != nil {
		return nil, fmt.Errorf("remove a crashed run's leftovers: %w", err)
	}
	if o.KubeProxyMode == "" {
		o.KubeProxyMode = "nftables"
	}
	if o.KubeProxyMode != "nftables" && o.KubeProxyMode != "iptables" {
		return nil, fmt.Errorf("kube-proxy mode %q: want nftables or iptables", o.KubeProxyMode)
	}
	c.opts = o
	o.Log("building the lab network (prefix %q, %s)", o.Prefix, o.Network.ModeName())
	if c.Lab, err = lab.New(lab.Config{Prefix: o.Prefix, Nodes: o.Nodes, PodNetwork: o.Network.PodNetwork, RPFilter: o.Network.RPFilter,
		Masquerade: o.Network.Masquerade, UplinkMTU: o.Network.UplinkMTU, PodMTU: o.Network.PodMTU}); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if c.binDir = o.BinDir; c.binDir == "" {
		c.binDir = filepath.Join(c.Lab.WorkDir(), "bin")
		o.Log("building egressnat-operator and egressnat-agent")
		if err := BuildBinaries(c.binDir); err != nil {
			return nil, err
		}
	}
	cp := c.controlPlane()
	o.Log("starting etcd and kube-apiserver on %s (%s)", cp.Name, cp.IP)
	var apiArgs []string
	if o.Real != nil {
		// exec, logs and port-forward reach kubelets on their node IP.
		apiArgs = []string{"--kubelet-preferred-address-types=InternalIP"}
	}
	c.API, err = apiserver.Start(ctx, apiserver.Options{
		ExtraArgs:  apiArgs,
		Dir:        filepath.Join(c.Lab.WorkDir(), "apiserver"),
		ExecPrefix: []string{"ip", "netns", "exec", cp.NetNS},
		Address:    cp.IP.String(),
		Reach: func(hostPort string) (string, error) {
			local, _, err := c.Lab.ServeLoopback(cp.NetNS, hostPort)
			return local, err
		},
	})
	if err != nil {
		return nil, fmt.Errorf("api server: %w", err)
	}
	if c.Client, err = c.API.Client(); err != nil {
		return nil, err
	}
	if o.Real != nil {
		if err := c.startReal(ctx, *o.Real); err != nil {
			return nil, err
		}
		return c, nil
	}
	root, err := apiserver.RepoRoot()
	if err != nil {
		return nil, err
	}
	if err := c.API.InstallCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		return nil, err
	}
	// The binaries run as the manifests' own ServiceAccounts, with tokens
	// minted by the TokenRequest API: the RBAC they meet is the real one.
	if err := ApplyManifests(ctx, c.API, root); err != nil {
		return nil, fmt.Errorf("apply the manifests' namespace and RBAC: %w", err)
	}
	if err := c.EnsureNamespace(ctx, SystemNamespace, nil); err != nil {
		return nil, err
	}
	c.agentKubeconfig = filepath.Join(c.Lab.WorkDir(), "agent.kubeconfig")
	c.operatorKubeconfig = filepath.Join(c.Lab.WorkDir(), "operator.kubeconfig")
	for sa, path := range map[string]string{"egressnat-agent": c.agentKubeconfig, "egressnat-operator": c.operatorKubeconfig} {
		if err := ServiceAccountKubeconfig(ctx, c.Client, c.API.InNetworkURL, SystemNamespace, sa, path); err != nil {
			return nil, fmt.Errorf("kubeconfig for %s: %w", sa, err)
		}
	}
	for _, n := range c.Lab.Nodes() {
		if err := c.registerNode(ctx, n); err != nil {
			return nil, err
		}
	}
	for i := range o.Operators {
		if err := c.StartOperator(i); err != nil {
			return nil, err
		}
	}
	for _, n := range c.Lab.Nodes() {
		if err := c.StartAgent(n.Name); err != nil {
			return nil, err
		}
	}
	// As a DaemonSet rollout would, wait until every agent is ready (caches
	// synced, first apply done): a test that fails a node right after the
	// start must not meet an agent that has not applied anything yet.
	for _, n := range c.Lab.Nodes() {
		if err := c.WaitAgentReady(ctx, n.Name, time.Minute); err != nil {
			return nil, err
		}
	}
	if o.KubeProxy {
		o.Log("starting kube-proxy (%s mode) on every node", o.KubeProxyMode)
		if err := c.StartKubeProxies(ctx); err != nil {
			return nil, err
		}
	}
	if o.NetworkPolicy {
		o.Log("starting kube-router's NetworkPolicy firewall on every node")
		if err := c.StartKubeRouters(ctx); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// ParseMode reads a lab mode: a lab.Config ModeName (e.g.
// "overlay/strict/iptables-legacy/mtu1450") with, anywhere, an optional
// "kp-nftables" or "kp-iptables" for kube-proxy's mode and "ebpf" for the
// agents' eBPF classifier (ModeClassifier; the nft classifier otherwise). It returns the
// network and the kube-proxy mode ("" for the default).
func ParseMode(s string) (lab.Config, string, error) {
	var kp string
	var rest []string
	for _, part := range strings.Split(s, "/") {
		if part == "ebpf" {
			continue // ModeClassifier ("nft" is a masquerade mode)
		}
		if m, ok := strings.CutPrefix(part, "kp-"); ok {
			if m != "nftables" && m != "iptables" {
				return lab.Config{}, "", fmt.Errorf("mode %q: kube-proxy mode %q: want kp-nftables or kp-iptables", s, m)
			}
			kp = m
			continue
		}
		if part != "" {
			rest = append(rest, part)
		}
	}
	net, err := lab.ParseModeName(strings.Join(rest, "/"))
	return net, kp, err
}

// ModeClassifier returns the agents' classifier a lab mode names (see
// ParseMode): "ebpf" or "nft" (the default).
func ModeClassifier(s string) string {
	if slices.Contains(strings.Split(s, "/"), "ebpf") {
		return "ebpf"
	}
	return "nft"
}

// ModeName names the cluster's network, kube-proxy mode and classifier
// (see ParseMode).
func (c *Cluster) ModeName() string {
	name := c.Lab.Config().ModeName()
	if c.opts.KubeProxy {
		name += "/kp-" + c.opts.KubeProxyMode
	}
	if c.opts.Classifier == "ebpf" {
		name += "/ebpf"
	}
	return name
}

// BinDir holds the egressnat binaries the cluster was started with.
func (c *Cluster) BinDir() string { return c.binDir }

// BuildBinaries builds the operator and the agent into dir.
func BuildBinaries(dir string) error {
	root, err := apiserver.RepoRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/egressnat-operator", "./cmd/egressnat-agent")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build binaries: %w\n%s", err, out)
	}
	return nil
}

func (c *Cluster) controlPlane() *lab.Node {
	for _, n := range c.Lab.Nodes() {
		if n.ControlPlane {
			return n
		}
	}
	return c.Lab.Nodes()[0]
}

// AgentHealthPort serves each agent's /metrics, /healthz and /readyz.
const AgentHealthPort = 9796

// OperatorHealthPort serves operator replica i's /metrics, /healthz and
// /readyz; the replicas share the control-plane host, so each has its own.
func OperatorHealthPort(i int) int { return 9795 + 10*i }

// StartOperator starts operator replica i on the control-plane host.
func (c *Cluster) StartOperator(i int) error {
	cp := c.controlPlane()
	id := fmt.Sprintf("operator-%d", i)
	args := append([]string{filepath.Join(c.binDir, "egressnat-operator"),
		"--kubeconfig=" + c.operatorKubeconfig, "--namespace=" + SystemNamespace, "--identity=" + id,
		fmt.Sprintf("--health-addr=:%d", OperatorHealthPort(i)), "--log-format=console"}, c.opts.OperatorArgs...)
	p, err := c.Lab.Start(cp.NetNS, filepath.Join(c.Lab.WorkDir(), id+".log"), args...)
	if err != nil {
		return fmt.Errorf("start %s: %w", id, err)
	}
	if i < len(c.Operators) {
		c.Operators[i] = p
	} else {
		c.Operators = append(c.Operators, p)
	}
	return nil
}

// AgentMemoryLimit is the agent container's memory limit in
// manifests/base/agent-daemonset.yaml (256Mi), passed as MEMORY_LIMIT.
const AgentMemoryLimit = "268435456"

// StartAgent starts (or starts again) the agent of a node, with extra
// flags after Options.AgentArgs.
func (c *Cluster) StartAgent(node string, extra ...string) error {
	n := c.Lab.Node(node)
	if n == nil {
		return fmt.Errorf("no node %s", node)
	}
	// The environment of the DaemonSet: MEMORY_LIMIT is its limits.memory.
	args := append([]string{"env", "MEMORY_LIMIT=" + AgentMemoryLimit, filepath.Join(c.binDir, "egressnat-agent"),
		"--kubeconfig=" + c.agentKubeconfig, "--node-name=" + node, "--namespace=" + SystemNamespace,
		"--uplink=" + n.Uplink, fmt.Sprintf("--health-addr=:%d", AgentHealthPort), "--log-format=console",
		// The node's disk: it survives the node's reboots (WipeNodeState).
		"--state-dir=" + c.stateDir(node),
		// BootGuard runs the lab's build instead of a copy per node.
		"--boot-binary=false",
		// A lab agent stopped (Stop: SIGTERM) leaves its floating IPs, as
		// after a crash: tests restart agents to show that a restart
		// changes nothing, and Close stops them all at once. The drain
		// (the DaemonSet's default) is tested with AgentArgs.
		"--drain-timeout=0"}, c.opts.AgentArgs...)
	if c.opts.Classifier == "ebpf" {
		if _, err := c.Lab.BPFFS(); err != nil {
			return err
		}
		args = append(args, "--classifier=ebpf", "--bpf-dir="+c.BPFDir(node))
	}
	args = append(args, extra...)
	p, err := c.Lab.Start(n.NetNS, filepath.Join(c.Lab.WorkDir(), "agent-"+node+".log"), args...)
	if err != nil {
		return fmt.Errorf("start agent on %s: %w", node, err)
	}
	c.Agents[node] = p
	return nil
}

// BPFDir is where node's agent pins its eBPF classifier (with
// Options.Classifier "ebpf"): a directory of the lab's bpffs.
func (c *Cluster) BPFDir(node string) string {
	return filepath.Join(c.Lab.WorkDir(), "bpffs", node)
}

func (c *Cluster) stateDir(node string) string {
	return filepath.Join(c.Lab.WorkDir(), "state", node)
}

// BootGuard runs what the boot unit (manifests/host) runs before a node's
// network starts: egressnat-agent --boot-guard with the node's state
// directory and no other flag (the uplink is the one saved there).
func (c *Cluster) BootGuard(ctx context.Context, node string) error {
	n := c.Lab.Node(node)
	if n == nil {
		return fmt.Errorf("no node %s", node)
	}
	out, err := c.Lab.Exec(ctx, n.NetNS, filepath.Join(c.binDir, "egressnat-agent"), "--boot-guard",
		"--state-dir="+c.stateDir(node), "--log-format=console")
	if err != nil {
		return fmt.Errorf("boot guard on %s: %w: %s", node, err, out)
	}
	return nil
}

// registerNode creates the Node object as a kubelet would: labels, the
// InternalIP and a Ready condition.
func (c *Cluster) registerNode(ctx context.Context, n *lab.Node) error {
	labels := map[string]string{"kubernetes.io/hostname": n.Name, "kubernetes.io/os": "linux"}
	if n.ControlPlane {
		labels["node-role.kubernetes.io/control-plane"] = ""
	}
	var spec corev1.NodeSpec
	if n.PodCIDR.IsValid() {
		spec = corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}}
	}
	node, err := c.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: labels},
		Spec:       spec,
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create node %s: %w", n.Name, err)
	}
	now := metav1.Now()
	node.Status = corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.IP.String()}, {Type: corev1.NodeHostName, Address: n.Name}},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "lab node", LastHeartbeatTime: now, LastTransitionTime: now}},
	}
	if _, err := c.Client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("set status of node %s: %w", n.Name, err)
	}
	return nil
}

// EnsureNamespace creates a namespace with labels and its default
// ServiceAccount (as the controller manager would), or sets its labels.
func (c *Cluster) EnsureNamespace(ctx context.Context, name string, labels map[string]string) error {
	if err := c.ensureNamespace(ctx, name, labels); err != nil {
		return err
	}
	_, err := c.Client.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create default service account in %s: %w", name, err)
	}
	return nil
}

func (c *Cluster) ensureNamespace(ctx context.Context, name string, labels map[string]string) error {
	ns, err := c.Client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create namespace %s: %w", name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get namespace %s: %w", name, err)
	}
	ns.Labels = labels
	if _, err := c.Client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("label namespace %s: %w", name, err)
	}
	return nil
}

// Pod is a lab pod with its API object's identity.
type Pod struct {
	*lab.Pod
	Namespace string
}

// AddPod creates a pod: its network namespace on the node, then the Pod
// object with spec.nodeName and status.podIP, as a kubelet and CNI would.
func (c *Cluster) AddPod(ctx context.Context, node, namespace, name string, labels map[string]string) (*Pod, error) {
	p, err := c.AddPodNetwork(node, namespace, name)
	if err != nil {
		return nil, err
	}
	if err := c.CreatePodObject(ctx, p, labels); err != nil {
		return nil, err
	}
	return p, nil
}

// AddPodNetwork creates only a pod's network namespace (the CNI's part):
// the pod can send before its Pod object says its address (see
// CreatePodObject), as a container does that starts before the kubelet
// reported its IP.
func (c *Cluster) AddPodNetwork(node, namespace, name string) (*Pod, error) {
	lp, err := c.Lab.AddPod(node, namespace+"-"+name)
	if err != nil {
		return nil, fmt.Errorf("add pod network: %w", err)
	}
	return &Pod{Pod: lp, Namespace: namespace}, nil
}

// CreatePodObject creates the Pod object of a pod made by AddPodNetwork,
// with spec.nodeName and status.podIP.
func (c *Cluster) CreatePodObject(ctx context.Context, p *Pod, labels map[string]string) error {
	name := strings.TrimPrefix(p.Name, p.Namespace+"-")
	pod, err := c.Client.CoreV1().Pods(p.Namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: p.Namespace, Labels: labels},
		Spec: corev1.PodSpec{NodeName: p.Node, Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
			AutomountServiceAccountToken: boolPtr(false)},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create pod %s/%s: %w", p.Namespace, name, err)
	}
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = p.IP.String()
	pod.Status.PodIPs = []corev1.PodIP{{IP: p.IP.String()}}
	pod.Status.HostIP = c.Lab.Node(p.Node).IP.String()
	if _, err := c.Client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("set status of pod %s/%s: %w", p.Namespace, name, err)
	}
	return nil
}

// DeletePod deletes the Pod object and its network namespace; deleting a
// deleted pod does nothing.
func (c *Cluster) DeletePod(ctx context.Context, p *Pod) error {
	name := strings.TrimPrefix(p.Name, p.Namespace+"-")
	err := c.Client.CoreV1().Pods(p.Namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: int64Ptr(0)})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete pod %s/%s: %w", p.Namespace, name, err)
	}
	if c.Lab.Pod(p.Name) == nil {
		return nil
	}
	return c.Lab.RemovePod(p.Name)
}

// SetPodLabels replaces a pod's labels.
func (c *Cluster) SetPodLabels(ctx context.Context, p *Pod, labels map[string]string) error {
	name := strings.TrimPrefix(p.Name, p.Namespace+"-")
	pod, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	pod.Labels = labels
	_, err = c.Client.CoreV1().Pods(p.Namespace).Update(ctx, pod, metav1.UpdateOptions{})
	return err
}

// Kubectl runs the real kubectl as admin; stdin may be empty.
func (c *Cluster) Kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	var in *strings.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	var out, errOut string
	var err error
	if in != nil {
		out, errOut, err = c.API.Kubectl(ctx, in, args...)
	} else {
		out, errOut, err = c.API.Kubectl(ctx, nil, args...)
	}
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, errOut)
	}
	return out, nil
}

// Source asks the external server which source ip:port it saw for a new
// TCP connection from the pod.
func (c *Cluster) Source(ctx context.Context, p *Pod, ext *lab.External) (netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	s, err := lab.EchoTCP(ctx, p.NetNS, ext.TCPAddr())
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.ParseAddrPort(strings.TrimSpace(s))
}

// WaitSource polls until new TCP connections from the pod reach ext with
// source IP want, and returns the last source seen.
func (c *Cluster) WaitSource(ctx context.Context, p *Pod, ext *lab.External, want netip.Addr, timeout time.Duration) (netip.Addr, error) {
	deadline := time.Now().Add(timeout)
	var last netip.Addr
	var lastErr error
	for {
		src, err := c.Source(ctx, p, ext)
		if err == nil {
			last, lastErr = src.Addr(), nil
			if last == want {
				return last, nil
			}
		} else {
			lastErr = err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if lastErr != nil {
				return last, fmt.Errorf("pod %s: want source %s, last error: %w", p.Name, want, lastErr)
			}
			return last, fmt.Errorf("pod %s: want source %s, saw %s", p.Name, want, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Logs returns the tail of every egressnat process's log, for failures.
func (c *Cluster) Logs() string {
	var b strings.Builder
	if c.RealNodes != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		b.WriteString(c.RealLogs(ctx))
	}
	for i, p := range c.Operators {
		fmt.Fprintf(&b, "--- operator-%d\n%s\n", i, p.Log())
	}
	for n, p := range c.Agents {
		fmt.Fprintf(&b, "--- agent %s\n%s\n", n, p.Log())
	}
	return b.String()
}

// Close stops every process and removes every namespace the cluster made.
func (c *Cluster) Close() error {
	var errs []error
	for i := len(c.realNodes) - 1; i >= 0; i-- {
		errs = append(errs, c.realNodes[i].stop())
	}
	for _, p := range c.realProcs {
		p.Stop() //nolint:errcheck
	}
	for _, p := range c.KubeProxies {
		p.Stop() //nolint:errcheck
	}
	for _, p := range c.Agents {
		p.Stop() //nolint:errcheck
	}
	for _, p := range c.Operators {
		if p != nil {
			p.Stop() //nolint:errcheck
		}
	}
	if c.API != nil {
		c.API.Stop()
	}
	if c.Lab != nil {
		errs = append(errs, c.Lab.Close())
	}
	return errors.Join(errs...)
}

func boolPtr(b bool) *bool    { return &b }
func int64Ptr(i int64) *int64 { return &i }
