// Package view is a blockd's picture of the cluster: the current cluster map and the volumes (with their
// attachments), kept in step with etcd by watches. Readers get immutable snapshots (never modify what they
// return); writers are the watches alone. Code that routed a request at one epoch can wait here for a newer one,
// and metad's barriers (fencing) wait here for an etcd revision. It depends on metad's store, schema and watch
// packages and the API types.
package view

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
)

// View holds the latest cluster map and volumes.
type View struct {
	mu      sync.RWMutex
	m       *basaltv1.ClusterMap
	byName  map[string]*basaltv1.Volume
	byID    map[uint64]*basaltv1.Volume
	maxID   uint64
	changed chan struct{} // closed and replaced whenever anything changes
	mapSeen bool
	volSeen bool
	ready   chan struct{}

	// mapRev and volRev are the etcd revisions up to which each watch has applied every change: the view is
	// current as of the lower of the two. revChanged is closed and replaced whenever either moves; it is apart
	// from changed so that progress alone does not wake everything that reacts to content.
	mapRev, volRev int64
	revChanged     chan struct{}
	// progress asks etcd to report how far the watches have got (set by Run).
	progress func()
}

// New returns an empty view; Run fills it.
func New() *View {
	return &View{
		m:          &basaltv1.ClusterMap{},
		byName:     map[string]*basaltv1.Volume{},
		byID:       map[uint64]*basaltv1.Volume{},
		changed:    make(chan struct{}),
		ready:      make(chan struct{}),
		revChanged: make(chan struct{}),
	}
}

// Run watches the cluster map and the volumes until ctx ends.
func (v *View) Run(ctx context.Context, s *store.Store, log *slog.Logger) {
	v.mu.Lock()
	v.progress = func() {
		// The caller's context may be an RPC's; the request belongs to the watches, so it uses theirs.
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := watch.RequestProgress(pctx, s); err != nil && ctx.Err() == nil {
			log.Debug("ask etcd for watch progress", "err", err)
		}
	}
	v.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.ClusterMap](ctx, s, schema.ClusterMap, watch.Handlers[*basaltv1.ClusterMap]{
			Sync: func(rs []store.Record[*basaltv1.ClusterMap], rev int64) error {
				for _, r := range rs {
					if r.Key == schema.ClusterMap {
						v.setMap(r.Value, rev)
					}
				}
				v.advance(&v.mapRev, rev)
				return nil
			},
			Put: func(r store.Record[*basaltv1.ClusterMap]) error {
				if r.Key == schema.ClusterMap {
					v.setMap(r.Value, r.ModRevision)
				}
				return nil
			},
			Progress: func(rev int64) error {
				v.advance(&v.mapRev, rev)
				return nil
			},
		}, log)
	}()
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.Volume](ctx, s, schema.VolumesPrefix, watch.Handlers[*basaltv1.Volume]{
			Sync: func(rs []store.Record[*basaltv1.Volume], rev int64) error {
				v.mu.Lock()
				v.byName, v.byID = map[string]*basaltv1.Volume{}, map[uint64]*basaltv1.Volume{}
				for _, r := range rs {
					v.putVolumeLocked(r.Value)
				}
				v.volSeen = true
				v.setRevLocked(&v.volRev, rev)
				v.notifyLocked()
				v.mu.Unlock()
				return nil
			},
			Put: func(r store.Record[*basaltv1.Volume]) error {
				v.mu.Lock()
				if old := v.byName[r.Value.GetName()]; old != nil {
					delete(v.byID, old.GetId())
				}
				v.putVolumeLocked(r.Value)
				v.setRevLocked(&v.volRev, r.ModRevision)
				v.notifyLocked()
				v.mu.Unlock()
				return nil
			},
			Delete: func(key string, rev int64) error {
				v.mu.Lock()
				name := schema.IDFromKey(schema.VolumesPrefix, key)
				if old := v.byName[name]; old != nil {
					delete(v.byID, old.GetId())
					delete(v.byName, name)
				}
				v.setRevLocked(&v.volRev, rev)
				v.notifyLocked()
				v.mu.Unlock()
				return nil
			},
			Progress: func(rev int64) error {
				v.advance(&v.volRev, rev)
				return nil
			},
		}, log)
	}()
	wg.Wait()
}

