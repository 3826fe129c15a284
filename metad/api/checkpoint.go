package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/metad/clustermap"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// CheckpointServer serves CheckpointService. A checkpoint is a number in its volume's record: taking one is a
// cut of the volume's writes coordinated with every storage node (see blockd/osd/checkpoint.go for the
// protocol), then O(1) metadata; the data stays where it is, and writes after the cut land in a new layer.
// Deleting one records it as deleted; every blockd merges its layer into the one below.
type CheckpointServer struct {
	basaltv1.UnimplementedCheckpointServiceServer
	Store *store.Store
	Peers *blockrpc.Peers
}

// MaxCheckpointGroup bounds the volumes of one consistency group.
const MaxCheckpointGroup = 64

// checkpointHold is how long storage nodes hold writes for a checkpoint before they find out from etcd what
// became of it; taking one normally takes milliseconds.
const checkpointHold = 3 * time.Second

// CreateCheckpoint checkpoints one or more volumes at one instant.
func (s *CheckpointServer) CreateCheckpoint(ctx context.Context, r *basaltv1.CreateCheckpointRequest) (*basaltv1.CreateCheckpointResponse, error) {
	if err := schema.ValidateName("checkpoint", r.GetName()); err != nil {
		return nil, invalid("%v", err)
	}
	names := r.GetVolumes()
	if len(names) == 0 {
		return nil, invalid("name at least one volume to checkpoint")
	}
	if len(names) > MaxCheckpointGroup {
		return nil, invalid("a consistency group holds at most %d volumes, not %d", MaxCheckpointGroup, len(names))
	}
	seen := map[string]bool{}
	for _, n := range names {
		if seen[n] {
			return nil, invalid("volume %q is named twice", n)
		}
		seen[n] = true
	}
	for attempt := 0; ; attempt++ {
		out, err := s.createCheckpoint(ctx, r.GetName(), names)
		if status.Code(err) != codes.Aborted || attempt == 4 || ctx.Err() != nil {
			return out, err
		}
	}
}

func (s *CheckpointServer) createCheckpoint(ctx context.Context, name string, names []string) (*basaltv1.CreateCheckpointResponse, error) {
	vs := &VolumeServer{Store: s.Store}
	recs := make([]store.Record[*basaltv1.Volume], len(names))
	for i, n := range names {
		rec, err := vs.get(ctx, n)
		if err != nil {
			return nil, err
		}
		vol := rec.Value
		if vol.CheckpointNamed(name) != nil {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already has a checkpoint %q", n, name)
		}
		if p := vol.GetPendingCheckpoint(); p != nil {
			if time.Now().Before(p.GetDeadline().AsTime()) {
				return nil, status.Errorf(codes.Aborted, "checkpoint %q of volume %q is being taken", p.GetName(), n)
			}
			// A stale attempt (its coordinator died): the new record below replaces it, and the compare-and-swap
			// makes its late commit fail.
		}
		recs[i] = rec
	}
	token := newToken()
	deadline := time.Now().Add(checkpointHold)
	refs := make([]*basaltv1.VolumeCheckpointRef, len(recs))
	pending := make([]*basaltv1.Volume, len(recs))
	for i, rec := range recs {
		id := rec.Value.GetCheckpointSeq() + 1
		refs[i] = &basaltv1.VolumeCheckpointRef{Volume: rec.Value.GetId(), Checkpoint: id}
		p := proto.Clone(rec.Value).(*basaltv1.Volume)
		p.Revision = 0
		p.PendingCheckpoint = &basaltv1.PendingCheckpoint{Id: id, Name: name, Token: token, Deadline: timestamppb.New(deadline)}
		pending[i] = p
	}
	revs := make([]int64, len(recs))
	for i := range recs {
		revs[i] = recs[i].ModRevision
	}
	revs, err := s.casAll(ctx, recs, revs, pending)
	if err != nil {
		return nil, err
	}
	nodes, err := s.upNodes(ctx)
	if err != nil {
		s.abort(recs, revs, token, refs, nil)
		return nil, err
	}
	pctx, cancel := context.WithDeadline(ctx, deadline.Add(-checkpointHold/3))
	err = s.fanOut(pctx, nodes, func(ctx context.Context, _ *basaltv1.StorageNode, c basaltv1.BlockServiceClient) error {
		_, err := c.PrepareCheckpoint(ctx, &basaltv1.PrepareCheckpointRequest{Token: token, Checkpoints: refs, HoldMillis: checkpointHold.Milliseconds()})
		return err
	})
	cancel()
	if err != nil {
		s.abort(recs, revs, token, refs, nodes)
		return nil, status.Errorf(codes.Unavailable, "checkpoint %q not taken: %v", name, err)
	}
	now := timestamppb.Now()
	committed := make([]*basaltv1.Volume, len(recs))
	out := &basaltv1.CreateCheckpointResponse{}
	for i := range pending {
		c := proto.Clone(pending[i]).(*basaltv1.Volume)
		ckpt := &basaltv1.Checkpoint{Volume: c.GetName(), Name: name, CreatedAt: now, Id: refs[i].GetCheckpoint(), SizeBytes: c.GetSizeBytes()}
		if len(names) > 1 {
			ckpt.Group = names
		}
		c.CheckpointSeq = refs[i].GetCheckpoint()
		c.Checkpoints = append(c.Checkpoints, ckpt)
		c.PendingCheckpoint = nil
		committed[i] = c
		out.Checkpoints = append(out.Checkpoints, ckpt)
	}
	if _, err := s.casAll(ctx, recs, revs, committed); err != nil {
		// Aborted by a storage node whose hold ran out, or changed meanwhile: nothing was committed.
		s.release(nodes, token, refs, false)
		return nil, err
	}
	// The storage nodes would learn of the commit from their views too; telling them ends the hold sooner.
	s.release(nodes, token, refs, true)
	return out, nil
}

