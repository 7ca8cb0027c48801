package ctl

import (
	"encoding/json"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return netip.Addr{}, err
	}
	a = a.Unmap()
	if !a.Is4() {
		return netip.Addr{}, fmt.Errorf("%s is not an IPv4 address", s)
	}
	return a, nil
}

// ruleCounter returns the packets and bytes of a rule's counter.
func ruleCounter(r *nftables.Rule) (packets, bytes uint64) {
	for _, e := range r.Exprs {
		if c, ok := e.(*expr.Counter); ok {
			packets += c.Packets
			bytes += c.Bytes
		}
	}
	return packets, bytes
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// closeFd closes a namespace file descriptor opened read-only: there is
// nothing to flush, so a failed close loses nothing and is not reported.
func closeFd(fd int) { _ = unix.Close(fd) }
