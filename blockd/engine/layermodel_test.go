package engine

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// The layered model test: like the model test, but every write and trim
// carries a layer tag, checkpoints bump the tags, DeleteCheckpoint merges
// layers, and reads, extents and Changed are checked at random views. The
// model keeps, per block of each object, the newest entry (by raw tag, then
// sequence number) of each effective layer, and derives every view from
// them; it knows nothing of extents, records or segments.

const (
	kindData = iota
	kindZero
	kindRemove // a trim in layer 0: the layer holds nothing here
)

type lentry struct {
	tag  uint32 // raw
	seq  uint64
	kind int
	data []byte // kindData: BlockSize bytes
}

func (x lentry) newer(y lentry) bool {
	if x.tag != y.tag {
		return x.tag > y.tag
	}
	return x.seq > y.seq
}

type lobj struct {
	blocks  [objectBlocks][]lentry // the newest entry of each effective layer
	version uint64
}

type lmodel struct {
	objs   map[ObjectID]*lobj
	newest map[uint64]uint32          // per volume: the newest checkpoint
	gone   map[uint64]map[uint32]bool // per volume: deleted checkpoints
	seq    uint64
}

func newLModel() *lmodel {
	return &lmodel{objs: map[ObjectID]*lobj{}, newest: map[uint64]uint32{}, gone: map[uint64]map[uint32]bool{}}
}

func (m *lmodel) eff(vol uint64, r uint32) uint32 {
	for r > 0 && m.gone[vol][r] {
		r--
	}
	return r
}

func (m *lmodel) obj(id ObjectID) *lobj {
	o := m.objs[id]
	if o == nil {
		o = &lobj{}
		m.objs[id] = o
	}
	return o
}

// put records x in block b unless its layer holds a newer entry.
func (m *lmodel) put(id ObjectID, o *lobj, b int, x lentry) {
	l := m.eff(id.Volume, x.tag)
	for i, y := range o.blocks[b] {
		if m.eff(id.Volume, y.tag) == l {
			if x.newer(y) {
				o.blocks[b][i] = x
			}
			return
		}
	}
	o.blocks[b] = append(o.blocks[b], x)
}

// winner returns what the layers of block b with an effective tag in
// [lo, hi) show: the entry of the highest such layer that holds the block.
func (m *lmodel) winner(id ObjectID, b int, lo, hi uint64) (lentry, bool) {
	o := m.objs[id]
	if o == nil {
		return lentry{}, false
	}
	var best lentry
	found := false
	for _, x := range o.blocks[b] {
		l := uint64(m.eff(id.Volume, x.tag))
		if x.kind == kindRemove || l < lo || l >= hi {
			continue
		}
		if !found || x.newer(best) {
			best, found = x, true
		}
	}
	return best, found
}

func viewRange(v uint32) (uint64, uint64) {
	if v == 0 {
		return 0, 1 << 40
	}
	return 0, uint64(v)
}

// content fills p with block b as the layers in [lo, hi) show it; it
// reports whether any holds it.
func (m *lmodel) content(id ObjectID, b int, lo, hi uint64, p []byte) bool {
	x, ok := m.winner(id, b, lo, hi)
	if ok && x.kind == kindData {
		copy(p, x.data)
	} else {
		clear(p)
	}
	return ok
}

func (m *lmodel) write(id ObjectID, off int64, p []byte, version uint64, tag uint32) {
	m.seq++
	o := m.obj(id)
	upTo := uint64(m.eff(id.Volume, tag)) + 1
	for b := off / BlockSize; b*BlockSize < off+int64(len(p)); b++ {
		blk := make([]byte, BlockSize)
		m.content(id, int(b), 0, upTo, blk)
		bs := b * BlockSize
		s, t := max(bs, off), min(bs+BlockSize, off+int64(len(p)))
		copy(blk[s-bs:t-bs], p[s-off:t-off])
		m.put(id, o, int(b), lentry{tag: tag, seq: m.seq, kind: kindData, data: blk})
	}
	o.version = max(o.version, version)
}

