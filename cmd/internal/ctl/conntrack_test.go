package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressnat/egressnat/nft"
	"github.com/egressnat/egressnat/selector"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
)

// fakeExpecter: policy web SNATs 10.244.2.0/24 to 203.0.113.0/24 to
// 192.0.2.100.
type fakeExpecter struct{}

func (fakeExpecter) Expect(src, dst netip.Addr) (string, netip.Addr, bool) {
	if netip.MustParsePrefix("10.244.2.0/24").Contains(src) && netip.MustParsePrefix("203.0.113.0/24").Contains(dst) {
		return "web", netip.MustParseAddr("192.0.2.100"), true
	}
	return "", netip.Addr{}, false
}

// TestCheckFlows: per floating IP, the entries SNATed to it and those of
// its policies; the policy's entries not translated to its egress IP
// (not NATed, masqueraded) are listed; flows of no policy and the node's
// own are not.
func TestCheckFlows(t *testing.T) {
	fip := netip.MustParseAddr("192.0.2.100")
	other := netip.MustParseAddr("192.0.2.101")
	flows := []Flow{
		{Proto: "tcp", Source: ap("10.244.2.5:40002"), Destination: ap("203.0.113.10:8080"), ReplyTo: ap("192.0.2.100:40002"), State: "ESTABLISHED", Timeout: 431999},
		{Proto: "udp", Source: ap("10.244.2.7:5353"), Destination: ap("203.0.113.12:53"), ReplyTo: ap("192.0.2.12:5353"), Timeout: 29},                        // masqueraded
		{Proto: "tcp", Source: ap("10.244.2.6:40003"), Destination: ap("203.0.113.11:443"), ReplyTo: ap("10.244.2.6:40003"), State: "SYN_SENT", Timeout: 100}, // not NATed
		{Proto: "tcp", Source: ap("10.244.9.9:1000"), Destination: ap("198.51.100.1:80"), ReplyTo: ap("192.0.2.12:1000")},                                     // no policy's
		{Proto: "tcp", Source: ap("10.244.1.3:1001"), Destination: ap("198.51.100.1:80"), ReplyTo: ap("192.0.2.100:1001")},                                    // SNATed, no policy of this table
		{Proto: "tcp", Source: ap("192.0.2.100:22"), Destination: ap("192.0.2.1:5000"), ReplyTo: ap("192.0.2.100:22")},                                        // the node's own
	}
	v := CheckFlows(flows, []netip.Addr{other, fip}, map[netip.Addr][]string{fip: {"web"}}, fakeExpecter{})
	want := []IPCheck{
		{FloatingIP: fip, Policies: []string{"web"}, Translated: 2, PolicyFlows: 3, Wrong: 2},
		{FloatingIP: other, Policies: []string{}, Translated: 0},
	}
	if len(v.IPs) != 2 || !equalChecks(v.IPs, want) {
		t.Fatalf("ips: %+v, want %+v", v.IPs, want)
	}
	if len(v.Wrong) != 2 || v.Wrong[0].Source != ap("10.244.2.6:40003") || v.Wrong[1].Want != fip || v.Wrong[1].Policy != "web" {
		t.Fatalf("wrong: %+v", v.Wrong)
	}
	var b bytes.Buffer
	if err := WriteConntrackReport(&b, ConntrackReport{FloatingIPs: GroupFlows(flows, []netip.Addr{other, fip}), Check: v}); err != nil {
		t.Fatal(err)
	}
	wantText := `192.0.2.101: 0 flows

192.0.2.100: 2 flows
  PROTO   SOURCE             DESTINATION         SNAT TO             STATE         TIMEOUT
  tcp     10.244.1.3:1001    198.51.100.1:80     192.0.2.100:1001    -             0s
  tcp     10.244.2.5:40002   203.0.113.10:8080   192.0.2.100:40002   ESTABLISHED   431999s

Conntrack check of the Gateway policies (what the agent verifies when it takes a floating IP):
  FLOATING IP   POLICIES   SNATED TO IT   OF ITS POLICIES   NOT TRANSLATED
  192.0.2.100   web        2              3                 2
  192.0.2.101   -          0              0                 0

2 entries not translated to their egress IP (they leave with another address; the agent flushes them when it takes the IP):
  PROTO   SOURCE             DESTINATION        REPLY TO           WANT          POLICY   STATE      TIMEOUT
  tcp     10.244.2.6:40003   203.0.113.11:443   10.244.2.6:40003   192.0.2.100   web      SYN_SENT   100s
  udp     10.244.2.7:5353    203.0.113.12:53    192.0.2.12:5353    192.0.2.100   web      -          29s
`
	if b.String() != wantText {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), wantText)
	}

	// All translated: said so; no floating IP and no policy: no check.
	v = CheckFlows(flows[:1], []netip.Addr{fip}, map[netip.Addr][]string{fip: {"web"}}, fakeExpecter{})
	b.Reset()
	if err := WriteVerification(&b, v); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "Every entry of a Gateway policy is translated to its egress IP.") {
		t.Errorf("all translated:\n%s", b.String())
	}
	v = CheckFlows(flows, nil, nil, nil)
	b.Reset()
	if err := WriteConntrackReport(&b, ConntrackReport{Check: v}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "Conntrack check") || !strings.Contains(b.String(), "holds no floating IP") {
		t.Errorf("nothing held:\n%s", b.String())
	}
}

