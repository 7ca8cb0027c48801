package nft

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/egressnat/egressnat/selector"
	"go.uber.org/zap"
)

// Guard installs the table without any policy, only its fixed rules, when
// the node has no table at all: after a reboot, or a flushed ruleset. Until
// the first Apply (which needs the API server), traffic other nodes still
// reroute here is dropped instead of leaving with the node's address
// through the CNI's masquerade: every packet that comes in on the uplink
// from a cluster-internal source to an outside destination (ruleBootGuard,
// in prerouting: also the flows whose first packets were masqueraded
// before the table existed, which conntrack keeps masquerading past any
// NAT chain), and every packet from a cluster-internal source (the node's
// own pods) to one of dests, the policy destinations the last Apply knew
// (ruleBootGuardPods): until the first Apply no pod's traffic to them may
// leave with the node's address. internal holds the cluster-internal
// destinations (the pod CIDRs are what the guard matches), as the last
// Apply before the reboot knew them.
//
// It changes nothing when the table exists (an agent restart: the table
// from before serves until the first Apply), and touches no address,
// route, ARP lease or conntrack entry: the first Apply converges from here
// as from any table. installed reports whether it created the table.
func (d *Dataplane) Guard(ctx context.Context, internal, dests []netip.Prefix) (installed bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(internal) == 0 {
		return false, nil // nothing the guard could match
	}
	ks, err := d.nf.read(ctx)
	if err != nil {
		return false, err
	}
	if ks.exists {
		return false, nil
	}
	st := selector.NodeState{Excluded: internal}
	n, err := normalizeState(st)
	if err != nil {
		return false, fmt.Errorf("invalid state: %w", err)
	}
	n.dests[setBootDests] = mergeOverlaps(prefixRanges(ipv4Prefixes(dests)))
	want := desiredNFT{state: st, marks: map[netip.Addr]int{}, sources: n.sources, dests: n.dests, jumps: preSrcTargets(st), bootGuard: true}
	plan := d.nf.plan(ks, want)
	d.nf.cache = nil // the first Apply reads the kernel
	if _, err := d.nf.exec.run(ctx, &plan.Plan); err != nil {
		return false, fmt.Errorf("install the guard table: %w", err)
	}
	d.log.Info("no table found: installed the guard table until the first apply", zap.String("table", d.cfg.Table),
		zap.Int("internalPrefixes", len(internal)))
	return true, nil
}
