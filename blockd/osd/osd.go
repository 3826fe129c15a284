// Package osd is a blockd's object service: it serves BlockService (proto/basalt/v1/blockd.proto) over the
// node's local storage engine. As the primary of a placement group it admits a write only from a session of
// the volume's current attachment (fence.go), orders client writes (one version per write, objects locked while
// a write is replicated), replicates them to every member of the acting set and
// answers only when all have them; it peers before serving a PG at a new epoch (pulling any newer object a
// member holds) and pushes members that are behind up to date. As a member it applies what its primary
// ordered, and refuses anything routed with a stale epoch or by a node that is not the primary. The rules and
// their reasons are in docs/replication.md. It depends on blockd/engine, blockd/view, internal/placement and
// the API types.
package osd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/internal/placement"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ReplicaTimeout bounds how long the primary waits for one member to apply one write before it gives the
// write up for this epoch (the gateway retries it once the map has changed, or at once if it has not).
const ReplicaTimeout = 5 * time.Second

// EpochWait bounds how long a node waits for its own map to reach the epoch a request was routed with.
const EpochWait = 2 * time.Second

// The engine's objects are placement's objects: this fails to compile if the two sizes ever differ.
const _ = uint(engine.ObjectSize-placement.ObjectSize) + uint(placement.ObjectSize-engine.ObjectSize)

// OSD serves one node's objects.
type OSD struct {
	basaltv1.UnimplementedBlockServiceServer

	id    string
	eng   *engine.Engine
	view  *view.View
	peers *Peers
	store *store.Store // where recovery progress is published
	log   *slog.Logger

	locksMu sync.Mutex
	locks   map[engine.ObjectID]*objectLock

	pgMu sync.Mutex
	pgs  map[placement.PG]*pgState

	// recovery rate limit, bytes per second, shared by all background pushes of this node.
	limiter *rateLimiter

	ckpt *checkpoints

	// Fatal is called once if the local engine fails for good; it should stop the node.
	Fatal     func(error)
	fatalOnce sync.Once
}

// pgState is this node's knowledge of a PG it is primary of, at one epoch.
type pgState struct {
	epoch uint64
	ready chan struct{} // closed when peering is done
	err   error

	mu sync.Mutex
	// behind lists, per member, the objects whose copy on that member is older than the primary's: they are
	// pushed before any new write to them is replicated there, and in the background.
	behind map[string]map[engine.ObjectID]bool
}

// New returns the object service of node id; it publishes recovery progress in s.
func New(id string, eng *engine.Engine, v *view.View, peers *Peers, s *store.Store, recoveryBytesPerSec int64, log *slog.Logger) *OSD {
	return &OSD{
		id: id, eng: eng, view: v, peers: peers, store: s, log: log,
		locks:   map[engine.ObjectID]*objectLock{},
		pgs:     map[placement.PG]*pgState{},
		limiter: newRateLimiter(recoveryBytesPerSec),
		ckpt:    newCheckpoints(),
	}
}

// ID is the node ID of this OSD.
func (o *OSD) ID() string { return o.id }

// objectLock serializes the operations on one object that must not interleave: a primary's write and its
// replication, a member's version check and apply, copies for peering, recovery and repair.
type objectLock struct {
	sync.Mutex
	refs int
}

// lock locks one object and returns its unlock. Locks are per object, never shared between objects: a primary
// holds its object's lock while it waits for members, and two nodes waiting on each other through a shared
// (striped) lock would stall until the replica timeout.
func (o *OSD) lock(id engine.ObjectID) (unlock func()) {
	o.locksMu.Lock()
	l := o.locks[id]
	if l == nil {
		l = &objectLock{}
		o.locks[id] = l
	}
	l.refs++
	o.locksMu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		o.locksMu.Lock()
		if l.refs--; l.refs == 0 {
			delete(o.locks, id)
		}
		o.locksMu.Unlock()
	}
}

// Route is where one object's operations go at one epoch.
type Route struct {
	Map    *basaltv1.ClusterMap
	Volume *basaltv1.Volume
	Pool   *basaltv1.Pool
	PG     placement.PG
	Acting []*basaltv1.StorageNode
}

