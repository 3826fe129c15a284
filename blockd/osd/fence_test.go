package osd

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// oneNode is a real OSD (engine on disk, view of a real etcd) alone in its cluster: the primary of the single
// PG of a one-copy pool, so every write is decided here.
type oneNode struct {
	t    *testing.T
	ctx  context.Context
	s    *store.Store
	v    *view.View
	o    *OSD
	name string
}

func startOneNode(t *testing.T, shared bool) *oneNode {
	t.Helper()
	s := store.New(etcdtest.Start(t, "").Client(t))
	// Registered after etcd's, so it runs first: the view stops before etcd does.
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
	vol := &basaltv1.Volume{Name: "vm1-disk", Id: 1, SizeBytes: 8 << 20, SectorSize: 512, Pool: "default", Replicas: 1, Shared: shared}
	if _, err := s.Create(ctx, schema.VolumeKey(vol.Name), vol); err != nil {
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
	peers := NewPeers()
	t.Cleanup(peers.Close)
	return &oneNode{t: t, ctx: ctx, s: s, v: v, o: New("n1", eng, v, peers, s, 0, slog.Default()), name: vol.Name}
}

// set rewrites the volume's attachments in etcd, as metad/attach does, and waits until the view has them.
func (n *oneNode) set(gen uint64, atts ...*basaltv1.Attachment) {
	n.t.Helper()
	rec, err := store.Get[basaltv1.Volume](n.ctx, n.s, schema.VolumeKey(n.name))
	if err != nil {
		n.t.Fatal(err)
	}
	rec.Value.AttachGeneration = gen
	rec.Value.Attachments = atts
	rev, err := n.s.Update(n.ctx, rec.Key, rec.Value, rec.ModRevision)
	if err != nil {
		n.t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, err := n.v.WaitRevision(wctx, rev); err != nil {
		n.t.Fatal(err)
	}
}

func (n *oneNode) op(ctx context.Context, op basaltv1.BlockOp, gen uint64, fill byte) error {
	req := &basaltv1.ClientOpRequest{
		Epoch: 1, Object: &basaltv1.ObjectRef{Volume: 1, Index: 0}, Op: op, Offset: 0, Length: 4096, AttachGeneration: gen,
	}
	if op == basaltv1.BlockOp_BLOCK_OP_WRITE {
		req.Data = bytes.Repeat([]byte{fill}, 4096)
	}
	resp, err := n.o.ClientOp(ctx, req)
	if err == nil && op == basaltv1.BlockOp_BLOCK_OP_READ && !bytes.Equal(resp.GetData(), bytes.Repeat([]byte{fill}, 4096)) {
		n.t.Fatalf("read %x..., want %x", resp.GetData()[:4], fill)
	}
	return err
}

// write writes with generation gen and checks the outcome: accepted, or refused with PermissionDenied and a
// message containing refusal.
func (n *oneNode) write(gen uint64, fill byte, refusal string) {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	err := n.op(ctx, basaltv1.BlockOp_BLOCK_OP_WRITE, gen, fill)
	switch {
	case refusal == "" && err != nil:
		n.t.Fatalf("write with generation %d refused: %v", gen, err)
	case refusal != "" && (status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), refusal)):
		n.t.Fatalf("write with generation %d = %v, want PermissionDenied mentioning %q", gen, err, refusal)
	}
}

func (n *oneNode) read(fill byte) {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if err := n.op(ctx, basaltv1.BlockOp_BLOCK_OP_READ, 0, fill); err != nil {
		n.t.Fatalf("read refused: %v", err)
	}
}

func att(host string, gen uint64, incoming bool) *basaltv1.Attachment {
	return &basaltv1.Attachment{Volume: "vm1-disk", Host: host, Generation: gen, Incoming: incoming}
}

