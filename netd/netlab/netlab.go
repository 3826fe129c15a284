// Package netlab builds throwaway network labs out of network namespaces, for netd's tests and benchmarks:
// an underlay namespace with a bridge, "hosts" joined to it by veth (192.0.2.x/24 on their eth0), and "VMs"
// whose eth0 is a veth whose other end sits in a host namespace (where netd adopts it as the port's tap).
// Nothing is ever created in the caller's own namespace, every namespace name starts with the lab's unique
// ID, and Close deletes every namespace (which takes every interface in it along). It depends only on the
// netlink and netns libraries and on iproute2's `ip netns exec` to run programs inside namespaces.
package netlab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Check returns why labs cannot be built here (not root, no iproute2, namespaces unavailable), or nil.
func Check() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, veth, nftables, tc)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("needs iproute2's ip (ip netns exec)")
	}
	name := fmt.Sprintf("bsprobe%d", os.Getpid())
	ns, err := newNamedNS(name)
	if err != nil {
		return fmt.Errorf("cannot create a network namespace: %w", err)
	}
	ns.Close()
	if err := netns.DeleteNamed(name); err != nil {
		return fmt.Errorf("cannot delete a network namespace: %w", err)
	}
	return nil
}

func newNamedNS(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return netns.None(), err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		return netns.None(), err
	}
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in the new namespace; keep it locked so the runtime discards it.
		runtime.LockOSThread()
		return ns, fmt.Errorf("return to the original namespace: %w", err)
	}
	return ns, nil
}

// NS is one named namespace of the lab.
type NS struct {
	Name string
	// Handle is an open descriptor of the namespace (owned by the lab).
	Handle netns.NsHandle
	// NL is a netlink handle inside the namespace.
	NL *netlink.Handle
}

// Host is a namespace on the underlay.
type Host struct {
	*NS
	// IP is the host's underlay address on its eth0.
	IP netip.Addr
}

// VM is a namespace whose eth0 is plugged into a host.
type VM struct {
	*NS
	MAC net.HardwareAddr
	// Addrs are eth0's addresses with their prefix lengths.
	Addrs []netip.Prefix
	// Tap is the name of eth0's peer in the host namespace.
	Tap string
	// Host is the host the VM is plugged into.
	Host *Host
}

// IP is the VM's first address.
func (v *VM) IP() netip.Addr { return v.Addrs[0].Addr() }

// Lab is a set of namespaces with one owner.
type Lab struct {
	// ID starts every namespace name of the lab; it must be unique on the machine.
	ID       string
	Underlay *NS
	Hosts    []*Host

	mu  sync.Mutex
	all []*NS
}

// UnderlayNet is the hosts' underlay subnet; host i (from 0) is .i+1, extra namespaces (AddUnderlayNS) from .100.
var UnderlayNet = netip.MustParsePrefix("192.0.2.0/24")

// New builds a lab with n hosts (namespaces <id>-h1..) on one underlay bridge (namespace <id>-ul). On error
// everything built so far is deleted.
func New(id string, n int) (_ *Lab, err error) {
	if len(id)+4 > 64 {
		return nil, fmt.Errorf("lab ID %q is too long", id)
	}
	l := &Lab{ID: id}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if l.Underlay, err = l.NewNS("ul"); err != nil {
		return nil, err
	}
	// The underlay bridge stands in for a physical switch, which does not run netfilter on what it forwards;
	// a new namespace has bridge-nf-call-* on, which would charge the lab's VXLAN path for a cost no real
	// underlay has.
	if err := l.Underlay.Do(func() error {
		for _, k := range []string{"iptables", "ip6tables", "arptables"} {
			if err := os.WriteFile("/proc/sys/net/bridge/bridge-nf-call-"+k, []byte("0"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("underlay bridge netfilter off: %w", err)
	}
	ubr := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "ubr"}}
	if err := l.Underlay.NL.LinkAdd(ubr); err != nil {
		return nil, fmt.Errorf("underlay bridge: %w", err)
	}
	if err := l.Underlay.NL.LinkSetUp(ubr); err != nil {
		return nil, fmt.Errorf("underlay bridge up: %w", err)
	}
	for i := range n {
		ip := netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)})
		ns, err := l.AddUnderlayNS(fmt.Sprintf("h%d", i+1), ip)
		if err != nil {
			return nil, err
		}
		l.Hosts = append(l.Hosts, &Host{NS: ns, IP: ip})
	}
	return l, nil
}

