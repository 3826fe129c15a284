// Package gateway turns NBD requests into object operations: every blockd exports every volume, splits each
// request at object boundaries, and sends each piece to the primary of its placement group — itself when it is
// the primary, else another blockd over BlockService. A piece that meets a stale epoch, a node that is no longer
// primary, a PG that is peering or a member that does not answer is retried once the cluster map has moved on,
// until the operation's deadline; only then does the client see an error. It implements blockd/nbd's
// ExportSource and Backend, and depends on blockd/osd, blockd/view, blockd/nbd and the API types.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/nbd"
	"github.com/basalt-hv/basalt/blockd/osd"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
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
}

// viewLag bounds how long an export waits for this node's view to catch up with a volume etcd already has.
const viewLag = 10 * time.Second

// Export describes a volume as an NBD export.
func (g *Gateway) Export(ctx context.Context, name string) (*nbd.Export, error) {
	vol, err := g.volume(ctx, name)
	if err != nil {
		return nil, err
	}
	return &nbd.Export{
		Name:               name,
		Description:        fmt.Sprintf("Basalt volume %s (pool %s, %d replicas)", name, vol.GetPool(), vol.GetReplicas()),
		Size:               int64(vol.GetSizeBytes()),
		MinBlockSize:       vol.GetSectorSize(),
		PreferredBlockSize: 4096,
		MaxBlockSize:       nbd.DefaultMaxBlockSize,
		// Every connection reaches the same primaries, and FLUSH syncs every node: writes acknowledged on any
		// connection are covered by a flush on any other.
		MultiConn: true,
		Backend:   &volume{g: g, id: vol.GetId(), name: name},
	}, nil
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

// ExportNames lists every volume.
func (g *Gateway) ExportNames(context.Context) ([]string, error) {
	var names []string
	for _, v := range g.View.Volumes() {
		names = append(names, v.GetName())
	}
	slices.Sort(names)
	return names, nil
}

// volume is the NBD backend of one volume.
type volume struct {
	g    *Gateway
	id   uint64
	name string
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
		resp, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_READ})
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
	return each(pieces(off, int64(len(p))), func(pc piece) error {
		_, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_WRITE, Data: p[pc.at : pc.at+pc.length], Sync: fua})
		return err
	})
}

func (v *volume) Trim(ctx context.Context, off, length int64, fua bool) error {
	return each(pieces(off, length), func(pc piece) error {
		_, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_TRIM, Sync: fua})
		return err
	})
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
		resp, err := v.g.op(ctx, v, pc, &basaltv1.ClientOpRequest{Op: basaltv1.BlockOp_BLOCK_OP_EXTENTS})
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
			if n := len(out); n > 0 && out[n-1].Hole == e.GetHole() {
				out[n-1].Length += e.GetLength()
				continue
			}
			out = append(out, nbd.Extent{Length: e.GetLength(), Hole: e.GetHole(), Zero: e.GetHole()})
		}
	}
	return out, nil
}

// syncAll syncs every storage node that is up, this one included.
func (g *Gateway) syncAll(ctx context.Context) error {
	m := g.View.Map()
	var nodes []*basaltv1.StorageNode
	for _, n := range m.GetNodes() {
		if n.GetUp() {
			nodes = append(nodes, n)
		}
	}
	errs := make(chan error, len(nodes))
	for _, n := range nodes {
		go func() {
			if n.GetId() == g.OSD.ID() {
				errs <- g.OSD.SyncLocal(ctx)
				return
			}
			c, err := g.Peers.Client(n)
			if err == nil {
				_, err = c.Sync(ctx, &basaltv1.SyncRequest{})
			}
			errs <- err
		}()
	}
	var failed error
	for range nodes {
		if err := <-errs; err != nil {
			failed = errors.Join(failed, err)
		}
	}
	if failed != nil {
		return fmt.Errorf("flush: %v: %w", failed, nbd.ErrIO)
	}
	return nil
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
