package dataplane

// Traffic control: port mirroring and bandwidth. Everything sits on the port's tap (the VM's side):
//
//	clsact on the tap
//	  ingress (what the VM sends):   u32 match-all → [mirred mirror → mirror tap] [mirred redirect → <prefix>qos]
//	  egress  (what the VM receives): u32 match-all → mirred mirror → mirror tap
//	root tbf on the tap (what the VM receives): rate MaxBps
//	<prefix>qos (ifb, one per host): root htb 1:, class 1:1 = UplinkBps, one class per port under it with
//	  rate = MinBps (guaranteed) and ceil = MaxBps (or UplinkBps), chosen by a u32 filter on the port's source
//	  MAC; class 1:ffff (default) for frames with another source MAC.
//
// What the VM sends is redirected to the shared ifb before the bridge sees it and comes back to the tap's
// receive path once shaped, so the nftables policy applies after shaping. The MAC-to-class assignment is
// read back from the kernel's filters, so a restart keeps every class where it is.
//
// Our kernels have no police action, no matchall or flower classifier, hence u32 and ifb.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	tcPrio        = 1
	defaultUplink = 10_000_000_000 // bit/s, when HostState.UplinkBps is 0
	defaultClass  = 0xffff
)

func ifbName(prefix string) string { return prefix + "qos" }

type mirredSpec struct {
	act     netlink.MirredAct
	ifindex int
}

// reconcileTC programs mirroring and bandwidth on every port, and the host's ifb.
func (p *Plane) reconcileTC(d *desired) error {
	links, err := p.linkMap()
	if err != nil {
		return err
	}
	var ifb netlink.Link
	if d.anyQoS {
		if ifb, err = p.ensureIFB(d, links); err != nil {
			return err
		}
	} else if l := links[ifbName(p.prefix)]; l != nil && l.Attrs().Alias == p.marker("ifb") {
		if err := p.h.LinkDel(l); err != nil {
			return fmt.Errorf("delete %s: %w", l.Attrs().Name, err)
		}
		p.log.Info("deleted bandwidth scheduler", "ifb", l.Attrs().Name)
	}
	// One dump for the whole namespace: a dump per port would be quadratic (the kernel lists every qdisc of
	// the namespace and the library filters by interface).
	all, err := p.h.QdiscList(nil)
	if err != nil {
		return fmt.Errorf("list qdiscs: %w", err)
	}
	qdiscs := map[int][]netlink.Qdisc{}
	for _, q := range all {
		qdiscs[q.Attrs().LinkIndex] = append(qdiscs[q.Attrs().LinkIndex], q)
	}
	for _, tap := range sortedKeys(d.ports) {
		pt := d.ports[tap]
		l := links[tap]
		if l == nil {
			return fmt.Errorf("port %s: interface %s vanished", pt.Name, tap)
		}
		var in, out []mirredSpec
		if m := pt.Policy.MirrorTo; m != "" {
			ml := links[d.byPort[m].Tap]
			if ml == nil {
				return fmt.Errorf("port %s: mirror target %s has no interface", pt.Name, m)
			}
			mirror := mirredSpec{netlink.TCA_EGRESS_MIRROR, ml.Attrs().Index}
			in, out = append(in, mirror), append(out, mirror)
		}
		if pt.Policy.MaxBps != 0 || pt.Policy.MinBps != 0 {
			in = append(in, mirredSpec{netlink.TCA_EGRESS_REDIR, ifb.Attrs().Index})
		}
		if err := p.reconcilePortTC(pt, l, qdiscs[l.Attrs().Index], in, out); err != nil {
			return fmt.Errorf("port %s: %w", pt.Name, err)
		}
	}
	return nil
}

