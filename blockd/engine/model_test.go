package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"
)

// The model test drives the engine and a trivially correct in-memory model
// (a byte array and an allocated flag per block, per object) with the same
// random operations, and checks every read, every extent map, every
// version and the live-byte accounting against the model.

type mobj struct {
	data    []byte
	alloc   [objectBlocks]bool
	version uint64
}

type model struct {
	objs map[ObjectID]*mobj
}

func newModel() *model { return &model{objs: map[ObjectID]*mobj{}} }

func (m *model) write(id ObjectID, off int64, p []byte, version uint64) {
	o := m.objs[id]
	if o == nil {
		o = &mobj{data: make([]byte, ObjectSize)}
		m.objs[id] = o
	}
	copy(o.data[off:], p)
	for b := off / BlockSize; b < (off+int64(len(p))+BlockSize-1)/BlockSize; b++ {
		o.alloc[b] = true
	}
	o.version = max(o.version, version)
}

func (m *model) trim(id ObjectID, off, n int64, version uint64) {
	o := m.objs[id]
	if o == nil || n == 0 {
		return
	}
	clear(o.data[off : off+n])
	for b := off / BlockSize; b < (off+n+BlockSize-1)/BlockSize; b++ {
		if isZero(o.data[b*BlockSize : (b+1)*BlockSize]) {
			o.alloc[b] = false
		}
	}
	o.version = max(o.version, version)
}

func (m *model) deleteVolume(v uint64) {
	for id := range m.objs {
		if id.Volume == v {
			delete(m.objs, id)
		}
	}
}

func (m *model) read(id ObjectID, off int64, p []byte) {
	if o := m.objs[id]; o != nil {
		copy(p, o.data[off:])
	} else {
		clear(p)
	}
}

func (m *model) extents(id ObjectID, off, n int64) []Extent {
	var out []Extent
	o := m.objs[id]
	for pos := off; pos < off+n; {
		b := pos / BlockSize
		t := min((b+1)*BlockSize, off+n)
		hole := o == nil || !o.alloc[b]
		if k := len(out); k > 0 && out[k-1].Hole == hole {
			out[k-1].Length += t - pos
		} else {
			out = append(out, Extent{Offset: pos, Length: t - pos, Hole: hole})
		}
		pos = t
	}
	return out
}

func (m *model) liveBytes() int64 {
	var n int64
	for _, o := range m.objs {
		for _, a := range o.alloc {
			if a {
				n += BlockSize
			}
		}
	}
	return n
}

func (m *model) objects(v uint64) []ObjectID {
	var ids []ObjectID
	for id, o := range m.objs {
		if id.Volume == v && slices.Contains(o.alloc[:], true) {
			ids = append(ids, id)
		}
	}
	slices.SortFunc(ids, cmpID)
	return ids
}

// Operations.
const (
	opWrite = iota
	opTrim
	opRead
	opExtents
	opSync
	opReopen
	opCompact
	opDeleteVolume
	opCount
)

type op struct {
	kind    int
	id      ObjectID
	off, n  int64
	version uint64
	sync    bool
	seed    uint64
}

func (o op) String() string {
	return fmt.Sprintf("op%d(%v off=%d n=%d v=%d sync=%v)", o.kind, o.id, o.off, o.n, o.version, o.sync)
}

var modelIDs = []ObjectID{{1, 0}, {1, 1}, {1, 1<<28 - 1}, {2, 0}, {2, 5}}

// fillPattern fills p with bytes derived from seed (never all zero).
func fillPattern(p []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], r.Uint64()|1)
	}
}

type harness struct {
	t    testing.TB
	dir  string
	opts Options
	e    *Engine
	m    *model
	buf  []byte
	ebuf []byte
}

func newHarness(t testing.TB, opts Options) *harness {
	h := &harness{t: t, dir: t.TempDir(), opts: opts, m: newModel(),
		buf: make([]byte, ObjectSize), ebuf: make([]byte, ObjectSize)}
	h.open()
	return h
}

func (h *harness) open() {
	h.t.Helper()
	e, err := Open(h.dir, h.opts)
	if err != nil {
		h.t.Fatalf("open: %v", err)
	}
	h.e = e
}

func (h *harness) close() {
	h.t.Helper()
	if h.e != nil {
		if err := h.e.Close(); err != nil {
			h.t.Fatalf("close: %v", err)
		}
		h.e = nil
	}
}

