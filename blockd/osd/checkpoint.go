package osd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Taking a checkpoint must cut every volume of the group at one instant: if a write that finished before
// another started is after the cut, the later one must be too, on every PG and every node. Writes are tagged
// with the checkpoint number their gateway knows, so the cut is made by holding new writes to the volumes on
// every node (PrepareCheckpoint) while metad records the checkpoint in etcd, then releasing them: no write is
// admitted anywhere between the first hold and the commit, and writes admitted before the hold finish before
// PrepareCheckpoint answers. A node that did not get the prepare (it restarted, or joined) sees the pending
// checkpoint in its view of the volume and holds all the same. A hold that outlives its deadline is resolved
// from etcd: committed, or aborted by clearing the pending record with a compare-and-swap, which makes the
// commit fail if it has not happened yet.

// checkpoints is the OSD's side of that protocol.
type checkpoints struct {
	mu sync.Mutex
	// known is the newest committed checkpoint number per volume learned other than through the view (a
	// release, or a write tagged with it): the view may lag.
	known    map[uint64]uint32
	holds    map[uint64]*hold
	inflight map[uint64]int
	// drained is closed when a volume's in-flight writes reach zero, for a prepare waiting on them.
	drained map[uint64]chan struct{}

	// Writes in flight are also counted by admission period, for DrainWrites (fencing's barrier): it starts a
	// new period and waits for the older ones to empty. periodDone is closed when a waited-for period empties.
	period     uint64
	admitted   map[uint64]int
	periodDone map[uint64]chan struct{}
}

type hold struct {
	token string
	id    uint32
	done  chan struct{}
}

func newCheckpoints() *checkpoints {
	return &checkpoints{
		known:    map[uint64]uint32{},
		holds:    map[uint64]*hold{},
		inflight: map[uint64]int{},
		drained:  map[uint64]chan struct{}{},

		admitted:   map[uint64]int{},
		periodDone: map[uint64]chan struct{}{},
	}
}

// errStaleLayer refuses a write routed with an older checkpoint number than this node knows; the gateway
// retries once its view has the newer one.
func errStaleLayer(vol uint64, have, got uint32) error {
	return status.Errorf(codes.FailedPrecondition, "volume %d has checkpoint %d; the write was routed with checkpoint %d", vol, have, got)
}

// admitWrite decides whether a write to a volume may start: it refuses a write whose attachment generation the
// volume no longer accepts (fence.go), waits while a checkpoint of the volume is being taken, refuses a write
// tagged with a superseded checkpoint number, and counts the write in flight until the returned func is called.
func (o *OSD) admitWrite(ctx context.Context, volID uint64, layer uint32, gen uint64) (func(), error) {
	c := o.ckpt
	internal := isInternal(ctx)
	for {
		changed := o.view.Changed()
		// The volume is read under c.mu, which DrainWrites also takes after the view has caught up: a write
		// either counts in a period DrainWrites waits for, or was decided on the newer view.
		c.mu.Lock()
		vol := o.view.VolumeByID(volID)
		if vol == nil {
			c.mu.Unlock()
			return nil, status.Errorf(codes.NotFound, "volume %d does not exist", volID)
		}
		if !internal {
			verdict, err := checkGeneration(vol, gen)
			if verdict == refuse {
				c.mu.Unlock()
				return nil, err
			}
			if verdict == lagging {
				c.mu.Unlock()
				select {
				case <-changed:
				case <-ctx.Done():
					return nil, status.Errorf(codes.Unavailable, "volume %q: attachment generation %d is newer than %s knows (%d): %v", vol.GetName(), gen, o.id, vol.GetAttachGeneration(), ctx.Err())
				}
				continue
			}
		}
		known := max(vol.GetCheckpointSeq(), c.known[volID])
		h := c.holds[volID]
		if h != nil && known >= h.id {
			// Committed, and this node learned it before the release arrived.
			c.releaseLocked(volID, h.token)
			h = nil
		}
		pending := vol.GetPendingCheckpoint()
		waitView := h == nil && pending != nil && pending.GetId() > known
		if h == nil && !waitView {
			if layer < known {
				c.mu.Unlock()
				return nil, errStaleLayer(volID, known, layer)
			}
			if layer > known {
				// Gateways tag writes only with committed checkpoints: the commit is real, this node's view lags.
				c.known[volID] = layer
			}
			c.inflight[volID]++
			period := c.period
			c.admitted[period]++
			c.mu.Unlock()
			return func() { c.finish(volID, period) }, nil
		}
		c.mu.Unlock()
		if h != nil {
			select {
			case <-h.done:
			case <-changed:
			case <-ctx.Done():
				return nil, status.Errorf(codes.Unavailable, "write held while checkpoint %d of volume %d is taken: %v", h.id, volID, ctx.Err())
			}
			continue
		}
		// A pending checkpoint this node was not asked to prepare for (it restarted or joined meanwhile).
		wait := time.Until(pending.GetDeadline().AsTime())
		if wait <= 0 {
			if err := o.resolvePending(ctx, vol.GetName(), pending.GetToken()); err != nil {
				return nil, err
			}
			wait = 100 * time.Millisecond
		}
		select {
		case <-changed:
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, status.Errorf(codes.Unavailable, "write held while checkpoint %d of volume %d is taken: %v", pending.GetId(), volID, ctx.Err())
		}
	}
}

