// Package metrics holds the Prometheus metrics of the egressnat agent and
// operator and serves them with the health endpoints: /metrics, /healthz
// (200 while the process runs) and /readyz (200 when ready, 503 with the
// reason otherwise). docs/metrics.md documents every metric.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Registry is the registry Serve exposes. It holds the Go runtime and
// process collectors; NewAgent and NewOperator register on it when given a
// nil Registerer.
var Registry = NewRegistry()

// NewRegistry returns a registry with the Go runtime and process collectors.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Buckets for durations of one sync or reconcile (milliseconds to seconds),
// of a failover (hundreds of milliseconds to a minute) and of the release
// of floating IPs (sub-millisecond to seconds).
var (
	SyncBuckets     = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	FailoverBuckets = []float64{.25, .5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 30, 60}
	ReleaseBuckets  = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}
)

// Conntrack verification on failover: the label values of
// egressnat_agent_conntrack_verified_entries_total and
// egressnat_agent_conntrack_checks_total (stable; docs/metrics.md).
//
// side="released": this node gave floating IPs up and checked that no
// conntrack entry still translates to them. side="taken": this node took
// floating IPs and checked the entries of its Gateway policies.
//
// Entries (egressnat_agent_conntrack_verified_entries_total):
//   - result="ok" (taken): translated to their policy's egress IP;
//   - result="wrong" (taken): of a Gateway policy of this node, not
//     translated to its egress IP; they are deleted;
//   - result="flushed": deleted (released: still SNATed to a released
//     IP; taken: the wrong ones);
//   - result="remaining": still wrong after the flush (should stay 0).
//
// Checks (egressnat_agent_conntrack_checks_total): result="ok" (nothing
// wrong), "flushed" (wrong entries, all flushed), "remaining" (entries
// still wrong after the flush) or "error" (the check failed).
const (
	SideReleased = "released"
	SideTaken    = "taken"

	ResultOK        = "ok"
	ResultWrong     = "wrong"
	ResultFlushed   = "flushed"
	ResultRemaining = "remaining"
	ResultError     = "error"
)

// Agent holds the metrics of egressnat-agent.
type Agent struct {
	// SyncDuration: one computation and apply of the node's state.
	SyncDuration prometheus.Histogram
	// SyncErrors counts syncs that failed (and are retried).
	SyncErrors prometheus.Counter
	// PodProgramming: from a pod event reaching the agent to the kernel
	// holding its change.
	PodProgramming prometheus.Histogram
	// Drift counts differences the periodic check found between the
	// kernel's table and what the agent applied (then repaired).
	Drift prometheus.Counter
	// SetElements: elements of each policy's nftables set; labels policy
	// and kind ("src" pod addresses, "dst" destination intervals).
	SetElements *prometheus.GaugeVec
	// FloatingIPs held by this node.
	FloatingIPs prometheus.Gauge
	// UnroutablePolicies: Reroute policies that got no mark on this node
	// (more gateway next hops than the mark mask holds); they drop.
	UnroutablePolicies prometheus.Gauge
	// GARPsSent counts gratuitous ARP frames sent for floating IPs.
	GARPsSent prometheus.Counter
	// ConntrackFlushed counts conntrack entries deleted after a change.
	ConntrackFlushed prometheus.Counter
	// ConntrackVerified counts the conntrack entries the failover checks
	// found, by side and result (see SideReleased); ConntrackChecks counts
	// the checks. ObserveConntrackCheck records one check in both.
	ConntrackVerified, ConntrackChecks *prometheus.CounterVec
	// ReleaseSeconds: one release of floating IPs on the fast path
	// (addresses off the uplink, their record and conntrack entries).
	ReleaseSeconds prometheus.Histogram
	// PolicyPackets and PolicyBytes mirror the nftables counters of each
	// policy's rule on this node; labels policy and mode.
	PolicyPackets, PolicyBytes *prometheus.GaugeVec
	// Classifier: 1 for the pod classifier backend that runs (label
	// backend: nft or ebpf), 0 for the other (SetClassifier).
	Classifier *prometheus.GaugeVec
	// ClassifierInterfaces: pod-facing interfaces the eBPF classifier is
	// attached to; ClassifierEntries: entries of its map.
	ClassifierInterfaces, ClassifierEntries prometheus.Gauge

	sizesMu sync.Mutex
	sizes   map[string]SetSize // of the last SetSetSizes, by policy
}

