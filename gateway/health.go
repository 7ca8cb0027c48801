package gateway

import "time"

// Liveness is what the operator knows about a node's health: the Node's
// Ready condition and the agent's liveness Lease.
type Liveness struct {
	// NodeReady is the status of the Node's Ready condition, meaningful when
	// NodeReadyKnown: the condition exists and is True or False (not Unknown).
	NodeReady      bool
	NodeReadyKnown bool
	// LeaseRenew and LeaseDuration come from the agent's Lease; HasLease is
	// false when the node has no Lease (no agent, or it never started).
	LeaseRenew    time.Time
	LeaseDuration time.Duration
	HasLease      bool
}

// Up reports whether a node can hold floating IPs at now. A node is Down when
// its Ready condition is explicitly False, when its agent has no Lease, or
// when the Lease has expired (now is at or past LeaseRenew + LeaseDuration;
// a non-positive duration is always expired). A Ready condition that is
// Unknown or missing does not make the node Down by itself: the agent's Lease
// decides.
func Up(l Liveness, now time.Time) bool {
	if l.NodeReadyKnown && !l.NodeReady {
		return false
	}
	if !l.HasLease || l.LeaseDuration <= 0 {
		return false
	}
	return now.Before(l.LeaseRenew.Add(l.LeaseDuration))
}
