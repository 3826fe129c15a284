package view_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

func runView(t *testing.T) (*view.View, *store.Store, context.Context) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Create(ctx, schema.ClusterMap, &basaltv1.ClusterMap{Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, schema.VolumeKey("v"), &basaltv1.Volume{Name: "v", Id: 1, SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v := view.New()
	go v.Run(ctx, s, slog.Default())
	select {
	case <-v.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("view not ready")
	}
	return v, s, ctx
}

// TestWaitRevisionSeesTheRecordWrittenAtIt: once WaitRevision(rev) returns, the volume record written at rev is
// in the view (what fencing's barrier relies on).
func TestWaitRevisionSeesTheRecordWrittenAtIt(t *testing.T) {
	v, s, ctx := runView(t)
	for gen := uint64(1); gen <= 20; gen++ {
		rec, err := store.Get[basaltv1.Volume](ctx, s, schema.VolumeKey("v"))
		if err != nil {
			t.Fatal(err)
		}
		rec.Value.AttachGeneration = gen
		rev, err := s.Update(ctx, rec.Key, rec.Value, rec.ModRevision)
		if err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		got, err := v.WaitRevision(wctx, rev)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if got < rev {
			t.Fatalf("WaitRevision(%d) = %d", rev, got)
		}
		if g := v.Volume("v").GetAttachGeneration(); g != gen {
			t.Fatalf("after WaitRevision(%d) the view has generation %d, want %d", rev, g, gen)
		}
	}
}

// TestWaitRevisionOfAnUnrelatedWrite: a revision made by a key the view does not watch is reached too (etcd's
// progress report says the watches have seen everything up to it); a revision etcd has not reached is not.
func TestWaitRevisionOfAnUnrelatedWrite(t *testing.T) {
	v, s, ctx := runView(t)
	resp, err := s.Client.Put(ctx, "/elsewhere/x", "1")
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Header.Revision
	if v.Revision() >= rev {
		t.Fatalf("the view is at %d before anything reported %d", v.Revision(), rev)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if got, err := v.WaitRevision(wctx, rev); err != nil || got < rev {
		t.Fatalf("WaitRevision(%d) = %d, %v", rev, got, err)
	}
	short, cancel2 := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel2()
	if got, err := v.WaitRevision(short, rev+100); err == nil {
		t.Fatalf("WaitRevision of a future revision returned %d", got)
	}
}
