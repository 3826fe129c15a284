package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestMergeFreesSpace: blocks of a layer shadowed by the layer above stay
// live while the checkpoint between them exists (its view reads them),
// through compaction and restart, and become garbage that compaction frees
// once the checkpoint is deleted.
func TestMergeFreesSpace(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 1 << 20, GCInterval: -1}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()
	const nobj = 4 // 16 MiB
	p := make([]byte, 256<<10)
	writeAll := func(tag uint32, seed uint64) {
		for i := range nobj {
			for off := int64(0); off < ObjectSize; off += int64(len(p)) {
				fillPattern(p, seed^uint64(i)<<32^uint64(off))
				if err := e.Write(ctx, ObjectID{1, uint64(i)}, off, p, WriteOptions{Version: uint64(tag) + 1, Layer: tag}); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	// checkView checks that view v of every object holds what writeAll
	// wrote with seed.
	got := make([]byte, len(p))
	checkView := func(v uint32, seed uint64) {
		t.Helper()
		for i := range nobj {
			for off := int64(0); off < ObjectSize; off += int64(len(p)) {
				fillPattern(p, seed^uint64(i)<<32^uint64(off))
				if err := e.ReadView(ctx, ObjectID{1, uint64(i)}, v, off, got); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, p) {
					t.Fatalf("view %d of object %d at %d: wrong content", v, i, off)
				}
			}
		}
	}
	const mib = nobj * ObjectSize >> 20
	writeAll(0, 100) // layer 0
	writeAll(1, 200) // checkpoint 1 taken: layer 1 shadows all of layer 0
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	d1 := diskBytes(t, dir)
	if d1 < 2*mib<<20 {
		t.Fatalf("%d bytes on disk after compaction with checkpoint 1 live, want at least %d MiB: the collector freed blocks its view needs", d1, 2*mib)
	}
	u, err := e.Usage(ctx, 1, []uint32{1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := (map[uint32]Usage{0: {Visible: mib << 20}, 1: {Visible: mib << 20, Exclusive: mib << 20}}); u[0] != want[0] || u[1] != want[1] {
		t.Fatalf("usage %v, want %v", u, want)
	}
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	checkView(1, 100)
	checkView(0, 200)

	start := time.Now()
	if err := e.DeleteCheckpoint(ctx, 1, 1); err != nil {
		t.Fatal(err)
	}
	merged := time.Since(start)
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	d2 := diskBytes(t, dir)
	t.Logf("%d MiB on disk with checkpoint 1, %d MiB after deleting it (merge %v) and compacting", d1>>20, d2>>20, merged)
	if d2 > mib<<20+2*opts.SegmentSize {
		t.Fatalf("%d bytes on disk after merging and compacting, live data is %d MiB", d2, mib)
	}
	if st := e.Stats(); st.LiveBytes != mib<<20 {
		t.Fatalf("live bytes %d after the merge, want %d MiB", st.LiveBytes, mib)
	}
	checkView(0, 200)
	ls, err := e.Layers(ctx, ObjectID{1, 0})
	if err != nil || len(ls) != 1 || ls[0].Tag != 0 {
		t.Fatalf("layers after merging 1 into 0: %v %v", ls, err)
	}
	// The deletion survives a restart, idempotently.
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	if err := e.DeleteCheckpoint(ctx, 1, 1); err != nil {
		t.Fatal(err)
	}
	checkView(0, 200)
	if err := e.DeleteCheckpoint(ctx, 1, 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("deleting checkpoint 0: %v", err)
	}
	// Deleting the volume forgets its deleted checkpoints: a re-created
	// volume has its own layer 1.
	if err := e.DeleteVolume(ctx, 1); err != nil {
		t.Fatal(err)
	}
	writeAll(0, 300)
	writeAll(1, 400)
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	checkView(1, 300)
	checkView(0, 400)
}

// TestConcurrentDeleteCheckpoint reads and writes one volume while its
// checkpoints are deleted: writers (each with its own objects) write at
// the newest tag and check the head; readers check the views of the
// checkpoints that stay; a deleter deletes the others one by one, merging
// layers under the I/O; the collector runs throughout. Run it with -race.
func TestConcurrentDeleteCheckpoint(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 1 << 20, GCInterval: time.Millisecond, GCRate: -1, GCThreshold: 0.7}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	const (
		vol     = 3
		writers = 4
		objs    = 2 // per writer
		ckpts   = 12
	)
	id := func(w, i int) ObjectID { return ObjectID{vol, uint64(w*objs + i)} }
	// Build layers 0..ckpts, each rewriting random runs of every object.
	r := rand.New(rand.NewPCG(5, 5))
	buf := make([]byte, 64<<10)
	for tag := uint32(0); tag <= ckpts; tag++ {
		for w := range writers {
			for i := range objs {
				for range 16 {
					n := int64(1+r.IntN(len(buf)/BlockSize)) * BlockSize
					off := min(int64(r.IntN(objectBlocks))*BlockSize, ObjectSize-n)
					fillPattern(buf[:n], r.Uint64())
					if err := e.Write(ctx, id(w, i), off, buf[:n], WriteOptions{Version: 1, Layer: tag}); err != nil {
						t.Fatal(err)
					}
				}
				if r.IntN(2) == 0 {
					off := int64(r.IntN(objectBlocks)) * BlockSize
					if err := e.Trim(ctx, id(w, i), off, BlockSize*8, WriteOptions{Version: 1, Layer: tag}); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
	}
	// The even checkpoints stay: their views must not change.
	views := map[uint32]map[ObjectID][]byte{}
	for c := uint32(2); c <= ckpts; c += 2 {
		views[c] = map[ObjectID][]byte{}
		for w := range writers {
			for i := range objs {
				p := make([]byte, ObjectSize)
				if err := e.ReadView(ctx, id(w, i), c, 0, p); err != nil {
					t.Fatal(err)
				}
				views[c][id(w, i)] = p
			}
		}
	}
	d := time.Second
	if testing.Short() {
		d = 300 * time.Millisecond
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	models := make([]map[ObjectID][]byte, writers)
	for w := range writers {
		models[w] = map[ObjectID][]byte{}
		for i := range objs {
			p := make([]byte, ObjectSize)
			if err := e.Read(ctx, id(w, i), 0, p); err != nil {
				t.Fatal(err)
			}
			models[w][id(w, i)] = p
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			p, got := make([]byte, 64<<10), make([]byte, 64<<10)
			for !stop.Load() {
				oid := id(w, r.IntN(objs))
				m := models[w][oid]
				n := int64(1+r.IntN(len(p)/SectorSize)) * SectorSize
				off := min(int64(r.IntN(ObjectSize/SectorSize))*SectorSize, ObjectSize-n)
				wo := WriteOptions{Version: 2, Layer: ckpts + 1}
				if r.IntN(4) == 0 {
					if err := e.Trim(ctx, oid, off, n, wo); err != nil {
						t.Error(err)
						return
					}
					clear(m[off : off+n])
				} else {
					fillPattern(p[:n], r.Uint64())
					if err := e.Write(ctx, oid, off, p[:n], wo); err != nil {
						t.Error(err)
						return
					}
					copy(m[off:], p[:n])
				}
				if err := e.Read(ctx, oid, off, got[:n]); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got[:n], m[off:off+n]) {
					t.Errorf("writer %d: head of %v at %d length %d differs from its model", w, oid, off, n)
					return
				}
			}
		}()
	}
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 10))
			got := make([]byte, 256<<10)
			for !stop.Load() {
				c := uint32(2 + 2*r.IntN(ckpts/2))
				oid := id(r.IntN(writers), r.IntN(objs))
				off := int64(r.IntN(ObjectSize/len(got))) * int64(len(got))
				if err := e.ReadView(ctx, oid, c, off, got); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, views[c][oid][off:off+int64(len(got))]) {
					t.Errorf("view %d of %v at %d changed while checkpoints were deleted", c, oid, off)
					return
				}
				if _, err := e.Changed(ctx, oid, c, 0); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	deleted := make(chan struct{})
	go func() {
		defer close(deleted)
		for c := uint32(1); c <= ckpts; c += 2 {
			time.Sleep(d / ckpts)
			if err := e.DeleteCheckpoint(ctx, vol, c); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	<-deleted
	time.Sleep(d / ckpts)
	stop.Store(true)
	wg.Wait()
	check := func() {
		t.Helper()
		p := make([]byte, ObjectSize)
		for c, vs := range views {
			for oid, want := range vs {
				if err := e.ReadView(ctx, oid, c, 0, p); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(p, want) {
					t.Fatalf("view %d of %v changed", c, oid)
				}
			}
		}
		for w := range writers {
			for oid, want := range models[w] {
				if err := e.Read(ctx, oid, 0, p); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(p, want) {
					t.Fatalf("head of %v differs from its writer's model", oid)
				}
				ls, err := e.Layers(ctx, oid)
				if err != nil {
					t.Fatal(err)
				}
				for _, l := range ls {
					if l.Tag%2 == 1 && l.Tag <= ckpts {
						t.Fatalf("%v still has layer %d after its deletion", oid, l.Tag)
					}
				}
			}
		}
	}
	check()
	t.Logf("%+v", e.Stats())
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	check()
}

// TestReplayCopiedClearAfterMerge: a CLEAR copied forward by the collector
// keeps its sequence number and is replayed after records newer than it.
// Replay must not let a record the clear removes shadow, meanwhile, a newer
// one it keeps: here a zero extent of raw tag 2 (which outranks raw tag 0
// once checkpoints 1 and 2 are deleted and both share layer 0) over a
// later write of tag 0. The lost blocks used to read as a hole after a
// restart (found by TestLayersModelBackgroundGC, seed 3).
func TestReplayCopiedClearAfterMerge(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	opts := Options{SegmentSize: 1 << 20, GCInterval: -1, GCThreshold: 0.5}
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()
	id, filler, scratch := ObjectID{2, 5}, ObjectID{1, 0}, ObjectID{1, 1}
	roll := func() {
		t.Helper()
		e.appendMu.Lock()
		err := e.rollLocked()
		e.appendMu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	write := func(id ObjectID, blocks int, tag uint32, seed uint64) {
		t.Helper()
		p := make([]byte, blocks*BlockSize)
		fillPattern(p, seed)
		if err := e.Write(ctx, id, 0, p, WriteOptions{Version: 1, Layer: tag}); err != nil {
			t.Fatal(err)
		}
	}
	want := []Extent{{0, 8 * BlockSize, false, false}, {8 * BlockSize, ObjectSize - 8*BlockSize, true, false}}
	check := func(when string) {
		t.Helper()
		got, err := e.ExtentsView(ctx, id, 0, 0, ObjectSize)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: extents of %v:\n got %v\nwant %v", when, id, got, want)
		}
	}

	// Segment A, kept by the collector (mostly live): a zero extent of
	// raw tag 2 over blocks 0..3, which the clear below removes.
	if err := e.Trim(ctx, id, 0, 4*BlockSize, WriteOptions{Version: 1, Layer: 2, Opaque: true}); err != nil {
		t.Fatal(err)
	}
	write(filler, 48, 0, 1)
	roll()
	// Segment B, collected (mostly dead): the clear.
	if err := e.ClearObject(ctx, id, WriteOptions{Version: 1}); err != nil {
		t.Fatal(err)
	}
	write(scratch, 40, 0, 2)
	roll()
	// Checkpoints 1 and 2 deleted, merged later (as DeleteCheckpoint does
	// when split): raw tags 2 and 0 now share layer 0.
	for _, c := range []uint32{1, 2} {
		if err := e.markDeleted(id.Volume, c); err != nil {
			t.Fatal(err)
		}
	}
	write(scratch, 40, 0, 3) // B's blocks become garbage
	write(id, 8, 0, 4)       // newer than the clear: must survive it
	e.mergeVolume(id.Volume)
	check("before compaction")
	// Collecting B copies the clear (A may still hold what it hides) to the
	// head, after the write of tag 0.
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.Stats().Segments; n != 2 {
		t.Fatalf("%d segments after compaction, want 2 (A and the head)", n)
	}
	check("after compaction")
	for i := range 2 {
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		if e, err = Open(dir, opts); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("after restart %d", i+1))
	}
}
