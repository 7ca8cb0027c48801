package ctl

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func (a *app) statusCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "status",
		Short: "Every gateway and every policy: floating IPs, holders, node health, egress IPs, readiness",
		Long: `Every gateway (its floating IPs, the node holding each and the health of
the nodes) and every policy (egress IP, node, readiness, selected pods), in
every namespace; then the pod classifier each node's agent runs (nft or
ebpf, and why an agent asked for ebpf fell back to nft), from the agents'
Leases in the namespace of -n (default ` + DefaultNamespace + `), which
the built-in view role cannot read. Why a pod is or is not selected:
explain pod.`,
		Example: fmt.Sprintf("  %[1]s status\n  %[1]s status -o yaml", a.prog),
		Args:    noArgs,
	}
	out := outputFlag(c, FormatTable, FormatJSON, FormatYAML)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		if err := checkOutput(*out, FormatTable, FormatJSON, FormatYAML); err != nil {
			return err
		}
		l, err := a.loader()
		if err != nil {
			return err
		}
		s, err := l.LoadAll(cmd.Context())
		if err != nil {
			return err
		}
		ns := *a.kube.Namespace
		if ns == "" {
			ns = DefaultNamespace
		}
		l.LoadAgents(cmd.Context(), s, ns)
		return WriteStatus(a.stdout, BuildStatus(s), *out)
	})
	return c
}

func (a *app) explainCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "explain pod (NAMESPACE/NAME | NAME [-n NAMESPACE]) [--to IP]",
		Short: "Which policy selects a pod and why: explain pod NAMESPACE/NAME [--to IP]",
		Long: `Which policy selects the pod and why, or why none does: each policy's
sources against the pod's and its namespace's labels, and what the agents
do with the pod's traffic. With --to, whether that destination is covered,
by which policy when several are, and how the traffic leaves.

The pod is NAMESPACE/NAME, or NAME in the namespace of -n, else in the
namespace of the kubeconfig's context.`,
		Example: fmt.Sprintf("  %[1]s explain pod shop/web-0 --to 203.0.113.10\n  %[1]s explain pod web-0 -n shop -o json", a.prog),
		ValidArgsFunction: func(_ *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) == 0 {
				return []string{"pod"}, cobra.ShellCompDirectiveNoFileComp
			}
			return nil, cobra.ShellCompDirectiveNoFileComp
		},
	}
	to := c.Flags().String("to", "", "a destination IPv4 address: is it covered, and how does it leave")
	gwNS := c.Flags().String("gateway-namespaces", "", "the namespaces whose NetworkGatewayGroups the agents honour besides kube-system (their --gateway-namespaces)")
	out := outputFlag(c, "text", FormatJSON, FormatYAML)
	c.RunE = runE(func(cmd *cobra.Command, args []string) error {
		if len(args) != 2 || args[0] != "pod" {
			return usagef("usage: explain pod NAMESPACE/NAME [--to IP], or explain pod NAME -n NAMESPACE")
		}
		ns, name, err := splitPodRef(args[1], *a.kube.Namespace)
		if err != nil {
			return err
		}
		var dst netip.Addr
		if *to != "" {
			if dst, err = parseAddr(*to); err != nil {
				return usagef("--to %q: want an IPv4 address", *to)
			}
		}
		if err := checkOutput(*out, "text", FormatJSON, FormatYAML); err != nil {
			return err
		}
		namespaces, err := selector.GatewayNamespaces(*gwNS)
		if err != nil {
			return usagef("--gateway-namespaces: %v", err)
		}
		if ns == "" {
			if ns, err = a.contextNamespace(); err != nil {
				return err
			}
			if ns == "" {
				return usagef("explain pod: want NAMESPACE/NAME, or NAME with -n NAMESPACE (the kubeconfig's context names no namespace), got %q", name)
			}
		}
		l, err := a.loader()
		if err != nil {
			return err
		}
		s, err := l.LoadForPod(cmd.Context(), ns, name)
		if err != nil {
			return err
		}
		s.GatewayNamespaces = namespaces
		e, err := Explain(s, ns, name, dst)
		if err != nil {
			return err
		}
		return WriteExplanation(a.stdout, e, *out)
	})
	return c
}

// splitPodRef splits explain's NAMESPACE/NAME, or returns NAME with the
// namespace of -n (flagNS, "" when not given).
func splitPodRef(ref, flagNS string) (namespace, name string, err error) {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok {
		if ref == "" {
			return "", "", usagef("explain pod: want NAMESPACE/NAME, or NAME with -n NAMESPACE, got %q", ref)
		}
		return flagNS, ref, nil
	}
	if ns == "" || name == "" || strings.Contains(name, "/") {
		return "", "", usagef("explain pod: want NAMESPACE/NAME, or NAME with -n NAMESPACE, got %q", ref)
	}
	if flagNS != "" && flagNS != ns {
		return "", "", usagef("explain pod %s: -n %s names another namespace", ref, flagNS)
	}
	return ns, name, nil
}

// nodeFlags locate the agent's state in the kernel.
type nodeFlags struct {
	table          string
	rulePriority   int
	routeTableBase int
	markMask       string
	netns          string
}

func (n *nodeFlags) add(cmd *cobra.Command) {
	fs := cmd.Flags()
	fs.StringVar(&n.table, "table", "egressnat", "the agent's nftables table (--table of the agent)")
	fs.IntVar(&n.rulePriority, "rule-priority", selector.DefaultRulePriority, "priority of the agent's ip rules (--rule-priority of the agent)")
	fs.IntVar(&n.routeTableBase, "route-table-base", selector.DefaultRouteTableBase, "the agent's first routing table (--route-table-base of the agent)")
	fs.StringVar(&n.markMask, "mark-mask", fmt.Sprintf("%#08x", selector.DefaultMarkMask), "the agent's fwmark bits (--mark-mask of the agent)")
	fs.StringVar(&n.netns, "netns", "", "read this network namespace (a name under /run/netns, or a path) instead of the current one")
	mustComplete(cmd, "netns", completeNetNS)
}

