package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var zeroMAC = net.HardwareAddr{0, 0, 0, 0, 0, 0}

func ipOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func ignoreNotFound(err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// neighTables is one dump of the namespace's bridge FDB and of the IPv4/IPv6
// neighbour tables, grouped by interface index.
type neighTables struct {
	fdb   map[int][]netlink.Neigh
	neigh map[int][]netlink.Neigh
}

func (p *Plane) dumpNeigh() (*neighTables, error) {
	t := &neighTables{fdb: map[int][]netlink.Neigh{}, neigh: map[int][]netlink.Neigh{}}
	fdb, err := p.h.NeighList(0, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("dump fdb: %w", err)
	}
	for _, e := range fdb {
		t.fdb[e.LinkIndex] = append(t.fdb[e.LinkIndex], e)
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		ns, err := p.h.NeighList(0, fam)
		if err != nil {
			return nil, fmt.Errorf("dump neighbours: %w", err)
		}
		for _, e := range ns {
			t.neigh[e.LinkIndex] = append(t.neigh[e.LinkIndex], e)
		}
	}
	return t, nil
}

// reconcileFDB programs, for each network, the remote ports:
//   - on the VXLAN device (NTF_SELF): MAC -> remote VTEP, and one all-zeroes entry per
//     remote VTEP of the network (head-end replication of broadcast/multicast);
//   - on the bridge (NTF_MASTER, static): MAC -> VXLAN port (the port neither learns
//     nor floods unknown unicast);
//   - on the bridge device's neighbour table (permanent): remote IP -> MAC, which the
//     bridge uses to answer ARP/ND for remote ports itself (neigh_suppress).
//
// With removeOnly it only deletes entries that are no longer wanted (MACs or VTEPs
// gone); entries that change (a MAC moving to another VTEP) are replaced in place by
// the second pass, never deleted and re-added.
func (p *Plane) reconcileFDB(d *desired, removeOnly bool) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	tabs, err := p.dumpNeigh()
	if err != nil {
		return err
	}
	for _, n := range d.nets {
		vx, br := links[n.vxlan], links[n.bridge]
		if vx == nil || br == nil || vx.Attrs().Alias != p.marker("vxlan") || br.Attrs().Alias != p.marker("bridge") {
			if removeOnly {
				continue // created later, nothing to clean
			}
			return fmt.Errorf("network %s: bridge or vxlan missing", n.Name)
		}
		if err := p.reconcileNetFDB(n, vx, br, tabs, removeOnly); err != nil {
			return fmt.Errorf("network %s: %w", n.Name, err)
		}
	}
	return nil
}

