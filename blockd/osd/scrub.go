package osd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/internal/placement"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// readRepair is called by the primary when its own copy of an object fails a checksum on read: it takes the
// object from a member holding the same version, rewrites it locally, and reports whether it succeeded. The
// caller holds no lock on the object.
func (o *OSD) readRepair(ctx context.Context, r Route, id engine.ObjectID) error {
	defer o.lock(id)()
	return o.repairLocalLocked(ctx, r, id)
}

// repairLocalLocked replaces this node's corrupt copy of an object with a member's copy of the same version.
func (o *OSD) repairLocalLocked(ctx context.Context, r Route, id engine.ObjectID) error {
	want := o.eng.ObjectVersion(id)
	var tried []string
	for _, member := range r.Acting[1:] {
		c, err := o.peers.Client(member)
		if err != nil {
			tried = append(tried, err.Error())
			continue
		}
		resp, err := c.ReadObject(ctx, &basaltv1.ReadObjectRequest{Epoch: r.Map.GetEpoch(), Object: &basaltv1.ObjectRef{Volume: id.Volume, Index: id.Index}})
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", member.GetId(), err))
			continue
		}
		if resp.GetVersion() != want {
			tried = append(tried, fmt.Sprintf("%s holds version %d, not %d", member.GetId(), resp.GetVersion(), want))
			continue
		}
		if err := o.replaceObject(ctx, id, want, resp.GetLayers()); err != nil {
			return err
		}
		o.log.Warn("repaired a corrupt copy from a member", "object", fmt.Sprintf("%d.%d", id.Volume, id.Index), "from", member.GetId(), "version", want)
		return nil
	}
	return status.Errorf(codes.DataLoss, "object %d.%d is corrupt here and no member has a good copy of version %d (%v)", id.Volume, id.Index, want, tried)
}

// Scrub verifies the PGs this node is primary of, for one volume or all.
func (o *OSD) Scrub(ctx context.Context, req *basaltv1.ScrubRequest) (*basaltv1.ScrubResponse, error) {
	res := &basaltv1.ScrubResponse{}
	m := o.view.Map()
	for _, pool := range m.GetPools() {
		if req.GetVolume() != 0 {
			vol := o.view.VolumeByID(req.GetVolume())
			if vol == nil {
				return nil, status.Errorf(codes.NotFound, "volume %d does not exist", req.GetVolume())
			}
			if vol.GetPool() != pool.GetName() {
				continue
			}
		}
		for num := range pool.GetPgCount() {
			pg := placement.PG{Pool: pool.GetId(), Num: num}
			acting := placement.ActingSet(m, pool, pg)
			if len(acting) == 0 || acting[0].GetId() != o.id {
				continue
			}
			if err := o.scrubPG(ctx, Route{Map: m, Pool: pool, PG: pg, Acting: acting}, req.GetVolume(), res); err != nil {
				return res, err
			}
			res.Pgs++
		}
	}
	return res, nil
}

// scrubPG checks every object of one PG on every member against the primary's copy.
func (o *OSD) scrubPG(ctx context.Context, r Route, volume uint64, res *basaltv1.ScrubResponse) error {
	if _, err := o.peered(ctx, r); err != nil {
		return err
	}
	type copyInfo struct {
		version uint64
		sum     []byte
		corrupt bool
	}
	members := map[string]map[engine.ObjectID]copyInfo{}
	for _, member := range r.Acting[1:] {
		c, err := o.peers.Client(member)
		if err != nil {
			return err
		}
		resp, err := c.PGObjects(ctx, &basaltv1.PGObjectsRequest{Epoch: r.Map.GetEpoch(), Pool: r.PG.Pool, Pg: r.PG.Num, Checksums: true})
		if err != nil {
			return fmt.Errorf("list PG %d.%d on %s: %w", r.PG.Pool, r.PG.Num, member.GetId(), err)
		}
		copies := map[engine.ObjectID]copyInfo{}
		for _, ov := range resp.GetObjects() {
			id := engine.ObjectID{Volume: ov.GetObject().GetVolume(), Index: ov.GetObject().GetIndex()}
			copies[id] = copyInfo{version: ov.GetVersion(), sum: ov.GetChecksum(), corrupt: ov.GetCorrupt()}
		}
		members[member.GetId()] = copies
	}
	for id := range o.localObjects(r.PG) {
		if volume != 0 && id.Volume != volume {
			continue
		}
		res.Objects++
		if err := o.scrubObject(ctx, r, id, func(member string) (uint64, []byte, bool, bool) {
			ci, ok := members[member][id]
			return ci.version, ci.sum, ci.corrupt, ok
		}, res); err != nil {
			return err
		}
		if err := o.limiter.wait(ctx, engine.ObjectSize); err != nil {
			return err
		}
	}
	return nil
}

// scrubObject verifies the primary's copy (repairing it from a member if corrupt) and pushes it over any
// member copy of the same version that is corrupt or different.
func (o *OSD) scrubObject(ctx context.Context, r Route, id engine.ObjectID, member func(string) (version uint64, sum []byte, corrupt, ok bool), res *basaltv1.ScrubResponse) error {
	defer o.lock(id)()
	mine, err := o.eng.ObjectChecksum(ctx, id)
	if errors.Is(err, engine.ErrCorrupt) {
		res.Corrupt++
		if rerr := o.repairLocalLocked(ctx, r, id); rerr != nil {
			o.log.Error("unrepairable object", "object", fmt.Sprintf("%d.%d", id.Volume, id.Index), "err", rerr)
			res.Unrepaired++
			return nil
		}
		res.Repaired++
		mine, err = o.eng.ObjectChecksum(ctx, id)
	}
	if err != nil {
		return o.engineStatus("checksum", err)
	}
	version := o.eng.ObjectVersion(id)
	for _, m := range r.Acting[1:] {
		v, sum, corrupt, ok := member(m.GetId())
		if !ok || v != version {
			continue // missing or older copies are recovery's business, not scrub's
		}
		switch {
		case corrupt:
			res.Corrupt++
		case !bytes.Equal(sum, mine[:]):
			res.Mismatched++
		default:
			continue
		}
		if err := o.push(ctx, r.Map.GetEpoch(), m, id, true); err != nil {
			o.log.Error("repair member copy", "object", fmt.Sprintf("%d.%d", id.Volume, id.Index), "member", m.GetId(), "err", err)
			res.Unrepaired++
			continue
		}
		o.log.Warn("repaired a member's bad copy", "object", fmt.Sprintf("%d.%d", id.Volume, id.Index), "member", m.GetId(), "version", version)
		res.Repaired++
	}
	return nil
}

// RunScrubber scrubs every PG this node is primary of every interval (0: never), until ctx ends.
func (o *OSD) RunScrubber(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		res, err := o.Scrub(ctx, &basaltv1.ScrubRequest{})
		if err != nil && ctx.Err() == nil {
			o.log.Warn("background scrub", "err", err)
			continue
		}
		o.log.Info("background scrub done", "pgs", res.GetPgs(), "objects", res.GetObjects(), "corrupt", res.GetCorrupt(),
			"mismatched", res.GetMismatched(), "repaired", res.GetRepaired(), "unrepaired", res.GetUnrepaired(), "took", time.Since(start).Round(time.Millisecond))
	}
}
