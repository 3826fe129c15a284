package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"sort"
)

// Network is one tenant virtual network (an L2 segment carried over VXLAN).
type Network struct {
	// Name identifies the network in the HostState (unique per HostState).
	Name string
	// VNI is the VXLAN network identifier, 1..16777215, unique per HostState.
	VNI uint32
	// MTU of the tenant segment (bridge, vxlan and taps). 0 means the underlay
	// device's MTU minus the VXLAN overhead (50 bytes for an IPv4 underlay, 70 for IPv6).
	MTU int
	// Gateway, if set, is the network's router on this host (see gateway.go).
	Gateway *Gateway
}

// Gateway is a network's router: a namespace on every host with ports of the network, with the same MAC and
// addresses everywhere, that routes between the network's subnets and, with NAT, masquerades IPv4 to the
// host's uplink. It talks only to the ports of its own host (it never crosses the overlay).
type Gateway struct {
	MAC net.HardwareAddr
	// Addrs are the gateway's addresses with their subnet's length (10.0.0.1/24), at most one per subnet.
	Addrs []netip.Prefix
	NAT   bool
}

// Direction of an ACL rule, seen from the VM.
type Direction uint8

const (
	// In matches frames delivered to the VM (CIDR is the source, ports are destination ports on the VM).
	In Direction = iota + 1
	// Out matches frames sent by the VM (CIDR is the destination, ports are destination ports).
	Out
)

// Protocol of an ACL rule.
type Protocol uint8

const (
	// Any matches every IPv4/IPv6 packet.
	Any Protocol = iota
	TCP
	UDP
	// ICMP matches ICMP for IPv4 and ICMPv6 for IPv6.
	ICMP
)

// Action of an ACL rule.
type Action uint8

const (
	Allow Action = iota + 1
	Deny
)

// ACLRule is one stateless filter rule of a port. Rules are evaluated in order and the
// first match wins; a packet that matches no rule is allowed (end the list with a
// {Protocol: Any, Action: Deny} rule for default-deny). ACLs only look at IPv4/IPv6;
// ARP is governed by the spoofing guard.
type ACLRule struct {
	// ID names the rule's counter; empty means the rule's index in the list. Keep IDs
	// stable across updates so counters survive reordering.
	ID        string
	Direction Direction
	Protocol  Protocol
	// CIDR is the remote side (source for In, destination for Out). The zero Prefix
	// matches any address of both families; otherwise the rule only matches that family.
	CIDR netip.Prefix
	// PortMin..PortMax is the destination port range for TCP/UDP; 0,0 means any.
	PortMin, PortMax uint16
	Action           Action
}

// PortPolicy is the per-port filtering policy.
type PortPolicy struct {
	// SpoofGuard drops frames whose source MAC is not the port's MAC, IPv4/IPv6 packets
	// whose source is not one of the port's IPs (plus the DHCP client's 0.0.0.0, the
	// unspecified IPv6 address for DAD and the port's EUI-64 link-local address),
	// ARP whose sender MAC/IP is not the port's, neighbour advertisements for foreign
	// targets, and 802.1Q/802.1ad tagged frames.
	SpoofGuard bool
	// DHCPGuard drops DHCP server replies (UDP 67→68), DHCPv6 server replies
	// (UDP 547→546) and IPv6 router advertisements sent by the VM.
	DHCPGuard bool
	// Isolated ports exchange frames only with promiscuous ports and with unknown
	// senders behind the uplink (PVLAN-like).
	Isolated bool
	// Promiscuous ports (gateways, service ports) talk to every port, isolated or not.
	Promiscuous bool
	ACL         []ACLRule
	// MirrorTo names another local port (Port.Name) that receives a copy of every frame this port sends and
	// receives (tc mirred); empty for none.
	MirrorTo string
	// MaxBps caps what the VM sends and, separately, what it receives, in bit/s; 0 for no cap.
	MaxBps uint64
	// MinBps is the share of HostState.UplinkBps guaranteed to what the VM sends, in bit/s; 0 for none.
	MinBps uint64
	// Extension puts an external filter in the port's path: the tap is not attached to the bridge; a second
	// tap (ExtensionTap) is, and the filter process moves frames between the two (see extension.go).
	Extension bool
}

