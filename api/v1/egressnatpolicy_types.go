package v1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// Limits of an EgressNATPolicy; docs/api.md explains the choice.
const (
	MaxSources      = 16
	MaxDestinations = 512
	// MaxSelectorTerms bounds matchLabels, matchExpressions and values.
	MaxSelectorTerms = 16
)

// EgressAction is what happens to selected traffic. Only SNAT exists.
// +kubebuilder:validation:Enum=SNAT
type EgressAction string

const ActionSNAT EgressAction = "SNAT"

// Condition types and reasons of an EgressNATPolicy.
const (
	// ConditionAccepted: the spec is valid and its gatewayRef resolves.
	ConditionAccepted = "Accepted"
	// ConditionReady: a node holds the egress IP and the policy is applied.
	ConditionReady = "Ready"

	ReasonAccepted           = "Accepted"
	ReasonGatewayNotFound    = "GatewayNotFound"
	ReasonNoFloatingIP       = "NoFloatingIP"
	ReasonGatewayUnavailable = "GatewayUnavailable"
	ReasonApplied            = "Applied"
)

// LabelSelectorOperator is the operator of a label selector requirement.
// +kubebuilder:validation:Enum=In;NotIn;Exists;DoesNotExist
type LabelSelectorOperator string

// LabelValue is the value of a label.
// +kubebuilder:validation:MaxLength=63
// +kubebuilder:validation:XValidation:rule="!format.labelValue().validate(self).hasValue()",message="must be a valid label value: up to 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
type LabelValue string

// LabelSelectorRequirement has the shape of the Kubernetes
// metav1.LabelSelectorRequirement, with validation the API server enforces.
// +kubebuilder:validation:XValidation:rule="!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",message="values must be non-empty when operator is In or NotIn"
// +kubebuilder:validation:XValidation:rule="!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",message="values must be empty when operator is Exists or DoesNotExist"
type LabelSelectorRequirement struct {
	// Key is the label key the selector applies to.
	// +required
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:XValidation:rule="!format.qualifiedName().validate(self).hasValue()",message="must be a valid label key such as app or example.com/app (a DNS subdomain prefix and '/', then up to 63 alphanumerics, '-', '_' or '.')"
	Key string `json:"key"`
	// Operator relates the key to the values.
	// +required
	Operator LabelSelectorOperator `json:"operator"`
	// Values for In and NotIn; empty for Exists and DoesNotExist.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	Values []LabelValue `json:"values,omitempty"`
}

// LabelSelector has the wire shape of the Kubernetes metav1.LabelSelector
// (matchLabels and matchExpressions, ANDed; an empty selector matches
// everything), with validation the API server enforces.
// +kubebuilder:validation:XValidation:rule="!has(self.matchLabels) || self.matchLabels.all(k, !format.qualifiedName().validate(k).hasValue())",message="matchLabels keys must be valid label keys such as app or example.com/app"
type LabelSelector struct {
	// MatchLabels: every key must have exactly this value.
	// +optional
	// +kubebuilder:validation:MaxProperties=16
	MatchLabels map[string]LabelValue `json:"matchLabels,omitempty"`
	// MatchExpressions: every requirement must hold.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	MatchExpressions []LabelSelectorRequirement `json:"matchExpressions,omitempty"`
}

// EgressSource selects pods: those matching podSelector in the namespaces
// matching namespaceSelector.
type EgressSource struct {
	// NamespaceSelector selects namespaces by their labels; {} selects all.
	// +required
	NamespaceSelector LabelSelector `json:"namespaceSelector"`
	// PodSelector selects pods in those namespaces; {} selects all.
	// +required
	PodSelector LabelSelector `json:"podSelector"`
}

