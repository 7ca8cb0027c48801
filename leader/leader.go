// Package leader runs a function only while this process holds a
// coordination.k8s.io Lease, so that several operator replicas can run and
// only one writes.
package leader

import (
	"context"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Config of an election.
type Config struct {
	Client    kubernetes.Interface
	Namespace string
	Name      string // the Lease's name
	Identity  string // this replica, e.g. the pod name
	// LeaseDuration is how long a dead leader blocks the others;
	// RenewDeadline how long the leader retries renewing before it steps
	// down; RetryPeriod how often candidates try.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	Log                                       *zap.Logger
	// OnLeading runs while this replica leads; its context ends when
	// leadership is lost. term is the Lease's leaseTransitions when this
	// replica took it: it grows with every new leader, so that an agent
	// can tell the current leader's probes from a deposed one's.
	OnLeading func(ctx context.Context, term int64)
	// OnChange is told every new leader's identity (optional).
	OnChange func(identity string)
}

// Run takes part in the election until ctx ends. Each time this replica
// wins, OnLeading runs; when it loses the lease, OnLeading's context is
// cancelled and Run campaigns again.
func Run(ctx context.Context, c Config) error {
	if c.Identity == "" || c.Name == "" || c.Namespace == "" {
		return fmt.Errorf("leader election needs a namespace, a name and an identity")
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: c.Namespace, Name: c.Name},
		Client:     c.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: c.Identity},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   c.LeaseDuration,
			RenewDeadline:   c.RenewDeadline,
			RetryPeriod:     c.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            c.Name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					term, err := readTerm(ctx, c)
					if err != nil {
						// Leading without a term would sign probes no
						// agent should trust: give the Lease up.
						c.Log.Error("read the leader lease's term", zap.Error(err))
						return
					}
					c.Log.Info("became leader", zap.String("identity", c.Identity), zap.Int64("term", term))
					c.OnLeading(ctx, term)
				},
				OnStoppedLeading: func() {
					c.Log.Info("stopped leading", zap.String("identity", c.Identity))
				},
				OnNewLeader: func(id string) {
					if c.OnChange != nil {
						c.OnChange(id)
					}
				},
			},
		})
		if err != nil {
			return fmt.Errorf("leader election: %w", err)
		}
		le.Run(ctx)
	}
	return nil
}

// readTerm reads the Lease this replica just took and returns its
// leaseTransitions, retrying every 100 ms until ctx ends.
func readTerm(ctx context.Context, c Config) (int64, error) {
	var term int64
	err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		l, err := c.Client.CoordinationV1().Leases(c.Namespace).Get(ctx, c.Name, metav1.GetOptions{})
		if err != nil {
			c.Log.Warn("read the leader lease", zap.Error(err))
			return false, nil
		}
		if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != c.Identity {
			return false, fmt.Errorf("lease %s/%s is held by %v, not %s", c.Namespace, c.Name, l.Spec.HolderIdentity, c.Identity)
		}
		if l.Spec.LeaseTransitions != nil {
			term = int64(*l.Spec.LeaseTransitions)
		}
		return true, nil
	})
	if err != nil {
		return 0, fmt.Errorf("read lease term: %w", err)
	}
	return term, nil
}