// Port is a VM NIC on this host.
type Port struct {
	Network string
	// Name identifies the port (unique per HostState); Counters is keyed by it.
	Name string
	MAC  net.HardwareAddr
	IPs  []netip.Addr
	// Tap is the host-side interface. If it does not exist the plane creates a
	// persistent single-queue tap with that name (and deletes it when the port goes
	// away); an existing interface (e.g. a veth end) is adopted, and only detached
	// from the bridge when the port goes away.
	Tap    string
	Policy PortPolicy
	// Incoming marks a live migration's destination: the tap and its policy are here so that the destination
	// hypervisor can open it, but the port still lives on another host until the switchover, so its MAC may
	// also be a RemotePort's of the same network (whose FDB and neighbour entries keep sending its traffic
	// there). Nothing else differs from a local port: the tap is on the bridge and up, ready for the guest.
	Incoming bool
}

// RemotePort is a port living on another host.
type RemotePort struct {
	Network  string
	MAC      net.HardwareAddr
	IPs      []netip.Addr
	HostVTEP netip.Addr
	// Isolated and Promiscuous carry the remote port's isolation class so that
	// isolation holds across hosts (enforced on the receiving host).
	Isolated    bool
	Promiscuous bool
}

// HostState is the declared desired state of one host's virtual switch.
type HostState struct {
	UnderlayIP  netip.Addr
	UnderlayDev string
	// Uplink is the interface gateways masquerade to (empty: UnderlayDev).
	Uplink string
	// UplinkBps is the capacity shared by what the VMs of ports with MaxBps/MinBps send (0: 10 Gbit/s).
	UplinkBps uint64
	Networks  []Network
	Ports     []Port
	Remote    []RemotePort
}

// Counter is a packet/byte pair.
type Counter struct {
	Packets uint64
	Bytes   uint64
}

// ACLCounter is the counter of one ACL rule.
type ACLCounter struct {
	ID string // the rule's ID, or its index when the ID is empty
	Counter
}

// PortCounters are the policy counters of one port.
type PortCounters struct {
	SpoofDrops     Counter
	DHCPDrops      Counter
	IsolationDrops Counter
	ACL            []ACLCounter
}

const (
	vxlanPort     = 4789
	maxVNI        = 1<<24 - 1
	ifNameMax     = 15
	maxPrefixLen  = 6
	vxlanOverhead = 50 // outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
	vxlanOverhd6  = 70
)

var (
	prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]*$`)
	ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_.\-]+$`)
	tableRE  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	aclIDRE  = regexp.MustCompile(`^[A-Za-z0-9_.:\-]+$`)
)

func bridgeName(prefix string, vni uint32) string { return fmt.Sprintf("%sb%d", prefix, vni) }
func vxlanName(prefix string, vni uint32) string  { return fmt.Sprintf("%sx%d", prefix, vni) }

// aclID returns the counter key of rule i.
func aclID(r ACLRule, i int) string {
	if r.ID != "" {
		return r.ID
	}
	return fmt.Sprint(i)
}

func validMAC(m net.HardwareAddr) error {
	if len(m) != 6 {
		return fmt.Errorf("MAC %q is not a 48-bit Ethernet address", m)
	}
	if m[0]&1 != 0 {
		return fmt.Errorf("MAC %s is multicast", m)
	}
	if m.String() == "00:00:00:00:00:00" {
		return errors.New("MAC is all zeroes")
	}
	return nil
}

func validIfName(n string) error {
	if n == "" || len(n) > ifNameMax || !ifNameRE.MatchString(n) {
		return fmt.Errorf("interface name %q is not a valid Linux interface name (1..15 of [A-Za-z0-9_.-])", n)
	}
	return nil
}

