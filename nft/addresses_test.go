package nft

import (
	"bytes"
	"encoding/hex"
	"net"
	"net/netip"
	"testing"
	"time"
)

var (
	testOurMAC   = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	testOtherMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
)

func TestARPFrames(t *testing.T) {
	ip := netip.MustParseAddr("192.0.2.100")
	for _, tc := range []struct {
		name  string
		frame []byte
		want  string
	}{
		{"garp", garpFrame(testOurMAC, ip),
			"ffffffffffff" + "020000000001" + "0806" + "0001" + "0800" + "06" + "04" + "0001" +
				"020000000001" + "c0000264" + "000000000000" + "c0000264"},
		{"probe", probeFrame(testOurMAC, ip),
			"ffffffffffff" + "020000000001" + "0806" + "0001" + "0800" + "06" + "04" + "0001" +
				"020000000001" + "00000000" + "000000000000" + "c0000264"},
	} {
		if got := hex.EncodeToString(tc.frame); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
		p, ok := parseARP(tc.frame)
		if !ok || p.op != arpRequest || !bytes.Equal(p.senderHW, testOurMAC) || p.targetIP != ip {
			t.Errorf("%s: parsed %+v %v", tc.name, p, ok)
		}
	}
	p, _ := parseARP(probeFrame(testOurMAC, ip))
	if !p.senderIP.IsUnspecified() {
		t.Errorf("probe sender ip %s, want 0.0.0.0", p.senderIP)
	}
	// Padding to the ethernet minimum (60 bytes) is accepted.
	padded := append(garpFrame(testOurMAC, ip), make([]byte, 18)...)
	if p, ok := parseARP(padded); !ok || p.senderIP != ip {
		t.Errorf("padded frame: %+v %v", p, ok)
	}
}

// arpReplyFrame builds a reply from mac for ip to ours, as Linux answers a
// probe (target IP 0.0.0.0).
func arpReplyFrame(from net.HardwareAddr, ip netip.Addr, to net.HardwareAddr) []byte {
	f := arpFrame(from, ip, netip.IPv4Unspecified())
	copy(f[0:6], to)
	f[21] = arpReply
	copy(f[32:38], to)
	return f
}

func TestProbeConflict(t *testing.T) {
	ip := netip.MustParseAddr("192.0.2.100")
	other := netip.MustParseAddr("192.0.2.101")
	probing := map[netip.Addr]bool{ip: true}
	notARP := garpFrame(testOtherMAC, ip)
	notARP[12], notARP[13] = 0x08, 0x00
	ipv6ARP := garpFrame(testOtherMAC, ip)
	ipv6ARP[16], ipv6ARP[17] = 0x86, 0xdd
	badOp := garpFrame(testOtherMAC, ip)
	badOp[21] = 3
	// Another host's frame that carries our MAC as sender (a looped-back
	// copy of ours): not a conflict.
	echo := garpFrame(testOurMAC, ip)
	copy(echo[6:12], testOtherMAC)
	for _, tc := range []struct {
		name     string
		frame    []byte
		conflict bool
	}{
		{"reply from the holder", arpReplyFrame(testOtherMAC, ip, testOurMAC), true},
		{"gratuitous arp from another host", garpFrame(testOtherMAC, ip), true},
		{"request from the holder", arpFrame(testOtherMAC, ip, netip.MustParseAddr("192.0.2.1")), true},
		{"another host probes the same ip", probeFrame(testOtherMAC, ip), true},
		{"another host probes another ip", probeFrame(testOtherMAC, other), false},
		{"someone asks who has the ip", arpFrame(testOtherMAC, other, ip), false},
		{"reply for another ip", arpReplyFrame(testOtherMAC, other, testOurMAC), false},
		{"our own probe", probeFrame(testOurMAC, ip), false},
		{"our own gratuitous arp", garpFrame(testOurMAC, ip), false},
		{"our sender mac", echo, false},
		{"not arp", notARP, false},
		{"arp for another protocol", ipv6ARP, false},
		{"unknown operation", badOp, false},
		{"truncated", garpFrame(testOtherMAC, ip)[:41], false},
	} {
		got, mac, ok := probeConflict(tc.frame, testOurMAC, probing)
		if ok != tc.conflict {
			t.Errorf("%s: conflict %v, want %v", tc.name, ok, tc.conflict)
			continue
		}
		if ok && (got != ip || !bytes.Equal(mac, testOtherMAC)) {
			t.Errorf("%s: conflict on %s from %s", tc.name, got, mac)
		}
	}
}

func TestGARPScheduleDefaults(t *testing.T) {
	if GratuitousARPs() != len(garpSchedule) || GratuitousARPs() < 3 {
		t.Fatalf("GratuitousARPs() = %d, schedule %v", GratuitousARPs(), garpSchedule)
	}
	if garpSchedule[0] != 0 {
		t.Fatalf("the first announcement must go at once: %v", garpSchedule)
	}
	for i := 1; i < len(garpSchedule); i++ {
		gap := garpSchedule[i] - garpSchedule[i-1]
		if gap <= 0 || i > 1 && gap < garpSchedule[i-1]-garpSchedule[i-2] {
			t.Fatalf("intervals must grow: %v", garpSchedule)
		}
	}
	if last := garpSchedule[len(garpSchedule)-1]; last < 3*time.Second || last > 10*time.Second {
		t.Fatalf("announcements last %v, want about 5 s", last)
	}
	cfg, err := Config{Uplink: "eth0"}.withDefaults()
	if err != nil || cfg.ARPProbeWait != DefaultARPProbeWait {
		t.Fatalf("default probe wait %v %v", cfg.ARPProbeWait, err)
	}
	cfg, _ = Config{Uplink: "eth0", ARPProbeWait: -1}.withDefaults()
	if cfg.ARPProbeWait >= 0 {
		t.Fatalf("a negative probe wait (disabled) became %v", cfg.ARPProbeWait)
	}
}
