// Package clustermap keeps the cluster map — the storage nodes with their up/in state, and the pools — in one
// etcd record versioned by epoch. Every change is a compare-and-swap that bumps the epoch, so two writers never
// both succeed on the same base and every reader can tell which map is newer. A leader-elected Controller (run
// by every metad, one leads) derives node state from the registry: a blockd whose lease expired is marked down
// (its PGs' acting sets shrink) in a new epoch; one down longer than the down-out interval is marked out (its
// data is re-placed); a removed node leaves the map. It depends on metad's store, schema, registry, election
// and watch packages and the API types.
package clustermap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/election"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The pool every cluster starts with.
const (
	DefaultPool     = "default"
	DefaultReplicas = 3
	DefaultPGs      = 64
	MaxReplicas     = 5
)

// DefaultDownOut is how long a storage node may be down before its data is re-placed on other nodes. Long
// enough to ride out a reboot (its replicas then only catch up), short enough to restore redundancy the same
// hour.
const DefaultDownOut = 10 * time.Minute

// Init creates the cluster map with the default pool if there is none.
func Init(ctx context.Context, s *store.Store) error {
	m := &basaltv1.ClusterMap{
		Epoch:      1,
		UpdatedAt:  timestamppb.Now(),
		Pools:      []*basaltv1.Pool{{Name: DefaultPool, Id: 1, Replicas: DefaultReplicas, PgCount: DefaultPGs}},
		NextPoolId: 2,
	}
	_, err := s.Create(ctx, schema.ClusterMap, m)
	if err != nil && !errors.Is(err, store.ErrExists) {
		return fmt.Errorf("initialise the cluster map: %w", err)
	}
	return nil
}

// Get reads the current cluster map.
func Get(ctx context.Context, s *store.Store) (*basaltv1.ClusterMap, error) {
	r, err := store.Get[basaltv1.ClusterMap](ctx, s, schema.ClusterMap)
	if err != nil {
		return nil, fmt.Errorf("read the cluster map: %w", err)
	}
	return r.Value, nil
}

// Update applies change to the current map and writes it as a new epoch, retrying on concurrent updates. If
// change leaves the map as it was, nothing is written. It returns the map as written (or as it was).
func Update(ctx context.Context, s *store.Store, change func(m *basaltv1.ClusterMap) error) (*basaltv1.ClusterMap, error) {
	for {
		r, err := store.Get[basaltv1.ClusterMap](ctx, s, schema.ClusterMap)
		if err != nil {
			return nil, fmt.Errorf("read the cluster map: %w", err)
		}
		m := proto.Clone(r.Value).(*basaltv1.ClusterMap)
		if err := change(m); err != nil {
			return nil, err
		}
		if proto.Equal(m, r.Value) {
			return r.Value, nil
		}
		m.Epoch = r.Value.GetEpoch() + 1
		m.UpdatedAt = timestamppb.Now()
		_, err = s.Update(ctx, schema.ClusterMap, m, r.ModRevision)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("write cluster map epoch %d: %w", m.Epoch, err)
		}
		return m, nil
	}
}

// Reconcile brings the map's storage nodes in line with the registered blockd nodes at time now. It is a pure
// function of its inputs so that the rules can be tested without etcd.
func Reconcile(m *basaltv1.ClusterMap, nodes []*basaltv1.NodeStatus, now time.Time, downOut time.Duration) {
	registered := make(map[string]*basaltv1.NodeStatus, len(nodes))
	for _, n := range nodes {
		if n.GetNode().GetKind() == basaltv1.NodeKind_NODE_KIND_BLOCKD {
			registered[n.GetNode().GetId()] = n
		}
	}
	// A node whose registration was removed leaves the map: its PGs are re-placed.
	m.Nodes = slices.DeleteFunc(m.Nodes, func(sn *basaltv1.StorageNode) bool { return registered[sn.GetId()] == nil })
	known := make(map[string]*basaltv1.StorageNode, len(m.Nodes))
	for _, sn := range m.Nodes {
		known[sn.GetId()] = sn
	}
	for id, n := range registered {
		up := n.GetState() == basaltv1.NodeState_NODE_STATE_UP
		sn := known[id]
		if sn == nil {
			// A node joins the map when first seen up: one that never came up holds no data, and adding it
			// down would only churn epochs while it registers.
			if !up {
				continue
			}
			sn = &basaltv1.StorageNode{Id: id, In: true}
			m.Nodes = append(m.Nodes, sn)
		}
		sn.FailureDomain = n.GetNode().GetFailureDomain()
		sn.Address = n.GetNode().GetGrpcAddress()
		switch {
		case up && !sn.GetUp():
			sn.Up, sn.In, sn.DownSince = true, true, nil
		case !up && sn.GetUp():
			sn.Up, sn.DownSince = false, timestamppb.New(now)
		}
		if !sn.GetUp() && sn.GetIn() && now.Sub(sn.GetDownSince().AsTime()) >= downOut {
			sn.In = false
		}
	}
	slices.SortFunc(m.Nodes, func(a, b *basaltv1.StorageNode) int { return strings.Compare(a.GetId(), b.GetId()) })
}

