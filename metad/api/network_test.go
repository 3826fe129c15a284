package api_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// keys returns every key under the network part of the schema with its value, to prove a refused call wrote
// nothing.
func netKeys(t *testing.T, s *store.Store) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, p := range []string{schema.NetworksPrefix, schema.PortsPrefix, schema.NetClaimsPrefix} {
		resp, err := s.Client.Get(context.Background(), p, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			out[string(kv.Key)] = fmt.Sprint(kv.ModRevision)
		}
	}
	return out
}

func sameKeys(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	if len(before) != len(after) {
		t.Fatalf("%s changed the store: %d keys before, %d after", what, len(before), len(after))
	}
	for k, v := range before {
		if after[k] != v {
			t.Fatalf("%s changed %s", what, k)
		}
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code, contains string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), contains) {
		t.Fatalf("%s = %v; want %s containing %q", what, err, code, contains)
	}
}

func TestNetworkLifecycle(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ns := basaltv1.NewNetworkServiceClient(c)

	a, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{
		Name: "red", Tenant: "acme", Subnets: []string{"10.0.0.0/24", "fd00:1::/64"}, Gateway: &basaltv1.Gateway{Nat: true},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if a.GetVni() != 1 || a.GetRevision() == 0 || a.GetCreatedAt() == nil {
		t.Fatalf("created %v; want VNI 1 and a revision", a)
	}
	if got := a.GetGateway().GetAddresses(); len(got) != 2 || got[0] != "10.0.0.1" || got[1] != "fd00:1::1" {
		t.Fatalf("default gateway addresses = %v", got)
	}
	if a.GetGateway().GetMac() != "02:62:67:00:00:01" {
		t.Fatalf("gateway MAC = %q", a.GetGateway().GetMac())
	}
	b, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "blue", Tenant: "other", Subnets: []string{"10.0.0.0/24"}, Vni: 5000}})
	if err != nil || b.GetVni() != 5000 {
		t.Fatalf("explicit VNI: %v, %v", b, err)
	}

	before := netKeys(t, s)
	for _, tc := range []struct {
		nw       *basaltv1.Network
		code     codes.Code
		contains string
	}{
		{&basaltv1.Network{Name: "x", Tenant: "t", Vni: 5000}, codes.AlreadyExists, `VNI 5000 is already used by network "blue"`},
		{&basaltv1.Network{Name: "red", Tenant: "t"}, codes.AlreadyExists, `network "red" already exists`},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.0/16", "10.0.5.0/24"}}, codes.InvalidArgument, "subnets 10.0.0.0/16 and 10.0.5.0/24 overlap"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.1/24"}}, codes.InvalidArgument, "did you mean 10.0.0.0/24"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.0"}}, codes.InvalidArgument, "not a CIDR"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.0/31"}}, codes.InvalidArgument, "too small"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Vni: 1 << 24}, codes.InvalidArgument, "out of range"},
		{&basaltv1.Network{Name: "x", Tenant: ""}, codes.InvalidArgument, "tenant"},
		{&basaltv1.Network{Name: "X", Tenant: "t"}, codes.InvalidArgument, "network name"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Gateway: &basaltv1.Gateway{}}, codes.InvalidArgument, "needs at least one subnet"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.0/24"}, Gateway: &basaltv1.Gateway{Addresses: []string{"10.1.0.1"}}}, codes.InvalidArgument, "none of the network's subnets"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"10.0.0.0/24"}, Gateway: &basaltv1.Gateway{Addresses: []string{"10.0.0.255"}}}, codes.InvalidArgument, "broadcast"},
		{&basaltv1.Network{Name: "x", Tenant: "t", Subnets: []string{"fd00::/64"}, Mtu: 1000}, codes.InvalidArgument, "too small for IPv6"},
	} {
		_, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: tc.nw})
		wantCode(t, fmt.Sprintf("CreateNetwork(%v)", tc.nw), err, tc.code, tc.contains)
	}
	sameKeys(t, "refused CreateNetwork", before, netKeys(t, s))

	// The lowest free VNI is taken, and concurrent creates never share one.
	var wg sync.WaitGroup
	vnis := make(chan uint32, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: fmt.Sprintf("n%d", i), Tenant: "t"}})
			if err != nil {
				t.Error(err)
				return
			}
			vnis <- n.GetVni()
		}()
	}
	wg.Wait()
	close(vnis)
	seen := map[uint32]bool{}
	for v := range vnis {
		if seen[v] || v < 2 || v > 9 {
			t.Fatalf("VNI %d handed out twice or not the lowest free (%v)", v, seen)
		}
		seen[v] = true
	}

	list, err := ns.ListNetworks(ctx, &basaltv1.ListNetworksRequest{Tenant: "acme"})
	if err != nil || len(list.GetNetworks()) != 1 || list.GetNetworks()[0].GetName() != "red" {
		t.Fatalf("ListNetworks(acme) = %v, %v", list, err)
	}
	if _, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "red", Name: "p", Ips: []string{"10.0.0.5"}}}); err != nil {
		t.Fatal(err)
	}
	_, err = ns.DeleteNetwork(ctx, &basaltv1.DeleteNetworkRequest{Name: "red"})
	wantCode(t, "DeleteNetwork with a port", err, codes.FailedPrecondition, "still has ports (p)")
	if _, err := ns.DeletePort(ctx, &basaltv1.DeletePortRequest{Network: "red", Name: "p"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.DeleteNetwork(ctx, &basaltv1.DeleteNetworkRequest{Name: "red"}); err != nil {
		t.Fatal(err)
	}
	for k := range netKeys(t, s) {
		if strings.Contains(k, "/red/") || strings.HasSuffix(k, "/red") || strings.HasSuffix(k, "/vni/1") {
			t.Errorf("key %s survived the deletion of its network", k)
		}
	}
	// VNI 1 is free again.
	if n, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "again", Tenant: "t"}}); err != nil || n.GetVni() != 1 {
		t.Fatalf("re-create after delete: %v, %v; want VNI 1", n, err)
	}
	_, err = ns.GetNetwork(ctx, &basaltv1.GetNetworkRequest{Name: "red"})
	wantCode(t, "GetNetwork(deleted)", err, codes.NotFound, `network "red" does not exist`)
}

