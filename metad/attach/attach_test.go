package attach_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/metad/attach"
	"github.com/basalt-hv/basalt/metad/clustermap"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"
)

type fixture struct {
	t   *testing.T
	ctx context.Context
	s   *store.Store
	c   *attach.Client
	ids uint64
}

// newFixture is a real etcd with a cluster map (no storage node yet, so barriers pass at once) and an attach
// client on it.
func newFixture(t *testing.T) *fixture {
	t.Helper()
	s := store.New(etcdtest.Start(t, "").Client(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	peers := blockrpc.NewPeers()
	t.Cleanup(peers.Close)
	return &fixture{t: t, ctx: ctx, s: s, c: &attach.Client{Store: s, Peers: peers, Log: slog.Default()}}
}

func (f *fixture) volume(name string, shared bool) {
	f.t.Helper()
	f.ids++
	if _, err := f.s.Create(f.ctx, schema.VolumeKey(name), &basaltv1.Volume{Name: name, Id: f.ids, SizeBytes: 1 << 30, SectorSize: 512, Pool: "default", Shared: shared}); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) get(name string) store.Record[*basaltv1.Volume] {
	f.t.Helper()
	r, err := store.Get[basaltv1.Volume](f.ctx, f.s, schema.VolumeKey(name))
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

// holders describes a volume's attachments as "host:generation" ("+in" for incoming), in order.
func (f *fixture) holders(name string) string {
	f.t.Helper()
	var out []string
	for _, a := range f.get(name).Value.GetAttachments() {
		s := fmt.Sprintf("%s:%d", a.GetHost(), a.GetGeneration())
		if a.GetIncoming() {
			s += "+in"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

func (f *fixture) attach(volume, host string) *basaltv1.Attachment {
	f.t.Helper()
	a, err := f.c.Attach(f.ctx, volume, host)
	if err != nil {
		f.t.Fatal(err)
	}
	return a
}

func TestAttachIssuesANewGenerationEveryTime(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	a := f.attach("disk", "h1")
	if a.GetGeneration() != 1 || a.GetHost() != "h1" || a.GetVolume() != "disk" || !a.GetExclusive() || a.GetIncoming() || a.GetAttachedAt() == nil {
		t.Fatalf("first attachment = %v", a)
	}
	// Attaching again is not idempotent: the host's older sessions are fenced by the new generation.
	if b := f.attach("disk", "h1"); b.GetGeneration() != 2 {
		t.Fatalf("second attach of the same host got generation %d, want 2", b.GetGeneration())
	}
	if got := f.holders("disk"); got != "h1:2" {
		t.Fatalf("attachments = %q, want h1:2", got)
	}
	// Takeover: h2 replaces h1.
	if b := f.attach("disk", "h2"); b.GetGeneration() != 3 {
		t.Fatalf("takeover got generation %d, want 3", b.GetGeneration())
	}
	if got := f.holders("disk"); got != "h2:3" {
		t.Fatalf("after takeover attachments = %q, want h2:3", got)
	}
	// A fence bumps the generation too, and a later attach never gets a generation issued before.
	if vols, _, err := f.c.FenceHost(f.ctx, "h2"); err != nil || fmt.Sprint(vols) != "[disk]" {
		t.Fatalf("FenceHost = %v, %v", vols, err)
	}
	if got, gen := f.holders("disk"), f.get("disk").Value.GetAttachGeneration(); got != "" || gen != 4 {
		t.Fatalf("after fence: attachments %q, generation %d; want none, 4", got, gen)
	}
	if b := f.attach("disk", "h2"); b.GetGeneration() != 5 {
		t.Fatalf("attach after fence got generation %d, want 5", b.GetGeneration())
	}

	// Concurrent attaches: every one gets its own generation, the record ends with the last issued, and the
	// exclusive volume with exactly one attachment.
	seen := map[uint64]bool{5: true}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := f.c.Attach(f.ctx, "disk", fmt.Sprintf("h%d", i%4))
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if seen[a.GetGeneration()] {
				t.Errorf("generation %d issued twice", a.GetGeneration())
			}
			seen[a.GetGeneration()] = true
		}()
	}
	wg.Wait()
	rec := f.get("disk").Value
	if rec.GetAttachGeneration() != 21 || len(rec.GetAttachments()) != 1 || rec.GetAttachments()[0].GetGeneration() != 21 {
		t.Fatalf("after 16 concurrent attaches: generation %d, attachments %v; want 21 and one attachment at 21", rec.GetAttachGeneration(), rec.GetAttachments())
	}
}

func TestSharedVolumesKeepEveryHost(t *testing.T) {
	f := newFixture(t)
	f.volume("quorum", true)
	f.attach("quorum", "h1")
	f.attach("quorum", "h2")
	if a := f.attach("quorum", "h1"); a.GetExclusive() {
		t.Fatal("an attachment of a shared volume is marked exclusive")
	}
	if got := f.holders("quorum"); got != "h2:2 h1:3" {
		t.Fatalf("attachments = %q, want h2:2 h1:3 (h1 replaced its own entry)", got)
	}
	if err := f.c.Detach(f.ctx, "quorum", "h2"); err != nil {
		t.Fatal(err)
	}
	if got, gen := f.holders("quorum"), f.get("quorum").Value.GetAttachGeneration(); got != "h1:3" || gen != 3 {
		t.Fatalf("after detach: %q at generation %d, want h1:3 at 3 (detach does not bump)", got, gen)
	}
	f.attach("quorum", "h2")
	if _, _, err := f.c.FenceHost(f.ctx, "h1"); err != nil {
		t.Fatal(err)
	}
	if got, gen := f.holders("quorum"), f.get("quorum").Value.GetAttachGeneration(); got != "h2:4" || gen != 5 {
		t.Fatalf("after fencing h1: %q at generation %d, want h2:4 at 5", got, gen)
	}
}

func TestDetach(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	f.attach("disk", "h1")
	before := f.get("disk").ModRevision
	if err := f.c.Detach(f.ctx, "disk", "h2"); err != nil {
		t.Fatalf("detach of a host that is not attached: %v", err)
	}
	if f.get("disk").ModRevision != before {
		t.Fatal("detach of a host that is not attached wrote the record")
	}
	if _, err := f.c.PrepareIncoming(f.ctx, "disk", "h2", true); err != nil {
		t.Fatal(err)
	}
	// An incoming attachment is detached like any other (an aborted migration).
	if err := f.c.Detach(f.ctx, "disk", "h2"); err != nil {
		t.Fatal(err)
	}
	if got := f.holders("disk"); got != "h1:1" {
		t.Fatalf("after detaching the incoming one: %q, want h1:1", got)
	}
	if err := f.c.Detach(f.ctx, "disk", "h1"); err != nil {
		t.Fatal(err)
	}
	if got, gen := f.holders("disk"), f.get("disk").Value.GetAttachGeneration(); got != "" || gen != 2 {
		t.Fatalf("after detach: %q at generation %d, want nothing at 2", got, gen)
	}
}

func TestPrepareIncomingAndSwitchover(t *testing.T) {
	f := newFixture(t)
	for _, v := range []string{"boot", "data", "other"} {
		f.volume(v, false)
		f.attach(v, "src")
	}
	for _, v := range []string{"boot", "data"} {
		a, err := f.c.PrepareIncoming(f.ctx, v, "dst", true)
		if err != nil {
			t.Fatal(err)
		}
		if !a.GetIncoming() || a.GetGeneration() != 2 {
			t.Fatalf("prepared %v, want incoming at generation 2", a)
		}
	}
	if got := f.holders("boot"); got != "src:1 dst:2+in" {
		t.Fatalf("prepared: %q", got)
	}

	// A switchover that names a volume without a prepared attachment changes nothing at all.
	err := f.c.Switchover(f.ctx, []string{"boot", "other"}, "dst")
	if !errors.Is(err, attach.ErrNotPrepared) || !strings.Contains(err.Error(), `"other"`) {
		t.Fatalf("switchover with an unprepared volume = %v, want ErrNotPrepared naming it", err)
	}
	if got := f.holders("boot"); got != "src:1 dst:2+in" {
		t.Fatalf("a failed switchover changed boot: %q", got)
	}

	if err := f.c.Switchover(f.ctx, []string{"data", "boot", "boot"}, "dst"); err != nil {
		t.Fatal(err)
	}
	boot, data := f.get("boot"), f.get("data")
	if f.holders("boot") != "dst:2" || f.holders("data") != "dst:2" {
		t.Fatalf("after switchover: boot %q, data %q; want dst:2 only", f.holders("boot"), f.holders("data"))
	}
	if boot.ModRevision != data.ModRevision {
		t.Fatalf("switchover wrote boot at %d and data at %d: not one transaction", boot.ModRevision, data.ModRevision)
	}
	// Idempotent: again changes nothing and succeeds.
	if err := f.c.Switchover(f.ctx, []string{"boot", "data"}, "dst"); err != nil {
		t.Fatalf("repeated switchover: %v", err)
	}
	if f.get("boot").ModRevision != boot.ModRevision {
		t.Fatal("a repeated switchover wrote the record again")
	}

	// incoming=false: the destination's attachment is active at once, beside the source's.
	a, err := f.c.PrepareIncoming(f.ctx, "other", "dst", false)
	if err != nil || a.GetIncoming() {
		t.Fatalf("PrepareIncoming(incoming=false) = %v, %v", a, err)
	}
	if got := f.holders("other"); got != "src:1 dst:2" {
		t.Fatalf("prepared without pause: %q", got)
	}
	if err := f.c.Switchover(f.ctx, []string{"other"}, "dst"); err != nil {
		t.Fatal(err)
	}
	if got := f.holders("other"); got != "dst:2" {
		t.Fatalf("after switchover: %q", got)
	}
}

func TestFenceHost(t *testing.T) {
	f := newFixture(t)
	// More volumes than one transaction takes.
	var want []string
	for i := range 70 {
		name := fmt.Sprintf("vm%02d", i)
		f.volume(name, false)
		f.attach(name, "h1")
		want = append(want, name)
	}
	f.volume("shared", true)
	f.attach("shared", "h1")
	f.attach("shared", "h2")
	want = append(want, "shared")
	f.volume("elsewhere", false)
	f.attach("elsewhere", "h2")
	f.volume("idle", false)

	vols, rev, err := f.c.FenceHost(f.ctx, "h1")
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(want)
	if fmt.Sprint(vols) != fmt.Sprint(want) {
		t.Fatalf("fenced %v, want %v", vols, want)
	}
	for _, name := range want {
		if name == "shared" {
			continue
		}
		r := f.get(name)
		if len(r.Value.GetAttachments()) != 0 || r.Value.GetAttachGeneration() != 2 {
			t.Fatalf("%s after fence: %v at generation %d", name, r.Value.GetAttachments(), r.Value.GetAttachGeneration())
		}
		if r.ModRevision > rev {
			t.Fatalf("%s written at %d, after the revision FenceHost confirmed (%d)", name, r.ModRevision, rev)
		}
	}
	if got, gen := f.holders("shared"), f.get("shared").Value.GetAttachGeneration(); got != "h2:2" || gen != 3 {
		t.Fatalf("shared after fencing h1: %q at %d, want h2:2 at 3", got, gen)
	}
	if got, gen := f.holders("elsewhere"), f.get("elsewhere").Value.GetAttachGeneration(); got != "h2:1" || gen != 1 {
		t.Fatalf("a volume of another host was touched: %q at %d", got, gen)
	}
	if gen := f.get("idle").Value.GetAttachGeneration(); gen != 0 {
		t.Fatalf("an unattached volume was touched: generation %d", gen)
	}
	// Fencing again finds nothing.
	if vols, _, err := f.c.FenceHost(f.ctx, "h1"); err != nil || len(vols) != 0 {
		t.Fatalf("second fence = %v, %v; want nothing", vols, err)
	}
}

func TestBadInput(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	if _, err := f.c.Attach(f.ctx, "nope", "h1"); !errors.Is(err, store.ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Attach of an unknown volume = %v, want not found naming it", err)
	}
	if err := f.c.Switchover(f.ctx, []string{"disk", "nope"}, "h1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Switchover with an unknown volume = %v, want not found", err)
	}
	for _, call := range []func() error{
		func() error { _, err := f.c.Attach(f.ctx, "disk", ""); return err },
		func() error { _, err := f.c.Attach(f.ctx, "Disk", "h1"); return err },
		func() error { _, err := f.c.PrepareIncoming(f.ctx, "disk", "H 1", true); return err },
		func() error { return f.c.Detach(f.ctx, "disk", "a/b") },
		func() error { _, _, err := f.c.FenceHost(f.ctx, ""); return err },
	} {
		if err := call(); !errors.Is(err, attach.ErrInvalid) {
			t.Errorf("bad name: %v, want ErrInvalid", err)
		}
	}
}

// TestConcurrentRecordWritersLoseNothing: attaches racing with checkpoint-style and resize-style
// read-modify-write updates of the same record (compare-and-swap, retried on conflict) lose no change of either.
func TestConcurrentRecordWritersLoseNothing(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	const n = 25
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		for i := range n {
			if _, err := f.c.Attach(f.ctx, "disk", fmt.Sprintf("h%d", i%3)); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	rmw := func(change func(*basaltv1.Volume)) {
		defer wg.Done()
		for range n {
			for {
				r, err := store.Get[basaltv1.Volume](f.ctx, f.s, schema.VolumeKey("disk"))
				if err != nil {
					t.Error(err)
					return
				}
				change(r.Value)
				if _, err = f.s.Update(f.ctx, r.Key, r.Value, r.ModRevision); err == nil {
					break
				} else if !errors.Is(err, store.ErrConflict) {
					t.Error(err)
					return
				}
			}
		}
	}
	go rmw(func(v *basaltv1.Volume) {
		v.CheckpointSeq++
		v.Checkpoints = append(v.Checkpoints, &basaltv1.Checkpoint{Volume: "disk", Name: fmt.Sprintf("c%d", v.CheckpointSeq), Id: v.CheckpointSeq})
	})
	go rmw(func(v *basaltv1.Volume) { v.SizeBytes += 1 << 20 })
	wg.Wait()
	v := f.get("disk").Value
	if v.GetCheckpointSeq() != n || len(v.GetCheckpoints()) != n || v.GetSizeBytes() != 1<<30+n<<20 {
		t.Fatalf("record updates lost: checkpoint %d (%d listed), size %d", v.GetCheckpointSeq(), len(v.GetCheckpoints()), v.GetSizeBytes())
	}
	if v.GetAttachGeneration() != n || len(v.GetAttachments()) != 1 || v.GetAttachments()[0].GetGeneration() != n {
		t.Fatalf("attachments lost: generation %d, %v", v.GetAttachGeneration(), v.GetAttachments())
	}
}

// TestAttachWaitsOutACheckpointBeingTaken: an attach does not write a volume record while a checkpoint of it
// is being taken (that would make the checkpoint's commit fail and hold writes until its deadline); it goes
// ahead once the checkpoint is committed.
func TestAttachWaitsOutACheckpointBeingTaken(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	r := f.get("disk")
	r.Value.PendingCheckpoint = &basaltv1.PendingCheckpoint{Id: 1, Name: "c1", Token: "t", Deadline: timestamppb.New(time.Now().Add(5 * time.Second))}
	rev, err := f.s.Update(f.ctx, r.Key, r.Value, r.ModRevision)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := f.c.Attach(f.ctx, "disk", "h1"); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("Attach returned (%v) while a checkpoint was being taken", err)
	case <-time.After(500 * time.Millisecond):
	}
	// The checkpoint's commit: a compare-and-swap on the revision it wrote, which must still be current.
	r.Value.PendingCheckpoint = nil
	r.Value.CheckpointSeq = 1
	if _, err := f.s.Update(f.ctx, r.Key, r.Value, rev); err != nil {
		t.Fatalf("the checkpoint's commit failed: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Attach did not go ahead once the checkpoint was committed")
	}
	if v := f.get("disk").Value; v.GetCheckpointSeq() != 1 || f.holders("disk") != "h1:1" {
		t.Fatalf("after both: checkpoint %d, attachments %q", v.GetCheckpointSeq(), f.holders("disk"))
	}
}

// syncViewServer answers SyncView from a real blockd view of the test's etcd, and records what it was asked.
type syncViewServer struct {
	basaltv1.UnimplementedBlockServiceServer
	v     *view.View
	mu    sync.Mutex
	asked []int64
}

func (s *syncViewServer) SyncView(ctx context.Context, req *basaltv1.SyncViewRequest) (*basaltv1.SyncViewResponse, error) {
	s.mu.Lock()
	s.asked = append(s.asked, req.GetRevision())
	s.mu.Unlock()
	rev, err := s.v.WaitRevision(ctx, req.GetRevision())
	if err != nil {
		return nil, err
	}
	return &basaltv1.SyncViewResponse{Revision: rev}, nil
}

func (s *syncViewServer) maxAsked() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Max(append(s.asked, 0))
}

// storageNode serves SyncView on a loopback port, over a view of f's etcd.
func (f *fixture) storageNode() (*syncViewServer, string) {
	f.t.Helper()
	v := view.New()
	go v.Run(f.ctx, f.s, slog.Default())
	srv := grpc.NewServer()
	sv := &syncViewServer{v: v}
	basaltv1.RegisterBlockServiceServer(srv, sv)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.t.Fatal(err)
	}
	go srv.Serve(l)
	f.t.Cleanup(srv.Stop)
	return sv, l.Addr().String()
}

func (f *fixture) setNodes(nodes ...*basaltv1.StorageNode) int64 {
	f.t.Helper()
	if _, err := clustermap.Update(f.ctx, f.s, func(m *basaltv1.ClusterMap) error { m.Nodes = nodes; return nil }); err != nil {
		f.t.Fatal(err)
	}
	return f.get("disk").ModRevision // any later revision would do; the map's is read below
}

func (f *fixture) mapRevision() int64 {
	f.t.Helper()
	r, err := store.Get[basaltv1.ClusterMap](f.ctx, f.s, schema.ClusterMap)
	if err != nil {
		f.t.Fatal(err)
	}
	return r.ModRevision
}

// TestBarrierSkipsNodesThatAreDown: a node the map counts down is not waited for; one that is up is, until it
// answers or the map counts it down, and then every other node must have seen that map.
func TestBarrierSkipsNodesThatAreDown(t *testing.T) {
	f := newFixture(t)
	f.volume("disk", false)
	a, addr := f.storageNode()
	dead := etcdtest.FreeAddr(t) // nothing listens there
	f.setNodes(&basaltv1.StorageNode{Id: "a", Up: true, In: true, Address: addr}, &basaltv1.StorageNode{Id: "b", Up: false, In: true, Address: dead})

	att := f.attach("disk", "h1")
	rev := f.get("disk").ModRevision
	if got := a.maxAsked(); got < rev {
		t.Fatalf("the up node was asked for revision %d, want at least the attach's %d", got, rev)
	}
	if att.GetGeneration() != 1 {
		t.Fatalf("generation %d", att.GetGeneration())
	}

	// b is up in the map but does not answer: the barrier waits.
	f.setNodes(&basaltv1.StorageNode{Id: "a", Up: true, In: true, Address: addr}, &basaltv1.StorageNode{Id: "b", Up: true, In: true, Address: dead})
	short, cancel := context.WithTimeout(f.ctx, time.Second)
	defer cancel()
	if _, _, err := f.c.FenceHost(short, "h1"); err == nil || !strings.Contains(err.Error(), "b: ") {
		t.Fatalf("FenceHost with an up node that does not answer = %v, want an error naming it", err)
	}
	done := make(chan error, 1)
	go func() { done <- f.c.Barrier(f.ctx, f.get("disk").ModRevision) }()
	select {
	case err := <-done:
		t.Fatalf("Barrier returned (%v) while an up node had not answered", err)
	case <-time.After(time.Second):
	}
	// Its lease expires: the map counts it down. The barrier ends, and a has confirmed that map.
	f.setNodes(&basaltv1.StorageNode{Id: "a", Up: true, In: true, Address: addr}, &basaltv1.StorageNode{Id: "b", Up: false, In: true, Address: dead})
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Barrier still waiting once the silent node was down")
	}
	if got, want := a.maxAsked(), f.mapRevision(); got < want {
		t.Fatalf("the remaining node was asked for revision %d, want at least the map's %d", got, want)
	}
}
