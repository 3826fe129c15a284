package dataplane

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Options configure a Plane.
type Options struct {
	// Prefix starts the name of every bridge (<prefix>b<VNI>) and VXLAN device
	// (<prefix>x<VNI>) the plane manages, and is part of the ownership marker (the
	// interface alias "basalt:<prefix>:<kind>"). 1..6 characters of [a-z0-9],
	// starting with a letter. Default "bs".
	Prefix string
	// Table is the name of the nftables table (family bridge) the plane owns.
	// Default "basalt".
	Table string
	// NetNS is the network namespace to program. A value <= 0 means the namespace
	// of the calling thread at New. The plane duplicates the handle; the caller
	// keeps ownership of its own.
	NetNS netns.NsHandle
	// Logger receives one line per change the plane makes. Default slog.Default().
	Logger *slog.Logger
	// GatewayNetNS starts the names of the gateway namespaces, "<GatewayNetNS>-<VNI>" under /run/netns.
	// Default "basalt-gw". Names are global to the machine: two planes need two values.
	GatewayNetNS string
	// TransitPool is where gateways get the /30 linking them to the host. Default 169.254.64.0/18.
	TransitPool netip.Prefix
	// NFTTrust lets Apply skip reading the nftables table back when the desired ruleset is the one the
	// plane itself verified or wrote less than NFTTrust ago: on a host with 1,000 ports the read costs about
	// half a second, which every change (a port moving elsewhere) would pay. A change made to the table by
	// someone else is then repaired by the first Apply after NFTTrust. 0 (the default) reads every time.
	NFTTrust time.Duration
}

// Plane programs one host's virtual switch. It is safe for concurrent use; calls are
// serialised.
type Plane struct {
	mu     sync.Mutex
	prefix string
	table  *nftables.Table
	log    *slog.Logger
	ns     netns.NsHandle
	h      *netlink.Handle
	nft    *nftables.Conn
	last   *HostState // the last state applied successfully, for Counters
	setID  uint32     // nftables set IDs for transactions (the library's allocator is not goroutine-safe)
	closed bool

	gwNS    string
	transit netip.Prefix

	nftTrust    time.Duration
	nftVerified string    // fingerprint of the ruleset last verified or written
	nftReadAt   time.Time // when the table was last read back
}

// New opens netlink and nftables connections into the target namespace.
func New(opts Options) (*Plane, error) {
	if opts.Prefix == "" {
		opts.Prefix = "bs"
	}
	if len(opts.Prefix) > maxPrefixLen || !prefixRE.MatchString(opts.Prefix) {
		return nil, fmt.Errorf("dataplane: prefix %q must be 1..%d of [a-z0-9] starting with a letter", opts.Prefix, maxPrefixLen)
	}
	if opts.Table == "" {
		opts.Table = "basalt"
	}
	if !tableRE.MatchString(opts.Table) || len(opts.Table) > 64 {
		return nil, fmt.Errorf("dataplane: invalid nftables table name %q", opts.Table)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.GatewayNetNS == "" {
		opts.GatewayNetNS = "basalt-gw"
	}
	if !ifNameRE.MatchString(opts.GatewayNetNS) || len(opts.GatewayNetNS) > 200 {
		return nil, fmt.Errorf("dataplane: invalid gateway namespace prefix %q", opts.GatewayNetNS)
	}
	if !opts.TransitPool.IsValid() {
		opts.TransitPool = netip.MustParsePrefix("169.254.64.0/18")
	}
	if !opts.TransitPool.Addr().Is4() || opts.TransitPool.Bits() > 30 {
		return nil, fmt.Errorf("dataplane: transit pool %v must be an IPv4 prefix of at most /30", opts.TransitPool)
	}
	var ns netns.NsHandle
	var err error
	if opts.NetNS > 0 {
		ns, err = dupNS(opts.NetNS)
	} else {
		ns, err = netns.Get()
	}
	if err != nil {
		return nil, fmt.Errorf("dataplane: %w", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("dataplane: netlink handle: %w", err)
	}
	p := &Plane{
		prefix:   opts.Prefix,
		table:    &nftables.Table{Name: opts.Table, Family: nftables.TableFamilyBridge},
		log:      opts.Logger.With("component", "dataplane"),
		ns:       ns,
		h:        h,
		gwNS:     opts.GatewayNetNS,
		transit:  opts.TransitPool.Masked(),
		nftTrust: opts.NFTTrust,
	}
	if err := p.openNFT(); err != nil {
		h.Close()
		ns.Close()
		return nil, err
	}
	return p, nil
}

// nftBuffer bounds one nftables transaction and the acknowledgements it brings back: the whole policy
// change is one batch in one sendmsg (that is what makes it atomic), and the kernel queues one ACK per
// message before the batch's sender reads any. A host with 1,000 ports needs about 35,000 messages; the
// default socket buffers (about 200 KiB) fail it with EMSGSIZE.
const nftBuffer = 256 << 20

// bigBuffers raises the socket's buffers past the system's limits (CAP_NET_ADMIN), or as far as allowed.
func bigBuffers(c *mnl.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], nftBuffer); e != nil {
				if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], nftBuffer); e != nil {
					serr = e
				}
			}
		}
	})
	return errors.Join(err, serr)
}

