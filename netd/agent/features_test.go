package agent

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/vishvananda/netlink"
)

// A network with a NAT gateway and two subnets, declared through the API: VMs route between subnets across
// hosts and reach a server outside; a mirrored port's traffic arrives at its mirror port; a bandwidth cap
// becomes a shaper on the port; a port naming an extension this netd does not have is left out alone.
func TestGatewayMirrorAndBandwidthThroughTheAPI(t *testing.T) {
	e := newEnv(t, 2)
	h1, h2 := e.lab.Hosts[0], e.lab.Hosts[1]
	n1, n2 := e.start(h1), e.start(h2)
	if _, err := e.api.CreateNetwork(e.ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{
		Name: "red", Tenant: "acme", Vni: 100, Subnets: []string{"10.0.0.0/24", "10.1.0.0/24"}, Gateway: &basaltv1.Gateway{Nat: true},
	}}); err != nil {
		t.Fatal(err)
	}
	srv, err := e.lab.AddUnderlayNS("srv", netip.MustParseAddr("192.0.2.100"))
	if err != nil {
		t.Fatal(err)
	}
	m := e.vm(h1, "red", "m", "52:54:00:00:00:0e", "10.0.0.14", &basaltv1.PortPolicy{Promiscuous: true})
	a := e.vm(h1, "red", "a", "52:54:00:00:00:05", "10.0.0.5", &basaltv1.PortPolicy{MirrorTo: "m"})
	b := e.vm(h2, "red", "b", "52:54:00:00:00:07", "10.1.0.7", nil)
	if _, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{
		Network: "red", Name: "x", Host: n1.id, Ips: []string{"10.0.0.99"}, Policy: &basaltv1.PortPolicy{Extension: "nope"},
	}}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []*netlab.VM{a, b} {
		gw := "10.0.0.1"
		if strings.HasPrefix(v.IP().String(), "10.1.") {
			gw = "10.1.0.1"
		}
		if _, err := v.Run(e.ctx, "ip", "route", "add", "default", "via", gw); err != nil {
			t.Fatal(err)
		}
	}
	e.waitPorts(n1, "red/m", "red/a") // not red/x: its extension is not configured here
	e.waitPorts(n2, "red/b")
	for _, n := range []*node{n1, n2} {
		if err := n.host.WaitForwarding(e.ctx, "bsg100"); err != nil {
			t.Fatal(err)
		}
	}
	rx := func() uint64 {
		l, err := m.NL.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		return l.Attrs().Statistics.RxPackets
	}
	before := rx()
	if out, err := a.Run(e.ctx, "busybox", "ping", "-q", "-c", "5", "-i", "0.2", "-W", "1", "10.1.0.7"); err != nil {
		t.Fatalf("a cannot reach b in the other subnet through the gateways: %v\n%s", err, out)
	}
	if got := rx() - before; got < 10 {
		t.Fatalf("the mirror port received %d frames while a exchanged 10 with b", got)
	}
	// Outside: the server sees b's connection coming from h2's uplink address.
	var ln net.Listener
	if err := srv.Do(func() (err error) { ln, err = net.Listen("tcp4", "192.0.2.100:7000"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer := make(chan string, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			peer <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	if err := b.Do(func() error {
		c, err := net.DialTimeout("tcp4", "192.0.2.100:7000", 3*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		t.Fatalf("b cannot reach the server outside through its gateway: %v", err)
	}
	if got := <-peer; got != h2.IP.String() {
		t.Fatalf("the server saw b's connection from %s; want h2's uplink address %s", got, h2.IP)
	}

	// A cap through the API becomes a shaper on a's tap within a second.
	e.updatePort("red", "a", func(p *basaltv1.Port) { p.Policy.BandwidthMaxBps = 50_000_000 })
	deadline := time.Now().Add(time.Second)
	for {
		l, err := h1.NL.LinkByName(a.Tap)
		if err != nil {
			t.Fatal(err)
		}
		qs, err := h1.NL.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		if shaped(qs, 50_000_000/8) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 50 Mbit/s shaper on a's tap after a second: %v", qs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := h1.NL.LinkByName("bsqos"); err != nil {
		t.Fatalf("no bandwidth scheduler on h1: %v", err)
	}
}

func shaped(qs []netlink.Qdisc, rate uint64) bool {
	for _, q := range qs {
		if t, ok := q.(*netlink.Tbf); ok && t.Rate == rate {
			return true
		}
	}
	return false
}
