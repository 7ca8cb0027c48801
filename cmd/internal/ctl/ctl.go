// Package ctl is egressnatctl (also the kubectl plugin kubectl-egressnat):
// status, explain, ruleset, conntrack and prepare-node. What decides (the
// status report, explanations, rendering of rules and flows) is pure and
// works on snapshots; reading the API server or the kernel is kept thin.
package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const usageText = `%[1]s: inspect egressnat

Usage:
  %[1]s [--kubeconfig FILE] [--context NAME] COMMAND [flags]

Commands:
  status [-o table|json|yaml]
        every gateway (floating IPs, holders, node health) and every policy
        (egress IP, node, readiness, selected pods)
  explain pod NAMESPACE/NAME [--to IP] [-o text|json|yaml]
        which policy selects the pod and why, or why none does; with --to,
        whether that destination is covered and how it leaves
  ruleset [--netns NAME] [--all-elements] [-o text|json]
        on a node: the agent's nftables table with per-policy counters, its
        ip rules and routes (needs root or CAP_NET_ADMIN)
  conntrack [--netns NAME] [--ip IP]... [-o text|json]
        on a gateway node: the flows SNATed to each floating IP, and the
        flows of its Gateway policies not translated to their egress IP
  prepare-node [--proc-sys-net DIR] [--uplink IFACE]
        set the sysctls a gateway node needs (the agent's init container)

The kubeconfig is --kubeconfig, else $KUBECONFIG, else ~/.kube/config.
ruleset and conntrack take the agent's flags when they differ from the
defaults: --table, --rule-priority, --route-table-base, --mark-mask.
`

// Main runs egressnatctl with args (without the program name) and returns
// the exit code: 0 on success, 1 on a failure, 2 on a usage error.
func Main(ctx context.Context, prog string, args []string, stdout, stderr io.Writer) int {
	err := run(ctx, prog, args, stdout, stderr)
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(stdout, usageText, prog)
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s: %v\n\n", prog, err)
		fmt.Fprintf(stderr, usageText, prog)
		return 2
	}
	fmt.Fprintf(stderr, "%s: %v\n", prog, err)
	return 1
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// kubeFlags are the connection flags every command accepts.
type kubeFlags struct {
	kubeconfig, context string
}

func (k *kubeFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&k.kubeconfig, "kubeconfig", k.kubeconfig, "kubeconfig file (default $KUBECONFIG, then ~/.kube/config)")
	fs.StringVar(&k.context, "context", k.context, "kubeconfig context (default the current one)")
}

// loader connects to the API server the kubeconfig names.
func (k *kubeFlags) loader() (*Loader, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if k.kubeconfig != "" {
		rules.ExplicitPath = k.kubeconfig
	}
	overrides := &clientcmd.ConfigOverrides{CurrentContext: k.context}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides).ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, errors.New("no Kubernetes configuration: pass --kubeconfig, set $KUBECONFIG or create ~/.kube/config")
		}
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.Timeout = 20 * time.Second
	cfg.QPS, cfg.Burst = 50, 100
	core, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return NewLoader(&kube.Clients{Config: cfg, Core: core, Dynamic: dyn}), nil
}

// nodeFlags locate the agent's state in the kernel.
type nodeFlags struct {
	table          string
	rulePriority   int
	routeTableBase int
	markMask       string
	netns          string
}

func (n *nodeFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&n.table, "table", "egressnat", "the agent's nftables table (--table of the agent)")
	fs.IntVar(&n.rulePriority, "rule-priority", selector.DefaultRulePriority, "priority of the agent's ip rules (--rule-priority of the agent)")
	fs.IntVar(&n.routeTableBase, "route-table-base", selector.DefaultRouteTableBase, "the agent's first routing table (--route-table-base of the agent)")
	fs.StringVar(&n.markMask, "mark-mask", fmt.Sprintf("%#08x", selector.DefaultMarkMask), "the agent's fwmark bits (--mark-mask of the agent)")
	fs.StringVar(&n.netns, "netns", "", "read this network namespace (a name under /run/netns, or a path) instead of the current one")
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

// parseInterleaved parses flags that may come before, between or after
// positional arguments, and returns the positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

func flagError(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError{err.Error()}
}