func (p *Plane) openNFT() error {
	c, err := nftables.New(nftables.WithNetNSFd(int(p.ns)), nftables.AsLasting(), nftables.WithSockOptions(bigBuffers))
	if err != nil {
		return fmt.Errorf("dataplane: nftables connection: %w", err)
	}
	p.nft = c
	return nil
}

// resetNFT replaces the nftables connection after an error, so that a broken socket
// or a half-filled batch never leaks into the next call.
func (p *Plane) resetNFT() {
	if p.nft != nil {
		_ = p.nft.CloseLasting()
	}
	if err := p.openNFT(); err != nil {
		p.log.Error("reopen nftables connection", "err", err)
		p.nft = nil
	}
}

// Close releases the plane's handles. It does not touch the programmed state.
func (p *Plane) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	var err error
	if p.nft != nil {
		err = p.nft.CloseLasting()
	}
	p.h.Close()
	return errors.Join(err, p.ns.Close())
}

// dNet is a network resolved against the host.
type dNet struct {
	Network
	bridge, vxlan string
	gwport        string // the gateway's bridge port, if the network has a gateway
	mtu           int
	ports         []*Port      // local, sorted by tap
	remote        []RemotePort // sorted by MAC
	vteps         []netip.Addr // distinct remote VTEPs, sorted
}

type desired struct {
	s        HostState
	underlay netlink.Link
	nets     []*dNet // sorted by VNI
	byName   map[string]*dNet
	ports    map[string]*Port // by tap, including gateway ports
	byPort   map[string]*Port // by name
	// bif is the interface each port has on its bridge, by tap: the tap itself, or its extension tap.
	bif map[string]string
	// keep are the interfaces of the plane besides taps that must not be deleted or detached.
	keep   map[string]bool
	anyNAT bool
	anyQoS bool
}

func (p *Plane) marker(kind string) string { return "basalt:" + p.prefix + ":" + kind }

// normalize returns a deep-enough copy of s with unmapped addresses.
func normalize(s HostState) HostState {
	out := s
	out.UnderlayIP = s.UnderlayIP.Unmap()
	out.Networks = append([]Network(nil), s.Networks...)
	out.Ports = make([]Port, len(s.Ports))
	for i, pt := range s.Ports {
		pt.IPs = unmapAll(pt.IPs)
		pt.MAC = append(net.HardwareAddr(nil), pt.MAC...)
		pt.Policy.ACL = append([]ACLRule(nil), pt.Policy.ACL...)
		out.Ports[i] = pt
	}
	out.Remote = make([]RemotePort, len(s.Remote))
	for i, r := range s.Remote {
		r.IPs = unmapAll(r.IPs)
		r.HostVTEP = r.HostVTEP.Unmap()
		r.MAC = append(net.HardwareAddr(nil), r.MAC...)
		out.Remote[i] = r
	}
	return out
}

func unmapAll(in []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, len(in))
	for i, a := range in {
		out[i] = a.Unmap()
	}
	return out
}