// NewAgent creates the agent's metrics and registers them on reg (Registry
// when nil). It panics when they are already registered there.
func NewAgent(reg prometheus.Registerer) *Agent {
	if reg == nil {
		reg = Registry
	}
	a := &Agent{
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressnat_agent_sync_duration_seconds",
			Help:    "Time to compute this node's desired state and apply it to the kernel (one nftables transaction, routes, addresses).",
			Buckets: SyncBuckets,
		}),
		PodProgramming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressnat_agent_pod_programming_seconds",
			Help:    "Time from a pod event (add, update, delete) reaching the agent to the kernel holding its change.",
			Buckets: SyncBuckets,
		}),
		Drift: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressnat_agent_drift_repairs_total",
			Help: "Times the periodic check found the nftables table changed outside egressnat (it is then read back and repaired).",
		}),
		SyncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressnat_agent_sync_errors_total",
			Help: "Syncs that failed and were retried with backoff.",
		}),
		SetElements: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egressnat_agent_set_elements",
			Help: "Elements of a policy's nftables set on this node: kind=src pod addresses, kind=dst destination networks.",
		}, []string{"policy", "kind"}),
		FloatingIPs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressnat_agent_floating_ips",
			Help: "Floating IPs this node holds on its uplink.",
		}),
		UnroutablePolicies: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressnat_agent_unroutable_policies",
			Help: "Policies whose gateway next hop got no mark on this node (more next hops than --mark-mask holds): their traffic is dropped here.",
		}),
		GARPsSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressnat_agent_gratuitous_arps_total",
			Help: "Gratuitous ARP frames sent to announce floating IPs this node took.",
		}),
		ConntrackFlushed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressnat_agent_conntrack_entries_flushed_total",
			Help: "Conntrack entries deleted after an apply changed the path of their flow.",
		}),
		ConntrackVerified: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressnat_agent_conntrack_verified_entries_total",
			Help: "Conntrack entries the failover checks found: side=released (still SNATed to a floating IP this node gave up: flushed, remaining after the flush), side=taken (of this node's Gateway policies: ok translated to the egress IP, wrong not, flushed, remaining after the flush).",
		}, []string{"side", "result"}),
		ConntrackChecks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressnat_agent_conntrack_checks_total",
			Help: "Conntrack checks on failover, by side (released, taken) and result: ok (nothing wrong), flushed (wrong entries, all flushed), remaining (entries still wrong after the flush), error.",
		}, []string{"side", "result"}),
		ReleaseSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressnat_agent_release_seconds",
			Help:    "Time to release floating IPs on the fast path: addresses off the uplink, their record and their conntrack entries.",
			Buckets: ReleaseBuckets,
		}),
		PolicyPackets: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egressnat_agent_policy_packets",
			Help: "Packets matched by a policy's rule on this node (the nftables counter; it restarts at 0 when the rule is rebuilt).",
		}, []string{"policy", "mode"}),
		PolicyBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egressnat_agent_policy_bytes",
			Help: "Bytes matched by a policy's rule on this node (the nftables counter; it restarts at 0 when the rule is rebuilt).",
		}, []string{"policy", "mode"}),
		Classifier: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egressnat_agent_classifier",
			Help: "The pod classifier backend that runs on this node: 1 for it (backend=nft: nftables sets; backend=ebpf: a tc program and a BPF map), 0 for the other.",
		}, []string{"backend"}),
		ClassifierInterfaces: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressnat_agent_classifier_interfaces",
			Help: "Pod-facing interfaces the eBPF classifier is attached to (0 with the nft backend).",
		}),
		ClassifierEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressnat_agent_classifier_entries",
			Help: "Pods in the eBPF classifier's map (0 with the nft backend).",
		}),
	}
	reg.MustRegister(a.SyncDuration, a.SyncErrors, a.Drift, a.PodProgramming, a.SetElements, a.FloatingIPs, a.UnroutablePolicies, a.GARPsSent,
		a.ConntrackFlushed, a.ConntrackVerified, a.ConntrackChecks, a.ReleaseSeconds, a.PolicyPackets, a.PolicyBytes,
		a.Classifier, a.ClassifierInterfaces, a.ClassifierEntries)
	// Every series exists from the start (at 0), so that rates and alerts
	// see them before the first failover.
	a.Classifier.WithLabelValues(BackendNFT)
	a.Classifier.WithLabelValues(BackendEBPF)
	for side, results := range conntrackResults {
		for _, r := range results {
			a.ConntrackVerified.WithLabelValues(side, r)
		}
		for _, r := range []string{ResultOK, ResultFlushed, ResultRemaining, ResultError} {
			a.ConntrackChecks.WithLabelValues(side, r)
		}
	}
	return a
}