func equalChecks(a, b []IPCheck) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.FloatingIP != y.FloatingIP || strings.Join(x.Policies, ",") != strings.Join(y.Policies, ",") ||
			x.Translated != y.Translated || x.PolicyFlows != y.PolicyFlows || x.Wrong != y.Wrong {
			return false
		}
	}
	return true
}

// TestConntrackCheckFromKernel: on a gateway programmed by the dataplane,
// egressnatctl conntrack counts the entry translated to the floating IP
// and lists the policy's entries that are not (one not NATed, one
// masqueraded to the node IP); a flow to a destination of no policy is
// not listed; -o json carries the same.
func TestConntrackCheckFromKernel(t *testing.T) {
	name, fd := newNetNS(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dp, err := nft.New(nft.Config{Uplink: "eth0", NetNSFd: fd})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close() //nolint:errcheck
	fip := netip.MustParseAddr("192.0.2.101")
	st := selector.NodeState{
		Policies: []selector.PolicyState{{
			Name: "partners", Mode: selector.ModeGateway,
			Sources:      []netip.Addr{netip.MustParseAddr("10.244.2.9"), netip.MustParseAddr("10.244.2.10"), netip.MustParseAddr("10.244.2.11")},
			Destinations: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")},
			EgressIP:     fip,
		}},
		FloatingIPs: []netip.Prefix{netip.MustParsePrefix("192.0.2.101/24")},
		Excluded:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}
	if err := dp.Apply(ctx, st); err != nil {
		t.Fatalf("apply: %v", err)
	}
	c, err := conntrack.Dial(&mdnetlink.Config{NetNS: fd})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	create := func(src, dst string, sport uint16, replyTo string) {
		t.Helper()
		status := conntrack.StatusConfirmed | conntrack.StatusSeenReply | conntrack.StatusAssured
		if replyTo != src {
			status |= conntrack.StatusSrcNAT
		}
		f := conntrack.NewFlow(6, status, netip.MustParseAddr(src), netip.MustParseAddr(dst), sport, 443, 120, 0)
		f.TupleReply.IP.DestinationAddress = netip.MustParseAddr(replyTo)
		if err := c.Create(f); err != nil {
			t.Fatalf("create conntrack entry %s -> %s: %v", src, dst, err)
		}
	}
	create("10.244.2.9", "198.51.100.7", 40001, "192.0.2.101")  // translated
	create("10.244.2.10", "198.51.100.8", 40002, "10.244.2.10") // not NATed
	create("10.244.2.11", "198.51.100.9", 40003, "192.0.2.12")  // masqueraded
	create("10.244.2.9", "203.0.113.7", 40004, "192.0.2.12")    // no policy's destination
	create("10.244.2.9", "10.244.3.7", 40005, "10.244.2.9")     // cluster-internal

	var out, errOut strings.Builder
	if code := Main(ctx, "egressnatctl", []string{"conntrack", "--netns", name}, &out, &errOut); code != 0 {
		t.Fatalf("conntrack: %d %s", code, errOut.String())
	}
	text := out.String()
	for _, want := range []string{
		"192.0.2.101: 1 flow\n",
		"  192.0.2.101   partners   1              3                 2\n",
		"2 entries not translated to their egress IP",
		"10.244.2.10:40002   198.51.100.8:443   10.244.2.10:40002   192.0.2.101   partners",
		"10.244.2.11:40003   198.51.100.9:443   192.0.2.12:40003    192.0.2.101   partners",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("conntrack output lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "203.0.113.7") || strings.Contains(text, "10.244.3.7") {
		t.Errorf("a flow of no policy is listed:\n%s", text)
	}

	out.Reset()
	if code := Main(ctx, "egressnatctl", []string{"conntrack", "--netns", name, "-o", "json"}, &out, &errOut); code != 0 {
		t.Fatalf("conntrack -o json: %d %s", code, errOut.String())
	}
	var r ConntrackReport
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
		t.Fatalf("json: %v\n%s", err, out.String())
	}
	if len(r.Check.IPs) != 1 || r.Check.IPs[0].Wrong != 2 || r.Check.IPs[0].Translated != 1 || len(r.Check.Wrong) != 2 ||
		r.Check.Wrong[0].Want != fip || len(r.FloatingIPs) != 1 || len(r.FloatingIPs[0].Flows) != 1 {
		t.Errorf("json report: %+v", r)
	}

	// The agent's check on taking the IP flushes the two wrong entries;
	// the command then finds none.
	v, err := dp.VerifyTaken(ctx, []netip.Addr{fip})
	if err != nil || v.Wrong != 2 || v.Flushed != 2 || v.Translated != 1 || v.Remaining != 0 {
		t.Fatalf("VerifyTaken: %+v, %v", v, err)
	}
	out.Reset()
	if code := Main(ctx, "egressnatctl", []string{"conntrack", "--netns", name}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "Every entry of a Gateway policy is translated to its egress IP.") {
		t.Errorf("after VerifyTaken: %d %s\n%s", code, errOut.String(), out.String())
	}
}
