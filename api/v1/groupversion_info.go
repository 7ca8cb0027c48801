// Package v1 holds the networking.gke.io/v1 API of egressnat: the
// NetworkGatewayGroup and EgressNATPolicy custom resources, wire-compatible
// with the API of the same name in Google Distributed Cloud (bare metal).
//
// +kubebuilder:object:generate=true
// +groupName=networking.gke.io
package v1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of the egressnat resources.
var GroupVersion = schema.GroupVersion{Group: "networking.gke.io", Version: "v1"}

var (
	// SchemeBuilder registers the types with a runtime.Scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds the types of this group and version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// Resource names, as served by the API server.
const (
	NetworkGatewayGroupResource = "networkgatewaygroups"
	EgressNATPolicyResource     = "egressnatpolicies"
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&NetworkGatewayGroup{}, &NetworkGatewayGroupList{},
		&EgressNATPolicy{}, &EgressNATPolicyList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
