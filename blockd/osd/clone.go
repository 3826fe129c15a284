package osd

import (
	"context"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A linked clone is a volume whose record names a parent checkpoint. Object i of the clone covers the same
// bytes as object i of the parent, so where the clone's object holds nothing in any layer (a hole, not a
// trimmed zero extent), the clone reads the parent's object i at the parent checkpoint, from the parent
// object's primary, which may in turn read its own parent. Trims in a clone record zeros that hide the parent
// (Opaque). Writes of part of a 4 KiB block are widened to whole blocks with the content read through the
// parent, because the engine can merge a partial block only with what it holds. Flattening copies the
// parent's blocks the clone lacks into the clone's lowest layer (COPYUP), beneath everything the clone wrote,
// so every view of the clone reads the same before and after.

// parentOp runs a read-only operation on the parent's object of a clone object, at the parent checkpoint.
func (o *OSD) parentOp(ctx context.Context, parent *basaltv1.VolumeParent, index uint64, op basaltv1.BlockOp, off, length int64) (*basaltv1.ClientOpResponse, error) {
	pvol := o.view.VolumeByID(parent.GetVolumeId())
	if pvol == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "the parent volume %s of a linked clone is gone", parent.GetVolume())
	}
	m := o.view.Map()
	r, err := RouteObject(m, pvol, index)
	if err != nil {
		return nil, err
	}
	p := r.Primary()
	if p == nil {
		return nil, status.Errorf(codes.Unavailable, "no member of the parent's PG %d.%d is up", r.PG.Pool, r.PG.Num)
	}
	req := &basaltv1.ClientOpRequest{
		Epoch: m.GetEpoch(), Object: &basaltv1.ObjectRef{Volume: pvol.GetId(), Index: index},
		Op: op, Offset: off, Length: length, View: parent.GetCheckpointId(),
	}
	var resp *basaltv1.ClientOpResponse
	if p.GetId() == o.id {
		resp, err = o.ClientOp(ctx, req)
	} else {
		var c basaltv1.BlockServiceClient
		if c, err = o.peers.Client(p); err == nil {
			resp, err = c.ClientOp(ctx, req)
		}
	}
	if err != nil {
		// The gateway retries the clone's operation as a whole.
		return nil, status.Errorf(codes.Unavailable, "read the parent %s@%s: %s", parent.GetVolume(), parent.GetCheckpoint(), status.Convert(err).Message())
	}
	return resp, nil
}

// parentHoles returns the parts of [off, off+length) of a clone object that the object holds in no layer of
// the view and that lie within the parent checkpoint's size: what the parent supplies.
func (o *OSD) parentHoles(ctx context.Context, parent *basaltv1.VolumeParent, id engine.ObjectID, view uint32, off, length int64) ([]engine.Extent, error) {
	ext, err := o.eng.ExtentsView(ctx, id, view, off, length)
	if err != nil {
		return nil, err
	}
	base := int64(id.Index) * engine.ObjectSize
	limit := int64(parent.GetSizeBytes()) - base
	var out []engine.Extent
	for _, e := range ext {
		if !e.Hole || e.Offset >= limit {
			continue
		}
		e.Length = min(e.Length, limit-e.Offset)
		out = append(out, e)
	}
	return out, nil
}

// readClone reads a range of a clone object: its own layers, and the parent where it holds nothing. The
// caller holds the object's lock, so that no write turns a hole into data between the two reads.
func (o *OSD) readClone(ctx context.Context, parent *basaltv1.VolumeParent, id engine.ObjectID, view uint32, off int64, buf []byte) error {
	holes, err := o.parentHoles(ctx, parent, id, view, off, int64(len(buf)))
	if err != nil {
		return err
	}
	if err := o.eng.ReadView(ctx, id, view, off, buf); err != nil {
		return err
	}
	for _, h := range holes {
		resp, err := o.parentOp(ctx, parent, id.Index, basaltv1.BlockOp_BLOCK_OP_READ, h.Offset, h.Length)
		if err != nil {
			return err
		}
		if int64(len(resp.GetData())) != h.Length {
			return status.Errorf(codes.Internal, "the parent returned %d bytes for %d", len(resp.GetData()), h.Length)
		}
		copy(buf[h.Offset-off:], resp.GetData())
	}
	return nil
}

