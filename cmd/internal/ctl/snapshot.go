package ctl

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"slices"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/selector"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

// Snapshot is what the commands that read the API decide on. It is filled
// by Loader and read by pure functions.
type Snapshot struct {
	Gateways []*v1.NetworkGatewayGroup
	Policies []*v1.EgressNATPolicy
	// Namespaces maps every known namespace to its labels (nil labels for a
	// namespace without labels). A namespace absent here does not exist.
	Namespaces map[string]map[string]string
	// Pods, sorted by namespace and name.
	Pods []selector.Pod
	// PodPhases by "namespace/name", for explanations.
	PodPhases map[string]string
	// NodeIPs maps the nodes holding floating IPs to their InternalIP, the
	// next hop the agents route to (a holder whose Node is missing or has
	// no InternalIP is absent). nil when unknown: the Nodes could not be
	// read.
	NodeIPs map[string]netip.Addr
	// GatewayNamespaces, when not nil, are the namespaces whose groups the
	// agents honour: explain then checks the groups as the agents do
	// (selector.CheckGroups, with the holders' addresses reserved).
	GatewayNamespaces []string
	// AgentLeases maps each node whose agent has a Lease
	// (egressnat-agent-<node>) in AgentNamespace to that Lease's
	// annotations. nil when not read (LoadAgents, for status); then
	// AgentLeasesErr says why, when it was tried.
	AgentLeases    map[string]map[string]string
	AgentNamespace string
	AgentLeasesErr string
}

// ErrCRDsMissing: the API server does not serve networking.gke.io.
var ErrCRDsMissing = errors.New("the networking.gke.io CRDs are not installed: kubectl apply -k manifests/")

// PodNotFoundError: the pod explain was asked about does not exist.
type PodNotFoundError struct{ Namespace, Name string }

func (e *PodNotFoundError) Error() string {
	return fmt.Sprintf("pod %s/%s not found", e.Namespace, e.Name)
}

// Loader reads a Snapshot from the API server.
type Loader struct {
	Core    kubernetes.Interface
	Dynamic dynamic.Interface
	// Host is the API server's URL, for error messages.
	Host string
}

// NewLoader builds a Loader from the binaries' shared clients.
func NewLoader(c *kube.Clients) *Loader {
	return &Loader{Core: c.Core, Dynamic: c.Dynamic, Host: c.Config.Host}
}

// apiError turns a transport failure into "cannot reach the Kubernetes API
// at <url>: ..." and leaves answers of the API server as they are.
func (l *Loader) apiError(err error) error {
	if err == nil {
		return nil
	}
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		return err
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("cannot reach the Kubernetes API at %s: %v", l.Host, err)
}

// crdError maps "the server could not find the requested resource" on a
// networking.gke.io list to ErrCRDsMissing.
func (l *Loader) crdError(err error) error {
	if apierrors.IsNotFound(err) {
		return ErrCRDsMissing
	}
	return l.apiError(err)
}

// Gateways and policies, sorted.
func (l *Loader) loadEgress(ctx context.Context, s *Snapshot) error {
	gl, err := l.Dynamic.Resource(kube.GatewayGVR).Namespace(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return l.crdError(err)
	}
	for i := range gl.Items {
		g, err := kube.FromUnstructured[v1.NetworkGatewayGroup](&gl.Items[i])
		if err != nil {
			return err
		}
		s.Gateways = append(s.Gateways, g)
	}
	pl, err := l.Dynamic.Resource(kube.PolicyGVR).List(ctx, metav1.ListOptions{})
	if err != nil {
		return l.crdError(err)
	}
	for i := range pl.Items {
		p, err := kube.FromUnstructured[v1.EgressNATPolicy](&pl.Items[i])
		if err != nil {
			return err
		}
		s.Policies = append(s.Policies, p)
	}
	slices.SortFunc(s.Gateways, func(a, b *v1.NetworkGatewayGroup) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	slices.SortFunc(s.Policies, func(a, b *v1.EgressNATPolicy) int { return strings.Compare(a.Name, b.Name) })
	return nil
}

// LoadAll reads every gateway, policy, namespace and pod (for status).
func (l *Loader) LoadAll(ctx context.Context) (*Snapshot, error) {
	s := &Snapshot{Namespaces: map[string]map[string]string{}, PodPhases: map[string]string{}}
	// Namespaces first: the cheapest request tells whether the API answers.
	nl, err := l.Core.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, l.apiError(err)
	}
	for _, ns := range nl.Items {
		s.Namespaces[ns.Name] = ns.Labels
	}
	if err := l.loadEgress(ctx, s); err != nil {
		return nil, err
	}
	pl, err := l.Core.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, l.apiError(err)
	}
	for i := range pl.Items {
		s.addPod(&pl.Items[i])
	}
	slices.SortFunc(s.Pods, func(a, b selector.Pod) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return s, nil
}