// Primary is the acting set's first node, or nil if the PG has no member up.
func (r Route) Primary() *basaltv1.StorageNode {
	if len(r.Acting) == 0 {
		return nil
	}
	return r.Acting[0]
}

// RouteObject computes where object idx of volume vol goes in map m.
func RouteObject(m *basaltv1.ClusterMap, vol *basaltv1.Volume, idx uint64) (Route, error) {
	pool := placement.Pool(m, vol.GetPool())
	if pool == nil {
		return Route{}, status.Errorf(codes.FailedPrecondition, "volume %s: pool %q is not in cluster map epoch %d", vol.GetName(), vol.GetPool(), m.GetEpoch())
	}
	pg := placement.ObjectPG(pool, vol.GetId(), idx)
	return Route{Map: m, Volume: vol, Pool: pool, PG: pg, Acting: placement.ActingSet(m, pool, pg)}, nil
}

// Errors between nodes travel as gRPC codes; see docs/replication.md.
func errStale(have, got uint64) error {
	return status.Errorf(codes.Aborted, "stale epoch: request routed at epoch %d, this node has %d", got, have)
}

func errWrongNode(format string, args ...any) error {
	return status.Errorf(codes.FailedPrecondition, "wrong node: "+format, args...)
}

// checkEpoch returns this node's map if the request's epoch is current, waiting briefly if the request is
// ahead of this node's map.
func (o *OSD) checkEpoch(ctx context.Context, e uint64) (*basaltv1.ClusterMap, error) {
	m := o.view.Map()
	switch {
	case e < m.GetEpoch():
		return nil, errStale(m.GetEpoch(), e)
	case e > m.GetEpoch():
		wctx, cancel := context.WithTimeout(ctx, EpochWait)
		defer cancel()
		nm, err := o.view.WaitEpoch(wctx, e)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "this node's cluster map is behind: %v", err)
		}
		if nm.GetEpoch() != e {
			return nil, errStale(nm.GetEpoch(), e)
		}
		return nm, nil
	}
	return m, nil
}

func (o *OSD) route(m *basaltv1.ClusterMap, ref *basaltv1.ObjectRef) (Route, engine.ObjectID, error) {
	id := engine.ObjectID{Volume: ref.GetVolume(), Index: ref.GetIndex()}
	vol := o.view.VolumeByID(ref.GetVolume())
	if vol == nil {
		// IDs are never reused: one above the highest this node has seen is a volume created a moment ago that
		// its watch has not delivered yet (retry), one at or below it was deleted.
		if ref.GetVolume() > o.view.MaxVolumeID() {
			return Route{}, id, status.Errorf(codes.Unavailable, "volume %d is not known to %s yet", ref.GetVolume(), o.id)
		}
		return Route{}, id, status.Errorf(codes.NotFound, "volume %d does not exist (deleted?)", ref.GetVolume())
	}
	r, err := RouteObject(m, vol, ref.GetIndex())
	return r, id, err
}

func objectRange(off, length int64) error {
	if off < 0 || length < 0 || off+length > engine.ObjectSize {
		return status.Errorf(codes.InvalidArgument, "range %d+%d is outside a %d-byte object", off, length, engine.ObjectSize)
	}
	return nil
}

// engineStatus maps the engine's errors onto gRPC codes the gateway understands. An engine that failed for
// good (a failed fdatasync: the kernel may have dropped written pages) stops the node: fail-stop, so that the
// cluster moves on without it at once rather than meeting errors from a node that still looks healthy.
func (o *OSD) engineStatus(what string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, engine.ErrFailed) && o.Fatal != nil {
		o.fatalOnce.Do(func() { o.Fatal(fmt.Errorf("%s: %w", what, err)) })
	}
	code := codes.Internal
	switch {
	case errors.Is(err, engine.ErrNoSpace):
		code = codes.ResourceExhausted
	case errors.Is(err, engine.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, engine.ErrCorrupt):
		code = codes.DataLoss
	case errors.Is(err, engine.ErrClosed), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		code = codes.Unavailable
	}
	return status.Errorf(code, "%s: %v", what, err)
}

