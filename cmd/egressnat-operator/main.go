// Command egressnat-operator assigns every floating IP of every
// NetworkGatewayGroup to a node and writes the status of gateways and
// policies. Run two replicas: they elect a leader through a Lease and only
// the leader writes.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/logging"
	"github.com/egressnat/egressnat/cmd/internal/metrics"
	"github.com/egressnat/egressnat/cmd/internal/operator"
	"github.com/egressnat/egressnat/cmd/internal/version"
	"github.com/egressnat/egressnat/leader"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "egressnat-operator:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("egressnat-operator", flag.ContinueOnError)
	logOpts := logging.AddFlags(fs)
	showVersion := fs.Bool("version", false, "print the version and exit")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file; in-cluster service account when empty")
	namespace := fs.String("namespace", envOr("POD_NAMESPACE", "egressnat-system"), "namespace of the leader Lease and the agents' liveness Leases")
	identity := fs.String("identity", envOr("POD_NAME", hostname()), "this replica's identity in the leader election")
	leaseDuration := fs.Duration("leader-lease-duration", 4*time.Second, "how long a dead leader blocks a standby")
	renewDeadline := fs.Duration("leader-renew-deadline", 3*time.Second, "how long the leader retries renewing before it steps down")
	retryPeriod := fs.Duration("leader-retry-period", 500*time.Millisecond, "how often a standby tries to take the lease")
	fallback := fs.Bool("fallback-to-node-ip", false, "when no node can hold a policy's egress IP, let its traffic leave with node IPs instead of dropping it")
	serveAddr := fs.String("health-addr", "127.0.0.1:9795", "where /metrics, /healthz and /readyz are served; the default is reachable from this node only (the Deployment passes $(HOST_IP):9795 for the kubelet's probes and Prometheus)")
	probe := operator.DefaultProbeConfig
	fs.IntVar(&probe.Port, "probe-port", probe.Port, "the agents' health port, probed over the node network")
	fs.DurationVar(&probe.Interval, "probe-interval", probe.Interval, "probe interval of nodes holding floating IPs")
	fs.DurationVar(&probe.SlowInterval, "probe-slow-interval", probe.SlowInterval, "probe interval of the other nodes")
	fs.DurationVar(&probe.Timeout, "probe-timeout", probe.Timeout, "timeout of one probe")
	fs.IntVar(&probe.Misses, "probe-misses", probe.Misses, "consecutive unanswered probes that make a node Down")
	fs.DurationVar(&probe.RefusedGrace, "probe-refused-grace", probe.RefusedGrace, "a node whose kernel refuses probes (its agent is not listening) stays Up for this long after its agent last answered")
	fs.DurationVar(&probe.HeartbeatTimeout, "heartbeat-timeout", probe.HeartbeatTimeout, "a node whose agent's heartbeat (it advances while the agent's sync loop makes progress) has not moved for this long is Down")
	handoverTimeout := fs.Duration("handover-timeout", operator.DefaultHandoverTimeout, "a planned move (cordon, maintenance label, agent stopping, egressnatctl move) whose new node has not reported the IP prepared within this completes anyway")
	arpLease := fs.Duration("arp-lease", operator.DefaultARPLease, "the agents' --arp-lease: a node that went silent keeps its floating IPs until this (plus one probe interval) after its agent last answered, when its kernel has surely stopped answering ARP for them; negative: no wait")
	probeSecret := fs.String("probe-secret", "egressnat-probe-key", "Secret in --namespace holding the probe key (key \"key\"); created with a random key when missing")
	gatewayNamespaces := fs.String("gateway-namespaces", "", "comma-separated namespaces whose NetworkGatewayGroups are honoured besides kube-system; groups elsewhere are ignored (give the agents the same list)")
	markMask := fs.String("mark-mask", fmt.Sprintf("%#08x", selector.DefaultMarkMask), "the agents' --mark-mask: how many gateway nodes they can route to (policies beyond get an OutOfMarks condition)")
	minSubnetPrefix := fs.Int("min-subnet-prefix", selector.DefaultMinSubnetPrefix, "shortest uplink subnet an agent may advertise for floating IPs; shorter ones are ignored")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if *showVersion {
		fmt.Println(version.String("egressnat-operator"))
		return nil
	}
	mask, err := strconv.ParseUint(*markMask, 0, 32)
	if err != nil || mask == 0 {
		return fmt.Errorf("--mark-mask %q: want a non-zero 32-bit number", *markMask)
	}
	namespaces, err := selector.GatewayNamespaces(*gatewayNamespaces)
	if err != nil {
		return fmt.Errorf("--gateway-namespaces: %w", err)
	}
	if *minSubnetPrefix < 1 || *minSubnetPrefix > 32 {
		return fmt.Errorf("--min-subnet-prefix %d: must be from 1 to 32", *minSubnetPrefix)
	}
	log, err := logging.New(logOpts)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	logging.RouteKlog(log)
	clients, err := kube.NewClients(*kubeconfig)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.Info("starting", zap.String("version", version.Get().String()), zap.String("identity", *identity), zap.String("namespace", *namespace),
		zap.Strings("gatewayNamespaces", namespaces), zap.Int("minSubnetPrefix", *minSubnetPrefix))
	m := metrics.NewOperator(nil)
	ctrl, err := operator.New(operator.Config{
		Clients: clients, AgentNamespace: *namespace, FallbackToNodeIP: *fallback, Log: log, Probe: probe, Metrics: m,
		Identity: *identity, ProbeSecret: *probeSecret, ARPLease: *arpLease, HandoverTimeout: *handoverTimeout,
		GatewayNamespaces: namespaces, MinSubnetPrefix: *minSubnetPrefix, MarkMask: uint32(mask),
	})
	if err != nil {
		return err
	}
	go func() {
		if err := metrics.Serve(ctx, *serveAddr, ctrl.Ready); err != nil {
			log.Error("metrics and health server stopped", zap.Error(err))
		}
	}()
	// Every replica watches and probes (agents count only the leader's
	// probes); only the leader writes.
	if err := ctrl.Start(ctx); err != nil {
		return err
	}
	return leader.Run(ctx, leader.Config{
		Client: clients.Core, Namespace: *namespace, Name: "egressnat-operator", Identity: *identity,
		LeaseDuration: *leaseDuration, RenewDeadline: *renewDeadline, RetryPeriod: *retryPeriod,
		Log: log, OnLeading: ctrl.Lead,
	})
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}
