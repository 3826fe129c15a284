package api

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/internal/placement"
	"github.com/basalt-hv/basalt/metad/clustermap"
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

// MaxVolumeSize bounds a volume's size: 2^60 bytes (1 EiB) keeps every byte offset comfortably inside int64.
const MaxVolumeSize = 1 << 60

// MaxPGs bounds a pool's placement groups.
const MaxPGs = 1 << 16

// VolumeServer serves VolumeService: volume and pool metadata in etcd. The data path (NBD, replication) is
// blockd's; a volume's record is what every blockd exports.
type VolumeServer struct {
	basaltv1.UnimplementedVolumeServiceServer
	Store *store.Store
	// Peers reaches storage nodes, for the calls they carry out (flatten, copy).
	Peers *blockrpc.Peers
}

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// CreateVolume records a thin volume: no data is written and nothing is allocated until a client writes.
func (v *VolumeServer) CreateVolume(ctx context.Context, r *basaltv1.CreateVolumeRequest) (*basaltv1.Volume, error) {
	if err := schema.ValidateName("volume", r.GetName()); err != nil {
		return nil, invalid("%v", err)
	}
	var parent *parentInfo
	if r.GetSource() != "" {
		var err error
		if parent, err = v.cloneSource(ctx, r.GetSource()); err != nil {
			return nil, err
		}
		if r.GetSectorSize() != 0 && r.GetSectorSize() != parent.vol.GetSectorSize() {
			return nil, invalid("a linked clone has its parent's %d-byte sectors", parent.vol.GetSectorSize())
		}
		r.SectorSize = parent.vol.GetSectorSize()
		if r.GetSizeBytes() == 0 {
			r.SizeBytes = parent.ckpt.GetSizeBytes()
		}
	}
	sector := r.GetSectorSize()
	if sector == 0 {
		sector = 512
	}
	if sector != 512 && sector != 4096 {
		return nil, invalid("sector size %d: want 512 or 4096", sector)
	}
	size := r.GetSizeBytes()
	if size == 0 || size > MaxVolumeSize || size%uint64(sector) != 0 {
		return nil, invalid("size %d: want a multiple of the %d-byte sector size between %d and %d (1 EiB)", size, sector, sector, uint64(MaxVolumeSize))
	}
	poolName := r.GetPool()
	if poolName == "" {
		poolName = clustermap.DefaultPool
	}
	m, err := clustermap.Get(ctx, v.Store)
	if err != nil {
		return nil, toStatus(err)
	}
	pool := placement.Pool(m, poolName)
	if pool == nil {
		return nil, status.Errorf(codes.NotFound, "pool %q does not exist (see 'basalt pool list')", poolName)
	}
	if n := r.GetReplicas(); n != 0 && n != pool.GetReplicas() {
		return nil, invalid("pool %q keeps %d copies, not %d: choose a pool with %d (basalt pool create NAME --replicas %d)", poolName, pool.GetReplicas(), n, n, n)
	}
	vol := &basaltv1.Volume{
		Name:       r.GetName(),
		SizeBytes:  size,
		Replicas:   pool.GetReplicas(),
		SectorSize: sector,
		Shared:     r.GetShared(),
		CreatedAt:  timestamppb.Now(),
		Pool:       poolName,
	}
	// For a clone, rewriting the parent's record in the same transaction bumps its revision, so that a deletion
	// of the checkpoint (or of the parent) that checked for clones before this one existed fails its
	// compare-and-swap and checks again.
	parentTxn := func() ([]clientv3.Cmp, []clientv3.Op, error) {
		if parent == nil {
			return nil, nil, nil
		}
		vol.Parent = &basaltv1.VolumeParent{
			Volume: parent.vol.GetName(), VolumeId: parent.vol.GetId(),
			Checkpoint: parent.ckpt.GetName(), CheckpointId: parent.ckpt.GetId(), SizeBytes: parent.ckpt.GetSizeBytes(),
		}
		pb, err := proto.Marshal(parent.rec.Value)
		if err != nil {
			return nil, nil, status.Errorf(codes.Internal, "encode volume: %v", err)
		}
		return []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(parent.rec.Key), "=", parent.rec.ModRevision)},
			[]clientv3.Op{clientv3.OpPut(parent.rec.Key, string(pb))}, nil
	}
	// The ID counter and the record are written in one transaction: an ID is never handed out twice, and a
	// failed create consumes none.
	for {
		cur, err := v.Store.Client.Get(ctx, schema.VolumeIDCounter)
		if err != nil {
			return nil, toStatus(err)
		}
		var last uint64
		var rev int64
		if len(cur.Kvs) == 1 {
			last, err = strconv.ParseUint(string(cur.Kvs[0].Value), 10, 64)
			if err != nil {
				return nil, status.Errorf(codes.Internal, "volume ID counter is corrupt: %v", err)
			}
			rev = cur.Kvs[0].ModRevision
		}
		vol.Id = last + 1
		cmps, ops, err := parentTxn()
		if err != nil {
			return nil, err
		}
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(vol)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "encode volume: %v", err)
		}
		key := schema.VolumeKey(vol.GetName())
		resp, err := v.Store.Client.Txn(ctx).
			If(append([]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(schema.VolumeIDCounter), "=", rev),
				clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}, cmps...)...).
			Then(append([]clientv3.Op{clientv3.OpPut(schema.VolumeIDCounter, strconv.FormatUint(vol.Id, 10)), clientv3.OpPut(key, string(b))}, ops...)...).
			Commit()
		if err != nil {
			return nil, toStatus(err)
		}
		if resp.Succeeded {
			vol.Revision = resp.Header.GetRevision()
			return vol, nil
		}
		if _, err := store.Get[basaltv1.Volume](ctx, v.Store, key); err == nil {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", vol.GetName())
		}
		if parent != nil {
			// The parent changed (or another create took the next ID): check the source again.
			if parent, err = v.cloneSource(ctx, r.GetSource()); err != nil {
				return nil, err
			}
		}
		// Another create took the next ID first: try again with the one after.
	}
}

