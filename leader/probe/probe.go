// Package probe is the authenticated health-probe protocol between the
// operator replicas and the agents. It is pure: no sockets, no API.
//
// A probe is one line a replica writes on a fresh TCP connection to the
// agent's probe port:
//
//	enp1 <role> <identity> <term> <counter> <node-ip> <hmac>
//
// role is "leader" for the replica that holds the operator's leader Lease
// (term is the Lease's leaseTransitions when it took it) and "standby" for
// the others; counter strictly increases per sender; node-ip is the address
// the probe was sent to. hmac is HMAC-SHA256 over the other fields with the
// key from the egressnat probe Secret.
//
// The agent answers a valid probe, from either role, with
//
//	enp1 ok <counter> <heartbeat> <hmac>
//
// (heartbeat advances only while the agent's sync loop makes progress) and
// closes the connection without a word on anything else. Only a valid
// leader probe of the newest term the agent has seen, with a fresh counter,
// holds the agent's fence down (Verifier).
package probe

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
)

const (
	version = "enp1"
	// RoleLeader and RoleStandby say whether the sender leads.
	RoleLeader  = "leader"
	RoleStandby = "standby"
	// MaxLine bounds a probe or reply line (readers stop there).
	MaxLine = 512
	// SecretKey is the data key of the probe Secret holding the HMAC key;
	// SecretName its default name.
	SecretKey  = "key"
	SecretName = "egressnat-probe-key"
	// MinKeyLen is the shortest key accepted.
	MinKeyLen = 16
)

// NoKey is the agent's answer while it has not loaded the key yet: it
// proves nothing (anyone can send it) and counts like a refused
// connection, which the operator bounds in time (its refused grace).
const NoKey = version + " nokey\n"

// Probe is what a replica sends.
type Probe struct {
	Role     string
	Identity string
	Term     int64
	Counter  uint64
	Node     netip.Addr
}

// Reply is what the agent answers.
type Reply struct {
	Counter   uint64
	Heartbeat uint64
}

func mac(key []byte, fields ...string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(strings.Join(fields, "\x00")))
	return hex.EncodeToString(m.Sum(nil))
}

func (p Probe) fields() []string {
	return []string{version, p.Role, p.Identity, strconv.FormatInt(p.Term, 10), strconv.FormatUint(p.Counter, 10), p.Node.String()}
}

// Encode returns the probe line, newline included.
func (p Probe) Encode(key []byte) []byte {
	f := p.fields()
	return []byte(strings.Join(append(f, mac(key, f...)), " ") + "\n")
}

// Errors of Decode and Verifier.Accept.
var (
	ErrMalformed = errors.New("malformed probe")
	ErrBadMAC    = errors.New("bad probe signature")
	ErrNoKey     = errors.New("no probe key")
)

// Decode parses and authenticates a probe line (without checking its
// freshness: see Verifier).
func Decode(key []byte, line string) (Probe, error) {
	if len(key) == 0 {
		return Probe{}, ErrNoKey
	}
	f := strings.Fields(line)
	if len(f) != 7 || f[0] != version {
		return Probe{}, ErrMalformed
	}
	if !hmac.Equal([]byte(mac(key, f[:6]...)), []byte(f[6])) {
		return Probe{}, ErrBadMAC
	}
	p := Probe{Role: f[1], Identity: f[2]}
	var err error
	if p.Role != RoleLeader && p.Role != RoleStandby {
		return Probe{}, fmt.Errorf("%w: role %q", ErrMalformed, p.Role)
	}
	if p.Term, err = strconv.ParseInt(f[3], 10, 64); err != nil {
		return Probe{}, fmt.Errorf("%w: term: %v", ErrMalformed, err)
	}
	if p.Counter, err = strconv.ParseUint(f[4], 10, 64); err != nil {
		return Probe{}, fmt.Errorf("%w: counter: %v", ErrMalformed, err)
	}
	if p.Node, err = netip.ParseAddr(f[5]); err != nil {
		return Probe{}, fmt.Errorf("%w: node: %v", ErrMalformed, err)
	}
	return p, nil
}

// EncodeReply returns the agent's answer to probe p, newline included. The
// reply is bound to the probe (its counter and node address).
func EncodeReply(key []byte, p Probe, heartbeat uint64) []byte {
	f := []string{version, "ok", strconv.FormatUint(p.Counter, 10), strconv.FormatUint(heartbeat, 10)}
	sig := mac(key, append(f, p.Node.String(), p.Identity)...)
	return []byte(strings.Join(append(f, sig), " ") + "\n")
}

// DecodeReply authenticates the agent's answer to p.
func DecodeReply(key []byte, p Probe, line string) (Reply, error) {
	f := strings.Fields(line)
	if len(f) != 5 || f[0] != version || f[1] != "ok" {
		return Reply{}, ErrMalformed
	}
	if !hmac.Equal([]byte(mac(key, append(f[:4:4], p.Node.String(), p.Identity)...)), []byte(f[4])) {
		return Reply{}, ErrBadMAC
	}
	var r Reply
	var err error
	if r.Counter, err = strconv.ParseUint(f[2], 10, 64); err != nil || r.Counter != p.Counter {
		return Reply{}, fmt.Errorf("%w: reply to another probe", ErrMalformed)
	}
	if r.Heartbeat, err = strconv.ParseUint(f[3], 10, 64); err != nil {
		return Reply{}, fmt.Errorf("%w: heartbeat: %v", ErrMalformed, err)
	}
	return r, nil
}

// Verifier decides which probes count for the agent's fence: a leader
// probe sent to this node's address (the connection's local address), of a
// term at least the newest seen (a newer term replaces the leader; an older
// one is a deposed leader), from that term's leader, with a counter above
// every counter accepted in that term (no replay). It is safe for
// concurrent use.
type Verifier struct {
	mu       sync.Mutex
	term     int64
	leader   string
	counter  uint64
	seenTerm bool
}

// Verdict of Verifier.Accept.
type Verdict int

const (
	// Rejected: not a valid probe; close without answering.
	Rejected Verdict = iota
	// Answered: valid and answered (a standby's probe, or a leader
	// probe that does not count), but it does not hold the fence down.
	Answered
	// Counts: the current leader's fresh probe.
	Counts
)

// Accept checks probe p received on local address local.
func (v *Verifier) Accept(p Probe, local netip.Addr) (Verdict, error) {
	if p.Node != local.Unmap() {
		return Rejected, fmt.Errorf("probe for %s received on %s", p.Node, local)
	}
	if p.Role != RoleLeader {
		return Answered, nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case !v.seenTerm || p.Term > v.term:
		v.seenTerm, v.term, v.leader, v.counter = true, p.Term, p.Identity, p.Counter
		return Counts, nil
	case p.Term < v.term:
		return Answered, fmt.Errorf("leader probe of term %d from %s: term %d (%s) is newer", p.Term, p.Identity, v.term, v.leader)
	case p.Identity != v.leader:
		return Answered, fmt.Errorf("leader probe of term %d from %s: that term's leader is %s", p.Term, p.Identity, v.leader)
	case p.Counter <= v.counter:
		return Answered, fmt.Errorf("leader probe replayed: counter %d, last %d", p.Counter, v.counter)
	}
	v.counter = p.Counter
	return Counts, nil
}

// Leader returns the leader and term of the last probe that counted.
func (v *Verifier) Leader() (identity string, term int64, ok bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.leader, v.term, v.seenTerm
}
