package v1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// NodeHealth is a node's state as the operator sees it.
// +kubebuilder:validation:Enum=Up;Down
type NodeHealth string

const (
	NodeUp   NodeHealth = "Up"
	NodeDown NodeHealth = "Down"
)

// Limits of a NetworkGatewayGroup. They bound the cost of validation and
// of the operator's work; docs/api.md explains the choice.
const (
	MaxFloatingIPs = 256
)

// NetworkGatewayGroupSpec lists the floating IPs the operator places on nodes.
type NetworkGatewayGroupSpec struct {
	// One cheap rule per range a node cannot hold (one parse and one prefix
	// comparison each, at most 256 items): together they refuse every IPv4
	// address that is not global unicast, the rest of 0.0.0.0/8 and the
	// reserved 240.0.0.0/4, each with its own message.

	// FloatingIPs are IPv4 addresses in a node subnet. The operator assigns
	// each one to a node; the node adds it to its uplink and SNATs the
	// traffic of the policies that use it. Refused: 0.0.0.0/8, loopback
	// 127.0.0.0/8, link-local 169.254.0.0/16, multicast 224.0.0.0/4,
	// reserved 240.0.0.0/4 (with the broadcast 255.255.255.255), IPv6 and
	// duplicates.
	// +required
	// +listType=set
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MaxLength=45
	// +kubebuilder:validation:items:XValidation:rule="isIP(self)",message="must be an IPv4 address such as 192.0.2.100"
	// +kubebuilder:validation:items:XValidation:rule="!isIP(self) || ip(self).family() == 4",message="IPv6 addresses are not supported: the egress gateway is IPv4-only"
	// +kubebuilder:validation:items:XValidation:rule="!isIP(self) || ip(self).family() != 4 || !cidr('0.0.0.0/8').containsIP(self)",message="must be a unicast address a node can hold: 0.0.0.0/8 means this host on this network"
	// +kubebuilder:validation:items:XValidation:rule="!isIP(self) || ip(self).family() != 4 || !cidr('127.0.0.0/8').containsIP(self)",message="must be a unicast address a node can hold: 127.0.0.0/8 is loopback"
	// +kubebuilder:validation:items:XValidation:rule="!isIP(self) || ip(self).family() != 4 || !cidr('169.254.0.0/16').containsIP(self)",message="must be a unicast address a node can hold: 169.254.0.0/16 is link-local"
	// +kubebuilder:validation:items:XValidation:rule="!isIP(self) || ip(self).family() != 4 || !cidr('224.0.0.0/3').containsIP(self)",message="must be a unicast address a node can hold: 224.0.0.0/4 is multicast, 240.0.0.0/4 reserved (class E) and 255.255.255.255 broadcast"
	FloatingIPs []string `json:"floatingIPs"`
	// NodeSelector, when set, limits the nodes that may hold the floating
	// IPs to those whose labels it matches (e.g. matchLabels
	// egressnat.io/gateway: "true"); among them the usual order applies
	// (a node in the IP's subnet, workers before control-plane nodes,
	// nodes holding fewer floating IPs first). An IP whose holder stops
	// matching moves to a matching node. Absent: every node may. When no
	// matching node can hold an IP, the IP is held by none and the Ready
	// condition says so.
	// +optional
	NodeSelector *LabelSelector `json:"nodeSelector,omitempty"`
}

// MaxRecentMoves bounds status.recentMoves.
const MaxRecentMoves = 10

// FloatingIPMove records one floating IP moving to another node.
type FloatingIPMove struct {
	IP   string `json:"ip"`
	From string `json:"from"`
	To   string `json:"to"`
	// Reason says why, e.g. "node worker1 Down: no health probe answer for 412ms".
	Reason string `json:"reason"`
	// Time the operator decided the move.
	Time metav1.Time `json:"time"`
	// DetectionMilliseconds: from the old holder's last sign of life to the
	// decision.
	DetectionMilliseconds int64 `json:"detectionMilliseconds"`
}

// MaxHandovers bounds status.handovers (one per floating IP at most).
const MaxHandovers = MaxFloatingIPs

// FloatingIPHandover is a planned move under way: the IP's holder
// (status.floatingIPs) is still From, which no longer answers ARP for it,
// while To prepares (adds the address after an ARP probe, unannounced).
// When To's agent reports it ready (or after the operator's
// --handover-timeout), the operator gives the IP to To in one status
// write and records the move in recentMoves.
type FloatingIPHandover struct {
	IP   string `json:"ip"`
	From string `json:"from"`
	To   string `json:"to"`
	// Reason says why, e.g. "node worker1 cordoned (spec.unschedulable)".
	Reason string `json:"reason"`
	// Since the operator began the handover.
	Since metav1.MicroTime `json:"since"`
}

