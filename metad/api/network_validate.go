package api

import (
	"crypto/rand"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"regexp"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
)

// Limits of the network API. They keep records small (one etcd value) and the per-host rulesets bounded.
const (
	MaxVNI         = 1<<24 - 1
	MaxSubnets     = 16
	MaxPortIPs     = 16
	MaxACLRules    = 256
	minMTU, maxMTU = 576, 9216
	// minBandwidth is the smallest bandwidth setting: below a few kbit/s the kernel's shaper rounds to nothing.
	minBandwidth = 8_000
)

var (
	tapRE    = regexp.MustCompile(`^[A-Za-z0-9_.\-]{1,15}$`)
	aclIDRE  = regexp.MustCompile(`^[A-Za-z0-9_.:\-]{1,64}$`)
	extNameR = regexp.MustCompile(`^[a-z0-9][a-z0-9_\-]{0,31}$`)
)

// GatewayMAC is the MAC of a network's gateway on every host: locally administered, 02:62:67 ("bg") followed
// by the VNI, so it never collides with the 52:54:00 addresses assigned to ports.
func GatewayMAC(vni uint32) string {
	return fmt.Sprintf("02:62:67:%02x:%02x:%02x", byte(vni>>16), byte(vni>>8), byte(vni))
}

// DefaultTap is the tap name of a port created without one: "bt" and 8 hex digits of a hash of its network
// and name. It is stable, so a port keeps its tap when it moves between hosts.
func DefaultTap(network, port string) string {
	h := fnv.New32a()
	h.Write([]byte(network + "/" + port))
	return fmt.Sprintf("bt%08x", h.Sum32())
}

// randomMAC returns a random address in QEMU's 52:54:00 range.
func randomMAC() (string, error) {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random MAC: %w", err)
	}
	return net.HardwareAddr{0x52, 0x54, 0x00, b[0], b[1], b[2]}.String(), nil
}

// netSpec is a validated network.
type netSpec struct {
	subnets []netip.Prefix
	gateway []netip.Addr
}

// validateNetwork checks a network on create and fills in defaults (gateway addresses and MAC). It does not
// assign the VNI.
func validateNetwork(n *basaltv1.Network) (*netSpec, error) {
	if err := schema.ValidateName("network", n.GetName()); err != nil {
		return nil, err
	}
	if err := schema.ValidateName("tenant", n.GetTenant()); err != nil {
		return nil, fmt.Errorf("%w (every network belongs to a tenant: pass one)", err)
	}
	if n.GetVni() > MaxVNI {
		return nil, fmt.Errorf("VNI %d is out of range 1..%d (0 picks a free one)", n.GetVni(), MaxVNI)
	}
	if m := n.GetMtu(); m != 0 && (m < minMTU || m > maxMTU) {
		return nil, fmt.Errorf("MTU %d is out of range %d..%d (0: the underlay's MTU minus the VXLAN overhead)", m, minMTU, maxMTU)
	}
	if len(n.GetSubnets()) > MaxSubnets {
		return nil, fmt.Errorf("%d subnets: at most %d", len(n.GetSubnets()), MaxSubnets)
	}
	spec := &netSpec{}
	for i, s := range n.GetSubnets() {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("subnet %q is not a CIDR prefix such as 10.0.0.0/24", s)
		}
		if p.Addr().Zone() != "" || p.Addr().Is4In6() {
			return nil, fmt.Errorf("subnet %q: write IPv4 subnets in dotted form, without zone", s)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("subnet %q has host bits set: did you mean %s?", s, p.Masked())
		}
		if p.Addr().Is4() && p.Bits() > 30 || p.Addr().Is6() && p.Bits() > 126 {
			return nil, fmt.Errorf("subnet %q is too small to hold ports (at most /30 for IPv4, /126 for IPv6)", s)
		}
		if m := n.GetMtu(); m != 0 && m < 1280 && p.Addr().Is6() {
			return nil, fmt.Errorf("MTU %d is too small for IPv6 subnet %s (at least 1280)", m, s)
		}
		for _, q := range spec.subnets {
			if p.Overlaps(q) {
				return nil, fmt.Errorf("subnets %s and %s overlap", q, p)
			}
		}
		spec.subnets = append(spec.subnets, p)
		n.Subnets[i] = p.String()
	}
	if gw := n.GetGateway(); gw != nil {
		if len(spec.subnets) == 0 {
			return nil, fmt.Errorf("a gateway needs at least one subnet to route")
		}
		if len(gw.GetAddresses()) == 0 {
			for _, p := range spec.subnets {
				gw.Addresses = append(gw.Addresses, p.Addr().Next().String())
			}
		}
		used := map[netip.Prefix]netip.Addr{}
		for i, s := range gw.GetAddresses() {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("gateway address %q is not an IP address", s)
			}
			p, err := hostAddrIn(a, spec.subnets)
			if err != nil {
				return nil, fmt.Errorf("gateway address %s: %w", s, err)
			}
			if o, dup := used[p]; dup {
				return nil, fmt.Errorf("gateway addresses %s and %s are in the same subnet %s: one per subnet", o, a, p)
			}
			used[p] = a
			spec.gateway = append(spec.gateway, a)
			gw.Addresses[i] = a.String()
		}
		gw.Mac = "" // set once the VNI is known
	}
	return spec, nil
}

