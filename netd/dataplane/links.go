package dataplane

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const addrGenModeNone = 1 // IN6_ADDR_GEN_MODE_NONE: no IPv6 link-local address on our devices

func (p *Plane) linkMap() (map[string]netlink.Link, error) {
	ls, err := p.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	m := make(map[string]netlink.Link, len(ls))
	for _, l := range ls {
		m[l.Attrs().Name] = l
	}
	return m, nil
}

func isUp(l netlink.Link) bool { return l.Attrs().Flags&net.FlagUp != 0 }

// removeStalePorts deletes taps we created that are no longer declared, and detaches
// every other undeclared interface from our bridges.
func (p *Plane) removeStalePorts(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	ourBridges := map[int]string{}
	for _, l := range links {
		if l.Type() == "bridge" && l.Attrs().Alias == p.marker("bridge") {
			ourBridges[l.Attrs().Index] = l.Attrs().Name
		}
	}
	for _, name := range sortedKeys(links) {
		l := links[name]
		a := l.Attrs()
		if _, want := d.ports[name]; want || d.keep[name] {
			continue
		}
		switch {
		case a.Alias == p.marker("tap"):
			if err := p.h.LinkDel(l); err != nil {
				return fmt.Errorf("delete tap %s: %w", name, err)
			}
			p.log.Info("deleted tap", "tap", name)
		case a.Alias == p.marker("vxlan"):
			// handled by removeStaleNetworks / ensureNetworks
		case ourBridges[a.MasterIndex] != "":
			if err := p.h.LinkSetNoMaster(l); err != nil {
				return fmt.Errorf("detach %s from %s: %w", name, ourBridges[a.MasterIndex], err)
			}
			p.log.Info("detached port", "link", name, "bridge", ourBridges[a.MasterIndex])
		}
	}
	return nil
}

// removeStaleNetworks deletes our VXLAN devices and bridges whose network is gone.
func (p *Plane) removeStaleNetworks(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	want := map[string]bool{}
	for _, n := range d.nets {
		want[n.bridge] = true
		want[n.vxlan] = true
	}
	// VXLAN devices first, then bridges.
	for _, kind := range []string{"vxlan", "bridge"} {
		for _, name := range sortedKeys(links) {
			l := links[name]
			if l.Attrs().Alias != p.marker(kind) || want[name] {
				continue
			}
			if err := p.h.LinkDel(l); err != nil {
				return fmt.Errorf("delete %s %s: %w", kind, name, err)
			}
			p.log.Info("deleted "+kind, "link", name)
		}
	}
	return nil
}

// initOwned marks a freshly created link as ours and switches off IPv6 address
// generation, so the host never appears on a tenant segment.
func (p *Plane) initOwned(l netlink.Link, kind string) error {
	if l.Attrs().Alias != p.marker(kind) {
		if err := p.h.LinkSetAlias(l, p.marker(kind)); err != nil {
			return fmt.Errorf("set alias on %s: %w", l.Attrs().Name, err)
		}
	}
	if err := p.h.LinkSetIP6AddrGenMode(l, addrGenModeNone); err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		return fmt.Errorf("set addrgenmode on %s: %w", l.Attrs().Name, err)
	}
	return nil
}

func (p *Plane) ensureNetworks(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	for _, n := range d.nets {
		br, err := p.ensureBridge(n, links[n.bridge])
		if err != nil {
			return err
		}
		if err := p.ensureVxlan(d, n, br, links[n.vxlan]); err != nil {
			return err
		}
	}
	return nil
}