// extentsClone describes a range of a clone object: the parent's extents fill the clone's holes.
func (o *OSD) extentsClone(ctx context.Context, parent *basaltv1.VolumeParent, id engine.ObjectID, view uint32, off, length int64) ([]engine.Extent, error) {
	ext, err := o.eng.ExtentsView(ctx, id, view, off, length)
	if err != nil {
		return nil, err
	}
	base := int64(id.Index) * engine.ObjectSize
	limit := int64(parent.GetSizeBytes()) - base
	var out []engine.Extent
	for _, e := range ext {
		if !e.Hole || e.Offset >= limit {
			out = append(out, e)
			continue
		}
		n := min(e.Length, limit-e.Offset)
		resp, err := o.parentOp(ctx, parent, id.Index, basaltv1.BlockOp_BLOCK_OP_EXTENTS, e.Offset, n)
		if err != nil {
			return nil, err
		}
		for _, pe := range resp.GetExtents() {
			out = append(out, engine.Extent{Offset: pe.GetOffset(), Length: pe.GetLength(), Hole: pe.GetHole(), Zero: pe.GetZero()})
		}
		if n < e.Length {
			out = append(out, engine.Extent{Offset: e.Offset + n, Length: e.Length - n, Hole: true})
		}
	}
	return out, nil
}

// alignCloneWrite widens a write or trim of part of a block of a clone to whole blocks, merged with the
// content read through the parent; the result is a write. The caller holds the object's lock.
func (o *OSD) alignCloneWrite(ctx context.Context, parent *basaltv1.VolumeParent, id engine.ObjectID, rep *basaltv1.ReplicateRequest) error {
	off, length := rep.GetOffset(), rep.GetLength()
	if off%engine.BlockSize == 0 && length%engine.BlockSize == 0 {
		return nil
	}
	a0 := off / engine.BlockSize * engine.BlockSize
	a1 := (off + length + engine.BlockSize - 1) / engine.BlockSize * engine.BlockSize
	buf := make([]byte, a1-a0)
	if err := o.readClone(ctx, parent, id, 0, a0, buf); err != nil {
		return err
	}
	if rep.GetOp() == basaltv1.BlockOp_BLOCK_OP_WRITE {
		copy(buf[off-a0:], rep.GetData())
	} else {
		clear(buf[off-a0 : off-a0+length])
	}
	rep.Op, rep.Offset, rep.Length, rep.Data = basaltv1.BlockOp_BLOCK_OP_WRITE, a0, a1-a0, buf
	return nil
}

// copyUp copies into a clone object, in its lowest layer, the parent's data where the object holds nothing in
// any layer, and replicates the copy. It returns the bytes copied.
func (o *OSD) copyUp(ctx context.Context, r Route, st *pgState, id engine.ObjectID, parent *basaltv1.VolumeParent) (int64, error) {
	defer o.lock(id)()
	holes, err := o.parentHoles(ctx, parent, id, 0, 0, engine.ObjectSize)
	if err != nil {
		return 0, o.engineStatus("extents", err)
	}
	var copied int64
	for _, h := range holes {
		resp, err := o.parentOp(ctx, parent, id.Index, basaltv1.BlockOp_BLOCK_OP_EXTENTS, h.Offset, h.Length)
		if err != nil {
			return copied, err
		}
		for _, pe := range resp.GetExtents() {
			if pe.GetHole() || pe.GetZero() {
				continue // reads as zeros with or without the parent
			}
			data, err := o.parentOp(ctx, parent, id.Index, basaltv1.BlockOp_BLOCK_OP_READ, pe.GetOffset(), pe.GetLength())
			if err != nil {
				return copied, err
			}
			rep := &basaltv1.ReplicateRequest{
				Epoch: r.Map.GetEpoch(), Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index},
				Op: basaltv1.BlockOp_BLOCK_OP_WRITE, Offset: pe.GetOffset(), Length: pe.GetLength(), Data: data.GetData(),
				Primary: o.id, Layer: 0,
			}
			if _, err := o.replicateLocked(ctx, r, st, id, rep); err != nil {
				return copied, err
			}
			copied += pe.GetLength()
		}
	}
	return copied, nil
}

func (o *OSD) cloneParent(volID uint64) *basaltv1.VolumeParent {
	return o.view.VolumeByID(volID).GetParent()
}
