// Package kube is the thin client-go glue the egressnat binaries share: the
// client configuration, typed access to the networking.gke.io/v1 resources
// through the dynamic client, and the agents' liveness leases.
package kube

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/selector"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/connrotation"
)

// GVRs of the egressnat resources.
var (
	GatewayGVR = schema.GroupVersionResource{Group: v1.GroupVersion.Group, Version: v1.GroupVersion.Version, Resource: v1.NetworkGatewayGroupResource}
	PolicyGVR  = schema.GroupVersionResource{Group: v1.GroupVersion.Group, Version: v1.GroupVersion.Version, Resource: v1.EgressNATPolicyResource}
)

// Annotations an agent writes on its liveness Lease.
const (
	// AnnotationSubnets: the node's uplink subnets, comma-separated CIDRs
	// with the node's own address (e.g. 192.0.2.12/24).
	AnnotationSubnets = "egressnat.io/uplink-subnets"
	// AnnotationUplink: the uplink interface name.
	AnnotationUplink = "egressnat.io/uplink"
	// AnnotationUplinkGateway: the uplink's IPv4 default gateways,
	// comma-separated addresses (usually one), FormatAddresses. No floating
	// IP may be one of them.
	AnnotationUplinkGateway = "egressnat.io/uplink-gateway"
	// AnnotationForeignAddresses: floating IPs (of any group's spec) the
	// agent found on its uplink that egressnat did not add, comma-separated
	// (FormatAddresses); empty or absent when there are none. Every group
	// listing one of them has it rejected.
	AnnotationForeignAddresses = "egressnat.io/foreign-addresses"
	// AnnotationPrepared: the floating IPs the agent has prepared for a
	// handover to its node (status.handovers): added to the uplink after
	// an ARP probe, unannounced (FormatAddresses). The operator completes
	// a handover when its target lists the IP.
	AnnotationPrepared = "egressnat.io/prepared-floating-ips"
	// AnnotationDraining: the agent is stopping (SIGTERM: a rollout, a
	// node shutdown) and asks for its floating IPs to be handed over to
	// other nodes; the value says why. A starting agent removes it.
	AnnotationDraining = "egressnat.io/draining"
	// AnnotationClassifier: the pod classifier backend the agent runs,
	// "nft" or "ebpf", followed after "; " by why the eBPF backend asked
	// for (--classifier=ebpf) is not running, when it is not (the agent
	// fell back to nft).
	AnnotationClassifier = "egressnat.io/classifier"
	// AgentLeasePrefix prefixes the name of each agent's Lease.
	AgentLeasePrefix = "egressnat-agent-"
	// LabelComponent marks the Leases egressnat owns.
	LabelComponent = "egressnat.io/component"
	// LabelControlPlane marks control-plane nodes.
	LabelControlPlane = "node-role.kubernetes.io/control-plane"
)

// Clients bundles what the binaries talk to.
type Clients struct {
	Config  *rest.Config
	Core    kubernetes.Interface
	Dynamic dynamic.Interface
	// Watches learns whether the informers' caches may be behind the API
	// (nil in fakes: never stale).
	Watches *WatchHealth
	// conns tracks every connection to the API server (nil in fakes).
	conns *connrotation.ConnectionTracker
}

// ResetConnections closes every connection to the API server: the next
// requests dial afresh. Called when the API server stops answering, so
// that a connection that died in a partition is not reused after the heal.
func (c *Clients) ResetConnections() {
	if c != nil && c.conns != nil {
		c.conns.CloseAll()
	}
}

// API connection health: HTTP/2 connections to the API server are pinged
// after 1 s without a frame and closed when a ping gets no answer within
// 1 s (client-go's defaults are 30 s and 15 s), so that a connection that
// died in a partition is found dead within about 2 s; a dial gives up after
// 2 s. An environment that sets the variables keeps its own values.
const (
	http2ReadIdleTimeout = "HTTP2_READ_IDLE_TIMEOUT_SECONDS"
	http2PingTimeout     = "HTTP2_PING_TIMEOUT_SECONDS"
	dialTimeout          = 2 * time.Second
)

func setConnectionHealth() {
	for k, v := range map[string]string{http2ReadIdleTimeout: "1", http2PingTimeout: "1"} {
		if _, ok := os.LookupEnv(k); !ok {
			_ = os.Setenv(k, v)
		}
	}
}

