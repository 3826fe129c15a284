package api

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// parentInfo is a checkpoint a linked clone is made from, with its volume's record.
type parentInfo struct {
	rec  store.Record[*basaltv1.Volume]
	vol  *basaltv1.Volume
	ckpt *basaltv1.Checkpoint
}

// cloneSource resolves "VOLUME@CHECKPOINT".
func (v *VolumeServer) cloneSource(ctx context.Context, source string) (*parentInfo, error) {
	volName, ckptName, ok := strings.Cut(source, "@")
	if !ok || ckptName == "" {
		return nil, invalid("source %q: a linked clone is made from a checkpoint: VOLUME@CHECKPOINT (take one with 'basalt checkpoint create')", source)
	}
	rec, err := v.get(ctx, volName)
	if err != nil {
		return nil, err
	}
	c := rec.Value.CheckpointNamed(ckptName)
	if c == nil {
		return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", volName, ckptName)
	}
	return &parentInfo{rec: rec, vol: rec.Value, ckpt: c}, nil
}

// clonesOf names the linked clones of a volume (of one of its checkpoints if ckpt is not 0).
func (v *VolumeServer) clonesOf(ctx context.Context, volID uint64, ckpt uint32) ([]string, error) {
	recs, _, err := store.List[basaltv1.Volume](ctx, v.Store, schema.VolumesPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	var out []string
	for _, r := range recs {
		p := r.Value.GetParent()
		if p != nil && p.GetVolumeId() == volID && (ckpt == 0 || p.GetCheckpointId() == ckpt) {
			out = append(out, r.Value.GetName())
		}
	}
	slices.Sort(out)
	return out, nil
}

// storageClient returns a client of some storage node that is up, to carry out a long operation through its
// gateway.
func (v *VolumeServer) storageClient(ctx context.Context) (basaltv1.BlockServiceClient, error) {
	nodes, err := (&CheckpointServer{Store: v.Store}).upNodes(ctx)
	if err != nil {
		return nil, err
	}
	c, err := v.Peers.Client(nodes[time.Now().UnixNano()%int64(len(nodes))])
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "%v", err)
	}
	return c, nil
}

// FlattenVolume copies into a linked clone what it still reads from its parent, online, then detaches it.
// Interrupted, it is simply run again.
func (v *VolumeServer) FlattenVolume(ctx context.Context, r *basaltv1.FlattenVolumeRequest) (*basaltv1.Volume, error) {
	vol, _, err := v.flatten(ctx, r.GetName())
	return vol, err
}

func (v *VolumeServer) flatten(ctx context.Context, name string) (*basaltv1.Volume, uint64, error) {
	rec, err := v.get(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	if rec.Value.GetParent() == nil {
		return rec.Value, 0, nil
	}
	c, err := v.storageClient(ctx)
	if err != nil {
		return nil, 0, err
	}
	resp, err := c.FlattenClone(ctx, &basaltv1.FlattenCloneRequest{Volume: rec.Value.GetId()})
	if err != nil {
		return nil, 0, err
	}
	for {
		vol := rec.Value
		vol.Parent = nil
		vol.Revision = 0
		rev, err := v.Store.Update(ctx, rec.Key, vol, rec.ModRevision)
		if err == nil {
			vol.Revision = rev
			return vol, resp.GetBytesCopied(), nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return nil, 0, toStatus(err)
		}
		if rec, err = v.get(ctx, name); err != nil {
			return nil, 0, err
		}
	}
}

// CopyVolume copies inside the cluster. A new volume from a checkpoint is a linked clone, flattened; from a
// volume's current content, the same from a temporary checkpoint. A range onto an existing volume is streamed
// between storage nodes.
func (v *VolumeServer) CopyVolume(ctx context.Context, r *basaltv1.CopyVolumeRequest) (*basaltv1.CopyVolumeResponse, error) {
	srcName, ckptName, atCheckpoint := strings.Cut(r.GetSource(), "@")
	src, err := v.get(ctx, srcName)
	if err != nil {
		return nil, err
	}
	if r.GetCreate() {
		if r.GetSourceOffset() != 0 || r.GetDestinationOffset() != 0 || r.GetLength() != 0 {
			return nil, invalid("a copy into a new volume copies the whole source: offsets and length are for copies onto an existing volume")
		}
		cs := &CheckpointServer{Store: v.Store, Peers: v.Peers}
		if !atCheckpoint {
			ckptName = "copy-" + newToken()
			if _, err := cs.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: ckptName, Volumes: []string{srcName}}); err != nil {
				return nil, err
			}
			defer func() {
				dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				cs.DeleteCheckpoint(dctx, &basaltv1.DeleteCheckpointRequest{Volume: srcName, Name: ckptName})
			}()
		}
		pool := r.GetPool()
		if pool == "" {
			pool = src.Value.GetPool()
		}
		if _, err := v.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: r.GetDestination(), Source: srcName + "@" + ckptName, Pool: pool, Shared: src.Value.GetShared()}); err != nil {
			return nil, err
		}
		_, n, err := v.flatten(ctx, r.GetDestination())
		if err != nil {
			return nil, status.Errorf(status.Code(err), "volume %q was created as a linked clone but its flattening failed (run 'basalt volume flatten %s'): %s", r.GetDestination(), r.GetDestination(), status.Convert(err).Message())
		}
		return &basaltv1.CopyVolumeResponse{BytesCopied: n}, nil
	}
	dst, err := v.get(ctx, r.GetDestination())
	if err != nil {
		return nil, err
	}
	srcSize := src.Value.GetSizeBytes()
	var view uint32
	if atCheckpoint {
		c := src.Value.CheckpointNamed(ckptName)
		if c == nil {
			return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", srcName, ckptName)
		}
		view, srcSize = c.GetId(), c.GetSizeBytes()
	}
	length := r.GetLength()
	if length == 0 {
		length = srcSize - min(srcSize, r.GetSourceOffset())
	}
	sector := uint64(max(src.Value.GetSectorSize(), dst.Value.GetSectorSize()))
	switch {
	case r.GetSourceOffset()%sector != 0 || r.GetDestinationOffset()%sector != 0 || length%sector != 0:
		return nil, invalid("offsets and length must be multiples of %d bytes", sector)
	case r.GetSourceOffset()+length > srcSize:
		return nil, invalid("the range %d+%d is past the end of %s (%d bytes)", r.GetSourceOffset(), length, r.GetSource(), srcSize)
	case r.GetDestinationOffset()+length > dst.Value.GetSizeBytes():
		return nil, invalid("the range %d+%d is past the end of %s (%d bytes)", r.GetDestinationOffset(), length, r.GetDestination(), dst.Value.GetSizeBytes())
	case src.Value.GetId() == dst.Value.GetId() && !atCheckpoint &&
		r.GetSourceOffset() < r.GetDestinationOffset()+length && r.GetDestinationOffset() < r.GetSourceOffset()+length:
		return nil, invalid("the source and destination ranges overlap")
	}
	c, err := v.storageClient(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := c.CopyRange(ctx, &basaltv1.CopyRangeRequest{
		Source: src.Value.GetId(), SourceView: view, Destination: dst.Value.GetId(),
		SourceOffset: r.GetSourceOffset(), DestinationOffset: r.GetDestinationOffset(), Length: length,
	})
	if err != nil {
		return nil, fmt.Errorf("copy: %w", err)
	}
	return &basaltv1.CopyVolumeResponse{BytesCopied: resp.GetBytesCopied()}, nil
}
