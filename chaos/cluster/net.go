package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Prefix starts the name of every namespace, interface and tmpfs the harness creates, so that a later run can
// find and remove what a crashed one left behind.
const Prefix = "bch-"

// bridgeName is the shared bridge in the root namespace: the "switch" every host is cabled to.
const bridgeName = Prefix + "br"

// Subnet is the chaos network: the bridge is .1, host i is .10+i, etcd member i is .20+i. It is a private range
// nothing else on our machines uses; Start refuses to run if another interface already has an address in it.
var Subnet = netip.MustParsePrefix("10.213.0.0/24")

// BridgeIP is the root namespace's address on the chaos bridge, where metad listens.
var BridgeIP = netip.MustParseAddr("10.213.0.1")

func subnetAddr(last byte) netip.Addr {
	a := Subnet.Addr().As4()
	a[3] = last
	return netip.AddrFrom4(a)
}

func ipNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(Subnet.Bits(), 32)}
}

// netnsDir is where iproute2 (and the netns library) keep named network namespaces.
const netnsDir = "/var/run/netns"

// nsPath is the bind mount that names a network namespace.
func nsPath(name string) string { return filepath.Join(netnsDir, name) }

// createBridge creates the chaos bridge with BridgeIP and brings it up.
func createBridge() error {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := netlink.LinkAdd(br); err != nil {
		return fmt.Errorf("create bridge %s: %w", bridgeName, err)
	}
	if err := netlink.AddrAdd(br, &netlink.Addr{IPNet: ipNet(BridgeIP)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", BridgeIP, bridgeName, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return fmt.Errorf("bring up %s: %w", bridgeName, err)
	}
	return nil
}

// checkSubnetFree fails when an interface the harness did not create has an address in Subnet: the chaos
// network would then shadow or be shadowed by a real one.
func checkSubnetFree() error {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || !Subnet.Contains(ip.Unmap()) {
			continue
		}
		l, err := netlink.LinkByIndex(a.LinkIndex)
		if err == nil && strings.HasPrefix(l.Attrs().Name, Prefix) {
			continue
		}
		return fmt.Errorf("address %s is already in use on this machine (interface index %d); the chaos network needs %s", ip, a.LinkIndex, Subnet)
	}
	return nil
}

// newNamedNS creates a named network namespace with lo up, without moving the calling goroutine's thread
// into it for longer than the creation.
func newNamedNS(name string) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("current network namespace: %w", err)
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		return fmt.Errorf("create network namespace %s: %w", name, err)
	}
	defer ns.Close()
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if serr := netns.Set(orig); serr != nil {
		// The thread is stuck in the new namespace: leave it locked so the runtime discards it.
		runtime.LockOSThread()
		return fmt.Errorf("return to the original network namespace: %w", serr)
	}
	if err != nil {
		return fmt.Errorf("bring up lo in %s: %w", name, err)
	}
	return nil
}

// cable connects namespace ns to the bridge: a veth whose root end is named like the namespace and enslaved
// to the bridge, and whose other end is eth0 inside ns with address ip.
func cable(ns string, ip netip.Addr) error {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", ns, err)
	}
	defer h.Close()
	br, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return fmt.Errorf("find %s: %w", bridgeName, err)
	}
	la := netlink.NewLinkAttrs()
	la.Name = ns
	la.MasterIndex = br.Attrs().Index
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(h))}); err != nil {
		return fmt.Errorf("veth %s to %s: %w", ns, bridgeName, err)
	}
	root, err := netlink.LinkByName(ns)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", ns, err)
	}
	if err := netlink.LinkSetUp(root); err != nil {
		return fmt.Errorf("bring up veth %s: %w", ns, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", ns, err)
	}
	defer nl.Close()
	eth, err := nl.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find eth0 in %s: %w", ns, err)
	}
	if err := nl.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(ip)}); err != nil {
		return fmt.Errorf("address %s in %s: %w", ip, ns, err)
	}
	if err := nl.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bring up eth0 in %s: %w", ns, err)
	}
	return nil
}

