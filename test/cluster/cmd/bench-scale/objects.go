package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/test/cluster"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

var (
	gatewayGVR = v1.GroupVersion.WithResource(v1.NetworkGatewayGroupResource)
	policyGVR  = v1.GroupVersion.WithResource(v1.EgressNATPolicyResource)
)

const (
	gatewayNamespace = "kube-system"
	// liveNamespace holds the real pods (network namespaces); the policy of
	// the same name selects those labelled egress=yes.
	liveNamespace = "bench-live"
	liveGateway   = "gw-00"
)

// Destination /32s come from the two external /24s of the lab (512
// addresses); each policy gets 5 distinct, non-adjacent ones, so they
// overlap across policies.
func destination(policy, k int) string {
	idx := (policy*7 + k*103) % 512
	if idx < 256 {
		return fmt.Sprintf("203.0.113.%d/32", idx)
	}
	return fmt.Sprintf("198.51.100.%d/32", idx-256)
}

// synthPod is a Pod object without a network namespace.
type synthPod struct {
	ns, name, node string
	policy         int // index of the policy selecting it
	ip             netip.Addr
	obj            *corev1.Pod
}

type scale struct {
	cfg   config
	c     *cluster.Cluster
	cs    kubernetes.Interface
	dyn   dynamic.Interface
	nodes []string

	pods    []*synthPod // the 20,000, then the latency pods
	nextIP  uint32
	holders map[string]string // gateway -> node holding its floating IP
}

func newScale(cfg config, c *cluster.Cluster) (*scale, error) {
	rc := c.API.Config()
	rc.QPS, rc.Burst = 5000, 10000
	rc.Timeout = 60 * time.Second
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	s := &scale{cfg: cfg, c: c, cs: cs, dyn: dyn, nextIP: 0x0af48001} // 10.244.128.1
	for _, n := range c.Lab.Nodes() {
		s.nodes = append(s.nodes, n.Name)
	}
	return s, nil
}

// allocIP hands out distinct addresses of 10.244.128.0/17, which the lab
// never gives to real pods.
func (s *scale) allocIP() netip.Addr {
	a := s.nextIP
	s.nextIP++
	if a > 0x0af4fffe {
		panic("synthetic pod addresses exhausted")
	}
	return netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)})
}

func gatewayName(i int) string { return fmt.Sprintf("gw-%02d", i) }
func nsName(i int) string      { return fmt.Sprintf("s-%04d", i) }

func floatingIP(i int) string { return fmt.Sprintf("192.0.2.%d", 100+i) }

// parallel runs fn(0..n-1) on workers goroutines and returns the first
// error; progress is printed every 10 s.
func parallel(ctx context.Context, what string, n, workers int, fn func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next, done atomic.Int64
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	start := time.Now()
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				logf("  %s: %d/%d after %.0fs", what, done.Load(), n, time.Since(start).Seconds())
			}
		}
	}()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := retry(ctx, func() error { return fn(ctx, i) }); err != nil {
					once.Do(func() { first = err; cancel() })
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stop)
	if first != nil {
		return fmt.Errorf("%s: %w", what, first)
	}
	return ctx.Err()
}

// retry retries transient API errors (throttling, timeouts, conflicts of
// concurrent writers) a few times.
func retry(ctx context.Context, fn func() error) error {
	var err error
	for attempt := range 6 {
		if err = fn(); err == nil {
			return nil
		}
		if !apierrors.IsTooManyRequests(err) && !apierrors.IsServerTimeout(err) && !apierrors.IsTimeout(err) &&
			!apierrors.IsServiceUnavailable(err) && !apierrors.IsInternalError(err) && !errors.Is(err, context.DeadlineExceeded) &&
			!apierrors.IsForbidden(err) { // forbidden: the namespace's service account not yet in the admission cache
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(100<<attempt) * time.Millisecond):
		}
	}
	return err
}

func (s *scale) createGateways(ctx context.Context) error {
	for i := range s.cfg.gateways {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1.GroupVersion.String(), "kind": "NetworkGatewayGroup",
			"metadata": map[string]any{"name": gatewayName(i), "namespace": gatewayNamespace},
			"spec":     map[string]any{"floatingIPs": []any{floatingIP(i)}},
		}}
		if _, err := s.dyn.Resource(gatewayGVR).Namespace(gatewayNamespace).Create(ctx, u, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create gateway %s: %w", gatewayName(i), err)
		}
	}
	return nil
}

