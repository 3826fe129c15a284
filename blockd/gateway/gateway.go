// Package gateway turns NBD requests into object operations: every blockd exports every volume, splits each
// request at object boundaries, and sends each piece to the primary of its placement group — itself when it is
// the primary, else another blockd over BlockService. A piece that meets a stale epoch, a node that is no longer
// primary, a PG that is peering or a member that does not answer is retried once the cluster map has moved on,
// until the operation's deadline; only then does the client see an error. A session opened as
// "VOLUME?generation=N" carries N on every write, and a write the primary refuses for its generation (fenced,
// docs/fencing.md) is never retried: the client sees EPERM at once. It implements blockd/nbd's
// ExportSource and Backend, and depends on blockd/osd, blockd/view, blockd/nbd and the API types.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/nbd"
	"github.com/basalt-hv/basalt/blockd/osd"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultOpTimeout is how long one client operation may keep retrying through failures before the client
// sees an error. It must cover detecting a dead node (its lease TTL), the new epoch, and peering.
const DefaultOpTimeout = 60 * time.Second

// attemptTimeout bounds one attempt at one primary.
const attemptTimeout = 15 * time.Second

// Gateway exports the cluster's volumes over NBD.
type Gateway struct {
	OSD  *osd.OSD
	View *view.View
	// Store is read when the view does not know a volume yet: a volume created a moment ago may not have
	// reached this node's watch.
	Store     *store.Store
	Peers     *osd.Peers
	OpTimeout time.Duration
	Log       *slog.Logger

	openMu sync.Mutex
	open   map[uint64]int // NBD connections in transmission per volume
}

// viewLag bounds how long an export waits for this node's view to catch up with a volume etcd already has.
const viewLag = 10 * time.Second

// Export describes a volume as an NBD export. "VOLUME@CHECKPOINT" names a checkpoint of a volume, exported
// read-only with the size the volume had when it was taken. "VOLUME?generation=N" is the volume opened by a
// host it is attached to (basaltv1.AttachedExport): every write of the session carries N, and the primaries
// refuse them once the volume's attachment has moved on (docs/fencing.md).
func (g *Gateway) Export(ctx context.Context, name string) (*nbd.Export, error) {
	base, gen, err := basaltv1.ParseAttachedExport(name)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, nbd.ErrInvalid)
	}
	volName, ckptName, atCheckpoint := strings.Cut(base, "@")
	if atCheckpoint && gen != 0 {
		return nil, fmt.Errorf("export %q: a checkpoint is read-only, so an attachment generation makes no sense on it (open %s): %w", name, base, nbd.ErrInvalid)
	}
	vol, err := g.volume(ctx, volName)
	if err != nil {
		return nil, err
	}
	e := &nbd.Export{
		Name:               name,
		Description:        fmt.Sprintf("Basalt volume %s (pool %s, %d replicas)", volName, vol.GetPool(), vol.GetReplicas()),
		Size:               int64(vol.GetSizeBytes()),
		MinBlockSize:       vol.GetSectorSize(),
		PreferredBlockSize: 4096,
		MaxBlockSize:       nbd.DefaultMaxBlockSize,
		// Every connection reaches the same primaries, and FLUSH syncs every node: writes acknowledged on any
		// connection are covered by a flush on any other.
		MultiConn: true,
	}
	backend := &volume{g: g, id: vol.GetId(), name: volName, gen: gen}
	if atCheckpoint {
		ckpt := vol.CheckpointNamed(ckptName)
		if ckpt == nil {
			// A checkpoint taken a moment ago may not have reached this node's watch: catch up with etcd as it
			// is now (one consistent read) and look again, so that a client that took it can read it at once.
			vol, err = g.freshVolume(ctx, volName)
			if err != nil {
				return nil, err
			}
			backend.id = vol.GetId()
			ckpt = vol.CheckpointNamed(ckptName)
		}
		if ckpt == nil {
			return nil, fmt.Errorf("volume %q has no checkpoint %q: %w", volName, ckptName, nbd.ErrNoSuchExport)
		}
		backend.view = ckpt.GetId()
		e.Size = int64(ckpt.GetSizeBytes())
		e.ReadOnly = true
		e.Description = fmt.Sprintf("Basalt volume %s at checkpoint %s (read-only)", volName, ckptName)
	}
	e.Backend = backend
	return e, nil
}

