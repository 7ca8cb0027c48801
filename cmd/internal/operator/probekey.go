package operator

import (
	"context"
	"time"

	"github.com/egressnat/egressnat/cmd/internal/kube"
	"github.com/egressnat/egressnat/leader/probe"
	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
)

// leaderTerm is this replica's term while it leads.
type leaderTerm struct{ term int64 }

// probeSender signs this replica's probes: as the leader of its last term
// from the moment it leads until its Lease cache shows another leader, as a
// standby otherwise; nothing before it has the key.
//
// The term outlives the leadership on purpose: when the API server is down
// nobody can renew or take the Lease, the leader steps down, and without
// leader probes every gateway would fence. The last leader's term stays the
// newest one the agents know until another replica takes the Lease; the
// agents then refuse the older term (probe.Verifier), and this replica turns
// standby as soon as its cache shows the new holder.
func (c *Controller) probeSender() (key []byte, role, identity string, term int64, ok bool) {
	k := c.probeKey.Load()
	if k == nil {
		return nil, "", "", 0, false
	}
	if t := c.term.Load(); t != nil && !c.otherLeader(t.term) {
		return *k, probe.RoleLeader, c.cfg.Identity, t.term, true
	}
	return *k, probe.RoleStandby, c.cfg.Identity, 0, true
}

// otherLeader reports whether the Lease cache shows another replica
// holding the leader Lease, or a term after term.
func (c *Controller) otherLeader(term int64) bool {
	if c.leases == nil {
		return false
	}
	obj, ok, _ := c.leases.GetByKey(c.cfg.AgentNamespace + "/" + c.cfg.LeaderLease)
	if !ok {
		return false
	}
	l := obj.(*coordinationv1.Lease)
	if l.Spec.LeaseTransitions != nil && int64(*l.Spec.LeaseTransitions) > term {
		return true
	}
	return l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != "" && *l.Spec.HolderIdentity != c.cfg.Identity
}

// keepProbeKey loads the probe key from its Secret, creating the Secret
// with a random key when it does not exist, and reloads it every 30 s (a
// rotated key takes effect without a restart); a failed load is retried
// every second. Until it has a key the replica sends no probe.
func (c *Controller) keepProbeKey(ctx context.Context) {
	kube.KeepProbeKey(ctx, c.probeKeyLoop())
}

func (c *Controller) probeKeyLoop() kube.ProbeKeyLoop {
	return kube.ProbeKeyLoop{
		Client: c.cfg.Clients.Core, Namespace: c.cfg.AgentNamespace, Name: c.cfg.ProbeSecret, Create: true,
		Retry: time.Second, RetryWithKey: time.Second,
		Loaded: func(key []byte, created bool) {
			if created {
				c.cfg.Log.Info("created the probe key", zap.String("secret", c.cfg.AgentNamespace+"/"+c.cfg.ProbeSecret))
			}
			c.probeKey.Store(&key)
		},
		Failed: func(err error) { c.cfg.Log.Warn("load the probe key; probing stops until it loads", zap.Error(err)) },
		Clock:  c.clock,
	}
}
