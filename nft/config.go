// Package nft makes a node's kernel match a selector.NodeState: one nftables
// table (sets of selected pods and destinations, a mangle prerouting chain that
// marks or drops, a nat postrouting chain that SNATs), policy routing for
// marked traffic, floating IPs on the uplink with gratuitous ARP, and
// conntrack clean-up after changes.
//
// The first Apply reads the table back from the kernel, so a restarted agent
// changes nothing when the state is unchanged; later ones diff against the
// table as the last Apply left it, and a change of sources alone touches only
// those elements. Verify checks the kernel against that cache in the
// background. New state is always added before old state is removed.
package nft

import (
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/egressnat/egressnat/selector"
)

// Defaults for Config fields left zero.
const (
	DefaultTable       = "egressnat"
	DefaultVerifyPause = time.Millisecond
	// DefaultARPProbeWait is how long Apply listens for another holder of a
	// floating IP it is about to add (see Config.ARPProbeWait).
	DefaultARPProbeWait = 50 * time.Millisecond
)

// Config configures a Dataplane.
type Config struct {
	// Table is the name of the nftables table (family ip) owned by egressnat.
	Table string
	// Uplink is the node's interface towards the node subnet: floating IPs are
	// added to it, rerouted traffic leaves through it, SNAT matches it.
	Uplink string
	// MarkMask holds the packet mark bits egressnat may use to select a next
	// hop. Bits outside it are preserved.
	MarkMask uint32
	// RouteTableBase: next hop index i is routed by table RouteTableBase+i.
	RouteTableBase int
	// RulePriority of the fwmark ip rules.
	RulePriority int
	// NetNSFd is an open file descriptor of the network namespace to program;
	// a value below 1 means the current network namespace.
	NetNSFd int
	// Logger receives structured logs; nil means no logs.
	Logger *zap.Logger
	// VerifyPause is the pause between two reads of Verify, which spreads
	// its work (thousands of sets) over time; negative means none.
	VerifyPause time.Duration
	// ARPProbeWait: before adding a floating IP that is not on the uplink
	// yet, Apply sends ARP probes for it (RFC 5227: sender IP 0.0.0.0) and
	// listens this long for another host that answers for it; such an IP
	// is not taken (Result.Conflicts). All new IPs of one Apply share one
	// window. Zero means DefaultARPProbeWait, negative disables the probe.
	ARPProbeWait time.Duration
	// ARPLease: the node answers ARP for its floating IPs only while their
	// lease, renewed by KeepARP, is live (a kernel-level dead man's switch:
	// see KeepARP). Zero means DefaultARPLease; negative disables the
	// lease (no arp table: the node answers for them as long as they are
	// on the uplink). The kernel counts it in whole milliseconds.
	ARPLease time.Duration
	// SysctlRecordDir: before an Apply changes a sysctl (a gateway's, see
	// gatewaySettings), its value before is recorded in this directory
	// (RecordSysctls), for an uninstall to restore; empty: not recorded.
	SysctlRecordDir string
	// Classifier, when set, classifies this node's pods in eBPF (see
	// PodClassifier and classes.go): the Dataplane writes its map, the
	// table dispatches on the class mark. Nil: the nftables mode (one
	// pre-src element per pod).
	Classifier PodClassifier
	// ClassMask holds the mark bits of the classes (Classifier only); zero
	// means selector.DefaultClassMask. It must be clear of MarkMask.
	ClassMask uint32
}

func (c Config) withDefaults() (Config, error) {
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.MarkMask == 0 {
		c.MarkMask = selector.DefaultMarkMask
	}
	if c.RouteTableBase == 0 {
		c.RouteTableBase = selector.DefaultRouteTableBase
	}
	if c.RulePriority == 0 {
		c.RulePriority = selector.DefaultRulePriority
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.VerifyPause == 0 {
		c.VerifyPause = DefaultVerifyPause
	}
	if c.ARPProbeWait == 0 {
		c.ARPProbeWait = DefaultARPProbeWait
	}
	if c.ARPLease == 0 {
		c.ARPLease = DefaultARPLease
	}
	if c.Classifier != nil {
		if c.ClassMask == 0 {
			c.ClassMask = selector.DefaultClassMask
		}
		if err := checkClassMask(c.ClassMask, c.MarkMask); err != nil {
			return c, fmt.Errorf("config: %w", err)
		}
	}
	if c.Uplink == "" {
		return c, errors.New("config: uplink is required")
	}
	if len(c.Uplink) >= 16 {
		return c, fmt.Errorf("config: uplink name %q too long", c.Uplink)
	}
	if c.RouteTableBase < 0 || c.RulePriority < 0 {
		return c, errors.New("config: route table base and rule priority must not be negative")
	}
	if len(c.Table) > 200 {
		return c, fmt.Errorf("config: table name %q too long", c.Table)
	}
	return c, nil
}

func (c Config) inCurrentNetNS() bool { return c.NetNSFd < 1 }