func (p *Plane) reconcilePortTC(pt *Port, l netlink.Link, qds []netlink.Qdisc, in, out []mirredSpec) error {
	var clsact netlink.Qdisc
	var tbf *netlink.Tbf
	for _, q := range qds {
		switch {
		case q.Type() == "clsact":
			clsact = q
		case q.Attrs().Parent == netlink.HANDLE_ROOT && q.Attrs().Handle == netlink.MakeHandle(1, 0):
			if t, ok := q.(*netlink.Tbf); ok {
				tbf = t
			}
		}
	}
	if len(in) == 0 && len(out) == 0 && pt.Policy.MaxBps == 0 && clsact == nil && tbf == nil {
		return nil // the common case: nothing wanted, nothing there
	}
	idx := l.Attrs().Index
	switch {
	case (len(in) > 0 || len(out) > 0) && clsact == nil:
		q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
		if err := p.h.QdiscAdd(q); err != nil {
			return fmt.Errorf("add clsact: %w", err)
		}
	case len(in) == 0 && len(out) == 0 && clsact != nil:
		// Deleting clsact deletes its filters. Only ours: an adopted interface could carry someone's clsact,
		// so only a clsact holding nothing but our filters is removed.
		if ours, err := p.onlyOurFilters(l); err != nil || !ours {
			return err
		}
		if err := p.h.QdiscDel(clsact); err != nil {
			return fmt.Errorf("delete clsact: %w", err)
		}
		p.log.Info("removed port traffic control", "port", pt.Name)
	}
	if len(in) > 0 || len(out) > 0 {
		if err := p.syncMirred(l, netlink.HANDLE_MIN_INGRESS, in); err != nil {
			return fmt.Errorf("ingress filter: %w", err)
		}
		if err := p.syncMirred(l, netlink.HANDLE_MIN_EGRESS, out); err != nil {
			return fmt.Errorf("egress filter: %w", err)
		}
	}

	rate := pt.Policy.MaxBps / 8
	switch {
	case rate != 0 && (tbf == nil || tbf.Rate != rate):
		burst := max(uint32(rate/200), 64<<10) // 5 ms at rate, at least one GSO packet
		q := &netlink.Tbf{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT},
			Rate:       rate,
			Buffer:     netlink.Xmittime(rate, burst),
			Limit:      uint32(min(rate/20, 1<<30)) + burst, // 50 ms of queue
		}
		if err := p.h.QdiscReplace(q); err != nil {
			return fmt.Errorf("set receive bandwidth: %w", err)
		}
		p.log.Info("set receive bandwidth", "port", pt.Name, "bps", pt.Policy.MaxBps)
	case rate == 0 && tbf != nil:
		if err := p.h.QdiscDel(tbf); err != nil {
			return fmt.Errorf("remove receive bandwidth: %w", err)
		}
	}
	return nil
}

// onlyOurFilters reports whether every filter under the interface's clsact is one of ours.
func (p *Plane) onlyOurFilters(l netlink.Link) (bool, error) {
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := p.h.FilterList(l, parent)
		if err != nil {
			return false, fmt.Errorf("list filters: %w", err)
		}
		for _, f := range fs {
			if f.Attrs().Priority != tcPrio || f.Type() != "u32" {
				return false, nil
			}
		}
	}
	return true, nil
}

// syncMirred makes the filters at parent exactly one match-all u32 with the given mirred actions (none if
// want is empty). An unchanged filter is left alone.
func (p *Plane) syncMirred(l netlink.Link, parent uint32, want []mirredSpec) error {
	fs, err := p.h.FilterList(l, parent)
	if err != nil {
		return fmt.Errorf("list filters: %w", err)
	}
	var ours []netlink.Filter
	for _, f := range fs {
		if f.Attrs().Priority == tcPrio {
			ours = append(ours, f)
		}
	}
	if len(ours) == 1 && len(want) > 0 {
		if u, ok := ours[0].(*netlink.U32); ok && sameMirred(u.Actions, want) {
			return nil
		}
	}
	// u32 filters at one priority share a handle space; remove them all and add the one we want.
	for _, f := range ours {
		if err := p.h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete filter: %w", err)
		}
	}
	if len(want) == 0 {
		return nil
	}
	f := &netlink.U32{FilterAttrs: netlink.FilterAttrs{LinkIndex: l.Attrs().Index, Parent: parent, Priority: tcPrio, Protocol: unix.ETH_P_ALL}}
	for _, m := range want {
		a := &netlink.MirredAction{ActionAttrs: netlink.ActionAttrs{Action: netlink.TC_ACT_PIPE}, MirredAction: m.act, Ifindex: m.ifindex}
		if m.act == netlink.TCA_EGRESS_REDIR || m.act == netlink.TCA_INGRESS_REDIR {
			a.Action = netlink.TC_ACT_STOLEN
		}
		f.Actions = append(f.Actions, a)
	}
	if err := p.h.FilterAdd(f); err != nil {
		return fmt.Errorf("add filter: %w", err)
	}
	return nil
}