// run checks the output format (text or json), then runs fn with the
// node's options, inside the node's network namespace when --netns names
// one.
func (n *nodeFlags) run(out string, fn func(RulesetOptions) error) error {
	if err := checkOutput(out, "text", FormatJSON); err != nil {
		return err
	}
	o, closeNS, err := n.options()
	if err != nil {
		return err
	}
	defer closeNS()
	return fn(o)
}

func (n *nodeFlags) options() (RulesetOptions, func(), error) {
	mask, err := strconv.ParseUint(n.markMask, 0, 32)
	if err != nil || mask == 0 {
		return RulesetOptions{}, nil, usagef("--mark-mask %q: want a non-zero 32-bit number", n.markMask)
	}
	fd, err := OpenNetNS(n.netns)
	if err != nil {
		return RulesetOptions{}, nil, err
	}
	closeFn := func() {}
	if fd > 0 {
		closeFn = func() { closeFd(fd) }
	}
	return RulesetOptions{Table: n.table, RulePriority: n.rulePriority, RouteTableBase: n.routeTableBase,
		MarkMask: uint32(mask), NetNSFd: fd}, closeFn, nil
}

const nodeLong = `

It reads the node's kernel, not the Kubernetes API: run it on the node as
root (or with CAP_NET_ADMIN), or in the node's agent pod:
  kubectl -n egressnat-system exec <agent pod> -c agent -- /egressnatctl %s`

func (a *app) rulesetCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "ruleset",
		Short: "On a node: the agent's nftables table with per-policy counters, its eBPF classifier, its ip rules and routes",
		Long: `The agent's nftables table with per-policy counters; the eBPF pod
classifier pinned under --bpf-dir (--classifier=ebpf), if any: the
interfaces its program is attached to and its map's entries (pod IP ->
mark/mask); the agent's ip rules and its routes.` + fmt.Sprintf(nodeLong, "ruleset"),
		Args: noArgs,
	}
	var nf nodeFlags
	nf.add(c)
	all := c.Flags().Bool("all-elements", false, "print every set element and BPF classifier entry (default: the first 32 of each)")
	bpfDir := c.Flags().String("bpf-dir", defaultBPFDir(os.Getenv), "where the agent pins its eBPF classifier (--bpf-dir of the agent; the default is $"+BPFDirEnv+", set in the agent's pod, else "+DefaultBPFDir+"; empty: do not read it)")
	out := outputFlag(c, "text", FormatJSON)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		return nf.run(*out, func(o RulesetOptions) error {
			if *bpfDir != "" {
				o.BPFDir = filepath.Clean(*bpfDir)
			}
			rs, err := ReadRuleset(cmd.Context(), o)
			if err != nil {
				return err
			}
			if *out == FormatJSON {
				return writeJSON(a.stdout, rs)
			}
			maxElems := 32
			if *all {
				maxElems = 0
			}
			return WriteRuleset(a.stdout, rs, maxElems)
		})
	})
	return c
}

func (a *app) conntrackCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "conntrack",
		Short: "On a gateway node: the flows SNATed to each floating IP, and those of its policies left untranslated",
		Long: `The flows SNATed to each floating IP the node holds, and the flows of its
Gateway policies not translated to their egress IP.` + fmt.Sprintf(nodeLong, "conntrack"),
		Args: noArgs,
	}
	var nf nodeFlags
	nf.add(c)
	var ips ipList
	c.Flags().Var(&ips, "ip", "a floating IP to show (repeatable; default: the floating IPs in the agent's table)")
	out := outputFlag(c, "text", FormatJSON)
	c.RunE = runE(func(cmd *cobra.Command, _ []string) error {
		return nf.run(*out, func(o RulesetOptions) error {
			r, err := ReadConntrackReport(cmd.Context(), o, ips)
			if err != nil {
				return err
			}
			if *out == FormatJSON {
				return writeJSON(a.stdout, r)
			}
			return WriteConntrackReport(a.stdout, r)
		})
	})
	return c
}

func (a *app) prepareNodeCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "prepare-node",
		Short: "Set the sysctls a gateway node needs (the agent's init container)",
		Long: `Set the sysctls a gateway node needs: send_redirects 0 on every interface,
src_valid_mark 1 on the uplink, nf_conntrack_tcp_be_liberal 1. Values
already right are not written; each change is printed. The agent's init
container runs it with the host's /proc/sys/net mounted.`,
		Args: noArgs,
	}
	dir := c.Flags().String("proc-sys-net", "/proc/sys/net", "the host's /proc/sys/net (mounted from the host in the agent's init container)")
	uplink := c.Flags().String("uplink", "", "the agent's uplink (src_valid_mark is set on it); the interface of the default route when empty, as the agent's --uplink")
	c.RunE = runE(func(*cobra.Command, []string) error {
		up := *uplink
		if up == "" {
			var err error
			if up, err = nft.DefaultRouteLink(); err != nil {
				return err
			}
		}
		return PrepareNode(filepath.Clean(*dir), up, a.stdout)
	})
	return c
}

type ipList []netip.Addr

var _ pflag.Value = (*ipList)(nil)

func (l *ipList) String() string {
	s := make([]string, len(*l))
	for i, a := range *l {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func (l *ipList) Set(v string) error {
	a, err := parseAddr(v)
	if err != nil {
		return err
	}
	*l = append(*l, a)
	return nil
}

func (l *ipList) Type() string { return "ip" }