func (p *Plane) resolve(s HostState) (*desired, error) {
	var ul netlink.Link
	if len(s.Networks) > 0 {
		var err error
		ul, err = p.h.LinkByName(s.UnderlayDev)
		if err != nil {
			return nil, fmt.Errorf("underlay device %q: %w", s.UnderlayDev, err)
		}
	}
	d := resolveWith(p.prefix, s, ul)
	for _, n := range d.nets {
		if n.mtu < 68 {
			return nil, fmt.Errorf("network %q: MTU %d too small", n.Name, n.mtu)
		}
	}
	return d, nil
}

// resolveWith computes names, MTUs and per-network views of a validated state.
func resolveWith(prefix string, s HostState, ul netlink.Link) *desired {
	d := &desired{s: s, byName: map[string]*dNet{}, ports: map[string]*Port{}, byPort: map[string]*Port{},
		bif: map[string]string{}, keep: map[string]bool{}, underlay: ul}
	for _, n := range s.Networks {
		dn := &dNet{Network: n, bridge: bridgeName(prefix, n.VNI), vxlan: vxlanName(prefix, n.VNI), mtu: n.MTU}
		if dn.mtu == 0 {
			over := vxlanOverhead
			if s.UnderlayIP.Is6() {
				over = vxlanOverhd6
			}
			dn.mtu = d.underlay.Attrs().MTU - over
		}
		d.nets = append(d.nets, dn)
		d.byName[n.Name] = dn
	}
	sort.Slice(d.nets, func(i, j int) bool { return d.nets[i].VNI < d.nets[j].VNI })
	for i := range s.Ports {
		pt := &s.Ports[i]
		dn := d.byName[pt.Network]
		dn.ports = append(dn.ports, pt)
		d.ports[pt.Tap] = pt
		d.byPort[pt.Name] = pt
		d.bif[pt.Tap] = pt.Tap
		if pt.Policy.Extension {
			d.bif[pt.Tap] = ExtensionTap(prefix, pt.Tap)
			d.keep[d.bif[pt.Tap]] = true
		}
		d.anyQoS = d.anyQoS || pt.Policy.MaxBps != 0 || pt.Policy.MinBps != 0
	}
	for _, dn := range d.nets {
		if dn.Gateway == nil {
			continue
		}
		gp := gatewayPort(prefix, dn.Network)
		dn.gwport = gp.Tap
		dn.ports = append(dn.ports, &gp)
		d.ports[gp.Tap] = &gp
		d.bif[gp.Tap] = gp.Tap
		d.keep[gp.Tap], d.keep[gwWanName(prefix, dn.VNI)] = true, true
		d.anyNAT = d.anyNAT || dn.Gateway.NAT
	}
	for _, r := range s.Remote {
		dn := d.byName[r.Network]
		dn.remote = append(dn.remote, r)
	}
	for _, dn := range d.nets {
		sort.Slice(dn.ports, func(i, j int) bool { return dn.ports[i].Tap < dn.ports[j].Tap })
		sort.Slice(dn.remote, func(i, j int) bool { return dn.remote[i].MAC.String() < dn.remote[j].MAC.String() })
		seen := map[netip.Addr]bool{}
		for _, r := range dn.remote {
			if !seen[r.HostVTEP] {
				seen[r.HostVTEP] = true
				dn.vteps = append(dn.vteps, r.HostVTEP)
			}
		}
		sort.Slice(dn.vteps, func(i, j int) bool { return dn.vteps[i].Less(dn.vteps[j]) })
	}
	return d
}