// VolumeOpen reports whether an NBD client of this node has the volume (or one of its checkpoints) open.
func (g *Gateway) VolumeOpen(volID uint64) bool {
	g.openMu.Lock()
	defer g.openMu.Unlock()
	return g.open[volID] > 0
}

// freshVolume returns the named volume from the view once the view has caught up with etcd's current revision.
func (g *Gateway) freshVolume(ctx context.Context, name string) (*basaltv1.Volume, error) {
	resp, err := g.Store.Client.Get(ctx, schema.VolumeKey(name), clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("volume %q: read etcd's revision: %w", name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, viewLag)
	defer cancel()
	if _, err := g.View.WaitRevision(wctx, resp.Header.Revision); err != nil {
		return nil, fmt.Errorf("volume %q: this node's view did not catch up with etcd: %w", name, err)
	}
	return g.volume(ctx, name)
}

// volume returns the named volume from the view. If the view does not have it, a consistent read of etcd
// decides: a volume that exists there (created a moment ago) is waited for until the view has it too, because
// every operation on it is routed through the view.
func (g *Gateway) volume(ctx context.Context, name string) (*basaltv1.Volume, error) {
	if vol := g.View.Volume(name); vol != nil {
		return vol, nil
	}
	if schema.ValidateName("volume", name) != nil {
		return nil, fmt.Errorf("volume %q: %w", name, nbd.ErrNoSuchExport)
	}
	_, err := store.Get[basaltv1.Volume](ctx, g.Store, schema.VolumeKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("volume %q: %w", name, nbd.ErrNoSuchExport)
	}
	if err != nil {
		return nil, fmt.Errorf("look up volume %q: %v: %w", name, err, nbd.ErrIO)
	}
	ctx, cancel := context.WithTimeout(ctx, viewLag)
	defer cancel()
	for {
		changed := g.View.Changed()
		if vol := g.View.Volume(name); vol != nil {
			return vol, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("volume %q exists but this node has not seen it within %s: %w", name, viewLag, nbd.ErrIO)
		}
	}
}

// volumeByID returns a volume from the view, waiting up to viewLag for it (and for ready, if not nil) when the
// view lags etcd: metad asks for work on a volume, or a checkpoint, it has just recorded. IDs are never reused,
// so a volume at or below the highest ID the view has seen, and not in it, was deleted.
func (g *Gateway) volumeByID(ctx context.Context, id uint64, ready func(*basaltv1.Volume) bool) (*basaltv1.Volume, error) {
	ctx, cancel := context.WithTimeout(ctx, viewLag)
	defer cancel()
	for {
		changed := g.View.Changed()
		vol := g.View.VolumeByID(id)
		switch {
		case vol != nil && (ready == nil || ready(vol)):
			return vol, nil
		case vol == nil && id <= g.View.MaxVolumeID():
			return nil, fmt.Errorf("volume %d does not exist", id)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("volume %d: this node's view has not caught up with etcd within %s", id, viewLag)
		}
	}
}

// ExportNames lists every volume.
func (g *Gateway) ExportNames(context.Context) ([]string, error) {
	var names []string
	for _, v := range g.View.Volumes() {
		names = append(names, v.GetName())
	}
	slices.Sort(names)
	return names, nil
}

// volume is the NBD backend of one volume, or of one of its checkpoints.
type volume struct {
	g    *Gateway
	id   uint64
	name string
	view uint32 // checkpoint number, 0 for the volume itself
	gen  uint64 // attachment generation the session was opened with, 0 for none

	fencedOnce sync.Once // the first refused write is logged, not every one
}

// Begin and End count the connections using the volume (nbd.SessionTracker), so that a revert can refuse an
// attached volume.
func (v *volume) Begin() {
	v.g.openMu.Lock()
	defer v.g.openMu.Unlock()
	if v.g.open == nil {
		v.g.open = map[uint64]int{}
	}
	v.g.open[v.id]++
}

func (v *volume) End() {
	v.g.openMu.Lock()
	defer v.g.openMu.Unlock()
	if v.g.open[v.id]--; v.g.open[v.id] <= 0 {
		delete(v.g.open, v.id)
	}
}

// piece is the part of a request that falls in one object.
type piece struct {
	index  uint64
	off    int64 // within the object
	length int64
	at     int64 // within the request
	slot   int   // position among the request's pieces, for gathering results
}

func pieces(off, length int64) []piece {
	var out []piece
	for at := int64(0); at < length; {
		idx := uint64((off + at) / engine.ObjectSize)
		o := (off + at) % engine.ObjectSize
		n := min(length-at, engine.ObjectSize-o)
		out = append(out, piece{index: idx, off: o, length: n, at: at})
		at += n
	}
	return out
}

// each runs fn on every piece concurrently and returns the first error.
func each(ps []piece, fn func(p piece) error) error {
	if len(ps) == 1 {
		return fn(ps[0])
	}
	errs := make(chan error, len(ps))
	for _, p := range ps {
		go func() { errs <- fn(p) }()
	}
	var first error
	for range ps {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (v *volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	return each(pieces(off, int64(len(p))), func(pc piece) error {
		resp, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_READ, View: v.view})
		if err != nil {
			return err
		}
		if int64(len(resp.GetData())) != pc.length {
			return fmt.Errorf("read of %d bytes returned %d: %w", pc.length, len(resp.GetData()), nbd.ErrIO)
		}
		copy(p[pc.at:pc.at+pc.length], resp.GetData())
		return nil
	})
}

func (v *volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return v.fenced(each(pieces(off, int64(len(p))), func(pc piece) error {
		_, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_WRITE, Data: p[pc.at : pc.at+pc.length], Sync: fua, AttachGeneration: v.gen})
		return err
	}))
}