func (p *Plane) ensureBridge(n *dNet, br netlink.Link) (netlink.Link, error) {
	if br != nil && br.Type() == "bridge" && br.Attrs().Alias == "" {
		// Our name but no marker: we crashed between creating it and marking it (the
		// kernel ignores IFLA_IFALIAS on creation). Names <prefix>b<VNI> are ours.
		p.log.Warn("adopting unmarked bridge with our name", "bridge", n.bridge)
		if err := p.initOwned(br, "bridge"); err != nil {
			return nil, err
		}
		br.Attrs().Alias = p.marker("bridge")
	}
	if br != nil && (br.Type() != "bridge" || br.Attrs().Alias != p.marker("bridge")) {
		return nil, fmt.Errorf("interface %s exists and is not a bridge managed by this plane", n.bridge)
	}
	if br == nil {
		la := netlink.NewLinkAttrs()
		la.Name = n.bridge
		la.MTU = n.mtu
		la.HardwareAddr = bridgeMAC(p.prefix, n.VNI)
		off := false
		if err := p.h.LinkAdd(&netlink.Bridge{LinkAttrs: la, MulticastSnooping: &off}); err != nil {
			return nil, fmt.Errorf("create bridge %s: %w", n.bridge, err)
		}
		l, err := p.h.LinkByName(n.bridge)
		if err != nil {
			return nil, err
		}
		if err := p.initOwned(l, "bridge"); err != nil {
			return nil, err
		}
		if err := p.h.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("set %s up: %w", n.bridge, err)
		}
		p.log.Info("created bridge", "bridge", n.bridge, "network", n.Name, "vni", n.VNI, "mtu", n.mtu)
		return l, nil
	}
	if br.Attrs().MTU != n.mtu {
		if err := p.h.LinkSetMTU(br, n.mtu); err != nil {
			return nil, fmt.Errorf("set mtu of %s: %w", n.bridge, err)
		}
		p.log.Info("changed bridge mtu", "bridge", n.bridge, "mtu", n.mtu)
	}
	if b, ok := br.(*netlink.Bridge); ok && (b.MulticastSnooping == nil || *b.MulticastSnooping) {
		if err := p.h.BridgeSetMcastSnoop(br, false); err != nil {
			return nil, fmt.Errorf("disable multicast snooping on %s: %w", n.bridge, err)
		}
	}
	if !isUp(br) {
		if err := p.h.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set %s up: %w", n.bridge, err)
		}
	}
	return br, nil
}

func (p *Plane) vxlanMatches(d *desired, vx *netlink.Vxlan, n *dNet) bool {
	src := net.IP(d.s.UnderlayIP.AsSlice())
	return vx.VxlanId == int(n.VNI) &&
		vx.VtepDevIndex == d.underlay.Attrs().Index &&
		vx.SrcAddr.Equal(src) &&
		vx.Port == vxlanPort &&
		!vx.Learning && !vx.Proxy && !vx.L2miss && !vx.L3miss && !vx.FlowBased &&
		(vx.Group == nil || vx.Group.IsUnspecified())
}

func (p *Plane) ensureVxlan(d *desired, n *dNet, br netlink.Link, cur netlink.Link) error {
	if cur != nil && cur.Type() == "vxlan" && cur.Attrs().Alias == "" {
		p.log.Warn("adopting unmarked vxlan device with our name", "link", n.vxlan)
		if err := p.initOwned(cur, "vxlan"); err != nil {
			return err
		}
		cur.Attrs().Alias = p.marker("vxlan")
	}
	if cur != nil && cur.Attrs().Alias != p.marker("vxlan") {
		return fmt.Errorf("interface %s exists and is not a VXLAN device managed by this plane", n.vxlan)
	}
	if cur != nil {
		vx, ok := cur.(*netlink.Vxlan)
		if !ok || !p.vxlanMatches(d, vx, n) {
			// VNI, local address, underlay device and port cannot change in place.
			if err := p.h.LinkDel(cur); err != nil {
				return fmt.Errorf("delete outdated vxlan %s: %w", n.vxlan, err)
			}
			p.log.Info("deleted outdated vxlan", "link", n.vxlan)
			cur = nil
		}
	}
	if cur == nil {
		la := netlink.NewLinkAttrs()
		la.Name = n.vxlan
		la.MTU = n.mtu
		la.MasterIndex = br.Attrs().Index
		vx := &netlink.Vxlan{
			LinkAttrs:    la,
			VxlanId:      int(n.VNI),
			VtepDevIndex: d.underlay.Attrs().Index,
			SrcAddr:      net.IP(d.s.UnderlayIP.AsSlice()),
			Port:         vxlanPort,
			Learning:     false,
		}
		if err := p.h.LinkAdd(vx); err != nil {
			return fmt.Errorf("create vxlan %s: %w", n.vxlan, err)
		}
		l, err := p.h.LinkByName(n.vxlan)
		if err != nil {
			return err
		}
		if err := p.initOwned(l, "vxlan"); err != nil {
			return err
		}
		cur = l
		p.log.Info("created vxlan", "link", n.vxlan, "vni", n.VNI, "local", d.s.UnderlayIP, "dev", d.s.UnderlayDev)
	} else {
		if cur.Attrs().MTU != n.mtu {
			if err := p.h.LinkSetMTU(cur, n.mtu); err != nil {
				return fmt.Errorf("set mtu of %s: %w", n.vxlan, err)
			}
		}
		if cur.Attrs().MasterIndex != br.Attrs().Index {
			if err := p.h.LinkSetMasterByIndex(cur, br.Attrs().Index); err != nil {
				return fmt.Errorf("attach %s to %s: %w", n.vxlan, n.bridge, err)
			}
		}
	}
	// Bridge port flags of the uplink: no learning (remote MACs come from the control
	// plane), no unknown-unicast flooding (every remote MAC is in the FDB), and
	// neighbour suppression (the bridge answers ARP for remote IPs itself).
	pi, err := p.h.LinkGetProtinfo(cur)
	if err != nil {
		return fmt.Errorf("read bridge port flags of %s: %w", n.vxlan, err)
	}
	if pi.Learning {
		if err := p.h.LinkSetLearning(cur, false); err != nil {
			return fmt.Errorf("learning off on %s: %w", n.vxlan, err)
		}
	}
	if pi.Flood {
		if err := p.h.LinkSetFlood(cur, false); err != nil {
			return fmt.Errorf("flood off on %s: %w", n.vxlan, err)
		}
	}
	if !pi.NeighSuppress {
		if err := p.h.LinkSetBrNeighSuppress(cur, true); err != nil {
			return fmt.Errorf("neigh_suppress on %s: %w", n.vxlan, err)
		}
	}
	if !isUp(cur) {
		if err := p.h.LinkSetUp(cur); err != nil {
			return fmt.Errorf("set %s up: %w", n.vxlan, err)
		}
	}
	return nil
}