func sameMirred(have []netlink.Action, want []mirredSpec) bool {
	if len(have) != len(want) {
		return false
	}
	for i, a := range have {
		m, ok := a.(*netlink.MirredAction)
		if !ok || m.MirredAction != want[i].act || m.Ifindex != want[i].ifindex {
			return false
		}
	}
	return true
}

// ensureIFB makes the host's bandwidth scheduler: the ifb device, its htb and one class per port with
// bandwidth settings, chosen by source MAC.
func (p *Plane) ensureIFB(d *desired, links map[string]netlink.Link) (netlink.Link, error) {
	name := ifbName(p.prefix)
	l := links[name]
	if l != nil && (l.Type() != "ifb" || l.Attrs().Alias != p.marker("ifb")) {
		if l.Type() == "ifb" && l.Attrs().Alias == "" {
			p.log.Warn("adopting unmarked ifb with our name", "ifb", name)
		} else {
			return nil, fmt.Errorf("interface %s exists and is not the plane's ifb", name)
		}
	}
	if l == nil {
		la := netlink.NewLinkAttrs()
		la.Name = name
		if err := p.h.LinkAdd(&netlink.Ifb{LinkAttrs: la}); err != nil {
			return nil, fmt.Errorf("create %s: %w", name, err)
		}
		var err error
		if l, err = p.h.LinkByName(name); err != nil {
			return nil, err
		}
		p.log.Info("created bandwidth scheduler", "ifb", name)
	}
	if l.Attrs().Alias != p.marker("ifb") {
		if err := p.initOwned(l, "ifb"); err != nil {
			return nil, err
		}
	}
	if !isUp(l) {
		if err := p.h.LinkSetUp(l); err != nil {
			return nil, err
		}
	}
	uplink := d.s.UplinkBps
	if uplink == 0 {
		uplink = defaultUplink
	}
	idx := l.Attrs().Index
	root := netlink.MakeHandle(1, 0)
	qds, err := p.h.QdiscList(l)
	if err != nil {
		return nil, err
	}
	hasHTB := false
	for _, q := range qds {
		if q.Type() == "htb" && q.Attrs().Handle == root && q.Attrs().Parent == netlink.HANDLE_ROOT {
			hasHTB = q.(*netlink.Htb).Defcls == defaultClass
		}
	}
	if !hasHTB {
		q := netlink.NewHtb(netlink.QdiscAttrs{LinkIndex: idx, Handle: root, Parent: netlink.HANDLE_ROOT})
		q.Defcls = defaultClass
		if err := p.h.QdiscReplace(q); err != nil {
			return nil, fmt.Errorf("htb on %s: %w", name, err)
		}
	}

	// Classes: the uplink, the default, and one per port keyed by MAC (the assignment read back from filters).
	classes, err := p.h.ClassList(l, root)
	if err != nil {
		return nil, fmt.Errorf("list classes: %w", err)
	}
	cur := map[uint32]*netlink.HtbClass{}
	for _, c := range classes {
		if h, ok := c.(*netlink.HtbClass); ok {
			cur[h.Handle] = h
		}
	}
	fs, err := p.h.FilterList(l, root)
	if err != nil {
		return nil, fmt.Errorf("list filters: %w", err)
	}
	byMAC := map[string]uint32{} // MAC -> minor
	filters := map[string]netlink.Filter{}
	for _, f := range fs {
		u, ok := f.(*netlink.U32)
		if !ok || u.Sel == nil || len(u.Sel.Keys) != 2 {
			continue
		}
		mac := macOfKeys(u.Sel.Keys)
		if mac == "" || u.ClassId>>16 != 1 {
			continue
		}
		byMAC[mac] = u.ClassId & 0xffff
		filters[mac] = f
	}
	type want struct {
		rate, ceil uint64 // bit/s
		port       string
	}
	wanted := map[string]want{}
	for _, tap := range sortedKeys(d.ports) {
		pt := d.ports[tap]
		if pt.Policy.MaxBps == 0 && pt.Policy.MinBps == 0 {
			continue
		}
		ceil := min(pt.Policy.MaxBps, uplink)
		if ceil == 0 {
			ceil = uplink
		}
		rate := pt.Policy.MinBps
		if rate == 0 {
			rate = min(uplink/100, ceil) // no guarantee: a small share, borrowing up to the ceiling
		}
		wanted[pt.MAC.String()] = want{min(rate, ceil), ceil, pt.Name}
	}

	setClass := func(minor uint32, parent uint32, rate, ceil uint64) error {
		h := netlink.MakeHandle(1, uint16(minor))
		if c := cur[h]; c != nil && c.Rate == rate/8 && c.Ceil == ceil/8 && c.Parent == parent {
			return nil
		}
		c := netlink.NewHtbClass(netlink.ClassAttrs{LinkIndex: idx, Handle: h, Parent: parent}, netlink.HtbClassAttrs{Rate: rate, Ceil: ceil})
		if err := p.h.ClassReplace(c); err != nil {
			return fmt.Errorf("class 1:%x: %w", minor, err)
		}
		return nil
	}
	top := netlink.MakeHandle(1, 1)
	if err := setClass(1, root, uplink, uplink); err != nil {
		return nil, err
	}
	if err := setClass(defaultClass, top, uplink/100, uplink); err != nil {
		return nil, err
	}
	// Stale ports first, freeing their minors.
	for _, mac := range sortedKeys(byMAC) {
		if _, ok := wanted[mac]; ok {
			continue
		}
		if err := p.h.FilterDel(filters[mac]); err != nil && !errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("delete filter of %s: %w", mac, err)
		}
		if c := cur[netlink.MakeHandle(1, uint16(byMAC[mac]))]; c != nil {
			if err := p.h.ClassDel(c); err != nil && !errors.Is(err, unix.ENOENT) {
				return nil, fmt.Errorf("delete class of %s: %w", mac, err)
			}
		}
		delete(byMAC, mac)
	}
	used := map[uint32]bool{1: true, defaultClass: true}
	for _, m := range byMAC {
		used[m] = true
	}
	next := uint32(2)
	for _, mac := range sortedKeys(wanted) {
		w := wanted[mac]
		minor, ok := byMAC[mac]
		if !ok {
			for used[next] {
				next++
			}
			if next >= defaultClass {
				return nil, errors.New("too many ports with bandwidth settings on this host")
			}
			minor, used[next] = next, true
		}
		if err := setClass(minor, top, w.rate, w.ceil); err != nil {
			return nil, fmt.Errorf("port %s: %w", w.port, err)
		}
		if ok {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		f := &netlink.U32{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: root, Priority: tcPrio, Protocol: unix.ETH_P_ALL},
			ClassId:     netlink.MakeHandle(1, uint16(minor)),
			Sel:         &netlink.TcU32Sel{Flags: netlink.TC_U32_TERMINAL, Keys: macKeys(hw)},
		}
		if err := p.h.FilterAdd(f); err != nil {
			return nil, fmt.Errorf("port %s: classify by MAC: %w", w.port, err)
		}
		p.log.Info("set send bandwidth", "port", w.port, "min_bps", w.rate, "max_bps", w.ceil)
	}
	return l, nil
}

// macKeys match the source MAC: u32 offsets count from the network header, which the Ethernet header precedes
// by 14 bytes (the source MAC is bytes -8 to -3).
func macKeys(mac net.HardwareAddr) []netlink.TcU32Key {
	return []netlink.TcU32Key{
		{Mask: 0xffffffff, Val: binary.BigEndian.Uint32(mac[0:4]), Off: -8},
		{Mask: 0xffff0000, Val: uint32(binary.BigEndian.Uint16(mac[4:6])) << 16, Off: -4},
	}
}

func macOfKeys(keys []netlink.TcU32Key) string {
	k := append([]netlink.TcU32Key(nil), keys...)
	sort.Slice(k, func(i, j int) bool { return k[i].Off < k[j].Off })
	if k[0].Off != -8 || k[0].Mask != 0xffffffff || k[1].Off != -4 || k[1].Mask != 0xffff0000 {
		return ""
	}
	b := make([]byte, 6)
	binary.BigEndian.PutUint32(b[0:4], k[0].Val)
	binary.BigEndian.PutUint16(b[4:6], uint16(k[1].Val>>16))
	return net.HardwareAddr(b).String()
}