func (m *lmodel) trim(id ObjectID, off, n int64, version uint64, tag uint32, opaque bool) {
	if n == 0 || (m.objs[id] == nil && !opaque) {
		return
	}
	m.seq++
	o := m.obj(id)
	upTo := uint64(m.eff(id.Volume, tag)) + 1
	zeros := tag > 0 || opaque
	whole := lentry{tag: tag, seq: m.seq, kind: kindRemove}
	if zeros {
		whole.kind = kindZero
	}
	for b := off / BlockSize; b*BlockSize < off+n; b++ {
		bs := b * BlockSize
		if bs >= off && bs+BlockSize <= off+n {
			m.put(id, o, int(b), whole)
			continue
		}
		blk := make([]byte, BlockSize)
		held := m.content(id, int(b), 0, upTo, blk)
		s, t := max(bs, off), min(bs+BlockSize, off+n)
		clear(blk[s-bs : t-bs])
		switch {
		case !held && zeros && !opaque:
		case isZero(blk):
			m.put(id, o, int(b), whole)
		default:
			m.put(id, o, int(b), lentry{tag: tag, seq: m.seq, kind: kindData, data: blk})
		}
	}
	o.version = max(o.version, version)
}

func (m *lmodel) clearObject(id ObjectID, version uint64) {
	m.seq++
	o := m.obj(id)
	for b := range o.blocks {
		o.blocks[b] = nil
	}
	o.version = max(o.version, version)
}

func (m *lmodel) deleteCheckpoint(vol uint64, c uint32) {
	if m.gone[vol] == nil {
		m.gone[vol] = map[uint32]bool{}
	}
	m.gone[vol][c] = true
	for id, o := range m.objs {
		if id.Volume != vol {
			continue
		}
		for b := range o.blocks {
			old := o.blocks[b]
			o.blocks[b] = nil
			for _, x := range old {
				m.put(id, o, b, x)
			}
		}
	}
}

func (m *lmodel) deleteVolume(vol uint64) {
	for id := range m.objs {
		if id.Volume == vol {
			delete(m.objs, id)
		}
	}
	delete(m.newest, vol)
	delete(m.gone, vol)
}

// runs lists, over the object, what the layers in [lo, hi) show, merged
// runs; holes are included if holes.
func (m *lmodel) runs(id ObjectID, lo, hi uint64, holes bool) []Extent {
	var out extentList
	for b := range objectBlocks {
		x, ok := m.winner(id, b, lo, hi)
		switch {
		case !ok && holes:
			out.add(int64(b)*BlockSize, int64(b+1)*BlockSize, true, false)
		case ok:
			out.add(int64(b)*BlockSize, int64(b+1)*BlockSize, false, x.kind == kindZero)
		}
	}
	return out
}

func (m *lmodel) extents(id ObjectID, view uint32, off, n int64) []Extent {
	lo, hi := viewRange(view)
	return extentList(m.runs(id, lo, hi, false)).fill(off, off+n)
}

func (m *lmodel) layers(id ObjectID) []Layer {
	o := m.objs[id]
	if o == nil {
		return nil
	}
	var tags []uint32
	for b := range o.blocks {
		for _, x := range o.blocks[b] {
			if x.kind != kindRemove {
				tags = append(tags, m.eff(id.Volume, x.tag))
			}
		}
	}
	slices.Sort(tags)
	var out []Layer
	for _, t := range slices.Compact(tags) {
		out = append(out, Layer{Tag: t, Extents: m.runs(id, uint64(t), uint64(t)+1, false)})
	}
	return out
}

func (m *lmodel) held(id ObjectID) bool {
	o := m.objs[id]
	if o == nil {
		return false
	}
	for b := range o.blocks {
		for _, x := range o.blocks[b] {
			if x.kind != kindRemove {
				return true
			}
		}
	}
	return false
}

func (m *lmodel) liveBytes() int64 {
	var n int64
	for _, o := range m.objs {
		for b := range o.blocks {
			for _, x := range o.blocks[b] {
				if x.kind == kindData {
					n += BlockSize
				}
			}
		}
	}
	return n
}