func run(ctx context.Context, prog string, args []string, stdout, stderr io.Writer) error {
	var kf kubeFlags
	global := newFlagSet(prog)
	kf.add(global)
	if err := global.Parse(args); err != nil {
		return flagError(err)
	}
	args = global.Args()
	if len(args) == 0 {
		return usagef("no command given")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "help":
		return flag.ErrHelp
	case "status":
		fs := newFlagSet("status")
		kf.add(fs)
		out := fs.String("o", FormatTable, "output: table, json or yaml")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return flagError(err)
		}
		if len(pos) > 0 {
			return usagef("status takes no arguments, got %q", strings.Join(pos, " "))
		}
		if *out != FormatTable && *out != FormatJSON && *out != FormatYAML {
			return usagef("-o %q: want table, json or yaml", *out)
		}
		l, err := kf.loader()
		if err != nil {
			return err
		}
		s, err := l.LoadAll(ctx)
		if err != nil {
			return err
		}
		return WriteStatus(stdout, BuildStatus(s), *out)
	case "explain":
		fs := newFlagSet("explain")
		kf.add(fs)
		to := fs.String("to", "", "a destination IPv4 address: is it covered, and how does it leave")
		out := fs.String("o", "text", "output: text, json or yaml")
		gwNS := fs.String("gateway-namespaces", "", "the namespaces whose NetworkGatewayGroups the agents honour besides kube-system (their --gateway-namespaces)")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return flagError(err)
		}
		if len(pos) != 2 || pos[0] != "pod" {
			return usagef("usage: explain pod NAMESPACE/NAME [--to IP]")
		}
		ns, name, ok := strings.Cut(pos[1], "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return usagef("explain pod: want NAMESPACE/NAME, got %q", pos[1])
		}
		var dst netip.Addr
		if *to != "" {
			if dst, err = parseAddr(*to); err != nil {
				return usagef("--to %q: want an IPv4 address", *to)
			}
		}
		if *out != "text" && *out != FormatJSON && *out != FormatYAML {
			return usagef("-o %q: want text, json or yaml", *out)
		}
		l, err := kf.loader()
		if err != nil {
			return err
		}
		namespaces, err := selector.GatewayNamespaces(*gwNS)
		if err != nil {
			return usagef("--gateway-namespaces: %v", err)
		}
		s, err := l.LoadForPod(ctx, ns, name)
		if err != nil {
			return err
		}
		s.GatewayNamespaces = namespaces
		e, err := Explain(s, ns, name, dst)
		if err != nil {
			return err
		}
		return WriteExplanation(stdout, e, *out)
	case "ruleset":
		fs := newFlagSet("ruleset")
		var nf nodeFlags
		nf.add(fs)
		all := fs.Bool("all-elements", false, "print every set element (default: the first 32 of each set)")
		out := fs.String("o", "text", "output: text or json")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return flagError(err)
		}
		if len(pos) > 0 {
			return usagef("ruleset takes no arguments, got %q", strings.Join(pos, " "))
		}
		o, closeNS, err := nf.options()
		if err != nil {
			return err
		}
		defer closeNS()
		rs, err := ReadRuleset(ctx, o)
		if err != nil {
			return err
		}
		switch *out {
		case FormatJSON:
			return writeJSON(stdout, rs)
		case "text":
			maxElems := 32
			if *all {
				maxElems = 0
			}
			return WriteRuleset(stdout, rs, maxElems)
		}
		return usagef("-o %q: want text or json", *out)
	case "conntrack":
		fs := newFlagSet("conntrack")
		var nf nodeFlags
		nf.add(fs)
		var ips ipList
		fs.Var(&ips, "ip", "a floating IP to show (repeatable; default: the floating IPs in the agent's table)")
		out := fs.String("o", "text", "output: text or json")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return flagError(err)
		}
		if len(pos) > 0 {
			return usagef("conntrack takes no arguments, got %q", strings.Join(pos, " "))
		}
		if *out != "text" && *out != FormatJSON {
			return usagef("-o %q: want text or json", *out)
		}
		o, closeNS, err := nf.options()
		if err != nil {
			return err
		}
		defer closeNS()
		r, err := ReadConntrackReport(ctx, o, ips)
		if err != nil {
			return err
		}
		if *out == FormatJSON {
			return writeJSON(stdout, r)
		}
		return WriteConntrackReport(stdout, r)
	case "prepare-node":
		fs := newFlagSet("prepare-node")
		dir := fs.String("proc-sys-net", "/proc/sys/net", "the host's /proc/sys/net (mounted from the host in the agent's init container)")
		uplink := fs.String("uplink", "", "the agent's uplink (src_valid_mark is set on it); the interface of the default route when empty, as the agent's --uplink")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return flagError(err)
		}
		if len(pos) > 0 {
			return usagef("prepare-node takes no arguments, got %q", strings.Join(pos, " "))
		}
		if *uplink == "" {
			if *uplink, err = nft.DefaultRouteLink(); err != nil {
				return err
			}
		}
		return PrepareNode(filepath.Clean(*dir), *uplink, stdout)
	}
	return usagef("unknown command %q", cmd)
}

type ipList []netip.Addr

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
