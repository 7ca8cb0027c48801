package cluster

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/egressnat/egressnat/test/image"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RealPod is a pod of a real cluster, run by a kubelet from the netutil
// image.
type RealPod struct {
	Namespace, Name, Node string
}

func (p RealPod) String() string { return p.Namespace + "/" + p.Name }

// RunPod creates a pod of the netutil image on node (nodeName: no
// scheduler decision to wait for; the control plane's taint tolerated)
// running args (e.g. "sleep"), and returns without waiting for it.
func (c *Cluster) RunPod(ctx context.Context, node, namespace, name string, labels map[string]string, args ...string) (RealPod, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: int64Ptr(1),
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			Containers: []corev1.Container{{
				Name: "netutil", Image: image.NetutilName, ImagePullPolicy: corev1.PullNever,
				Command: append([]string{"/netutil"}, args...),
			}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return RealPod{}, fmt.Errorf("create pod %s/%s: %w", namespace, name, err)
	}
	return RealPod{namespace, name, node}, nil
}

// WaitPodRunning waits until p runs with its IP in its status (written by
// its kubelet) and returns the IP.
func (c *Cluster) WaitPodRunning(ctx context.Context, p RealPod, timeout time.Duration) (netip.Addr, error) {
	var ip netip.Addr
	err := waitFor(ctx, timeout, func() error {
		pod, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if pod.Status.Phase != corev1.PodRunning || pod.Status.PodIP == "" {
			return fmt.Errorf("pod %s is %s (ip %q)", p, pod.Status.Phase, pod.Status.PodIP)
		}
		ip, err = netip.ParseAddr(pod.Status.PodIP)
		return err
	})
	return ip, err
}

// DeleteRealPod deletes p and waits until its object is gone.
func (c *Cluster) DeleteRealPod(ctx context.Context, p RealPod) error {
	err := c.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return waitFor(ctx, time.Minute, func() error {
		_, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("pod %s still exists (%v)", p, err)
	})
}

// Exec runs the netutil command args in p (kubectl exec, through the
// API server and p's kubelet) and returns its output.
func (c *Cluster) Exec(ctx context.Context, p RealPod, args ...string) (string, error) {
	return c.Kubectl(ctx, "", append([]string{"-n", p.Namespace, "exec", p.Name, "--", "/netutil"}, args...)...)
}

// SeenSource runs "netutil connect addr" in p and returns the source
// address the server at addr saw (the lab's echo servers and netutil's
// echo-server both answer with it).
func (c *Cluster) SeenSource(ctx context.Context, p RealPod, addr string) (netip.AddrPort, error) {
	out, err := c.Exec(ctx, p, "connect", "--timeout", "2s", addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	for _, f := range strings.Fields(out) {
		if v, ok := strings.CutPrefix(f, "seen="); ok {
			return netip.ParseAddrPort(v)
		}
	}
	return netip.AddrPort{}, fmt.Errorf("netutil connect in %s: no seen= in %q", p, out)
}

// WaitSeenSource waits until p's connections to addr are seen from want.
func (c *Cluster) WaitSeenSource(ctx context.Context, p RealPod, addr string, want netip.Addr, timeout time.Duration) error {
	return waitFor(ctx, timeout, func() error {
		got, err := c.SeenSource(ctx, p, addr)
		if err != nil {
			return err
		}
		if got.Addr() != want {
			return fmt.Errorf("%s reaches %s from %s, want %s", p, addr, got.Addr(), want)
		}
		return nil
	})
}

// SeedWalkthrough runs the seed's scenario on real pods: namespaces alice
// and paul (and carol, whom no policy selects) with frontend pods on the
// workers, the seed's gateway and policy; it waits until every selected
// pod leaves with the gateway's first floating IP and every other pod
// with its node's IP, and prints what the external server saw.
func SeedWalkthrough(ctx context.Context, c *Cluster, w io.Writer) error {
	for ns, user := range map[string]string{"alice": "alice", "paul": "paul", "carol": "carol"} {
		if err := c.EnsureNamespace(ctx, ns, map[string]string{"user": user}); err != nil {
			return err
		}
	}
	frontend := map[string]string{"role": "frontend"}
	type row struct {
		pod  RealPod
		want netip.Addr
		why  string
	}
	fip := netip.MustParseAddr("192.0.2.100")
	var rows []row
	for _, spec := range []struct {
		node, ns, name string
		labels         map[string]string
		selected       bool
	}{
		{"worker2", "alice", "web", frontend, true},
		{"worker1", "paul", "web", frontend, true},
		{"worker2", "alice", "db", map[string]string{"role": "backend"}, false},
		{"worker2", "carol", "web", frontend, false},
	} {
		p, err := c.RunPod(ctx, spec.node, spec.ns, spec.name, spec.labels, "sleep")
		if err != nil {
			return err
		}
		r := row{pod: p, want: fip, why: "selected by policy egress"}
		if !spec.selected {
			r.want, r.why = c.Lab.Node(spec.node).IP, "not selected: the node's IP"
		}
		rows = append(rows, r)
	}
	for _, r := range rows {
		if _, err := c.WaitPodRunning(ctx, r.pod, 2*time.Minute); err != nil {
			return err
		}
	}
	if out, err := c.Kubectl(ctx, SeedScenario, "apply", "-f", "-"); err != nil {
		return fmt.Errorf("apply the seed scenario: %w: %s", err, out)
	}
	ext := c.Lab.External("ext1")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    POD\tNODE\tSOURCE SEEN BY "+ext.IP.String()+"\tWHY")
	for _, r := range rows {
		if err := c.WaitSeenSource(ctx, r.pod, ext.TCPAddr(), r.want, time.Minute); err != nil {
			return err
		}
		fmt.Fprintf(tw, "    %s\t%s\t%s\t%s\n", r.pod, r.pod.Node, r.want, r.why)
	}
	tw.Flush()
	out, err := c.Kubectl(ctx, "", "get", "networkgatewaygroups,egressnatpolicies", "-A")
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n%s", out)
	return nil
}