func (m *lmodel) usage(vol uint64, views []uint32) map[uint32]Usage {
	out := map[uint32]Usage{0: {}}
	for _, c := range views {
		out[c] = Usage{}
	}
	for id := range m.objs {
		if id.Volume != vol {
			continue
		}
		for c, u := range out {
			lo, hi := viewRange(c)
			for b := range objectBlocks {
				if x, ok := m.winner(id, b, lo, hi); ok && x.kind == kindData {
					u.Visible += BlockSize
				}
				if c == 0 {
					continue
				}
				below := uint64(m.eff(vol, c-1))
				x, ok := m.winner(id, b, below, below+1)
				_, over := m.winner(id, b, uint64(c), uint64(c)+1)
				if ok && x.kind == kindData && over {
					u.Exclusive += BlockSize
				}
			}
			out[c] = u
		}
	}
	return out
}

// Layered operations.
const (
	lopWrite = iota
	lopTrim
	lopRead
	lopExtents
	lopChanged
	lopCheckpoint
	lopDeleteCheckpoint
	lopClear
	lopCopy
	lopUsage
	lopSync
	lopCompact
	lopReopen
	lopDeleteVolume
)

type lop struct {
	kind    int
	id      ObjectID
	off, n  int64
	version uint64
	tag     uint32 // write, trim: the layer; read, extents: the view; changed: from; delete checkpoint: c
	to      uint32 // changed
	opaque  bool
	sync    bool
	split   bool // delete checkpoint: merge in memory later (see lharness.pending)
	seed    uint64
}

func (o lop) String() string {
	return fmt.Sprintf("lop%d(%v off=%d n=%d v=%d tag=%d to=%d opaque=%v)", o.kind, o.id, o.off, o.n, o.version, o.tag, o.to, o.opaque)
}

type lharness struct {
	t     testing.TB
	dir   string
	opts  Options
	e     *Engine
	other *Engine // receives copies of objects made with Layers and ReadLayer
	m     *lmodel
	buf   []byte
	ebuf  []byte
	// pending lists volumes with deleted checkpoints not merged in memory
	// yet, so that operations run against unmerged layers too.
	pending map[uint64]bool
}

