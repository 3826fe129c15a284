package api

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// NetworkServer serves NetworkService: virtual networks and ports in etcd, which every netd programs. Each call
// is validated as a whole and written in one transaction together with the claim keys that make VNIs, MACs,
// IPs and taps unique, so a refused call leaves nothing behind and two concurrent calls cannot both take the
// same address.
type NetworkServer struct {
	basaltv1.UnimplementedNetworkServiceServer
	Store *store.Store
	// CountersTimeout bounds a GetPortCounters call to a netd; 0 means 5 seconds.
	CountersTimeout time.Duration
}

// claim is a key that must not exist for a transaction to succeed, with the error to return if it does (given
// the claim's current owner).
type claim struct {
	key   string
	taken func(owner string) error
}

// txn is one all-or-nothing change: conditions, claims and writes.
type txn struct {
	cmps   []clientv3.Cmp
	claims []claim
	ops    []clientv3.Op
}

// absent makes the transaction conditional on key not existing; taken says why it failed if it does.
func (t *txn) absent(key string, taken func(string) error) {
	t.claims = append(t.claims, claim{key, taken})
	t.cmps = append(t.cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
}

// claim writes key with the owner's name, if it does not exist yet.
func (t *txn) claim(key, owner string, taken func(string) error) {
	t.absent(key, taken)
	t.ops = append(t.ops, clientv3.OpPut(key, owner))
}

func (t *txn) put(key string, m proto.Message) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return status.Errorf(codes.Internal, "encode %s: %v", key, err)
	}
	t.ops = append(t.ops, clientv3.OpPut(key, string(b)))
	return nil
}

// errRetry means the transaction's other conditions failed: a concurrent change; read again.
var errRetry = errors.New("concurrent change")

// commit runs the transaction. If it fails it reads every claim key in the same round trip and returns the
// error of the first claim that was taken, or errRetry.
func (t *txn) commit(ctx context.Context, s *store.Store) (int64, error) {
	var gets []clientv3.Op
	for _, c := range t.claims {
		gets = append(gets, clientv3.OpGet(c.key))
	}
	resp, err := s.Client.Txn(ctx).If(t.cmps...).Then(t.ops...).Else(gets...).Commit()
	if err != nil {
		return 0, toStatus(err)
	}
	if resp.Succeeded {
		return resp.Header.GetRevision(), nil
	}
	for i, r := range resp.Responses {
		if kvs := r.GetResponseRange().GetKvs(); len(kvs) > 0 {
			return 0, t.claims[i].taken(string(kvs[0].Value))
		}
	}
	return 0, errRetry
}

// retry runs fn until it does not return errRetry, a few times at most.
func retry(ctx context.Context, fn func() error) error {
	for range 8 {
		err := fn()
		if !errors.Is(err, errRetry) {
			return err
		}
		if ctx.Err() != nil {
			return toStatus(ctx.Err())
		}
	}
	return status.Error(codes.Aborted, "the network changed concurrently too many times; try again")
}

func exists(what string) func(string) error {
	return func(owner string) error {
		return status.Errorf(codes.AlreadyExists, "%s already exists", what)
	}
}

// CreateNetwork records a network, its VNI claim and its gateway's address claims.
func (s *NetworkServer) CreateNetwork(ctx context.Context, r *basaltv1.CreateNetworkRequest) (*basaltv1.Network, error) {
	nw, _ := proto.Clone(r.GetNetwork()).(*basaltv1.Network)
	if nw == nil {
		return nil, invalid("no network given")
	}
	spec, err := validateNetwork(nw)
	if err != nil {
		return nil, invalid("%v", err)
	}
	nw.CreatedAt = timestamppb.Now()
	nw.Revision = 0
	want := nw.GetVni()
	err = retry(ctx, func() error {
		if want == 0 {
			vni, err := s.freeVNI(ctx)
			if err != nil {
				return err
			}
			nw.Vni = vni
		}
		if nw.GetGateway() != nil {
			nw.Gateway.Mac = GatewayMAC(nw.GetVni())
		}
		t := &txn{}
		key := schema.NetworkKey(nw.GetName())
		t.absent(key, exists(fmt.Sprintf("network %q", nw.GetName())))
		if err := t.put(key, nw); err != nil {
			return err
		}
		t.claim(schema.VNIClaimKey(nw.GetVni()), nw.GetName(), func(owner string) error {
			if want == 0 {
				return errRetry // someone took the VNI we picked: pick again
			}
			return status.Errorf(codes.AlreadyExists, "VNI %d is already used by network %q", nw.GetVni(), owner)
		})
		for _, a := range spec.gateway {
			// A fresh network has no claims; a leftover would be a bug, reported rather than overwritten.
			t.claim(schema.IPClaimKey(nw.GetName(), a), "gateway", func(owner string) error {
				return status.Errorf(codes.Internal, "address %s of the new network %q is already claimed by %q", a, nw.GetName(), owner)
			})
		}
		rev, err := t.commit(ctx, s.Store)
		nw.Revision = rev
		return err
	})
	if err != nil {
		return nil, err
	}
	return nw, nil
}

