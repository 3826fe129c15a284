package dataplane

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// This file builds the desired nftables ruleset (a pure function of the HostState);
// nft.go diffs it against the kernel and applies the difference in one transaction.
//
// Layout of table "bridge <Table>":
//
//	set   ports          ifname                      every port of our bridges (taps and VXLAN devices)
//	map   from_port      ifname : verdict            tap -> jump from_<tap>
//	map   to_port        ifname : verdict            tap -> jump to_<tap>
//	set   gwports        ifname                      the gateways' bridge ports
//	set   uplinks        ifname                      the VXLAN devices
//	set   liso_<vni>     ifname                      local isolated ports of the network
//	set   lnp_<vni>      ifname                      local non-promiscuous ports
//	set   riso_<vni>     ether_addr                  remote isolated ports' MACs
//	set   rnp_<vni>      ether_addr                  remote non-promiscuous ports' MACs
//	counter <tap>.spoof, <tap>.dhcp, <tap>.isolation, <tap>.acl.<id>
//	chain prerouting  (filter hook prerouting priority -200)  iifname vmap @from_port
//	chain forward     (filter hook forward priority -200)     gateway broadcasts to @uplinks dropped;
//	                                                           oifname vmap @to_port
//	chain input       (filter hook input priority -200)       iifname @ports drop
//	chain output      (filter hook output priority -200)      oifname @ports drop
//	chain from_<tap>  frames sent by the VM: DHCP guard, spoofing guard, ACL out
//	chain to_<tap>    frames delivered to the VM: isolation, ACL in
//
// A port's maps and sets name its bridge-side interface: its tap, or the extension tap of an extension port
// (chains and counters keep the tap's name).
//
// Every rule carries a comment "<hash> <label>", the hash covering the rule's
// expressions (anonymous sets included), so a rule is recognised as unchanged without
// parsing kernel expressions back.
//
// (meta ibrname/obrname would be the natural match for input/output, but needs
// CONFIG_NFT_BRIDGE_META, which our kernels lack; matching the bridge ports by name
// is equivalent because every port of our bridges is in @ports.)

const (
	setPorts     = "ports"
	setGWPorts   = "gwports"
	setUplinks   = "uplinks"
	mapFromPort  = "from_port"
	mapToPort    = "to_port"
	bridgePrio   = -200 // NF_BR_PRI_FILTER_BRIDGED
	objCounter   = unix.NFT_OBJECT_COUNTER
	etherARP     = 0x0806
	etherIPv4    = 0x0800
	etherIPv6    = 0x86dd
	ipprotoICMP  = 1
	ipprotoTCP   = 6
	ipprotoUDP   = 17
	ipprotoICMP6 = 58
)

// anonSet is an anonymous constant set looked up from register 1.
type anonSet struct {
	keyType nftables.SetDatatype
	elems   [][]byte
	invert  bool
}

type ruleSpec struct {
	comment string
	items   []any // expr.Any or *anonSet
}

type chainSpec struct {
	name  string
	hook  *nftables.ChainHook // nil for a regular chain
	rules []*ruleSpec
}

type setSpec struct {
	name    string
	keyType nftables.SetDatatype
	vmap    bool
	elems   map[string]string // string(key) -> jump target (vmap) or ""
}

type ruleset struct {
	sets     []*setSpec
	counters []string
	chains   []*chainSpec // regular chains first, then base chains
}

func newRule(label string, items ...any) *ruleSpec {
	h := sha256.New()
	for _, it := range items {
		switch e := it.(type) {
		case *anonSet:
			fmt.Fprintf(h, "anon|%s|%v|", e.keyType.Name, e.invert)
			for _, el := range e.elems {
				h.Write(el)
				h.Write([]byte{'|'})
			}
		case expr.Any:
			b, err := expr.Marshal(byte(nftables.TableFamilyBridge), e)
			if err != nil {
				panic(fmt.Sprintf("dataplane: marshal %T: %v", e, err)) // programming error
			}
			h.Write(b)
		default:
			panic(fmt.Sprintf("dataplane: bad rule item %T", it))
		}
		h.Write([]byte{0})
	}
	c := hex.EncodeToString(h.Sum(nil)[:8]) + " " + label
	if len(c) > 120 {
		c = c[:120]
	}
	return &ruleSpec{comment: c, items: items}
}

// Expression helpers. Register 1 is the only data register used.

