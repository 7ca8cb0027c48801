package nft

import (
	"fmt"
	"runtime"

	"github.com/google/nftables"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// InNetNS runs fn on an OS thread inside the network namespace fd (below
// 1: the current one), for what reads or changes the calling thread's
// namespace.
func InNetNS(fd int, fn func() error) error { return Config{NetNSFd: fd}.inNetNS(fn) }

// inNetNS runs fn on an OS thread that has entered the configured network
// namespace (or directly, for the current namespace). Sockets created in fn
// stay in that namespace; files under /proc/sys/net opened in fn belong to it.
func (cfg Config) inNetNS(fn func() error) error {
	if cfg.inCurrentNetNS() {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get netns: %w", err)
	}
	if err := netns.Set(netns.NsHandle(cfg.NetNSFd)); err != nil {
		_ = orig.Close()
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime terminates it when the
			// goroutine exits, so no other goroutine runs in the wrong
			// namespace.
			_ = orig.Close()
			return
		}
		_ = orig.Close()
		runtime.UnlockOSThread()
	}()
	return fn()
}

func (cfg Config) netlinkHandle() (*netlink.Handle, error) {
	if cfg.inCurrentNetNS() {
		return netlink.NewHandle()
	}
	return netlink.NewHandleAt(netns.NsHandle(cfg.NetNSFd))
}

// nftSocketBuffer is the send and receive buffer asked for on nftables
// sockets, so that a chain rebuild with many policies (one message, and one
// acknowledgement, per rule) fits in one transaction. It needs CAP_NET_ADMIN
// (SO_SNDBUFFORCE, SO_RCVBUFFORCE); without it the defaults stay.
const nftSocketBuffer = 8 << 20

func forceBuffers(c *mdnetlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, nftSocketBuffer)
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, nftSocketBuffer)
	})
	return nil
}

func (cfg Config) nftConn() (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(forceBuffers)}
	if !cfg.inCurrentNetNS() {
		opts = append(opts, nftables.WithNetNSFd(cfg.NetNSFd))
	}
	return nftables.New(opts...)
}