// NewClients builds clients from a kubeconfig file, or from the in-cluster
// service account when kubeconfig is empty.
func NewClients(kubeconfig string) (*Clients, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	setConnectionHealth()
	conns := connrotation.NewConnectionTracker()
	d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 5 * time.Second}
	cfg.Dial = connrotation.NewDialerWithTracker(d.DialContext, conns).DialContext
	// Built-in types travel as protobuf: tens of thousands of pods decode
	// with a fraction of JSON's CPU and memory. Custom resources only speak
	// JSON: the dynamic client keeps cfg as it is.
	coreCfg := rest.CopyConfig(cfg)
	coreCfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	coreCfg.ContentType = "application/vnd.kubernetes.protobuf"
	core, err := kubernetes.NewForConfig(coreCfg)
	if err != nil {
		return nil, fmt.Errorf("core client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return &Clients{Config: cfg, Core: core, Dynamic: dyn, Watches: &WatchHealth{}, conns: conns}, nil
}

// FromUnstructured converts an object of the dynamic client to its type.
func FromUnstructured[T any](obj any) (*T, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, fmt.Errorf("unexpected object %T", obj)
	}
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, out); err != nil {
		return nil, fmt.Errorf("convert %s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return out, nil
}

// Typed is an informer transform: it converts a dynamic informer's object
// to its Go type as it enters the cache, once per change.
func Typed[T any](obj any) (any, error) {
	if _, ok := obj.(*unstructured.Unstructured); !ok {
		return obj, nil // a tombstone, or already converted
	}
	return FromUnstructured[T](obj)
}

// UpdateGatewayStatus writes a NetworkGatewayGroup's status subresource.
func (c *Clients) UpdateGatewayStatus(ctx context.Context, g *v1.NetworkGatewayGroup) error {
	u, err := toUnstructured(g, "NetworkGatewayGroup")
	if err != nil {
		return err
	}
	_, err = c.Dynamic.Resource(GatewayGVR).Namespace(g.Namespace).UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil // deleted meanwhile: no status to write
	}
	if err != nil {
		return fmt.Errorf("update status of gateway %s/%s: %w", g.Namespace, g.Name, err)
	}
	return nil
}

// UpdatePolicyStatus writes an EgressNATPolicy's status subresource.
func (c *Clients) UpdatePolicyStatus(ctx context.Context, p *v1.EgressNATPolicy) error {
	u, err := toUnstructured(p, "EgressNATPolicy")
	if err != nil {
		return err
	}
	_, err = c.Dynamic.Resource(PolicyGVR).UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil // deleted meanwhile: no status to write
	}
	if err != nil {
		return fmt.Errorf("update status of policy %s: %w", p.Name, err)
	}
	return nil
}

func toUnstructured(obj any, kind string) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", kind, err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(v1.GroupVersion.String())
	u.SetKind(kind)
	return u, nil
}

// NodeInternalIP returns a Node's first IPv4 InternalIP.
func NodeInternalIP(n *corev1.Node) (netip.Addr, bool) {
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// NodeReady reports the Node's Ready condition and whether it is known.
func NodeReady(n *corev1.Node) (ready, known bool) {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			switch c.Status {
			case corev1.ConditionTrue:
				return true, true
			case corev1.ConditionFalse:
				return false, true
			}
		}
	}
	return false, false
}

// FormatSubnets and ParseSubnets encode the uplink-subnets annotation.
func FormatSubnets(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// ParseSubnets parses the uplink-subnets annotation; the result keeps the
// node's address and prefix length (e.g. 192.0.2.12/24).
func ParseSubnets(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("parse subnet %q: %w", f, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// FormatAddresses encodes the uplink-gateway and foreign-addresses
// annotations: IPv4 addresses (unmapped), sorted, without duplicates,
// comma-separated; invalid and IPv6 addresses are left out.
func FormatAddresses(as []netip.Addr) string {
	var out []netip.Addr
	for _, a := range as {
		if a = a.Unmap(); a.Is4() {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	out = slices.Compact(out)
	s := make([]string, len(out))
	for i, a := range out {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

// ParseAddresses parses the uplink-gateway and foreign-addresses
// annotations: comma-separated IPv4 addresses (IPv4-mapped ones unmapped);
// empty fields are skipped.
func ParseAddresses(s string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("parse address %q: %w", f, err)
		}
		if a = a.Unmap(); !a.Is4() {
			return nil, fmt.Errorf("parse address %q: not IPv4", f)
		}
		out = append(out, a)
	}
	return out, nil
}

// LeaseNodeFacts fills f.Subnets, f.Gateways and f.Foreign from the
// annotations of a node's agent Lease (uplink-subnets, uplink-gateway,
// foreign-addresses). An annotation that does not parse leaves its field
// empty and is reported in the error; the others are filled all the same.
// The operator and the agents both build selector.NodeFacts with it, so
// that they reserve the same addresses.
func LeaseNodeFacts(annotations map[string]string, f *selector.NodeFacts) error {
	var errs []error
	var err error
	if f.Subnets, err = ParseSubnets(annotations[AnnotationSubnets]); err != nil {
		errs = append(errs, fmt.Errorf("annotation %s: %w", AnnotationSubnets, err))
	}
	if f.Gateways, err = ParseAddresses(annotations[AnnotationUplinkGateway]); err != nil {
		errs = append(errs, fmt.Errorf("annotation %s: %w", AnnotationUplinkGateway, err))
	}
	if f.Foreign, err = ParseAddresses(annotations[AnnotationForeignAddresses]); err != nil {
		errs = append(errs, fmt.Errorf("annotation %s: %w", AnnotationForeignAddresses, err))
	}
	return errors.Join(errs...)
}

// ListFresh reads every object of a custom resource from the API server
// (not a cache), giving up after a second: what a controller decides from
// while its informer's cache may be behind the API (Watches).
func ListFresh[T any](ctx context.Context, clients *Clients, gvr schema.GroupVersionResource) ([]*T, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	list, err := clients.Dynamic.Resource(gvr).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", gvr.Resource, err)
	}
	out := make([]*T, 0, len(list.Items))
	for i := range list.Items {
		obj, err := FromUnstructured[T](&list.Items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, obj)
	}
	return out, nil
}