// hostAddrIn returns the subnet holding a, refusing addresses outside every subnet and the subnet's own
// network (and, for IPv4, broadcast) address.
func hostAddrIn(a netip.Addr, subnets []netip.Prefix) (netip.Prefix, error) {
	if a.Zone() != "" || a.Is4In6() {
		return netip.Prefix{}, fmt.Errorf("write IPv4 addresses in dotted form, without zone")
	}
	for _, p := range subnets {
		if !p.Contains(a) {
			continue
		}
		if a == p.Addr() {
			return p, fmt.Errorf("is the network address of subnet %s", p)
		}
		if a.Is4() && a == lastAddr(p) {
			return p, fmt.Errorf("is the broadcast address of subnet %s", p)
		}
		return p, nil
	}
	return netip.Prefix{}, fmt.Errorf("is in none of the network's subnets %v", subnets)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// portSpec is a validated port: canonical addresses, ready for the claim keys.
type portSpec struct {
	mac string
	ips []netip.Addr
}

// validatePort checks a port against its network and canonicalises it in place. The MAC may be empty (the
// caller assigns one); on update the caller has checked it is unchanged.
func validatePort(p *basaltv1.Port, nw *basaltv1.Network) (*portSpec, error) {
	if err := schema.ValidateName("port", p.GetName()); err != nil {
		return nil, err
	}
	spec := &portSpec{}
	if p.GetMac() != "" {
		m, err := net.ParseMAC(p.GetMac())
		if err != nil || len(m) != 6 {
			return nil, fmt.Errorf("MAC %q is not an Ethernet address such as 52:54:00:12:34:56", p.GetMac())
		}
		switch {
		case m[0]&1 != 0:
			return nil, fmt.Errorf("MAC %s is a multicast address", m)
		case m.String() == "00:00:00:00:00:00":
			return nil, fmt.Errorf("MAC 00:00:00:00:00:00 is not a usable address")
		case nw.GetGateway() != nil && m.String() == nw.GetGateway().GetMac():
			return nil, fmt.Errorf("MAC %s is the gateway's", m)
		}
		spec.mac = m.String()
		p.Mac = spec.mac
	}
	subnets := make([]netip.Prefix, 0, len(nw.GetSubnets()))
	for _, s := range nw.GetSubnets() {
		if q, err := netip.ParsePrefix(s); err == nil {
			subnets = append(subnets, q)
		}
	}
	if len(p.GetIps()) > MaxPortIPs {
		return nil, fmt.Errorf("%d addresses: at most %d per port", len(p.GetIps()), MaxPortIPs)
	}
	seen := map[netip.Addr]bool{}
	for i, s := range p.GetIps() {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("address %q is not an IP address (give addresses without prefix length)", s)
		}
		if a.Zone() != "" || a.Is4In6() || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
			return nil, fmt.Errorf("address %s cannot be a port's address", s)
		}
		if len(subnets) > 0 {
			if _, err := hostAddrIn(a, subnets); err != nil {
				return nil, fmt.Errorf("address %s %v", a, err)
			}
		}
		if seen[a] {
			return nil, fmt.Errorf("address %s given twice", a)
		}
		seen[a] = true
		spec.ips = append(spec.ips, a)
		p.Ips[i] = a.String()
	}
	if h := p.GetHost(); h != "" {
		if err := schema.ValidateName("host (node ID)", h); err != nil {
			return nil, err
		}
	}
	if t := p.GetTap(); t != "" && !tapRE.MatchString(t) {
		return nil, fmt.Errorf("tap %q is not a Linux interface name (1 to 15 of A-Z a-z 0-9 _ . -)", t)
	}
	if p.Policy == nil {
		p.Policy = &basaltv1.PortPolicy{}
	}
	if err := validatePolicy(p.Policy, p.GetName()); err != nil {
		return nil, err
	}
	return spec, nil
}

