package dataplane

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"testing"
	"time"
)

var (
	netA = Network{Name: "tenant-a", VNI: 100}
	netB = Network{Name: "tenant-b", VNI: 200}
)

var guards = PortPolicy{SpoofGuard: true, DHCPGuard: true}

func (v *vm) listenTCP(t *testing.T, port int) {
	t.Helper()
	var ln net.Listener
	var err error
	v.withNS(t, func() { ln, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", v.ip, port)) })
	must(t, err, "listen")
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

func (v *vm) dialTCP(t *testing.T, addr string) error {
	t.Helper()
	var err error
	v.withNS(t, func() {
		var c net.Conn
		c, err = net.DialTimeout("tcp4", addr, 1500*time.Millisecond)
		if err == nil {
			c.Close()
		}
	})
	return err
}

// Test 1: a VM on host 1 reaches a VM on host 2 over VXLAN (IPv4 and IPv6), with
// both guards on.
func TestReachabilityAcrossHosts(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	a6, b6 := netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
	a.addIP6(t, a6)
	b.addIP6(t, b6)
	pa, pb := a.port("tenant-a", "a", guards), b.port("tenant-a", "b", guards)
	pa.IPs, pb.IPs = append(pa.IPs, a6), append(pb.IPs, b6)
	ra, rb := a.remote("tenant-a", h1), b.remote("tenant-a", h2)
	ra.IPs, rb.IPs = append(ra.IPs, a6), append(rb.IPs, b6)
	h1.apply(t, h1.state([]Network{netA}, []Port{pa}, []RemotePort{rb}))
	h2.apply(t, h2.state([]Network{netA}, []Port{pb}, []RemotePort{ra}))
	l.mustPing(a, "10.0.0.2")
	l.mustPing(b, "10.0.0.1")
	l.mustPing(a, "fd00::2")
	l.mustPing(b, "fd00::1")
	c := h1.counters(t)["a"]
	if c.SpoofDrops.Packets != 0 || c.DHCPDrops.Packets != 0 {
		t.Fatalf("legitimate traffic was dropped: %+v", c)
	}
	// An undeclared IPv6 source is spoofing.
	a.addIP6(t, netip.MustParseAddr("fd00::99"))
	if a.ping(2, "-I", "fd00::99", "fd00::2") {
		t.Fatalf("ping from an undeclared IPv6 source got through")
	}
	if c := h1.counters(t)["a"]; c.SpoofDrops.Packets == 0 {
		t.Fatalf("IPv6 source spoofing was not counted")
	}
}

// The host is not reachable from a tenant network: without the input/output rules
// the host would answer ARP for its own underlay address on the tenant bridge.
func TestHostNotReachableFromTenant(t *testing.T) {
	l := newLab(t, 1)
	h := l.hosts[0]
	a := l.addVM(h, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	h.apply(t, h.state([]Network{netA}, []Port{a.port("tenant-a", "a", guards)}, nil))
	if out, err := a.run("arping", "-c", "2", "-w", "2", "-I", "eth0", h.ip.String()); err == nil {
		t.Fatalf("the host answered ARP for its underlay address on a tenant network:\n%s", out)
	}
	// Even with the bridge's MAC known, IP to the host goes nowhere.
	_, err := a.run("ip", "route", "add", "192.0.2.0/24", "dev", "eth0")
	must(t, err, "route")
	_, err = a.run("ip", "neigh", "replace", h.ip.String(), "lladdr", bridgeMAC("bs", netA.VNI).String(), "dev", "eth0", "nud", "permanent")
	must(t, err, "neigh")
	l.mustNotPing(a, h.ip.String())
}

// A port moved to another network on the same host follows it.
func TestPortChangesNetwork(t *testing.T) {
	l := newLab(t, 1)
	h := l.hosts[0]
	a := l.addVM(h, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	b := l.addVM(h, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	c := l.addVM(h, "c", "tpc", "52:54:00:00:00:03", "10.0.0.3")
	nets := []Network{netA, netB}
	pb, pc := b.port("tenant-a", "b", guards), c.port("tenant-b", "c", guards)
	h.apply(t, h.state(nets, []Port{a.port("tenant-a", "a", guards), pb, pc}, nil))
	l.mustPing(a, "10.0.0.2")
	l.mustNotPing(a, "10.0.0.3")
	h.apply(t, h.state(nets, []Port{a.port("tenant-b", "a", guards), pb, pc}, nil))
	l.mustPing(a, "10.0.0.3")
	_, _ = a.run("ip", "neigh", "flush", "dev", "eth0")
	l.mustNotPing(a, "10.0.0.2")
}

// ARP for a remote port is answered by the local bridge from the programmed
// neighbour entry (neigh_suppress): the remote VTEP here does not even exist.
func TestARPSuppression(t *testing.T) {
	l := newLab(t, 1)
	h1 := l.hosts[0]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	ghost := RemotePort{Network: "tenant-a", MAC: mustMAC("52:54:00:00:00:99"),
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.99"), netip.MustParseAddr("fd00::99")}, HostVTEP: netip.MustParseAddr("192.0.2.200")}
	a.addIP6(t, netip.MustParseAddr("fd00::1"))
	pa := a.port("tenant-a", "a", guards)
	pa.IPs = append(pa.IPs, netip.MustParseAddr("fd00::1"))
	h1.apply(t, h1.state([]Network{netA}, []Port{pa}, []RemotePort{ghost}))
	out, err := a.run("arping", "-c", "1", "-w", "2", "-I", "eth0", "10.0.0.99")
	if err != nil {
		t.Fatalf("no ARP answer for a remote port: %v\n%s", err, out)
	}
	if !regexp.MustCompile(`(?i)52:54:00:00:00:99`).MatchString(out) {
		t.Fatalf("ARP answer does not carry the remote MAC:\n%s", out)
	}
	// Same for IPv6 neighbour discovery: the echo goes nowhere, but the neighbour
	// solicitation is answered by the bridge.
	a.ping(1, "fd00::99")
	out, _ = a.run("ip", "-6", "neigh", "show", "fd00::99")
	if !regexp.MustCompile(`lladdr 52:54:00:00:00:99`).MatchString(out) {
		t.Fatalf("no ND answer for a remote port: %q", out)
	}
}

// Test 2: two tenants with the same subnet on the same two hosts. Each reaches its
// own peer (and gets the peer's MAC), never the other tenant's.
func TestTenantIsolationSameSubnet(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a1 := l.addVM(h1, "a1", "tpa1", "52:54:00:0a:00:01", "10.0.0.1")
	b1 := l.addVM(h1, "b1", "tpb1", "52:54:00:0b:00:01", "10.0.0.1")
	a2 := l.addVM(h2, "a2", "tpa2", "52:54:00:0a:00:02", "10.0.0.2")
	b2 := l.addVM(h2, "b2", "tpb2", "52:54:00:0b:00:02", "10.0.0.2")
	b3 := l.addVM(h2, "b3", "tpb3", "52:54:00:0b:00:03", "10.0.0.3")
	nets := []Network{netA, netB}
	h1.apply(t, h1.state(nets,
		[]Port{a1.port("tenant-a", "a1", guards), b1.port("tenant-b", "b1", guards)},
		[]RemotePort{a2.remote("tenant-a", h2), b2.remote("tenant-b", h2), b3.remote("tenant-b", h2)}))
	h2.apply(t, h2.state(nets,
		[]Port{a2.port("tenant-a", "a2", guards), b2.port("tenant-b", "b2", guards), b3.port("tenant-b", "b3", guards)},
		[]RemotePort{a1.remote("tenant-a", h1), b1.remote("tenant-b", h1)}))

	l.mustPing(a1, "10.0.0.2")
	l.mustPing(b1, "10.0.0.2")
	for _, c := range []struct {
		from *vm
		want net.HardwareAddr
	}{{a1, a2.mac}, {b1, b2.mac}} {
		out, _ := c.from.run("ip", "neigh", "show", "10.0.0.2")
		if !regexp.MustCompile(c.want.String()).MatchString(out) {
			t.Fatalf("%s resolved 10.0.0.2 to the wrong tenant: %q (want %s)", c.from.name, out, c.want)
		}
	}
	// 10.0.0.3 only exists in tenant B.
	l.mustNotPing(a1, "10.0.0.3")
	l.mustPing(b1, "10.0.0.3")

	// Even addressed straight at tenant B's MAC, tenant A's frames never arrive.
	capB2 := b2.startCapture(t)
	capB3 := b3.startCapture(t)
	_, err := a1.run("ip", "neigh", "replace", "10.0.0.3", "lladdr", b3.mac.String(), "dev", "eth0", "nud", "permanent")
	must(t, err, "static neighbour")
	l.mustNotPing(a1, "10.0.0.3")
	if n := capB3.count(isFromMAC(a1.mac)) + capB2.count(isFromMAC(a1.mac)); n != 0 {
		t.Fatalf("tenant B VMs received %d frames from tenant A", n)
	}
}

// Test 3: ARP spoofing, IP spoofing and MAC spoofing from a guarded port are dropped
// and counted; the same frames with the port's own addresses pass.
func TestSpoofGuard(t *testing.T) {
	l := newLab(t, 1)
	h := l.hosts[0]
	a := l.addVM(h, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	b := l.addVM(h, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	h.apply(t, h.state([]Network{netA}, []Port{a.port("tenant-a", "a", guards), b.port("tenant-a", "b", guards)}, nil))
	l.mustPing(a, "10.0.0.2")
	before := h.counters(t)["a"].SpoofDrops.Packets

	// Gratuitous ARP claiming b's address: dropped. Our own address: delivered.
	capture := b.startCapture(t)
	a.send(t, arpFrame(a.mac, 2, a.mac, b.ip, broadcast, b.ip))
	a.send(t, arpFrame(a.mac, 2, a.mac, a.ip, broadcast, a.ip))
	// ARP with our IP but a forged sender MAC (Ethernet source is ours).
	a.send(t, arpFrame(a.mac, 2, mustMAC("52:54:00:00:00:66"), a.ip, broadcast, a.ip))
	// A frame from a forged Ethernet source.
	a.send(t, udpFrame(broadcast, mustMAC("52:54:00:00:00:77"), a.ip, netip.MustParseAddr("10.0.0.255"), 9, 9, []byte("x")))
	// An 802.1Q-tagged ARP claiming b's IP: the tag would hide the ARP from the checks.
	garp := arpFrame(a.mac, 2, a.mac, b.ip, broadcast, b.ip)
	tagged := append(append(append([]byte{}, garp[:12]...), 0x81, 0x00, 0x00, 0x05), garp[12:]...)
	a.send(t, tagged)
	if n := capture.count(isARPFrom(b.ip)); n != 0 {
		t.Fatalf("b received %d forged ARP frames claiming its own IP", n)
	}
	var own, forgedSHA, forgedSrc int
	for _, f := range capture.frames {
		if isARPFrom(a.ip)(f) && net.HardwareAddr(f[22:28]).String() == a.mac.String() {
			own++
		}
		if isARPFrom(a.ip)(f) && net.HardwareAddr(f[22:28]).String() == "52:54:00:00:00:66" {
			forgedSHA++
		}
		if isFromMAC(mustMAC("52:54:00:00:00:77"))(f) {
			forgedSrc++
		}
	}
	if own == 0 {
		t.Fatalf("legitimate gratuitous ARP did not arrive (capture broken?)")
	}
	if forgedSHA != 0 || forgedSrc != 0 {
		t.Fatalf("forged frames arrived: sha=%d src=%d", forgedSHA, forgedSrc)
	}
	if n := countFrames(capture, func(f []byte) bool { return len(f) > 14 && f[12] == 0x81 && f[13] == 0x00 }); n != 0 {
		t.Fatalf("b received %d VLAN-tagged frames", n)
	}
	after := h.counters(t)["a"].SpoofDrops.Packets
	if after-before < 4 {
		t.Fatalf("spoof counter went %d -> %d, want at least +4", before, after)
	}

	// IP spoofing: a takes a foreign address and pings from it.
	capture = b.startCapture(t)
	_, err := a.run("ip", "addr", "add", "10.0.0.50/32", "dev", "eth0")
	must(t, err, "add foreign address")
	if a.ping(2, "-I", "10.0.0.50", "10.0.0.2") {
		t.Fatalf("ping from a spoofed source address got through")
	}
	if n := capture.count(isIPv4From(netip.MustParseAddr("10.0.0.50"))); n != 0 {
		t.Fatalf("b received %d packets from the spoofed source", n)
	}
	if n := countFrames(capture, isARPFrom(netip.MustParseAddr("10.0.0.50"))); n != 0 {
		t.Fatalf("b received %d ARP packets from the spoofed source", n)
	}
	if c := h.counters(t)["a"].SpoofDrops.Packets; c <= after {
		t.Fatalf("spoof counter did not move for IP spoofing (%d)", c)
	}
	t.Logf("spoof drops on a: %+v", h.counters(t)["a"].SpoofDrops)
}

func countFrames(c *capture, match func([]byte) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, f := range c.frames {
		if match(f) {
			n++
		}
	}
	return n
}

// Test 4: a DHCP server reply (UDP 67 -> 68) from a port with the DHCP guard is
// dropped and counted; from a port without it, the same frame arrives.
func TestDHCPGuard(t *testing.T) {
	l := newLab(t, 1)
	h := l.hosts[0]
	rogue := l.addVM(h, "rogue", "tpr", "52:54:00:00:00:01", "10.0.0.1")
	server := l.addVM(h, "srv", "tps", "52:54:00:00:00:03", "10.0.0.3")
	victim := l.addVM(h, "victim", "tpv", "52:54:00:00:00:02", "10.0.0.2")
	h.apply(t, h.state([]Network{netA}, []Port{
		rogue.port("tenant-a", "rogue", guards),
		server.port("tenant-a", "server", PortPolicy{SpoofGuard: true}),
		victim.port("tenant-a", "victim", guards),
	}, nil))

	capture := victim.startCapture(t)
	rogue.send(t, dhcpOffer(rogue.mac, rogue.ip))
	server.send(t, dhcpOffer(server.mac, server.ip))
	time.Sleep(100 * time.Millisecond)
	fromRogue := capture.count(func(f []byte) bool { return isUDPPorts(67, 68)(f) && isFromMAC(rogue.mac)(f) })
	fromServer := countFrames(capture, func(f []byte) bool { return isUDPPorts(67, 68)(f) && isFromMAC(server.mac)(f) })
	if fromRogue != 0 {
		t.Fatalf("victim received %d rogue DHCP replies", fromRogue)
	}
	if fromServer != 1 {
		t.Fatalf("victim received %d DHCP replies from the allowed server, want 1", fromServer)
	}
	c := h.counters(t)
	if got := c["rogue"].DHCPDrops.Packets; got != 1 {
		t.Fatalf("rogue DHCP drops = %d, want 1", got)
	}
	if c["rogue"].SpoofDrops.Packets != 0 {
		t.Fatalf("the rogue reply was counted as spoofing: %+v", c["rogue"])
	}
	if c["server"].DHCPDrops.Packets != 0 {
		t.Fatalf("server without DHCP guard counted drops: %+v", c["server"])
	}
}

// Test 5: ACLs with counters, across hosts: b (on host 2) denies inbound TCP 80 and
// allows ICMP; a (on host 1) denies outbound ICMP to c.
func TestACL(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	c := l.addVM(h1, "c", "tpc", "52:54:00:00:00:03", "10.0.0.3")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	pa := a.port("tenant-a", "a", PortPolicy{SpoofGuard: true, ACL: []ACLRule{
		{ID: "no-icmp-to-c", Direction: Out, Protocol: ICMP, CIDR: netip.MustParsePrefix("10.0.0.3/32"), Action: Deny},
	}})
	pb := b.port("tenant-a", "b", PortPolicy{SpoofGuard: true, ACL: []ACLRule{
		{ID: "no-web", Direction: In, Protocol: TCP, PortMin: 80, PortMax: 80, Action: Deny},
		{ID: "icmp", Direction: In, Protocol: ICMP, Action: Allow},
		{ID: "high", Direction: In, Protocol: TCP, CIDR: netip.MustParsePrefix("10.0.0.0/24"), PortMin: 1024, PortMax: 65535, Action: Allow},
	}})
	h1.apply(t, h1.state([]Network{netA}, []Port{pa, c.port("tenant-a", "c", guards)}, []RemotePort{b.remote("tenant-a", h2)}))
	h2.apply(t, h2.state([]Network{netA}, []Port{pb}, []RemotePort{a.remote("tenant-a", h1), c.remote("tenant-a", h1)}))

	b.listenTCP(t, 80)
	b.listenTCP(t, 81)
	b.listenTCP(t, 8080)
	if err := a.dialTCP(t, "10.0.0.2:81"); err != nil {
		t.Fatalf("tcp/81 should be allowed: %v", err)
	}
	if err := a.dialTCP(t, "10.0.0.2:8080"); err != nil {
		t.Fatalf("tcp/8080 should be allowed: %v", err)
	}
	if err := a.dialTCP(t, "10.0.0.2:80"); err == nil {
		t.Fatalf("tcp/80 should be denied")
	}
	l.mustPing(a, "10.0.0.2")
	l.mustNotPing(a, "10.0.0.3")
	l.mustPing(c, "10.0.0.2")
	l.mustPing(b, "10.0.0.3")

	cb := h2.counters(t)["b"]
	ca := h1.counters(t)["a"]
	t.Logf("b ACL counters: %+v; a ACL counters: %+v", cb.ACL, ca.ACL)
	byID := map[string]Counter{}
	for _, x := range append(cb.ACL, ca.ACL...) {
		byID[x.ID] = x.Counter
	}
	if byID["no-web"].Packets == 0 {
		t.Errorf("deny tcp/80 counter did not move")
	}
	if byID["icmp"].Packets < 3 {
		t.Errorf("allow icmp counter = %d, want >= 3", byID["icmp"].Packets)
	}
	if byID["high"].Packets == 0 || byID["high"].Bytes == 0 {
		t.Errorf("allow tcp/1024-65535 counter did not move: %+v", byID["high"])
	}
	if byID["no-icmp-to-c"].Packets < 2 {
		t.Errorf("deny icmp to c counter = %d, want >= 2", byID["no-icmp-to-c"].Packets)
	}
}

// Test 6: isolated ports cannot reach each other (on one host or across hosts), nor
// normal ports, but all of them reach a promiscuous port.
func TestPortIsolation(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	i1 := l.addVM(h1, "i1", "tpi1", "52:54:00:00:01:01", "10.0.0.1")
	i2 := l.addVM(h1, "i2", "tpi2", "52:54:00:00:01:02", "10.0.0.2")
	g := l.addVM(h1, "g", "tpg", "52:54:00:00:01:fe", "10.0.0.254")
	n := l.addVM(h1, "n", "tpn", "52:54:00:00:01:10", "10.0.0.10")
	i3 := l.addVM(h2, "i3", "tpi3", "52:54:00:00:02:03", "10.0.0.3")
	iso := PortPolicy{SpoofGuard: true, Isolated: true}
	prom := PortPolicy{SpoofGuard: true, Promiscuous: true}
	ri1, ri2, rg, rn := i1.remote("tenant-a", h1), i2.remote("tenant-a", h1), g.remote("tenant-a", h1), n.remote("tenant-a", h1)
	ri1.Isolated, ri2.Isolated, rg.Promiscuous = true, true, true
	ri3 := i3.remote("tenant-a", h2)
	ri3.Isolated = true
	h1.apply(t, h1.state([]Network{netA}, []Port{
		i1.port("tenant-a", "i1", iso), i2.port("tenant-a", "i2", iso),
		g.port("tenant-a", "g", prom), n.port("tenant-a", "n", guards),
	}, []RemotePort{ri3}))
	h2.apply(t, h2.state([]Network{netA}, []Port{i3.port("tenant-a", "i3", iso)}, []RemotePort{ri1, ri2, rg, rn}))

	l.mustNotPing(i1, "10.0.0.2") // isolated <-> isolated, same host
	l.mustNotPing(i1, "10.0.0.3") // isolated <-> isolated, across hosts
	l.mustNotPing(i1, "10.0.0.10")
	l.mustNotPing(n, "10.0.0.2") // normal <-> isolated
	l.mustNotPing(n, "10.0.0.3")
	l.mustPing(i1, "10.0.0.254") // everyone reaches the promiscuous port
	l.mustPing(i2, "10.0.0.254")
	l.mustPing(i3, "10.0.0.254")
	l.mustPing(n, "10.0.0.254")
	c1, c2 := h1.counters(t), h2.counters(t)
	if c1["i2"].IsolationDrops.Packets == 0 || c2["i3"].IsolationDrops.Packets == 0 {
		t.Fatalf("isolation counters did not move: i2=%+v i3=%+v", c1["i2"].IsolationDrops, c2["i3"].IsolationDrops)
	}
	if c1["g"].IsolationDrops.Packets != 0 {
		t.Fatalf("promiscuous port counted isolation drops")
	}
}

// Test 8: a VM moves from host 1 to host 2 keeping MAC and IP; after Apply on every
// host its peer on host 3 reaches it at the new place, and host 1, which has no port
// left in the network, loses the network's bridge and VXLAN device.
func TestPortMove(t *testing.T) {
	l := newLab(t, 3)
	h1, h2, h3 := l.hosts[0], l.hosts[1], l.hosts[2]
	m := l.addVM(h1, "m", "tpm", "52:54:00:00:00:0a", "10.0.0.10")
	q := l.addVM(h3, "q", "tpq", "52:54:00:00:00:0b", "10.0.0.11")
	nets := []Network{netA}
	h1.apply(t, h1.state(nets, []Port{m.port("tenant-a", "m", guards)}, []RemotePort{q.remote("tenant-a", h3)}))
	h3.apply(t, h3.state(nets, []Port{q.port("tenant-a", "q", guards)}, []RemotePort{m.remote("tenant-a", h1)}))
	l.mustPing(q, "10.0.0.10")

	l.moveVM(m, h1, h2, "tpm2")
	h2.apply(t, h2.state(nets, []Port{m.port("tenant-a", "m", guards)}, []RemotePort{q.remote("tenant-a", h3)}))
	h3.apply(t, h3.state(nets, []Port{q.port("tenant-a", "q", guards)}, []RemotePort{m.remote("tenant-a", h2)}))
	h1.apply(t, h1.state(nil, nil, nil))
	l.mustPing(q, "10.0.0.10")
	l.mustPing(m, "10.0.0.11")

	for _, name := range []string{"bsb100", "bsx100"} {
		if _, err := h1.h.LinkByName(name); err == nil {
			t.Errorf("%s still exists on host 1", name)
		}
	}
	st, err := h1.plane.readNFT()
	must(t, err, "read nft")
	if len(st.counters) != 0 || st.chains["from_tpm"] != nil {
		t.Errorf("host 1 kept policy for the moved port: counters %v", st.counters)
	}
	if c := h2.counters(t)["m"]; c.SpoofDrops.Packets != 0 {
		t.Errorf("moved port counted spoof drops: %+v", c)
	}
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)

// pingLoss runs a ping in the background; the returned function waits for it and
// returns sent and received counts.
func (v *vm) pingLoss(t *testing.T, dst string, count int, interval string) func() (int, int) {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		out, _ := v.run("busybox", "ping", "-q", "-c", strconv.Itoa(count), "-i", interval, "-W", "1", dst)
		ch <- out
	}()
	return func() (int, int) {
		out := <-ch
		m := pingStats.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("cannot parse ping output: %s", out)
		}
		s, _ := strconv.Atoi(m[1])
		r, _ := strconv.Atoi(m[2])
		return s, r
	}
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func (v *vm) addIP6(t *testing.T, a netip.Addr) {
	t.Helper()
	_, err := v.run("ip", "-6", "addr", "add", a.String()+"/64", "dev", "eth0", "nodad")
	must(t, err, "add ipv6 address")
}