// Annotations and labels that ask for planned moves.
const (
	// AnnotationMoveRequest on a NetworkGatewayGroup asks the operator to
	// move floating IPs gracefully (make before break). Its value is a
	// comma-separated list of "*" (rebalance: every IP goes where a fresh
	// assignment would put it), "<ip>" (to the best other node) or
	// "<ip>=<node>", optionally followed by ";<id>". The operator acts on
	// each new value once and records it in status.observedMoveRequest;
	// `egressnatctl move` writes it with a fresh id.
	AnnotationMoveRequest = "egressnat.io/move-request"
	// LabelMaintenance on a Node (any value but "false") moves the
	// floating IPs it holds to other nodes gracefully and gives it no new
	// one, like a cordon (spec.unschedulable).
	LabelMaintenance = "egressnat.io/maintenance"
)

// NetworkGatewayGroupStatus is written by the operator leader only.
type NetworkGatewayGroupStatus struct {
	// Nodes maps every node eligible to hold a floating IP to Up or Down.
	// +optional
	Nodes map[string]NodeHealth `json:"nodes,omitempty"`
	// FloatingIPs maps each assigned floating IP to the node holding it.
	// An IP no node can hold is absent.
	// +optional
	FloatingIPs map[string]string `json:"floatingIPs,omitempty"`
	// RecentMoves are the latest moves of floating IPs between nodes,
	// newest first (at most MaxRecentMoves).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=10
	RecentMoves []FloatingIPMove `json:"recentMoves,omitempty"`
	// Handovers are the planned moves under way (see FloatingIPHandover).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=256
	Handovers []FloatingIPHandover `json:"handovers,omitempty"`
	// ObservedMoveRequest is the last value of the annotation
	// egressnat.io/move-request the operator acted on, and
	// MoveRequestMessage what it did with it.
	// +optional
	ObservedMoveRequest string `json:"observedMoveRequest,omitempty"`
	// +optional
	MoveRequestMessage string `json:"moveRequestMessage,omitempty"`
	// AssignedCount is how many of spec.floatingIPs are assigned to a node.
	// +optional
	AssignedCount int32 `json:"assignedCount,omitempty"`
	// ObservedGeneration is the spec generation this status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready is True when every floating IP is assigned.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// NetworkGatewayGroup is a set of floating IPs that egress traffic leaves
// the cluster with. The operator places each IP on one node and moves it
// when that node goes down.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=ngg,categories=egressnat
// +kubebuilder:printcolumn:name="Floating IPs",type=string,JSONPath=`.spec.floatingIPs`
// +kubebuilder:printcolumn:name="Assigned",type=integer,JSONPath=`.status.assignedCount`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NetworkGatewayGroup struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec NetworkGatewayGroupSpec `json:"spec"`
	// +optional
	Status NetworkGatewayGroupStatus `json:"status,omitempty"`
}

// NetworkGatewayGroupList is a list of NetworkGatewayGroups.
// +kubebuilder:object:root=true
type NetworkGatewayGroupList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NetworkGatewayGroup `json:"items"`
}

// Condition types and reasons of a NetworkGatewayGroup, and the namespace
// whose groups are always honoured. The group's Ready condition uses the
// reasons AllAssigned and Unassigned; Accepted (ConditionAccepted) says
// whether the group is honoured at all.
const (
	// DefaultGatewayNamespace: NetworkGatewayGroups are honoured here and in
	// the namespaces of the --gateway-namespaces flag only.
	DefaultGatewayNamespace = "kube-system"

	// ConditionFloatingIPsValid: every floating IP of the group can be
	// assigned (none is a node's address, its subnet's network or broadcast
	// address, the uplink's gateway, an address something else put on a
	// node, an unusable value, or listed by an older group).
	ConditionFloatingIPsValid = "FloatingIPsValid"

	// ReasonNamespaceNotAllowed: Accepted False (and Ready False) on a group
	// outside the gateway namespaces; its IPs are never assigned.
	ReasonNamespaceNotAllowed = "NamespaceNotAllowed"
	// ReasonFloatingIPsValid: FloatingIPsValid True.
	ReasonFloatingIPsValid = "Valid"
	// ReasonFloatingIPRejected: FloatingIPsValid False, at least one IP is
	// unusable, reserved or already in use on a node.
	ReasonFloatingIPRejected = "FloatingIPRejected"
	// ReasonFloatingIPConflict: FloatingIPsValid False, every rejected IP is
	// listed by an older group, which keeps it.
	ReasonFloatingIPConflict = "FloatingIPConflict"
	// ReasonAllAssigned and ReasonUnassigned: the group's Ready condition.
	ReasonAllAssigned = "AllAssigned"
	ReasonUnassigned  = "Unassigned"
)
