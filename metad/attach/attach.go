// Package attach records which hosts a volume is attached to, each with a generation, and makes the storage
// nodes enforce it: an exclusive volume accepts writes only from sessions opened with its current attachment's
// generation, so a host that lost its attachment (taken over, fenced, migrated away) can never write it again
// (docs/fencing.md). Attachments live inside the volume's record, so every blockd's watch of the volumes carries
// them; every change here is a compare-and-swap on that record, and is followed by a barrier that returns once
// every storage node that is up has seen it. metad's AttachmentService and computed (a VM's start, a migration's
// prepare and switchover, HA's fence) call this package; like every daemon they reach etcd and the blockds
// directly. It depends on metad's store and schema packages, internal/blockrpc and the API types.
package attach

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var (
	// ErrInvalid is returned (wrapped) for a malformed request: a bad volume or host name.
	ErrInvalid = errors.New("invalid request")
	// ErrNotPrepared is returned (wrapped) by Switchover for a volume with no attachment of the host.
	ErrNotPrepared = errors.New("no attachment prepared")
)

// An unknown volume is reported wrapping store.ErrNotFound, naming the volume.

// Client changes attachments. Its zero value is not usable: Store is required, Peers is needed to reach
// storage nodes for the barrier, Log may be nil.
type Client struct {
	Store *store.Store
	Peers *blockrpc.Peers
	Log   *slog.Logger
}

func (c *Client) log() *slog.Logger {
	if c.Log == nil {
		return slog.Default()
	}
	return c.Log
}

func validate(volume, host string) error {
	if err := schema.ValidateName("volume", volume); err != nil {
		return fmt.Errorf("%v: %w", err, ErrInvalid)
	}
	if err := schema.ValidateName("host", host); err != nil {
		return fmt.Errorf("%v: %w", err, ErrInvalid)
	}
	return nil
}

// without returns the attachments not of host.
func without(atts []*basaltv1.Attachment, host string) []*basaltv1.Attachment {
	return slices.DeleteFunc(slices.Clone(atts), func(a *basaltv1.Attachment) bool { return a.GetHost() == host })
}

func attachedTo(vol *basaltv1.Volume, host string) *basaltv1.Attachment {
	for _, a := range vol.GetAttachments() {
		if a.GetHost() == host {
			return a
		}
	}
	return nil
}