func (v *VolumeServer) get(ctx context.Context, name string) (store.Record[*basaltv1.Volume], error) {
	if err := schema.ValidateName("volume", name); err != nil {
		return store.Record[*basaltv1.Volume]{}, invalid("%v", err)
	}
	r, err := store.Get[basaltv1.Volume](ctx, v.Store, schema.VolumeKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return r, status.Errorf(codes.NotFound, "volume %q does not exist", name)
	}
	if err != nil {
		return r, toStatus(err)
	}
	r.Value.Revision = r.ModRevision
	return r, nil
}

// GetVolume returns one volume.
func (v *VolumeServer) GetVolume(ctx context.Context, r *basaltv1.GetVolumeRequest) (*basaltv1.Volume, error) {
	rec, err := v.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return rec.Value, nil
}

// ListVolumes lists every volume, by name.
func (v *VolumeServer) ListVolumes(ctx context.Context, _ *basaltv1.ListVolumesRequest) (*basaltv1.ListVolumesResponse, error) {
	recs, _, err := store.List[basaltv1.Volume](ctx, v.Store, schema.VolumesPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &basaltv1.ListVolumesResponse{}
	for _, r := range recs {
		r.Value.Revision = r.ModRevision
		out.Volumes = append(out.Volumes, r.Value)
	}
	return out, nil
}

// DeleteVolume removes a volume's record; every blockd then drops the volume's data.
func (v *VolumeServer) DeleteVolume(ctx context.Context, r *basaltv1.DeleteVolumeRequest) (*basaltv1.DeleteVolumeResponse, error) {
	rec, err := v.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	clones, err := v.clonesOf(ctx, rec.Value.GetId(), 0)
	if err != nil {
		return nil, err
	}
	if len(clones) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q has linked clones (%s); flatten them first (basalt volume flatten NAME) or delete them", r.GetName(), strings.Join(clones, ", "))
	}
	if err := v.Store.Delete(ctx, rec.Key, rec.ModRevision); err != nil {
		return nil, toStatus(err)
	}
	return &basaltv1.DeleteVolumeResponse{}, nil
}

