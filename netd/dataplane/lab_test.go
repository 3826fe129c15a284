package dataplane

// Test harness: "hosts" are network namespaces joined by veth to an underlay bridge
// living in its own namespace; "VMs" are namespaces whose eth0 is a veth whose other
// end sits in a host namespace and is handed to the Plane as the port's Tap. Nothing
// is created in the test process's own namespace, and every namespace is deleted in
// t.Cleanup, which takes every interface in it along.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

var (
	nsSeq    atomic.Int32
	skipOnce sync.Once
	skipWhy  string
)

// requireNetns skips the test unless we are root and can create network namespaces.
func requireNetns(t *testing.T) {
	t.Helper()
	skipOnce.Do(func() {
		if os.Geteuid() != 0 {
			skipWhy = "needs root (network namespaces, veth, nftables)"
			return
		}
		if _, err := exec.LookPath("ip"); err != nil {
			skipWhy = "needs iproute2's ip (ip netns exec)"
			return
		}
		name := fmt.Sprintf("bsprobe%d", os.Getpid())
		ns, err := newNamedNS(name)
		if err != nil {
			skipWhy = "cannot create a network namespace: " + err.Error()
			return
		}
		ns.Close()
		_ = netns.DeleteNamed(name)
		if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
			skipWhy = fmt.Sprintf("ip netns unavailable: %v %s", err, out)
		}
	})
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
}

// deleteGatewayNS deletes the gateway namespaces a plane created with this prefix (they live beside the
// lab's own namespaces under /run/netns).
func deleteGatewayNS(t *testing.T, prefix string) {
	ents, _ := os.ReadDir(netnsDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				t.Errorf("delete gateway namespace %s: %v", e.Name(), err)
			}
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

type lab struct {
	t     *testing.T
	id    string
	under *nsref
	hosts []*host
}

type nsref struct {
	name string
	ns   netns.NsHandle
	h    *netlink.Handle
}

type host struct {
	*nsref
	ip    netip.Addr
	plane *Plane
}

type vm struct {
	*nsref
	mac net.HardwareAddr
	ip  netip.Addr
	tap string
}

// newNS creates a named namespace with lo up; it is deleted at cleanup.
func (l *lab) newNS(suffix string) *nsref {
	t := l.t
	t.Helper()
	name := fmt.Sprintf("%s-%s", l.id, suffix)
	ns, err := newNamedNS(name)
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		_ = netns.DeleteNamed(name)
		t.Fatalf("netlink handle in %s: %v", name, err)
	}
	t.Cleanup(func() {
		h.Close()
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("lo up in %s: %v", name, err)
	}
	return &nsref{name: name, ns: ns, h: h}
}

// newLab builds n hosts on one underlay segment 192.0.2.0/24 (host i is 192.0.2.(i+1)).
func newLab(t *testing.T, n int) *lab {
	t.Helper()
	requireNetns(t)
	l := &lab{t: t, id: fmt.Sprintf("bsdp%d-%d", os.Getpid()%100000, nsSeq.Add(1))}
	l.under = l.newNS("ul")
	ubr := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "ubr"}}
	must(t, l.under.h.LinkAdd(ubr), "underlay bridge")
	must(t, l.under.h.LinkSetUp(ubr), "underlay bridge up")
	for i := 0; i < n; i++ {
		hs := &host{nsref: l.newNS(fmt.Sprintf("h%d", i+1)), ip: netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)})}
		la := netlink.NewLinkAttrs()
		la.Name = fmt.Sprintf("ul%d", i+1)
		la.MasterIndex = ubr.Index
		must(t, l.under.h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(hs.ns))}), "underlay veth")
		ul, err := l.under.h.LinkByName(la.Name)
		must(t, err, "underlay veth")
		must(t, l.under.h.LinkSetUp(ul), "underlay veth up")
		eth, err := hs.h.LinkByName("eth0")
		must(t, err, "host eth0")
		must(t, hs.h.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: hs.ip.AsSlice(), Mask: net.CIDRMask(24, 32)}}), "host addr")
		must(t, hs.h.LinkSetUp(eth), "host eth0 up")
		gwNS := fmt.Sprintf("%s-gw%d", l.id, i+1)
		p, err := New(Options{NetNS: hs.ns, GatewayNetNS: gwNS, Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		must(t, err, "New")
		t.Cleanup(func() { p.Close() })
		t.Cleanup(func() { deleteGatewayNS(t, gwNS) })
		hs.plane = p
		l.hosts = append(l.hosts, hs)
	}
	return l
}

// addOutside creates a namespace on the underlay segment (a server outside every virtual network).
func (l *lab) addOutside(name string, ip netip.Addr) *nsref {
	t := l.t
	t.Helper()
	r := l.newNS(name)
	ubr, err := l.under.h.LinkByName("ubr")
	must(t, err, "underlay bridge")
	la := netlink.NewLinkAttrs()
	la.Name = "o-" + name
	la.MasterIndex = ubr.Attrs().Index
	must(t, l.under.h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(r.ns))}), "outside veth")
	ul, err := l.under.h.LinkByName(la.Name)
	must(t, err, "outside veth")
	must(t, l.under.h.LinkSetUp(ul), "outside veth up")
	eth, err := r.h.LinkByName("eth0")
	must(t, err, "outside eth0")
	must(t, r.h.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(24, 32)}}), "outside addr")
	must(t, r.h.LinkSetUp(eth), "outside eth0 up")
	return r
}