func (v *volume) Trim(ctx context.Context, off, length int64, fua bool) error {
	return v.fenced(each(pieces(off, length), func(pc piece) error {
		_, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_TRIM, Sync: fua, AttachGeneration: v.gen})
		return err
	}))
}

// fenced logs the first write of the session that the primaries refused for its attachment generation: an
// operator looking at a paused VM finds why here.
func (v *volume) fenced(err error) error {
	if errors.Is(err, nbd.ErrPermission) {
		v.fencedOnce.Do(func() {
			v.g.Log.Warn("writes refused: the session's attachment generation is no longer the volume's", "volume", v.name, "generation", v.gen, "err", err)
		})
	}
	return err
}

// WriteZeroes trims (trimmed ranges read as zeros and free their space) unless the client wants the space kept,
// in which case zeros are written.
func (v *volume) WriteZeroes(ctx context.Context, off, length int64, f nbd.ZeroFlags) error {
	if !f.NoHole {
		return v.Trim(ctx, off, length, f.FUA)
	}
	if f.FastOnly {
		return fmt.Errorf("writing zeros is not fast: %w", nbd.ErrNotSupported)
	}
	zero := make([]byte, min(length, 1<<20))
	for at := int64(0); at < length; at += int64(len(zero)) {
		n := min(int64(len(zero)), length-at)
		if err := v.WriteAt(ctx, zero[:n], off+at, f.FUA); err != nil {
			return err
		}
	}
	return nil
}

// Flush makes every acknowledged write durable on every storage node that is up. Syncing every node, not only
// those this connection wrote to, is what lets a flush on one connection cover writes made on another.
func (v *volume) Flush(ctx context.Context) error {
	return v.g.syncAll(ctx)
}

func (v *volume) BlockStatus(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	ps := pieces(off, length)
	results := make([][]*basaltv1.Extent, len(ps))
	for i := range ps {
		ps[i].slot = i
	}
	err := each(ps, func(pc piece) error {
		resp, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_EXTENTS, View: v.view})
		if err != nil {
			return err
		}
		results[pc.slot] = resp.GetExtents()
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []nbd.Extent
	for _, exts := range results {
		for _, e := range exts {
			// Explicit zeros (trims over older layers) read as zeros and hold no data: a hole to the client.
			hole := e.GetHole() || e.GetZero()
			if n := len(out); n > 0 && out[n-1].Hole == hole {
				out[n-1].Length += e.GetLength()
				continue
			}
			out = append(out, nbd.Extent{Length: e.GetLength(), Hole: hole, Zero: hole})
		}
	}
	return out, nil
}