// Apply converges the namespace to s: it creates what is missing, changes what
// differs and deletes what is no longer declared (only objects carrying the plane's
// marker: interfaces whose alias is "basalt:<prefix>:…", bridge FDB and neighbour
// entries on those interfaces, and the plane's nftables table). An object that
// already matches s is left untouched, so applying the same state twice makes no
// change at all. Apply stops at the first error; calling it again resumes.
//
// Order of work, chosen so that no frame crosses a port before its policy is in place:
//  1. detach or delete undeclared ports; delete stale FDB/neighbour entries;
//     delete undeclared gateways and networks;
//  2. create/update bridges and VXLAN devices, then gateways;
//  3. create missing taps (down, not attached);
//  4. one nftables transaction for the whole policy change;
//  5. attach taps to their bridges and bring them up;
//  6. mirroring and bandwidth (tc);
//  7. add/replace FDB and neighbour entries for remote ports.
func (p *Plane) Apply(ctx context.Context, s HostState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errors.New("dataplane: plane is closed")
	}
	s = normalize(s)
	if err := s.validate(p.prefix); err != nil {
		return fmt.Errorf("dataplane: invalid state: %w", err)
	}
	d, err := p.resolve(s)
	if err != nil {
		return fmt.Errorf("dataplane: %w", err)
	}
	steps := []struct {
		name string
		fn   func(*desired) error
	}{
		{"remove stale ports", p.removeStalePorts},
		{"remove stale fdb", func(d *desired) error { return p.reconcileFDB(d, true) }},
		{"remove stale gateways", p.removeStaleGateways},
		{"remove stale networks", p.removeStaleNetworks},
		{"ensure networks", p.ensureNetworks},
		{"ensure gateways", p.ensureGateways},
		{"ensure taps", p.ensureTaps},
		{"nftables", p.reconcileNFT},
		{"attach ports", p.attachPorts},
		{"traffic control", p.reconcileTC},
		{"fdb", func(d *desired) error { return p.reconcileFDB(d, false) }},
	}
	for _, st := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("dataplane: %s: %w", st.name, err)
		}
		start := time.Now()
		if err := st.fn(d); err != nil {
			return fmt.Errorf("dataplane: %s: %w", st.name, err)
		}
		p.log.Debug("apply step", "step", st.name, "took", time.Since(start))
	}
	p.last = &d.s
	return nil
}

// Counters returns the policy counters of every port of the last applied state,
// keyed by Port.Name.
func (p *Plane) Counters(ctx context.Context) (map[string]PortCounters, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("dataplane: plane is closed")
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	out := map[string]PortCounters{}
	if p.last == nil {
		return out, nil
	}
	if p.nft == nil {
		p.resetNFT()
		if p.nft == nil {
			return nil, errors.New("dataplane: no nftables connection")
		}
	}
	objs, err := p.nft.GetObjects(p.table)
	if err != nil {
		p.resetNFT()
		return nil, fmt.Errorf("dataplane: read counters: %w", err)
	}
	vals := map[string]Counter{}
	for _, o := range objs {
		if c, ok := o.(*nftables.CounterObj); ok {
			vals[c.Name] = Counter{Packets: c.Packets, Bytes: c.Bytes}
		}
	}
	for _, pt := range p.last.Ports {
		pc := PortCounters{
			SpoofDrops:     vals[counterName(pt.Tap, "spoof")],
			DHCPDrops:      vals[counterName(pt.Tap, "dhcp")],
			IsolationDrops: vals[counterName(pt.Tap, "isolation")],
		}
		for i, r := range pt.Policy.ACL {
			id := aclID(r, i)
			pc.ACL = append(pc.ACL, ACLCounter{ID: id, Counter: vals[counterName(pt.Tap, "acl."+id)]})
		}
		out[pt.Name] = pc
	}
	return out, nil
}

func counterName(tap, what string) string { return tap + "." + what }

// bridgeMAC is a stable locally administered MAC for a bridge, so the bridge's
// address does not follow its ports around.
func bridgeMAC(prefix string, vni uint32) net.HardwareAddr {
	h := fnv.New32a()
	h.Write([]byte(prefix))
	s := h.Sum32()
	return net.HardwareAddr{0x02, byte(s >> 8), byte(s), byte(vni >> 16), byte(vni >> 8), byte(vni)}
}

// Owns reports whether the namespace holds anything this plane manages: an interface carrying its marker or
// its nftables table. netd uses it to leave alone a host it never programmed while nothing is declared for it
// (a development cluster, a host without VMs). Without the privilege to read nftables, only interfaces count.
func (p *Plane) Owns(ctx context.Context) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false, errors.New("dataplane: plane is closed")
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	links, err := p.linkMap()
	if err != nil {
		return false, fmt.Errorf("dataplane: %w", err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Alias, "basalt:"+p.prefix+":") {
			return true, nil
		}
	}
	if p.nft == nil {
		p.resetNFT()
		if p.nft == nil {
			return false, errors.New("dataplane: no nftables connection")
		}
	}
	_, err = p.nft.ListTableOfFamily(p.table.Name, p.table.Family)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EPERM):
		return false, nil
	}
	p.resetNFT()
	return false, fmt.Errorf("dataplane: look for table %s: %w", p.table.Name, err)
}