func TestPortValidationIsAllOrNothing(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ns := basaltv1.NewNetworkServiceClient(c)
	for _, n := range []*basaltv1.Network{
		{Name: "a", Tenant: "one", Subnets: []string{"10.0.0.0/24", "fd00::/64"}, Gateway: &basaltv1.Gateway{}},
		{Name: "b", Tenant: "two", Subnets: []string{"10.0.0.0/24"}},
	} {
		if _, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: n}); err != nil {
			t.Fatal(err)
		}
	}
	p1, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "a", Name: "vm1", Ips: []string{"10.0.0.10", "fd00:0::0a"}, Host: "h1"}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(p1.GetMac(), "52:54:00:") || !strings.HasPrefix(p1.GetTap(), "bt") || len(p1.GetTap()) != 10 {
		t.Fatalf("defaults: MAC %q, tap %q", p1.GetMac(), p1.GetTap())
	}
	if !p1.GetPolicy().GetSpoofGuard() || !p1.GetPolicy().GetDhcpGuard() || p1.GetIps()[1] != "fd00::a" {
		t.Fatalf("defaults: policy %v, IPs %v (want guards on, canonical addresses)", p1.GetPolicy(), p1.GetIps())
	}
	// The same MAC and IP in another tenant's network is fine.
	if _, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "b", Name: "vm1", Mac: p1.GetMac(), Ips: []string{"10.0.0.10"}, Tap: "tapb1"}}); err != nil {
		t.Fatalf("same MAC and IP in another network: %v", err)
	}

	port := func(mut func(*basaltv1.Port)) *basaltv1.Port {
		p := &basaltv1.Port{Network: "a", Name: "vm2", Ips: []string{"10.0.0.20"}, Policy: &basaltv1.PortPolicy{}}
		mut(p)
		return p
	}
	acl := func(r *basaltv1.AclRule) func(*basaltv1.Port) {
		return func(p *basaltv1.Port) { p.Policy.Acl = append(p.Policy.Acl, r) }
	}
	in, allow, tcp, icmp := basaltv1.AclDirection_ACL_DIRECTION_IN, basaltv1.AclAction_ACL_ACTION_ALLOW, basaltv1.AclProtocol_ACL_PROTOCOL_TCP, basaltv1.AclProtocol_ACL_PROTOCOL_ICMP
	before := netKeys(t, s)
	for _, tc := range []struct {
		what     string
		p        *basaltv1.Port
		code     codes.Code
		contains string
	}{
		{"MAC in use", port(func(p *basaltv1.Port) { p.Mac = strings.ToUpper(p1.GetMac()) }), codes.AlreadyExists, `MAC ` + p1.GetMac() + ` is already used by port "vm1"`},
		{"IP in use", port(func(p *basaltv1.Port) { p.Ips = []string{"10.0.0.30", "10.0.0.10"} }), codes.AlreadyExists, `address 10.0.0.10 is already used by port "vm1"`},
		{"IPv6 in use, other spelling", port(func(p *basaltv1.Port) { p.Ips = []string{"fd00:0:0::a"} }), codes.AlreadyExists, `fd00::a is already used`},
		{"gateway address", port(func(p *basaltv1.Port) { p.Ips = []string{"10.0.0.1"} }), codes.AlreadyExists, "gateway's"},
		{"tap in use", port(func(p *basaltv1.Port) { p.Tap = "tapb1" }), codes.AlreadyExists, "tap tapb1 is already used by port b/vm1"},
		{"port exists", port(func(p *basaltv1.Port) { p.Name = "vm1" }), codes.AlreadyExists, `port "vm1" in network "a" already exists`},
		{"IP outside subnets", port(func(p *basaltv1.Port) { p.Ips = []string{"10.9.0.1"} }), codes.InvalidArgument, "none of the network's subnets"},
		{"network address", port(func(p *basaltv1.Port) { p.Ips = []string{"10.0.0.0"} }), codes.InvalidArgument, "network address"},
		{"IP with prefix", port(func(p *basaltv1.Port) { p.Ips = []string{"10.0.0.7/24"} }), codes.InvalidArgument, "without prefix length"},
		{"IP twice", port(func(p *basaltv1.Port) { p.Ips = []string{"10.0.0.7", "10.0.0.7"} }), codes.InvalidArgument, "given twice"},
		{"multicast MAC", port(func(p *basaltv1.Port) { p.Mac = "01:00:5e:00:00:01" }), codes.InvalidArgument, "multicast"},
		{"gateway MAC", port(func(p *basaltv1.Port) { p.Mac = "02:62:67:00:00:01" }), codes.InvalidArgument, "gateway's"},
		{"bad MAC", port(func(p *basaltv1.Port) { p.Mac = "52:54:00:zz:00:01" }), codes.InvalidArgument, "not an Ethernet address"},
		{"bad tap", port(func(p *basaltv1.Port) { p.Tap = "a-very-long-tap-name" }), codes.InvalidArgument, "not a Linux interface name"},
		{"no network", port(func(p *basaltv1.Port) { p.Network = "zz" }), codes.NotFound, `network "zz" does not exist`},
		{"iso and promiscuous", port(func(p *basaltv1.Port) { p.Policy.Isolated, p.Policy.Promiscuous = true, true }), codes.InvalidArgument, "both isolated and promiscuous"},
		{"mirror to nothing", port(func(p *basaltv1.Port) { p.Policy.MirrorTo = "ghost" }), codes.InvalidArgument, `port "ghost" does not exist`},
		{"mirror to self", port(func(p *basaltv1.Port) { p.Policy.MirrorTo = "vm2" }), codes.InvalidArgument, "itself"},
		{"min above max", port(func(p *basaltv1.Port) { p.Policy.BandwidthMinBps, p.Policy.BandwidthMaxBps = 2e6, 1e6 }), codes.InvalidArgument, "above the maximum"},
		{"acl no direction", port(acl(&basaltv1.AclRule{Action: allow})), codes.InvalidArgument, "ACL rule 0: direction must be in or out"},
		{"acl ports on icmp", port(acl(&basaltv1.AclRule{Direction: in, Action: allow, Protocol: icmp, PortMin: 1, PortMax: 2})), codes.InvalidArgument, "ports need protocol tcp or udp"},
		{"acl empty range", port(acl(&basaltv1.AclRule{Direction: in, Action: allow, Protocol: tcp, PortMin: 90, PortMax: 80})), codes.InvalidArgument, "port range 90-80"},
		{"acl host bits", port(acl(&basaltv1.AclRule{Id: "web", Direction: in, Action: allow, Cidr: "10.0.0.1/24"})), codes.InvalidArgument, "ACL rule 0 (web): 10.0.0.1/24 has host bits set: did you mean 10.0.0.0/24"},
		{"acl bad cidr", port(acl(&basaltv1.AclRule{Direction: in, Action: allow, Cidr: "10.0.0/8"})), codes.InvalidArgument, "not a CIDR"},
		{"acl duplicate id", port(func(p *basaltv1.Port) {
			p.Policy.Acl = []*basaltv1.AclRule{{Id: "1", Direction: in, Action: allow}, {Direction: in, Action: allow}}
		}), codes.InvalidArgument, `ACL rule 1: its default ID "1" (its position) is already used by rule 0`},
	} {
		_, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: tc.p})
		wantCode(t, tc.what, err, tc.code, tc.contains)
	}
	sameKeys(t, "refused CreatePort", before, netKeys(t, s))

	// Concurrent creates of the same address: exactly one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "a", Name: fmt.Sprintf("race%d", i), Ips: []string{"10.0.0.99"}}})
			mu.Lock()
			defer mu.Unlock()
			switch status.Code(err) {
			case codes.OK:
				won++
			case codes.AlreadyExists:
			default:
				t.Errorf("racing create: %v", err)
			}
		}()
	}
	wg.Wait()
	if won != 1 {
		t.Fatalf("%d racing creates of one address succeeded, want 1", won)
	}
}