// validate checks s for internal consistency. It does not look at the host.
func (s *HostState) validate(prefix string) error {
	nets := map[string]Network{}
	vnis := map[uint32]string{}
	for _, n := range s.Networks {
		if n.Name == "" {
			return errors.New("network with empty name")
		}
		if _, dup := nets[n.Name]; dup {
			return fmt.Errorf("network %q declared twice", n.Name)
		}
		if n.VNI == 0 || n.VNI > maxVNI {
			return fmt.Errorf("network %q: VNI %d out of range 1..%d", n.Name, n.VNI, maxVNI)
		}
		if o, dup := vnis[n.VNI]; dup {
			return fmt.Errorf("networks %q and %q share VNI %d", o, n.Name, n.VNI)
		}
		if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
			return fmt.Errorf("network %q: MTU %d out of range", n.Name, n.MTU)
		}
		if err := n.Gateway.validate(); err != nil {
			return fmt.Errorf("network %q: gateway: %w", n.Name, err)
		}
		nets[n.Name] = n
		vnis[n.VNI] = n.Name
	}
	if len(s.Networks) > 0 {
		if !s.UnderlayIP.IsValid() || s.UnderlayIP.IsUnspecified() {
			return errors.New("UnderlayIP is required when networks are declared")
		}
		if err := validIfName(s.UnderlayDev); err != nil {
			return fmt.Errorf("UnderlayDev: %w", err)
		}
	}
	if s.Uplink != "" {
		if err := validIfName(s.Uplink); err != nil {
			return fmt.Errorf("Uplink: %w", err)
		}
	}
	ours := func(name string) bool {
		for _, n := range s.Networks {
			switch name {
			case bridgeName(prefix, n.VNI), vxlanName(prefix, n.VNI), gwPortName(prefix, n.VNI), gwWanName(prefix, n.VNI):
				return true
			}
		}
		return name == ifbName(prefix) || len(name) == len(prefix)+9 && name[:len(prefix)+1] == prefix+"e"
	}
	names := map[string]bool{}
	taps := map[string]bool{}
	macs := map[string]string{}   // network/MAC -> owner
	incoming := map[string]bool{} // network/MAC of Incoming ports: one RemotePort may share it
	for _, n := range s.Networks {
		if n.Gateway != nil {
			macs[n.Name+"/"+n.Gateway.MAC.String()] = "the gateway"
		}
	}
	for _, p := range s.Ports {
		if p.Name == "" {
			return errors.New("port with empty name")
		}
		if names[p.Name] {
			return fmt.Errorf("port %q declared twice", p.Name)
		}
		names[p.Name] = true
		if _, ok := nets[p.Network]; !ok {
			return fmt.Errorf("port %q: unknown network %q", p.Name, p.Network)
		}
		if err := validMAC(p.MAC); err != nil {
			return fmt.Errorf("port %q: %w", p.Name, err)
		}
		if err := validIfName(p.Tap); err != nil {
			return fmt.Errorf("port %q: tap: %w", p.Name, err)
		}
		if taps[p.Tap] {
			return fmt.Errorf("port %q: tap %q used by two ports", p.Name, p.Tap)
		}
		if p.Tap == s.UnderlayDev || ours(p.Tap) {
			return fmt.Errorf("port %q: tap %q collides with the underlay or a bridge/vxlan name", p.Name, p.Tap)
		}
		taps[p.Tap] = true
		k := p.Network + "/" + p.MAC.String()
		if o, dup := macs[k]; dup {
			return fmt.Errorf("port %q: MAC %s already used by %s in network %q", p.Name, p.MAC, o, p.Network)
		}
		macs[k] = "port " + p.Name
		if p.Incoming {
			incoming[k] = true
		}
		for _, ip := range p.IPs {
			if !ip.IsValid() || ip.Zone() != "" {
				return fmt.Errorf("port %q: invalid IP %v", p.Name, ip)
			}
		}
		if p.Policy.Isolated && p.Policy.Promiscuous {
			return fmt.Errorf("port %q: a port cannot be both isolated and promiscuous", p.Name)
		}
		if p.Policy.MinBps != 0 && p.Policy.MaxBps != 0 && p.Policy.MinBps > p.Policy.MaxBps {
			return fmt.Errorf("port %q: MinBps %d above MaxBps %d", p.Name, p.Policy.MinBps, p.Policy.MaxBps)
		}
		ids := map[string]bool{}
		for i, r := range p.Policy.ACL {
			if len(r.ID) > 64 || !aclIDRE.MatchString(aclID(r, i)) {
				return fmt.Errorf("port %q: ACL rule %d: ID %q must be 1..64 of [A-Za-z0-9_.:-]", p.Name, i, r.ID)
			}
			if err := r.validate(); err != nil {
				return fmt.Errorf("port %q: ACL rule %d: %w", p.Name, i, err)
			}
			id := aclID(r, i)
			if ids[id] {
				return fmt.Errorf("port %q: ACL rule id %q used twice", p.Name, id)
			}
			ids[id] = true
		}
	}
	for _, p := range s.Ports {
		if m := p.Policy.MirrorTo; m != "" {
			if m == p.Name || !names[m] {
				return fmt.Errorf("port %q: mirror target %q is not another port of this host", p.Name, m)
			}
		}
	}
	for i, r := range s.Remote {
		if _, ok := nets[r.Network]; !ok {
			return fmt.Errorf("remote port %d (%s): unknown network %q", i, r.MAC, r.Network)
		}
		if err := validMAC(r.MAC); err != nil {
			return fmt.Errorf("remote port %d: %w", i, err)
		}
		if !r.HostVTEP.IsValid() || r.HostVTEP.IsUnspecified() || r.HostVTEP.Is4() != s.UnderlayIP.Is4() {
			return fmt.Errorf("remote port %s: HostVTEP %v invalid or not the underlay's family", r.MAC, r.HostVTEP)
		}
		if r.HostVTEP == s.UnderlayIP {
			return fmt.Errorf("remote port %s: HostVTEP is this host's underlay IP", r.MAC)
		}
		if r.Isolated && r.Promiscuous {
			return fmt.Errorf("remote port %s: a port cannot be both isolated and promiscuous", r.MAC)
		}
		k := r.Network + "/" + r.MAC.String()
		if o, dup := macs[k]; dup && !incoming[k] {
			return fmt.Errorf("remote port %s: MAC already used by %s in network %q", r.MAC, o, r.Network)
		}
		delete(incoming, k) // the port's current host; a second remote port with its MAC is a conflict
		macs[k] = "remote port on " + r.HostVTEP.String()
		for _, ip := range r.IPs {
			if !ip.IsValid() || ip.Zone() != "" {
				return fmt.Errorf("remote port %s: invalid IP %v", r.MAC, ip)
			}
		}
	}
	return nil
}

