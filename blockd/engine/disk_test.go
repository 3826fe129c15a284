package engine

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of what is on disk: torn tails, corruption, reclaimed space.

func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range ents {
		in, err := os.Open(filepath.Join(src, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		out.Close()
	}
	return dst
}

// diskBytes is the sum of the sizes of the segment files in dir.
func diskBytes(t testing.TB, dir string) int64 {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, de := range ents {
		if strings.HasPrefix(de.Name(), "seg-") {
			fi, err := de.Info()
			if err != nil {
				t.Fatal(err)
			}
			n += fi.Size()
		}
	}
	return n
}

// locate returns the segment file and offset holding block b of id.
func locate(t testing.TB, e *Engine, id ObjectID, b uint32) (string, int64) {
	t.Helper()
	e.idx.RLock()
	defer e.idx.RUnlock()
	o := e.ix.lookup(id)
	if o == nil {
		t.Fatalf("no object %v", id)
	}
	for i := len(o.layers) - 1; i >= 0; i-- {
		for _, x := range overlappingInto(o.layers[i].tree, b, b+1, nil) {
			if !x.zero() {
				return e.ix.segs[x.seg].path, int64(x.off) + int64(b-x.start)*BlockSize
			}
		}
	}
	t.Fatalf("block %d of %v is a hole", b, id)
	return "", 0
}

func modifyFile(t testing.TB, path string, fn func(f *os.File)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fn(f)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func flipByte(t testing.TB, path string, off int64, mask byte) {
	modifyFile(t, path, func(f *os.File) {
		b := []byte{0}
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= mask
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	})
}

// verifyModel opens dir and checks every object the model knows.
func verifyModel(t testing.TB, dir string, opts Options, m *model, ids []ObjectID) *Engine {
	t.Helper()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	got, want := make([]byte, ObjectSize), make([]byte, ObjectSize)
	for _, id := range ids {
		if err := e.Read(context.Background(), id, 0, got); err != nil {
			t.Fatalf("read %v: %v", id, err)
		}
		m.read(id, 0, want)
		if !bytes.Equal(got, want) {
			t.Fatalf("object %v differs from the model", id)
		}
	}
	return e
}

func TestTornTail(t *testing.T) {
	ctx := context.Background()
	opts := Options{GCInterval: -1}
	src := t.TempDir()
	e, err := Open(src, opts)
	if err != nil {
		t.Fatal(err)
	}
	m := newModel()
	ids := []ObjectID{{1, 0}, {1, 1}, {1, 2}}
	r := rand.New(rand.NewPCG(3, 3))
	for i := range 12 {
		id := ids[i%len(ids)]
		n := int64(1+r.IntN(40)) * SectorSize
		off := int64(r.IntN(64)) * SectorSize
		p := make([]byte, n)
		fillPattern(p, uint64(i))
		if err := e.Write(ctx, id, off, p, WriteOptions{Version: uint64(i + 1)}); err != nil {
			t.Fatal(err)
		}
		m.write(id, off, p, uint64(i+1))
	}
	if err := e.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	// The last record: not synced, and over earlier data, so that dropping
	// it must bring the earlier data back.
	e.appendMu.Lock()
	rStart := e.headOff
	e.appendMu.Unlock()
	last := make([]byte, 3*BlockSize)
	fillPattern(last, 99)
	if err := e.Write(ctx, ids[0], 0, last, WriteOptions{Version: 100}); err != nil {
		t.Fatal(err)
	}
	e.appendMu.Lock()
	rEnd, seg := e.headOff, filepath.Base(e.head.path)
	e.appendMu.Unlock()
	image := copyDir(t, src) // what a crash right now would leave
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	withLast := newModel()
	for id, o := range m.objs {
		c := *o
		c.data = bytes.Clone(o.data)
		withLast.objs[id] = &c
	}
	withLast.write(ids[0], 0, last, 100)

	// check opens a damaged copy of the image and verifies that exactly
	// the last record was dropped (or kept).
	check := func(what string, damage func(path string), keep bool) {
		t.Helper()
		dir := copyDir(t, image)
		path := filepath.Join(dir, seg)
		damage(path)
		want := m
		if keep {
			want = withLast
		}
		e := verifyModel(t, dir, opts, want, ids)
		if !keep {
			if fi, err := os.Stat(path); err != nil || fi.Size() != rStart {
				t.Errorf("%s: segment is %d bytes after recovery, want %d", what, fi.Size(), rStart)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	check("intact", func(string) {}, true)
	var cuts []int64
	for c := rStart; c < rEnd; c++ {
		if c < rStart+recHeaderSize+16 || c%509 == 0 || c > rEnd-3 {
			cuts = append(cuts, c)
		}
	}
	if testing.Short() {
		cuts = everyNth(cuts, 8)
	}
	for _, c := range cuts {
		check("truncated", func(path string) {
			if err := os.Truncate(path, c); err != nil {
				t.Fatal(err)
			}
		}, false)
	}
	// Garbled bytes anywhere in the record: header, CRC array, data.
	for _, at := range []int64{0, 4, 8, 12, 20, 33, 41, 49, 60, 63, 64, 66, 70, 72, 100, 4000, 8300, rEnd - rStart - 1} {
		check("garbled", func(path string) { flipByte(t, path, rStart+at, 0x40) }, false)
	}
	// Garbage or zeros after the last record: the record stays.
	check("garbage after", func(path string) {
		modifyFile(t, path, func(f *os.File) {
			junk := make([]byte, 10000)
			fillPattern(junk, 5)
			f.WriteAt(junk, rEnd)
		})
	}, true)
	check("zeros after", func(path string) {
		if err := os.Truncate(path, rEnd+123456); err != nil {
			t.Fatal(err)
		}
	}, true)

	// A damaged record that a sync marker after it shows was durable is
	// corruption, not a torn tail: Open must refuse, not drop it.
	dir := copyDir(t, image)
	flipByte(t, filepath.Join(dir, seg), segHeaderSize+20, 1)
	if _, err := Open(dir, opts); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a damaged durable record: %v, want ErrCorrupt", err)
	} else {
		t.Logf("as expected: %v", err)
	}
}

func TestSealedSegmentDamage(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 64 << 10, GCInterval: -1}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 16*BlockSize)
	for i := range 8 {
		fillPattern(p, uint64(i))
		if err := e.Write(ctx, ObjectID{1, uint64(i)}, 0, p, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if st := e.Stats(); st.Segments < 3 {
		t.Fatalf("only %d segments", st.Segments)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, segName(1))
	flipByte(t, path, segHeaderSize+30, 2) // header of the first record
	_, err = Open(dir, opts)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), segName(1)) {
		t.Fatalf("open with a damaged sealed segment: %v, want ErrCorrupt naming %s", err, segName(1))
	}
	t.Logf("as expected: %v", err)
}

func TestCorruption(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 1 << 20, GCInterval: -1, GCThreshold: 0.9}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	id := ObjectID{3, 4}
	m := newModel()
	p := make([]byte, 16*BlockSize)
	for i := range 4 {
		fillPattern(p, uint64(i))
		if err := e.Write(ctx, id, int64(i)*int64(len(p)), p, WriteOptions{Version: 1}); err != nil {
			t.Fatal(err)
		}
		m.write(id, int64(i)*int64(len(p)), p, 1)
	}
	const bad = 37
	path, off := locate(t, e, id, bad)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	flipByte(t, path, off+100, 0x10)
	e, err = Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()

	checkBad := func(what string, err error) {
		t.Helper()
		var ce *CorruptError
		if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) {
			t.Fatalf("%s: %v, want a CorruptError", what, err)
		}
		if ce.ID != id || ce.Offset != bad*BlockSize || ce.Length != BlockSize {
			t.Fatalf("%s: error names %v [%d,+%d), want %v [%d,+%d)", what, ce.ID, ce.Offset, ce.Length, id, bad*BlockSize, BlockSize)
		}
	}
	buf := make([]byte, 64*BlockSize)
	checkBad("read of the object", e.Read(ctx, id, 0, buf))
	checkBad("read of a sector of the block", e.Read(ctx, id, bad*BlockSize+1024, buf[:512]))
	// The other blocks still read.
	want := make([]byte, len(buf))
	m.read(id, 0, want)
	if err := e.Read(ctx, id, 0, buf[:bad*BlockSize]); err != nil || !bytes.Equal(buf[:bad*BlockSize], want[:bad*BlockSize]) {
		t.Fatalf("read before the bad block: %v", err)
	}
	if err := e.Read(ctx, id, (bad+1)*BlockSize, buf[(bad+1)*BlockSize:]); err != nil || !bytes.Equal(buf[(bad+1)*BlockSize:], want[(bad+1)*BlockSize:]) {
		t.Fatalf("read after the bad block: %v", err)
	}
	scrub := func() (ScrubStats, []CorruptError) {
		t.Helper()
		var found []CorruptError
		st, err := e.Scrub(ctx, func(gid ObjectID, off, n int64, err error) {
			var ce *CorruptError
			if !errors.As(err, &ce) || ce.ID != gid || ce.Offset != off || ce.Length != n {
				t.Errorf("scrub reported %v [%d,+%d) with %v", gid, off, n, err)
			}
			found = append(found, *ce)
		})
		if err != nil {
			t.Fatal(err)
		}
		return st, found
	}
	st, found := scrub()
	if len(found) != 1 || found[0].ID != id || found[0].Offset != bad*BlockSize || found[0].Length != BlockSize || st.BadBlocks != 1 || st.Blocks != 64 {
		t.Fatalf("scrub found %+v (%+v), want exactly block %d", found, st, bad)
	}
	if _, err := e.ObjectChecksum(ctx, id); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("checksum of a corrupt object: %v", err)
	}
	// A sector write into the bad block cannot merge with it.
	checkBad("partial write into the bad block", e.Write(ctx, id, bad*BlockSize, buf[:512], WriteOptions{}))

	// The collector moves the bad block without laundering it.
	for b := range 64 {
		if b == bad {
			continue
		}
		fillPattern(p[:BlockSize], uint64(1000+b))
		if err := e.Write(ctx, id, int64(b)*BlockSize, p[:BlockSize], WriteOptions{Version: 2}); err != nil {
			t.Fatal(err)
		}
		m.write(id, int64(b)*BlockSize, p[:BlockSize], 2)
	}
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	if p2, _ := locate(t, e, id, bad); p2 == path {
		t.Fatalf("the bad block was not moved by compaction")
	}
	checkBad("read after compaction", e.Read(ctx, id, bad*BlockSize, buf[:BlockSize]))

	// A full rewrite (what the replication layer does) heals it.
	fillPattern(p[:BlockSize], 7777)
	if err := e.Write(ctx, id, bad*BlockSize, p[:BlockSize], WriteOptions{Version: 3}); err != nil {
		t.Fatal(err)
	}
	m.write(id, bad*BlockSize, p[:BlockSize], 3)
	if st, found := scrub(); len(found) != 0 || st.BadBlocks != 0 {
		t.Fatalf("scrub after repair: %+v", found)
	}
	e.Close()
	e = verifyModel(t, dir, opts, m, []ObjectID{id})
	sum, err := e.ObjectChecksum(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	// Equal content, different layout: equal checksum.
	other, err := Open(t.TempDir(), Options{GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	m.read(id, 0, buf)
	for i := len(buf) - BlockSize; i >= 0; i -= BlockSize { // backwards, one block at a time
		if err := other.Write(ctx, id, int64(i), buf[i:i+BlockSize], WriteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if sum2, err := other.ObjectChecksum(ctx, id); err != nil || sum2 != sum {
		t.Fatalf("checksums differ for equal content: %x %x %v", sum, sum2, err)
	}
}

func TestSpaceReclaimed(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 1 << 20, GCInterval: -1}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()
	mib := int64(32)
	if testing.Short() {
		mib = 8
	}
	nobj := mib * (1 << 20) / ObjectSize
	p := make([]byte, 256<<10)
	writeAll := func(vol uint64, chunk int, version uint64) {
		for i := range nobj {
			for off := int64(0); off < ObjectSize; off += int64(chunk) {
				fillPattern(p[:chunk], uint64(off)^version)
				if err := e.Write(ctx, ObjectID{vol, uint64(i)}, off, p[:chunk], WriteOptions{Version: version}); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	writeAll(1, 256<<10, 1)
	writeAll(1, 64<<10, 2) // overwrite everything
	if d := diskBytes(t, dir); d < 2*mib<<20 {
		t.Fatalf("disk usage %d after writing %d MiB twice", d, mib)
	}
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	if d := diskBytes(t, dir); d > mib<<20+2*opts.SegmentSize {
		t.Fatalf("disk usage %d after compaction, live data is %d MiB", d, mib)
	}
	for i := range nobj {
		if err := e.Trim(ctx, ObjectID{1, uint64(i)}, 0, ObjectSize, WriteOptions{Version: 3}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	d := diskBytes(t, dir)
	t.Logf("after trimming %d MiB and compacting: %d bytes on disk, %+v", mib, d, e.Stats())
	if d > 64<<10 {
		t.Fatalf("disk usage %d after trimming everything and compacting", d)
	}
	// Trimmed objects keep their versions across restarts and compactions.
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	for i := range nobj {
		id := ObjectID{1, uint64(i)}
		if v := e.ObjectVersion(id); v != 3 {
			t.Fatalf("version of %v after trim, compaction and reopen: %d", id, v)
		}
		ext, err := e.Extents(ctx, id, 0, ObjectSize)
		if err != nil || len(ext) != 1 || !ext[0].Hole {
			t.Fatalf("extents of trimmed %v: %v %v", id, ext, err)
		}
	}
	if objs := e.Objects(1); len(objs) != 0 {
		t.Fatalf("trimmed volume still lists objects %v", objs)
	}

	// Deleting a volume returns its space and forgets it, durably.
	writeAll(2, 256<<10, 1)
	if err := e.DeleteVolume(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := e.DeleteVolume(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := e.Compact(ctx); err != nil {
		t.Fatal(err)
	}
	if d := diskBytes(t, dir); d > 64<<10 {
		t.Fatalf("disk usage %d after deleting every volume and compacting", d)
	}
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	if objs := e.AllObjects(); len(objs) != 0 || e.ObjectVersion(ObjectID{1, 0}) != 0 || e.ObjectVersion(ObjectID{2, 0}) != 0 {
		t.Fatalf("deleted volumes came back: %v", objs)
	}
	// A deleted volume number can be used again.
	fillPattern(p[:BlockSize], 1)
	if err := e.Write(ctx, ObjectID{2, 0}, 0, p[:BlockSize], WriteOptions{Version: 1}); err != nil {
		t.Fatal(err)
	}
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, BlockSize)
	if err := e.Read(ctx, ObjectID{2, 0}, 0, got); err != nil || !bytes.Equal(got, p[:BlockSize]) || e.ObjectVersion(ObjectID{2, 0}) != 1 {
		t.Fatalf("re-created volume: %v", err)
	}
}

// TestDeleteVolumeWhileOldSegmentsRemain checks that a deletion hides the
// volume's records in segments the collector has not reached, across
// restarts, and that a re-created volume's newer data is not hidden.
func TestDeleteVolumeWhileOldSegmentsRemain(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 64 << 10, GCInterval: -1}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 8*BlockSize)
	fillPattern(p, 1)
	for i := range 8 {
		// Volume 5 interleaved with volume 6, which stays live, so the old
		// segments are not collected.
		if err := e.Write(ctx, ObjectID{5, uint64(i)}, 0, p, WriteOptions{Version: 1}); err != nil {
			t.Fatal(err)
		}
		if err := e.Write(ctx, ObjectID{6, uint64(i)}, 0, p, WriteOptions{Version: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.DeleteVolume(ctx, 5); err != nil {
		t.Fatal(err)
	}
	fillPattern(p[:BlockSize], 2)
	if err := e.Write(ctx, ObjectID{5, 3}, BlockSize, p[:BlockSize], WriteOptions{Version: 1}); err != nil {
		t.Fatal(err)
	}
	e.Close()
	if e, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if objs := e.Objects(5); len(objs) != 1 || objs[0] != (ObjectID{5, 3}) {
		t.Fatalf("volume 5 after delete and one new write: %v", objs)
	}
	ext, _ := e.Extents(ctx, ObjectID{5, 3}, 0, 4*BlockSize)
	if want := []Extent{{0, BlockSize, true, false}, {BlockSize, BlockSize, false, false}, {2 * BlockSize, 2 * BlockSize, true, false}}; !equalExtents(ext, want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
	if len(e.Objects(6)) != 8 {
		t.Fatalf("volume 6 lost objects")
	}
}

func equalExtents(a, b []Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestHugeOffsetCostsNothing(t *testing.T) {
	ctx := context.Background()
	p := make([]byte, BlockSize)
	fillPattern(p, 1)
	var stats []Stats
	for _, id := range []ObjectID{{1, 0}, {1, 1<<28 - 1}} {
		dir := t.TempDir()
		e, err := Open(dir, Options{GCInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Write(ctx, id, ObjectSize-BlockSize, p, WriteOptions{Version: 1}); err != nil {
			t.Fatal(err)
		}
		// Discarding unwritten space, even a whole petabyte's objects,
		// stores nothing.
		for i := uint64(1 << 27); i < 1<<27+4096; i++ {
			if err := e.Trim(ctx, ObjectID{1, i}, 0, ObjectSize, WriteOptions{Version: 2}); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]byte, BlockSize)
		if err := e.Read(ctx, id, ObjectSize-BlockSize, got); err != nil || !bytes.Equal(got, p) {
			t.Fatal("read back failed", err)
		}
		stats = append(stats, e.Stats())
		e.Close()
	}
	a, b := stats[0], stats[1]
	t.Logf("object 0: %+v\nobject 2^28-1: %+v", a, b)
	if a.DiskBytes != b.DiskBytes || a.Extents != b.Extents || b.Extents != 1 || b.Objects != 1 || a.LiveBytes != b.LiveBytes {
		t.Fatalf("a write near 1 PiB costs more than one at 0")
	}
}

func TestGroupCommit(t *testing.T) {
	ctx := context.Background()
	e, err := Open(t.TempDir(), Options{GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	const workers, each = 32, 20
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, BlockSize)
			for i := range each {
				fillPattern(p, uint64(w*each+i))
				if err := e.Write(ctx, ObjectID{1, uint64(w)}, int64(i)*BlockSize, p, WriteOptions{Sync: true}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	st := e.Stats()
	t.Logf("%d FUA writes needed a sync, %d fdatasyncs", st.SyncRequests, st.Syncs)
	if st.SyncRequests == 0 || st.Syncs >= st.SyncRequests {
		t.Fatalf("no group commit: %d requests, %d syncs", st.SyncRequests, st.Syncs)
	}
}

// TestSubBlockWritesRace has goroutines write different sectors of the
// same blocks concurrently: the read-modify-write must never lose one.
func TestSubBlockWritesRace(t *testing.T) {
	ctx := context.Background()
	e, err := Open(t.TempDir(), Options{SegmentSize: 256 << 10, GCInterval: time.Millisecond, GCRate: -1, GCThreshold: 0.9})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	id := ObjectID{4, 4}
	const sectors = BlockSize / SectorSize
	rounds := 300
	if testing.Short() {
		rounds = 60
	}
	var wg sync.WaitGroup
	for s := range sectors {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, SectorSize)
			for i := 1; i <= rounds; i++ {
				for b := range 2 { // two blocks, so a write may also span them
					p[0], p[1], p[2] = byte(s), byte(i), byte(i>>8)
					if err := e.Write(ctx, id, int64(b)*BlockSize+int64(s)*SectorSize, p, WriteOptions{}); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	got := make([]byte, 2*BlockSize)
	if err := e.Read(ctx, id, 0, got); err != nil {
		t.Fatal(err)
	}
	for b := range 2 {
		for s := range sectors {
			q := got[b*BlockSize+s*SectorSize:]
			if q[0] != byte(s) || int(q[1])|int(q[2])<<8 != rounds {
				t.Fatalf("block %d sector %d holds %v, want writer %d's last write %d", b, s, q[:3], s, rounds)
			}
		}
	}
}

func everyNth(s []int64, n int) []int64 {
	var out []int64
	for i := 0; i < len(s); i += n {
		out = append(out, s[i])
	}
	return out
}