// ResizeVolume changes a volume's size online. Growing is always safe. Shrinking needs force if any storage
// node holds data past the new end, or if a storage node cannot be asked; the data past the end is then
// trimmed by the PGs' primaries.
func (v *VolumeServer) ResizeVolume(ctx context.Context, r *basaltv1.ResizeVolumeRequest) (*basaltv1.Volume, error) {
	// The record has other writers (attachments change at every VM start and migration): a resize that lost the
	// race reads it again and decides again.
	for {
		rec, err := v.get(ctx, r.GetName())
		if err != nil {
			return nil, err
		}
		vol := rec.Value
		size := r.GetSizeBytes()
		if size == 0 || size > MaxVolumeSize || size%uint64(vol.GetSectorSize()) != 0 {
			return nil, invalid("size %d: want a multiple of the %d-byte sector size between %d and %d (1 EiB)", size, vol.GetSectorSize(), vol.GetSectorSize(), uint64(MaxVolumeSize))
		}
		if size < vol.GetSizeBytes() && !r.GetForce() {
			if err := v.checkNoDataFrom(ctx, vol, size); err != nil {
				return nil, err
			}
		}
		vol.SizeBytes = size
		vol.Revision = 0
		rev, err := v.Store.Update(ctx, rec.Key, vol, rec.ModRevision)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, toStatus(err)
		}
		vol.Revision = rev
		return vol, nil
	}
}

// GetVolumeStatus computes the health of the volume's placement groups from the current cluster map.
func (v *VolumeServer) GetVolumeStatus(ctx context.Context, r *basaltv1.GetVolumeRequest) (*basaltv1.VolumeStatus, error) {
	rec, err := v.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	m, err := clustermap.Get(ctx, v.Store)
	if err != nil {
		return nil, toStatus(err)
	}
	pool := placement.Pool(m, rec.Value.GetPool())
	if pool == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is in pool %q, which no longer exists", rec.Value.GetName(), rec.Value.GetPool())
	}
	st := &basaltv1.VolumeStatus{Volume: rec.Value, Epoch: m.GetEpoch(), PgsTotal: pool.GetPgCount()}
	byNode := map[string]*basaltv1.VolumeReplicaNode{}
	for pg := range pool.GetPgCount() {
		members := placement.Members(m, pool, placement.PG{Pool: pool.GetId(), Num: pg})
		acting := placement.ActingSet(m, pool, placement.PG{Pool: pool.GetId(), Num: pg})
		switch {
		case len(acting) == 0:
			st.PgsUnavailable++
		case len(acting) < int(pool.GetReplicas()):
			st.PgsDegraded++
		default:
			st.PgsHealthy++
		}
		for _, n := range members {
			rn := byNode[n.GetId()]
			if rn == nil {
				rn = &basaltv1.VolumeReplicaNode{Id: n.GetId(), FailureDomain: n.GetFailureDomain(), Up: n.GetUp(), In: n.GetIn()}
				byNode[n.GetId()] = rn
			}
			rn.Pgs++
			if len(acting) > 0 && acting[0].GetId() == n.GetId() {
				rn.PrimaryPgs++
			}
		}
	}
	for _, rn := range byNode {
		st.Nodes = append(st.Nodes, rn)
	}
	slices.SortFunc(st.Nodes, func(a, b *basaltv1.VolumeReplicaNode) int {
		switch {
		case a.GetId() < b.GetId():
			return -1
		case a.GetId() > b.GetId():
			return 1
		}
		return 0
	})
	st.NbdUris, err = v.nbdURIs(ctx, rec.Value.GetName())
	if err != nil {
		return nil, toStatus(err)
	}
	recs, _, err := store.List[basaltv1.PGRecovery](ctx, v.Store, schema.RecoveryPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	for _, r := range recs {
		if r.Value.GetPool() == pool.GetId() {
			st.PgsRecovering++
			st.ObjectsToRecover += r.Value.GetObjectsTotal()
			st.ObjectsRecovered += r.Value.GetObjectsDone()
		}
	}
	return st, nil
}

