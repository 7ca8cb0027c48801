package gateway

import (
	"testing"
	"time"
)

func TestUp(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	fresh := func(l Liveness) Liveness {
		l.HasLease, l.LeaseRenew, l.LeaseDuration = true, now.Add(-5*time.Second), 15*time.Second
		return l
	}
	cases := []struct {
		name string
		l    Liveness
		want bool
	}{
		{"ready and fresh lease", fresh(Liveness{NodeReady: true, NodeReadyKnown: true}), true},
		{"ready unknown, fresh lease", fresh(Liveness{}), true},
		{"ready explicitly false", fresh(Liveness{NodeReady: false, NodeReadyKnown: true}), false},
		{"no lease", Liveness{NodeReady: true, NodeReadyKnown: true}, false},
		{"lease expired", Liveness{NodeReady: true, NodeReadyKnown: true, HasLease: true, LeaseRenew: now.Add(-16 * time.Second), LeaseDuration: 15 * time.Second}, false},
		{"lease expires exactly now", Liveness{HasLease: true, LeaseRenew: now.Add(-15 * time.Second), LeaseDuration: 15 * time.Second}, false},
		{"lease expires in 1ns", Liveness{HasLease: true, LeaseRenew: now.Add(-15*time.Second + time.Nanosecond), LeaseDuration: 15 * time.Second}, true},
		{"zero duration", Liveness{HasLease: true, LeaseRenew: now}, false},
		{"renewed in the future (clock skew)", Liveness{HasLease: true, LeaseRenew: now.Add(time.Minute), LeaseDuration: 15 * time.Second}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Up(tc.l, now); got != tc.want {
				t.Fatalf("Up(%+v) = %v, want %v", tc.l, got, tc.want)
			}
		})
	}
}
