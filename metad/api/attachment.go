package api

import (
	"context"
	"errors"
	"slices"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/attach"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// AttachmentServer serves AttachmentService: which host may write a volume, with the generation that fences
// every other (metad/attach, docs/fencing.md). Every change returns once every storage node that is up
// enforces it.
type AttachmentServer struct {
	basaltv1.UnimplementedAttachmentServiceServer
	Client *attach.Client
}

// attachStatus maps metad/attach's errors onto gRPC codes; the message keeps the whole chain.
func attachStatus(err error) error {
	switch {
	case errors.Is(err, attach.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, attach.ErrNotPrepared):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		// The change may be recorded but not yet enforced by every storage node (the message says which).
		return status.Error(codes.Unavailable, err.Error())
	}
	return toStatus(err)
}

// Attach gives the host a new attachment generation of the volume; an exclusive volume's other holders are
// fenced.
func (s *AttachmentServer) Attach(ctx context.Context, r *basaltv1.AttachRequest) (*basaltv1.Attachment, error) {
	a, err := s.Client.Attach(ctx, r.GetVolume(), r.GetHost())
	if err != nil {
		return nil, attachStatus(err)
	}
	return a, nil
}

// Detach drops the host's attachment of the volume, if it has one.
func (s *AttachmentServer) Detach(ctx context.Context, r *basaltv1.DetachRequest) (*basaltv1.DetachResponse, error) {
	if err := s.Client.Detach(ctx, r.GetVolume(), r.GetHost()); err != nil {
		return nil, attachStatus(err)
	}
	return &basaltv1.DetachResponse{}, nil
}

// ListAttachments lists the attachments of one volume, or of every volume, by volume name and then generation.
func (s *AttachmentServer) ListAttachments(ctx context.Context, r *basaltv1.ListAttachmentsRequest) (*basaltv1.ListAttachmentsResponse, error) {
	var vols []*basaltv1.Volume
	if name := r.GetVolume(); name != "" {
		if err := schema.ValidateName("volume", name); err != nil {
			return nil, invalid("%v", err)
		}
		rec, err := store.Get[basaltv1.Volume](ctx, s.Client.Store, schema.VolumeKey(name))
		if errors.Is(err, store.ErrNotFound) {
			return nil, status.Errorf(codes.NotFound, "volume %q does not exist", name)
		}
		if err != nil {
			return nil, toStatus(err)
		}
		vols = append(vols, rec.Value)
	} else {
		recs, _, err := store.List[basaltv1.Volume](ctx, s.Client.Store, schema.VolumesPrefix)
		if err != nil {
			return nil, toStatus(err)
		}
		for _, rec := range recs {
			vols = append(vols, rec.Value)
		}
	}
	out := &basaltv1.ListAttachmentsResponse{}
	for _, v := range vols {
		atts := slices.Clone(v.GetAttachments())
		slices.SortFunc(atts, func(a, b *basaltv1.Attachment) int {
			switch {
			case a.GetGeneration() < b.GetGeneration():
				return -1
			case a.GetGeneration() > b.GetGeneration():
				return 1
			}
			return 0
		})
		out.Attachments = append(out.Attachments, atts...)
	}
	return out, nil
}

// FenceHost takes every attachment away from the host and returns once no storage node admits its writes.
func (s *AttachmentServer) FenceHost(ctx context.Context, r *basaltv1.FenceHostRequest) (*basaltv1.FenceHostResponse, error) {
	vols, rev, err := s.Client.FenceHost(ctx, r.GetHost())
	if err != nil {
		return nil, attachStatus(err)
	}
	return &basaltv1.FenceHostResponse{Volumes: vols, Revision: rev}, nil
}
