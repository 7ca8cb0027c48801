package selector

import (
	"fmt"
	"net/netip"
	"strings"

	v1 "github.com/egressnat/egressnat/api/v1"
)

// ClusterNetwork is one cluster-internal destination and what it is ("pod
// CIDR of node n1", "Service CIDR", "InternalIP of node n2").
type ClusterNetwork struct {
	Prefix netip.Prefix
	What   string
}

// InternalDestinations says which of a policy's destinations overlap the
// cluster's own networks, which the agents never steer: "" when none
// does, otherwise a message naming each overlap (at most 5), for the
// policy's ClusterInternal condition. A destination that does not parse
// is left out (Compile reports it).
func InternalDestinations(dests []v1.EgressDestination, cluster []ClusterNetwork) string {
	var parts []string
	more := 0
	for _, d := range dests {
		p, err := parseDestination(d.CIDR)
		if err != nil {
			continue
		}
		for _, c := range cluster {
			if !c.Prefix.IsValid() || !p.Overlaps(c.Prefix) {
				continue
			}
			if len(parts) == 5 {
				more++
				continue
			}
			parts = append(parts, fmt.Sprintf("%s overlaps %s (%s)", p, c.Prefix, c.What))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	msg := strings.Join(parts, "; ")
	if more > 0 {
		msg += fmt.Sprintf("; and %d more", more)
	}
	return msg + ": traffic to the cluster's own pods, Services, nodes and API server is never steered, whatever the destinations say"
}
