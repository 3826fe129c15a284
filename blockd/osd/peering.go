package osd

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/internal/placement"
	"github.com/basalt-hv/basalt/metad/schema"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// PeeringTimeout bounds one peering round; a PG that cannot peer answers Unavailable and peers again on the
// next request.
const PeeringTimeout = 2 * time.Minute

// Run peers, in the background, every PG this node is primary of whenever the cluster map changes (and
// retries failed rounds every few seconds), so that members that return are caught up even if no client
// touches their PGs. It returns when ctx ends.
func (o *OSD) Run(ctx context.Context) {
	retry := time.NewTicker(5 * time.Second)
	defer retry.Stop()
	var trimming sync.Mutex
	for {
		changed := o.view.Changed()
		go o.trimPastEnd(ctx, &trimming)
		m := o.view.Map()
		for _, pool := range m.GetPools() {
			for num := range pool.GetPgCount() {
				pg := placement.PG{Pool: pool.GetId(), Num: num}
				acting := placement.ActingSet(m, pool, pg)
				if len(acting) > 0 && acting[0].GetId() == o.id {
					o.startPeering(Route{Map: m, Pool: pool, PG: pg, Acting: acting})
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry.C:
		}
	}
}

// startPeering starts a peering round for the route's PG and epoch unless one exists, and returns its state.
func (o *OSD) startPeering(r Route) *pgState {
	o.pgMu.Lock()
	defer o.pgMu.Unlock()
	st := o.pgs[r.PG]
	if st == nil || st.epoch < r.Map.GetEpoch() {
		st = &pgState{epoch: r.Map.GetEpoch(), ready: make(chan struct{}), behind: map[string]map[engine.ObjectID]bool{}}
		o.pgs[r.PG] = st
		go o.peer(r, st)
	}
	return st
}

// peered returns the PG's state once this node, as primary, has peered at the route's epoch. Peering runs
// once per PG and epoch; concurrent requests wait for the same round.
func (o *OSD) peered(ctx context.Context, r Route) (*pgState, error) {
	st := o.startPeering(r)
	select {
	case <-st.ready:
	case <-ctx.Done():
		return nil, status.Errorf(codes.Unavailable, "PG %d.%d still peering: %v", r.PG.Pool, r.PG.Num, ctx.Err())
	}
	if st.err != nil {
		return nil, status.Errorf(codes.Unavailable, "PG %d.%d could not peer at epoch %d: %v", r.PG.Pool, r.PG.Num, st.epoch, st.err)
	}
	if st.epoch > r.Map.GetEpoch() {
		return nil, errStale(st.epoch, r.Map.GetEpoch())
	}
	return st, nil
}

// peer makes this primary's copy of the PG at least as new as every member's, then records which members are
// behind and starts pushing to them in the background.
func (o *OSD) peer(r Route, st *pgState) {
	ctx, cancel := context.WithTimeout(context.Background(), PeeringTimeout)
	defer cancel()
	err := o.peerOnce(ctx, r, st)
	if err != nil {
		o.log.Warn("peering failed", "pg", fmt.Sprintf("%d.%d", r.PG.Pool, r.PG.Num), "epoch", r.Map.GetEpoch(), "err", err)
		o.pgMu.Lock()
		if o.pgs[r.PG] == st {
			delete(o.pgs, r.PG) // the next request peers again
		}
		o.pgMu.Unlock()
	}
	st.err = err
	close(st.ready)
	if err != nil {
		return
	}
	total := st.pending()
	o.publishRecovery(r, st, total, 0)
	if total > 0 {
		go o.recover(r, st)
	}
}

// publishRecovery records a PG's recovery progress in etcd for `basalt volume status`, and removes the record
// when there is nothing left (which also clears one an earlier primary left behind). Failures only cost the
// report, never the recovery.
func (o *OSD) publishRecovery(r Route, st *pgState, total, done int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	key := schema.RecoveryKey(r.PG.Pool, r.PG.Num)
	var err error
	if total == done {
		_, err = o.store.Client.Delete(ctx, key)
	} else {
		_, err = o.store.Put(ctx, key, &basaltv1.PGRecovery{
			Pool: r.PG.Pool, Pg: r.PG.Num, Primary: o.id, Epoch: st.epoch,
			ObjectsTotal: uint64(total), ObjectsDone: uint64(done), UpdatedAt: timestamppb.Now(),
		})
	}
	if err != nil {
		o.log.Warn("publish recovery progress", "pg", fmt.Sprintf("%d.%d", r.PG.Pool, r.PG.Num), "err", err)
	}
}

func (o *OSD) peerOnce(ctx context.Context, r Route, st *pgState) error {
	local := o.localObjects(r.PG)
	remote := map[string]map[engine.ObjectID]uint64{}
	for _, member := range r.Acting[1:] {
		c, err := o.peers.Client(member)
		if err != nil {
			return err
		}
		resp, err := c.PGObjects(ctx, &basaltv1.PGObjectsRequest{Epoch: r.Map.GetEpoch(), Pool: r.PG.Pool, Pg: r.PG.Num})
		if err != nil {
			return fmt.Errorf("list PG objects on %s: %w", member.GetId(), err)
		}
		versions := map[engine.ObjectID]uint64{}
		for _, ov := range resp.GetObjects() {
			id := engine.ObjectID{Volume: ov.GetObject().GetVolume(), Index: ov.GetObject().GetIndex()}
			versions[id] = ov.GetVersion()
			// Compare with the engine's version, not the listing: an object this node trimmed whole is not
			// listed (it holds no data) but keeps its version, and must not be resurrected from an older copy.
			if ov.GetVersion() > o.eng.ObjectVersion(id) {
				if err := o.pull(ctx, r.Map.GetEpoch(), member, id, ov.GetVersion()); err != nil {
					return err
				}
			}
			local[id] = o.eng.ObjectVersion(id)
		}
		remote[member.GetId()] = versions
	}
	pending := 0
	for _, member := range r.Acting[1:] {
		behind := map[engine.ObjectID]bool{}
		for id, v := range local {
			rv, has := remote[member.GetId()][id]
			// A member that never had an object this node trimmed whole holds the same (no) data.
			if rv < v && (has || !o.empty(id)) {
				behind[id] = true
			}
		}
		st.behind[member.GetId()] = behind
		pending += len(behind)
	}
	if pending > 0 {
		o.log.Info("peered", "pg", fmt.Sprintf("%d.%d", r.PG.Pool, r.PG.Num), "epoch", r.Map.GetEpoch(), "objects_to_recover", pending)
	}
	return nil
}

// localObjects lists this node's objects of a PG with their versions, including objects trimmed whole.
func (o *OSD) localObjects(pg placement.PG) map[engine.ObjectID]uint64 {
	m := o.view.Map()
	out := map[engine.ObjectID]uint64{}
	for _, id := range o.eng.KnownObjects() {
		vol := o.view.VolumeByID(id.Volume)
		if vol == nil {
			continue
		}
		pool := placement.Pool(m, vol.GetPool())
		if pool == nil || pool.GetId() != pg.Pool || placement.ObjectPG(pool, id.Volume, id.Index) != pg {
			continue
		}
		out[id] = o.eng.ObjectVersion(id)
	}
	return out
}

// PGObjects lists this node's objects of a PG. Epoch 0 skips the epoch check: a read-only listing for
// convergence checks and operators, which changes nothing.
func (o *OSD) PGObjects(ctx context.Context, req *basaltv1.PGObjectsRequest) (*basaltv1.PGObjectsResponse, error) {
	if req.GetEpoch() != 0 {
		if _, err := o.checkEpoch(ctx, req.GetEpoch()); err != nil {
			return nil, err
		}
	}
	resp := &basaltv1.PGObjectsResponse{}
	for id, v := range o.localObjects(placement.PG{Pool: req.GetPool(), Num: req.GetPg()}) {
		ov := &basaltv1.ObjectVersion{Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index}, Version: v, Empty: o.empty(id)}
		if req.GetChecksums() {
			sum, err := o.eng.ObjectChecksum(ctx, id)
			switch {
			case errors.Is(err, engine.ErrCorrupt):
				ov.Corrupt = true
			case err != nil:
				return nil, o.engineStatus("checksum", err)
			default:
				ov.Checksum = sum[:]
			}
		}
		resp.Objects = append(resp.Objects, ov)
	}
	slices.SortFunc(resp.Objects, func(a, b *basaltv1.ObjectVersion) int {
		switch {
		case a.GetObject().GetVolume() != b.GetObject().GetVolume():
			return compare(a.GetObject().GetVolume(), b.GetObject().GetVolume())
		}
		return compare(a.GetObject().GetIndex(), b.GetObject().GetIndex())
	})
	return resp, nil
}

// empty reports whether this node holds nothing of an object in any layer (never written, or trimmed whole).
func (o *OSD) empty(id engine.ObjectID) bool {
	layers, err := o.eng.Layers(context.Background(), id)
	if err != nil {
		return false
	}
	for _, l := range layers {
		if len(l.Extents) > 0 {
			return false
		}
	}
	return true
}

func compare(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ReadObject returns a whole object and its version, read under the object's lock so the two agree.
func (o *OSD) ReadObject(ctx context.Context, req *basaltv1.ReadObjectRequest) (*basaltv1.ReadObjectResponse, error) {
	if _, err := o.checkEpoch(ctx, req.GetEpoch()); err != nil {
		return nil, err
	}
	id := engine.ObjectID{Volume: req.GetObject().GetVolume(), Index: req.GetObject().GetIndex()}
	defer o.lock(id)()
	return o.readObjectLocked(ctx, id)
}

func (o *OSD) readObjectLocked(ctx context.Context, id engine.ObjectID) (*basaltv1.ReadObjectResponse, error) {
	resp := &basaltv1.ReadObjectResponse{Version: o.eng.ObjectVersion(id)}
	layers, err := o.eng.Layers(ctx, id)
	if err != nil {
		return nil, o.engineStatus("layers", err)
	}
	for _, l := range layers {
		ol := &basaltv1.ObjectLayer{Tag: l.Tag, Extents: extentsOut(l.Extents)}
		for _, e := range l.Extents {
			if e.Zero || e.Hole {
				continue
			}
			buf := make([]byte, e.Length)
			if err := o.eng.ReadLayer(ctx, id, l.Tag, e.Offset, buf); err != nil {
				return nil, o.engineStatus(fmt.Sprintf("read object %d.%d", id.Volume, id.Index), err)
			}
			ol.Data = append(ol.Data, buf)
		}
		resp.Layers = append(resp.Layers, ol)
	}
	return resp, nil
}

// pull copies a newer object from a member into the local engine during peering.
func (o *OSD) pull(ctx context.Context, epoch uint64, from *basaltv1.StorageNode, id engine.ObjectID, want uint64) error {
	c, err := o.peers.Client(from)
	if err != nil {
		return err
	}
	resp, err := c.ReadObject(ctx, &basaltv1.ReadObjectRequest{Epoch: epoch, Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index}})
	if err != nil {
		return fmt.Errorf("pull object %d.%d from %s: %w", id.Volume, id.Index, from.GetId(), err)
	}
	defer o.lock(id)()
	if resp.GetVersion() <= o.eng.ObjectVersion(id) {
		return nil
	}
	return o.replaceObject(ctx, id, resp.GetVersion(), resp.GetLayers())
}

// replaceObject makes the local object exactly the given layers at the given version. The version is set by
// the last operation only, so a crash part-way leaves the old version and the next peering repeats the copy.
func (o *OSD) replaceObject(ctx context.Context, id engine.ObjectID, version uint64, layers []*basaltv1.ObjectLayer) error {
	type op struct {
		tag  uint32
		e    *basaltv1.Extent
		data []byte
	}
	var ops []op
	for _, l := range layers {
		d := 0
		for _, e := range l.GetExtents() {
			switch {
			case e.GetHole():
				continue
			case e.GetZero():
				ops = append(ops, op{tag: l.GetTag(), e: e})
				continue
			}
			if d >= len(l.GetData()) || int64(len(l.GetData()[d])) != e.GetLength() {
				return status.Errorf(codes.InvalidArgument, "object %d.%d: layer %d: data does not match its extents", id.Volume, id.Index, l.GetTag())
			}
			ops = append(ops, op{tag: l.GetTag(), e: e, data: l.GetData()[d]})
			d++
		}
	}
	cur := o.eng.ObjectVersion(id)
	clearVersion := cur
	if len(ops) == 0 {
		clearVersion = version
	}
	if err := o.eng.ClearObject(ctx, id, engine.WriteOptions{Version: clearVersion}); err != nil {
		return o.engineStatus("clear object before copy", err)
	}
	for i, p := range ops {
		opts := engine.WriteOptions{Version: cur, Layer: p.tag}
		if i == len(ops)-1 {
			opts.Version = version
		}
		var err error
		if p.data != nil {
			err = o.eng.Write(ctx, id, p.e.GetOffset(), p.data, opts)
		} else {
			// Zeros recorded in a layer hide what is beneath, whatever that is on this node.
			opts.Opaque = true
			err = o.eng.Trim(ctx, id, p.e.GetOffset(), p.e.GetLength(), opts)
		}
		if err != nil {
			return o.engineStatus("copy object", err)
		}
	}
	return nil
}

// PushObject replaces this member's copy of an object with the primary's if the primary's is newer.
func (o *OSD) PushObject(ctx context.Context, req *basaltv1.PushObjectRequest) (*basaltv1.PushObjectResponse, error) {
	_, id, err := o.memberRequest(ctx, req.GetEpoch(), req.GetObject(), req.GetPrimary())
	if err != nil {
		return nil, err
	}
	defer o.lock(id)()
	cur := o.eng.ObjectVersion(id)
	if req.GetVersion() < cur || req.GetVersion() == cur && !req.GetRepair() {
		return &basaltv1.PushObjectResponse{}, nil
	}
	if err := o.replaceObject(ctx, id, req.GetVersion(), req.GetLayers()); err != nil {
		return nil, err
	}
	return &basaltv1.PushObjectResponse{}, nil
}

// push sends the primary's copy of an object to a member, which takes it if it is newer than its own (or, with
// repair, of the same version: its copy was found bad). The caller holds the object's lock.
func (o *OSD) push(ctx context.Context, epoch uint64, member *basaltv1.StorageNode, id engine.ObjectID, repair bool) error {
	obj, err := o.readObjectLocked(ctx, id)
	if err != nil {
		return err
	}
	c, err := o.peers.Client(member)
	if err != nil {
		return err
	}
	_, err = c.PushObject(ctx, &basaltv1.PushObjectRequest{
		Epoch: epoch, Primary: o.id, Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index},
		Version: obj.GetVersion(), Layers: obj.GetLayers(), Repair: repair,
	})
	if err != nil {
		return fmt.Errorf("push object %d.%d to %s: %w", id.Volume, id.Index, member.GetId(), err)
	}
	return nil
}

