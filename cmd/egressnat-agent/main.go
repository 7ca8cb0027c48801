// Command egressnat-agent runs on every node (a DaemonSet with hostNetwork):
// it programs this node's nftables table, policy routing and floating IPs so
// that selected pods' traffic leaves the cluster with its policy's egress IP.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/agent"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/cmd/internal/logging"
	"github.com/egressnat/egressnat/cmd/internal/metrics"
	"github.com/egressnat/egressnat/cmd/internal/version"
	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/nft/bpf"
	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
)

// The agent reaches the kernel through its Dataplane interface only.
var _ agent.Dataplane = (*nft.Dataplane)(nil)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "egressnat-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("egressnat-agent", flag.ContinueOnError)
	logOpts := logging.AddFlags(fs)
	showVersion := fs.Bool("version", false, "print the version and exit")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file; in-cluster service account when empty")
	node := fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (NODE_NAME from the downward API)")
	namespace := fs.String("namespace", envOr("POD_NAMESPACE", "egressnat-system"), "namespace of the agents' liveness Leases")
	uplink := fs.String("uplink", "", "uplink interface; the interface of the default route when empty")
	table := fs.String("table", "egressnat", "the nftables table the agent owns (family ip)")
	markMask := fs.String("mark-mask", fmt.Sprintf("%#08x", selector.DefaultMarkMask), "fwmark bits the agent may use; clear of kube-proxy (0x4000, 0x8000) and Calico (0xffff0000)")
	tableBase := fs.Int("route-table-base", selector.DefaultRouteTableBase, "first routing table number; one table per gateway next hop")
	rulePriority := fs.Int("rule-priority", selector.DefaultRulePriority, "priority of the agent's ip rules (before main at 32766)")
	leaseDuration := fs.Duration("lease-duration", 90*time.Second, "duration written on the agent's Lease (it carries the uplink subnets; health comes from the operators' probes)")
	renewInterval := fs.Duration("renew-interval", 30*time.Second, "how often the agent's Lease is renewed")
	healthAddr := fs.String("health-probe-addr", ":9797", "where the operators' TCP health probes connect: they dial the node's InternalIP, so it must listen there (the DaemonSet passes $(HOST_IP):9797); the default listens on every address")
	serveAddr := fs.String("health-addr", "127.0.0.1:9796", "where /metrics, /healthz and /readyz are served; the default is reachable from this node only (the DaemonSet passes $(HOST_IP):9796 for the kubelet's probes and Prometheus)")
	fenceAfter := fs.Duration("fence-after", time.Second, "a node holding floating IPs that has seen no probe of the operator leader for this long and cannot reach the API server releases them")
	arpProbeWait := fs.Duration("arp-probe-wait", 50*time.Millisecond, "before adding a floating IP, ARP-probe it for this long and do not take it while another host answers; negative: no probe")
	arpLease := fs.Duration("arp-lease", 300*time.Millisecond, "the node answers ARP for its floating IPs only while the agent renews this lease (every 100 ms, while it works); set the operator's --arp-lease alike; negative: no lease")
	stateDir := fs.String("state-dir", "/var/lib/egressnat", "directory kept across reboots (a hostPath) where the agent saves the cluster networks its guard table needs before it can reach the API server; empty: none saved")
	probeSecret := fs.String("probe-secret", "egressnat-probe-key", "Secret in --namespace holding the key that authenticates the operator's probes (the operator creates it)")
	resync := fs.Duration("resync", 30*time.Second, "period (jittered) of the full recomputation and re-apply, and of the background check of the nftables table that repairs changes made outside egressnat")
	podCIDRs := fs.String("pod-cidrs", "", "comma-separated pod CIDRs never steered, for CNIs that leave Node spec.podCIDRs empty (those of the Nodes are always excluded); a pod of these networks the agent does not know yet is held from policy destinations")
	serviceCIDRs := fs.String("service-cidrs", "", "comma-separated Service CIDRs never steered, for API servers without ServiceCIDR objects (those listed are always excluded)")
	gatewayNamespaces := fs.String("gateway-namespaces", "", "comma-separated namespaces whose NetworkGatewayGroups are honoured besides kube-system (the same as the operator's)")
	fallback := fs.Bool("fallback-to-node-ip", false, "when no node holds a policy's egress IP, let its traffic leave with the node IP instead of dropping it")
	bootBinary := fs.Bool("boot-binary", true, "keep a copy of this executable in --state-dir for the boot unit (--boot-guard), replaced when it differs")
	bootGuard := fs.Bool("boot-guard", false, "install the guard table from --state-dir when the node has none, then exit; run at boot before the network starts (manifests/host/egressnat-boot-guard.service); needs no API server and no --node-name")
	cleanup := fs.Bool("cleanup", false, "remove everything egressnat put on this node (nftables tables, ip rules and routes, floating IPs, the sysctls it changed back to their values before, its files in --state-dir), then exit: for a node whose agent is gone (docs/operations.md, Uninstall); needs no API server and no --node-name")
	drainTimeout := fs.Duration("drain-timeout", 5*time.Second, "when stopped (not for an uninstall) while holding floating IPs, ask for them to be handed over to other nodes (make before break) and wait until they are, at most this long; 0: stop at once, leaving them (the node keeps answering for them until its ARP lease runs out)")
	cleanupOnUninstall := fs.Bool("cleanup-on-uninstall", true, "when stopped while egressnat is being uninstalled (its namespace or DaemonSet deleted, as seen through the API), do what --cleanup does before exiting; any other stop leaves the kernel as it is")
	podName := fs.String("pod-name", os.Getenv("POD_NAME"), "this pod's name (POD_NAME from the downward API): the DaemonSet that owns it is watched to tell an uninstall from a restart")
	classifier := fs.String("classifier", metrics.BackendNFT, "pod classifier backend: nft (an nftables map of pod addresses) or ebpf (a tc program on the pod-facing interfaces writes each pod's class into the packet mark from a pinned BPF map; needs CAP_BPF, a bpffs at --bpf-dir's parent, manifests/ebpf); when ebpf cannot run, the agent uses nft and says why (log, egressnat_agent_classifier, egressnatctl status)")
	bpfDir := fs.String("bpf-dir", envOr("EGRESSNAT_BPF_DIR", "/sys/fs/bpf/egressnat"), "where the eBPF classifier pins its map and links (on a bpffs, kept across agent restarts so that pods stay classified); removed on uninstall, and by an agent of the nft backend")
	classMask := fs.String("class-mark-mask", fmt.Sprintf("%#08x", selector.DefaultClassMask), "packet mark bits the eBPF classifier writes pod classes into; clear of --mark-mask, kube-proxy (0x4000, 0x8000) and of your CNI's marks (Calico's default mask is 0xffff0000: choose other bits there)")
	procSysNet := fs.String("proc-sys-net", "/proc/sys/net", "the host's /proc/sys/net, writable (the DaemonSet mounts it at /host/proc/sys/net): where an uninstall and --cleanup restore the sysctls recorded in --state-dir")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if *showVersion {
		fmt.Println(version.String("egressnat-agent"))
		return nil
	}
	mask, err := strconv.ParseUint(*markMask, 0, 32)
	if err != nil || mask == 0 {
		return fmt.Errorf("--mark-mask %q: want a non-zero 32-bit number", *markMask)
	}
	cmask, err := strconv.ParseUint(*classMask, 0, 32)
	if err != nil || cmask == 0 {
		return fmt.Errorf("--class-mark-mask %q: want a non-zero 32-bit number", *classMask)
	}
	if *classifier != metrics.BackendNFT && *classifier != metrics.BackendEBPF {
		return fmt.Errorf("--classifier %q: want nft or ebpf", *classifier)
	}
	gwNamespaces, err := selector.GatewayNamespaces(*gatewayNamespaces)
	if err != nil {
		return fmt.Errorf("--gateway-namespaces: %w", err)
	}
	pods, err := parseCIDRs("--pod-cidrs", *podCIDRs)
	if err != nil {
		return err
	}
	services, err := parseCIDRs("--service-cidrs", *serviceCIDRs)
	if err != nil {
		return err
	}
	if *resync < time.Second {
		return fmt.Errorf("--resync %s: want at least 1s", *resync)
	}
	memLimit, err := setMemoryLimit(os.Getenv)
	if err != nil {
		return err
	}
	log, err := logging.New(logOpts)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	logging.RouteKlog(log)
	if *bootGuard {
		return runBootGuard(log, bootGuardConfig{
			stateDir: *stateDir, uplink: *uplink, table: *table, mask: uint32(mask),
			tableBase: *tableBase, rulePriority: *rulePriority, extra: slices.Concat(pods, services),
		})
	}
	if *cleanup {
		return runCleanup(log, bootGuardConfig{stateDir: *stateDir, uplink: *uplink, table: *table, mask: uint32(mask),
			tableBase: *tableBase, rulePriority: *rulePriority}, *procSysNet, *bpfDir)
	}
	if *node == "" {
		return fmt.Errorf("--node-name (or NODE_NAME) is required")
	}

	upName, subnets, err := agent.Uplink(*uplink)
	if err != nil {
		return err
	}
	gateways, err := agent.UplinkGateways(upName)
	if err != nil {
		return err
	}
	clients, err := kube.NewClients(*kubeconfig)
	if err != nil {
		return err
	}
	nlog := log.With(zap.String("node", *node))
	ncfg := nft.Config{
		Table: *table, Uplink: upName, MarkMask: uint32(mask),
		RouteTableBase: *tableBase, RulePriority: *rulePriority, NetNSFd: -1, Logger: nlog,
		ARPProbeWait: *arpProbeWait, ARPLease: *arpLease, SysctlRecordDir: *stateDir,
	}
	backend, info := metrics.BackendNFT, metrics.BackendNFT
	var prog *bpf.Classifier
	if *classifier == metrics.BackendEBPF {
		if err := nft.CheckClassMask(uint32(cmask), uint32(mask)); err != nil {
			return fmt.Errorf("--class-mark-mask: %w", err)
		}
		if prog, err = bpf.Load(*bpfDir); err != nil {
			info = "nft; ebpf unavailable: " + err.Error()
			nlog.Warn("eBPF classifier unavailable: the nftables classifier runs instead", zap.String("dir", *bpfDir), zap.Error(err))
		} else {
			defer prog.Close()
			backend, info = metrics.BackendEBPF, metrics.BackendEBPF
			ncfg.Classifier, ncfg.ClassMask = prog, uint32(cmask)
		}
	}
	dp, err := nft.New(ncfg)
	if err != nil {
		return fmt.Errorf("dataplane: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.Info("starting", zap.String("version", version.Get().String()), zap.String("node", *node), zap.String("uplink", upName), zap.String("subnets", kube.FormatSubnets(subnets)),
		zap.Int64("goMemoryLimitMiB", memLimit>>20))
	if *bootBinary && *stateDir != "" {
		go func() {
			exe, err := os.Executable()
			if err == nil {
				var copied bool
				if copied, err = agent.KeepBootBinary(*stateDir, exe); copied {
					log.Info("copied the agent for the boot unit", zap.String("node", *node), zap.String("dir", *stateDir))
				}
			}
			if err != nil {
				log.Warn("keep the boot unit's copy of the agent", zap.String("node", *node), zap.Error(err))
			}
		}()
	}
	m := metrics.NewAgent(nil)
	m.SetClassifier(backend)
	var observer agent.PodsObserver = &agent.ClassifierLeftovers{Dir: *bpfDir, Log: nlog}
	if prog != nil {
		pc := agent.NewPodClassifier(agent.ClassifierConfig{Program: prog, Uplink: upName, Period: *resync, Metrics: m, Log: nlog})
		observer = pc
		go func() {
			if err := pc.Run(ctx); err != nil {
				nlog.Error("eBPF classifier stopped: pods on new interfaces are held", zap.Error(err))
			}
		}()
	}
	nlog.Info("pod classifier", zap.String("backend", backend), zap.String("classifier", info))
	ready := make(chan func() error, 1)
	go func() {
		var check func() error
		select {
		case check = <-ready:
		case <-ctx.Done():
			return
		}
		if err := metrics.Serve(ctx, *serveAddr, check); err != nil {
			log.Error("metrics and health server stopped", zap.String("node", *node), zap.Error(err))
		}
	}()
	return agent.RunWithReady(ctx, agent.Config{
		Clients: clients, Node: *node, Uplink: upName, Subnets: subnets, Gateways: gateways, Namespace: *namespace,
		LeaseDuration: *leaseDuration, RenewInterval: *renewInterval, ResyncPeriod: *resync,
		FallbackToNodeIP: *fallback, PodCIDRs: pods, ServiceCIDRs: services, MarkMask: uint32(mask), GatewayNamespaces: gwNamespaces, HealthAddr: *healthAddr, FenceAfter: *fenceAfter, ProbeSecret: *probeSecret, StateDir: *stateDir, ARPLease: *arpLease,
		CleanupOnUninstall: *cleanupOnUninstall, PodName: *podName, ProcSysNet: *procSysNet, DrainTimeout: *drainTimeout,
		Classifier: observer, ClassifierInfo: info, BPFDir: *bpfDir,
		Dataplane: dp, Log: log, Metrics: m,
	}, func(check func() error) { ready <- check })
}