// ClientOp runs a client operation at the primary.
func (o *OSD) ClientOp(ctx context.Context, req *basaltv1.ClientOpRequest) (*basaltv1.ClientOpResponse, error) {
	m, err := o.checkEpoch(ctx, req.GetEpoch())
	if err != nil {
		return nil, err
	}
	r, id, err := o.route(m, req.GetObject())
	if err != nil {
		return nil, err
	}
	if p := r.Primary(); p == nil || p.GetId() != o.id {
		return nil, errWrongNode("%s is not the primary of PG %d.%d at epoch %d", o.id, r.PG.Pool, r.PG.Num, m.GetEpoch())
	}
	if err := objectRange(req.GetOffset(), req.GetLength()); err != nil {
		return nil, err
	}
	st, err := o.peered(ctx, r)
	if err != nil {
		return nil, err
	}
	switch req.GetOp() {
	case basaltv1.BlockOp_BLOCK_OP_READ, basaltv1.BlockOp_BLOCK_OP_EXTENTS, basaltv1.BlockOp_BLOCK_OP_CHANGED:
		if err := o.layerView(id.Volume, req.GetView()); err != nil {
			return nil, err
		}
		if req.GetOp() == basaltv1.BlockOp_BLOCK_OP_CHANGED {
			if err := o.layerView(id.Volume, req.GetChangedFrom()); err != nil {
				return nil, err
			}
		}
	}
	switch req.GetOp() {
	case basaltv1.BlockOp_BLOCK_OP_READ:
		buf := make([]byte, req.GetLength())
		read := func() error { return o.eng.ReadView(ctx, id, req.GetView(), req.GetOffset(), buf) }
		if parent := o.cloneParent(id.Volume); parent != nil {
			read = func() error {
				defer o.lock(id)()
				return o.readClone(ctx, parent, id, req.GetView(), req.GetOffset(), buf)
			}
		}
		err := read()
		if errors.Is(err, engine.ErrCorrupt) {
			// The primary's copy is bad: repair it from a member with the same version, then read again.
			if rerr := o.readRepair(ctx, r, id); rerr != nil {
				return nil, rerr
			}
			err = read()
		}
		if _, ok := status.FromError(err); ok && err != nil {
			return nil, err // from the parent of a clone
		}
		if err != nil {
			return nil, o.engineStatus(fmt.Sprintf("read object %d.%d", id.Volume, id.Index), err)
		}
		return &basaltv1.ClientOpResponse{Data: buf}, nil
	case basaltv1.BlockOp_BLOCK_OP_EXTENTS:
		var ext []engine.Extent
		if parent := o.cloneParent(id.Volume); parent != nil {
			ext, err = o.extentsClone(ctx, parent, id, req.GetView(), req.GetOffset(), req.GetLength())
			if _, ok := status.FromError(err); ok && err != nil {
				return nil, err
			}
		} else {
			ext, err = o.eng.ExtentsView(ctx, id, req.GetView(), req.GetOffset(), req.GetLength())
		}
		if err != nil {
			return nil, o.engineStatus("extents", err)
		}
		return &basaltv1.ClientOpResponse{Extents: extentsOut(ext)}, nil
	case basaltv1.BlockOp_BLOCK_OP_CHANGED:
		ext, err := o.eng.Changed(ctx, id, req.GetChangedFrom(), req.GetView())
		if err != nil {
			return nil, o.engineStatus("changed extents", err)
		}
		// Changes are reported within the requested range only.
		lo, hi := req.GetOffset(), req.GetOffset()+req.GetLength()
		var clipped []engine.Extent
		for _, e := range ext {
			s, end := max(e.Offset, lo), min(e.Offset+e.Length, hi)
			if s < end {
				clipped = append(clipped, engine.Extent{Offset: s, Length: end - s, Zero: e.Zero})
			}
		}
		return &basaltv1.ClientOpResponse{Extents: extentsOut(clipped)}, nil
	case basaltv1.BlockOp_BLOCK_OP_WRITE, basaltv1.BlockOp_BLOCK_OP_TRIM:
		if req.GetOp() == basaltv1.BlockOp_BLOCK_OP_WRITE && int64(len(req.GetData())) != req.GetLength() {
			return nil, status.Errorf(codes.InvalidArgument, "write of %d bytes carries %d", req.GetLength(), len(req.GetData()))
		}
		if req.GetView() != 0 {
			return nil, status.Errorf(codes.PermissionDenied, "checkpoints are read-only")
		}
		done, err := o.admitWrite(ctx, id.Volume, req.GetLayer(), req.GetAttachGeneration())
		if err != nil {
			return nil, err
		}
		defer done()
		v, err := o.primaryWrite(ctx, r, st, id, req)
		if err != nil {
			return nil, err
		}
		return &basaltv1.ClientOpResponse{Version: v}, nil
	case basaltv1.BlockOp_BLOCK_OP_COPYUP:
		parent := o.cloneParent(id.Volume)
		if parent == nil {
			return &basaltv1.ClientOpResponse{}, nil // flattened already
		}
		n, err := o.copyUp(ctx, r, st, id, parent)
		if err != nil {
			if _, ok := status.FromError(err); ok {
				return nil, err
			}
			return nil, o.engineStatus("copy up from the parent", err)
		}
		return &basaltv1.ClientOpResponse{CopiedBytes: uint64(n)}, nil
	}
	return nil, status.Errorf(codes.InvalidArgument, "unknown operation %v", req.GetOp())
}