// freeVNI returns the lowest VNI without a claim.
func (s *NetworkServer) freeVNI(ctx context.Context) (uint32, error) {
	resp, err := s.Store.Client.Get(ctx, schema.VNIClaimsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, toStatus(err)
	}
	used := make([]uint32, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		v, err := strconv.ParseUint(schema.IDFromKey(schema.VNIClaimsPrefix, string(kv.Key)), 10, 32)
		if err == nil {
			used = append(used, uint32(v))
		}
	}
	slices.Sort(used)
	next := uint32(1)
	for _, v := range used {
		if v == next {
			next++
		} else if v > next {
			break
		}
	}
	if next > MaxVNI {
		return 0, status.Error(codes.ResourceExhausted, "every VNI is in use")
	}
	return next, nil
}

func (s *NetworkServer) getNetwork(ctx context.Context, name string) (store.Record[*basaltv1.Network], error) {
	if err := schema.ValidateName("network", name); err != nil {
		return store.Record[*basaltv1.Network]{}, invalid("%v", err)
	}
	rec, err := store.Get[basaltv1.Network](ctx, s.Store, schema.NetworkKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return rec, status.Errorf(codes.NotFound, "network %q does not exist", name)
	}
	if err != nil {
		return rec, toStatus(err)
	}
	rec.Value.Revision = rec.ModRevision
	return rec, nil
}