// setCable brings the root end of a namespace's veth down (the cable is pulled: both ends lose carrier) or up.
func setCable(ns string, up bool) error {
	l, err := netlink.LinkByName(ns)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", ns, err)
	}
	if up {
		err = netlink.LinkSetUp(l)
	} else {
		err = netlink.LinkSetDown(l)
	}
	if err != nil {
		return fmt.Errorf("set veth %s up=%v: %w", ns, up, err)
	}
	return nil
}

// dropTable is the nftables table a firewall partition installs inside a host's namespace.
const dropTable = "bch_partition"

// setFirewall installs (drop) or removes an nftables table in namespace ns that drops every packet in and out
// of eth0: the link stays up, the traffic silently vanishes (a firewall or switch fault rather than a pulled
// cable).
func setFirewall(ns string, drop bool) error {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", ns, err)
	}
	defer h.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		return fmt.Errorf("nftables in %s: %w", ns, err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: dropTable}
	if !drop {
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			return fmt.Errorf("list nftables tables in %s: %w", ns, err)
		}
		for _, x := range tables {
			if x.Name == dropTable {
				c.DelTable(t)
				if err := c.Flush(); err != nil {
					return fmt.Errorf("remove the partition table in %s: %w", ns, err)
				}
			}
		}
		return nil
	}
	c.AddTable(t)
	for _, hook := range []struct {
		name string
		hook *nftables.ChainHook
		key  expr.MetaKey
	}{{"in", nftables.ChainHookInput, expr.MetaKeyIIFNAME}, {"out", nftables.ChainHookOutput, expr.MetaKeyOIFNAME}} {
		ch := c.AddChain(&nftables.Chain{Name: hook.name, Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook.hook,
			Priority: nftables.ChainPriorityRef(-300)})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: hook.key, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("eth0")},
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install the partition table in %s: %w", ns, err)
	}
	return nil
}

// ifname is an interface name as nftables compares it: NUL-padded to IFNAMSIZ.
func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// Do runs fn on a locked OS thread inside network namespace ns, for sockets that must be made there.
func Do(ns string, fn func() error) error {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", ns, err)
	}
	defer h.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current network namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter %s: %w", ns, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime discards it when the goroutine ends.
		return errors.Join(ferr, fmt.Errorf("leave %s: %w", ns, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// DialFrom opens a TCP connection to addr from inside namespace ns (the root namespace when ns is empty),
// within timeout.
func DialFrom(ctx context.Context, ns, addr string, timeout time.Duration) error {
	dial := func() error {
		d := net.Dialer{Timeout: timeout}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
	if ns == "" {
		return dial()
	}
	// The socket is created on the locked thread, in the namespace; the connect may then finish anywhere.
	return Do(ns, dial)
}

// removeNet deletes the named namespaces (their processes must be gone), their veths and the bridge: what one
// run created, and nothing else.
func removeNet(namespaces []string) error {
	var errs []error
	for _, ns := range namespaces {
		if _, err := os.Stat(nsPath(ns)); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := netns.DeleteNamed(ns); err != nil {
			errs = append(errs, fmt.Errorf("delete network namespace %s: %w", ns, err))
		}
	}
	for _, name := range append(namespaces, bridgeName) {
		l, err := netlink.LinkByName(name)
		if err != nil {
			continue // gone with its namespace, or never made
		}
		if err := netlink.LinkDel(l); err != nil {
			if _, gone := netlink.LinkByName(name); gone == nil {
				errs = append(errs, fmt.Errorf("delete interface %s: %w", name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// cleanupNet removes every network namespace and root-namespace interface whose name starts with Prefix. The
// processes inside the namespaces must be gone first (killLeftovers).
func cleanupNet() error {
	var errs []error
	ents, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("list %s: %w", netnsDir, err))
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), Prefix) {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				errs = append(errs, fmt.Errorf("delete network namespace %s: %w", e.Name(), err))
			}
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list interfaces: %w", err))...)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, Prefix) {
			// Deleting a veth's root end takes its peer along; a namespace's deletion does the same, but lazily.
			if err := netlink.LinkDel(l); err != nil && !errors.Is(err, os.ErrNotExist) {
				if _, gone := netlink.LinkByName(l.Attrs().Name); gone == nil {
					errs = append(errs, fmt.Errorf("delete interface %s: %w", l.Attrs().Name, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}