func ifname16(s string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, s)
	return b
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func ld(base expr.PayloadBase, off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n}
}
func ldLL(off, n uint32) expr.Any  { return ld(expr.PayloadBaseLLHeader, off, n) }
func ldNH(off, n uint32) expr.Any  { return ld(expr.PayloadBaseNetworkHeader, off, n) }
func ldTH(off, n uint32) expr.Any  { return ld(expr.PayloadBaseTransportHeader, off, n) }
func meta(k expr.MetaKey) expr.Any { return &expr.Meta{Key: k, Register: 1} }
func eq(b []byte) expr.Any         { return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b} }
func neq(b []byte) expr.Any        { return &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: b} }
func counter(name string) expr.Any { return &expr.Objref{Type: objCounter, Name: name} }
func lookup(set string) expr.Any   { return &expr.Lookup{SourceRegister: 1, SetName: set} }

var (
	drop   = &expr.Verdict{Kind: expr.VerdictDrop}
	accept = &expr.Verdict{Kind: expr.VerdictAccept}
)

func etherType(t uint16) []any { return []any{ldLL(12, 2), eq(be16(t))} }
func l4proto(p byte) []any     { return []any{meta(expr.MetaKeyL4PROTO), eq([]byte{p})} }
func cat(parts ...[]any) []any {
	var out []any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}
func one(items ...any) []any { return items }

func addrSet(v6 bool, addrs []netip.Addr, invert bool) *anonSet {
	kt := nftables.TypeIPAddr
	if v6 {
		kt = nftables.TypeIP6Addr
	}
	seen := map[netip.Addr]bool{}
	var elems [][]byte
	for _, a := range addrs {
		if a.Is6() != v6 || seen[a] {
			continue
		}
		seen[a] = true
		elems = append(elems, a.AsSlice())
	}
	sort.Slice(elems, func(i, j int) bool { return bytes.Compare(elems[i], elems[j]) < 0 })
	return &anonSet{keyType: kt, elems: elems, invert: invert}
}

// eui64LinkLocal is the modified EUI-64 IPv6 link-local address of mac.
func eui64LinkLocal(mac net.HardwareAddr) netip.Addr {
	var a [16]byte
	a[0], a[1] = 0xfe, 0x80
	a[8] = mac[0] ^ 0x02
	a[9], a[10], a[11], a[12] = mac[1], mac[2], 0xff, 0xfe
	a[13], a[14], a[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(a)
}

func fromChain(tap string) string { return "from_" + tap }
func toChain(tap string) string   { return "to_" + tap }
func setName(kind string, vni uint32) string {
	return fmt.Sprintf("%s_%d", kind, vni)
}

// buildRuleset computes the desired table content.
func buildRuleset(d *desired) *ruleset {
	rs := &ruleset{}
	ports := &setSpec{name: setPorts, keyType: nftables.TypeIFName, elems: map[string]string{}}
	from := &setSpec{name: mapFromPort, keyType: nftables.TypeIFName, vmap: true, elems: map[string]string{}}
	to := &setSpec{name: mapToPort, keyType: nftables.TypeIFName, vmap: true, elems: map[string]string{}}
	gwports := &setSpec{name: setGWPorts, keyType: nftables.TypeIFName, elems: map[string]string{}}
	uplinks := &setSpec{name: setUplinks, keyType: nftables.TypeIFName, elems: map[string]string{}}
	rs.sets = append(rs.sets, ports, from, to, gwports, uplinks)

	for _, n := range d.nets {
		ports.elems[string(ifname16(n.vxlan))] = ""
		uplinks.elems[string(ifname16(n.vxlan))] = ""
		liso := &setSpec{name: setName("liso", n.VNI), keyType: nftables.TypeIFName, elems: map[string]string{}}
		lnp := &setSpec{name: setName("lnp", n.VNI), keyType: nftables.TypeIFName, elems: map[string]string{}}
		riso := &setSpec{name: setName("riso", n.VNI), keyType: nftables.TypeEtherAddr, elems: map[string]string{}}
		rnp := &setSpec{name: setName("rnp", n.VNI), keyType: nftables.TypeEtherAddr, elems: map[string]string{}}
		rs.sets = append(rs.sets, liso, lnp, riso, rnp)
		for _, pt := range n.ports {
			if pt.Policy.Isolated {
				liso.elems[string(ifname16(d.bif[pt.Tap]))] = ""
			}
			if !pt.Policy.Promiscuous {
				lnp.elems[string(ifname16(d.bif[pt.Tap]))] = ""
			}
		}
		for _, r := range n.remote {
			if r.Isolated {
				riso.elems[string(r.MAC)] = ""
			}
			if !r.Promiscuous {
				rnp.elems[string(r.MAC)] = ""
			}
		}
		for _, pt := range n.ports {
			bif := string(ifname16(d.bif[pt.Tap]))
			ports.elems[bif] = ""
			from.elems[bif] = fromChain(pt.Tap)
			to.elems[bif] = toChain(pt.Tap)
			if pt.Tap == n.gwport {
				gwports.elems[bif] = ""
			}
			fc, tc, ctrs := portChains(n, pt)
			rs.chains = append(rs.chains, fc, tc)
			rs.counters = append(rs.counters, ctrs...)
		}
	}
	sort.Strings(rs.counters)

	base := func(name string, hook *nftables.ChainHook, r *ruleSpec) *chainSpec {
		return &chainSpec{name: name, hook: hook, rules: []*ruleSpec{r}}
	}
	vmap := func(set string) expr.Any {
		return &expr.Lookup{SourceRegister: 1, SetName: set, IsDestRegSet: true, DestRegister: 0}
	}
	rs.chains = append(rs.chains,
		base("prerouting", nftables.ChainHookPrerouting,
			newRule("dispatch frames from ports", meta(expr.MetaKeyIIFNAME), vmap(mapFromPort))),
		&chainSpec{name: "forward", hook: nftables.ChainHookForward, rules: []*ruleSpec{
			// A gateway exists on every host with the network: its broadcasts and multicasts (ARP, ND)
			// concern the local ports only.
			newRule("gateways stay local", meta(expr.MetaKeyIIFNAME), lookup(setGWPorts), meta(expr.MetaKeyOIFNAME), lookup(setUplinks),
				ldLL(0, 1), &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{1}, Xor: []byte{0}}, eq([]byte{1}), drop),
			newRule("dispatch frames to ports", meta(expr.MetaKeyOIFNAME), vmap(mapToPort)),
		}},
		base("input", nftables.ChainHookInput,
			newRule("tenant bridges never reach the host", meta(expr.MetaKeyIIFNAME), lookup(setPorts), drop)),
		base("output", nftables.ChainHookOutput,
			newRule("the host never sends into tenant bridges", meta(expr.MetaKeyOIFNAME), lookup(setPorts), drop)),
	)
	return rs
}