func TestUpdatePort(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ns := basaltv1.NewNetworkServiceClient(c)
	if _, err := ns.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "a", Tenant: "t", Subnets: []string{"10.0.0.0/24"}}}); err != nil {
		t.Fatal(err)
	}
	mk := func(name, ip string) *basaltv1.Port {
		p, err := ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "a", Name: name, Ips: []string{ip}, Host: "h1"}})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	p, q := mk("p", "10.0.0.2"), mk("q", "10.0.0.3")

	// Move p to h2 and renumber it; its old address is free for q at once.
	p.Host, p.Ips = "h2", []string{"10.0.0.4"}
	p.Policy.MirrorTo = "q"
	p2, err := ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: p, Revision: p.GetRevision()})
	if err != nil {
		t.Fatal(err)
	}
	if p2.GetHost() != "h2" || p2.GetMac() != p.GetMac() || p2.GetRevision() <= p.GetRevision() || !p2.GetCreatedAt().AsTime().Equal(p.GetCreatedAt().AsTime()) {
		t.Fatalf("updated port = %v", p2)
	}
	q.Ips = []string{"10.0.0.3", "10.0.0.2"}
	if _, err := ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: q}); err != nil {
		t.Fatalf("taking a freed address: %v", err)
	}

	before := netKeys(t, s)
	stale := clonePort(p2)
	stale.Host = "h3"
	_, err = ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: stale, Revision: p.GetRevision()})
	wantCode(t, "update at a stale revision", err, codes.Aborted, "changed since revision")
	bad := clonePort(p2)
	bad.Ips = []string{"10.0.0.5", "10.0.0.3"}
	_, err = ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: bad})
	wantCode(t, "update to a used address", err, codes.AlreadyExists, `address 10.0.0.3 is already used by port "q"`)
	bad = clonePort(p2)
	bad.Mac = "52:54:00:00:00:01"
	_, err = ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: bad})
	wantCode(t, "MAC change", err, codes.InvalidArgument, "the MAC cannot change")
	_, err = ns.DeletePort(ctx, &basaltv1.DeletePortRequest{Network: "a", Name: "q"})
	wantCode(t, "delete a mirror target", err, codes.FailedPrecondition, `port "q" is the mirror target of p`)
	bad = clonePort(p2)
	bad.IncomingHost = "h3"
	_, err = ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: bad})
	wantCode(t, "setting the incoming placement", err, codes.InvalidArgument, "incoming_host is set by computed")
	_, err = ns.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{Network: "a", Name: "r", Host: "h1", IncomingHost: "h2"}})
	wantCode(t, "creating a port with an incoming placement", err, codes.InvalidArgument, "incoming_host is set by computed")
	sameKeys(t, "refused UpdatePort/DeletePort", before, netKeys(t, s))

	// computed sets the incoming placement of a migration in etcd; an update through the API keeps it, whether
	// it leaves it out or sends back what it read.
	rec, err := store.Get[basaltv1.Port](ctx, s, schema.PortKey("a", "p"))
	if err != nil {
		t.Fatal(err)
	}
	rec.Value.IncomingHost = "h3"
	if _, err := s.Update(ctx, rec.Key, rec.Value, rec.ModRevision); err != nil {
		t.Fatal(err)
	}
	for _, keep := range []string{"", "h3"} {
		upd := clonePort(p2)
		upd.IncomingHost = keep
		upd.Policy.Isolated = keep == ""
		got, err := ns.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: upd})
		if err != nil {
			t.Fatalf("update with incoming_host %q: %v", keep, err)
		}
		if got.GetIncomingHost() != "h3" || got.GetPolicy().GetIsolated() != (keep == "") {
			t.Fatalf("update with incoming_host %q: got %v", keep, got)
		}
	}

	got, err := ns.ListPorts(ctx, &basaltv1.ListPortsRequest{Host: "h2"})
	if err != nil || len(got.GetPorts()) != 1 || got.GetPorts()[0].GetName() != "p" {
		t.Fatalf("ListPorts(host h2) = %v, %v", got, err)
	}
	_, err = ns.GetPortCounters(ctx, &basaltv1.GetPortCountersRequest{Network: "a", Name: "p"})
	wantCode(t, "counters of a port on an unknown host", err, codes.FailedPrecondition, `where no netd is registered`)
}

func clonePort(p *basaltv1.Port) *basaltv1.Port { return proto.Clone(p).(*basaltv1.Port) }
