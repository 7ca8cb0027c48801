// Package gateway is the operator's pure decision logic: which node holds
// which floating IP of the NetworkGatewayGroups, whether a node is Up, the
// status a group reports, how an EgressNATPolicy's gatewayRef resolves (by
// selector.Decide, with the groups judged by selector.CheckGroups: the
// rules the agents apply too) and which policies overlap (Overlaps).
//
// Nothing here talks to the API server or the kernel; every function is
// deterministic and its output depends only on its arguments.
package gateway
