package dataplane

// Gateways. A network with a Gateway gets, on every host where it has ports, a named network namespace
// "<GatewayNetNS>-<VNI>" holding a router:
//
//	tenant bridge <prefix>b<VNI> ── <prefix>g<VNI> ═veth═ lan   (gateway MAC, one address per subnet)
//	host namespace               ── <prefix>u<VNI> ═veth═ wan   (a /30 of TransitPool; default route)
//
// The router forwards between the network's subnets (never within one subnet, so isolation cannot be
// bypassed through it) and, with NAT, masquerades IPv4 leaving through wan; the host masquerades the transit
// pool again through its uplink (table ip <Table>_nat) and forwards IPv4. Every host has the same gateway
// (MAC and addresses), so a VM's traffic to its gateway never crosses the overlay: the gateway's bridge port
// hears nothing from the VXLAN device, and its broadcasts are not sent there (nftables, see nftrules.go).
// Routed traffic to a VM on another host crosses the overlay as unicast to that VM's MAC.

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	gwLan = "lan"
	gwWan = "wan"
	// netnsDir is where named namespaces are bind-mounted (iproute2's convention).
	netnsDir = "/run/netns"
)

func gwPortName(prefix string, vni uint32) string { return fmt.Sprintf("%sg%d", prefix, vni) }
func gwWanName(prefix string, vni uint32) string  { return fmt.Sprintf("%su%d", prefix, vni) }
func (p *Plane) gwNSName(vni uint32) string       { return fmt.Sprintf("%s-%d", p.gwNS, vni) }

// gatewayPort is the port a gateway occupies on its network's bridge: promiscuous (it serves isolated ports)
// and without guards (it forwards packets from anywhere).
func gatewayPort(prefix string, n Network) Port {
	return Port{
		Network: n.Name, Name: "gateway of " + n.Name, MAC: n.Gateway.MAC,
		Tap: gwPortName(prefix, n.VNI), Policy: PortPolicy{Promiscuous: true},
	}
}

// ownedGatewayNS lists the VNIs of the gateway namespaces of this plane.
func (p *Plane) ownedGatewayNS() (map[uint32]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", netnsDir, err)
	}
	out := map[uint32]string{}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), p.gwNS+"-")
		if !ok {
			continue
		}
		if v, err := strconv.ParseUint(rest, 10, 32); err == nil && v > 0 && v <= maxVNI {
			out[uint32(v)] = e.Name()
		}
	}
	return out, nil
}

// removeStaleGateways deletes the gateway namespaces (and their veths) of networks that no longer have a
// gateway here, and the host's NAT table when no gateway needs it.
func (p *Plane) removeStaleGateways(d *desired) error {
	have, err := p.ownedGatewayNS()
	if err != nil {
		return err
	}
	want := map[uint32]bool{}
	for _, n := range d.nets {
		if n.Gateway != nil {
			want[n.VNI] = true
		}
	}
	for vni, name := range have {
		if want[vni] {
			continue
		}
		for _, l := range []string{gwPortName(p.prefix, vni), gwWanName(p.prefix, vni)} {
			if link, err := p.h.LinkByName(l); err == nil {
				if err := p.h.LinkDel(link); err != nil {
					return fmt.Errorf("delete %s: %w", l, err)
				}
			}
		}
		if err := netns.DeleteNamed(name); err != nil {
			return fmt.Errorf("delete gateway namespace %s: %w", name, err)
		}
		p.log.Info("deleted gateway", "netns", name, "vni", vni)
	}
	if !d.anyNAT {
		return p.ensureHostNAT(d)
	}
	return nil
}

// ensureGateways creates or repairs every declared gateway.
func (p *Plane) ensureGateways(d *desired) error {
	var gws []*dNet
	for _, n := range d.nets {
		if n.Gateway != nil {
			gws = append(gws, n)
		}
	}
	if len(gws) == 0 {
		return nil
	}
	transit, err := p.allocTransit(gws)
	if err != nil {
		return err
	}
	for _, n := range gws {
		if err := p.ensureGateway(d, n, transit[n.VNI]); err != nil {
			return fmt.Errorf("gateway of %s: %w", n.Name, err)
		}
	}
	return p.ensureHostNAT(d)
}

