// Package lab builds a small bare-metal Kubernetes-like network out of Linux
// network namespaces on the local machine, for real-kernel tests of
// egressnat. It needs root; [NewT] skips the test otherwise.
//
// Nothing is ever changed in the root network namespace: every link is
// created inside its target namespace (veth pairs are created with their
// peer directly in the other namespace), and sysctls and iptables rules are
// applied through "ip netns exec". Every namespace is named with a prefix
// (default "enat-"; give each test package its own, e.g. "enat-e2e-").
// Links live only inside these namespaces and so carry short fixed names.
// [Lab.Close] kills every process the lab started (and any other process
// left inside its namespaces) and deletes every namespace it created. A lab
// holds an flock on /run/egressnat-lab/<prefix>.lock while it lives and
// records in that file each namespace before creating it, so two labs with
// one prefix cannot run at once, and after a crash [New] or [CleanupStale]
// with the same prefix removes exactly the namespaces (and their processes)
// that the crashed lab left, never a live lab's nor another tool's.
//
// # Address plan
//
//	               203.0.113.10/24          198.51.100.10/24
//	              [<p>x-ext1] eth0          [<p>x-ext2] eth0   echo servers
//	                    |                          |
//	                 x0 203.0.113.1/24       x1 198.51.100.1/24
//	                    +-------[<p>rtr]-----------+      no pod routes,
//	                          eth0 192.0.2.1/24           no NAT
//	                             |
//	                            rtr
//	[<p>sw] br0  ---------------+----------------+-----------------+
//	           n0               n1                n2
//	            |                |                 |
//	       eth0 192.0.2.11   eth0 192.0.2.12   eth0 192.0.2.13   (uplinks)
//	       [<p>cp1]          [<p>worker1]      [<p>worker2]      nodes
//	       pods 10.244.0/24  pods 10.244.1/24  pods 10.244.2/24
//	         |                 |
//	       vpN 10.244.i.1/32 (pod gateway on every host-side veth)
//	         |
//	       [<p>p-<pod>] eth0 10.244.i.N/32, default via 10.244.i.1
//
// In detail:
//
//   - nodes: 192.0.2.11, .12, .13 … /24 (node i gets 192.0.2.(11+i)), default
//     route via the router 192.0.2.1, ip_forward=1, rp_filter=2 (loose),
//     pod CIDR 10.244.i.0/24, host-gw routes "10.244.j.0/24 via <node j>"
//     for every other node, and the CNI-style masquerade
//     "iptables-nft -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE".
//     192.0.2.100-192.0.2.199 are free for floating IPs.
//   - router: 192.0.2.1/24 on the switch, .1 of every external /24. It has
//     no route to 10.244.0.0/16 (like a real upstream router) and does no
//     NAT: a pod source that leaks past its node is dropped there.
//   - external servers (default ext1 203.0.113.10, ext2 198.51.100.10) run
//     the echo server (package echoserver): TCP port 8080 answers every line
//     with "<src-ip>:<src-port>\n", UDP port 8080 answers every datagram with
//     "<src-ip>:<src-port>", and TCP port 8081 is a control port ("icmp
//     <id>" tells the source of the echo request sent by [Ping] with that
//     id; "icmpid <n>" the source of the last echo request with ICMP id n).
//     The kernel answers pings itself.
//   - pods: namespace <prefix>p-<name>, eth0 with the next free 10.244.i.N/32,
//     host-side veth vpN on the node with the node's pod gateway 10.244.i.1/32
//     and a /32 route to the pod.
//
// That is the default pod network. [Config] selects others (see
// [Config.ModeName]): PodNetwork "overlay" is flannel-style VXLAN (bridge
// cni0 with 10.244.i.1/24 holding the pods' veths, pods 10.244.i.N/24,
// flannel.1 with static routes, neighbours and FDB entries for the other
// nodes, no pod route via eth0); UplinkMTU and PodMTU set the MTUs of the
// node segment and of the pods; RPFilter makes the nodes' rp_filter strict
// or off; Masquerade picks the CNI's masquerade: the rule above with
// iptables-nft (default) or iptables-legacy, a native nftables table
// "ip lab-cni", or none.
//
// Helpers such as [DialTCP], [ListenTCP], [UDPExchange] and [Ping] create a
// socket inside a namespace from a single locked OS thread ([Do]); the
// socket stays in that namespace while the rest of the test process stays
// in the root namespace. [Lab.ServeLoopback] relays a 127.0.0.1 port of the
// root namespace into a lab namespace (e.g. for kubectl and an API server
// running on a node).
//
// [Lab.AddSwitchHost] attaches an extra host (<prefix>h-<name>) with any
// number of node-subnet addresses to the switch, e.g. to answer for Node
// objects that run no agent. [Lab.StartNsenter] starts a process that
// enters only the network namespace (nsenter --net), as a hostNetwork
// component such as kube-proxy expects.
package lab
