package gateway

// Liveness is what the operator knows about a node's health.
type Liveness struct {
	// NodeReady is the status of the Node's Ready condition, meaningful when
	// NodeReadyKnown: the condition exists and is True or False (not Unknown).
	NodeReady      bool
	NodeReadyKnown bool
	// Registered: the node's agent has published its uplink subnets (its
	// Lease exists). A node without an agent can hold nothing.
	Registered bool
	// ProbeHealthy: the operator's health probes reach the node. A probe is
	// a TCP connection to the agent's health port: an accepted connection
	// and a refused one (the kernel answers while the agent restarts) both
	// prove the node and its network alive; only silence counts as a miss.
	ProbeHealthy bool
}

// Up reports whether a node can hold floating IPs: its agent registered, the
// health probes reach it, and its Ready condition is not explicitly False (a
// second, slower signal from the kubelet). A Ready condition that is Unknown
// or missing does not make the node Down by itself: the probes decide. An
// agent that crashed does not make its node Down either: its kernel keeps
// forwarding and SNATing, so the floating IP stays where traffic flows.
func Up(l Liveness) bool {
	if l.NodeReadyKnown && !l.NodeReady {
		return false
	}
	return l.Registered && l.ProbeHealthy
}
