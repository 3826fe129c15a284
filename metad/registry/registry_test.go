package registry_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
)

const ttl = 2 * time.Second

func node(id string, kind basaltv1.NodeKind) *basaltv1.Node {
	return &basaltv1.Node{Id: id, Kind: kind, GrpcAddress: "127.0.0.1:1", FailureDomain: id}
}

// waitState polls until the node reaches want or the deadline passes, and returns how long it took.
func waitState(t *testing.T, s *store.Store, id string, want basaltv1.NodeState, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		n, err := registry.Get(context.Background(), s, id)
		if err != nil {
			t.Fatal(err)
		}
		if n.GetState() == want {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("node %s still %s after %s, want %s", id, n.GetState().Name(), within, want.Name())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLeaseExpiresWhenTheNodeGoesSilent(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	observer := store.New(e.Client(t))
	// The node's own client: closing it without revoking is what a killed process does to its lease.
	nodeClient := e.Client(t)
	if _, err := registry.Register(ctx, store.New(nodeClient), node("blockd-1", basaltv1.NodeKind_NODE_KIND_BLOCKD), "v", ttl, slog.Default()); err != nil {
		t.Fatal(err)
	}
	up, err := registry.List(ctx, observer, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, false)
	if err != nil || len(up) != 1 || up[0].GetState() != basaltv1.NodeState_NODE_STATE_UP || up[0].GetLiveness().GetLeaseTtlSeconds() != 2 {
		t.Fatalf("List after Register = %v, %v", up, err)
	}
	nodeClient.Close()
	took := waitState(t, observer, "blockd-1", basaltv1.NodeState_NODE_STATE_DOWN, ttl+3*time.Second)
	t.Logf("node reported down %s after its client went silent (TTL %s)", took, ttl)

	if up, _ := registry.List(ctx, observer, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, false); len(up) != 0 {
		t.Fatalf("a down node is still listed: %v", up)
	}
	all, _ := registry.List(ctx, observer, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, true)
	if len(all) != 1 || all[0].GetState() != basaltv1.NodeState_NODE_STATE_DOWN || all[0].GetLiveness() != nil {
		t.Fatalf("List(includeDown) = %v, want blockd-1 down without liveness", all)
	}
}

func TestCloseLeavesAtOnceAndRegisterComesBack(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	n := node("netd-1", basaltv1.NodeKind_NODE_KIND_NETD)
	r, err := registry.Register(ctx, s, n, "v", ttl, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	first := n.GetRegisteredAt().AsTime()
	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := registry.Get(ctx, s, "netd-1")
	if got.GetState() != basaltv1.NodeState_NODE_STATE_DOWN {
		t.Fatalf("after Close the node is %s, want down at once", got.GetState().Name())
	}
	r, err = registry.Register(ctx, s, node("netd-1", basaltv1.NodeKind_NODE_KIND_NETD), "v2", ttl, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	got, _ = registry.Get(ctx, s, "netd-1")
	if got.GetState() != basaltv1.NodeState_NODE_STATE_UP || got.GetLiveness().GetVersion() != "v2" {
		t.Fatalf("after re-registering: %v", got)
	}
	if !got.GetNode().GetRegisteredAt().AsTime().Equal(first) {
		t.Fatalf("re-registering changed the first registration time: %v, was %v", got.GetNode().GetRegisteredAt().AsTime(), first)
	}
}

func TestLostLeaseIsRegisteredAgain(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	r, err := registry.Register(ctx, s, node("computed-1", basaltv1.NodeKind_NODE_KIND_COMPUTED), "v", ttl, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	old := r.Lease()
	// Revoking the lease behind the node's back is what etcd does when the node was cut off past its TTL.
	if _, err := s.Client.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for r.Lease() == old {
		if time.Now().After(deadline) {
			t.Fatal("registration did not take a new lease after losing its lease")
		}
		time.Sleep(20 * time.Millisecond)
	}
	waitState(t, s, "computed-1", basaltv1.NodeState_NODE_STATE_UP, 5*time.Second)
}

func TestRemoveOnlyDownNodes(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	r, err := registry.Register(ctx, s, node("blockd-9", basaltv1.NodeKind_NODE_KIND_BLOCKD), "v", ttl, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.Remove(ctx, s, "blockd-9"); !errors.Is(err, registry.ErrNodeUp) {
		t.Fatalf("Remove of an up node = %v, want ErrNodeUp", err)
	}
	r.Close(ctx)
	if err := registry.Remove(ctx, s, "blockd-9"); err != nil {
		t.Fatalf("Remove of a down node: %v", err)
	}
	if _, err := registry.Get(ctx, s, "blockd-9"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Remove = %v, want ErrNotFound", err)
	}
	if err := registry.Remove(ctx, s, "blockd-9"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second Remove = %v, want ErrNotFound", err)
	}
}

func TestRegisterRefusesAnIDOfAnotherKindAndBadInput(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	r, err := registry.Register(ctx, s, node("x-1", basaltv1.NodeKind_NODE_KIND_BLOCKD), "v", ttl, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	_, err = registry.Register(ctx, s, node("x-1", basaltv1.NodeKind_NODE_KIND_NETD), "v", ttl, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "already registered as a blockd") {
		t.Fatalf("Register under another kind = %v", err)
	}
	if _, err := registry.Register(ctx, s, node("Bad ID", basaltv1.NodeKind_NODE_KIND_NETD), "v", ttl, slog.Default()); err == nil {
		t.Fatal("Register accepted an invalid ID")
	}
	if _, err := registry.Register(ctx, s, node("y", basaltv1.NodeKind_NODE_KIND_NETD), "v", time.Second, slog.Default()); err == nil {
		t.Fatal("Register accepted a TTL under the minimum")
	}
}

func TestClusterIdentity(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := registry.CheckCluster(ctx, s); !errors.Is(err, registry.ErrNoCluster) {
		t.Fatalf("CheckCluster on an empty etcd = %v, want ErrNoCluster", err)
	}
	a, err := registry.InitCluster(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	b, err := registry.InitCluster(ctx, s)
	if err != nil || b.GetClusterId() != a.GetClusterId() {
		t.Fatalf("second InitCluster = %v, %v; want the same cluster %s", b, err, a.GetClusterId())
	}
	// A cluster written by a newer build is refused, not misread.
	r, _ := store.Get[basaltv1.ClusterInfo](ctx, s, "/basalt/v1/cluster")
	r.Value.DataFormat = 99
	if _, err := s.Update(ctx, r.Key, r.Value, r.ModRevision); err != nil {
		t.Fatal(err)
	}
	if _, err := registry.CheckCluster(ctx, s); err == nil || !strings.Contains(err.Error(), "format 99") {
		t.Fatalf("CheckCluster of a format-99 cluster = %v", err)
	}
}