func newLHarness(t testing.TB, opts Options) *lharness {
	h := &lharness{t: t, dir: t.TempDir(), opts: opts, m: newLModel(), pending: map[uint64]bool{},
		buf: make([]byte, ObjectSize), ebuf: make([]byte, ObjectSize)}
	h.open()
	other, err := Open(t.TempDir(), Options{SegmentSize: 1 << 20, GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	h.other = other
	return h
}

func (h *lharness) open() {
	h.t.Helper()
	e, err := Open(h.dir, h.opts)
	if err != nil {
		h.t.Fatalf("open: %v", err)
	}
	h.e = e
}

func (h *lharness) close() {
	h.t.Helper()
	if h.e != nil {
		if err := h.e.Close(); err != nil {
			h.t.Fatalf("close: %v", err)
		}
		h.e = nil
	}
}

func (h *lharness) apply(o lop) {
	h.t.Helper()
	ctx := context.Background()
	e := h.e
	switch o.kind {
	case lopWrite:
		p := h.buf[:o.n]
		fillPattern(p, o.seed)
		if err := e.Write(ctx, o.id, o.off, p, WriteOptions{Version: o.version, Sync: o.sync, Layer: o.tag}); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.write(o.id, o.off, p, o.version, o.tag)
	case lopTrim:
		if err := e.Trim(ctx, o.id, o.off, o.n, WriteOptions{Version: o.version, Sync: o.sync, Layer: o.tag, Opaque: o.opaque}); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.trim(o.id, o.off, o.n, o.version, o.tag, o.opaque)
	case lopRead:
		h.checkRead(o.id, o.tag, o.off, o.n)
	case lopExtents:
		h.checkExtents(o.id, o.tag, o.off, o.n)
	case lopChanged:
		h.checkChanged(o.id, o.tag, o.to)
	case lopCheckpoint:
		h.m.newest[o.id.Volume]++
	case lopDeleteCheckpoint:
		if o.split {
			if err := e.markDeleted(o.id.Volume, o.tag); err != nil {
				h.t.Fatalf("%v: %v", o, err)
			}
			h.pending[o.id.Volume] = true
		} else if err := e.DeleteCheckpoint(ctx, o.id.Volume, o.tag); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.deleteCheckpoint(o.id.Volume, o.tag)
	case lopClear:
		if err := e.ClearObject(ctx, o.id, WriteOptions{Version: o.version, Sync: o.sync}); err != nil {
			h.t.Fatalf("%v: %v", o, err)
		}
		h.m.clearObject(o.id, o.version)
	case lopCopy:
		h.checkCopy(o.id)
	case lopUsage:
		h.checkUsage(o.id.Volume)
	case lopSync:
		if err := e.Sync(ctx); err != nil {
			h.t.Fatalf("sync: %v", err)
		}
	case lopReopen:
		h.close()
		h.open()
		clear(h.pending) // replay merged them
		h.checkAll()
	case lopCompact:
		if err := e.Compact(ctx); err != nil {
			h.t.Fatalf("compact: %v", err)
		}
		h.checkAccounting()
	case lopDeleteVolume:
		if err := e.DeleteVolume(ctx, o.id.Volume); err != nil {
			h.t.Fatalf("delete volume: %v", err)
		}
		h.m.deleteVolume(o.id.Volume)
	}
}

func (h *lharness) checkRead(id ObjectID, view uint32, off, n int64) {
	h.t.Helper()
	got := h.ebuf[:n]
	if err := h.e.ReadView(context.Background(), id, view, off, got); err != nil {
		h.t.Fatalf("read %v view %d at %d length %d: %v", id, view, off, n, err)
	}
	want := h.buf[:n]
	lo, hi := viewRange(view)
	blk := make([]byte, BlockSize)
	for b := off / BlockSize; b*BlockSize < off+n; b++ {
		h.m.content(id, int(b), lo, hi, blk)
		bs := b * BlockSize
		s, t := max(bs, off), min(bs+BlockSize, off+n)
		copy(want[s-off:t-off], blk[s-bs:t-bs])
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		h.t.Fatalf("read %v view %d at %d length %d: first difference at object offset %d", id, view, off, n, off+int64(i))
	}
}

func (h *lharness) checkExtents(id ObjectID, view uint32, off, n int64) {
	h.t.Helper()
	got, err := h.e.ExtentsView(context.Background(), id, view, off, n)
	if err != nil {
		h.t.Fatalf("extents: %v", err)
	}
	if want := h.m.extents(id, view, off, n); !slices.Equal(got, want) {
		h.t.Fatalf("extents of %v view %d at %d length %d:\n got %v\nwant %v", id, view, off, n, got, want)
	}
}

func (h *lharness) checkChanged(id ObjectID, from, to uint32) {
	h.t.Helper()
	got, err := h.e.Changed(context.Background(), id, from, to)
	if err != nil {
		h.t.Fatalf("changed: %v", err)
	}
	hi := uint64(to)
	if to == 0 {
		hi = 1 << 40
	}
	var want []Extent
	if hi > uint64(from) {
		want = h.m.runs(id, uint64(from), hi, false)
	}
	if !slices.Equal(got, want) {
		h.t.Fatalf("changed of %v in [%d, %d):\n got %v\nwant %v", id, from, to, got, want)
	}
}

// checkCopy copies the object into the other engine with Layers and
// ReadLayer, as the replication layer does, and compares: layers,
// checksums, and every view.
func (h *lharness) checkCopy(id ObjectID) {
	h.t.Helper()
	ctx := context.Background()
	ls, err := h.e.Layers(ctx, id)
	if err != nil {
		h.t.Fatal(err)
	}
	if want := h.m.layers(id); !equalLayers(ls, want) {
		h.t.Fatalf("layers of %v:\n got %v\nwant %v", id, ls, want)
	}
	version := h.e.ObjectVersion(id)
	if err := h.other.ClearObject(ctx, id, WriteOptions{Version: version}); err != nil {
		h.t.Fatal(err)
	}
	for _, l := range ls {
		for _, x := range l.Extents {
			wo := WriteOptions{Version: version, Layer: l.Tag, Opaque: true}
			if x.Zero {
				err = h.other.Trim(ctx, id, x.Offset, x.Length, wo)
			} else {
				p := h.buf[:x.Length]
				if err = h.e.ReadLayer(ctx, id, l.Tag, x.Offset, p); err == nil {
					err = h.other.Write(ctx, id, x.Offset, p, wo)
				}
			}
			if err != nil {
				h.t.Fatalf("copying layer %d %+v of %v: %v", l.Tag, x, id, err)
			}
		}
	}
	// Reading a layer where it holds no data is refused.
	if err := h.e.ReadLayer(ctx, id, 1<<31, 0, h.buf[:BlockSize]); err == nil {
		h.t.Fatalf("ReadLayer of a layer %v does not have succeeded", id)
	}
	a, err := h.e.ObjectChecksum(ctx, id)
	if err != nil {
		h.t.Fatal(err)
	}
	b, err := h.other.ObjectChecksum(ctx, id)
	if err != nil {
		h.t.Fatal(err)
	}
	if a != b {
		ls2, _ := h.other.Layers(ctx, id)
		h.t.Fatalf("checksum of the copy of %v differs:\n%v\n%v", id, ls, ls2)
	}
	for _, v := range []uint32{0, 1, h.m.newest[id.Volume]} {
		if err := h.e.ReadView(ctx, id, v, 0, h.buf); err != nil {
			h.t.Fatal(err)
		}
		if err := h.other.ReadView(ctx, id, v, 0, h.ebuf); err != nil {
			h.t.Fatal(err)
		}
		if !bytes.Equal(h.buf, h.ebuf) && !h.m.gone[id.Volume][v] {
			h.t.Fatalf("view %d of the copy of %v differs", v, id)
		}
	}
	// A change the checksum must see: one more zero extent in the copy.
	if len(ls) > 0 {
		top := ls[len(ls)-1]
		if err := h.other.Trim(ctx, id, 0, BlockSize, WriteOptions{Version: version, Layer: top.Tag + 1, Opaque: true}); err != nil {
			h.t.Fatal(err)
		}
		if b, err := h.other.ObjectChecksum(ctx, id); err != nil || a == b {
			h.t.Fatalf("checksum did not change with a new layer: %v", err)
		}
	}
}

func equalLayers(a, b []Layer) bool {
	return slices.EqualFunc(a, b, func(x, y Layer) bool { return x.Tag == y.Tag && slices.Equal(x.Extents, y.Extents) })
}

func (h *lharness) checkUsage(vol uint64) {
	h.t.Helper()
	var views []uint32
	for c := uint32(1); c <= h.m.newest[vol]; c++ {
		if !h.m.gone[vol][c] {
			views = append(views, c)
		}
	}
	got, err := h.e.Usage(context.Background(), vol, views, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	want := h.m.usage(vol, views)
	if len(got) != len(want) {
		h.t.Fatalf("usage of volume %d: %v, model %v", vol, got, want)
	}
	for c, u := range want {
		if got[c] != u {
			h.t.Fatalf("usage of volume %d view %d: %+v, model %+v", vol, c, got[c], u)
		}
	}
}

// merge merges the layers of deleted checkpoints left unmerged.
func (h *lharness) merge() {
	for v := range h.pending {
		h.e.mergeVolume(v)
	}
	clear(h.pending)
}

func (h *lharness) checkAccounting() {
	h.t.Helper()
	// Unmerged layers keep blocks that the merge will drop.
	h.merge()
	if got, want := h.e.Stats().LiveBytes, h.m.liveBytes(); got != want {
		h.t.Fatalf("live bytes %d, model %d", got, want)
	}
}

func (h *lharness) checkAll() {
	h.t.Helper()
	for _, id := range modelIDs {
		newest := h.m.newest[id.Volume]
		for v := uint32(0); v <= newest+1; v++ {
			h.checkExtents(id, v, 0, ObjectSize)
		}
		h.checkRead(id, 0, 0, ObjectSize)
		h.checkRead(id, newest, 0, ObjectSize)
		h.checkChanged(id, 0, 0)
		var want uint64
		if o := h.m.objs[id]; o != nil {
			want = o.version
		}
		if got := h.e.ObjectVersion(id); got != want {
			h.t.Fatalf("version of %v: %d, model %d", id, got, want)
		}
	}
	for _, v := range []uint64{1, 2} {
		var want []ObjectID
		for id := range h.m.objs {
			if id.Volume == v && h.m.held(id) {
				want = append(want, id)
			}
		}
		slices.SortFunc(want, cmpID)
		if got := h.e.Objects(v); !slices.Equal(got, want) {
			h.t.Fatalf("objects of volume %d: %v, model %v", v, got, want)
		}
		h.checkUsage(v)
	}
	h.checkAccounting()
}

// randomLOp draws a layered operation.
func randomLOp(r *rand.Rand, m *lmodel, version uint64) lop {
	o := lop{id: modelIDs[r.IntN(len(modelIDs))], version: version, seed: r.Uint64()}
	newest := m.newest[o.id.Volume]
	o.tag = newest
	if r.IntN(10) == 0 {
		o.tag = uint32(r.IntN(int(newest) + 1)) // an older tag: out of order
	}
	if r.IntN(10) == 0 {
		o.version = version / 2
	}
	view := func() uint32 { return uint32(r.IntN(int(newest) + 2)) }
	switch x := r.IntN(100); {
	case x < 34:
		o.kind = lopWrite
	case x < 47:
		o.kind = lopTrim
		o.opaque = r.IntN(3) == 0
	case x < 60:
		o.kind = lopRead
		o.tag = view()
	case x < 66:
		o.kind = lopExtents
		o.tag = view()
	case x < 71:
		o.kind = lopChanged
		o.tag, o.to = view(), view()
		if r.IntN(3) == 0 {
			o.to = 0
		}
		return o
	case x < 77:
		o.kind = lopCheckpoint
		return o
	case x < 82:
		if newest == 0 {
			o.kind = lopCheckpoint
			return o
		}
		o.kind = lopDeleteCheckpoint
		o.tag = 1 + uint32(r.IntN(int(newest)))
		o.split = r.IntN(2) == 0
		return o
	case x < 84:
		o.kind = lopClear
		return o
	case x < 87:
		o.kind = lopCopy
		return o
	case x < 89:
		o.kind = lopUsage
		return o
	case x < 91:
		o.kind = lopSync
		return o
	case x < 95:
		o.kind = lopCompact
		return o
	case x < 97:
		o.kind = lopReopen
		return o
	case x < 98:
		o.kind = lopDeleteVolume
		return o
	default:
		o.kind = lopWrite
		o.off, o.n = 0, ObjectSize
		return o
	}
	sectors := int64(ObjectSize / SectorSize)
	switch r.IntN(4) {
	case 0:
		o.n = int64(1+r.IntN(16)) * SectorSize
	case 1:
		o.n = int64(1+r.IntN(32)) * BlockSize
	case 2:
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

func runLModel(t *testing.T, opts Options, seed uint64, n int) {
	h := newLHarness(t, opts)
	defer h.other.Close()
	defer h.close()
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range n {
		o := randomLOp(r, h.m, uint64(i+1))
		h.apply(o)
		if r.IntN(8) == 0 {
			h.merge()
		}
		if i%64 == 0 {
			h.checkAccounting()
		}
	}
	h.checkAll()
	h.apply(lop{kind: lopReopen})
}

func TestLayersModel(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 800
	}
	for seed := uint64(1); seed <= 2; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runLModel(t, modelOpts(), seed, n/int(seed)) })
	}
}

// TestLayersModelBackgroundGC runs the layered model with the background
// collector compacting continuously under the operations.
func TestLayersModelBackgroundGC(t *testing.T) {
	n := 1500
	if testing.Short() {
		n = 400
	}
	opts := modelOpts()
	opts.GCInterval = time.Millisecond
	opts.GCRate = -1
	opts.GCThreshold = 0.9
	runLModel(t, opts, 3, n)
}