// allocTransit gives every gateway a /30 of the transit pool, keeping the one its wan veth already has (the
// kernel is the record of allocations, so a restart changes nothing).
func (p *Plane) allocTransit(gws []*dNet) (map[uint32]netip.Prefix, error) {
	out := map[uint32]netip.Prefix{}
	used := map[netip.Prefix]bool{}
	for _, n := range gws {
		l, err := p.h.LinkByName(gwWanName(p.prefix, n.VNI))
		if err != nil {
			continue
		}
		addrs, err := p.h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", l.Attrs().Name, err)
		}
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP.To4())
			pf := netip.PrefixFrom(ip, 30).Masked()
			if ones, _ := a.Mask.Size(); ones == 30 && p.transit.Contains(ip) && !used[pf] {
				out[n.VNI] = pf
				used[pf] = true
			}
		}
	}
	next := p.transit.Masked().Addr()
	for _, n := range gws {
		if _, ok := out[n.VNI]; ok {
			continue
		}
		for {
			pf := netip.PrefixFrom(next, 30)
			if !p.transit.Contains(next) {
				return nil, fmt.Errorf("transit pool %s is exhausted", p.transit)
			}
			next = nextPrefix(pf)
			if !used[pf] {
				out[n.VNI] = pf
				used[pf] = true
				break
			}
		}
	}
	return out, nil
}

func nextPrefix(p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += 1 << (32 - p.Bits())
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// addr4 is the i-th address of a /30.
func addr4(p netip.Prefix, i int) netip.Addr {
	a := p.Addr()
	for range i {
		a = a.Next()
	}
	return a
}

func (p *Plane) openGatewayNS(vni uint32) (netns.NsHandle, bool, error) {
	name := p.gwNSName(vni)
	h, err := netns.GetFromName(name)
	if err == nil {
		return h, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOENT) {
		return netns.None(), false, fmt.Errorf("open gateway namespace %s: %w", name, err)
	}
	h, err = newNamedNS(name)
	if err != nil {
		return netns.None(), false, fmt.Errorf("create gateway namespace %s: %w", name, err)
	}
	return h, true, nil
}

func (p *Plane) ensureGateway(d *desired, n *dNet, transit netip.Prefix) error {
	gns, created, err := p.openGatewayNS(n.VNI)
	if err != nil {
		return err
	}
	defer gns.Close()
	gh, err := netlink.NewHandleAt(gns)
	if err != nil {
		return fmt.Errorf("netlink in gateway namespace: %w", err)
	}
	defer gh.Close()
	if created {
		p.log.Info("created gateway namespace", "netns", p.gwNSName(n.VNI), "network", n.Name)
	}
	if err := linkUp(gh, "lo"); err != nil {
		return err
	}
	gw := n.Gateway
	pairs := []struct {
		host, inner, kind string
		mac               net.HardwareAddr
	}{
		{gwPortName(p.prefix, n.VNI), gwLan, "gwport", gw.MAC},
		{gwWanName(p.prefix, n.VNI), gwWan, "gwwan", nil},
	}
	for _, pr := range pairs {
		if err := p.ensureVethPair(gh, gns, pr.host, pr.inner, pr.kind, pr.mac); err != nil {
			return err
		}
	}
	lan, err := gh.LinkByName(gwLan)
	if err != nil {
		return err
	}
	if lan.Attrs().HardwareAddr.String() != gw.MAC.String() {
		if err := gh.LinkSetHardwareAddr(lan, gw.MAC); err != nil {
			return fmt.Errorf("set gateway MAC: %w", err)
		}
	}
	if lan.Attrs().MTU != n.mtu {
		if err := gh.LinkSetMTU(lan, n.mtu); err != nil {
			return fmt.Errorf("set gateway MTU: %w", err)
		}
	}
	if err := syncAddrs(gh, lan, gw.Addrs); err != nil {
		return fmt.Errorf("gateway addresses: %w", err)
	}
	wan, err := gh.LinkByName(gwWan)
	if err != nil {
		return err
	}
	inner, outer := netip.PrefixFrom(addr4(transit, 2), 30), netip.PrefixFrom(addr4(transit, 1), 30)
	if err := syncAddrs(gh, wan, []netip.Prefix{inner}); err != nil {
		return fmt.Errorf("gateway transit address: %w", err)
	}
	hw, err := p.h.LinkByName(gwWanName(p.prefix, n.VNI))
	if err != nil {
		return err
	}
	if err := syncAddrs(p.h, hw, []netip.Prefix{outer}); err != nil {
		return fmt.Errorf("host transit address: %w", err)
	}
	for _, l := range []netlink.Link{lan, wan} {
		if !isUp(l) {
			if err := gh.LinkSetUp(l); err != nil {
				return err
			}
		}
	}
	if !isUp(hw) {
		if err := p.h.LinkSetUp(hw); err != nil {
			return err
		}
	}
	if err := ensureDefaultRoute(gh, wan, outer.Addr()); err != nil {
		return err
	}
	// All subnets share one segment, so the kernel would tell VMs to bypass the gateway with ICMP redirects:
	// straight to a VM of another subnet, which breaks isolation (seen as the gateway, the traffic is allowed)
	// and the routing the operator asked for. Redirects are off, and dropped by the table below as well.
	if err := inNS(gns, func() error {
		return errors.Join(setSysctl("net/ipv4/ip_forward", "1"), setSysctl("net/ipv6/conf/all/forwarding", "1"),
			setSysctl("net/ipv4/conf/all/send_redirects", "0"), setSysctl("net/ipv4/conf/lan/send_redirects", "0"))
	}); err != nil {
		return fmt.Errorf("enable forwarding in the gateway: %w", err)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(gns)))
	if err != nil {
		return fmt.Errorf("nftables in gateway namespace: %w", err)
	}
	return p.ensureSimpleTable(c, gatewayTable(gw))
}