// Changed lists the ranges of a volume written or trimmed in checkpoint layers [from, to) (to 0: up to now)
// within [off, off+length), in volume offsets, adjacent ranges of the same kind merged.
func (g *Gateway) Changed(ctx context.Context, volID uint64, from, to uint32, off, length int64) ([]*basaltv1.Extent, error) {
	vol, err := g.volumeByID(ctx, volID, nil)
	if err != nil {
		return nil, err
	}
	v := &volume{g: g, id: volID, name: vol.GetName(), view: to}
	ps := pieces(off, length)
	results := make([][]*basaltv1.Extent, len(ps))
	for i := range ps {
		ps[i].slot = i
	}
	err = each(ps, func(pc piece) error {
		resp, err := g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_CHANGED, View: to, ChangedFrom: from})
		if err != nil {
			return err
		}
		base := int64(pc.index) * engine.ObjectSize
		for _, e := range resp.GetExtents() {
			results[pc.slot] = append(results[pc.slot], &basaltv1.Extent{Offset: base + e.GetOffset(), Length: e.GetLength(), Zero: e.GetZero()})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []*basaltv1.Extent
	for _, exts := range results {
		for _, e := range exts {
			if n := len(out); n > 0 && out[n-1].GetZero() == e.GetZero() && out[n-1].GetOffset()+out[n-1].GetLength() == e.GetOffset() {
				out[n-1].Length += e.GetLength()
				continue
			}
			out = append(out, e)
		}
	}
	return out, nil
}

// syncAll syncs every storage node that is up, this one included. A node that does not answer is asked again,
// like any operation, until the cluster map no longer counts it up (a dead node holds no acknowledged write
// that its PGs' other members lack) or the operation's deadline passes.
func (g *Gateway) syncAll(ctx context.Context) error {
	timeout := g.OpTimeout
	if timeout == 0 {
		timeout = DefaultOpTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	synced := map[string]bool{}
	for {
		changed := g.View.Changed()
		var nodes []*basaltv1.StorageNode
		for _, n := range g.View.Map().GetNodes() {
			if n.GetUp() && !synced[n.GetId()] {
				nodes = append(nodes, n)
			}
		}
		type result struct {
			id  string
			err error
		}
		results := make(chan result, len(nodes))
		for _, n := range nodes {
			go func() {
				actx, acancel := context.WithTimeout(ctx, attemptTimeout)
				defer acancel()
				if n.GetId() == g.OSD.ID() {
					results <- result{n.GetId(), g.OSD.SyncLocal(actx)}
					return
				}
				c, err := g.Peers.Client(n)
				if err == nil {
					_, err = c.Sync(actx, &basaltv1.SyncRequest{})
				}
				results <- result{n.GetId(), err}
			}()
		}
		var failed error
		for range nodes {
			r := <-results
			if r.err != nil {
				failed = errors.Join(failed, fmt.Errorf("%s: %w", r.id, r.err))
				continue
			}
			synced[r.id] = true
		}
		if failed == nil {
			return nil
		}
		select {
		case <-changed:
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("flush: %v: %w", failed, nbd.ErrIO)
		}
	}
}

// op sends one piece to its primary, retrying through map changes until the operation deadline.
func (g *Gateway) op(ctx context.Context, v *volume, pc piece, req *basaltv1.ClientOpRequest) (*basaltv1.ClientOpResponse, error) {
	timeout := g.OpTimeout
	if timeout == 0 {
		timeout = DefaultOpTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req.Object = &basaltv1.ObjectRef{Volume: v.id, Index: pc.index}
	req.Offset, req.Length = pc.off, pc.length
	var last error
	for attempt := 0; ; attempt++ {
		changed := g.View.Changed()
		m := g.View.Map()
		vol := g.View.VolumeByID(v.id)
		if vol == nil {
			return nil, fmt.Errorf("volume %s was deleted: %w", v.name, nbd.ErrIO)
		}
		if op := req.GetOp(); op == basaltv1.BlockOp_BLOCK_OP_WRITE || op == basaltv1.BlockOp_BLOCK_OP_TRIM {
			// Writes land in the layer above the newest checkpoint this node knows; a primary that knows a
			// newer one refuses, and the retry takes the newer one from the view.
			req.Layer = vol.GetCheckpointSeq()
		}
		r, err := osd.RouteObject(m, vol, pc.index)
		if err != nil {
			return nil, fmt.Errorf("%v: %w", err, nbd.ErrIO)
		}
		var resp *basaltv1.ClientOpResponse
		if p := r.Primary(); p == nil {
			err = status.Errorf(codes.Unavailable, "no member of PG %d.%d is up at epoch %d", r.PG.Pool, r.PG.Num, m.GetEpoch())
		} else {
			req.Epoch = m.GetEpoch()
			actx, acancel := context.WithTimeout(ctx, attemptTimeout)
			if p.GetId() == g.OSD.ID() {
				resp, err = g.OSD.ClientOp(actx, req)
			} else {
				var c basaltv1.BlockServiceClient
				if c, err = g.Peers.Client(p); err == nil {
					resp, err = c.ClientOp(actx, req)
				}
			}
			acancel()
		}
		if err == nil {
			return resp, nil
		}
		last = err
		code := status.Code(err)
		switch code {
		case codes.Aborted, codes.FailedPrecondition, codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		default:
			return nil, clientError(err)
		}
		if ctx.Err() != nil {
			g.Log.Warn("operation gave up", "volume", v.name, "object", pc.index, "op", req.GetOp(), "attempts", attempt+1, "err", last)
			return nil, fmt.Errorf("%v (gave up after %s): %w", last, timeout, nbd.ErrIO)
		}
		// Wait for the map to move on, or retry the same epoch after a pause (a slow member, a PG peering).
		select {
		case <-changed:
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
		}
	}
}

// clientError maps a final error onto the NBD error the client sees.
func clientError(err error) error {
	switch status.Code(err) {
	case codes.ResourceExhausted:
		return fmt.Errorf("%v: %w", status.Convert(err).Message(), nbd.ErrNoSpace)
	case codes.InvalidArgument, codes.OutOfRange:
		return fmt.Errorf("%v: %w", status.Convert(err).Message(), nbd.ErrInvalid)
	case codes.PermissionDenied:
		return fmt.Errorf("%v: %w", status.Convert(err).Message(), nbd.ErrPermission)
	}
	return fmt.Errorf("%v: %w", status.Convert(err).Message(), nbd.ErrIO)
}

// revertWindow is how much of the volume Revert examines per round of change listing.
const revertWindow = 1 << 30

// Revert makes the volume's current content that of checkpoint ckpt: every range changed since the checkpoint
// is copied back from it (data written, holes trimmed). It returns the bytes of data copied. Repeating it is
// harmless, so an interrupted revert is finished by running it again.
func (g *Gateway) Revert(ctx context.Context, volID uint64, ckpt uint32) (int64, error) {
	vol, err := g.volumeByID(ctx, volID, func(v *basaltv1.Volume) bool { return v.GetCheckpointSeq() >= ckpt })
	if err != nil {
		return 0, err
	}
	var size int64 = -1
	for _, c := range vol.GetCheckpoints() {
		if c.GetId() == ckpt {
			size = int64(c.GetSizeBytes())
		}
	}
	if size < 0 {
		return 0, fmt.Errorf("volume %s has no checkpoint %d", vol.GetName(), ckpt)
	}
	head := &volume{g: g, id: volID, name: vol.GetName()}
	at := &volume{g: g, id: volID, name: vol.GetName(), view: ckpt}
	var copied int64
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += revertWindow {
		changed, err := g.Changed(ctx, volID, ckpt, 0, off, min(revertWindow, size-off))
		if err != nil {
			return copied, fmt.Errorf("list changes since the checkpoint: %w", err)
		}
		for _, c := range changed {
			n, err := copyRuns(ctx, at, head, c.GetOffset(), c.GetOffset(), c.GetLength(), buf)
			copied += n
			if err != nil {
				return copied, err
			}
		}
	}
	if err := g.syncAll(ctx); err != nil {
		return copied, err
	}
	return copied, nil
}

// copyRuns copies [srcOff, srcOff+length) of from onto to at dstOff, run by run of from's allocation: data is
// read and written, holes become trims (so the destination reads the same and stays thin). It returns the
// bytes of data copied.
func copyRuns(ctx context.Context, from, to *volume, srcOff, dstOff, length int64, buf []byte) (int64, error) {
	runs, err := from.BlockStatus(ctx, srcOff, length)
	if err != nil {
		return 0, fmt.Errorf("read the source's allocation at %d: %w", srcOff, err)
	}
	var copied int64
	pos := int64(0)
	for _, r := range runs {
		rl := min(r.Length, length-pos)
		if rl <= 0 {
			break
		}
		if r.Hole {
			if err := to.Trim(ctx, dstOff+pos, rl, false); err != nil {
				return copied, fmt.Errorf("trim the destination at %d: %w", dstOff+pos, err)
			}
		} else {
			for d := int64(0); d < rl; {
				k := min(int64(len(buf)), rl-d)
				if err := from.ReadAt(ctx, buf[:k], srcOff+pos+d); err != nil {
					return copied, fmt.Errorf("read the source at %d: %w", srcOff+pos+d, err)
				}
				if err := to.WriteAt(ctx, buf[:k], dstOff+pos+d, false); err != nil {
					return copied, fmt.Errorf("write the destination at %d: %w", dstOff+pos+d, err)
				}
				d += k
				copied += k
			}
		}
		pos += rl
	}
	return copied, nil
}

// Flatten copies into a linked clone every block it still reads from its parent, object by object, a few at a
// time, and returns the bytes copied. Writes to the clone go on meanwhile: a copy never lands above them.
func (g *Gateway) Flatten(ctx context.Context, volID uint64) (int64, error) {
	vol, err := g.volumeByID(ctx, volID, nil)
	if err != nil {
		return 0, err
	}
	parent := vol.GetParent()
	if parent == nil {
		return 0, nil
	}
	end := min(vol.GetSizeBytes(), parent.GetSizeBytes())
	objects := (end + engine.ObjectSize - 1) / engine.ObjectSize
	v := &volume{g: g, id: volID, name: vol.GetName()}
	const parallel = 4
	var (
		mu     sync.Mutex
		copied int64
		first  error
		next   uint64
	)
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if first != nil || next >= objects {
					mu.Unlock()
					return
				}
				idx := next
				next++
				mu.Unlock()
				resp, err := g.op(ctx, v, piece{index: idx, length: engine.ObjectSize}, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_COPYUP})
				mu.Lock()
				if err != nil && first == nil {
					first = fmt.Errorf("copy object %d from the parent: %w", idx, err)
				}
				copied += int64(resp.GetCopiedBytes())
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return copied, first
	}
	return copied, g.syncAll(ctx)
}

// CopyRange copies [srcOff, srcOff+length) of a volume (or one of its checkpoints) onto a volume at dstOff,
// inside the cluster: holes of the source become trims of the destination, so it reads the same and stays
// thin. It returns the bytes of data copied.
func (g *Gateway) CopyRange(ctx context.Context, srcID uint64, srcView uint32, dstID uint64, srcOff, dstOff, length int64) (int64, error) {
	src, err := g.volumeByID(ctx, srcID, func(v *basaltv1.Volume) bool { return v.GetCheckpointSeq() >= srcView })
	if err != nil {
		return 0, err
	}
	dst, err := g.volumeByID(ctx, dstID, nil)
	if err != nil {
		return 0, err
	}
	from := &volume{g: g, id: srcID, name: src.GetName(), view: srcView}
	to := &volume{g: g, id: dstID, name: dst.GetName()}
	var copied int64
	buf := make([]byte, 1<<20)
	const step = 64 << 20
	for at := int64(0); at < length; at += step {
		n, err := copyRuns(ctx, from, to, srcOff+at, dstOff+at, min(int64(step), length-at), buf)
		copied += n
		if err != nil {
			return copied, err
		}
	}
	return copied, g.syncAll(ctx)
}

// HasDirtyBitmap offers, as NBD dirty bitmaps ("qemu:dirty-bitmap:NAME"), the volume's checkpoints older than
// the one exported: the bitmap marks what changed since that checkpoint (nbd.DirtyBitmaps).
func (v *volume) HasDirtyBitmap(_ context.Context, name string) bool {
	id := v.checkpointID(name)
	return id != 0 && (v.view == 0 || id < v.view)
}

func (v *volume) checkpointID(name string) uint32 {
	if c := v.g.View.VolumeByID(v.id).CheckpointNamed(name); c != nil {
		return c.GetId()
	}
	return 0
}

// DirtyStatus describes a range in runs changed or not since the named checkpoint.
func (v *volume) DirtyStatus(ctx context.Context, name string, off, length int64) ([]nbd.DirtyExtent, error) {
	from := v.checkpointID(name)
	if from == 0 {
		return nil, fmt.Errorf("checkpoint %q of volume %s is gone: %w", name, v.name, nbd.ErrInvalid)
	}
	changed, err := v.g.Changed(ctx, v.id, from, v.view, off, length)
	if err != nil {
		return nil, err
	}
	var out []nbd.DirtyExtent
	pos := off
	for _, c := range changed {
		if c.GetOffset() > pos {
			out = append(out, nbd.DirtyExtent{Length: c.GetOffset() - pos})
		}
		out = append(out, nbd.DirtyExtent{Length: c.GetLength(), Dirty: true})
		pos = c.GetOffset() + c.GetLength()
	}
	if pos < off+length {
		out = append(out, nbd.DirtyExtent{Length: off + length - pos})
	}
	return out, nil
}