// nextVersion orders a write after everything the object has seen, and after every version an earlier
// primary could have handed out: the epoch in the high bits makes versions of different epochs distinct.
func nextVersion(cur, epoch uint64) uint64 { return max(cur, epoch<<32) + 1 }

// primaryWrite applies a write locally and on every other member of the acting set, under the object's lock.
func (o *OSD) primaryWrite(ctx context.Context, r Route, st *pgState, id engine.ObjectID, req *basaltv1.ClientOpRequest) (uint64, error) {
	defer o.lock(id)()
	rep := &basaltv1.ReplicateRequest{
		Epoch: r.Map.GetEpoch(), Object: req.GetObject(), Op: req.GetOp(), Offset: req.GetOffset(), Length: req.GetLength(),
		Data: req.GetData(), Sync: req.GetSync(), Primary: o.id, Layer: req.GetLayer(),
	}
	if parent := o.cloneParent(id.Volume); parent != nil {
		// A clone's trims must hide the parent, and its partial blocks be merged with the parent's content.
		rep.Opaque = true
		if err := o.alignCloneWrite(ctx, parent, id, rep); err != nil {
			return 0, o.engineStatus("widen a partial write of a linked clone", err)
		}
	}
	return o.replicateLocked(ctx, r, st, id, rep)
}

// replicateLocked gives rep the object's next version, applies it locally and on every other member of the
// acting set, and returns the version. The caller holds the object's lock.
func (o *OSD) replicateLocked(ctx context.Context, r Route, st *pgState, id engine.ObjectID, rep *basaltv1.ReplicateRequest) (uint64, error) {
	v := nextVersion(o.eng.ObjectVersion(id), r.Map.GetEpoch())
	rep.Version = v
	if err := o.apply(ctx, id, rep); err != nil {
		return 0, err
	}
	errs := make(chan error, len(r.Acting))
	for _, member := range r.Acting[1:] {
		go func() {
			cctx, cancel := context.WithTimeout(ctx, ReplicaTimeout)
			defer cancel()
			// A member that is behind on this object gets the whole object first: a partial write on top of
			// an old copy would leave it newer in version but wrong in content.
			if st.isBehind(member.GetId(), id) {
				if err := o.push(cctx, r.Map.GetEpoch(), member, id, false); err != nil {
					errs <- fmt.Errorf("recover object on %s before writing: %w", member.GetId(), err)
					return
				}
				st.done(member.GetId(), id)
			}
			c, err := o.peers.Client(member)
			if err == nil {
				_, err = c.Replicate(cctx, rep)
			}
			if err != nil {
				err = fmt.Errorf("replicate to %s: %w", member.GetId(), err)
			}
			errs <- err
		}()
	}
	var failed []string
	for range r.Acting[1:] {
		if err := <-errs; err != nil {
			failed = append(failed, err.Error())
		}
	}
	if len(failed) > 0 {
		// Not acknowledged: the write is retried by the gateway, in a new epoch if a member is gone for good.
		return 0, status.Errorf(codes.Unavailable, "write not on every member of the acting set at epoch %d: %s", r.Map.GetEpoch(), strings.Join(failed, "; "))
	}
	return v, nil
}