// EgressDestination is a destination network of selected traffic.
type EgressDestination struct {
	// The canonical-form message computes the canonical form without
	// string(int), whose unbounded estimated cost the API server refuses:
	// octets are looked up in a list of their decimal strings.

	// CIDR is an IPv4 network in canonical form, e.g. 203.0.113.0/24.
	// Refused: a network within 0.0.0.0/8, loopback 127.0.0.0/8,
	// link-local 169.254.0.0/16, multicast 224.0.0.0/4 or reserved
	// 240.0.0.0/4. A larger network that merely contains one of them, such
	// as 0.0.0.0/0, is allowed: the dataplane keeps cluster-internal and
	// node-local destinations out of it.
	// +required
	// +kubebuilder:validation:MaxLength=49
	// +kubebuilder:validation:XValidation:rule="isCIDR(self) || isIP(self)",message="must be an IPv4 CIDR such as 203.0.113.0/24"
	// +kubebuilder:validation:XValidation:rule="!isIP(self) || isCIDR(self)",message="must be a CIDR with a prefix length: write 203.0.113.7/32 for a single address"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() == 4",message="IPv6 destinations are not supported: the egress gateway is IPv4-only"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() != 4 || cidr(self) == cidr(self).masked()",messageExpression="'must be in canonical form with the host bits zero: write ' + ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43', '44', '45', '46', '47', '48', '49', '50', '51', '52', '53', '54', '55', '56', '57', '58', '59', '60', '61', '62', '63', '64', '65', '66', '67', '68', '69', '70', '71', '72', '73', '74', '75', '76', '77', '78', '79', '80', '81', '82', '83', '84', '85', '86', '87', '88', '89', '90', '91', '92', '93', '94', '95', '96', '97', '98', '99', '100', '101', '102', '103', '104', '105', '106', '107', '108', '109', '110', '111', '112', '113', '114', '115', '116', '117', '118', '119', '120', '121', '122', '123', '124', '125', '126', '127', '128', '129', '130', '131', '132', '133', '134', '135', '136', '137', '138', '139', '140', '141', '142', '143', '144', '145', '146', '147', '148', '149', '150', '151', '152', '153', '154', '155', '156', '157', '158', '159', '160', '161', '162', '163', '164', '165', '166', '167', '168', '169', '170', '171', '172', '173', '174', '175', '176', '177', '178', '179', '180', '181', '182', '183', '184', '185', '186', '187', '188', '189', '190', '191', '192', '193', '194', '195', '196', '197', '198', '199', '200', '201', '202', '203', '204', '205', '206', '207', '208', '209', '210', '211', '212', '213', '214', '215', '216', '217', '218', '219', '220', '221', '222', '223', '224', '225', '226', '227', '228', '229', '230', '231', '232', '233', '234', '235', '236', '237', '238', '239', '240', '241', '242', '243', '244', '245', '246', '247', '248', '249', '250', '251', '252', '253', '254', '255'][int(self.split('/')[0].split('.')[0]) - int(self.split('/')[0].split('.')[0]) % [256, 128, 64, 32, 16, 8, 4, 2, 1][int(self.split('/')[1]) > 8 ? 8 : int(self.split('/')[1])]] + '.' + ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43', '44', '45', '46', '47', '48', '49', '50', '51', '52', '53', '54', '55', '56', '57', '58', '59', '60', '61', '62', '63', '64', '65', '66', '67', '68', '69', '70', '71', '72', '73', '74', '75', '76', '77', '78', '79', '80', '81', '82', '83', '84', '85', '86', '87', '88', '89', '90', '91', '92', '93', '94', '95', '96', '97', '98', '99', '100', '101', '102', '103', '104', '105', '106', '107', '108', '109', '110', '111', '112', '113', '114', '115', '116', '117', '118', '119', '120', '121', '122', '123', '124', '125', '126', '127', '128', '129', '130', '131', '132', '133', '134', '135', '136', '137', '138', '139', '140', '141', '142', '143', '144', '145', '146', '147', '148', '149', '150', '151', '152', '153', '154', '155', '156', '157', '158', '159', '160', '161', '162', '163', '164', '165', '166', '167', '168', '169', '170', '171', '172', '173', '174', '175', '176', '177', '178', '179', '180', '181', '182', '183', '184', '185', '186', '187', '188', '189', '190', '191', '192', '193', '194', '195', '196', '197', '198', '199', '200', '201', '202', '203', '204', '205', '206', '207', '208', '209', '210', '211', '212', '213', '214', '215', '216', '217', '218', '219', '220', '221', '222', '223', '224', '225', '226', '227', '228', '229', '230', '231', '232', '233', '234', '235', '236', '237', '238', '239', '240', '241', '242', '243', '244', '245', '246', '247', '248', '249', '250', '251', '252', '253', '254', '255'][int(self.split('/')[0].split('.')[1]) - int(self.split('/')[0].split('.')[1]) % [256, 128, 64, 32, 16, 8, 4, 2, 1][int(self.split('/')[1]) > 16 ? 8 : (int(self.split('/')[1]) < 8 ? 0 : int(self.split('/')[1]) - 8)]] + '.' + ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43', '44', '45', '46', '47', '48', '49', '50', '51', '52', '53', '54', '55', '56', '57', '58', '59', '60', '61', '62', '63', '64', '65', '66', '67', '68', '69', '70', '71', '72', '73', '74', '75', '76', '77', '78', '79', '80', '81', '82', '83', '84', '85', '86', '87', '88', '89', '90', '91', '92', '93', '94', '95', '96', '97', '98', '99', '100', '101', '102', '103', '104', '105', '106', '107', '108', '109', '110', '111', '112', '113', '114', '115', '116', '117', '118', '119', '120', '121', '122', '123', '124', '125', '126', '127', '128', '129', '130', '131', '132', '133', '134', '135', '136', '137', '138', '139', '140', '141', '142', '143', '144', '145', '146', '147', '148', '149', '150', '151', '152', '153', '154', '155', '156', '157', '158', '159', '160', '161', '162', '163', '164', '165', '166', '167', '168', '169', '170', '171', '172', '173', '174', '175', '176', '177', '178', '179', '180', '181', '182', '183', '184', '185', '186', '187', '188', '189', '190', '191', '192', '193', '194', '195', '196', '197', '198', '199', '200', '201', '202', '203', '204', '205', '206', '207', '208', '209', '210', '211', '212', '213', '214', '215', '216', '217', '218', '219', '220', '221', '222', '223', '224', '225', '226', '227', '228', '229', '230', '231', '232', '233', '234', '235', '236', '237', '238', '239', '240', '241', '242', '243', '244', '245', '246', '247', '248', '249', '250', '251', '252', '253', '254', '255'][int(self.split('/')[0].split('.')[2]) - int(self.split('/')[0].split('.')[2]) % [256, 128, 64, 32, 16, 8, 4, 2, 1][int(self.split('/')[1]) > 24 ? 8 : (int(self.split('/')[1]) < 16 ? 0 : int(self.split('/')[1]) - 16)]] + '.' + ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43', '44', '45', '46', '47', '48', '49', '50', '51', '52', '53', '54', '55', '56', '57', '58', '59', '60', '61', '62', '63', '64', '65', '66', '67', '68', '69', '70', '71', '72', '73', '74', '75', '76', '77', '78', '79', '80', '81', '82', '83', '84', '85', '86', '87', '88', '89', '90', '91', '92', '93', '94', '95', '96', '97', '98', '99', '100', '101', '102', '103', '104', '105', '106', '107', '108', '109', '110', '111', '112', '113', '114', '115', '116', '117', '118', '119', '120', '121', '122', '123', '124', '125', '126', '127', '128', '129', '130', '131', '132', '133', '134', '135', '136', '137', '138', '139', '140', '141', '142', '143', '144', '145', '146', '147', '148', '149', '150', '151', '152', '153', '154', '155', '156', '157', '158', '159', '160', '161', '162', '163', '164', '165', '166', '167', '168', '169', '170', '171', '172', '173', '174', '175', '176', '177', '178', '179', '180', '181', '182', '183', '184', '185', '186', '187', '188', '189', '190', '191', '192', '193', '194', '195', '196', '197', '198', '199', '200', '201', '202', '203', '204', '205', '206', '207', '208', '209', '210', '211', '212', '213', '214', '215', '216', '217', '218', '219', '220', '221', '222', '223', '224', '225', '226', '227', '228', '229', '230', '231', '232', '233', '234', '235', '236', '237', '238', '239', '240', '241', '242', '243', '244', '245', '246', '247', '248', '249', '250', '251', '252', '253', '254', '255'][int(self.split('/')[0].split('.')[3]) - int(self.split('/')[0].split('.')[3]) % [256, 128, 64, 32, 16, 8, 4, 2, 1][int(self.split('/')[1]) < 24 ? 0 : int(self.split('/')[1]) - 24]] + '/' + self.split('/')[1] + ' instead of ' + self"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() != 4 || !cidr('0.0.0.0/8').containsCIDR(cidr(self))",message="must not lie within 0.0.0.0/8 (this host on this network): write 0.0.0.0/0 for every destination"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() != 4 || !cidr('127.0.0.0/8').containsCIDR(cidr(self))",message="must not lie within 127.0.0.0/8: loopback traffic never leaves a node"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() != 4 || !cidr('169.254.0.0/16').containsCIDR(cidr(self))",message="must not lie within 169.254.0.0/16: link-local traffic (such as a metadata service at 169.254.169.254) stays on its link"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self).ip().family() != 4 || !cidr('224.0.0.0/3').containsCIDR(cidr(self))",message="must not lie within 224.0.0.0/4 (multicast) or 240.0.0.0/4 (reserved, broadcast): only unicast traffic can leave through a gateway"
	CIDR string `json:"cidr"`
}

