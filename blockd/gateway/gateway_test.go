package gateway

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/nbd"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

// TestExportWaitsForALaggingView: a volume that etcd has but this node's view has not delivered yet is waited
// for; a name etcd does not have is refused at once.
func TestExportWaitsForALaggingView(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Create(ctx, schema.ClusterMap, &basaltv1.ClusterMap{Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, schema.VolumeKey("fresh"), &basaltv1.Volume{Name: "fresh", Id: 7, SizeBytes: 1 << 20, SectorSize: 512, Pool: "default"}); err != nil {
		t.Fatal(err)
	}
	v := view.New() // not running yet: it lags behind etcd
	g := &Gateway{View: v, Store: s, Log: slog.Default()}

	if _, err := g.Export(ctx, "absent"); !errors.Is(err, nbd.ErrNoSuchExport) {
		t.Fatalf("Export of a volume etcd does not have = %v, want ErrNoSuchExport", err)
	}
	got := make(chan error, 1)
	go func() {
		e, err := g.Export(ctx, "fresh")
		if err == nil && e.Size != 1<<20 {
			err = errors.New("wrong size")
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("Export returned (%v) before the view had the volume", err)
	case <-time.After(200 * time.Millisecond):
	}
	go v.Run(ctx, s, slog.Default())
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Export after the view caught up: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Export did not return once the view had the volume")
	}
}