// Classifier backends (the label of Agent.Classifier).
const (
	BackendNFT  = "nft"
	BackendEBPF = "ebpf"
)

// SetClassifier records which classifier backend runs.
func (a *Agent) SetClassifier(backend string) {
	for _, b := range []string{BackendNFT, BackendEBPF} {
		v := 0.0
		if b == backend {
			v = 1
		}
		a.Classifier.WithLabelValues(b).Set(v)
	}
}

// conntrackResults are the entry results of each side.
var conntrackResults = map[string][]string{
	SideReleased: {ResultFlushed, ResultRemaining},
	SideTaken:    {ResultOK, ResultWrong, ResultFlushed, ResultRemaining},
}

// ConntrackCheck is what one conntrack check found (nft.CTVerify).
type ConntrackCheck struct {
	Flushed, Remaining, Translated, Wrong int
}

// ObserveConntrackCheck records one check of side (SideReleased or
// SideTaken): its entries by result, and the check's result; err is the
// check's error (the counts found before it still count).
func (a *Agent) ObserveConntrackCheck(side string, c ConntrackCheck, err error) {
	entries := map[string]int{ResultFlushed: c.Flushed, ResultRemaining: c.Remaining}
	if side == SideTaken {
		entries[ResultOK], entries[ResultWrong] = c.Translated, c.Wrong
	}
	for r, n := range entries {
		if n > 0 {
			a.ConntrackVerified.WithLabelValues(side, r).Add(float64(n))
		}
	}
	result := ResultOK
	switch {
	case err != nil:
		result = ResultError
	case c.Remaining > 0:
		result = ResultRemaining
	case c.Flushed > 0 || c.Wrong > 0:
		result = ResultFlushed
	}
	a.ConntrackChecks.WithLabelValues(side, result).Inc()
}

// PolicyCounter is the counter of one policy's rule, as read from nftables.
type PolicyCounter struct {
	Policy  string
	Mode    string // Gateway, Reroute or Drop
	Packets uint64
	Bytes   uint64
}

// SetPolicyCounters replaces the per-policy packet and byte gauges with
// counters: policies no longer present disappear. Counters of one policy
// and mode are added up.
func (a *Agent) SetPolicyCounters(counters []PolicyCounter) {
	a.PolicyPackets.Reset()
	a.PolicyBytes.Reset()
	for _, c := range counters {
		a.PolicyPackets.WithLabelValues(c.Policy, c.Mode).Add(float64(c.Packets))
		a.PolicyBytes.WithLabelValues(c.Policy, c.Mode).Add(float64(c.Bytes))
	}
}

// SetSize is the size of one policy's source and destination sets.
type SetSize struct {
	Policy       string
	Sources      int
	Destinations int
}

