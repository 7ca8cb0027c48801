package cluster

import (
	"context"
	"fmt"
	"strings"
)

// RealLogs returns, for failures of a real cluster: the pods of every
// namespace, the egressnat pods' logs (kubectl logs, the previous run's
// too), and the tail of every kubelet's and containerd's log.
func (c *Cluster) RealLogs(ctx context.Context) string {
	var b strings.Builder
	pods, _ := c.Kubectl(ctx, "", "get", "pods", "-A", "-o", "wide")
	fmt.Fprintf(&b, "--- pods\n%s\n", pods)
	names, _ := c.Kubectl(ctx, "", "-n", SystemNamespace, "get", "pods", "-o", "name")
	for _, name := range strings.Fields(names) {
		for _, prev := range []bool{false, true} {
			args := []string{"-n", SystemNamespace, "logs", name, "--all-containers", "--tail=80"}
			if prev {
				args = append(args, "--previous")
			}
			out, err := c.Kubectl(ctx, "", args...)
			if err != nil && prev {
				continue // no previous run
			}
			fmt.Fprintf(&b, "--- %s (previous %v)\n%s\n", name, prev, tail(out+fmt.Sprint(errString(err)), 6000))
		}
	}
	for _, rn := range c.realNodes {
		if rn.Kubelet != nil {
			fmt.Fprintf(&b, "--- kubelet %s\n%s\n", rn.Name, tail(rn.Kubelet.Log(), 3000))
		}
		if rn.Containerd != nil {
			fmt.Fprintf(&b, "--- containerd %s\n%s\n", rn.Name, tail(rn.Containerd.Log(), 2000))
		}
	}
	return b.String()
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
