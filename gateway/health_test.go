package gateway

import "testing"

func TestUp(t *testing.T) {
	ok := func(l Liveness) Liveness { l.Registered, l.ProbeHealthy = true, true; return l }
	cases := []struct {
		name string
		l    Liveness
		want bool
	}{
		{"ready, registered, probed", ok(Liveness{NodeReady: true, NodeReadyKnown: true}), true},
		{"ready unknown, probed", ok(Liveness{}), true},
		{"ready explicitly false", ok(Liveness{NodeReady: false, NodeReadyKnown: true}), false},
		{"no agent registered", Liveness{NodeReady: true, NodeReadyKnown: true, ProbeHealthy: true}, false},
		{"probes unanswered", Liveness{NodeReady: true, NodeReadyKnown: true, Registered: true}, false},
		{"probes unanswered, ready unknown", Liveness{Registered: true}, false},
		{"nothing known", Liveness{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Up(tc.l); got != tc.want {
				t.Fatalf("Up(%+v) = %v, want %v", tc.l, got, tc.want)
			}
		})
	}
}