// NewPair builds a lab of two hosts whose eth0s are the two ends of one veth pair (a back-to-back cable,
// 192.0.2.1 and 192.0.2.2): no underlay namespace, so a benchmark pays only for the hosts' own work, as it
// would on a physical network. Underlay is nil.
func NewPair(id string) (_ *Lab, err error) {
	l := &Lab{ID: id}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	for i := range 2 {
		ns, err := l.NewNS(fmt.Sprintf("h%d", i+1))
		if err != nil {
			return nil, err
		}
		l.Hosts = append(l.Hosts, &Host{NS: ns, IP: netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)})})
	}
	la := netlink.NewLinkAttrs()
	la.Name = "eth0"
	if err := l.Hosts[0].NL.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(l.Hosts[1].Handle))}); err != nil {
		return nil, fmt.Errorf("host link: %w", err)
	}
	for _, h := range l.Hosts {
		eth, err := h.NL.LinkByName("eth0")
		if err != nil {
			return nil, err
		}
		if err := h.NL.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: h.IP.AsSlice(), Mask: net.CIDRMask(UnderlayNet.Bits(), 32)}}); err != nil {
			return nil, err
		}
		if err := h.NL.LinkSetUp(eth); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// NewNS creates the namespace <id>-<suffix> with lo up.
func (l *Lab) NewNS(suffix string) (*NS, error) {
	name := l.ID + "-" + suffix
	h, err := newNamedNS(name)
	if err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		netns.DeleteNamed(name)
		return nil, fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	ns := &NS{Name: name, Handle: h, NL: nl}
	l.mu.Lock()
	l.all = append(l.all, ns)
	l.mu.Unlock()
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		return nil, fmt.Errorf("lo up in %s: %w", name, err)
	}
	return ns, nil
}

// AddUnderlayNS creates a namespace <id>-<suffix> whose eth0 (address ip/24) is plugged into the underlay
// bridge: a host, or a server "outside" the virtual networks.
func (l *Lab) AddUnderlayNS(suffix string, ip netip.Addr) (*NS, error) {
	ns, err := l.NewNS(suffix)
	if err != nil {
		return nil, err
	}
	ubr, err := l.Underlay.NL.LinkByName("ubr")
	if err != nil {
		return nil, fmt.Errorf("underlay bridge: %w", err)
	}
	la := netlink.NewLinkAttrs()
	la.Name = "u-" + suffix
	la.MasterIndex = ubr.Attrs().Index
	if err := l.Underlay.NL.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns.Handle))}); err != nil {
		return nil, fmt.Errorf("underlay veth for %s: %w", ns.Name, err)
	}
	ul, err := l.Underlay.NL.LinkByName(la.Name)
	if err != nil {
		return nil, err
	}
	if err := l.Underlay.NL.LinkSetUp(ul); err != nil {
		return nil, err
	}
	eth, err := ns.NL.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	if err := ns.NL.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(UnderlayNet.Bits(), 32)}}); err != nil {
		return nil, fmt.Errorf("address of %s: %w", ns.Name, err)
	}
	if err := ns.NL.LinkSetUp(eth); err != nil {
		return nil, err
	}
	return ns, nil
}

// AddVM creates the namespace <id>-<name> whose eth0 (mac, addrs, MTU 1450) is the peer of tap in host h.
func (l *Lab) AddVM(h *Host, name, tap string, mac net.HardwareAddr, addrs ...netip.Prefix) (*VM, error) {
	ns, err := l.NewNS(name)
	if err != nil {
		return nil, err
	}
	v := &VM{NS: ns, MAC: mac, Addrs: addrs}
	if err := v.PlugInto(h, tap); err != nil {
		return nil, err
	}
	return v, nil
}