// ensureVethPair makes sure host (in the plane's namespace, marked kind) and inner (in gns) are the two ends
// of one veth pair; a half left by a crash or by a recreated namespace is deleted and the pair made again.
func (p *Plane) ensureVethPair(gh *netlink.Handle, gns netns.NsHandle, host, inner, kind string, mac net.HardwareAddr) error {
	hl, herr := p.h.LinkByName(host)
	il, ierr := gh.LinkByName(inner)
	if herr == nil && ierr == nil && hl.Type() == "veth" && hl.Attrs().Alias == p.marker(kind) {
		return nil
	}
	if herr == nil {
		if err := p.h.LinkDel(hl); err != nil {
			return fmt.Errorf("delete stale %s: %w", host, err)
		}
	}
	if ierr == nil {
		if err := gh.LinkDel(il); err != nil {
			return fmt.Errorf("delete stale %s in gateway: %w", inner, err)
		}
	}
	la := netlink.NewLinkAttrs()
	la.Name = host
	if err := p.h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: inner, PeerHardwareAddr: mac, PeerNamespace: netlink.NsFd(int(gns))}); err != nil {
		return fmt.Errorf("create veth %s/%s: %w", host, inner, err)
	}
	l, err := p.h.LinkByName(host)
	if err != nil {
		return err
	}
	if err := p.initOwned(l, kind); err != nil {
		return err
	}
	p.log.Info("created gateway veth", "host", host, "gateway", inner)
	return nil
}

func linkUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	if isUp(l) {
		return nil
	}
	return h.LinkSetUp(l)
}

// syncAddrs makes the addresses of l exactly want (IPv6 link-local addresses are left alone; the transit
// addresses are IPv4 link-local ones, so those count).
func syncAddrs(h *netlink.Handle, l netlink.Link, want []netip.Prefix) error {
	cur, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	have := map[netip.Prefix]bool{}
	for _, a := range cur {
		ip, _ := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		if ip.Is6() && ip.IsLinkLocalUnicast() {
			continue
		}
		ones, _ := a.Mask.Size()
		pf := netip.PrefixFrom(ip, ones)
		have[pf] = true
		keep := false
		for _, w := range want {
			keep = keep || w == pf
		}
		if !keep {
			if err := h.AddrDel(l, &a); err != nil {
				return fmt.Errorf("delete %s: %w", pf, err)
			}
		}
	}
	for _, w := range want {
		if have[w] {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: w.Addr().AsSlice(), Mask: net.CIDRMask(w.Bits(), w.Addr().BitLen())}}
		if w.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, a); err != nil {
			return fmt.Errorf("add %s: %w", w, err)
		}
	}
	return nil
}