func (c *checkpoints) finish(volID, period uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inflight[volID]--
	if c.inflight[volID] == 0 {
		delete(c.inflight, volID)
		if ch := c.drained[volID]; ch != nil {
			close(ch)
			delete(c.drained, volID)
		}
	}
	if c.admitted[period]--; c.admitted[period] == 0 {
		delete(c.admitted, period)
		if ch := c.periodDone[period]; ch != nil {
			close(ch)
			delete(c.periodDone, period)
		}
	}
}

// releaseLocked ends the volume's hold if it is the token's.
func (c *checkpoints) releaseLocked(volID uint64, token string) {
	if h := c.holds[volID]; h != nil && h.token == token {
		close(h.done)
		delete(c.holds, volID)
	}
}

// PrepareCheckpoint holds new writes to the volumes and returns once the writes admitted before have finished.
func (o *OSD) PrepareCheckpoint(ctx context.Context, req *basaltv1.PrepareCheckpointRequest) (*basaltv1.PrepareCheckpointResponse, error) {
	c := o.ckpt
	refs := req.GetCheckpoints()
	c.mu.Lock()
	for _, r := range refs {
		if h := c.holds[r.GetVolume()]; h != nil && h.token != req.GetToken() {
			c.mu.Unlock()
			return nil, status.Errorf(codes.Aborted, "checkpoint %d of volume %d is already being taken", h.id, r.GetVolume())
		}
	}
	for _, r := range refs {
		if c.holds[r.GetVolume()] == nil {
			c.holds[r.GetVolume()] = &hold{token: req.GetToken(), id: r.GetCheckpoint(), done: make(chan struct{})}
		}
	}
	c.mu.Unlock()
	holdFor := time.Duration(req.GetHoldMillis()) * time.Millisecond
	if holdFor <= 0 {
		holdFor = 5 * time.Second
	}
	// Resolve the hold from etcd if no release comes in time (metad died, or its release was lost).
	time.AfterFunc(holdFor, func() { o.resolveHolds(req.GetToken(), refs) })
	for _, r := range refs {
		c.mu.Lock()
		if c.inflight[r.GetVolume()] == 0 {
			c.mu.Unlock()
			continue
		}
		ch := c.drained[r.GetVolume()]
		if ch == nil {
			ch = make(chan struct{})
			c.drained[r.GetVolume()] = ch
		}
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			o.release(req.GetToken(), refs, false)
			return nil, status.Errorf(codes.DeadlineExceeded, "writes to volume %d did not finish: %v", r.GetVolume(), ctx.Err())
		}
	}
	return &basaltv1.PrepareCheckpointResponse{}, nil
}

// ReleaseCheckpoint ends a hold.
func (o *OSD) ReleaseCheckpoint(_ context.Context, req *basaltv1.ReleaseCheckpointRequest) (*basaltv1.ReleaseCheckpointResponse, error) {
	o.release(req.GetToken(), req.GetCheckpoints(), req.GetCommitted())
	return &basaltv1.ReleaseCheckpointResponse{}, nil
}

func (o *OSD) release(token string, refs []*basaltv1.VolumeCheckpointRef, committed bool) {
	c := o.ckpt
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range refs {
		if committed && r.GetCheckpoint() > c.known[r.GetVolume()] {
			c.known[r.GetVolume()] = r.GetCheckpoint()
		}
		c.releaseLocked(r.GetVolume(), token)
	}
}