// ensureTaps creates the taps that do not exist yet. They stay down and detached
// until their policy is programmed.
func (p *Plane) ensureTaps(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	var names []string
	for _, tap := range sortedKeys(d.ports) {
		names = append(names, tap)
		if b := d.bif[tap]; b != tap {
			names = append(names, b)
		}
	}
	for _, tap := range names {
		if l := links[tap]; l != nil {
			if a := l.Attrs().Alias; a == p.marker("bridge") || a == p.marker("vxlan") {
				return fmt.Errorf("port tap %s is one of our bridges/vxlan devices", tap)
			}
			continue
		}
		if err := createTap(p.ns, tap); err != nil {
			return fmt.Errorf("create tap %s: %w", tap, err)
		}
		l, err := p.h.LinkByName(tap)
		if err != nil {
			return fmt.Errorf("created tap %s: %w", tap, err)
		}
		if err := p.initOwned(l, "tap"); err != nil {
			return err
		}
		p.log.Info("created tap", "tap", tap)
	}
	return nil
}

// attachPorts puts every port on its network's bridge with the network's MTU, up.
func (p *Plane) attachPorts(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	for _, n := range d.nets {
		br := links[n.bridge]
		if br == nil {
			return fmt.Errorf("bridge %s vanished", n.bridge)
		}
		for _, pt := range n.ports {
			ifs := []string{d.bif[pt.Tap]}
			if ifs[0] != pt.Tap {
				ifs = append(ifs, pt.Tap) // the VM's side of an extension port: up, off the bridge
			}
			for i, name := range ifs {
				l := links[name]
				if l == nil {
					return fmt.Errorf("port %s: interface %s vanished", pt.Name, name)
				}
				if l.Attrs().MTU != n.mtu {
					if err := p.h.LinkSetMTU(l, n.mtu); err != nil {
						return fmt.Errorf("port %s: set mtu of %s: %w", pt.Name, name, err)
					}
				}
				switch m := l.Attrs().MasterIndex; {
				case i == 0 && m != br.Attrs().Index:
					if err := p.h.LinkSetMasterByIndex(l, br.Attrs().Index); err != nil {
						return fmt.Errorf("port %s: attach %s to %s: %w", pt.Name, name, n.bridge, err)
					}
					p.log.Info("attached port", "port", pt.Name, "link", name, "bridge", n.bridge)
				case i == 1 && m != 0:
					if err := p.h.LinkSetNoMaster(l); err != nil {
						return fmt.Errorf("port %s: detach %s: %w", pt.Name, name, err)
					}
				}
				if !isUp(l) {
					if err := p.h.LinkSetUp(l); err != nil {
						return fmt.Errorf("port %s: set %s up: %w", pt.Name, name, err)
					}
				}
			}
		}
	}
	return nil
}