// apply runs a versioned write or trim, as ordered by the primary, on the local engine.
func (o *OSD) apply(ctx context.Context, id engine.ObjectID, req *basaltv1.ReplicateRequest) error {
	opts := engine.WriteOptions{Version: req.GetVersion(), Sync: req.GetSync(), Layer: req.GetLayer(), Opaque: req.GetOpaque()}
	var err error
	switch req.GetOp() {
	case basaltv1.BlockOp_BLOCK_OP_WRITE:
		err = o.eng.Write(ctx, id, req.GetOffset(), req.GetData(), opts)
	case basaltv1.BlockOp_BLOCK_OP_TRIM:
		err = o.eng.Trim(ctx, id, req.GetOffset(), req.GetLength(), opts)
	default:
		return status.Errorf(codes.InvalidArgument, "operation %v cannot be replicated", req.GetOp())
	}
	return o.engineStatus(fmt.Sprintf("apply %v to object %d.%d at version %d", req.GetOp(), id.Volume, id.Index, req.GetVersion()), err)
}

// extentsOut converts engine extents for the wire.
func extentsOut(ext []engine.Extent) []*basaltv1.Extent {
	out := make([]*basaltv1.Extent, 0, len(ext))
	for _, e := range ext {
		out = append(out, &basaltv1.Extent{Offset: e.Offset, Length: e.Length, Hole: e.Hole, Zero: e.Zero})
	}
	return out
}

// Replicate applies, on a member, a write its primary ordered.
func (o *OSD) Replicate(ctx context.Context, req *basaltv1.ReplicateRequest) (*basaltv1.ReplicateResponse, error) {
	_, id, err := o.memberRequest(ctx, req.GetEpoch(), req.GetObject(), req.GetPrimary())
	if err != nil {
		return nil, err
	}
	if err := objectRange(req.GetOffset(), req.GetLength()); err != nil {
		return nil, err
	}
	defer o.lock(id)()
	// A version this node already holds is a retry of a write it applied.
	if req.GetVersion() <= o.eng.ObjectVersion(id) {
		return &basaltv1.ReplicateResponse{}, nil
	}
	if err := o.apply(ctx, id, req); err != nil {
		return nil, err
	}
	return &basaltv1.ReplicateResponse{}, nil
}

// memberRequest admits a request from a primary to this member: current epoch, the sender is the object's
// PG's primary and this node one of its other members.
func (o *OSD) memberRequest(ctx context.Context, epoch uint64, ref *basaltv1.ObjectRef, primary string) (Route, engine.ObjectID, error) {
	m, err := o.checkEpoch(ctx, epoch)
	if err != nil {
		return Route{}, engine.ObjectID{}, err
	}
	r, id, err := o.route(m, ref)
	if err != nil {
		return Route{}, id, err
	}
	return r, id, o.checkMember(r, primary)
}

// checkMember refuses requests that do not come from the PG's primary to one of its other members.
func (o *OSD) checkMember(r Route, primary string) error {
	p := r.Primary()
	if p == nil || p.GetId() != primary {
		return errWrongNode("%s is not the primary of PG %d.%d at epoch %d", primary, r.PG.Pool, r.PG.Num, r.Map.GetEpoch())
	}
	for _, n := range r.Acting[1:] {
		if n.GetId() == o.id {
			return nil
		}
	}
	return errWrongNode("%s is not a member of PG %d.%d at epoch %d", o.id, r.PG.Pool, r.PG.Num, r.Map.GetEpoch())
}

// Sync makes everything this node acknowledged durable.
func (o *OSD) Sync(ctx context.Context, _ *basaltv1.SyncRequest) (*basaltv1.SyncResponse, error) {
	if err := o.eng.Sync(ctx); err != nil {
		return nil, o.engineStatus("sync", err)
	}
	return &basaltv1.SyncResponse{}, nil
}

// SyncLocal is Sync without the RPC, for the gateway on this node.
func (o *OSD) SyncLocal(ctx context.Context) error {
	_, err := o.Sync(ctx, nil)
	return err
}