// recover pushes every object a member is behind on, throttled, until done or the PG's epoch is superseded.
func (o *OSD) recover(r Route, st *pgState) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Stop when this PG state is replaced by a newer epoch's.
		for {
			o.pgMu.Lock()
			cur := o.pgs[r.PG]
			o.pgMu.Unlock()
			if cur != st {
				cancel()
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-o.view.Changed():
			}
		}
	}()
	start := time.Now()
	pushed := 0
	total := st.pending()
	lastReport := time.Now()
	defer func() { o.publishRecovery(r, st, total, total-st.pending()) }()
	for _, member := range r.Acting[1:] {
		for _, id := range st.list(member.GetId()) {
			unlock := o.lock(id)
			var err error
			if st.isBehind(member.GetId(), id) {
				err = o.push(ctx, st.epoch, member, id, false)
				if err == nil {
					st.done(member.GetId(), id)
					pushed++
				}
			}
			unlock()
			if err != nil {
				if !errors.Is(ctx.Err(), context.Canceled) {
					o.log.Warn("recovery stopped", "pg", fmt.Sprintf("%d.%d", r.PG.Pool, r.PG.Num), "member", member.GetId(), "err", err)
				}
				return
			}
			if err := o.limiter.wait(ctx, engine.ObjectSize); err != nil {
				return
			}
			if time.Since(lastReport) > time.Second {
				o.publishRecovery(r, st, total, total-st.pending())
				lastReport = time.Now()
			}
		}
	}
	o.log.Info("recovered", "pg", fmt.Sprintf("%d.%d", r.PG.Pool, r.PG.Num), "epoch", st.epoch, "objects", pushed, "took", time.Since(start).Round(time.Millisecond))
}

