package agent

import (
	"fmt"
	"net"
	"net/netip"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/netd/dataplane"
)

// The API validated every record; these conversions still check what they parse, so that a record written
// by something else never takes the whole host down (the port is left out and reported instead).

func parseIPs(ss []string) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(ss))
	for _, s := range ss {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("bad address %q", s)
		}
		out = append(out, a)
	}
	return out, nil
}

func localPort(p *basaltv1.Port) (dataplane.Port, error) {
	mac, err := net.ParseMAC(p.GetMac())
	if err != nil {
		return dataplane.Port{}, fmt.Errorf("bad MAC %q", p.GetMac())
	}
	ips, err := parseIPs(p.GetIps())
	if err != nil {
		return dataplane.Port{}, err
	}
	pol := p.GetPolicy()
	dp := dataplane.Port{
		Network: p.GetNetwork(),
		Name:    portName(p.GetNetwork(), p.GetName()),
		MAC:     mac,
		IPs:     ips,
		Tap:     p.GetTap(),
		Policy: dataplane.PortPolicy{
			// Unset means on: the API fills the guards in, but a record written otherwise stays safe.
			SpoofGuard:  pol.SpoofGuard == nil || pol.GetSpoofGuard(),
			DHCPGuard:   pol.DhcpGuard == nil || pol.GetDhcpGuard(),
			Isolated:    pol.GetIsolated(),
			Promiscuous: pol.GetPromiscuous(),
			MaxBps:      pol.GetBandwidthMaxBps(),
			MinBps:      pol.GetBandwidthMinBps(),
		},
	}
	if m := pol.GetMirrorTo(); m != "" {
		dp.Policy.MirrorTo = portName(p.GetNetwork(), m)
	}
	for i, r := range pol.GetAcl() {
		ar, err := aclRule(r)
		if err != nil {
			return dataplane.Port{}, fmt.Errorf("ACL rule %d: %w", i, err)
		}
		dp.Policy.ACL = append(dp.Policy.ACL, ar)
	}
	return dp, nil
}

func aclRule(r *basaltv1.AclRule) (dataplane.ACLRule, error) {
	out := dataplane.ACLRule{ID: r.GetId(), PortMin: uint16(r.GetPortMin()), PortMax: uint16(r.GetPortMax())}
	switch r.GetDirection() {
	case basaltv1.AclDirection_ACL_DIRECTION_IN:
		out.Direction = dataplane.In
	case basaltv1.AclDirection_ACL_DIRECTION_OUT:
		out.Direction = dataplane.Out
	default:
		return out, fmt.Errorf("bad direction %v", r.GetDirection())
	}
	switch r.GetAction() {
	case basaltv1.AclAction_ACL_ACTION_ALLOW:
		out.Action = dataplane.Allow
	case basaltv1.AclAction_ACL_ACTION_DENY:
		out.Action = dataplane.Deny
	default:
		return out, fmt.Errorf("bad action %v", r.GetAction())
	}
	switch r.GetProtocol() {
	case basaltv1.AclProtocol_ACL_PROTOCOL_ANY:
		out.Protocol = dataplane.Any
	case basaltv1.AclProtocol_ACL_PROTOCOL_TCP:
		out.Protocol = dataplane.TCP
	case basaltv1.AclProtocol_ACL_PROTOCOL_UDP:
		out.Protocol = dataplane.UDP
	case basaltv1.AclProtocol_ACL_PROTOCOL_ICMP:
		out.Protocol = dataplane.ICMP
	default:
		return out, fmt.Errorf("bad protocol %v", r.GetProtocol())
	}
	if c := r.GetCidr(); c != "" {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return out, fmt.Errorf("bad CIDR %q", c)
		}
		out.CIDR = p
	}
	if r.GetPortMin() > 65535 || r.GetPortMax() > 65535 {
		return out, fmt.Errorf("port out of range")
	}
	return out, nil
}

func remotePort(p *basaltv1.Port, vtep netip.Addr) (dataplane.RemotePort, error) {
	mac, err := net.ParseMAC(p.GetMac())
	if err != nil {
		return dataplane.RemotePort{}, fmt.Errorf("bad MAC %q", p.GetMac())
	}
	ips, err := parseIPs(p.GetIps())
	if err != nil {
		return dataplane.RemotePort{}, err
	}
	return dataplane.RemotePort{
		Network: p.GetNetwork(), MAC: mac, IPs: ips, HostVTEP: vtep,
		Isolated: p.GetPolicy().GetIsolated(), Promiscuous: p.GetPolicy().GetPromiscuous(),
	}, nil
}

// gateway is a network's gateway for the data plane: each address with the length of the subnet holding it.
func gateway(nw *basaltv1.Network) (*dataplane.Gateway, error) {
	g := nw.GetGateway()
	mac, err := net.ParseMAC(g.GetMac())
	if err != nil {
		return nil, fmt.Errorf("bad MAC %q", g.GetMac())
	}
	out := &dataplane.Gateway{MAC: mac, NAT: g.GetNat()}
	for _, s := range g.GetAddresses() {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("bad address %q", s)
		}
		found := false
		for _, sn := range nw.GetSubnets() {
			if p, err := netip.ParsePrefix(sn); err == nil && p.Contains(a) {
				out.Addrs = append(out.Addrs, netip.PrefixFrom(a, p.Bits()))
				found = true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("address %s is in none of the subnets", a)
		}
	}
	return out, nil
}