// Attach makes host an attachment of volume with a new generation and returns it. Exclusive volume: the new
// attachment replaces every other one (a takeover: the old holder's sessions are fenced). Shared: it replaces
// host's own entry and keeps the others. Every call issues a new generation (a host that attaches again fences
// its own older sessions). It returns once every storage node that is up enforces it.
func (c *Client) Attach(ctx context.Context, volume, host string) (*basaltv1.Attachment, error) {
	if err := validate(volume, host); err != nil {
		return nil, err
	}
	var att *basaltv1.Attachment
	var replaced []string
	rev, _, err := c.update(ctx, []string{volume}, false, func(vol *basaltv1.Volume) (bool, error) {
		replaced = nil
		att = newAttachment(vol, host, false)
		keep := without(vol.GetAttachments(), host)
		if !vol.GetShared() {
			for _, a := range keep {
				replaced = append(replaced, fmt.Sprintf("%s (generation %d)", a.GetHost(), a.GetGeneration()))
			}
			keep = nil
		}
		vol.Attachments = append(keep, att)
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("attach volume %s to %s: %w", volume, host, err)
	}
	if len(replaced) > 0 {
		c.log().Warn("volume taken over: the previous holder's sessions are fenced", "volume", volume, "host", host, "generation", att.GetGeneration(), "previous", replaced)
	} else {
		c.log().Info("volume attached", "volume", volume, "host", host, "generation", att.GetGeneration())
	}
	if err := c.Barrier(ctx, rev); err != nil {
		return nil, fmt.Errorf("attach volume %s to %s: recorded at generation %d, but not yet enforced: %w", volume, host, att.GetGeneration(), err)
	}
	return att, nil
}

// newAttachment issues the volume's next generation to host.
func newAttachment(vol *basaltv1.Volume, host string, incoming bool) *basaltv1.Attachment {
	vol.AttachGeneration++
	return &basaltv1.Attachment{
		Volume: vol.GetName(), Host: host, Generation: vol.GetAttachGeneration(), Exclusive: !vol.GetShared(),
		AttachedAt: timestamppb.Now(), Incoming: incoming,
	}
}

// PrepareIncoming adds an attachment for a live migration's destination host with a new generation, keeping
// the source's. incoming=true: it accepts no writes until Switchover. incoming=false (drivers that cannot pause
// before the switchover): it accepts writes at once, alongside the source's, until Switchover drops the
// source's. A host's earlier entry (a retried prepare) is replaced.
func (c *Client) PrepareIncoming(ctx context.Context, volume, host string, incoming bool) (*basaltv1.Attachment, error) {
	if err := validate(volume, host); err != nil {
		return nil, err
	}
	var att *basaltv1.Attachment
	rev, _, err := c.update(ctx, []string{volume}, false, func(vol *basaltv1.Volume) (bool, error) {
		att = newAttachment(vol, host, incoming)
		vol.Attachments = append(without(vol.GetAttachments(), host), att)
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("prepare volume %s for a migration to %s: %w", volume, host, err)
	}
	c.log().Info("volume prepared for an incoming migration", "volume", volume, "host", host, "generation", att.GetGeneration(), "incoming", incoming)
	if err := c.Barrier(ctx, rev); err != nil {
		return nil, fmt.Errorf("prepare volume %s for a migration to %s: recorded at generation %d, but not yet enforced: %w", volume, host, att.GetGeneration(), err)
	}
	return att, nil
}

// Switchover makes host's prepared attachment of each volume the volume's only one: it clears incoming and, for
// an exclusive volume, drops every other attachment (the source's sessions are fenced from then on), in one
// etcd transaction over all the volumes, so that a VM's disks switch together. Then it waits for the barrier.
// Calling it again after it succeeded changes nothing and succeeds.
func (c *Client) Switchover(ctx context.Context, volumes []string, host string) error {
	names := slices.Clone(volumes)
	slices.Sort(names)
	names = slices.Compact(names)
	for _, v := range names {
		if err := validate(v, host); err != nil {
			return err
		}
	}
	if len(names) == 0 {
		return nil
	}
	rev, changed, err := c.update(ctx, names, false, func(vol *basaltv1.Volume) (bool, error) {
		mine := attachedTo(vol, host)
		if mine == nil {
			return false, fmt.Errorf("volume %q has no attachment for host %s (prepare the migration first): %w", vol.GetName(), host, ErrNotPrepared)
		}
		changed := false
		if mine.GetIncoming() {
			mine.Incoming = false
			changed = true
		}
		if !vol.GetShared() && len(vol.GetAttachments()) > 1 {
			vol.Attachments = []*basaltv1.Attachment{mine}
			changed = true
		}
		return changed, nil
	})
	if err != nil {
		return fmt.Errorf("switch volumes %v over to %s: %w", names, host, err)
	}
	if len(changed) > 0 {
		c.log().Info("volumes switched over", "host", host, "volumes", changed, "revision", rev)
	}
	if err := c.Barrier(ctx, rev); err != nil {
		return fmt.Errorf("switch volumes %v over to %s: recorded, but not yet enforced: %w", names, host, err)
	}
	return nil
}

// Detach drops host's attachment (incoming or not) of volume; it does nothing if there is none. The generation
// is not bumped: the dropped generation is refused from then on all the same, since it is no attachment's.
func (c *Client) Detach(ctx context.Context, volume, host string) error {
	if err := validate(volume, host); err != nil {
		return err
	}
	rev, changed, err := c.update(ctx, []string{volume}, false, func(vol *basaltv1.Volume) (bool, error) {
		keep := without(vol.GetAttachments(), host)
		if len(keep) == len(vol.GetAttachments()) {
			return false, nil
		}
		vol.Attachments = keep
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("detach volume %s from %s: %w", volume, host, err)
	}
	if len(changed) > 0 {
		c.log().Info("volume detached", "volume", volume, "host", host)
	}
	if err := c.Barrier(ctx, rev); err != nil {
		return fmt.Errorf("detach volume %s from %s: recorded, but not yet enforced: %w", volume, host, err)
	}
	return nil
}

// fenceBatch bounds the volumes FenceHost changes in one transaction, under etcd's default limit of 128
// operations per transaction.
const fenceBatch = 64

// FenceHost takes every attachment of host away: for each volume attached to it, the generation is bumped and
// host's attachments dropped (all of an exclusive volume's: after a fence nobody holds it until the next
// attach), in transactions of up to fenceBatch volumes. Then it waits for the barrier, so that when it returns
// no storage node admits a write from any of host's sessions. It returns the volumes fenced and the etcd
// revision every storage node that is up confirmed.
func (c *Client) FenceHost(ctx context.Context, host string) ([]string, int64, error) {
	if err := schema.ValidateName("host", host); err != nil {
		return nil, 0, fmt.Errorf("%v: %w", err, ErrInvalid)
	}
	recs, rev, err := store.List[basaltv1.Volume](ctx, c.Store, schema.VolumesPrefix)
	if err != nil {
		return nil, 0, fmt.Errorf("fence host %s: %w", host, err)
	}
	var names []string
	for _, r := range recs {
		if attachedTo(r.Value, host) != nil {
			names = append(names, r.Value.GetName())
		}
	}
	var fenced []string
	for len(names) > 0 {
		batch := names[:min(fenceBatch, len(names))]
		names = names[len(batch):]
		brev, changed, err := c.update(ctx, batch, true, func(vol *basaltv1.Volume) (bool, error) {
			if attachedTo(vol, host) == nil {
				return false, nil // detached meanwhile
			}
			vol.AttachGeneration++
			if vol.GetShared() {
				vol.Attachments = without(vol.GetAttachments(), host)
			} else {
				vol.Attachments = nil
			}
			return true, nil
		})
		if err != nil {
			return fenced, 0, fmt.Errorf("fence host %s (fenced so far: %v): %w", host, fenced, err)
		}
		fenced = append(fenced, changed...)
		rev = max(rev, brev)
	}
	c.log().Warn("host fenced: it can no longer write its volumes", "host", host, "volumes", fenced, "revision", rev)
	if err := c.Barrier(ctx, rev); err != nil {
		return fenced, 0, fmt.Errorf("fence host %s: volumes %v recorded as fenced, but not yet enforced: %w", host, fenced, err)
	}
	return fenced, rev, nil
}

// checkpointWaitSlack is how long past a pending checkpoint's deadline an update keeps waiting for it to be
// committed or aborted before going ahead anyway (its holds are resolved by the storage nodes by then).
const checkpointWaitSlack = 500 * time.Millisecond

// update reads the records of the named volumes at one revision, applies edit to each (it changes the record
// in place and says whether it did) and writes back those changed in one transaction, compare-and-swap on every
// record read, so that a concurrent writer of any of them (a checkpoint, a resize, a clone) is never
// overwritten: the loser reads again and decides again. While a checkpoint of one of the volumes is being
// taken it waits (milliseconds, bounded by the checkpoint's deadline): changing the record then would make the
// checkpoint's commit fail. With skipMissing a volume that does not exist is left out, else it is an error.
//
// It returns the revision at which the result holds (the transaction's; if nothing needed changing, the newest
// revision among the records) and the names of the volumes changed. edit may run several times.
func (c *Client) update(ctx context.Context, names []string, skipMissing bool, edit func(vol *basaltv1.Volume) (bool, error)) (int64, []string, error) {
	gets := make([]clientv3.Op, len(names))
	for i, n := range names {
		gets[i] = clientv3.OpGet(schema.VolumeKey(n))
	}
	for {
		resp, err := c.Store.Client.Txn(ctx).Then(gets...).Commit()
		if err != nil {
			return 0, nil, fmt.Errorf("read volumes %v: %w", names, err)
		}
		// Every record is read (and checked for a checkpoint being taken) before any is edited, so that the
		// error for a request naming a missing volume does not depend on the order of the names.
		recs := make([]*store.Record[*basaltv1.Volume], len(names))
		var waitFor *store.Record[*basaltv1.Volume]
		for i, r := range resp.Responses {
			kvs := r.GetResponseRange().GetKvs()
			if len(kvs) == 0 {
				if skipMissing {
					continue
				}
				return 0, nil, fmt.Errorf("volume %q does not exist: %w", names[i], store.ErrNotFound)
			}
			rec, err := store.Decode[basaltv1.Volume](schema.VolumeKey(names[i]), kvs[0].Value, kvs[0].ModRevision, kvs[0].CreateRevision, kvs[0].Lease)
			if err != nil {
				return 0, nil, err
			}
			if p := rec.Value.GetPendingCheckpoint(); p != nil && time.Now().Before(p.GetDeadline().AsTime().Add(checkpointWaitSlack)) {
				waitFor = &rec
			}
			recs[i] = &rec
		}
		if waitFor != nil {
			if err := c.waitCheckpoint(ctx, *waitFor); err != nil {
				return 0, nil, err
			}
			continue
		}
		var (
			cmps    []clientv3.Cmp
			puts    []clientv3.Op
			changed []string
			rev     int64
		)
		for i, rec := range recs {
			if rec == nil {
				continue
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(rec.Key), "=", rec.ModRevision))
			rev = max(rev, rec.ModRevision)
			ok, err := edit(rec.Value)
			if err != nil {
				return 0, nil, err
			}
			if !ok {
				continue
			}
			rec.Value.Revision = 0 // the record's revision is etcd's, never stored
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(rec.Value)
			if err != nil {
				return 0, nil, fmt.Errorf("encode volume %s: %w", names[i], err)
			}
			puts = append(puts, clientv3.OpPut(rec.Key, string(b)))
			changed = append(changed, names[i])
		}
		if len(puts) == 0 {
			return rev, nil, nil
		}
		tr, err := c.Store.Client.Txn(ctx).If(cmps...).Then(puts...).Commit()
		if err != nil {
			return 0, nil, fmt.Errorf("write volumes %v: %w", changed, err)
		}
		if tr.Succeeded {
			return tr.Header.GetRevision(), changed, nil
		}
		// Another writer changed one of the records since it was read: read them again.
	}
}

// waitCheckpoint waits until a volume record with a checkpoint being taken changes (committed or aborted), or
// the checkpoint's deadline (and some slack) passes.
func (c *Client) waitCheckpoint(ctx context.Context, rec store.Record[*basaltv1.Volume]) error {
	p := rec.Value.GetPendingCheckpoint()
	wctx, cancel := context.WithDeadline(ctx, p.GetDeadline().AsTime().Add(checkpointWaitSlack))
	defer cancel()
	for resp := range c.Store.Client.Watch(clientv3.WithRequireLeader(wctx), rec.Key, clientv3.WithRev(rec.ModRevision+1)) {
		if resp.Err() != nil || len(resp.Events) > 0 {
			break // read again either way
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("wait for checkpoint %q of volume %s to be taken: %w", p.GetName(), rec.Value.GetName(), ctx.Err())
	}
	return nil
}