// casAll writes every volume record in one transaction, if none changed since the revisions given, and returns
// their new revisions.
func (s *CheckpointServer) casAll(ctx context.Context, recs []store.Record[*basaltv1.Volume], revs []int64, vals []*basaltv1.Volume) ([]int64, error) {
	var cmps []clientv3.Cmp
	var puts []clientv3.Op
	for i, rec := range recs {
		b, err := proto.Marshal(vals[i])
		if err != nil {
			return nil, status.Errorf(codes.Internal, "encode volume %s: %v", rec.Value.GetName(), err)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(rec.Key), "=", revs[i]))
		puts = append(puts, clientv3.OpPut(rec.Key, string(b)))
	}
	resp, err := s.Store.Client.Txn(ctx).If(cmps...).Then(puts...).Commit()
	if err != nil {
		return nil, toStatus(err)
	}
	if !resp.Succeeded {
		return nil, status.Errorf(codes.Aborted, "a volume changed while its checkpoint was taken")
	}
	out := make([]int64, len(recs))
	for i := range out {
		out[i] = resp.Header.Revision
	}
	return out, nil
}

// abort clears this attempt's pending records and releases the storage nodes' holds.
func (s *CheckpointServer) abort(recs []store.Record[*basaltv1.Volume], revs []int64, token string, refs []*basaltv1.VolumeCheckpointRef, nodes []*basaltv1.StorageNode) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	vals := make([]*basaltv1.Volume, len(recs))
	for i, rec := range recs {
		v := proto.Clone(rec.Value).(*basaltv1.Volume)
		v.Revision = 0
		v.PendingCheckpoint = nil
		vals[i] = v
	}
	// If this fails, the storage nodes clear the records themselves once the deadline passes.
	s.casAll(ctx, recs, revs, vals)
	s.release(nodes, token, refs, false)
}

func (s *CheckpointServer) release(nodes []*basaltv1.StorageNode, token string, refs []*basaltv1.VolumeCheckpointRef, committed bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.fanOut(ctx, nodes, func(ctx context.Context, _ *basaltv1.StorageNode, c basaltv1.BlockServiceClient) error {
		_, err := c.ReleaseCheckpoint(ctx, &basaltv1.ReleaseCheckpointRequest{Token: token, Checkpoints: refs, Committed: committed})
		return err
	})
}

// fanOut calls fn on every node at once and returns their errors joined, each naming its node.
func (s *CheckpointServer) fanOut(ctx context.Context, nodes []*basaltv1.StorageNode, fn func(context.Context, *basaltv1.StorageNode, basaltv1.BlockServiceClient) error) error {
	errs := make(chan error, len(nodes))
	for _, n := range nodes {
		go func() {
			c, err := s.Peers.Client(n)
			if err == nil {
				err = fn(ctx, n, c)
			}
			if err != nil {
				err = fmt.Errorf("%s: %s", n.GetId(), status.Convert(err).Message())
			}
			errs <- err
		}()
	}
	var all []string
	for range nodes {
		if err := <-errs; err != nil {
			all = append(all, err.Error())
		}
	}
	if len(all) > 0 {
		slices.Sort(all)
		return errors.New(strings.Join(all, "; "))
	}
	return nil
}