// Controller keeps the cluster map in step with the registry. Run it in every metad; one leads at a time.
type Controller struct {
	Store     *store.Store
	Candidate string
	DownOut   time.Duration
	// ElectionTTL is how long leadership survives a dead leader.
	ElectionTTL time.Duration
	// Resync bounds how long a down-out deadline can go unnoticed without other changes.
	Resync time.Duration
	Log    *slog.Logger
}

// Run campaigns and, while leading, reconciles the map on every registry change; it returns when ctx ends.
func (c *Controller) Run(ctx context.Context) error {
	election.Run(ctx, c.Store.Client, "clustermap", c.Candidate, c.ElectionTTL, c.Log.With("controller", "cluster map"), c.lead)
	return ctx.Err()
}

// lead reconciles whenever a node registers, changes or its liveness comes or goes, and every Resync.
func (c *Controller) lead(ctx context.Context) {
	poke := make(chan struct{}, 1)
	trigger := func() {
		select {
		case poke <- struct{}{}:
		default:
		}
	}
	go watch.Run[basaltv1.Node](ctx, c.Store, schema.NodesPrefix, watch.Handlers[*basaltv1.Node]{
		Sync:   func([]store.Record[*basaltv1.Node], int64) error { trigger(); return nil },
		Put:    func(store.Record[*basaltv1.Node]) error { trigger(); return nil },
		Delete: func(string, int64) error { trigger(); return nil },
	}, c.Log)
	go watch.Run[basaltv1.Liveness](ctx, c.Store, schema.AlivePrefix, watch.Handlers[*basaltv1.Liveness]{
		Sync:   func([]store.Record[*basaltv1.Liveness], int64) error { trigger(); return nil },
		Put:    func(store.Record[*basaltv1.Liveness]) error { trigger(); return nil },
		Delete: func(string, int64) error { trigger(); return nil },
	}, c.Log)
	resync := c.Resync
	if resync == 0 {
		resync = time.Second
	}
	tick := time.NewTicker(resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-poke:
		case <-tick.C:
		}
		if err := c.reconcile(ctx); err != nil && ctx.Err() == nil {
			c.Log.Warn("cluster map controller: reconcile", "err", err)
		}
	}
}

func (c *Controller) reconcile(ctx context.Context) error {
	nodes, err := registry.List(ctx, c.Store, basaltv1.NodeKind_NODE_KIND_BLOCKD, true)
	if err != nil {
		return err
	}
	var before uint64
	m, err := Update(ctx, c.Store, func(m *basaltv1.ClusterMap) error {
		before = m.GetEpoch()
		Reconcile(m, nodes, time.Now(), c.DownOut)
		return nil
	})
	if err != nil {
		return err
	}
	if m.GetEpoch() != before {
		var states []string
		for _, n := range m.GetNodes() {
			states = append(states, fmt.Sprintf("%s:%s", n.GetId(), nodeState(n)))
		}
		c.Log.Info("cluster map changed", "epoch", m.GetEpoch(), "nodes", strings.Join(states, " "))
	}
	return nil
}

func nodeState(n *basaltv1.StorageNode) string {
	switch {
	case n.GetUp():
		return "up"
	case n.GetIn():
		return "down"
	}
	return "out"
}
