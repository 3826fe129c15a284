// Package view is a blockd's picture of the cluster: the current cluster map and the volumes, kept in step with
// etcd by watches. Readers get immutable snapshots (never modify what they return); writers are the watches
// alone. Code that routed a request at one epoch can wait here for a newer one. It depends on metad's store,
// schema and watch packages and the API types.
package view

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

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
}

// New returns an empty view; Run fills it.
func New() *View {
	return &View{
		m:       &basaltv1.ClusterMap{},
		byName:  map[string]*basaltv1.Volume{},
		byID:    map[uint64]*basaltv1.Volume{},
		changed: make(chan struct{}),
		ready:   make(chan struct{}),
	}
}

// Run watches the cluster map and the volumes until ctx ends.
func (v *View) Run(ctx context.Context, s *store.Store, log *slog.Logger) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.ClusterMap](ctx, s, schema.ClusterMap, watch.Handlers[*basaltv1.ClusterMap]{
			Sync: func(rs []store.Record[*basaltv1.ClusterMap], _ int64) error {
				for _, r := range rs {
					if r.Key == schema.ClusterMap {
						v.setMap(r.Value)
					}
				}
				return nil
			},
			Put: func(r store.Record[*basaltv1.ClusterMap]) error {
				if r.Key == schema.ClusterMap {
					v.setMap(r.Value)
				}
				return nil
			},
		}, log)
	}()
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.Volume](ctx, s, schema.VolumesPrefix, watch.Handlers[*basaltv1.Volume]{
			Sync: func(rs []store.Record[*basaltv1.Volume], _ int64) error {
				v.mu.Lock()
				v.byName, v.byID = map[string]*basaltv1.Volume{}, map[uint64]*basaltv1.Volume{}
				for _, r := range rs {
					v.putVolumeLocked(r.Value)
				}
				v.volSeen = true
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
				v.notifyLocked()
				v.mu.Unlock()
				return nil
			},
			Delete: func(key string, _ int64) error {
				v.mu.Lock()
				name := schema.IDFromKey(schema.VolumesPrefix, key)
				if old := v.byName[name]; old != nil {
					delete(v.byID, old.GetId())
					delete(v.byName, name)
				}
				v.notifyLocked()
				v.mu.Unlock()
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

func (v *View) setMap(m *basaltv1.ClusterMap) {
	v.mu.Lock()
	defer v.mu.Unlock()
	// Watches deliver in revision order, so epochs only grow; the check guards a resync racing an event.
	if m.GetEpoch() < v.m.GetEpoch() {
		return
	}
	v.m = m
	v.mapSeen = true
	v.notifyLocked()
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

// Changed returns a channel closed at the next change of the map or the volumes.
func (v *View) Changed() <-chan struct{} {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.changed
}
