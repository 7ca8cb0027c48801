// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// egressnat's pod classifier: a tc program on the pod-facing side of a
// node (each pod's host-side veth, or the ports of the CNI bridge) that
// looks the source address of every IPv4 packet up in the map `pods`
// (pod IP -> class) and writes the class into the packet's mark under the
// class's mask, before routing. nftables does the rest (destination sets,
// the null binding, gateway SNAT): it dispatches on the mark instead of
// one set element per pod. Nothing else is done here: the packet always
// goes on (TC_ACT_UNSPEC: the next program, or the default action).
//
// Built by `make generate` (bpf2go, clang -target bpf); the object is
// checked in next to the Go code bpf2go writes.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#define SEC(name) __attribute__((section(name), used))
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define be16(x) __builtin_bswap16(x)
#else
#define be16(x) (x)
#endif
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// The helper, by its number (linux/bpf.h: BPF_FUNC_map_lookup_elem).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;

// One pod's class: mark is written into the packet's mark under mask
// (bits outside mask are kept).
struct class {
	__u32 mark;
	__u32 mask;
};

// Keys are IPv4 addresses as they are in the packet (network order).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__type(key, __u32);
	__type(value, struct class);
} pods SEC(".maps");

SEC("tc")
int classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct class *c;
	__u32 src;

	if ((void *)(eth + 1) > end || eth->h_proto != be16(ETH_P_IP))
		return TC_ACT_UNSPEC;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_UNSPEC;
	src = ip->saddr;
	c = bpf_map_lookup_elem(&pods, &src);
	if (!c)
		return TC_ACT_UNSPEC;
	skb->mark = (skb->mark & ~c->mask) | (c->mark & c->mask);
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual MIT/GPL";