// portChains returns the from_<tap> and to_<tap> chains of a port and the counters
// they reference.
func portChains(n *dNet, pt *Port) (from, to *chainSpec, counters []string) {
	pol := pt.Policy
	tap := pt.Tap
	from = &chainSpec{name: fromChain(tap)}
	to = &chainSpec{name: toChain(tap)}
	add := func(c *chainSpec, label string, items ...any) {
		c.rules = append(c.rules, newRule(tap+" "+label, items...))
	}
	spoof, dhcp := counterName(tap, "spoof"), counterName(tap, "dhcp")

	if pol.SpoofGuard || pol.DHCPGuard {
		c := spoof
		if !pol.SpoofGuard {
			c = dhcp
		}
		// 802.1Q/802.1ad frames would hide their payload from the checks below.
		add(from, "guard: vlan-tagged", ldLL(12, 2),
			&anonSet{keyType: nftables.TypeEtherType, elems: [][]byte{be16(0x8100), be16(0x88a8)}}, counter(c), drop)
	}
	if pol.DHCPGuard {
		counters = append(counters, dhcp)
		add(from, "dhcp guard: dhcpv4 server", cat(etherType(etherIPv4), l4proto(ipprotoUDP),
			one(ldTH(0, 4), eq(append(be16(67), be16(68)...)), counter(dhcp), drop))...)
		add(from, "dhcp guard: dhcpv6 server", cat(etherType(etherIPv6), l4proto(ipprotoUDP),
			one(ldTH(0, 4), eq(append(be16(547), be16(546)...)), counter(dhcp), drop))...)
		add(from, "dhcp guard: router advertisement", cat(etherType(etherIPv6), l4proto(ipprotoICMP6),
			one(ldTH(0, 1), eq([]byte{134}), counter(dhcp), drop))...)
	}
	if pol.SpoofGuard {
		counters = append(counters, spoof)
		mac := []byte(pt.MAC)
		lla := eui64LinkLocal(pt.MAC)
		v4 := append([]netip.Addr{netip.IPv4Unspecified()}, pt.IPs...)
		v6src := append([]netip.Addr{netip.IPv6Unspecified(), lla}, pt.IPs...)
		v6own := append([]netip.Addr{lla}, pt.IPs...)
		add(from, "spoof: ether saddr", ldLL(6, 6), neq(mac), counter(spoof), drop)
		add(from, "spoof: arp header", cat(etherType(etherARP),
			one(ldNH(0, 6), neq([]byte{0, 1, 8, 0, 6, 4}), counter(spoof), drop))...)
		add(from, "spoof: arp sha", cat(etherType(etherARP),
			one(ldNH(8, 6), neq(mac), counter(spoof), drop))...)
		add(from, "spoof: arp spa", cat(etherType(etherARP),
			one(ldNH(14, 4), addrSet(false, v4, true), counter(spoof), drop))...)
		add(from, "spoof: ip saddr", cat(etherType(etherIPv4),
			one(ldNH(12, 4), addrSet(false, v4, true), counter(spoof), drop))...)
		// 0.0.0.0 is only allowed as a DHCP client (UDP 68 -> 67).
		add(from, "spoof: 0.0.0.0 not udp", cat(etherType(etherIPv4),
			one(ldNH(12, 4), eq(make([]byte, 4)), meta(expr.MetaKeyL4PROTO), neq([]byte{ipprotoUDP}), counter(spoof), drop))...)
		add(from, "spoof: 0.0.0.0 not dhcp client", cat(etherType(etherIPv4),
			one(ldNH(12, 4), eq(make([]byte, 4)), ldTH(0, 4), neq(append(be16(68), be16(67)...)), counter(spoof), drop))...)
		add(from, "spoof: ip6 saddr", cat(etherType(etherIPv6),
			one(ldNH(8, 16), addrSet(true, v6src, true), counter(spoof), drop))...)
		// :: is only allowed for ICMPv6 (duplicate address detection, MLD).
		add(from, "spoof: :: not icmpv6", cat(etherType(etherIPv6),
			one(ldNH(8, 16), eq(make([]byte, 16)), meta(expr.MetaKeyL4PROTO), neq([]byte{ipprotoICMP6}), counter(spoof), drop))...)
		add(from, "spoof: nd target", cat(etherType(etherIPv6), l4proto(ipprotoICMP6),
			one(ldTH(0, 1), eq([]byte{136}), ldTH(8, 16), addrSet(true, v6own, true), counter(spoof), drop))...)
	}

	if tap == n.gwport {
		// The local gateway serves the local ports only; the other hosts have their own.
		add(to, "gateway: nothing from the overlay", meta(expr.MetaKeyIIFNAME), eq(ifname16(n.vxlan)), drop)
	}
	if !pol.Promiscuous {
		iso := counterName(tap, "isolation")
		counters = append(counters, iso)
		local, remote := "liso", "riso"
		if pol.Isolated {
			local, remote = "lnp", "rnp"
		}
		add(to, "isolation: local", meta(expr.MetaKeyIIFNAME), lookup(setName(local, n.VNI)), counter(iso), drop)
		add(to, "isolation: remote", meta(expr.MetaKeyIIFNAME), eq(ifname16(n.vxlan)),
			ldLL(6, 6), lookup(setName(remote, n.VNI)), counter(iso), drop)
	}

	for i, r := range pol.ACL {
		id := aclID(r, i)
		cn := counterName(tap, "acl."+id)
		counters = append(counters, cn)
		c := from
		if r.Direction == In {
			c = to
		}
		for _, v6 := range []bool{false, true} {
			if r.CIDR.IsValid() && r.CIDR.Addr().Is6() != v6 {
				continue
			}
			add(c, fmt.Sprintf("acl %s", id), aclItems(r, v6, cn)...)
		}
	}
	return from, to, counters
}

