package osd

import (
	"context"
	"sync"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/internal/placement"
)

// HasData reports whether this node holds data of a volume at or past a byte offset.
func (o *OSD) HasData(ctx context.Context, req *basaltv1.HasDataRequest) (*basaltv1.HasDataResponse, error) {
	has, err := o.hasDataFrom(ctx, req.GetVolume(), req.GetFrom())
	if err != nil {
		return nil, o.engineStatus("look for data", err)
	}
	return &basaltv1.HasDataResponse{HasData: has}, nil
}

func (o *OSD) hasDataFrom(ctx context.Context, volume, from uint64) (bool, error) {
	if p := o.cloneParent(volume); p != nil && p.GetSizeBytes() > from {
		// The parent may supply data there (the clone's own copies of it are not the only data it reads).
		return true, nil
	}
	first := from / engine.ObjectSize
	for _, id := range o.eng.Objects(volume) {
		switch {
		case id.Index > first:
			return true, nil
		case id.Index == first:
			off := int64(from % engine.ObjectSize)
			if has, err := o.headHasData(ctx, id, off); err != nil || has {
				return has, err
			}
		}
	}
	return false, nil
}

// trimPastEnd trims, as primary, the data of every volume that lies past the volume's end (after a shrink),
// through the normal replicated write path: the trims are versioned, so a member that was away during the
// shrink gets them by recovery and never brings the old bytes back after a later grow.
func (o *OSD) trimPastEnd(ctx context.Context, running *sync.Mutex) {
	if !running.TryLock() {
		return
	}
	defer running.Unlock()
	m := o.view.Map()
	for _, vol := range o.view.Volumes() {
		size := vol.GetSizeBytes()
		pool := placement.Pool(m, vol.GetPool())
		if pool == nil {
			continue
		}
		objects := o.eng.Objects(vol.GetId())
		if p := vol.GetParent(); p != nil {
			// A clone also reads, past its end, what its parent holds there: those objects need zeros recorded
			// even where this node holds nothing.
			local := map[uint64]bool{}
			for _, id := range objects {
				local[id.Index] = true
			}
			for idx := size / engine.ObjectSize; idx*engine.ObjectSize < p.GetSizeBytes(); idx++ {
				if !local[idx] {
					objects = append(objects, engine.ObjectID{Volume: vol.GetId(), Index: idx})
				}
			}
		}
		for _, id := range objects {
			start := int64(id.Index) * engine.ObjectSize
			if uint64(start+engine.ObjectSize) <= size {
				continue
			}
			acting := placement.ActingSet(m, pool, placement.ObjectPG(pool, id.Volume, id.Index))
			if len(acting) == 0 || acting[0].GetId() != o.id {
				continue
			}
			off := int64(0)
			if uint64(start) < size {
				off = int64(size) - start
			}
			if has, err := o.visiblePastEnd(ctx, vol, id, off); err != nil || !has {
				// Trimmed already (checkpoints may keep the old bytes in lower layers; the head hides them).
				continue
			}
			// Not a client's write: what lies past the end is no attachment's to guard.
			_, err := o.ClientOp(internalWrite(ctx), &basaltv1.ClientOpRequest{
				Epoch: m.GetEpoch(), Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index},
				Op: basaltv1.BlockOp_BLOCK_OP_TRIM, Offset: off, Length: engine.ObjectSize - off, Layer: vol.GetCheckpointSeq(),
			})
			if err != nil {
				if ctx.Err() == nil {
					o.log.Warn("trim data past the end of a shrunk volume", "volume", vol.GetName(), "object", id.Index, "err", err)
				}
				continue
			}
			o.log.Info("trimmed data past the end of a shrunk volume", "volume", vol.GetName(), "object", id.Index, "from", off)
		}
	}
}

// headHasData reports whether the object's current content (not its checkpoints) has data from off on.
func (o *OSD) headHasData(ctx context.Context, id engine.ObjectID, off int64) (bool, error) {
	ext, err := o.eng.ExtentsView(ctx, id, 0, off, engine.ObjectSize-off)
	if err != nil {
		return false, err
	}
	for _, e := range ext {
		if !e.Hole && !e.Zero {
			return true, nil
		}
	}
	return false, nil
}

// visiblePastEnd reports whether a volume's object shows anything but zeros from off on: data of its own, or,
// for a clone, holes its parent fills.
func (o *OSD) visiblePastEnd(ctx context.Context, vol *basaltv1.Volume, id engine.ObjectID, off int64) (bool, error) {
	if p := vol.GetParent(); p != nil {
		holes, err := o.parentHoles(ctx, p, id, 0, off, engine.ObjectSize-off)
		if err != nil || len(holes) > 0 {
			return len(holes) > 0, err
		}
	}
	return o.headHasData(ctx, id, off)
}
