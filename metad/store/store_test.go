package store_test

import (
	"context"
	"errors"
	"testing"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/store"
)

func TestCompareAndSwap(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	key := "/test/nodes/a"

	rev, err := s.Create(ctx, key, &basaltv1.Node{Id: "a", GrpcAddress: "x:1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, key, &basaltv1.Node{Id: "a"}); !errors.Is(err, store.ErrExists) {
		t.Fatalf("second Create = %v, want ErrExists", err)
	}
	r, err := store.Get[basaltv1.Node](ctx, s, key)
	if err != nil {
		t.Fatal(err)
	}
	if r.ModRevision != rev || r.CreateRevision != rev || r.Value.GetGrpcAddress() != "x:1" {
		t.Fatalf("Get = %+v, want revision %d and address x:1", r, rev)
	}

	// Two writers read the same revision; only the first update wins.
	rev2, err := s.Update(ctx, key, &basaltv1.Node{Id: "a", GrpcAddress: "x:2"}, r.ModRevision)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Update(ctx, key, &basaltv1.Node{Id: "a", GrpcAddress: "x:3"}, r.ModRevision); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("stale Update = %v, want ErrConflict", err)
	}
	if err := s.Delete(ctx, key, r.ModRevision); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("stale Delete = %v, want ErrConflict", err)
	}
	r, _ = store.Get[basaltv1.Node](ctx, s, key)
	if r.Value.GetGrpcAddress() != "x:2" || r.ModRevision != rev2 {
		t.Fatalf("after the lost race: %v at %d, want x:2 at %d", r.Value, r.ModRevision, rev2)
	}
	if err := s.Delete(ctx, key, rev2); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Get[basaltv1.Node](ctx, s, key); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get after Delete = %v, want ErrNotFound", err)
	}
	if _, err := s.Update(ctx, key, &basaltv1.Node{Id: "a"}, rev2); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Update of a deleted key = %v, want ErrConflict", err)
	}
}

func TestListIsOrderedAndScoped(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	for _, id := range []string{"c", "a", "b"} {
		if _, err := s.Create(ctx, "/test/nodes/"+id, &basaltv1.Node{Id: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Create(ctx, "/test/nodesx", &basaltv1.Node{Id: "outside"}); err != nil {
		t.Fatal(err)
	}
	rs, rev, err := store.List[basaltv1.Node](ctx, s, "/test/nodes/")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range rs {
		ids = append(ids, r.Value.GetId())
		if r.ModRevision > rev {
			t.Errorf("record %s at revision %d is newer than the list revision %d", r.Key, r.ModRevision, rev)
		}
	}
	if len(ids) != 3 || ids[0] != "a" || ids[1] != "b" || ids[2] != "c" {
		t.Fatalf("List = %v, want [a b c]", ids)
	}
}

func TestGetRejectsUndecodableRecords(t *testing.T) {
	ctx := context.Background()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Client.Put(ctx, "/test/bad", "\xff\xff\xff"); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Get[basaltv1.Node](ctx, s, "/test/bad"); err == nil {
		t.Fatal("Get of garbage succeeded")
	}
}
