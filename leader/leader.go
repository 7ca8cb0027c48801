// Package leader runs a function only while this process holds a
// coordination.k8s.io Lease, so that several operator replicas can run and
// only one writes.
package leader

import (
	"context"
	"fmt"
	"time"

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
	// leadership is lost.
	OnLeading func(ctx context.Context)
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
					c.Log.Info("became leader", zap.String("identity", c.Identity))
					c.OnLeading(ctx)
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