// SetSetSizes replaces the set size gauges: policies no longer present
// disappear.
// Only what changed since the last call is written: a pod event changes
// one or two of thousands.
func (a *Agent) SetSetSizes(sizes []SetSize) {
	a.sizesMu.Lock()
	defer a.sizesMu.Unlock()
	now := make(map[string]SetSize, len(sizes))
	for _, s := range sizes {
		now[s.Policy] = s
		if old, ok := a.sizes[s.Policy]; ok && old == s {
			continue
		}
		a.SetElements.WithLabelValues(s.Policy, "src").Set(float64(s.Sources))
		a.SetElements.WithLabelValues(s.Policy, "dst").Set(float64(s.Destinations))
	}
	for policy := range a.sizes {
		if _, ok := now[policy]; !ok {
			a.SetElements.DeleteLabelValues(policy, "src")
			a.SetElements.DeleteLabelValues(policy, "dst")
		}
	}
	a.sizes = now
}

// Operator holds the metrics of egressnat-operator.
type Operator struct {
	// ReconcileDuration: one assignment of every floating IP and the
	// status writes that follow.
	ReconcileDuration prometheus.Histogram
	// IPMoves counts floating IPs that changed node; label gateway
	// (namespace/name).
	IPMoves *prometheus.CounterVec
	// FailoverDuration: from the last answered health probe of a floating
	// IP's old holder to the status write that gives the IP to another node.
	FailoverDuration prometheus.Histogram
	// Leader is 1 while this replica leads, 0 otherwise.
	Leader prometheus.Gauge
	// UnassignedIPs: floating IPs no Up node can hold; label gateway.
	UnassignedIPs *prometheus.GaugeVec
}

// NewOperator creates the operator's metrics and registers them on reg
// (Registry when nil). It panics when they are already registered there.
func NewOperator(reg prometheus.Registerer) *Operator {
	if reg == nil {
		reg = Registry
	}
	o := &Operator{
		ReconcileDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressnat_operator_reconcile_duration_seconds",
			Help:    "Time to assign every floating IP and write the statuses that changed.",
			Buckets: SyncBuckets,
		}),
		IPMoves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressnat_operator_floating_ip_moves_total",
			Help: "Floating IPs given to a different node than the one holding them (first assignments are not counted).",
		}, []string{"gateway"}),
		FailoverDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressnat_operator_failover_duration_seconds",
			Help:    "Time from the old holder's last answered health probe to the status write that moves its floating IP to another node.",
			Buckets: FailoverBuckets,
		}),
		Leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressnat_operator_leader",
			Help: "1 while this replica holds the leader lease and writes status, 0 otherwise.",
		}),
		UnassignedIPs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egressnat_operator_unassigned_floating_ips",
			Help: "Floating IPs of a gateway that no Up node in their subnet can hold.",
		}, []string{"gateway"}),
	}
	reg.MustRegister(o.ReconcileDuration, o.IPMoves, o.FailoverDuration, o.Leader, o.UnassignedIPs)
	return o
}

// Handler serves /metrics from g, /healthz (200 while the process runs) and
// /readyz (200 when ready returns nil or is nil; 503 with the error's text
// otherwise).
func Handler(g prometheus.Gatherer, ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if ready != nil {
			if err := ready(); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintln(w, "not ready:", err)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// Serve serves Registry and the health endpoints on addr (e.g. ":9796")
// until ctx ends; it then shuts the server down and returns nil. It returns
// an error when it cannot listen or the server fails.
func Serve(ctx context.Context, addr string, ready func() error) error {
	return ServeRegistry(ctx, addr, Registry, ready)
}

// ServeRegistry is Serve with another registry.
func ServeRegistry(ctx context.Context, addr string, g prometheus.Gatherer, ready func() error) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	return ServeListener(ctx, l, g, ready)
}

// ServeListener is ServeRegistry on an open listener, which it closes.
func ServeListener(ctx context.Context, l net.Listener, g prometheus.Gatherer, ready func() error) error {
	srv := &http.Server{Handler: Handler(g, ready), ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics: serve on %s: %w", l.Addr(), err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := srv.Shutdown(sctx)
		if e := <-errc; e != nil && !errors.Is(e, http.ErrServerClosed) && err == nil {
			err = e
		}
		if err != nil {
			return fmt.Errorf("metrics: shut down: %w", err)
		}
		return nil
	}
}
