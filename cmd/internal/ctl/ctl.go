// Package ctl is egressnatctl (also the kubectl plugin kubectl-egressnat):
// status, explain, move, ruleset, conntrack, prepare-node and version. What
// decides (the status report, explanations, rendering of rules and flows)
// is pure and works on snapshots; reading the API server or the kernel is
// kept thin. The command line is cobra's, with kubectl's connection flags
// (k8s.io/cli-runtime).
package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/version"
	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Main runs egressnatctl with args (without the program name) and returns
// the exit code: 0 on success, 1 on a failure, 2 on a usage error. prog is
// the name in messages: egressnatctl, or "kubectl egressnat" for the
// plugin.
func Main(ctx context.Context, prog string, args []string, stdout, stderr io.Writer) int {
	root := newApp(prog, stdout, stderr).command()
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	if f, ok := errors.AsType[failure](err); ok {
		fmt.Fprintf(stderr, "%s: %v\n", prog, f.err)
		return 1
	}
	fmt.Fprintf(stderr, "%s: %s\nSee '%s --help' for usage.\n", prog, strings.TrimRight(err.Error(), "\n"), cmd.CommandPath())
	return 2
}

// usageError is a bad invocation found by a command (exit 2). Errors of
// the command line itself (unknown commands and flags, bad flag values)
// are usage errors too.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// failure is the error of a command that ran (exit 1).
type failure struct{ err error }

func (f failure) Error() string { return f.err.Error() }
func (f failure) Unwrap() error { return f.err }

// runE marks what a command returns as a failure, unless it is a usage
// error.
func runE(run func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		err := run(cmd, args)
		if err == nil {
			return nil
		}
		if _, ok := errors.AsType[usageError](err); ok {
			return err
		}
		return failure{err}
	}
}

// noArgs rejects positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.Name(), strings.Join(args, " "))
	}
	return nil
}

// app is one run of the command: its streams and kubectl's connection
// flags.
type app struct {
	prog           string
	stdout, stderr io.Writer
	kube           *genericclioptions.ConfigFlags
}

// defaultRequestTimeout bounds each request unless --request-timeout says
// otherwise (0: no bound, as kubectl).
const defaultRequestTimeout = "20s"

func newApp(prog string, stdout, stderr io.Writer) *app {
	kf := genericclioptions.NewConfigFlags(false)
	kf.CacheDir = nil // no discovery cache: --cache-dir would do nothing
	timeout := defaultRequestTimeout
	kf.Timeout = &timeout
	return &app{prog: prog, stdout: stdout, stderr: stderr, kube: kf}
}

const rootLong = `%[1]s inspects egressnat, and moves floating IPs by hand.

status, explain, version and move use the Kubernetes API with your kubeconfig
(--kubeconfig, else $KUBECONFIG, else ~/.kube/config) and kubectl's flags:
--context, --cluster, --user, -n, --as, --as-group, --request-timeout,
--server, --token, --insecure-skip-tls-verify, ...

ruleset and conntrack read a node's kernel: run them on the node as root,
or in the node's agent pod, which has the binary and the capability:
  kubectl -n egressnat-system exec <agent pod> -c agent -- /egressnatctl ruleset
They take the agent's flags when they differ from the defaults: --table,
--rule-priority, --route-table-base, --mark-mask (and ruleset --bpf-dir).
`