// addVM creates a VM namespace whose eth0 (mac, ip/24) is the peer of tap in host h.
func (l *lab) addVM(h *host, name, tap, mac, ip string) *vm {
	t := l.t
	t.Helper()
	r := l.newNS(name)
	hw, err := net.ParseMAC(mac)
	must(t, err, "mac")
	la := netlink.NewLinkAttrs()
	la.Name = tap
	must(t, h.h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerHardwareAddr: hw, PeerNamespace: netlink.NsFd(int(r.ns))}), "vm veth")
	v := &vm{nsref: r, mac: hw, ip: netip.MustParseAddr(ip), tap: tap}
	v.plumb(t)
	return v
}

func (v *vm) plumb(t *testing.T) {
	t.Helper()
	eth, err := v.h.LinkByName("eth0")
	must(t, err, "vm eth0")
	must(t, v.h.LinkSetMTU(eth, 1450), "vm mtu")
	must(t, v.h.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: v.ip.AsSlice(), Mask: net.CIDRMask(24, 32)}}), "vm addr")
	must(t, v.h.LinkSetUp(eth), "vm eth0 up")
}

// moveVM re-plumbs v onto host to with a new veth named tap (the VM keeps MAC and IP).
func (l *lab) moveVM(v *vm, from, to *host, tap string) {
	t := l.t
	t.Helper()
	old, err := from.h.LinkByName(v.tap)
	must(t, err, "old tap")
	must(t, from.h.LinkDel(old), "delete old veth")
	la := netlink.NewLinkAttrs()
	la.Name = tap
	must(t, to.h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerHardwareAddr: v.mac, PeerNamespace: netlink.NsFd(int(v.ns))}), "new veth")
	v.tap = tap
	v.plumb(t)
}

func (v *vm) port(network, name string, pol PortPolicy) Port {
	return Port{Network: network, Name: name, MAC: v.mac, IPs: []netip.Addr{v.ip}, Tap: v.tap, Policy: pol}
}

func (v *vm) remote(network string, h *host) RemotePort {
	return RemotePort{Network: network, MAC: v.mac, IPs: []netip.Addr{v.ip}, HostVTEP: h.ip}
}

func (h *host) state(nets []Network, ports []Port, remote []RemotePort) HostState {
	return HostState{UnderlayIP: h.ip, UnderlayDev: "eth0", Networks: nets, Ports: ports, Remote: remote}
}

func (h *host) apply(t *testing.T, s HostState) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.plane.Apply(ctx, s); err != nil {
		t.Fatalf("Apply on %s: %v", h.name, err)
	}
	// A port whose carrier just came up forwards once the kernel's linkwatch has
	// processed the carrier change (up to a second later); wait for it, so tests
	// measure policy, not port bring-up.
	for _, pt := range s.Ports {
		h.waitForwarding(t, pt.Tap)
	}
}

func (h *host) waitForwarding(t *testing.T, ifname string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := h.run("ip", "-j", "-d", "link", "show", "dev", ifname)
		var links []struct {
			Linkinfo struct {
				InfoKind      string `json:"info_kind"`
				InfoSlaveData struct {
					State string `json:"state"`
				} `json:"info_slave_data"`
			} `json:"linkinfo"`
		}
		if err == nil && json.Unmarshal([]byte(out), &links) == nil && len(links) == 1 {
			li := links[0].Linkinfo
			if li.InfoSlaveData.State == "forwarding" || li.InfoKind == "tun" { // a tap has no carrier until a VM attaches
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("port %s on %s not forwarding after 5s: %v %s", ifname, h.name, err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *host) counters(t *testing.T) map[string]PortCounters {
	t.Helper()
	c, err := h.plane.Counters(context.Background())
	must(t, err, "Counters")
	return c
}

// run runs a command inside the namespace.
func (r *nsref) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", r.name}, args...)...).CombinedOutput()
	return string(out), err
}

// ping sends count pings (args end with the destination) and reports whether at
// least one reply came back.
func (r *nsref) ping(count int, args ...string) bool {
	_, err := r.run(append([]string{"busybox", "ping", "-q", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "1"}, args...)...)
	return err == nil
}

func (l *lab) mustPing(from *vm, dst string) {
	l.t.Helper()
	// The first ping may pay for ARP; allow a few.
	if out, err := from.run("busybox", "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", dst); err != nil {
		neigh, _ := from.run("ip", "neigh")
		l.t.Fatalf("%s cannot reach %s: %v\n%s\nneigh: %s", from.name, dst, err, out, neigh)
	}
}

func (l *lab) mustNotPing(from *vm, dst string) {
	l.t.Helper()
	if from.ping(2, dst) {
		l.t.Fatalf("%s reaches %s but must not", from.name, dst)
	}
}

func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// withNS runs fn with the calling goroutine's thread inside r's namespace, for
// sockets that must be created there.
func (r *nsref) withNS(t *testing.T, fn func()) {
	t.Helper()
	must(t, inNS(r.ns, func() error { fn(); return nil }), "enter netns")
}
