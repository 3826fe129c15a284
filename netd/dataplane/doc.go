// Package dataplane programs one host's virtual switch from a declared state.
//
// A HostState lists the tenant networks present on the host, the local ports (VM
// NICs) and the ports living on other hosts. Plane.Apply converges the host (or a
// network namespace) to that state: a Linux bridge and a VXLAN device per network,
// a tap per port, static FDB and neighbour entries for remote ports (no flood and
// learn), and per-port policy (spoofing guard, DHCP guard, ACLs, isolation) in one
// nftables table of the bridge family, changed in single transactions; a gateway namespace
// per network that asks for one (routing between subnets, NAT to the uplink); port
// mirroring and bandwidth limits and guarantees with tc; and the bridge side of extension
// ports (an external filter between the VM's tap and the bridge). Everything is programmed
// through netlink and nftables; nothing shells out.
//
// It depends only on the netlink, netns and nftables libraries: no Basalt package, so that netd's control
// plane (which builds HostState from etcd) sits above it and it can be tested alone in namespaces.
//
// See docs/netd.md for the design, the names and the table layout.
package dataplane