// GatewayRef names the NetworkGatewayGroup whose first floating IP the
// selected traffic leaves with.
type GatewayRef struct {
	// Name of the NetworkGatewayGroup.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:XValidation:rule="!format.dns1123Subdomain().validate(self).hasValue()",message="must be a valid object name: lowercase alphanumerics, '-' or '.'"
	Name string `json:"name"`
	// Namespace of the NetworkGatewayGroup, normally kube-system.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:XValidation:rule="!format.dns1123Label().validate(self).hasValue()",message="must be a valid namespace name: up to 63 lowercase alphanumerics or '-'"
	Namespace string `json:"namespace"`
}

// EgressNATPolicySpec selects traffic and the gateway it leaves through.
type EgressNATPolicySpec struct {
	// Sources select pods; a pod matching any source is selected.
	// +required
	// +listType=atomic
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	Sources []EgressSource `json:"sources"`
	// Action on selected traffic; only SNAT.
	// +required
	Action EgressAction `json:"action"`
	// Uniqueness comes from listType=map keyed by cidr: the API server
	// checks it in linear time and names the duplicate. A CEL rule cannot:
	// self.all(d, self.exists_one(e, e.cidr == d.cidr)) exceeds the
	// per-call runtime cost limit at 512 items, and list.distinct() needs
	// Kubernetes 1.35 (its CEL library came in 1.34; new rules may use a
	// library from the release after). The rules on EgressDestination make
	// the cidr strings canonical, so equal strings are equal networks.

	// Destinations: selected pods' traffic to these networks is SNATed.
	// Each network may be listed once.
	// +required
	// +listType=map
	// +listMapKey=cidr
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=512
	Destinations []EgressDestination `json:"destinations"`
	// GatewayRef names the NetworkGatewayGroup providing the egress IP.
	// +required
	GatewayRef GatewayRef `json:"gatewayRef"`
}