// validatePolicy checks a port policy and fills in the defaults (both guards on).
func validatePolicy(pol *basaltv1.PortPolicy, self string) error {
	if pol.SpoofGuard == nil {
		pol.SpoofGuard = ptr(true)
	}
	if pol.DhcpGuard == nil {
		pol.DhcpGuard = ptr(true)
	}
	if pol.GetIsolated() && pol.GetPromiscuous() {
		return fmt.Errorf("a port cannot be both isolated and promiscuous")
	}
	if m := pol.GetMirrorTo(); m != "" {
		if err := schema.ValidateName("mirror port", m); err != nil {
			return err
		}
		if m == self {
			return fmt.Errorf("a port cannot mirror to itself")
		}
	}
	lo, hi := pol.GetBandwidthMinBps(), pol.GetBandwidthMaxBps()
	if lo != 0 && lo < minBandwidth || hi != 0 && hi < minBandwidth {
		return fmt.Errorf("bandwidth settings below %d bit/s are not supported", minBandwidth)
	}
	if lo != 0 && hi != 0 && lo > hi {
		return fmt.Errorf("minimum bandwidth %d bit/s is above the maximum %d bit/s", lo, hi)
	}
	if e := pol.GetExtension(); e != "" && !extNameR.MatchString(e) {
		return fmt.Errorf("extension name %q: 1 to 32 of a-z 0-9 _ -, starting with a letter or digit", e)
	}
	return validateACL(pol.GetAcl())
}

func ptr[T any](v T) *T { return &v }

// validateACL checks ACL rules and canonicalises their CIDRs; every error names the rule.
func validateACL(rules []*basaltv1.AclRule) error {
	if len(rules) > MaxACLRules {
		return fmt.Errorf("%d ACL rules: at most %d per port", len(rules), MaxACLRules)
	}
	ids := map[string]int{}
	for i, r := range rules {
		what := fmt.Sprintf("ACL rule %d", i)
		id := r.GetId()
		if id != "" {
			what = fmt.Sprintf("ACL rule %d (%s)", i, id)
		} else {
			id = fmt.Sprint(i)
		}
		if !aclIDRE.MatchString(id) {
			return fmt.Errorf("%s: ID %q must be 1 to 64 of A-Z a-z 0-9 _ . : -", what, r.GetId())
		}
		if j, dup := ids[id]; dup {
			if r.GetId() == "" {
				return fmt.Errorf("%s: its default ID %q (its position) is already used by rule %d: give one of them another ID", what, id, j)
			}
			return fmt.Errorf("%s: ID %q is already used by rule %d", what, id, j)
		}
		ids[id] = i
		if _, ok := basaltv1.AclDirection_name[int32(r.GetDirection())]; !ok || r.GetDirection() == basaltv1.AclDirection_ACL_DIRECTION_UNSPECIFIED {
			return fmt.Errorf("%s: direction must be in or out", what)
		}
		if _, ok := basaltv1.AclAction_name[int32(r.GetAction())]; !ok || r.GetAction() == basaltv1.AclAction_ACL_ACTION_UNSPECIFIED {
			return fmt.Errorf("%s: action must be allow or deny", what)
		}
		if _, ok := basaltv1.AclProtocol_name[int32(r.GetProtocol())]; !ok {
			return fmt.Errorf("%s: unknown protocol %d", what, r.GetProtocol())
		}
		if c := r.GetCidr(); c != "" {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				a, aerr := netip.ParseAddr(c)
				if aerr != nil {
					return fmt.Errorf("%s: %q is not a CIDR prefix or address", what, c)
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			if p.Addr().Zone() != "" || p.Addr().Is4In6() {
				return fmt.Errorf("%s: write IPv4 prefixes in dotted form, without zone", what)
			}
			if p != p.Masked() {
				return fmt.Errorf("%s: %s has host bits set: did you mean %s?", what, c, p.Masked())
			}
			r.Cidr = p.String()
		}
		lo, hi := r.GetPortMin(), r.GetPortMax()
		if lo != 0 || hi != 0 {
			if r.GetProtocol() != basaltv1.AclProtocol_ACL_PROTOCOL_TCP && r.GetProtocol() != basaltv1.AclProtocol_ACL_PROTOCOL_UDP {
				return fmt.Errorf("%s: ports need protocol tcp or udp", what)
			}
			if hi > 65535 || lo > hi || lo == 0 {
				return fmt.Errorf("%s: port range %d-%d: want 1 <= min <= max <= 65535", what, lo, hi)
			}
		}
	}
	return nil
}