// LoadAgents reads the agents' Leases in namespace (for status: the
// classifier each one runs). A failure, such as the built-in view role's
// not reading Leases, is not an error: it is recorded in
// s.AgentLeasesErr, and status shows the rest.
func (l *Loader) LoadAgents(ctx context.Context, s *Snapshot, namespace string) {
	s.AgentNamespace = namespace
	ll, err := l.Core.CoordinationV1().Leases(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		s.AgentLeases, s.AgentLeasesErr = nil, l.apiError(err).Error()
		return
	}
	s.AgentLeases, s.AgentLeasesErr = map[string]map[string]string{}, ""
	for _, le := range ll.Items {
		if node, ok := strings.CutPrefix(le.Name, kube.AgentLeasePrefix); ok && node != "" {
			s.AgentLeases[node] = le.Annotations
		}
	}
}

// LoadForPod reads one pod, its namespace, every gateway and policy, and
// the nodes holding floating IPs (for explain).
func (l *Loader) LoadForPod(ctx context.Context, namespace, name string) (*Snapshot, error) {
	s := &Snapshot{Namespaces: map[string]map[string]string{}, PodPhases: map[string]string{}}
	pod, err := l.Core.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, &PodNotFoundError{Namespace: namespace, Name: name}
	}
	if err != nil {
		return nil, l.apiError(err)
	}
	s.addPod(pod)
	ns, err := l.Core.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return nil, l.apiError(err)
	default:
		s.Namespaces[ns.Name] = ns.Labels
	}
	if err := l.loadEgress(ctx, s); err != nil {
		return nil, err
	}
	if err := l.loadNextHops(ctx, s); err != nil {
		return nil, err
	}
	return s, nil
}

// loadNextHops reads the InternalIP of every node that status.floatingIPs
// names, as the agents do. Without the right to read Nodes, NodeIPs stays
// nil (next hops unknown).
func (l *Loader) loadNextHops(ctx context.Context, s *Snapshot) error {
	var holders []string
	for _, g := range s.Gateways {
		for _, n := range g.Status.FloatingIPs {
			if n != "" {
				holders = append(holders, n)
			}
		}
	}
	slices.Sort(holders)
	ips := map[string]netip.Addr{}
	for _, name := range slices.Compact(holders) {
		n, err := l.Core.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
		case apierrors.IsForbidden(err):
			return nil
		case err != nil:
			return l.apiError(err)
		default:
			if ip, ok := kube.NodeInternalIP(n); ok {
				ips[name] = ip
			}
		}
	}
	s.NodeIPs = ips
	return nil
}

func (s *Snapshot) addPod(p *corev1.Pod) {
	s.Pods = append(s.Pods, PodFromAPI(p))
	s.PodPhases[p.Namespace+"/"+p.Name] = string(p.Status.Phase)
}

// PodFromAPI converts a Pod as the agent does: its first IPv4 address,
// hostNetwork, and whether it terminated.
func PodFromAPI(p *corev1.Pod) selector.Pod {
	sp := selector.Pod{
		Namespace: p.Namespace, Name: p.Name, Node: p.Spec.NodeName, Labels: p.Labels,
		HostNetwork: p.Spec.HostNetwork,
		Terminated:  p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed,
	}
	for _, ip := range append([]corev1.PodIP{{IP: p.Status.PodIP}}, p.Status.PodIPs...) {
		if a, err := netip.ParseAddr(ip.IP); err == nil && a.Is4() {
			sp.IP = a
			break
		}
	}
	return sp
}