func (st *pgState) isBehind(member string, id engine.ObjectID) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.behind[member][id]
}

func (st *pgState) done(member string, id engine.ObjectID) {
	st.mu.Lock()
	defer st.mu.Unlock()
	delete(st.behind[member], id)
}

func (st *pgState) list(member string) []engine.ObjectID {
	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]engine.ObjectID, 0, len(st.behind[member]))
	for id := range st.behind[member] {
		out = append(out, id)
	}
	return out
}

func (st *pgState) pending() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	n := 0
	for _, b := range st.behind {
		n += len(b)
	}
	return n
}

// rateLimiter is a token bucket in bytes per second; zero means unlimited.
type rateLimiter struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func newRateLimiter(bytesPerSec int64) *rateLimiter {
	return &rateLimiter{rate: float64(bytesPerSec), tokens: float64(bytesPerSec), last: time.Now()}
}

func (l *rateLimiter) wait(ctx context.Context, n int64) error {
	if l.rate <= 0 {
		return nil
	}
	l.mu.Lock()
	now := time.Now()
	l.tokens = min(l.rate, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	l.tokens -= float64(n)
	deficit := -l.tokens
	l.mu.Unlock()
	if deficit <= 0 {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Duration(deficit / l.rate * float64(time.Second))):
		return nil
	}
}
