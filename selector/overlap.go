package selector

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// WonBy says what made a policy win over the others covering the same
// destination.
type WonBy string

const (
	// WonAlone: no other policy covers the destination.
	WonAlone WonBy = "alone"
	// WonByPrefix: its destination containing the address is longer than
	// every other policy's.
	WonByPrefix WonBy = "longest prefix"
	// WonByAge: the prefixes tie; it was created first.
	WonByAge WonBy = "oldest"
	// WonByName: the prefixes and creation times tie; its name sorts first.
	WonByName WonBy = "name"
)

// Win is the policy that applies to a destination.
type Win struct {
	// Index of the winner in the policies given to Winner; -1 when none
	// covers the destination.
	Index int
	// Prefix is the winner's longest destination containing the address.
	Prefix netip.Prefix
	By     WonBy
}

// Winner decides which of policies applies to traffic to dst, when several
// select the same pod and cover dst. Of the policies with a destination
// containing dst, the one whose longest such destination is longest wins;
// on a tie, the oldest (metadata.creationTimestamp); then the first by name.
// Destinations are taken as written (a destination contained in another of
// the same policy counts with its own length). A destination that does not
// parse covers nothing. The order of policies does not matter.
//
// The agents' dataplane applies the same rule (Precedence).
func Winner(policies []*v1.EgressNATPolicy, dst netip.Addr) Win {
	type contender struct {
		i      int
		prefix netip.Prefix
		pol    *v1.EgressNATPolicy
	}
	var cs []contender
	for i, p := range policies {
		if j, pfx := longestCovering(p.Spec.Destinations, dst); j >= 0 {
			cs = append(cs, contender{i, pfx, p})
		}
	}
	if len(cs) == 0 {
		return Win{Index: -1}
	}
	byAge := func(a, b contender) int { return a.pol.CreationTimestamp.Compare(b.pol.CreationTimestamp.Time) }
	order := func(a, b contender) int {
		return cmp.Or(Precedence(a.prefix.Bits(), a.pol.CreationTimestamp.Time, a.pol.Name, b.prefix.Bits(), b.pol.CreationTimestamp.Time, b.pol.Name),
			cmp.Compare(a.i, b.i))
	}
	slices.SortFunc(cs, order)
	w := Win{Index: cs[0].i, Prefix: cs[0].prefix, By: WonAlone}
	if len(cs) > 1 {
		a, b := cs[0], cs[1]
		switch {
		case a.prefix.Bits() != b.prefix.Bits():
			w.By = WonByPrefix
		case byAge(a, b) != 0:
			w.By = WonByAge
		default:
			w.By = WonByName
		}
	}
	return w
}

// Precedence orders two (policy, destination) pairs that both cover an
// address: negative when the first applies. The longer destination wins;
// then the policy created first; then the first by name. It is the one
// rule for overlapping policies, used by Winner (egressnatctl explain, the
// operator) and by the agents' rules.
func Precedence(aBits int, aCreated time.Time, aName string, bBits int, bCreated time.Time, bName string) int {
	return cmp.Or(cmp.Compare(bBits, aBits), aCreated.Compare(bCreated), strings.Compare(aName, bName))
}

// CoveringDestination returns the index in dests of the longest destination
// containing dst (the first of equal ones), -1 when none does.
func CoveringDestination(dests []v1.EgressDestination, dst netip.Addr) int {
	i, _ := longestCovering(dests, dst)
	return i
}

// longestCovering is CoveringDestination, also returning the destination
// parsed.
func longestCovering(dests []v1.EgressDestination, dst netip.Addr) (int, netip.Prefix) {
	best, pfx := -1, netip.Prefix{}
	dst = dst.Unmap()
	for i, d := range dests {
		p, err := parseDestination(d.CIDR)
		if err == nil && (best < 0 || p.Bits() > pfx.Bits()) && p.Contains(dst) {
			best, pfx = i, p
		}
	}
	return best, pfx
}
