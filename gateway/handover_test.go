package gateway

import (
	"maps"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestPlan(t *testing.T) {
	ip := netip.MustParseAddr("192.0.2.100")
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	nodes := []Node{{Name: "a", Up: true}, {Name: "b", Up: true}, {Name: "down", Up: false}}
	reason := func(netip.Addr, string, string) string { return "node a cordoned" }
	ready := func(node string) func(string, netip.Addr) bool {
		return func(n string, _ netip.Addr) bool { return n == node }
	}
	h := Handover{From: "a", To: "b", Reason: "node a cordoned", Since: t0}
	for _, tc := range []struct {
		name      string
		current   map[netip.Addr]string
		handovers map[netip.Addr]Handover
		target    map[netip.Addr]string
		prepared  func(string, netip.Addr) bool
		now       time.Time
		want      PlanResult
	}{
		{name: "stays", current: map[netip.Addr]string{ip: "a"}, target: map[netip.Addr]string{ip: "a"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "a"}}},
		{name: "new IP placed at once", target: map[netip.Addr]string{ip: "b"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"}}},
		{name: "nobody can hold it", current: map[netip.Addr]string{ip: "down"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{}}},
		{name: "holder down: at once", current: map[netip.Addr]string{ip: "down"}, target: map[netip.Addr]string{ip: "b"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"}, Moves: []Move{{IP: ip, From: "down", To: "b"}}}},
		{name: "holder gone: at once", current: map[netip.Addr]string{ip: "gone"}, target: map[netip.Addr]string{ip: "b"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"}, Moves: []Move{{IP: ip, From: "gone", To: "b"}}}},
		{name: "holder up: handover starts", current: map[netip.Addr]string{ip: "a"}, target: map[netip.Addr]string{ip: "b"}, now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "a"}, Handovers: map[netip.Addr]Handover{ip: h}}},
		{name: "waiting for the target", current: map[netip.Addr]string{ip: "a"}, handovers: map[netip.Addr]Handover{ip: h},
			target: map[netip.Addr]string{ip: "b"}, prepared: ready("a"), now: t0.Add(time.Second),
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "a"}, Handovers: map[netip.Addr]Handover{ip: h}}},
		{name: "target prepared: switch", current: map[netip.Addr]string{ip: "a"}, handovers: map[netip.Addr]Handover{ip: h},
			target: map[netip.Addr]string{ip: "b"}, prepared: ready("b"), now: t0.Add(time.Second),
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"},
				Moves: []Move{{IP: ip, From: "a", To: "b", Planned: true, Reason: "node a cordoned"}}}},
		{name: "timeout: switch unprepared", current: map[netip.Addr]string{ip: "a"}, handovers: map[netip.Addr]Handover{ip: h},
			target: map[netip.Addr]string{ip: "b"}, now: t0.Add(3 * time.Second),
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"},
				Moves: []Move{{IP: ip, From: "a", To: "b", Planned: true, Reason: "node a cordoned", Unprepared: true}}}},
		{name: "a prepared report before the handover does not count twice", current: map[netip.Addr]string{ip: "a"},
			target: map[netip.Addr]string{ip: "b"}, prepared: ready("b"), now: t0,
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "b"},
				Moves: []Move{{IP: ip, From: "a", To: "b", Planned: true, Reason: "node a cordoned"}}}},
		{name: "target changed: a new handover", current: map[netip.Addr]string{ip: "a"}, handovers: map[netip.Addr]Handover{ip: h},
			target: map[netip.Addr]string{ip: "c"}, now: t0.Add(2 * time.Second),
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "a"},
				Handovers: map[netip.Addr]Handover{ip: {From: "a", To: "c", Reason: "node a cordoned", Since: t0.Add(2 * time.Second)}}}},
		{name: "cancelled: the IP stays", current: map[netip.Addr]string{ip: "a"}, handovers: map[netip.Addr]Handover{ip: h},
			target: map[netip.Addr]string{ip: "a"}, now: t0.Add(time.Second),
			want: PlanResult{Assignment: map[netip.Addr]string{ip: "a"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Plan(PlanInput{Current: tc.current, Handovers: tc.handovers, Target: tc.target, Nodes: append(nodes, Node{Name: "c", Up: true}),
				Prepared: tc.prepared, Reason: reason, Now: tc.now, Timeout: 3 * time.Second})
			if tc.want.Handovers == nil {
				tc.want.Handovers = map[netip.Addr]Handover{}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestOverlay(t *testing.T) {
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	got := Overlay(map[netip.Addr]string{a: "x", b: "y"}, map[netip.Addr]Handover{
		a: {From: "x", To: "z"},
		b: {From: "other", To: "z"}, // stale: b is on y, not other
	})
	if want := map[netip.Addr]string{a: "z", b: "y"}; !maps.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestParseMoveRequest(t *testing.T) {
	ip1, ip2 := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101")
	for _, tc := range []struct {
		in      string
		want    MoveRequest
		wantErr string
	}{
		{in: "*", want: MoveRequest{All: true}},
		{in: " 192.0.2.100 , 192.0.2.101=worker2 ;abc", want: MoveRequest{IPs: map[netip.Addr]string{ip1: "", ip2: "worker2"}, ID: "abc"}},
		{in: "::ffff:192.0.2.100", want: MoveRequest{IPs: map[netip.Addr]string{ip1: ""}}},
		{in: "", wantErr: "names no floating IP"},
		{in: ";id", wantErr: "names no floating IP"},
		{in: "2001:db8::1", wantErr: "not an IPv4 address"},
		{in: "worker1", wantErr: "not an IPv4 address"},
		{in: "192.0.2.100=", wantErr: "no node after"},
		{in: "192.0.2.100,192.0.2.100=w", wantErr: "named twice"},
	} {
		got, err := ParseMoveRequest(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: got %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		back, err := ParseMoveRequest(got.String())
		if err != nil || !reflect.DeepEqual(back, got) {
			t.Errorf("%q: String %q parses to %+v, %v", tc.in, got.String(), back, err)
		}
	}
}

func TestRequested(t *testing.T) {
	ip1, ip2, ip3 := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("192.0.2.101"), netip.MustParseAddr("192.0.2.102")
	sub := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	nodes := []Node{
		{Name: "w1", Up: true, Subnets: sub},
		{Name: "w2", Up: true, Subnets: sub},
		{Name: "w3", Up: true, Subnets: sub, Draining: "cordoned (spec.unschedulable)"},
		{Name: "cp", Up: true, Subnets: sub, ControlPlane: true},
		{Name: "far", Up: true, Subnets: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}},
	}
	groups := []Group{{Namespace: "kube-system", Name: "g", FloatingIPs: []netip.Addr{ip1, ip2, ip3}}}
	// All three piled on w1 (nothing moves them automatically).
	current := map[netip.Addr]string{ip1: "w1", ip2: "w1", ip3: "w1"}
	for _, tc := range []struct {
		req     string
		want    map[netip.Addr]string
		message string
	}{
		{req: "*", want: map[netip.Addr]string{ip2: "w2"}, message: "moving 192.0.2.101 from w1 to w2"}, // workers first: ip3 stays with w1
		{req: "192.0.2.100", want: map[netip.Addr]string{ip1: "w2"}, message: "moving 192.0.2.100 from w1 to w2"},
		{req: "192.0.2.100=cp", want: map[netip.Addr]string{ip1: "cp"}, message: "moving 192.0.2.100 from w1 to cp"},
		{req: "192.0.2.100=w1", want: map[netip.Addr]string{}, message: "nothing to move; 192.0.2.100 is already on w1"},
		{req: "192.0.2.100=w3", want: map[netip.Addr]string{}, message: "192.0.2.100 cannot go to w3: node w3 is cordoned (spec.unschedulable)"},
		{req: "192.0.2.100=far", want: map[netip.Addr]string{}, message: "192.0.2.100 cannot go to far: 192.0.2.100 is in none of node far's subnets"},
		{req: "192.0.2.100=nope", want: map[netip.Addr]string{}, message: "node nope does not exist"},
		{req: "192.0.2.9", want: map[netip.Addr]string{}, message: "192.0.2.9 is not a usable floating IP of this group"},
	} {
		req, err := ParseMoveRequest(tc.req)
		if err != nil {
			t.Fatal(err)
		}
		got, msg := Requested(groups, 0, req, nodes, current, current)
		if !maps.Equal(got, tc.want) || !strings.Contains(msg, tc.message) {
			t.Errorf("%s: got %v %q, want %v %q", tc.req, got, msg, tc.want, tc.message)
		}
	}
}