// command is the root command with every subcommand.
func (a *app) command() *cobra.Command {
	root := &cobra.Command{
		Use:           "egressnatctl",
		Short:         "Inspect egressnat",
		Long:          fmt.Sprintf(rootLong, a.prog),
		SilenceErrors: true,
		SilenceUsage:  true,
		RunE:          func(*cobra.Command, []string) error { return usagef("no command given") },
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if _, err := clientcmd.ParseTimeout(*a.kube.Timeout); err != nil {
				return usagef("--request-timeout %q: want a duration such as 20s, 2m or 0 (no timeout)", *a.kube.Timeout)
			}
			return nil
		},
	}
	// --version, as on the agent and the operator (the version command also
	// asks the API server).
	root.Version = version.Get().String()
	root.SetVersionTemplate(a.prog + " {{.Version}}\n")
	if a.prog != root.Name() {
		root.Annotations = map[string]string{cobra.CommandDisplayNameAnnotation: a.prog}
	}
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err.Error()} })
	a.kube.AddFlags(root.PersistentFlags())
	for flag, names := range map[string]func(*clientcmdapi.Config) []string{
		"context": func(c *clientcmdapi.Config) []string { return sortedKeys(c.Contexts) },
		"cluster": func(c *clientcmdapi.Config) []string { return sortedKeys(c.Clusters) },
		"user":    func(c *clientcmdapi.Config) []string { return sortedKeys(c.AuthInfos) },
	} {
		mustComplete(root, flag, a.completeKubeconfig(names))
	}
	root.AddCommand(a.statusCommand(), a.explainCommand(), a.rulesetCommand(), a.conntrackCommand(),
		a.prepareNodeCommand(), a.versionCommand(), a.moveCommand())
	// cobra's completion command prints its help and exits 0 without a
	// shell or with an unknown one: make both usage errors.
	root.InitDefaultCompletionCmd()
	if c, _, err := root.Find([]string{"completion"}); err == nil && c != root {
		c.RunE = func(*cobra.Command, []string) error {
			return usagef("completion: name a shell: bash, zsh, fish or powershell")
		}
	}
	return root
}

// errNoKubeconfig: neither a kubeconfig nor --server nor an in-cluster
// service account.
var errNoKubeconfig = errors.New("no Kubernetes configuration: pass --kubeconfig, set $KUBECONFIG or create ~/.kube/config")

// restConfig is the client configuration the kubeconfig and kubectl's
// flags describe.
func (a *app) restConfig() (*rest.Config, error) {
	loader := a.kube.ToRawKubeConfigLoader()
	if *a.kube.APIServer == "" {
		raw, err := loader.RawConfig()
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig: %w", err)
		}
		if len(raw.Clusters) == 0 && !inCluster() {
			return nil, errNoKubeconfig
		}
	}
	cfg, err := loader.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	return cfg, nil
}

func inCluster() bool {
	_, err := rest.InClusterConfig()
	return err == nil
}

// loader connects to the API server.
func (a *app) loader() (*Loader, error) {
	cfg, err := a.restConfig()
	if err != nil {
		return nil, err
	}
	core, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return NewLoader(&kube.Clients{Config: cfg, Core: core, Dynamic: dyn}), nil
}

// contextNamespace is the namespace the kubeconfig's context (--context,
// else the current one) names; "" when it names none.
func (a *app) contextNamespace() (string, error) {
	raw, err := a.kube.ToRawKubeConfigLoader().RawConfig()
	if err != nil {
		return "", fmt.Errorf("load kubeconfig: %w", err)
	}
	name := raw.CurrentContext
	if *a.kube.Context != "" {
		name = *a.kube.Context
	}
	if c, ok := raw.Contexts[name]; ok {
		return c.Namespace, nil
	}
	return "", nil
}

// completeKubeconfig completes a flag with names from the kubeconfig.
func (a *app) completeKubeconfig(names func(*clientcmdapi.Config) []string) cobra.CompletionFunc {
	return func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
		raw, err := a.kube.ToRawKubeConfigLoader().RawConfig()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return names(&raw), cobra.ShellCompDirectiveNoFileComp
	}
}

// completeNetNS completes --netns with the names under /run/netns.
func completeNetNS(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
	entries, _ := os.ReadDir("/run/netns")
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

// mustComplete registers a flag's completion; it fails only on a flag that
// does not exist, a programming error.
func mustComplete(cmd *cobra.Command, flag string, f cobra.CompletionFunc) {
	if err := cmd.RegisterFlagCompletionFunc(flag, f); err != nil {
		panic(err)
	}
}

// outputFlag adds -o/--output with its allowed values (the first is the
// default) and their completion.
func outputFlag(cmd *cobra.Command, formats ...string) *string {
	out := cmd.Flags().StringP("output", "o", formats[0], "output format: "+orList(formats))
	mustComplete(cmd, "output", cobra.FixedCompletions(formats, cobra.ShellCompDirectiveNoFileComp))
	return out
}

// checkOutput rejects an -o value not among formats.
func checkOutput(out string, formats ...string) error {
	if slices.Contains(formats, out) {
		return nil
	}
	return usagef("-o %q: want %s", out, orList(formats))
}

// orList is "a, b or c".
func orList(s []string) string {
	if len(s) < 2 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}