func (v *View) putVolumeLocked(vol *basaltv1.Volume) {
	v.byName[vol.GetName()] = vol
	v.byID[vol.GetId()] = vol
	v.maxID = max(v.maxID, vol.GetId())
}

func (v *View) setMap(m *basaltv1.ClusterMap, rev int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.setRevLocked(&v.mapRev, rev)
	// Watches deliver in revision order, so epochs only grow; the check guards a resync racing an event.
	if m.GetEpoch() < v.m.GetEpoch() {
		return
	}
	v.m = m
	v.mapSeen = true
	v.notifyLocked()
}

// advance records that one watch has applied everything up to rev.
func (v *View) advance(watchRev *int64, rev int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.setRevLocked(watchRev, rev)
}

// setRevLocked moves one watch's revision forward (a resync lists at a revision, never below what was applied),
// and wakes whoever waits for a revision.
func (v *View) setRevLocked(watchRev *int64, rev int64) {
	if rev <= *watchRev {
		return
	}
	*watchRev = rev
	close(v.revChanged)
	v.revChanged = make(chan struct{})
}

func (v *View) notifyLocked() {
	close(v.changed)
	v.changed = make(chan struct{})
	if v.mapSeen && v.volSeen {
		select {
		case <-v.ready:
		default:
			close(v.ready)
		}
	}
}

// Ready is closed once both the map and the volumes have been read.
func (v *View) Ready() <-chan struct{} { return v.ready }

// Map returns the current cluster map.
func (v *View) Map() *basaltv1.ClusterMap {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.m
}

// Volume returns the named volume, or nil.
func (v *View) Volume(name string) *basaltv1.Volume {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.byName[name]
}

// VolumeByID returns the volume with the given ID, or nil.
func (v *View) VolumeByID(id uint64) *basaltv1.Volume {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.byID[id]
}

// Volumes returns every volume.
func (v *View) Volumes() []*basaltv1.Volume {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]*basaltv1.Volume, 0, len(v.byName))
	for _, vol := range v.byName {
		out = append(out, vol)
	}
	return out
}

// MaxVolumeID is the highest volume ID seen: IDs are never reused, so a volume at or below it that is absent
// was deleted.
func (v *View) MaxVolumeID() uint64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.maxID
}

// WaitEpoch waits until the map is at epoch e or newer and returns it.
func (v *View) WaitEpoch(ctx context.Context, e uint64) (*basaltv1.ClusterMap, error) {
	for {
		v.mu.RLock()
		m, ch := v.m, v.changed
		v.mu.RUnlock()
		if m.GetEpoch() >= e {
			return m, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for cluster map epoch %d (have %d): %w", e, m.GetEpoch(), ctx.Err())
		case <-ch:
		}
	}
}

// Revision is the etcd revision the view is current with: every change to the map and the volumes up to it
// has been applied. 0 until both have been read.
func (v *View) Revision() int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return min(v.mapRev, v.volRev)
}

// progressEvery is how often WaitRevision asks etcd how far the watches have got while it waits: nothing may
// change under the watched keys for a long time, and only etcd can say that nothing did.
const progressEvery = 100 * time.Millisecond

// WaitRevision waits until the view is current with etcd revision rev (or newer) and returns the revision it
// is current with. After it returns, every volume record (and its attachments) written at or before rev is in
// the view.
func (v *View) WaitRevision(ctx context.Context, rev int64) (int64, error) {
	var asked time.Time
	for {
		v.mu.RLock()
		have, ch, progress := min(v.mapRev, v.volRev), v.revChanged, v.progress
		v.mu.RUnlock()
		if have >= rev {
			return have, nil
		}
		if progress != nil && time.Since(asked) >= progressEvery {
			progress()
			asked = time.Now()
		}
		select {
		case <-ch:
		case <-time.After(progressEvery):
		case <-ctx.Done():
			return have, fmt.Errorf("wait for etcd revision %d (the view is at %d): %w", rev, have, ctx.Err())
		}
	}
}

// Changed returns a channel closed at the next change of the map or the volumes.
func (v *View) Changed() <-chan struct{} {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.changed
}