func (g *Gateway) validate() error {
	if g == nil {
		return nil
	}
	if err := validMAC(g.MAC); err != nil {
		return err
	}
	if len(g.Addrs) == 0 {
		return errors.New("no address")
	}
	for i, a := range g.Addrs {
		if !a.IsValid() || a.Addr().Zone() != "" {
			return fmt.Errorf("invalid address %v", a)
		}
		for _, b := range g.Addrs[:i] {
			if a.Masked().Overlaps(b.Masked()) {
				return fmt.Errorf("addresses %v and %v are in overlapping subnets", b, a)
			}
		}
	}
	return nil
}

func (r ACLRule) validate() error {
	if r.Direction != In && r.Direction != Out {
		return errors.New("direction must be In or Out")
	}
	if r.Action != Allow && r.Action != Deny {
		return errors.New("action must be Allow or Deny")
	}
	if r.Protocol > ICMP {
		return fmt.Errorf("unknown protocol %d", r.Protocol)
	}
	if r.CIDR.IsValid() && r.CIDR != r.CIDR.Masked() {
		return fmt.Errorf("CIDR %v has host bits set", r.CIDR)
	}
	if r.PortMin != 0 || r.PortMax != 0 {
		if r.Protocol != TCP && r.Protocol != UDP {
			return errors.New("port range needs protocol TCP or UDP")
		}
		if r.PortMin > r.PortMax {
			return fmt.Errorf("port range %d-%d is empty", r.PortMin, r.PortMax)
		}
	}
	return nil
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
