package probe

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

var (
	key   = []byte("0123456789abcdef0123456789abcdef")
	node  = netip.MustParseAddr("192.0.2.12")
	other = netip.MustParseAddr("192.0.2.13")
)

func leaderProbe(id string, term int64, counter uint64) Probe {
	return Probe{Role: RoleLeader, Identity: id, Term: term, Counter: counter, Node: node}
}

func TestRoundTrip(t *testing.T) {
	p := leaderProbe("operator-0", 3, 1700000000000000001)
	line := string(p.Encode(key))
	got, err := Decode(key, line)
	if err != nil || got != p {
		t.Fatalf("Decode(Encode(p)) = %+v, %v; want %+v", got, err, p)
	}
	r, err := DecodeReply(key, p, string(EncodeReply(key, p, 42)))
	if err != nil || r != (Reply{Counter: p.Counter, Heartbeat: 42}) {
		t.Fatalf("reply = %+v, %v", r, err)
	}
}

// Anything but a probe signed with the key is refused: another key, a
// changed field, garbage, no key.
func TestDecodeRejects(t *testing.T) {
	p := leaderProbe("operator-0", 3, 7)
	good := string(p.Encode(key))
	f := strings.Fields(good)
	tamper := func(i int, v string) string {
		g := append([]string(nil), f...)
		g[i] = v
		return strings.Join(g, " ")
	}
	for name, tc := range map[string]struct {
		key  []byte
		line string
		want error
	}{
		"other key":         {[]byte("another key of sixteen+"), good, ErrBadMAC},
		"role changed":      {key, tamper(1, RoleStandby), ErrBadMAC},
		"identity changed":  {key, tamper(2, "operator-1"), ErrBadMAC},
		"term raised":       {key, tamper(3, "4"), ErrBadMAC},
		"counter raised":    {key, tamper(4, "8"), ErrBadMAC},
		"node changed":      {key, tamper(5, other.String()), ErrBadMAC},
		"garbage":           {key, "GET / HTTP/1.1", ErrMalformed},
		"empty":             {key, "", ErrMalformed},
		"old version":       {key, tamper(0, "enp0"), ErrMalformed},
		"no key configured": {nil, good, ErrNoKey},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Decode(tc.key, tc.line); !errors.Is(err, tc.want) {
				t.Fatalf("Decode = %v, want %v", err, tc.want)
			}
		})
	}
}

// A reply only proves the agent answered this probe: a reply to another
// counter, node or sender, or signed with another key, is refused.
func TestReplyBound(t *testing.T) {
	p := leaderProbe("operator-0", 3, 7)
	reply := string(EncodeReply(key, p, 5))
	for name, q := range map[string]Probe{
		"other counter":  leaderProbe("operator-0", 3, 8),
		"other sender":   leaderProbe("operator-1", 3, 7),
		"other node":     {Role: RoleLeader, Identity: "operator-0", Term: 3, Counter: 7, Node: other},
		"same, good one": p,
	} {
		_, err := DecodeReply(key, q, reply)
		if (err == nil) != (name == "same, good one") {
			t.Errorf("%s: DecodeReply = %v", name, err)
		}
	}
	if _, err := DecodeReply([]byte("another key of sixteen+"), p, reply); !errors.Is(err, ErrBadMAC) {
		t.Errorf("other key: %v", err)
	}
}

// Only the newest term's leader, with fresh counters, sent to this
// node's address, holds the fence down.
func TestVerifier(t *testing.T) {
	type step struct {
		p     Probe
		local netip.Addr
		want  Verdict
	}
	standby := Probe{Role: RoleStandby, Identity: "operator-1", Term: 0, Counter: 1, Node: node}
	for name, steps := range map[string][]step{
		"leader counts, counters increase": {
			{leaderProbe("a", 1, 10), node, Counts},
			{leaderProbe("a", 1, 11), node, Counts},
		},
		"replay does not count": {
			{leaderProbe("a", 1, 10), node, Counts},
			{leaderProbe("a", 1, 11), node, Counts},
			{leaderProbe("a", 1, 11), node, Answered},
			{leaderProbe("a", 1, 10), node, Answered},
		},
		"standby answered, never counts": {
			{standby, node, Answered},
			{leaderProbe("a", 1, 10), node, Counts},
			{standby, node, Answered},
		},
		"newer term replaces the leader; the deposed one no longer counts": {
			{leaderProbe("a", 1, 10), node, Counts},
			{leaderProbe("b", 2, 5), node, Counts},
			{leaderProbe("a", 1, 11), node, Answered},
			{leaderProbe("b", 2, 6), node, Counts},
		},
		"two claim one term: the first seen keeps it": {
			{leaderProbe("a", 2, 10), node, Counts},
			{leaderProbe("b", 2, 99), node, Answered},
		},
		"sent to another address": {
			{leaderProbe("a", 1, 10), other, Rejected},
			{leaderProbe("a", 1, 11), node, Counts},
		},
		"IPv4-mapped local address": {
			{leaderProbe("a", 1, 10), netip.AddrFrom16(node.As16()), Counts},
		},
	} {
		t.Run(name, func(t *testing.T) {
			var v Verifier
			for i, s := range steps {
				if got, err := v.Accept(s.p, s.local); got != s.want {
					t.Fatalf("step %d: Accept(%+v) = %v (%v), want %v", i, s.p, got, err, s.want)
				}
			}
		})
	}
}