// nbdURIs lists the URIs of the volume's export on every blockd that is up and serves NBD.
func (v *VolumeServer) nbdURIs(ctx context.Context, name string) ([]string, error) {
	nodes, err := registry.List(ctx, v.Store, basaltv1.NodeKind_NODE_KIND_BLOCKD, false)
	if err != nil {
		return nil, err
	}
	var uris []string
	for _, n := range nodes {
		if a := n.GetNode().GetNbdAddress(); a != "" {
			uris = append(uris, fmt.Sprintf("nbd://%s/%s", a, name))
		}
		if s := n.GetNode().GetNbdSocket(); s != "" {
			// The path is given as is (clients accept it, and it is easier to copy); only characters that
			// would end the query are escaped.
			uris = append(uris, fmt.Sprintf("nbd+unix:///%s?socket=%s", name, strings.NewReplacer("%", "%25", "&", "%26", "#", "%23", " ", "%20").Replace(s)))
		}
	}
	return uris, nil
}

// CreatePool adds a pool to the cluster map.
func (v *VolumeServer) CreatePool(ctx context.Context, r *basaltv1.CreatePoolRequest) (*basaltv1.Pool, error) {
	if err := schema.ValidateName("pool", r.GetName()); err != nil {
		return nil, invalid("%v", err)
	}
	if n := r.GetReplicas(); n < 1 || n > clustermap.MaxReplicas {
		return nil, invalid("replicas %d: want 1 to %d", n, clustermap.MaxReplicas)
	}
	pgs := r.GetPgCount()
	if pgs == 0 {
		pgs = clustermap.DefaultPGs
	}
	if pgs > MaxPGs {
		return nil, invalid("pg count %d: want 1 to %d", pgs, MaxPGs)
	}
	var created *basaltv1.Pool
	_, err := clustermap.Update(ctx, v.Store, func(m *basaltv1.ClusterMap) error {
		if placement.Pool(m, r.GetName()) != nil {
			return status.Errorf(codes.AlreadyExists, "pool %q already exists", r.GetName())
		}
		created = &basaltv1.Pool{Name: r.GetName(), Id: m.GetNextPoolId(), Replicas: r.GetReplicas(), PgCount: pgs}
		m.NextPoolId++
		m.Pools = append(m.Pools, created)
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, toStatus(err)
	}
	return created, nil
}

// ListPools lists the pools of the cluster map.
func (v *VolumeServer) ListPools(ctx context.Context, _ *basaltv1.ListPoolsRequest) (*basaltv1.ListPoolsResponse, error) {
	m, err := clustermap.Get(ctx, v.Store)
	if err != nil {
		return nil, toStatus(err)
	}
	return &basaltv1.ListPoolsResponse{Pools: m.GetPools()}, nil
}

// DeletePool removes an empty pool.
func (v *VolumeServer) DeletePool(ctx context.Context, r *basaltv1.DeletePoolRequest) (*basaltv1.DeletePoolResponse, error) {
	if r.GetName() == clustermap.DefaultPool {
		return nil, status.Errorf(codes.FailedPrecondition, "the %q pool cannot be deleted", clustermap.DefaultPool)
	}
	vols, _, err := store.List[basaltv1.Volume](ctx, v.Store, schema.VolumesPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	var users []string
	for _, vol := range vols {
		if vol.Value.GetPool() == r.GetName() {
			users = append(users, vol.Value.GetName())
		}
	}
	if len(users) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "pool %q still holds volumes %v; delete them first", r.GetName(), users)
	}
	_, err = clustermap.Update(ctx, v.Store, func(m *basaltv1.ClusterMap) error {
		if placement.Pool(m, r.GetName()) == nil {
			return status.Errorf(codes.NotFound, "pool %q does not exist", r.GetName())
		}
		m.Pools = slices.DeleteFunc(m.Pools, func(p *basaltv1.Pool) bool { return p.GetName() == r.GetName() })
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, toStatus(err)
	}
	return &basaltv1.DeletePoolResponse{}, nil
}

// ScrubVolume asks every storage node that is up to scrub the PGs it is primary of, for this volume, and sums
// what they found. A node that cannot be asked is reported, not fatal: its PGs are scrubbed by their next
// primary.
func (v *VolumeServer) ScrubVolume(ctx context.Context, r *basaltv1.ScrubVolumeRequest) (*basaltv1.ScrubVolumeResponse, error) {
	rec, err := v.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	nodes, err := registry.List(ctx, v.Store, basaltv1.NodeKind_NODE_KIND_BLOCKD, false)
	if err != nil {
		return nil, toStatus(err)
	}
	type answer struct {
		node string
		res  *basaltv1.ScrubResponse
		err  error
	}
	answers := make(chan answer, len(nodes))
	for _, n := range nodes {
		go func() {
			conn, err := grpc.NewClient(n.GetNode().GetGrpcAddress(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				answers <- answer{n.GetNode().GetId(), nil, err}
				return
			}
			defer conn.Close()
			res, err := basaltv1.NewBlockServiceClient(conn).Scrub(ctx, &basaltv1.ScrubRequest{Volume: rec.Value.GetId()})
			answers <- answer{n.GetNode().GetId(), res, err}
		}()
	}
	out := &basaltv1.ScrubVolumeResponse{}
	for range nodes {
		a := <-answers
		if a.err != nil {
			out.Errors = append(out.Errors, fmt.Sprintf("%s: %s", a.node, status.Convert(a.err).Message()))
			continue
		}
		out.Nodes++
		out.Pgs += a.res.GetPgs()
		out.Objects += a.res.GetObjects()
		out.Corrupt += a.res.GetCorrupt()
		out.Mismatched += a.res.GetMismatched()
		out.Repaired += a.res.GetRepaired()
		out.Unrepaired += a.res.GetUnrepaired()
	}
	slices.Sort(out.Errors)
	return out, nil
}

// checkNoDataFrom refuses a shrink that would cut written data, asking every storage node in the cluster map.
func (v *VolumeServer) checkNoDataFrom(ctx context.Context, vol *basaltv1.Volume, from uint64) error {
	m, err := clustermap.Get(ctx, v.Store)
	if err != nil {
		return toStatus(err)
	}
	for _, n := range m.GetNodes() {
		if !n.GetIn() {
			continue // its data has been re-placed on nodes that are in
		}
		refuse := func(why string) error {
			return status.Errorf(codes.FailedPrecondition, "shrinking %s to %d bytes: %s; pass --force to shrink anyway (the data past the end is discarded)", vol.GetName(), from, why)
		}
		if !n.GetUp() {
			return refuse(fmt.Sprintf("storage node %s is down, so it cannot be checked for data past the new end", n.GetId()))
		}
		conn, err := grpc.NewClient(n.GetAddress(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return refuse(fmt.Sprintf("cannot ask %s: %v", n.GetId(), err))
		}
		resp, err := basaltv1.NewBlockServiceClient(conn).HasData(ctx, &basaltv1.HasDataRequest{Volume: vol.GetId(), From: from})
		conn.Close()
		if err != nil {
			return refuse(fmt.Sprintf("cannot ask %s: %s", n.GetId(), status.Convert(err).Message()))
		}
		if resp.GetHasData() {
			return refuse(fmt.Sprintf("data was written past byte %d", from))
		}
	}
	return nil
}