func ensureDefaultRoute(h *netlink.Handle, l netlink.Link, via netip.Addr) error {
	routes, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.LinkIndex == l.Attrs().Index && r.Gw.Equal(via.AsSlice()) {
			return nil
		}
	}
	if err := h.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: via.AsSlice(), Family: netlink.FAMILY_V4}); err != nil {
		return fmt.Errorf("default route via %s: %w", via, err)
	}
	return nil
}

// setSysctl writes a /proc/sys/net value of the calling thread's namespace, if it differs.
func setSysctl(path, value string) error {
	f := filepath.Join("/proc/sys", path)
	cur, err := os.ReadFile(f)
	if err == nil && strings.TrimSpace(string(cur)) == value {
		return nil
	}
	if err := os.WriteFile(f, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", path, value, err)
	}
	return nil
}

// simpleTable is a small nftables table wholly owned by the plane, rebuilt as a whole (in one transaction)
// whenever its rules differ.
type simpleTable struct {
	table  *nftables.Table
	chains []simpleChain
}

type simpleChain struct {
	chain *nftables.Chain
	rules []*ruleSpec
}

// gatewayTable is the gateway namespace's ruleset: no forwarding within one subnet (a VM cannot reach an
// isolated neighbour by routing through the gateway), no ICMP redirects, and, with NAT, masquerading out of
// wan.
func gatewayTable(gw *Gateway) simpleTable {
	t := &nftables.Table{Name: "basalt_gw", Family: nftables.TableFamilyINet}
	accept := nftables.ChainPolicyAccept
	fwd := simpleChain{chain: &nftables.Chain{Name: "forward", Table: t, Hooknum: nftables.ChainHookForward,
		Priority: nftables.ChainPriorityFilter, Type: nftables.ChainTypeFilter, Policy: &accept}}
	subnets := make([]netip.Prefix, 0, len(gw.Addrs))
	for _, a := range gw.Addrs {
		subnets = append(subnets, a.Masked())
	}
	sort.Slice(subnets, func(i, j int) bool { return subnets[i].String() < subnets[j].String() })
	for _, s := range subnets {
		fam, off, n := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4)
		if s.Addr().Is6() {
			fam, off, n = unix.NFPROTO_IPV6, 8, 16
		}
		mask := net.CIDRMask(s.Bits(), int(n)*8)
		match := func(o uint32) []any {
			return []any{ldNH(o, n), &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)}, eq(s.Addr().AsSlice())}
		}
		items := []any{meta(expr.MetaKeyNFPROTO), eq([]byte{fam})}
		items = append(items, match(off)...)
		items = append(items, match(off+n)...)
		items = append(items, drop)
		fwd.rules = append(fwd.rules, newRule("no forwarding within "+s.String(), items...))
	}
	out := simpleChain{chain: &nftables.Chain{Name: "output", Table: t, Hooknum: nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityFilter, Type: nftables.ChainTypeFilter, Policy: &accept}}
	out.rules = append(out.rules,
		newRule("no ICMP redirects", meta(expr.MetaKeyNFPROTO), eq([]byte{unix.NFPROTO_IPV4}), meta(expr.MetaKeyL4PROTO), eq([]byte{ipprotoICMP}),
			ldTH(0, 1), eq([]byte{5}), drop),
		newRule("no ICMPv6 redirects", meta(expr.MetaKeyNFPROTO), eq([]byte{unix.NFPROTO_IPV6}), meta(expr.MetaKeyL4PROTO), eq([]byte{ipprotoICMP6}),
			ldTH(0, 1), eq([]byte{137}), drop))
	st := simpleTable{table: t, chains: []simpleChain{fwd, out}}
	if gw.NAT {
		post := simpleChain{chain: &nftables.Chain{Name: "postrouting", Table: t, Hooknum: nftables.ChainHookPostrouting,
			Priority: nftables.ChainPriorityNATSource, Type: nftables.ChainTypeNAT, Policy: &accept}}
		post.rules = append(post.rules, newRule("masquerade to the host",
			meta(expr.MetaKeyNFPROTO), eq([]byte{unix.NFPROTO_IPV4}), meta(expr.MetaKeyOIFNAME), eq(ifname16(gwWan)), &expr.Masq{}))
		st.chains = append(st.chains, post)
	}
	return st
}