// UnavailableAction is what happens to a policy's selected traffic while no
// node holds its egress IP.
// +kubebuilder:validation:Enum=Drop;NodeIP
type UnavailableAction string

const (
	// UnavailableDrop drops the traffic (fail closed, the default):
	// partners allowlist the floating IP, so the node IP is useless and
	// would leak the cluster's addresses.
	UnavailableDrop UnavailableAction = "Drop"
	// UnavailableNodeIP lets the traffic leave with node IPs, as if no
	// policy selected it (operator flag --fallback-to-node-ip).
	UnavailableNodeIP UnavailableAction = "NodeIP"
)

// EgressNATPolicyStatus is written by the operator leader only.
type EgressNATPolicyStatus struct {
	// WhenUnavailable says what happens to selected traffic while no node
	// holds the egress IP; the agents follow it.
	// +optional
	WhenUnavailable UnavailableAction `json:"whenUnavailable,omitempty"`
	// EgressIP is the floating IP selected traffic leaves with: the first
	// floating IP of the referenced gateway.
	// +optional
	EgressIP string `json:"egressIP,omitempty"`
	// GatewayNode is the node currently holding EgressIP.
	// +optional
	GatewayNode string `json:"gatewayNode,omitempty"`
	// ObservedGeneration is the spec generation this status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Accepted (reasons Accepted, GatewayNotFound,
	// NoFloatingIP) and Ready (reasons Applied, GatewayUnavailable, ...).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// EgressNATPolicy makes selected pods' traffic to the destinations leave
// the cluster with the first floating IP of a NetworkGatewayGroup.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=enp,categories=egressnat
// +kubebuilder:printcolumn:name="Gateway",type=string,JSONPath=`.spec.gatewayRef.name`
// +kubebuilder:printcolumn:name="Egress IP",type=string,JSONPath=`.status.egressIP`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.status.gatewayNode`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type EgressNATPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec EgressNATPolicySpec `json:"spec"`
	// +optional
	Status EgressNATPolicyStatus `json:"status,omitempty"`
}

// EgressNATPolicyList is a list of EgressNATPolicies.
// +kubebuilder:object:root=true
type EgressNATPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []EgressNATPolicy `json:"items"`
}

// More condition types and reasons of an EgressNATPolicy (issue #11).
const (
	// ReasonGatewayIgnored: Accepted False, the gatewayRef names a group in
	// a namespace that is not a gateway namespace.
	ReasonGatewayIgnored = "GatewayIgnored"
	// ReasonEgressIPRejected: Accepted False, the group's first floating IP
	// (the egress IP) is rejected and is never assigned.
	ReasonEgressIPRejected = "EgressIPRejected"

	// ConditionOverlap: True while the policy's destinations overlap those
	// of other accepted policies whose sources can select the same pods; the
	// message names them and which one wins where. Absent otherwise.
	ConditionOverlap = "Overlap"
	// ConditionClusterInternal: True while some of the policy's
	// destinations overlap the cluster's own networks (pod and Service
	// CIDRs, node addresses), whose traffic is never steered.
	ConditionClusterInternal = "ClusterInternal"
	// ReasonClusterInternal: the reason of ConditionClusterInternal.
	ReasonClusterInternal = "DestinationsInsideCluster"
	// ConditionOutOfMarks: True while the node holding the policy's
	// egress IP is one more gateway next hop than the agents' mark mask
	// holds: nodes routing to every gateway drop the policy's traffic.
	ConditionOutOfMarks = "OutOfMarks"
	// ReasonTooManyGateways: the reason of ConditionOutOfMarks.
	ReasonTooManyGateways = "TooManyGatewayNodes"
	// ReasonOverlappingPolicies: Overlap True.
	ReasonOverlappingPolicies = "OverlappingPolicies"
)
