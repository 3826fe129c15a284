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
	first := from / engine.ObjectSize
	for _, id := range o.eng.Objects(volume) {
		switch {
		case id.Index > first:
			return true, nil
		case id.Index == first:
			off := int64(from % engine.ObjectSize)
			ext, err := o.eng.Extents(ctx, id, off, engine.ObjectSize-off)
			if err != nil {
				return false, err
			}
			for _, e := range ext {
				if !e.Hole {
					return true, nil
				}
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
		for _, id := range o.eng.Objects(vol.GetId()) {
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
			_, err := o.ClientOp(ctx, &basaltv1.ClientOpRequest{
				Epoch: m.GetEpoch(), Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index},
				Op: basaltv1.BlockOp_BLOCK_OP_TRIM, Offset: off, Length: engine.ObjectSize - off,
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