func aclItems(r ACLRule, v6 bool, ctr string) []any {
	var items []any
	if v6 {
		items = etherType(etherIPv6)
	} else {
		items = etherType(etherIPv4)
	}
	if r.CIDR.IsValid() && r.CIDR.Bits() > 0 {
		var off, n uint32 = 12, 4 // IPv4 saddr
		if v6 {
			off, n = 8, 16
		}
		if r.Direction == Out {
			off += n // daddr follows saddr in both headers
		}
		items = append(items, ldNH(off, n))
		addr := r.CIDR.Addr().AsSlice()
		if bits := r.CIDR.Bits(); bits < int(n)*8 {
			mask := net.CIDRMask(bits, int(n)*8)
			items = append(items, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)})
		}
		items = append(items, eq(addr))
	}
	switch r.Protocol {
	case TCP:
		items = append(items, l4proto(ipprotoTCP)...)
	case UDP:
		items = append(items, l4proto(ipprotoUDP)...)
	case ICMP:
		if v6 {
			items = append(items, l4proto(ipprotoICMP6)...)
		} else {
			items = append(items, l4proto(ipprotoICMP)...)
		}
	}
	if r.PortMin != 0 || r.PortMax != 0 {
		items = append(items, ldTH(2, 2))
		if r.PortMin == r.PortMax {
			items = append(items, eq(be16(r.PortMin)))
		} else {
			items = append(items, &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: be16(r.PortMin), ToData: be16(r.PortMax)})
		}
	}
	items = append(items, counter(ctr))
	if r.Action == Allow {
		items = append(items, accept)
	} else {
		items = append(items, drop)
	}
	return items
}