func (p *Plane) reconcileNetFDB(n *dNet, vx, br netlink.Link, tabs *neighTables, removeOnly bool) error {
	vxIdx, brIdx := vx.Attrs().Index, br.Attrs().Index
	zero := zeroMAC.String()

	wantSelf := map[string]netip.Addr{} // unicast MAC -> VTEP
	wantMaster := map[string]bool{}
	wantNeigh := map[netip.Addr]string{} // remote IP -> MAC
	for _, r := range n.remote {
		m := r.MAC.String()
		wantSelf[m] = r.HostVTEP
		wantMaster[m] = true
		for _, ip := range r.IPs {
			if _, dup := wantNeigh[ip]; !dup {
				wantNeigh[ip] = m
			}
		}
	}
	wantBUM := map[netip.Addr]bool{}
	for _, v := range n.vteps {
		wantBUM[v] = true
	}

	curSelf := map[string]map[netip.Addr]bool{}
	curMaster := map[string]bool{}
	for _, e := range tabs.fdb[vxIdx] {
		m := e.HardwareAddr.String()
		if e.Flags&netlink.NTF_SELF != 0 {
			if curSelf[m] == nil {
				curSelf[m] = map[netip.Addr]bool{}
			}
			curSelf[m][ipOf(e.IP)] = true
			continue
		}
		// Bridge entries on the uplink port. The permanent one is the VXLAN device's
		// own address; static ones are ours; dynamic ones should not exist (learning
		// is off) and are replaced or removed.
		if e.State&netlink.NUD_PERMANENT != 0 {
			continue
		}
		curMaster[m] = e.State&netlink.NUD_NOARP != 0
	}
	curNeigh := map[netip.Addr]string{}
	for _, e := range tabs.neigh[brIdx] {
		if e.State&netlink.NUD_PERMANENT != 0 && e.IP != nil {
			curNeigh[ipOf(e.IP)] = e.HardwareAddr.String()
		}
	}

	selfEntry := func(mac net.HardwareAddr, ip netip.Addr) *netlink.Neigh {
		return &netlink.Neigh{
			LinkIndex: vxIdx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			State: netlink.NUD_PERMANENT, HardwareAddr: mac, IP: net.IP(ip.AsSlice()),
		}
	}
	masterEntry := func(mac net.HardwareAddr) *netlink.Neigh {
		return &netlink.Neigh{
			LinkIndex: vxIdx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_MASTER,
			State: netlink.NUD_NOARP, HardwareAddr: mac,
		}
	}
	neighEntry := func(ip netip.Addr, mac net.HardwareAddr) *netlink.Neigh {
		fam := unix.AF_INET
		if ip.Is6() {
			fam = unix.AF_INET6
		}
		return &netlink.Neigh{
			LinkIndex: brIdx, Family: fam, State: netlink.NUD_PERMANENT,
			IP: net.IP(ip.AsSlice()), HardwareAddr: mac,
		}
	}

	// Removals.
	for _, m := range sortedKeys(curSelf) {
		mac, _ := net.ParseMAC(m)
		for ip := range curSelf[m] {
			var stale bool
			if m == zero {
				stale = !wantBUM[ip]
			} else {
				want, ok := wantSelf[m]
				stale = !ok || (len(curSelf[m]) > 1 && ip != want)
			}
			if !stale {
				continue
			}
			if err := ignoreNotFound(p.h.NeighDel(selfEntry(mac, ip))); err != nil {
				return fmt.Errorf("delete vxlan fdb %s -> %s: %w", m, ip, err)
			}
			delete(curSelf[m], ip)
			p.log.Info("deleted vxlan fdb entry", "dev", n.vxlan, "mac", m, "dst", ip)
		}
	}
	for _, m := range sortedKeys(curMaster) {
		if wantMaster[m] {
			continue
		}
		mac, _ := net.ParseMAC(m)
		if err := ignoreNotFound(p.h.NeighDel(masterEntry(mac))); err != nil {
			return fmt.Errorf("delete bridge fdb %s: %w", m, err)
		}
		p.log.Info("deleted bridge fdb entry", "bridge", n.bridge, "mac", m)
	}
	for ip, m := range curNeigh {
		if _, ok := wantNeigh[ip]; ok {
			continue
		}
		mac, _ := net.ParseMAC(m)
		if err := ignoreNotFound(p.h.NeighDel(neighEntry(ip, mac))); err != nil {
			return fmt.Errorf("delete neighbour %s: %w", ip, err)
		}
		p.log.Info("deleted neighbour", "bridge", n.bridge, "ip", ip)
	}
	if removeOnly {
		return nil
	}

	// Additions and in-place replacements.
	for _, v := range n.vteps {
		if curSelf[zero][v] {
			continue
		}
		if err := p.h.NeighAppend(selfEntry(zeroMAC, v)); err != nil {
			return fmt.Errorf("add flood entry -> %s: %w", v, err)
		}
		p.log.Info("added flood entry", "dev", n.vxlan, "dst", v)
	}
	for _, r := range n.remote {
		m := r.MAC.String()
		if cur := curSelf[m]; !(len(cur) == 1 && cur[r.HostVTEP]) {
			if err := p.h.NeighSet(selfEntry(r.MAC, r.HostVTEP)); err != nil {
				return fmt.Errorf("set vxlan fdb %s -> %s: %w", m, r.HostVTEP, err)
			}
			p.log.Info("set vxlan fdb entry", "dev", n.vxlan, "mac", m, "dst", r.HostVTEP)
		}
		if !curMaster[m] {
			if err := p.h.NeighSet(masterEntry(r.MAC)); err != nil {
				return fmt.Errorf("set bridge fdb %s: %w", m, err)
			}
			p.log.Info("set bridge fdb entry", "bridge", n.bridge, "mac", m, "port", n.vxlan)
		}
	}
	for _, r := range n.remote {
		m := r.MAC.String()
		for _, ip := range r.IPs {
			if wantNeigh[ip] != m || curNeigh[ip] == m {
				continue
			}
			if err := p.h.NeighSet(neighEntry(ip, r.MAC)); err != nil {
				return fmt.Errorf("set neighbour %s -> %s: %w", ip, m, err)
			}
			curNeigh[ip] = m
			p.log.Info("set neighbour", "bridge", n.bridge, "ip", ip, "mac", m)
		}
	}
	return nil
}