func (h *harness) apply(o op) {
	h.t.Helper()
	ctx := context.Background()
	e := h.e
	switch o.kind {
	case opWrite:
		p := h.buf[:o.n]
		fillPattern(p, o.seed)
		if err := e.Write(ctx, o.id, o.off, p, WriteOptions{Version: o.version, Sync: o.sync}); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.write(o.id, o.off, p, o.version)
	case opTrim:
		if err := e.Trim(ctx, o.id, o.off, o.n, WriteOptions{Version: o.version, Sync: o.sync}); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.trim(o.id, o.off, o.n, o.version)
	case opRead:
		h.checkRead(o.id, o.off, o.n)
	case opExtents:
		h.checkExtents(o.id, o.off, o.n)
	case opSync:
		if err := e.Sync(ctx); err != nil {
			h.t.Fatalf("sync: %v", err)
		}
	case opReopen:
		h.close()
		h.open()
		h.checkAll()
	case opCompact:
		if err := e.Compact(ctx); err != nil {
			h.t.Fatalf("compact: %v", err)
		}
		h.checkAccounting()
	case opDeleteVolume:
		if err := e.DeleteVolume(ctx, o.id.Volume); err != nil {
			h.t.Fatalf("delete volume: %v", err)
		}
		h.m.deleteVolume(o.id.Volume)
	}
}

func (h *harness) checkRead(id ObjectID, off, n int64) {
	h.t.Helper()
	got := h.ebuf[:n]
	if err := h.e.Read(context.Background(), id, off, got); err != nil {
		h.t.Fatalf("read %v at %d length %d: %v", id, off, n, err)
	}
	want := h.buf[:n]
	h.m.read(id, off, want)
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		h.t.Fatalf("read %v at %d length %d: first difference at object offset %d", id, off, n, off+int64(i))
	}
}

func (h *harness) checkExtents(id ObjectID, off, n int64) {
	h.t.Helper()
	got, err := h.e.Extents(context.Background(), id, off, n)
	if err != nil {
		h.t.Fatalf("extents: %v", err)
	}
	if want := h.m.extents(id, off, n); !slices.Equal(got, want) {
		h.t.Fatalf("extents of %v at %d length %d:\n got %v\nwant %v", id, off, n, got, want)
	}
}

func (h *harness) checkAccounting() {
	h.t.Helper()
	if got, want := h.e.Stats().LiveBytes, h.m.liveBytes(); got != want {
		h.t.Fatalf("live bytes %d, model %d", got, want)
	}
}

func (h *harness) checkAll() {
	h.t.Helper()
	for _, id := range modelIDs {
		h.checkRead(id, 0, ObjectSize)
		h.checkExtents(id, 0, ObjectSize)
		var want uint64
		if o := h.m.objs[id]; o != nil {
			want = o.version
		}
		if got := h.e.ObjectVersion(id); got != want {
			h.t.Fatalf("version of %v: %d, model %d", id, got, want)
		}
	}
	for _, v := range []uint64{1, 2} {
		if got, want := h.e.Objects(v), h.m.objects(v); !slices.Equal(got, want) {
			h.t.Fatalf("objects of volume %d: %v, model %v", v, got, want)
		}
	}
	h.checkAccounting()
}

// randomOp draws an operation; offsets and lengths favour the interesting
// cases: sector-aligned but not block-aligned, spanning record and block
// boundaries, whole objects.
func randomOp(r *rand.Rand, version uint64) op {
	o := op{id: modelIDs[r.IntN(len(modelIDs))], version: version, seed: r.Uint64()}
	if r.IntN(10) == 0 {
		o.version = version / 2 // out of order: the object keeps the max
	}
	switch x := r.IntN(100); {
	case x < 45:
		o.kind = opWrite
	case x < 60:
		o.kind = opTrim
	case x < 80:
		o.kind = opRead
	case x < 88:
		o.kind = opExtents
	case x < 92:
		o.kind = opSync
	case x < 95:
		o.kind = opCompact
	case x < 97:
		o.kind = opReopen
	case x < 98:
		o.kind = opDeleteVolume
	default:
		o.kind = opWrite
		o.off, o.n = 0, ObjectSize
		return o
	}
	sectors := int64(ObjectSize / SectorSize)
	switch r.IntN(4) {
	case 0: // small, sector granular
		o.n = int64(1+r.IntN(16)) * SectorSize
	case 1: // block granular
		o.n = int64(1+r.IntN(32)) * BlockSize
	case 2: // large, crossing records
		o.n = int64(1+r.IntN(int(sectors/2))) * SectorSize
	default:
		o.n = int64(1+r.IntN(64)) * SectorSize
	}
	if r.IntN(2) == 0 {
		o.off = int64(r.IntN(int(sectors))) * SectorSize
	} else {
		o.off = int64(r.IntN(objectBlocks)) * BlockSize
	}
	o.off = min(o.off, ObjectSize-o.n)
	o.sync = r.IntN(8) == 0
	return o
}

func modelOpts() Options {
	return Options{SegmentSize: 256 << 10, GCInterval: -1}
}

func runModel(t *testing.T, opts Options, seed uint64, n int) {
	h := newHarness(t, opts)
	defer h.close()
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range n {
		h.apply(randomOp(r, uint64(i+1)))
		if i%64 == 0 {
			h.checkAccounting()
		}
	}
	h.checkAll()
	h.apply(op{kind: opReopen})
}