// hostNATTable masquerades the transit pool through the uplink.
func (p *Plane) hostNATTable(uplink string) simpleTable {
	t := &nftables.Table{Name: p.table.Name + "_nat", Family: nftables.TableFamilyIPv4}
	accept := nftables.ChainPolicyAccept
	post := simpleChain{chain: &nftables.Chain{Name: "postrouting", Table: t, Hooknum: nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource, Type: nftables.ChainTypeNAT, Policy: &accept}}
	mask := net.CIDRMask(p.transit.Bits(), 32)
	post.rules = append(post.rules, newRule("masquerade gateways to "+uplink,
		ldNH(12, 4), &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)}, eq(p.transit.Masked().Addr().AsSlice()),
		meta(expr.MetaKeyOIFNAME), eq(ifname16(uplink)), &expr.Masq{}))
	return simpleTable{table: t, chains: []simpleChain{post}}
}

// ensureHostNAT installs the host's NAT table and IPv4 forwarding while a gateway with NAT exists, and removes
// the table otherwise. (Forwarding stays on once enabled: other software may rely on it by then.)
func (p *Plane) ensureHostNAT(d *desired) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(p.ns)))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if !d.anyNAT {
		t := &nftables.Table{Name: p.table.Name + "_nat", Family: nftables.TableFamilyIPv4}
		if _, err := c.ListTableOfFamily(t.Name, t.Family); err != nil {
			return nil // absent (or unreadable: then we never made it)
		}
		c.DelTable(t)
		if err := c.Flush(); err != nil {
			return fmt.Errorf("delete host NAT table: %w", err)
		}
		p.log.Info("deleted host NAT table", "table", t.Name)
		return nil
	}
	uplink := d.s.Uplink
	if uplink == "" {
		uplink = d.s.UnderlayDev
	}
	if err := inNS(p.ns, func() error { return setSysctl("net/ipv4/ip_forward", "1") }); err != nil {
		return err
	}
	return p.ensureSimpleTable(c, p.hostNATTable(uplink))
}

func (p *Plane) ensureSimpleTable(c *nftables.Conn, st simpleTable) error {
	same := true
	if _, err := c.ListTableOfFamily(st.table.Name, st.table.Family); err != nil {
		same = false
	} else {
		chains, err := c.ListChainsOfTableFamily(st.table.Family)
		if err != nil {
			return fmt.Errorf("list chains of %s: %w", st.table.Name, err)
		}
		have := map[string]*nftables.Chain{}
		for _, ch := range chains {
			if ch.Table.Name == st.table.Name {
				have[ch.Name] = ch
			}
		}
		same = len(have) == len(st.chains)
		for _, want := range st.chains {
			ch := have[want.chain.Name]
			if !same || ch == nil {
				same = false
				break
			}
			rules, err := c.GetRules(st.table, ch)
			if err != nil {
				return fmt.Errorf("list rules of %s: %w", ch.Name, err)
			}
			same = chainUnchanged(rules, want.rules)
		}
		if !same {
			c.DelTable(st.table)
		}
	}
	if same {
		return nil
	}
	c.AddTable(st.table)
	for _, ch := range st.chains {
		c.AddChain(ch.chain)
		for _, r := range ch.rules {
			exprs := make([]expr.Any, 0, len(r.items))
			for _, it := range r.items {
				exprs = append(exprs, it.(expr.Any))
			}
			c.AddRule(&nftables.Rule{Table: st.table, Chain: ch.chain, Exprs: exprs,
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.comment)})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("write table %s: %w", st.table.Name, err)
	}
	p.log.Info("wrote nftables table", "table", st.table.Name)
	return nil
}