func newToken() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (s *CheckpointServer) checkpointOf(ctx context.Context, volume, name string) (store.Record[*basaltv1.Volume], *basaltv1.Checkpoint, error) {
	rec, err := (&VolumeServer{Store: s.Store}).get(ctx, volume)
	if err != nil {
		return rec, nil, err
	}
	c := rec.Value.CheckpointNamed(name)
	if c == nil {
		return rec, nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", volume, name)
	}
	return rec, c, nil
}

// ListCheckpoints lists a volume's checkpoints with the bytes each references only itself (what deleting it
// would free) and shares, summed over the storage nodes' primary copies.
func (s *CheckpointServer) ListCheckpoints(ctx context.Context, r *basaltv1.ListCheckpointsRequest) (*basaltv1.ListCheckpointsResponse, error) {
	rec, err := (&VolumeServer{Store: s.Store}).get(ctx, r.GetVolume())
	if err != nil {
		return nil, err
	}
	vol := rec.Value
	out := &basaltv1.ListCheckpointsResponse{}
	if len(vol.GetCheckpoints()) == 0 {
		return out, nil
	}
	var views []uint32
	for _, c := range vol.GetCheckpoints() {
		views = append(views, c.GetId())
	}
	nodes, err := s.upNodes(ctx)
	if err != nil {
		return nil, err
	}
	visible := map[uint32]uint64{}
	exclusive := map[uint32]uint64{}
	answers := make(chan *basaltv1.CheckpointUsageResponse, len(nodes))
	err = s.fanOut(ctx, nodes, func(ctx context.Context, _ *basaltv1.StorageNode, c basaltv1.BlockServiceClient) error {
		resp, err := c.CheckpointUsage(ctx, &basaltv1.CheckpointUsageRequest{Volume: vol.GetId(), Views: views})
		if err == nil {
			answers <- resp
		}
		return err
	})
	close(answers)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "sizes of the checkpoints of %s: %v", vol.GetName(), err)
	}
	for resp := range answers {
		for _, u := range resp.GetUsage() {
			visible[u.GetView()] += u.GetVisibleBytes()
			exclusive[u.GetView()] += u.GetExclusiveBytes()
		}
	}
	for _, c := range vol.GetCheckpoints() {
		c = proto.Clone(c).(*basaltv1.Checkpoint)
		c.ExclusiveBytes = exclusive[c.GetId()]
		c.SharedBytes = visible[c.GetId()] - min(visible[c.GetId()], c.ExclusiveBytes)
		out.Checkpoints = append(out.Checkpoints, c)
	}
	return out, nil
}

// DeleteCheckpoint removes a checkpoint from its volume's record and lists it as deleted; every storage node
// then merges its layer into the layer below, online and at its own pace, durably and idempotently (a node that
// crashes mid-merge repeats it after restart).
func (s *CheckpointServer) DeleteCheckpoint(ctx context.Context, r *basaltv1.DeleteCheckpointRequest) (*basaltv1.DeleteCheckpointResponse, error) {
	for {
		rec, c, err := s.checkpointOf(ctx, r.GetVolume(), r.GetName())
		if err != nil {
			return nil, err
		}
		vol := rec.Value
		clones, err := (&VolumeServer{Store: s.Store}).clonesOf(ctx, vol.GetId(), c.GetId())
		if err != nil {
			return nil, err
		}
		if len(clones) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "checkpoint %q of %q has linked clones (%s); flatten them first (basalt volume flatten NAME) or delete them", r.GetName(), r.GetVolume(), strings.Join(clones, ", "))
		}
		vol.Revision = 0
		vol.Checkpoints = slices.DeleteFunc(vol.Checkpoints, func(x *basaltv1.Checkpoint) bool { return x.GetId() == c.GetId() })
		vol.DeletedCheckpoints = append(vol.DeletedCheckpoints, c.GetId())
		_, err = s.Store.Update(ctx, rec.Key, vol, rec.ModRevision)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, toStatus(err)
		}
		return &basaltv1.DeleteCheckpointResponse{}, nil
	}
}

// upNodes returns the storage nodes that are up in the current cluster map.
func (s *CheckpointServer) upNodes(ctx context.Context) ([]*basaltv1.StorageNode, error) {
	m, err := clustermap.Get(ctx, s.Store)
	if err != nil {
		return nil, toStatus(err)
	}
	var nodes []*basaltv1.StorageNode
	for _, n := range m.GetNodes() {
		if n.GetUp() {
			nodes = append(nodes, n)
		}
	}
	if len(nodes) == 0 {
		return nil, status.Errorf(codes.Unavailable, "no storage node is up")
	}
	return nodes, nil
}