// readHolders reads every gateway's status: which node holds its floating IP.
func (s *scale) readHolders(ctx context.Context) (map[string]string, error) {
	l, err := s.dyn.Resource(gatewayGVR).Namespace(gatewayNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, g := range l.Items {
		ips, _, _ := unstructured.NestedStringSlice(g.Object, "spec", "floatingIPs")
		st, _, _ := unstructured.NestedStringMap(g.Object, "status", "floatingIPs")
		if len(ips) > 0 && st[ips[0]] != "" {
			out[g.GetName()] = st[ips[0]]
		}
	}
	return out, nil
}

func (s *scale) waitHolders(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		h, err := s.readHolders(ctx)
		if err == nil && len(h) == s.cfg.gateways {
			s.holders = h
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("floating IPs not all assigned after %v: %v %v", timeout, h, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func policyObject(name string, nsSelector, podSelector map[string]any, dests []string, gw string) *unstructured.Unstructured {
	var d []any
	for _, c := range dests {
		d = append(d, map[string]any{"cidr": c})
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1.GroupVersion.String(), "kind": "EgressNATPolicy",
		"metadata": map[string]any{"name": name},
		"spec": map[string]any{
			"sources":      []any{map[string]any{"namespaceSelector": nsSelector, "podSelector": podSelector}},
			"action":       "SNAT",
			"destinations": d,
			"gatewayRef":   map[string]any{"name": gw, "namespace": gatewayNamespace},
		},
	}}
}

func (s *scale) createNamespaces(ctx context.Context) error {
	return parallel(ctx, "namespaces", s.cfg.policies, s.cfg.workers, func(ctx context.Context, i int) error {
		_, err := s.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: nsName(i), Labels: map[string]string{"bench": "scale", "bench-ns": nsName(i)}}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		// The ServiceAccount admission plugin wants the default account.
		_, err = s.cs.CoreV1().ServiceAccounts(nsName(i)).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		return nil
	})
}

func (s *scale) createPolicies(ctx context.Context) error {
	return parallel(ctx, "policies", s.cfg.policies, s.cfg.workers, func(ctx context.Context, i int) error {
		var dests []string
		for k := range s.cfg.dests {
			dests = append(dests, destination(i, k))
		}
		u := policyObject(nsName(i), map[string]any{"matchLabels": map[string]any{"bench-ns": nsName(i)}},
			map[string]any{}, dests, gatewayName(i%s.cfg.gateways))
		_, err := s.dyn.Resource(policyGVR).Create(ctx, u, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	})
}

// createLive makes the namespace and policy of the real pods: pods
// labelled egress=yes in bench-live, to ext1 and ext2, through gw-00.
func (s *scale) createLive(ctx context.Context) error {
	if err := s.c.EnsureNamespace(ctx, liveNamespace, map[string]string{"bench": "live"}); err != nil {
		return err
	}
	u := policyObject(liveNamespace, map[string]any{"matchLabels": map[string]any{"bench": "live"}},
		map[string]any{"matchLabels": map[string]any{"egress": "yes"}},
		[]string{"203.0.113.10/32", "198.51.100.10/32"}, liveGateway)
	_, err := s.dyn.Resource(policyGVR).Create(ctx, u, metav1.CreateOptions{})
	return err
}

// planPods lays out n synthetic pods: pod j lives in namespace j % P (so
// that namespace's policy selects it), on node (j / P) % nodes.
func (s *scale) planPods(n int, prefix string) []*synthPod {
	P := s.cfg.policies
	var out []*synthPod
	for j := range n {
		out = append(out, &synthPod{
			ns: nsName(j % P), name: fmt.Sprintf("%s-%05d", prefix, j),
			node: s.nodes[(j/P)%len(s.nodes)], policy: j % P,
		})
	}
	return out
}

func podObject(p *synthPod, labels map[string]string) *corev1.Pod {
	f := false
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns, Labels: labels},
		Spec: corev1.PodSpec{NodeName: p.node, AutomountServiceAccountToken: &f,
			Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
	}
}

// createPod creates the Pod object (the API server resets status on
// create), without a pod IP.
func (s *scale) createPod(ctx context.Context, p *synthPod, labels map[string]string) error {
	obj, err := s.cs.CoreV1().Pods(p.ns).Create(ctx, podObject(p, labels), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		obj, err = s.cs.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
	}
	if err != nil {
		return err
	}
	p.obj = obj
	return nil
}

// setPodIP writes status.podIP as a kubelet would once the CNI is done.
func (s *scale) setPodIP(ctx context.Context, p *synthPod, hostIP string) error {
	o := p.obj.DeepCopy()
	o.Status.Phase = corev1.PodRunning
	o.Status.PodIP = p.ip.String()
	o.Status.PodIPs = []corev1.PodIP{{IP: p.ip.String()}}
	o.Status.HostIP = hostIP
	obj, err := s.cs.CoreV1().Pods(p.ns).UpdateStatus(ctx, o, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		cur, gerr := s.cs.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
		if gerr != nil {
			return gerr
		}
		p.obj = cur
		return s.setPodIP(ctx, p, hostIP)
	}
	if err != nil {
		return err
	}
	p.obj = obj
	return nil
}

func (s *scale) hostIP(node string) string { return s.c.Lab.Node(node).IP.String() }

// createPods creates the scale pods, each with its pod IP.
func (s *scale) createPods(ctx context.Context, pods []*synthPod) error {
	for _, p := range pods {
		p.ip = s.allocIP()
	}
	return parallel(ctx, "pods", len(pods), s.cfg.workers, func(ctx context.Context, i int) error {
		p := pods[i]
		if p.obj == nil {
			if err := s.createPod(ctx, p, map[string]string{"app": "bench"}); err != nil {
				return err
			}
		}
		return s.setPodIP(ctx, p, s.hostIP(p.node))
	})
}

// expectedSources is how many source-set elements each node should hold:
// for each policy, on the node holding its egress IP every selected pod
// (gateway mode), elsewhere the node's own selected pods (reroute mode).
func (s *scale) expectedSources(extra map[string]int) map[string]int {
	perPolicy := map[int]int{}
	perPolicyNode := map[int]map[string]int{}
	for _, p := range s.pods {
		if !p.ip.IsValid() {
			continue
		}
		perPolicy[p.policy]++
		if perPolicyNode[p.policy] == nil {
			perPolicyNode[p.policy] = map[string]int{}
		}
		perPolicyNode[p.policy][p.node]++
	}
	out := map[string]int{}
	for _, n := range s.nodes {
		for i := range s.cfg.policies {
			if s.holders[gatewayName(i%s.cfg.gateways)] == n {
				out[n] += perPolicy[i]
			} else {
				out[n] += perPolicyNode[i][n]
			}
		}
		out[n] += extra[n]
	}
	return out
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
