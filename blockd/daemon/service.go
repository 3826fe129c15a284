package daemon

import (
	"context"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/gateway"
	"github.com/basalt-hv/basalt/blockd/osd"
	"github.com/basalt-hv/basalt/blockd/view"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// blockService is the node's BlockService: the OSD's calls, plus those answered through this node's gateway
// (which depends on the OSD, so the OSD cannot serve them itself) or its view.
type blockService struct {
	*osd.OSD
	gw   *gateway.Gateway
	view *view.View
}

// SyncView answers once this node's view is current with etcd revision `revision` and every write it admitted
// under an older view has finished: from then on, this node admits no write the volume records at that
// revision refuse (metad's barrier after an attach or a fence).
func (b *blockService) SyncView(ctx context.Context, req *basaltv1.SyncViewRequest) (*basaltv1.SyncViewResponse, error) {
	rev, err := b.view.WaitRevision(ctx, req.GetRevision())
	if err != nil {
		return nil, status.Errorf(codes.DeadlineExceeded, "%s: %v", b.ID(), err)
	}
	if err := b.DrainWrites(ctx); err != nil {
		return nil, status.Errorf(codes.DeadlineExceeded, "%s: %v", b.ID(), err)
	}
	return &basaltv1.SyncViewResponse{Revision: rev}, nil
}

// changedWindow bounds how much of a volume one VolumeChanged call examines, and so the object operations it
// runs at once.
const changedWindow = 1 << 30

// VolumeChanged lists the ranges of a volume changed between two checkpoints.
func (b *blockService) VolumeChanged(ctx context.Context, req *basaltv1.VolumeChangedRequest) (*basaltv1.VolumeChangedResponse, error) {
	if req.GetLength() > changedWindow {
		return nil, status.Errorf(codes.InvalidArgument, "ask for at most %d bytes at a time, not %d", changedWindow, req.GetLength())
	}
	ext, err := b.gw.Changed(ctx, req.GetVolume(), req.GetFrom(), req.GetTo(), int64(req.GetOffset()), int64(req.GetLength()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "changed extents of volume %d: %v", req.GetVolume(), err)
	}
	return &basaltv1.VolumeChangedResponse{Extents: ext}, nil
}

// VolumeOpen reports whether an NBD client of this node has the volume open.
func (b *blockService) VolumeOpen(_ context.Context, req *basaltv1.VolumeOpenRequest) (*basaltv1.VolumeOpenResponse, error) {
	return &basaltv1.VolumeOpenResponse{Open: b.gw.VolumeOpen(req.GetVolume())}, nil
}

// RevertToCheckpoint copies back, through this node's gateway, what changed in a volume since a checkpoint.
func (b *blockService) RevertToCheckpoint(ctx context.Context, req *basaltv1.RevertToCheckpointRequest) (*basaltv1.RevertToCheckpointResponse, error) {
	n, err := b.gw.Revert(ctx, req.GetVolume(), req.GetCheckpoint())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "revert volume %d to checkpoint %d: %v", req.GetVolume(), req.GetCheckpoint(), err)
	}
	return &basaltv1.RevertToCheckpointResponse{BytesCopied: uint64(n)}, nil
}

// FlattenClone copies into a linked clone, through this node's gateway, what it still reads from its parent.
func (b *blockService) FlattenClone(ctx context.Context, req *basaltv1.FlattenCloneRequest) (*basaltv1.FlattenCloneResponse, error) {
	n, err := b.gw.Flatten(ctx, req.GetVolume())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "flatten volume %d: %v", req.GetVolume(), err)
	}
	return &basaltv1.FlattenCloneResponse{BytesCopied: uint64(n)}, nil
}

// CopyRange copies a range between volumes through this node's gateway.
func (b *blockService) CopyRange(ctx context.Context, req *basaltv1.CopyRangeRequest) (*basaltv1.CopyRangeResponse, error) {
	n, err := b.gw.CopyRange(ctx, req.GetSource(), req.GetSourceView(), req.GetDestination(),
		int64(req.GetSourceOffset()), int64(req.GetDestinationOffset()), int64(req.GetLength()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "copy: %v", err)
	}
	return &basaltv1.CopyRangeResponse{BytesCopied: uint64(n)}, nil
}
