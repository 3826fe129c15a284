package clustermap_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/placement"
	"github.com/basalt-hv/basalt/metad/clustermap"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
)

func status(id string, up bool) *basaltv1.NodeStatus {
	st := basaltv1.NodeState_NODE_STATE_DOWN
	if up {
		st = basaltv1.NodeState_NODE_STATE_UP
	}
	return &basaltv1.NodeStatus{Node: &basaltv1.Node{Id: id, Kind: basaltv1.NodeKind_NODE_KIND_BLOCKD, FailureDomain: id, GrpcAddress: id + ":1"}, State: st}
}

func TestReconcileRules(t *testing.T) {
	m := &basaltv1.ClusterMap{}
	t0 := time.Unix(1000, 0)
	others := &basaltv1.NodeStatus{Node: &basaltv1.Node{Id: "netd-1", Kind: basaltv1.NodeKind_NODE_KIND_NETD}, State: basaltv1.NodeState_NODE_STATE_UP}
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("b", true), status("a", true), status("c", false), others}, t0, time.Minute)
	if len(m.Nodes) != 2 || m.Nodes[0].GetId() != "a" || !m.Nodes[0].GetUp() || !m.Nodes[0].GetIn() {
		t.Fatalf("after first reconcile (c registered but never up must stay out of the map): %v", m.Nodes)
	}
	// b goes down: still in, down since t0+1s.
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("a", true), status("b", false)}, t0.Add(time.Second), time.Minute)
	b := placement.Node(m, "b")
	if b.GetUp() || !b.GetIn() || !b.GetDownSince().AsTime().Equal(t0.Add(time.Second)) {
		t.Fatalf("b after going down: %v", b)
	}
	// Still down, not yet past the down-out interval: unchanged (down_since kept).
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("a", true), status("b", false)}, t0.Add(30*time.Second), time.Minute)
	if !placement.Node(m, "b").GetIn() || !placement.Node(m, "b").GetDownSince().AsTime().Equal(t0.Add(time.Second)) {
		t.Fatalf("b marked out too early: %v", placement.Node(m, "b"))
	}
	// Past the interval: out.
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("a", true), status("b", false)}, t0.Add(62*time.Second), time.Minute)
	if placement.Node(m, "b").GetIn() {
		t.Fatal("b not marked out after the down-out interval")
	}
	// b returns: up and in again.
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("a", true), status("b", true)}, t0.Add(70*time.Second), time.Minute)
	if b := placement.Node(m, "b"); !b.GetUp() || !b.GetIn() || b.GetDownSince() != nil {
		t.Fatalf("b after returning: %v", b)
	}
	// a's registration is removed: a leaves the map.
	clustermap.Reconcile(m, []*basaltv1.NodeStatus{status("b", true)}, t0.Add(80*time.Second), time.Minute)
	if len(m.Nodes) != 1 || m.Nodes[0].GetId() != "b" {
		t.Fatalf("after removing a: %v", m.Nodes)
	}
}

func TestUpdateBumpsEpochOnlyOnChange(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatalf("second Init: %v", err)
	}
	m, _ := clustermap.Get(ctx, s)
	if m.GetEpoch() != 1 || placement.Pool(m, "default").GetReplicas() != 3 {
		t.Fatalf("initial map: %v", m)
	}
	same, err := clustermap.Update(ctx, s, func(*basaltv1.ClusterMap) error { return nil })
	if err != nil || same.GetEpoch() != 1 {
		t.Fatalf("no-op Update: epoch %d, %v", same.GetEpoch(), err)
	}
	// Concurrent updates all land, each in its own epoch.
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			_, err := clustermap.Update(ctx, s, func(m *basaltv1.ClusterMap) error {
				m.Nodes = append(m.Nodes, &basaltv1.StorageNode{Id: string(rune('a' + i))})
				return nil
			})
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	m, _ = clustermap.Get(ctx, s)
	if m.GetEpoch() != 9 || len(m.GetNodes()) != 8 {
		t.Fatalf("after 8 concurrent updates: epoch %d, %d nodes; want 9 and 8", m.GetEpoch(), len(m.GetNodes()))
	}
}

func TestControllerFollowsTheRegistry(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	ctl := &clustermap.Controller{Store: s, Candidate: "metad-t", DownOut: 3 * time.Second, ElectionTTL: 2 * time.Second, Resync: 200 * time.Millisecond, Log: slog.Default()}
	go ctl.Run(ctx)

	nodeClient := e.Client(t)
	if _, err := registry.Register(ctx, store.New(nodeClient), &basaltv1.Node{Id: "blockd-1", Kind: basaltv1.NodeKind_NODE_KIND_BLOCKD, FailureDomain: "r1"}, "v", 2*time.Second, slog.Default()); err != nil {
		t.Fatal(err)
	}
	wait := func(what string, cond func(*basaltv1.StorageNode) bool) uint64 {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for time.Now().Before(deadline) {
			m, err := clustermap.Get(ctx, s)
			if err != nil {
				t.Fatal(err)
			}
			if n := placement.Node(m, "blockd-1"); cond(n) {
				return m.GetEpoch()
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("blockd-1 never became %s", what)
		return 0
	}
	e1 := wait("up", func(n *basaltv1.StorageNode) bool { return n.GetUp() && n.GetIn() })
	nodeClient.Close() // the node dies without revoking its lease
	e2 := wait("down", func(n *basaltv1.StorageNode) bool { return n != nil && !n.GetUp() && n.GetIn() })
	e3 := wait("out", func(n *basaltv1.StorageNode) bool { return n != nil && !n.GetIn() })
	if !(e1 < e2 && e2 < e3) {
		t.Fatalf("epochs did not increase: up %d, down %d, out %d", e1, e2, e3)
	}
	if err := registry.Remove(ctx, s, "blockd-1"); err != nil {
		t.Fatal(err)
	}
	wait("removed", func(n *basaltv1.StorageNode) bool { return n == nil })
}