// parseCIDRs parses a comma-separated list of IPv4 CIDRs.
func parseCIDRs(flag, s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil || !p.Addr().Is4() {
			return nil, fmt.Errorf("%s: %q is not an IPv4 CIDR", flag, f)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

type bootGuardConfig struct {
	stateDir, uplink, table string
	mask                    uint32
	tableBase, rulePriority int
	extra                   []netip.Prefix
}

// dataplane is the node's dataplane with the table, marks and tables of
// cfg, on uplink, outside any agent (--boot-guard, --cleanup).
func (cfg bootGuardConfig) dataplane(log *zap.Logger, uplink string) (*nft.Dataplane, error) {
	dp, err := nft.New(nft.Config{
		Table: cfg.table, Uplink: uplink, MarkMask: cfg.mask, RouteTableBase: cfg.tableBase,
		RulePriority: cfg.rulePriority, NetNSFd: -1, Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("dataplane: %w", err)
	}
	return dp, nil
}

// runBootGuard is --boot-guard: the guard table from the state the agent
// saved, before the node's network starts (no API server, no default
// route yet: the uplink is the flag's or the one saved with the state).
func runBootGuard(log *zap.Logger, cfg bootGuardConfig) error {
	if cfg.stateDir == "" {
		return fmt.Errorf("--boot-guard needs --state-dir")
	}
	up := cfg.uplink
	if up == "" {
		saved, err := agent.SavedUplink(cfg.stateDir)
		if err != nil {
			return err
		}
		up = saved
	}
	if up == "" {
		log.Info("boot guard: no state saved (nothing applied on this node), nothing to guard", zap.String("stateDir", cfg.stateDir))
		return nil
	}
	dp, err := cfg.dataplane(log, up)
	if err != nil {
		return err
	}
	defer dp.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	installed, err := agent.BootGuard(ctx, dp, cfg.stateDir, cfg.extra)
	if err != nil {
		return fmt.Errorf("boot guard: %w", err)
	}
	log.Info("boot guard done", zap.Bool("installed", installed), zap.String("uplink", up), zap.String("stateDir", cfg.stateDir))
	return nil
}