// RevertVolume rolls a detached volume back to a checkpoint: its size becomes the checkpoint's, and what
// changed since the checkpoint is copied back from it by a storage node. Later checkpoints are kept. A revert
// that fails part-way leaves the volume partly reverted; running it again finishes it.
func (s *CheckpointServer) RevertVolume(ctx context.Context, r *basaltv1.RevertVolumeRequest) (*basaltv1.RevertVolumeResponse, error) {
	rec, c, err := s.checkpointOf(ctx, r.GetVolume(), r.GetCheckpoint())
	if err != nil {
		return nil, err
	}
	nodes, err := s.upNodes(ctx)
	if err != nil {
		return nil, err
	}
	var attached []string
	var mu sync.Mutex
	err = s.fanOut(ctx, nodes, func(ctx context.Context, n *basaltv1.StorageNode, bc basaltv1.BlockServiceClient) error {
		resp, err := bc.VolumeOpen(ctx, &basaltv1.VolumeOpenRequest{Volume: rec.Value.GetId()})
		if err == nil && resp.GetOpen() {
			mu.Lock()
			attached = append(attached, n.GetId())
			mu.Unlock()
		}
		return err
	})
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "cannot tell whether volume %q is attached: %v", r.GetVolume(), err)
	}
	if len(attached) > 0 {
		slices.Sort(attached)
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is attached (NBD clients have it open through %s); detach it before reverting", r.GetVolume(), strings.Join(attached, ", "))
	}
	if rec.Value.GetSizeBytes() != c.GetSizeBytes() {
		vol := rec.Value
		vol.Revision = 0
		vol.SizeBytes = c.GetSizeBytes()
		if _, err := s.Store.Update(ctx, rec.Key, vol, rec.ModRevision); err != nil {
			return nil, toStatus(err)
		}
	}
	bc, err := s.Peers.Client(nodes[0])
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "%v", err)
	}
	if _, err := bc.RevertToCheckpoint(ctx, &basaltv1.RevertToCheckpointRequest{Volume: rec.Value.GetId(), Checkpoint: c.GetId()}); err != nil {
		return nil, err
	}
	return &basaltv1.RevertVolumeResponse{}, nil
}

// GetChangedExtents lists what changed in a volume between two checkpoints, asking one storage node, which
// asks the primaries of the volume's objects.
func (s *CheckpointServer) GetChangedExtents(ctx context.Context, r *basaltv1.GetChangedExtentsRequest) (*basaltv1.GetChangedExtentsResponse, error) {
	rec, err := (&VolumeServer{Store: s.Store}).get(ctx, r.GetVolume())
	if err != nil {
		return nil, err
	}
	vol := rec.Value
	var from, to uint32
	end := vol.GetSizeBytes()
	if r.GetFrom() != "" {
		c := vol.CheckpointNamed(r.GetFrom())
		if c == nil {
			return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", vol.GetName(), r.GetFrom())
		}
		from = c.GetId()
	}
	if r.GetTo() != "" {
		c := vol.CheckpointNamed(r.GetTo())
		if c == nil {
			return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", vol.GetName(), r.GetTo())
		}
		to = c.GetId()
		end = c.GetSizeBytes()
		if to <= from {
			return nil, invalid("checkpoint %q is not newer than %q", r.GetTo(), r.GetFrom())
		}
	}
	off, length := r.GetOffset(), r.GetLength()
	if off >= end {
		return &basaltv1.GetChangedExtentsResponse{}, nil
	}
	if length == 0 || off+length > end {
		length = end - off
	}
	nodes, err := s.upNodes(ctx)
	if err != nil {
		return nil, err
	}
	bc, err := s.Peers.Client(nodes[0])
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "%v", err)
	}
	out := &basaltv1.GetChangedExtentsResponse{}
	const window = 1 << 30
	for at := off; at < off+length; at += window {
		n := min(uint64(window), off+length-at)
		resp, err := bc.VolumeChanged(ctx, &basaltv1.VolumeChangedRequest{Volume: vol.GetId(), From: from, To: to, Offset: at, Length: n})
		if err != nil {
			return nil, err
		}
		for _, e := range resp.GetExtents() {
			ce := &basaltv1.ChangedExtent{Offset: uint64(e.GetOffset()), Length: uint64(e.GetLength()), Zero: e.GetZero()}
			if k := len(out.Extents); k > 0 {
				last := out.Extents[k-1]
				if last.Offset+last.Length == ce.Offset && last.Zero == ce.Zero {
					last.Length += ce.Length
					out.ChangedBytes += ce.Length
					continue
				}
			}
			out.Extents = append(out.Extents, ce)
			out.ChangedBytes += ce.Length
		}
	}
	return out, nil
}
