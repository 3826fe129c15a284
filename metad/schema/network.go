package schema

import (
	"fmt"
	"net/netip"
	"strings"
)

// Virtual networks (docs/netd.md). Records are Network and Port messages; the claim keys below exist so that
// uniqueness (of VNIs, MACs, IPs and taps) is enforced by etcd transactions comparing their CreateRevision
// with 0, never by a read followed by a write. A claim's value is the name of its owner.

// NetworksPrefix holds one Network record per virtual network, keyed by name.
const NetworksPrefix = Root + "networks/"

// PortsPrefix holds one Port record per port, keyed "<network>/<port>".
const PortsPrefix = Root + "ports/"

// NetClaimsPrefix holds the uniqueness claims of networks and ports.
const NetClaimsPrefix = Root + "netclaims/"

// VNIClaimsPrefix holds one claim per VNI in use, keyed by the VNI in decimal; the value is the network name.
const VNIClaimsPrefix = NetClaimsPrefix + "vni/"

// TapClaimsPrefix holds one claim per port tap name (cluster-wide: ports move between hosts); the value is
// "<network>/<port>".
const TapClaimsPrefix = NetClaimsPrefix + "tap/"

// NetdHostsPrefix holds one NetdHost record per netd, keyed by node ID: the host's underlay (VTEP) address.
const NetdHostsPrefix = Root + "netd/hosts/"

// NetworkKey is the key of a network's record.
func NetworkKey(name string) string { return NetworksPrefix + name }

// NetworkPortsPrefix is the prefix of a network's ports.
func NetworkPortsPrefix(network string) string { return PortsPrefix + network + "/" }

// PortKey is the key of a port's record.
func PortKey(network, port string) string { return PortsPrefix + network + "/" + port }

// PortFromKey splits a port key into network and port names.
func PortFromKey(key string) (network, port string, ok bool) {
	return strings.Cut(strings.TrimPrefix(key, PortsPrefix), "/")
}

// VNIClaimKey is the key claiming a VNI.
func VNIClaimKey(vni uint32) string { return fmt.Sprintf("%s%d", VNIClaimsPrefix, vni) }

// MACClaimPrefix is the prefix of the MAC claims of one network.
func MACClaimPrefix(network string) string { return NetClaimsPrefix + "mac/" + network + "/" }

// MACClaimKey is the key claiming a MAC (canonical lower-case "aa:bb:cc:dd:ee:ff") in a network; the value is
// the port name.
func MACClaimKey(network, mac string) string { return MACClaimPrefix(network) + mac }

// IPClaimPrefix is the prefix of the IP claims of one network.
func IPClaimPrefix(network string) string { return NetClaimsPrefix + "ip/" + network + "/" }

// IPClaimKey is the key claiming an address in a network; the value is the port name (or "gateway"). The
// address is written in its canonical form (netip.Addr.String).
func IPClaimKey(network string, ip netip.Addr) string { return IPClaimPrefix(network) + ip.String() }

// TapClaimKey is the key claiming a tap name.
func TapClaimKey(tap string) string { return TapClaimsPrefix + tap }

// NetdHostKey is the key of a netd's host record.
func NetdHostKey(node string) string { return NetdHostsPrefix + node }
