package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Update writes the entries of put (a batch where the kernel has batch
// operations), then deletes the entries del names (absent ones are
// skipped): the caller knows what the map holds (nft's Dataplane keeps it)
// and sends only the changes, so one pod's change costs one map write.
func (c *Classifier) Update(put map[netip.Addr]Class, del []netip.Addr) error {
	keys := make([]uint32, 0, len(put))
	vals := make([]classifierClass, 0, len(put))
	for ip, cl := range put {
		k, err := key(ip)
		if err != nil {
			return err
		}
		keys = append(keys, k)
		vals = append(vals, classifierClass{Mark: cl.Mark, Mask: cl.Mask})
	}
	switch {
	case len(keys) == 1:
		if err := c.objs.Pods.Put(keys[0], vals[0]); err != nil {
			return fmt.Errorf("write pods map: %w", err)
		}
	case len(keys) > 1:
		if _, err := c.objs.Pods.BatchUpdate(keys, vals, nil); err != nil {
			if !errors.Is(err, ebpf.ErrNotSupported) {
				return fmt.Errorf("write pods map: %w", err)
			}
			for i := range keys {
				if err := c.objs.Pods.Put(keys[i], vals[i]); err != nil {
					return fmt.Errorf("write pods map: %w", err)
				}
			}
		}
	}
	for _, ip := range del {
		k, err := key(ip)
		if err != nil {
			return err
		}
		if err := c.objs.Pods.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from pods map: %w", err)
		}
	}
	return nil
}