// TestWriteRuleExclusive walks an exclusive volume through attach, takeover, a migration and a fence, and checks
// at each step which generations the primary accepts writes from. Reads are never refused.
func TestWriteRuleExclusive(t *testing.T) {
	n := startOneNode(t, false)

	// Unattached: plain clients write as always.
	n.write(0, 1, "")
	n.read(1)

	// Attached to h1 at generation 1: only h1's sessions write; a stray plain client cannot.
	n.set(1, att("h1", 1, false))
	n.write(1, 2, "")
	n.write(0, 9, `volume "vm1-disk" is attached to host h1 at generation 1: writes from sessions opened without an attachment generation are refused`)
	n.read(2)

	// Taken over by h2: h1's generation is fenced.
	n.set(2, att("h2", 2, false))
	n.write(1, 9, `volume "vm1-disk" is fenced for generation 1 (attached to host h2 at generation 2)`)
	n.write(2, 3, "")

	// A migration to h3, incoming: h3 cannot write before the switchover, h2 still can.
	n.set(3, att("h2", 2, false), att("h3", 3, true))
	n.write(3, 9, "host h3's incoming migration")
	n.write(2, 4, "")
	// Switchover: h3 only.
	n.set(3, att("h3", 3, false))
	n.write(2, 9, "fenced for generation 2 (attached to host h3 at generation 3)")
	n.write(3, 5, "")

	// Fenced: no attachment left and a new generation; h3 is refused, plain clients write again.
	n.set(4)
	n.write(3, 9, "fenced for generation 3 (not attached)")
	n.write(0, 6, "")
	n.read(6)

	// A write this node makes on its own behalf (trimming after a shrink) is no attachment's business.
	n.set(5, att("h4", 5, false))
	if err := n.op(internalWrite(n.ctx), basaltv1.BlockOp_BLOCK_OP_TRIM, 0, 0); err != nil {
		t.Fatalf("internal trim refused: %v", err)
	}
	n.read(0)
}

// TestWriteRuleShared: a shared volume accepts every attachment's generation, and refuses fenced and plain ones.
func TestWriteRuleShared(t *testing.T) {
	n := startOneNode(t, true)
	n.set(2, att("h1", 1, false), att("h2", 2, false))
	n.write(1, 1, "")
	n.write(2, 2, "")
	n.write(0, 9, "attached to host h1 at generation 1, host h2 at generation 2")
	// h1 fenced: h2 goes on.
	n.set(3, att("h2", 2, false))
	n.write(1, 9, "fenced for generation 1 (attached to host h2 at generation 2)")
	n.write(2, 3, "")
	n.read(3)
}

// TestFutureGenerationWaitsForTheView: a write with a generation newer than this node's view knows is not
// refused: the view lags etcd, and the write is decided once it has caught up.
func TestFutureGenerationWaitsForTheView(t *testing.T) {
	n := startOneNode(t, false)
	n.set(1, att("h1", 1, false))
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(n.ctx, 20*time.Second)
		defer cancel()
		done <- n.op(ctx, basaltv1.BlockOp_BLOCK_OP_WRITE, 2, 7)
	}()
	select {
	case err := <-done:
		t.Fatalf("a write from a generation the view does not know yet returned at once: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	n.set(2, att("h2", 2, false))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write with generation 2 once the view has it: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write was not decided once the view caught up")
	}
	n.read(7)

	// A generation that never comes is given up with the request's deadline, as Unavailable (retried).
	ctx, cancel := context.WithTimeout(n.ctx, 300*time.Millisecond)
	defer cancel()
	if err := n.op(ctx, basaltv1.BlockOp_BLOCK_OP_WRITE, 9, 9); status.Code(err) != codes.Unavailable {
		t.Fatalf("write with a generation never issued = %v, want Unavailable", err)
	}
}

// TestDrainWritesWaitsOnlyForEarlierWrites: DrainWrites waits for the writes admitted before it, not for those
// admitted after (so a barrier ends under load).
func TestDrainWritesWaitsOnlyForEarlierWrites(t *testing.T) {
	n := startOneNode(t, false)
	before, err := n.o.admitWrite(n.ctx, 1, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	drained := make(chan error, 1)
	go func() { drained <- n.o.DrainWrites(n.ctx) }()
	time.Sleep(100 * time.Millisecond)
	after, err := n.o.admitWrite(n.ctx, 1, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-drained:
		t.Fatalf("DrainWrites returned (%v) while a write admitted before it was in flight", err)
	case <-time.After(200 * time.Millisecond):
	}
	before()
	select {
	case err := <-drained:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("DrainWrites waited for a write admitted after it")
	}
	after()
	ctx, cancel := context.WithTimeout(n.ctx, time.Second)
	defer cancel()
	if err := n.o.DrainWrites(ctx); err != nil {
		t.Fatalf("DrainWrites with nothing in flight: %v", err)
	}
}