func TestModel(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 800
	}
	runModel(t, modelOpts(), 1, n)
}

// TestModelBackgroundGC runs the model with the background collector
// compacting continuously under the operations.
func TestModelBackgroundGC(t *testing.T) {
	n := 1500
	if testing.Short() {
		n = 400
	}
	opts := modelOpts()
	opts.GCInterval = time.Millisecond
	opts.GCRate = -1
	opts.GCThreshold = 0.9
	runModel(t, opts, 2, n)
}

// FuzzEngineOps drives the model from fuzz input: each operation takes 7
// bytes (kind, object, offset, length, flags), at most 64 operations.
func FuzzEngineOps(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 8, 0, 2, 0, 0, 1, 0, 8, 0, 5, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0, 1, 3, 1, 0, 2, 1, 1, 1, 3, 1, 0, 1, 0, 6, 1, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 1, 0})
	f.Add(bytes.Repeat([]byte{0, 2, 7, 1, 3, 9, 0, 1, 2, 7, 0, 0, 4, 0}, 12))
	f.Fuzz(fuzzOps)
}

func fuzzOps(t *testing.T, data []byte) {
	// A hang must fail the input, not stall the fuzzer silently.
	watchdog := time.AfterFunc(time.Minute, func() {
		buf := make([]byte, 1<<20)
		panic(fmt.Sprintf("input ran for a minute:\n%s", buf[:runtime.Stack(buf, true)]))
	})
	defer watchdog.Stop()
	opts := Options{SegmentSize: 128 << 10, GCInterval: -1}
	h := newHarness(t, opts)
	defer h.close()
	for i := 0; i+7 <= len(data) && i < 7*64; i += 7 {
		b := data[i : i+7]
		o := op{
			kind:    int(b[0]) % opCount,
			id:      modelIDs[int(b[1])%len(modelIDs)],
			version: uint64(i/7 + 1),
			sync:    b[6]&1 != 0,
			seed:    uint64(i),
		}
		if b[6]&2 != 0 {
			o.version /= 2
		}
		// Offsets in sectors within the object; lengths up to 128 KiB,
		// or the whole object.
		o.off = int64(binary.LittleEndian.Uint16(b[2:])) % (ObjectSize / SectorSize) * SectorSize
		o.n = (int64(binary.LittleEndian.Uint16(b[4:]))%256 + 1) * SectorSize
		if b[6]&12 == 12 {
			o.off, o.n = 0, ObjectSize
		}
		o.n = min(o.n, ObjectSize-o.off)
		h.apply(o)
	}
	h.checkAll()
	h.apply(op{kind: opReopen})
}

func TestInvalid(t *testing.T) {
	e, err := Open(t.TempDir(), Options{GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	id := ObjectID{1, 2}
	p := make([]byte, 4096)
	for _, c := range []struct {
		off int64
		n   int
	}{{1, 512}, {0, 100}, {ObjectSize - 512, 1024}, {-512, 512}, {ObjectSize, 512}} {
		if err := e.Write(ctx, id, c.off, p[:c.n], WriteOptions{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("write at %d length %d: %v, want ErrInvalid", c.off, c.n, err)
		}
		if err := e.Read(ctx, id, c.off, p[:c.n]); !errors.Is(err, ErrInvalid) {
			t.Errorf("read at %d length %d: %v, want ErrInvalid", c.off, c.n, err)
		}
		if err := e.Trim(ctx, id, c.off, int64(c.n), WriteOptions{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("trim at %d length %d: %v, want ErrInvalid", c.off, c.n, err)
		}
	}
	if _, err := Open(e.dir, Options{}); err == nil {
		t.Error("a second Open of the same directory succeeded")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Write(ctx, id, 0, p, WriteOptions{}); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
	if err := e.Read(ctx, id, 0, p); !errors.Is(err, ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if _, err := Open(t.TempDir(), Options{SegmentSize: 1000}); !errors.Is(err, ErrInvalid) {
		t.Errorf("tiny segment size: %v", err)
	}
}

func TestNoSpaceMapping(t *testing.T) {
	// A real full file system needs a mount, which tests should not do;
	// this checks the mapping every write path goes through.
	for _, errno := range []error{syscall.ENOSPC, syscall.EDQUOT} {
		err := fmt.Errorf("engine: write: %w", ioErr("appending to seg-1.log", errno))
		if !errors.Is(err, ErrNoSpace) || !errors.Is(err, errno) {
			t.Errorf("%v: not ErrNoSpace and %v", err, errno)
		}
	}
	if err := ioErr("reading", syscall.EIO); errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.EIO) {
		t.Errorf("EIO mapped to %v", err)
	}
}
