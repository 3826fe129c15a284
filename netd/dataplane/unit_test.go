package dataplane

// Tests that need neither root nor namespaces.

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

func validState() HostState {
	return HostState{
		UnderlayIP:  netip.MustParseAddr("192.0.2.1"),
		UnderlayDev: "eth0",
		Networks:    []Network{{Name: "a", VNI: 100}, {Name: "b", VNI: 200, MTU: 1400}},
		Ports: []Port{
			{Network: "a", Name: "p1", MAC: mustMAC("52:54:00:00:00:01"), IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Tap: "tap1",
				Policy: PortPolicy{SpoofGuard: true, DHCPGuard: true, ACL: []ACLRule{{Direction: In, Protocol: TCP, PortMin: 22, PortMax: 22, Action: Allow}}}},
			{Network: "b", Name: "p2", MAC: mustMAC("52:54:00:00:00:01"), Tap: "tap2", Policy: PortPolicy{Isolated: true}},
		},
		Remote: []RemotePort{{Network: "a", MAC: mustMAC("52:54:00:00:00:02"), HostVTEP: netip.MustParseAddr("192.0.2.2")}},
	}
}

func TestValidate(t *testing.T) {
	ok := normalize(validState())
	if err := ok.validate("bs"); err != nil {
		t.Fatalf("valid state rejected: %v", err)
	}
	cases := map[string]func(*HostState){
		"duplicate network":   func(s *HostState) { s.Networks = append(s.Networks, Network{Name: "a", VNI: 300}) },
		"duplicate vni":       func(s *HostState) { s.Networks[1].VNI = 100 },
		"vni zero":            func(s *HostState) { s.Networks[0].VNI = 0 },
		"vni too big":         func(s *HostState) { s.Networks[0].VNI = 1 << 24 },
		"no underlay ip":      func(s *HostState) { s.UnderlayIP = netip.Addr{} },
		"bad underlay dev":    func(s *HostState) { s.UnderlayDev = "this-name-is-too-long" },
		"unknown network":     func(s *HostState) { s.Ports[0].Network = "zz" },
		"duplicate port":      func(s *HostState) { s.Ports[1].Name = "p1" },
		"duplicate tap":       func(s *HostState) { s.Ports[1].Tap = "tap1" },
		"tap is a bridge":     func(s *HostState) { s.Ports[1].Tap = "bsb100" },
		"multicast mac":       func(s *HostState) { s.Ports[0].MAC = mustMAC("01:00:5e:00:00:01") },
		"short mac":           func(s *HostState) { s.Ports[0].MAC = s.Ports[0].MAC[:4] },
		"iso and promiscuous": func(s *HostState) { s.Ports[0].Policy.Isolated, s.Ports[0].Policy.Promiscuous = true, true },
		"acl no direction":    func(s *HostState) { s.Ports[0].Policy.ACL[0].Direction = 0 },
		"acl ports on icmp":   func(s *HostState) { s.Ports[0].Policy.ACL[0].Protocol = ICMP },
		"acl empty range":     func(s *HostState) { s.Ports[0].Policy.ACL[0].PortMin = 23 },
		"acl host bits":       func(s *HostState) { s.Ports[0].Policy.ACL[0].CIDR = netip.MustParsePrefix("10.0.0.1/24") },
		"acl duplicate id": func(s *HostState) {
			s.Ports[0].Policy.ACL = append(s.Ports[0].Policy.ACL, ACLRule{ID: "0", Direction: In, Action: Deny})
		},
		"remote mac clash": func(s *HostState) { s.Remote[0].MAC = s.Ports[0].MAC },
		"incoming mac twice remote": func(s *HostState) {
			s.Ports[0].Incoming = true
			s.Remote[0].MAC = s.Ports[0].MAC
			s.Remote = append(s.Remote, RemotePort{Network: "a", MAC: s.Ports[0].MAC, HostVTEP: netip.MustParseAddr("192.0.2.3")})
		},
		"remote unknown net":   func(s *HostState) { s.Remote[0].Network = "zz" },
		"remote vtep is us":    func(s *HostState) { s.Remote[0].HostVTEP = s.UnderlayIP },
		"remote vtep family":   func(s *HostState) { s.Remote[0].HostVTEP = netip.MustParseAddr("2001:db8::1") },
		"remote iso and promi": func(s *HostState) { s.Remote[0].Isolated, s.Remote[0].Promiscuous = true, true },
	}
	for name, mutate := range cases {
		s := normalize(validState())
		mutate(&s)
		if err := s.validate("bs"); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A live migration's destination: the incoming port shares its MAC with the remote port its traffic still
	// goes to.
	in := normalize(validState())
	in.Ports[0].Incoming = true
	in.Remote[0].MAC = in.Ports[0].MAC
	if err := in.validate("bs"); err != nil {
		t.Errorf("incoming port with its remote twin rejected: %v", err)
	}
}

func TestNames(t *testing.T) {
	for _, n := range []string{bridgeName("abcdef", maxVNI), vxlanName("abcdef", maxVNI)} {
		if len(n) > ifNameMax {
			t.Errorf("%s is longer than %d", n, ifNameMax)
		}
	}
	if _, err := New(Options{Prefix: "toolong1"}); err == nil {
		t.Errorf("a 8-character prefix was accepted")
	}
	if got := eui64LinkLocal(mustMAC("52:54:00:12:34:56")); got != netip.MustParseAddr("fe80::5054:ff:fe12:3456") {
		t.Errorf("EUI-64 link-local = %v", got)
	}
}

func comments(rs *ruleset) map[string][]string {
	out := map[string][]string{}
	for _, c := range rs.chains {
		for _, r := range c.rules {
			out[c.name] = append(out[c.name], r.comment)
		}
	}
	return out
}

// The ruleset is a pure function of the state, and a change to one port only
// changes that port's chains.
func TestRulesetDeterministicAndLocal(t *testing.T) {
	ul := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, MTU: 1500}}
	s := normalize(validState())
	r1 := comments(buildRuleset(resolveWith("bs", s, ul)))
	r2 := comments(buildRuleset(resolveWith("bs", normalize(validState()), ul)))
	if !reflect.DeepEqual(r1, r2) {
		t.Fatalf("same state, different rules")
	}
	s2 := normalize(validState())
	s2.Ports[0].IPs = append(s2.Ports[0].IPs, netip.MustParseAddr("10.0.0.9"))
	r3 := comments(buildRuleset(resolveWith("bs", s2, ul)))
	for ch := range r1 {
		same := reflect.DeepEqual(r1[ch], r3[ch])
		if ch == "from_tap1" && same {
			t.Errorf("from_tap1 did not change with the port's addresses")
		}
		if ch != "from_tap1" && !same {
			t.Errorf("chain %s changed although only tap1's addresses did", ch)
		}
	}
	d := resolveWith("bs", s, ul)
	if d.byName["a"].mtu != 1450 || d.byName["b"].mtu != 1400 {
		t.Errorf("MTUs: %d %d", d.byName["a"].mtu, d.byName["b"].mtu)
	}
	for _, c := range r1 {
		for _, cm := range c {
			if len(cm) > 128 || !strings.Contains(cm, " ") {
				t.Errorf("bad comment %q", cm)
			}
		}
	}
}
