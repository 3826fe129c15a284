package dataplane

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

var gwNet = Network{Name: "tenant-a", VNI: 100, Gateway: &Gateway{
	MAC:   mustMAC("02:62:67:00:00:64"),
	Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24"), netip.MustParsePrefix("10.1.0.1/24")},
	NAT:   true,
}}

// listenRemote accepts TCP connections in ns and reports each peer's address.
func listenRemote(t *testing.T, ns *nsref, addr string) <-chan netip.AddrPort {
	t.Helper()
	var ln net.Listener
	var err error
	ns.withNS(t, func() { ln, err = net.Listen("tcp4", addr) })
	must(t, err, "listen")
	t.Cleanup(func() { ln.Close() })
	peers := make(chan netip.AddrPort, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			c.Close()
		}
	}()
	return peers
}

func nsInode(t *testing.T, name string) uint64 {
	t.Helper()
	var st unix.Stat_t
	must(t, unix.Stat(filepath.Join(netnsDir, name), &st), "stat gateway namespace")
	return st.Ino
}

// A network with a gateway: VMs of two subnets reach each other through their own host's gateway, on one
// host and across hosts; a VM reaches a server outside the network through NAT, seen from the host's uplink
// address; the gateway refuses to route within one subnet (isolation holds); applying again changes nothing;
// removing the gateway removes its namespace and the host's NAT table.
func TestGatewayRoutesAndNATs(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:05", "10.0.0.5")
	c := l.addVM(h1, "c", "tpc", "52:54:00:00:00:08", "10.1.0.8")
	d := l.addVM(h1, "d", "tpd", "52:54:00:00:00:06", "10.0.0.6")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:07", "10.1.0.7")
	for _, v := range []*vm{a, c, d, b} {
		gw := "10.0.0.1"
		if v.ip.As4()[1] == 1 {
			gw = "10.1.0.1"
		}
		_, err := v.run("ip", "route", "add", "default", "via", gw)
		must(t, err, "default route")
	}
	server := l.addOutside("srv", netip.MustParseAddr("192.0.2.100"))
	peers := listenRemote(t, server, "192.0.2.100:7000")
	iso := PortPolicy{SpoofGuard: true, DHCPGuard: true, Isolated: true}
	s1 := h1.state([]Network{gwNet}, []Port{a.port("tenant-a", "a", iso), c.port("tenant-a", "c", guards), d.port("tenant-a", "d", iso)},
		[]RemotePort{b.remote("tenant-a", h2)})
	s2 := h2.state([]Network{gwNet}, []Port{b.port("tenant-a", "b", guards)},
		[]RemotePort{a.remote("tenant-a", h1), c.remote("tenant-a", h1), d.remote("tenant-a", h1)})
	h1.apply(t, s1)
	h2.apply(t, s2)
	h1.waitForwarding(t, gwPortName("bs", 100))
	h2.waitForwarding(t, gwPortName("bs", 100))

	l.mustPing(a, "10.0.0.1") // isolated ports reach the (promiscuous) gateway
	l.mustPing(a, "10.1.0.8") // other subnet, same host
	l.mustPing(a, "10.1.0.7") // other subnet, other host
	l.mustPing(b, "10.0.0.5")
	l.mustPing(a, "192.0.2.100")
	for _, v := range []struct {
		vm   *vm
		want netip.Addr
	}{{a, h1.ip}, {b, h2.ip}} {
		must(t, v.vm.dialTCP(t, "192.0.2.100:7000"), "connect outside")
		select {
		case p := <-peers:
			if p.Addr() != v.want {
				t.Fatalf("the server saw %s's connection from %s; want the host's uplink address %s", v.vm.name, p.Addr(), v.want)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no connection reached the server")
		}
	}
	// a and d are isolated: no direct path, and the gateway does not route within a subnet.
	l.mustNotPing(a, "10.0.0.6")
	_, err := a.run("ip", "route", "add", "10.0.0.6/32", "via", "10.0.0.1")
	must(t, err, "route via the gateway")
	l.mustNotPing(a, "10.0.0.6")

	// Applying the same state again (a restarted netd) keeps the gateway as it is.
	ino := nsInode(t, h1.plane.gwNSName(100))
	gp, err := h1.h.LinkByName(gwPortName("bs", 100))
	must(t, err, "gateway port")
	h1.apply(t, s1)
	if nsInode(t, h1.plane.gwNSName(100)) != ino {
		t.Fatal("a second Apply recreated the gateway namespace")
	}
	if gp2, err := h1.h.LinkByName(gwPortName("bs", 100)); err != nil || gp2.Attrs().Index != gp.Attrs().Index {
		t.Fatal("a second Apply recreated the gateway's port")
	}
	l.mustPing(a, "10.1.0.7")

	// Without the gateway: namespace, veths and the host's NAT table are gone; same-subnet traffic still flows.
	plain := gwNet
	plain.Gateway = nil
	s1.Networks = []Network{plain}
	h1.apply(t, s1)
	if _, err := os.Stat(filepath.Join(netnsDir, h1.plane.gwNSName(100))); !os.IsNotExist(err) {
		t.Fatalf("gateway namespace still exists: %v", err)
	}
	for _, n := range []string{gwPortName("bs", 100), gwWanName("bs", 100)} {
		if _, err := h1.h.LinkByName(n); err == nil {
			t.Fatalf("%s still exists", n)
		}
	}
	nc, err := nftables.New(nftables.WithNetNSFd(int(h1.ns)))
	must(t, err, "nftables")
	if _, err := nc.ListTableOfFamily("basalt_nat", nftables.TableFamilyIPv4); err == nil {
		t.Fatal("the host's NAT table survived the last NAT gateway")
	}
	l.mustPing(c, "10.1.0.7")
}