// resolveHolds finds out from etcd what became of a checkpoint whose release did not come.
func (o *OSD) resolveHolds(token string, refs []*basaltv1.VolumeCheckpointRef) {
	c := o.ckpt
	for _, r := range refs {
		c.mu.Lock()
		h := c.holds[r.GetVolume()]
		c.mu.Unlock()
		if h == nil || h.token != token {
			continue
		}
		vol := o.view.VolumeByID(r.GetVolume())
		if vol == nil {
			o.release(token, []*basaltv1.VolumeCheckpointRef{r}, false)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := o.resolvePending(ctx, vol.GetName(), token)
		cancel()
		if err != nil {
			o.log.Warn("cannot resolve a checkpoint hold; retrying", "volume", vol.GetName(), "err", err)
			time.AfterFunc(time.Second, func() { o.resolveHolds(token, []*basaltv1.VolumeCheckpointRef{r}) })
			continue
		}
	}
}

// resolvePending decides a pending checkpoint whose deadline passed: if etcd shows it committed, the hold ends
// as committed; else this node aborts it by clearing the pending record (compare-and-swap), so that a late
// commit fails, and the hold ends as aborted.
func (o *OSD) resolvePending(ctx context.Context, name, token string) error {
	for {
		rec, err := store.Get[basaltv1.Volume](ctx, o.store, schema.VolumeKey(name))
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return status.Errorf(codes.Unavailable, "read volume %s to resolve a checkpoint: %v", name, err)
		}
		vol := rec.Value
		ref := []*basaltv1.VolumeCheckpointRef{{Volume: vol.GetId(), Checkpoint: vol.GetCheckpointSeq()}}
		p := vol.GetPendingCheckpoint()
		if p == nil || p.GetToken() != token {
			// Committed or aborted already; the record's sequence number tells which.
			o.release(token, ref, true)
			return nil
		}
		vol.PendingCheckpoint = nil
		if _, err := o.store.Update(ctx, rec.Key, vol, rec.ModRevision); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return status.Errorf(codes.Unavailable, "abort checkpoint %d of volume %s: %v", p.GetId(), name, err)
		}
		o.log.Warn("aborted a checkpoint that was not committed in time", "volume", name, "checkpoint", p.GetId())
		o.release(token, ref, false)
		return nil
	}
}

// layerView checks that a read's view names a live checkpoint of the volume.
func (o *OSD) layerView(volID uint64, viewID uint32) error {
	if viewID == 0 {
		return nil
	}
	vol := o.view.VolumeByID(volID)
	for _, c := range vol.GetCheckpoints() {
		if c.GetId() == viewID {
			return nil
		}
	}
	if viewID > vol.GetCheckpointSeq() {
		// Taken a moment ago: this node's view has not caught up with the gateway's.
		return status.Errorf(codes.Unavailable, "volume %d has no checkpoint %d yet at %s", volID, viewID, o.id)
	}
	return status.Errorf(codes.NotFound, "volume %d has no checkpoint %d (deleted?)", volID, viewID)
}

type volumeCheckpoint struct {
	volume uint64
	id     uint32
}

// mergeDeleted merges, in the local engine, the layers of every checkpoint the view lists as deleted, once per
// checkpoint per process (the engine's merge is idempotent and durable, so a restart simply repeats it).
func (o *OSD) mergeDeleted(ctx context.Context, merged map[volumeCheckpoint]bool) {
	for _, vol := range o.view.Volumes() {
		for _, id := range vol.GetDeletedCheckpoints() {
			key := volumeCheckpoint{vol.GetId(), id}
			if merged[key] {
				continue
			}
			start := time.Now()
			if err := o.eng.DeleteCheckpoint(ctx, vol.GetId(), id); err != nil {
				if ctx.Err() == nil {
					o.log.Error("merge of a deleted checkpoint failed; will retry", "volume", vol.GetName(), "checkpoint", id, "err", err)
				}
				continue
			}
			merged[key] = true
			o.log.Info("merged a deleted checkpoint", "volume", vol.GetName(), "checkpoint", id, "took", time.Since(start).Round(time.Microsecond))
		}
	}
}

// RunMerges merges deleted checkpoints as the view reports them, until ctx ends.
func (o *OSD) RunMerges(ctx context.Context) {
	merged := map[volumeCheckpoint]bool{}
	retry := time.NewTicker(10 * time.Second)
	defer retry.Stop()
	for {
		changed := o.view.Changed()
		o.mergeDeleted(ctx, merged)
		select {
		case <-changed:
		case <-retry.C:
		case <-ctx.Done():
			return
		}
	}
}

// CheckpointUsage sums the bytes each requested view of a volume references, over the objects this node is
// primary of, so that summing every node's answer counts each object once.
func (o *OSD) CheckpointUsage(ctx context.Context, req *basaltv1.CheckpointUsageRequest) (*basaltv1.CheckpointUsageResponse, error) {
	vol := o.view.VolumeByID(req.GetVolume())
	if vol == nil {
		return nil, status.Errorf(codes.NotFound, "volume %d does not exist", req.GetVolume())
	}
	m := o.view.Map()
	include := func(id engine.ObjectID) bool {
		r, err := RouteObject(m, vol, id.Index)
		return err == nil && r.Primary() != nil && r.Primary().GetId() == o.id
	}
	u, err := o.eng.Usage(ctx, vol.GetId(), req.GetViews(), include)
	if err != nil {
		return nil, o.engineStatus(fmt.Sprintf("usage of volume %s", vol.GetName()), err)
	}
	resp := &basaltv1.CheckpointUsageResponse{}
	for _, v := range req.GetViews() {
		resp.Usage = append(resp.Usage, &basaltv1.CheckpointUsage{View: v, VisibleBytes: uint64(u[v].Visible), ExclusiveBytes: uint64(u[v].Exclusive)})
	}
	return resp, nil
}