// GetNetwork returns one network.
func (s *NetworkServer) GetNetwork(ctx context.Context, r *basaltv1.GetNetworkRequest) (*basaltv1.Network, error) {
	rec, err := s.getNetwork(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return rec.Value, nil
}

// ListNetworks lists networks by name, optionally of one tenant.
func (s *NetworkServer) ListNetworks(ctx context.Context, r *basaltv1.ListNetworksRequest) (*basaltv1.ListNetworksResponse, error) {
	recs, _, err := store.List[basaltv1.Network](ctx, s.Store, schema.NetworksPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &basaltv1.ListNetworksResponse{}
	for _, rec := range recs {
		if r.GetTenant() != "" && rec.Value.GetTenant() != r.GetTenant() {
			continue
		}
		rec.Value.Revision = rec.ModRevision
		out.Networks = append(out.Networks, rec.Value)
	}
	return out, nil
}

// DeleteNetwork removes a network without ports, with its claims.
func (s *NetworkServer) DeleteNetwork(ctx context.Context, r *basaltv1.DeleteNetworkRequest) (*basaltv1.DeleteNetworkResponse, error) {
	rec, err := s.getNetwork(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	name := rec.Value.GetName()
	portsPrefix := schema.NetworkPortsPrefix(name)
	resp, err := s.Store.Client.Txn(ctx).
		If(
			clientv3.Compare(clientv3.ModRevision(rec.Key), "=", rec.ModRevision),
			// No key under the prefix: a range compare holds for every key in the range, and an empty range
			// compares as an absent key.
			clientv3.Compare(clientv3.CreateRevision(portsPrefix), "=", 0).WithPrefix(),
		).
		Then(
			clientv3.OpDelete(rec.Key),
			clientv3.OpDelete(schema.VNIClaimKey(rec.Value.GetVni())),
			clientv3.OpDelete(schema.IPClaimPrefix(name), clientv3.WithPrefix()),
			clientv3.OpDelete(schema.MACClaimPrefix(name), clientv3.WithPrefix()),
		).
		Else(clientv3.OpGet(portsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(5))).
		Commit()
	if err != nil {
		return nil, toStatus(err)
	}
	if !resp.Succeeded {
		rr := resp.Responses[0].GetResponseRange()
		if len(rr.GetKvs()) == 0 {
			return nil, status.Errorf(codes.Aborted, "network %q changed concurrently; try again", name)
		}
		var names []string
		for _, kv := range rr.GetKvs() {
			_, p, _ := schema.PortFromKey(string(kv.Key))
			names = append(names, p)
		}
		more := ""
		if rr.GetCount() > int64(len(names)) {
			more = fmt.Sprintf(" and %d more", rr.GetCount()-int64(len(names)))
		}
		return nil, status.Errorf(codes.FailedPrecondition, "network %q still has ports (%s%s); delete them first", name, strings.Join(names, ", "), more)
	}
	return &basaltv1.DeleteNetworkResponse{}, nil
}

func macTaken(network, mac string) func(string) error {
	return func(owner string) error {
		return status.Errorf(codes.AlreadyExists, "MAC %s is already used by port %q in network %q", mac, owner, network)
	}
}

func ipTaken(network string, a netip.Addr) func(string) error {
	return func(owner string) error {
		if owner == "gateway" {
			return status.Errorf(codes.AlreadyExists, "address %s is the gateway's in network %q", a, network)
		}
		return status.Errorf(codes.AlreadyExists, "address %s is already used by port %q in network %q", a, owner, network)
	}
}

func tapTaken(tap string) func(string) error {
	return func(owner string) error {
		return status.Errorf(codes.AlreadyExists, "tap %s is already used by port %s", tap, owner)
	}
}

// mirrorTarget adds to t the condition that the port's mirror target exists unchanged in the network.
func (s *NetworkServer) mirrorTarget(ctx context.Context, t *txn, p *basaltv1.Port) error {
	m := p.GetPolicy().GetMirrorTo()
	if m == "" {
		return nil
	}
	rec, err := store.Get[basaltv1.Port](ctx, s.Store, schema.PortKey(p.GetNetwork(), m))
	if errors.Is(err, store.ErrNotFound) {
		return status.Errorf(codes.InvalidArgument, "mirror target: port %q does not exist in network %q", m, p.GetNetwork())
	}
	if err != nil {
		return toStatus(err)
	}
	t.cmps = append(t.cmps, clientv3.Compare(clientv3.CreateRevision(rec.Key), "=", rec.CreateRevision))
	return nil
}

// CreatePort records a port with its MAC, IP and tap claims.
func (s *NetworkServer) CreatePort(ctx context.Context, r *basaltv1.CreatePortRequest) (*basaltv1.Port, error) {
	in := r.GetPort()
	if in == nil {
		return nil, invalid("no port given")
	}
	if in.GetIncomingHost() != "" {
		return nil, invalid("port %q: incoming_host is set by computed while it live-migrates the port's VM, not through the API", in.GetName())
	}
	nrec, err := s.getNetwork(ctx, in.GetNetwork())
	if err != nil {
		return nil, err
	}
	autoMAC := in.GetMac() == ""
	var out *basaltv1.Port
	err = retry(ctx, func() error {
		p, _ := proto.Clone(in).(*basaltv1.Port)
		spec, err := validatePort(p, nrec.Value)
		if err != nil {
			return invalid("port %q: %v", p.GetName(), err)
		}
		if autoMAC {
			if spec.mac, err = randomMAC(); err != nil {
				return status.Error(codes.Internal, err.Error())
			}
			p.Mac = spec.mac
		}
		if p.GetTap() == "" {
			p.Tap = DefaultTap(p.GetNetwork(), p.GetName())
		}
		p.CreatedAt = timestamppb.Now()
		p.Revision = 0
		nw, name := p.GetNetwork(), p.GetName()
		t := &txn{cmps: []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(nrec.Key), "=", nrec.CreateRevision)}}
		key := schema.PortKey(nw, name)
		t.absent(key, exists(fmt.Sprintf("port %q in network %q", name, nw)))
		if err := t.put(key, p); err != nil {
			return err
		}
		t.claim(schema.MACClaimKey(nw, spec.mac), name, func(owner string) error {
			if autoMAC {
				return errRetry // a random MAC collided: draw another
			}
			return macTaken(nw, spec.mac)(owner)
		})
		for _, a := range spec.ips {
			t.claim(schema.IPClaimKey(nw, a), name, ipTaken(nw, a))
		}
		t.claim(schema.TapClaimKey(p.GetTap()), nw+"/"+name, tapTaken(p.GetTap()))
		if err := s.mirrorTarget(ctx, t, p); err != nil {
			return err
		}
		rev, err := t.commit(ctx, s.Store)
		if err == nil {
			p.Revision = rev
			out = p
		} else if errors.Is(err, errRetry) {
			// The network may be gone, or the mirror target: say so rather than retrying blindly.
			if nrec, err = s.getNetwork(ctx, in.GetNetwork()); err != nil {
				return err
			}
			return errRetry
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (s *NetworkServer) getPort(ctx context.Context, network, name string) (store.Record[*basaltv1.Port], error) {
	if err := schema.ValidateName("network", network); err != nil {
		return store.Record[*basaltv1.Port]{}, invalid("%v", err)
	}
	if err := schema.ValidateName("port", name); err != nil {
		return store.Record[*basaltv1.Port]{}, invalid("%v", err)
	}
	rec, err := store.Get[basaltv1.Port](ctx, s.Store, schema.PortKey(network, name))
	if errors.Is(err, store.ErrNotFound) {
		return rec, status.Errorf(codes.NotFound, "port %q does not exist in network %q", name, network)
	}
	if err != nil {
		return rec, toStatus(err)
	}
	rec.Value.Revision = rec.ModRevision
	return rec, nil
}

// GetPort returns one port.
func (s *NetworkServer) GetPort(ctx context.Context, r *basaltv1.GetPortRequest) (*basaltv1.Port, error) {
	rec, err := s.getPort(ctx, r.GetNetwork(), r.GetName())
	if err != nil {
		return nil, err
	}
	return rec.Value, nil
}

// ListPorts lists ports by network and name, optionally of one network or one host.
func (s *NetworkServer) ListPorts(ctx context.Context, r *basaltv1.ListPortsRequest) (*basaltv1.ListPortsResponse, error) {
	prefix := schema.PortsPrefix
	if n := r.GetNetwork(); n != "" {
		if _, err := s.getNetwork(ctx, n); err != nil {
			return nil, err
		}
		prefix = schema.NetworkPortsPrefix(n)
	}
	recs, _, err := store.List[basaltv1.Port](ctx, s.Store, prefix)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &basaltv1.ListPortsResponse{}
	for _, rec := range recs {
		if r.GetHost() != "" && rec.Value.GetHost() != r.GetHost() {
			continue
		}
		rec.Value.Revision = rec.ModRevision
		out.Ports = append(out.Ports, rec.Value)
	}
	return out, nil
}

// UpdatePort replaces a port's host, addresses and policy, moving its IP claims in the same transaction. The
// incoming placement of a live migration (incoming_host) is kept as it is.
func (s *NetworkServer) UpdatePort(ctx context.Context, r *basaltv1.UpdatePortRequest) (*basaltv1.Port, error) {
	in := r.GetPort()
	if in == nil {
		return nil, invalid("no port given")
	}
	var out *basaltv1.Port
	err := retry(ctx, func() error {
		cur, err := s.getPort(ctx, in.GetNetwork(), in.GetName())
		if err != nil {
			return err
		}
		if r.GetRevision() != 0 && r.GetRevision() != cur.ModRevision {
			return status.Errorf(codes.Aborted, "port %q changed since revision %d (now %d); read it again", in.GetName(), r.GetRevision(), cur.ModRevision)
		}
		nrec, err := s.getNetwork(ctx, in.GetNetwork())
		if err != nil {
			return err
		}
		p, _ := proto.Clone(in).(*basaltv1.Port)
		old := cur.Value
		if p.GetMac() == "" {
			p.Mac = old.GetMac()
		}
		if p.GetTap() == "" {
			p.Tap = old.GetTap()
		}
		spec, err := validatePort(p, nrec.Value)
		if err != nil {
			return invalid("port %q: %v", p.GetName(), err)
		}
		if spec.mac != old.GetMac() {
			return invalid("port %q: the MAC cannot change (%s); create another port", p.GetName(), old.GetMac())
		}
		if p.GetTap() != old.GetTap() {
			return invalid("port %q: the tap cannot change (%s)", p.GetName(), old.GetTap())
		}
		// The incoming placement belongs to the live migration that set it: an update that leaves it out (or
		// carries what it read) keeps it, one that tries to change it is refused.
		if h := p.GetIncomingHost(); h != "" && h != old.GetIncomingHost() {
			return invalid("port %q: incoming_host is set by computed while it live-migrates the port's VM, not through the API", p.GetName())
		}
		p.IncomingHost = old.GetIncomingHost()
		p.CreatedAt = old.GetCreatedAt()
		p.Revision = 0
		nw, name := p.GetNetwork(), p.GetName()
		t := &txn{cmps: []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(cur.Key), "=", cur.ModRevision),
			clientv3.Compare(clientv3.CreateRevision(nrec.Key), "=", nrec.CreateRevision),
		}}
		oldIPs := map[netip.Addr]bool{}
		for _, s := range old.GetIps() {
			if a, err := netip.ParseAddr(s); err == nil {
				oldIPs[a] = true
			}
		}
		for _, a := range spec.ips {
			if oldIPs[a] {
				delete(oldIPs, a)
				continue
			}
			t.claim(schema.IPClaimKey(nw, a), name, ipTaken(nw, a))
		}
		for a := range oldIPs {
			t.ops = append(t.ops, clientv3.OpDelete(schema.IPClaimKey(nw, a)))
		}
		if err := s.mirrorTarget(ctx, t, p); err != nil {
			return err
		}
		if err := t.put(cur.Key, p); err != nil {
			return err
		}
		rev, err := t.commit(ctx, s.Store)
		if err == nil {
			p.Revision = rev
			out = p
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DeletePort removes a port and its claims. A port other ports mirror to cannot be deleted.
func (s *NetworkServer) DeletePort(ctx context.Context, r *basaltv1.DeletePortRequest) (*basaltv1.DeletePortResponse, error) {
	err := retry(ctx, func() error {
		cur, err := s.getPort(ctx, r.GetNetwork(), r.GetName())
		if err != nil {
			return err
		}
		nw, name := r.GetNetwork(), r.GetName()
		ports, rev, err := store.List[basaltv1.Port](ctx, s.Store, schema.NetworkPortsPrefix(nw))
		if err != nil {
			return toStatus(err)
		}
		var mirrors []string
		for _, p := range ports {
			if p.Value.GetPolicy().GetMirrorTo() == name {
				mirrors = append(mirrors, p.Value.GetName())
			}
		}
		if len(mirrors) > 0 {
			return status.Errorf(codes.FailedPrecondition, "port %q is the mirror target of %s; change their mirror first", name, strings.Join(mirrors, ", "))
		}
		p := cur.Value
		ops := []clientv3.Op{clientv3.OpDelete(cur.Key), clientv3.OpDelete(schema.MACClaimKey(nw, p.GetMac())), clientv3.OpDelete(schema.TapClaimKey(p.GetTap()))}
		for _, s := range p.GetIps() {
			if a, err := netip.ParseAddr(s); err == nil {
				ops = append(ops, clientv3.OpDelete(schema.IPClaimKey(nw, a)))
			}
		}
		resp, err := s.Store.Client.Txn(ctx).
			If(
				clientv3.Compare(clientv3.ModRevision(cur.Key), "=", cur.ModRevision),
				// No port of the network changed since the list: none started mirroring to this one meanwhile.
				clientv3.Compare(clientv3.ModRevision(schema.NetworkPortsPrefix(nw)), "<", rev+1).WithPrefix(),
			).
			Then(ops...).
			Commit()
		if err != nil {
			return toStatus(err)
		}
		if !resp.Succeeded {
			return errRetry
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &basaltv1.DeletePortResponse{}, nil
}

// GetPortCounters forwards the request to the netd of the port's host.
func (s *NetworkServer) GetPortCounters(ctx context.Context, r *basaltv1.GetPortCountersRequest) (*basaltv1.PortCounters, error) {
	rec, err := s.getPort(ctx, r.GetNetwork(), r.GetName())
	if err != nil {
		return nil, err
	}
	host := rec.Value.GetHost()
	if host == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "port %q is not bound to a host, so nothing counts its traffic", r.GetName())
	}
	n, err := registry.Get(ctx, s.Store, host)
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.FailedPrecondition, "port %q is bound to host %q, where no netd is registered", r.GetName(), host)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	if n.GetNode().GetKind() != basaltv1.NodeKind_NODE_KIND_NETD {
		return nil, status.Errorf(codes.FailedPrecondition, "port %q is bound to %q, which is a %s, not a netd", r.GetName(), host, n.GetNode().GetKind().Name())
	}
	if n.GetState() != basaltv1.NodeState_NODE_STATE_UP {
		return nil, status.Errorf(codes.Unavailable, "netd %q of port %q is down", host, r.GetName())
	}
	conn, err := grpc.NewClient(n.GetNode().GetGrpcAddress(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "netd %q at %s: %v", host, n.GetNode().GetGrpcAddress(), err)
	}
	defer conn.Close()
	timeout := s.CountersTimeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := basaltv1.NewNetdServiceClient(conn).GetPortCounters(cctx, r)
	if err != nil {
		st := status.Convert(err)
		return nil, status.Errorf(st.Code(), "netd %q: %s", host, st.Message())
	}
	return c, nil
}
