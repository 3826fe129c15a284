package agent

import (
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	in    = basaltv1.AclDirection_ACL_DIRECTION_IN
	deny  = basaltv1.AclAction_ACL_ACTION_DENY
	allow = basaltv1.AclAction_ACL_ACTION_ALLOW
	icmp  = basaltv1.AclProtocol_ACL_PROTOCOL_ICMP
)

// Two tenants use 10.0.0.0/24 on the same two hosts: each reaches its own peer across hosts over VXLAN and
// resolves it to its own tenant's MAC; an address only the other tenant has is unreachable. Counters come
// back through metad's API from the netd of the port's host.
func TestCrossHostReachabilityAndTenantIsolation(t *testing.T) {
	e := newEnv(t, 2)
	h1, h2 := e.lab.Hosts[0], e.lab.Hosts[1]
	n1, n2 := e.start(h1), e.start(h2)
	e.network("red", "acme", 100, "10.0.0.0/24")
	e.network("blue", "umbrella", 200, "10.0.0.0/24")
	r1 := e.vm(h1, "red", "r1", "52:54:00:0a:00:01", "10.0.0.1", nil)
	r2 := e.vm(h2, "red", "r2", "52:54:00:0a:00:02", "10.0.0.2", nil)
	b1 := e.vm(h1, "blue", "b1", "52:54:00:0b:00:01", "10.0.0.1", nil)
	b2 := e.vm(h2, "blue", "b2", "52:54:00:0b:00:02", "10.0.0.2", nil)
	e.vm(h2, "blue", "b3", "52:54:00:0b:00:03", "10.0.0.3", nil)
	e.waitPorts(n1, "red/r1", "blue/b1")
	e.waitPorts(n2, "red/r2", "blue/b2", "blue/b3")

	e.mustPing(r1, "10.0.0.2")
	e.mustPing(b1, "10.0.0.2")
	for _, c := range []struct {
		from *netlab.VM
		want net.HardwareAddr
	}{{r1, r2.MAC}, {b1, b2.MAC}} {
		out, _ := c.from.Run(e.ctx, "ip", "neigh", "show", "10.0.0.2")
		if !strings.Contains(out, c.want.String()) {
			t.Fatalf("%s resolved 10.0.0.2 to the wrong tenant: %q (want %s)", c.from.Name, out, c.want)
		}
	}
	e.mustNotPing(r1, "10.0.0.3") // only tenant umbrella has 10.0.0.3
	e.mustPing(b1, "10.0.0.3")

	// An ACL change reaches the host; its counter is read through the API from h2's netd.
	e.updatePort("red", "r2", func(p *basaltv1.Port) {
		p.Policy.Acl = []*basaltv1.AclRule{{Id: "no-ping", Direction: in, Action: deny, Protocol: icmp}}
	})
	deadline := time.Now().Add(5 * time.Second)
	for r1.Ping(e.ctx, 1, "10.0.0.2") {
		if time.Now().After(deadline) {
			t.Fatal("the ACL denying ICMP to r2 was not applied within 5s")
		}
	}
	c, err := e.api.GetPortCounters(e.ctx, &basaltv1.GetPortCountersRequest{Network: "red", Name: "r2"})
	if err != nil {
		t.Fatal(err)
	}
	if c.GetHost() != n2.id || len(c.GetAcl()) != 1 || c.GetAcl()[0].GetId() != "no-ping" || c.GetAcl()[0].GetPackets() == 0 {
		t.Fatalf("counters of r2 = %v; want the no-ping rule counted on %s", c, n2.id)
	}
	if c.GetToVm().GetPackets() == 0 || c.GetFromVm().GetPackets() == 0 {
		t.Fatalf("counters of r2 have no traffic: %v", c)
	}
	_, err = e.api.GetPortCounters(e.ctx, &basaltv1.GetPortCountersRequest{Network: "red", Name: "nope"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("counters of a missing port: %v", err)
	}
}

// A port that moves to another host keeps its MAC and address; every host updates its entries within a
// second of the update in etcd.
func TestPortMoveConvergesWithinASecond(t *testing.T) {
	e := newEnv(t, 3)
	h1, h2, h3 := e.lab.Hosts[0], e.lab.Hosts[1], e.lab.Hosts[2]
	n1, n2, n3 := e.start(h1), e.start(h2), e.start(h3)
	e.network("red", "acme", 100, "10.0.0.0/24")
	m := e.vm(h1, "red", "m", "52:54:00:00:00:0a", "10.0.0.10", nil)
	q := e.vm(h3, "red", "q", "52:54:00:00:00:0b", "10.0.0.11", nil)
	e.waitPorts(n1, "red/m")
	e.waitPorts(n3, "red/q")
	e.mustPing(q, "10.0.0.10")

	// The hypervisor on h2 brings the VM up with the same tap name; then the port is rebound.
	if err := m.PlugInto(h2, m.Tap); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.updatePort("red", "m", func(p *basaltv1.Port) { p.Host = n2.id })
	// Each host is done when its kernel state says so: h3's FDB points m's MAC at h2, h2 has m's tap on its
	// bridge, h1 has no bridge for the network any more.
	done := map[string]time.Duration{}
	for len(done) < 3 && time.Since(start) < 5*time.Second {
		if _, ok := done["h3"]; !ok && fdbDst(t, h3, "bsx100", m.MAC) == h2.IP {
			done["h3"] = time.Since(start)
		}
		if _, ok := done["h2"]; !ok && masterOf(h2, m.Tap) == "bsb100" {
			done["h2"] = time.Since(start)
		}
		if _, ok := done["h1"]; !ok {
			if _, err := h1.NL.LinkByName("bsb100"); err != nil {
				done["h1"] = time.Since(start)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("convergence after the move: %v", done)
	for _, h := range []string{"h1", "h2", "h3"} {
		d, ok := done[h]
		if !ok || d > time.Second {
			t.Fatalf("host %s converged after %v (ok=%v); want under a second (all: %v)", h, d, ok, done)
		}
	}
	e.waitPorts(n2, "red/m")
	e.mustPing(q, "10.0.0.10")
	e.mustPing(m, "10.0.0.11")
	out, _ := q.Run(e.ctx, "ip", "neigh", "show", "10.0.0.10")
	if !strings.Contains(out, m.MAC.String()) {
		t.Fatalf("the moved port changed MAC: %q", out)
	}
}

func fdbDst(t *testing.T, h *netlab.Host, dev string, mac net.HardwareAddr) netip.Addr {
	l, err := h.NL.LinkByName(dev)
	if err != nil {
		return netip.Addr{}
	}
	fdb, err := h.NL.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fdb {
		if e.HardwareAddr.String() == mac.String() && e.Flags&netlink.NTF_SELF != 0 && e.IP != nil {
			a, _ := netip.AddrFromSlice(e.IP)
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

func masterOf(h *netlab.Host, ifname string) string {
	l, err := h.NL.LinkByName(ifname)
	if err != nil || l.Attrs().MasterIndex == 0 {
		return ""
	}
	m, err := h.NL.LinkByIndex(l.Attrs().MasterIndex)
	if err != nil {
		return ""
	}
	return m.Attrs().Name
}

// hostSnapshot is what netd manages on a host, with kernel identities (interface indexes, rule handles), so
// that any recreation shows as a difference.
type hostSnapshot struct {
	Links []string
	Rules []string
}

func snapshot(t *testing.T, h *netlab.Host) hostSnapshot {
	t.Helper()
	var s hostSnapshot
	links, err := h.NL.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		a := l.Attrs()
		s.Links = append(s.Links, fmt.Sprintf("%s idx=%d master=%d mtu=%d flags=%v", a.Name, a.Index, a.MasterIndex, a.MTU, a.Flags))
	}
	sort.Strings(s.Links)
	c, err := nftables.New(nftables.WithNetNSFd(int(h.Handle)))
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Name: "basalt", Family: nftables.TableFamilyBridge}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyBridge)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chains {
		rules, err := c.GetRules(table, ch)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			cm, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			s.Rules = append(s.Rules, fmt.Sprintf("%s %d %s", ch.Name, r.Handle, cm))
		}
	}
	sort.Strings(s.Rules)
	return s
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)

// pingLoss pings in the background; the returned function waits and returns sent and received.
func pingLoss(t *testing.T, e *env, from *netlab.VM, dst string, count int, interval string) func() (int, int) {
	ch := make(chan string, 1)
	go func() {
		out, _ := from.Run(e.ctx, "busybox", "ping", "-q", "-c", strconv.Itoa(count), "-i", interval, "-W", "1", dst)
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

// A restarted netd converges its host to etcd (a port deleted and one created while it was down, an ACL
// changed) without touching what did not change: the unchanged port's traffic flows throughout, and its
// interfaces and rules keep their kernel identities.
func TestRestartConvergesWithoutDisturbingUnchangedPorts(t *testing.T) {
	e := newEnv(t, 2)
	h1, h2 := e.lab.Hosts[0], e.lab.Hosts[1]
	n1, n2 := e.start(h1), e.start(h2)
	e.network("red", "acme", 100, "10.0.0.0/24")
	a := e.vm(h1, "red", "a", "52:54:00:00:00:01", "10.0.0.1", nil)
	b := e.vm(h2, "red", "b", "52:54:00:00:00:02", "10.0.0.2", nil)
	c := e.vm(h1, "red", "c", "52:54:00:00:00:03", "10.0.0.3", nil)
	e.waitPorts(n1, "red/a", "red/c")
	e.waitPorts(n2, "red/b")
	e.mustPing(b, "10.0.0.1")
	e.mustPing(b, "10.0.0.3")

	// Restarting with nothing changed is a no-op on the host.
	before := snapshot(t, h1)
	n1.stop()
	n1 = e.start(h1)
	<-n1.agent.Ready()
	if after := snapshot(t, h1); !reflect.DeepEqual(before, after) {
		t.Fatalf("a restart without changes changed the host:\nbefore %v\nafter  %v", before, after)
	}

	// b pings a throughout: the agent stops, etcd changes, the agent comes back.
	wait := pingLoss(t, e, b, "10.0.0.1", 60, "0.05")
	time.Sleep(300 * time.Millisecond)
	n1.stop()
	if _, err := e.api.DeletePort(e.ctx, &basaltv1.DeletePortRequest{Network: "red", Name: "c"}); err != nil {
		t.Fatal(err)
	}
	d := e.vm(h1, "red", "d", "52:54:00:00:00:04", "10.0.0.4", nil)
	e.updatePort("red", "b", func(p *basaltv1.Port) {
		p.Policy.Acl = []*basaltv1.AclRule{{Id: "no-ping-from-d", Direction: in, Action: deny, Protocol: icmp, Cidr: "10.0.0.4/32"}}
	})
	aTap := snapshotLink(t, h1, a.Tap)
	n1 = e.start(h1)
	<-n1.agent.Ready()
	e.waitPorts(n1, "red/a", "red/d")
	sent, got := wait()
	if got != sent {
		t.Fatalf("unchanged port a lost %d of %d pings while netd restarted", sent-got, sent)
	}
	if now := snapshotLink(t, h1, a.Tap); now != aTap {
		t.Fatalf("a's tap changed across the restart: %s -> %s", aTap, now)
	}
	if m := masterOf(h1, c.Tap); m != "" {
		t.Fatalf("deleted port c's interface is still on bridge %s", m)
	}
	e.mustNotPing(b, "10.0.0.3")
	e.mustPing(d, "10.0.0.1")    // d is on the bridge
	e.mustNotPing(d, "10.0.0.2") // b's new ACL reached h2
	e.mustPing(a, "10.0.0.2")
}

func snapshotLink(t *testing.T, h *netlab.Host, name string) string {
	l, err := h.NL.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("idx=%d master=%d", l.Attrs().Index, l.Attrs().MasterIndex)
}

// Bad input is refused by the API with a clear error and reaches no host; a port whose tap would be a host
// interface is left out on its host alone, and the others keep working.
func TestBadInputLeavesHostsUntouched(t *testing.T) {
	e := newEnv(t, 2)
	h1, h2 := e.lab.Hosts[0], e.lab.Hosts[1]
	n1, n2 := e.start(h1), e.start(h2)
	e.network("red", "acme", 100, "10.0.0.0/24")
	a := e.vm(h1, "red", "a", "52:54:00:00:00:01", "10.0.0.1", nil)
	e.vm(h2, "red", "b", "52:54:00:00:00:02", "10.0.0.2", nil)
	e.waitPorts(n1, "red/a")
	e.waitPorts(n2, "red/b")
	e.mustPing(a, "10.0.0.2")
	s1, s2 := snapshot(t, h1), snapshot(t, h2)
	_, gen1, _ := n1.agent.Applied()

	for _, tc := range []struct {
		what string
		call func() error
		code codes.Code
		want string
	}{
		{"overlapping subnets", func() error {
			_, err := e.api.CreateNetwork(e.ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.1.0.0/16", "10.1.2.0/24"}}})
			return err
		}, codes.InvalidArgument, "overlap"},
		{"VNI collision", func() error {
			_, err := e.api.CreateNetwork(e.ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "x", Tenant: "t", Vni: 100}})
			return err
		}, codes.AlreadyExists, `VNI 100 is already used by network "red"`},
		{"MAC in use", func() error {
			_, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "red", Name: "z", Mac: "52:54:00:00:00:02", Host: n1.id}})
			return err
		}, codes.AlreadyExists, `MAC 52:54:00:00:00:02 is already used by port "b"`},
		{"IP in use", func() error {
			_, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "red", Name: "z", Ips: []string{"10.0.0.1"}, Host: n2.id}})
			return err
		}, codes.AlreadyExists, `address 10.0.0.1 is already used by port "a"`},
		{"ACL that does not validate", func() error {
			_, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "red", Name: "z", Host: n1.id,
				Policy: &basaltv1.PortPolicy{Acl: []*basaltv1.AclRule{{Direction: in, Action: allow, Protocol: icmp, PortMin: 22, PortMax: 22}}}}})
			return err
		}, codes.InvalidArgument, "ports need protocol tcp or udp"},
		{"moving a port onto a used address", func() error {
			p, _ := e.api.GetPort(e.ctx, &basaltv1.GetPortRequest{Network: "red", Name: "a"})
			p.Ips, p.Host = []string{"10.0.0.2"}, n2.id
			_, err := e.api.UpdatePort(e.ctx, &basaltv1.UpdatePortRequest{Port: p})
			return err
		}, codes.AlreadyExists, `address 10.0.0.2 is already used by port "b"`},
	} {
		err := tc.call()
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s: %v; want %s containing %q", tc.what, err, tc.code, tc.want)
		}
	}
	// A port whose tap is the host's underlay device: valid for the API (it cannot know host interfaces), left
	// out by h1's agent (h2 only learns a remote port behind h1, which changes no link and no rule).
	if _, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "red", Name: "evil", Tap: "eth0", Host: n1.id, Ips: []string{"10.0.0.9"}}}); err != nil {
		t.Fatal(err)
	}
	for {
		_, gen, next := n1.agent.Applied()
		if gen > gen1 {
			break
		}
		select {
		case <-next:
		case <-time.After(10 * time.Second):
			t.Fatal("h1 did not apply after the new port")
		}
	}
	if after := snapshot(t, h1); !reflect.DeepEqual(s1, after) {
		t.Fatalf("refused or invalid input changed h1:\nbefore %v\nafter  %v", s1, after)
	}
	if after := snapshot(t, h2); !reflect.DeepEqual(s2, after) {
		t.Fatalf("refused or invalid input changed h2:\nbefore %v\nafter  %v", s2, after)
	}
	e.mustPing(a, "10.0.0.2")
}
