package gateway

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/nbd"
	"github.com/basalt-hv/basalt/blockd/osd"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

// oneNodeGateway is a real gateway in front of a real OSD (engine on disk, view of a real etcd) alone in its
// cluster, with a long operation timeout: a refusal that came back quickly was not retried.
func oneNodeGateway(t *testing.T) (*Gateway, *store.Store, context.Context) {
	t.Helper()
	s := store.New(etcdtest.Start(t, "").Client(t))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := &basaltv1.ClusterMap{
		Epoch: 1,
		Nodes: []*basaltv1.StorageNode{{Id: "n1", Up: true, In: true, Address: "127.0.0.1:1"}},
		Pools: []*basaltv1.Pool{{Name: "default", Id: 1, Replicas: 1, PgCount: 1}},
	}
	if _, err := s.Create(ctx, schema.ClusterMap, m); err != nil {
		t.Fatal(err)
	}
	vol := &basaltv1.Volume{Name: "disk", Id: 1, SizeBytes: 8 << 20, SectorSize: 512, Pool: "default", Replicas: 1,
		Checkpoints: []*basaltv1.Checkpoint{{Volume: "disk", Name: "c1", Id: 1, SizeBytes: 8 << 20}}, CheckpointSeq: 1}
	if _, err := s.Create(ctx, schema.VolumeKey("disk"), vol); err != nil {
		t.Fatal(err)
	}
	eng, err := engine.Open(t.TempDir(), engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	v := view.New()
	go v.Run(ctx, s, slog.Default())
	select {
	case <-v.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("view not ready")
	}
	peers := osd.NewPeers()
	t.Cleanup(peers.Close)
	o := osd.New("n1", eng, v, peers, s, 0, slog.Default())
	return &Gateway{OSD: o, View: v, Store: s, Peers: peers, OpTimeout: time.Minute, Log: slog.Default()}, s, ctx
}

func setAttachments(t *testing.T, g *Gateway, s *store.Store, gen uint64, atts ...*basaltv1.Attachment) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := store.Get[basaltv1.Volume](ctx, s, schema.VolumeKey("disk"))
	if err != nil {
		t.Fatal(err)
	}
	rec.Value.AttachGeneration, rec.Value.Attachments = gen, atts
	rev, err := s.Update(ctx, rec.Key, rec.Value, rec.ModRevision)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.View.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
}

// TestExportNamesWithAGeneration: "VOLUME?generation=N" opens the volume; a malformed generation, or one on a
// read-only checkpoint export, is refused as invalid with a message saying why.
func TestExportNamesWithAGeneration(t *testing.T) {
	g, _, ctx := oneNodeGateway(t)
	if e, err := g.Export(ctx, "disk?generation=3"); err != nil || e.ReadOnly || e.Size != 8<<20 {
		t.Fatalf("Export(disk?generation=3) = %+v, %v", e, err)
	}
	for name, want := range map[string]string{
		"disk@c1?generation=3": "a checkpoint is read-only",
		"disk?generation=x":    "not a positive number",
		"disk?generation=0":    "not a positive number",
		"disk?gen=3":           "want VOLUME?generation=N",
	} {
		_, err := g.Export(ctx, name)
		if !errors.Is(err, nbd.ErrInvalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("Export(%q) = %v, want ErrInvalid saying %q", name, err, want)
		}
	}
	if e, err := g.Export(ctx, "disk@c1"); err != nil || !e.ReadOnly {
		t.Fatalf("Export(disk@c1) = %+v, %v", e, err)
	}
}

// TestFencedWritesAreEPERMAtOnce: writes through a session whose generation the volume no longer accepts fail
// with EPERM at once (never retried until the operation deadline), reads go on, and the session's earlier
// writes stay.
func TestFencedWritesAreEPERMAtOnce(t *testing.T) {
	g, s, ctx := oneNodeGateway(t)
	setAttachments(t, g, s, 1, &basaltv1.Attachment{Volume: "disk", Host: "h1", Generation: 1})
	open := func(name string) nbd.Backend {
		e, err := g.Export(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return e.Backend
	}
	h1, plain := open("disk?generation=1"), open("disk")
	data := bytes.Repeat([]byte{0xa1}, 64<<10)
	if err := h1.WriteAt(ctx, data, 4<<20-32<<10, false); err != nil { // spans two objects
		t.Fatalf("write of the attached generation: %v", err)
	}
	refused := func(what string, fn func() error) {
		t.Helper()
		start := time.Now()
		err := fn()
		if !errors.Is(err, nbd.ErrPermission) {
			t.Fatalf("%s = %v, want EPERM", what, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("%s took %s: a fenced write must not be retried", what, d)
		}
	}
	refused("plain write to an attached volume", func() error { return plain.WriteAt(ctx, data[:4096], 0, false) })
	refused("plain trim of an attached volume", func() error { return plain.Trim(ctx, 0, 4096, false) })

	// Fenced: generation 2, no attachment.
	setAttachments(t, g, s, 2)
	refused("write of a fenced generation", func() error { return h1.WriteAt(ctx, data[:4096], 0, true) })
	refused("zeroing by a fenced generation", func() error {
		return h1.WriteZeroes(ctx, 0, 4096, nbd.ZeroFlags{NoHole: true})
	})
	got := make([]byte, len(data))
	if err := h1.ReadAt(ctx, got, 4<<20-32<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the fenced session: %v (data intact: %v)", err, bytes.Equal(got, data))
	}
	if err := plain.WriteAt(ctx, data[:4096], 0, false); err != nil {
		t.Fatalf("plain write once nothing is attached: %v", err)
	}
}