// PlugInto (re)creates the VM's eth0 as the peer of tap in host h, keeping MAC and addresses: after a move
// (the old veth, if any, is deleted with its peer).
func (v *VM) PlugInto(h *Host, tap string) error {
	if old, err := v.NL.LinkByName("eth0"); err == nil {
		if err := v.NL.LinkDel(old); err != nil {
			return fmt.Errorf("unplug %s: %w", v.Name, err)
		}
	}
	la := netlink.NewLinkAttrs()
	la.Name = tap
	if err := h.NL.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerHardwareAddr: v.MAC, PeerNamespace: netlink.NsFd(int(v.Handle))}); err != nil {
		return fmt.Errorf("veth %s for %s in %s: %w", tap, v.Name, h.Name, err)
	}
	eth, err := v.NL.LinkByName("eth0")
	if err != nil {
		return err
	}
	if err := v.NL.LinkSetMTU(eth, 1450); err != nil {
		return err
	}
	for _, a := range v.Addrs {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())}}
		if a.Addr().Is6() {
			addr.Flags = 0x02 // IFA_F_NODAD: usable at once
		}
		if err := v.NL.AddrAdd(eth, addr); err != nil {
			return fmt.Errorf("address %s of %s: %w", a, v.Name, err)
		}
	}
	if err := v.NL.LinkSetUp(eth); err != nil {
		return err
	}
	v.Tap, v.Host = tap, h
	return nil
}

// Close deletes every namespace of the lab. It is safe to call more than once.
func (l *Lab) Close() error {
	l.mu.Lock()
	all := l.all
	l.all = nil
	l.mu.Unlock()
	var errs []error
	for i := len(all) - 1; i >= 0; i-- {
		ns := all[i]
		ns.NL.Close()
		ns.Handle.Close()
		if err := netns.DeleteNamed(ns.Name); err != nil {
			errs = append(errs, fmt.Errorf("delete namespace %s: %w", ns.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Run runs a program inside the namespace and returns its combined output.
func (ns *NS) Run(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s in %s: %w: %s", strings.Join(args, " "), ns.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Command returns a command that runs inside the namespace, for programs that run in the background.
func (ns *NS) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name}, args...)...)
}

// Do runs fn on a locked OS thread inside the namespace (for sockets that must be created there).
func (ns *NS) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(ns.Handle); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter %s: %w", ns.Name, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime discards it when the goroutine ends.
		return errors.Join(ferr, fmt.Errorf("leave %s: %w", ns.Name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Ping sends count pings 0.2 s apart from the namespace and reports whether one was answered.
func (ns *NS) Ping(ctx context.Context, count int, dst string, args ...string) bool {
	a := append([]string{"busybox", "ping", "-q", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "1"}, args...)
	_, err := ns.Run(ctx, append(a, dst)...)
	return err == nil
}

// WaitForwarding waits until the bridge port ifname in ns is forwarding: a port whose carrier just came up
// forwards only once the kernel's linkwatch has seen it (up to a second later). A tap without a hypervisor
// attached has no carrier and counts as ready.
func (ns *NS) WaitForwarding(ctx context.Context, ifname string) error {
	for {
		out, err := exec.CommandContext(ctx, "ip", "-n", ns.Name, "-j", "-d", "link", "show", "dev", ifname).Output()
		var links []struct {
			Linkinfo struct {
				InfoKind      string `json:"info_kind"`
				InfoSlaveData struct {
					State string `json:"state"`
				} `json:"info_slave_data"`
			} `json:"linkinfo"`
		}
		if err == nil && json.Unmarshal(out, &links) == nil && len(links) == 1 {
			li := links[0].Linkinfo
			if li.InfoSlaveData.State == "forwarding" || li.InfoKind == "tun" {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s in %s not forwarding: %w", ifname, ns.Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Links lists the interface names of the namespace.
func (ns *NS) Links() ([]string, error) {
	ls, err := ns.NL.LinkList()
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ls))
	for _, l := range ls {
		out = append(out, l.Attrs().Name)
	}
	return out, nil
}
