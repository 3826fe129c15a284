package engine

import (
	"fmt"
	"slices"

	"github.com/google/btree"
)

// ObjectID names one object: the Index-th ObjectSize piece of a volume.
type ObjectID struct{ Volume, Index uint64 }

func (id ObjectID) String() string { return fmt.Sprintf("%d/%d", id.Volume, id.Index) }

func (id ObjectID) less(o ObjectID) bool {
	if id.Volume != o.Volume {
		return id.Volume < o.Volume
	}
	return id.Index < o.Index
}

// extent maps blocks [start, start+count) of one layer of an object to a
// run of data blocks of one WRITE record, or, for a zero extent, to a TRIM
// record with flagZero (explicit zeros that hide lower layers). 32 bytes,
// no pointers (cheap for Go's GC, and the index is most of the engine's
// memory).
type extent struct {
	start  uint32 // first block in the object
	count  uint32
	seg    uint32 // segment holding the record
	crcIdx uint32 // data: index in segment.crcs of the first block; zeroExtent for a zero extent
	off    uint32 // data: file offset of the first block's data (a segment is at most 4 GiB)
	tag    uint32 // the record's raw layer tag
	seq    uint64 // sequence number of the record
}

// zeroExtent in extent.crcIdx marks a zero extent. A CRC table index is
// below 2^20 (4 GiB segments of 4 KiB blocks), so it cannot be one.
const zeroExtent = ^uint32(0)

func (x extent) zero() bool { return x.crcIdx == zeroExtent }

func (x extent) end() uint32 { return x.start + x.count }

// clip returns the part of x covering blocks [s, t), which must lie within x.
func (x extent) clip(s, t uint32) extent {
	d := s - x.start
	x.start, x.count = s, t-s
	if !x.zero() {
		x.off += d * BlockSize
		x.crcIdx += d
	}
	return x
}

// newer reports whether x wins over y in the same layer. Within a layer the
// record with the higher (raw tag, sequence number) wins: not the sequence
// number alone, because the collector gives its copies new sequence
// numbers, and a block of a lower tag copied after a write of a higher tag
// must still lose to it once a merge has put both in one layer.
func (x extent) newer(y extent) bool {
	if x.tag != y.tag {
		return x.tag > y.tag
	}
	return x.seq > y.seq
}

func extentLess(a, b extent) bool { return a.start < b.start }

// layer is one layer of an object: the blocks written or trimmed (as zero
// extents) by records whose effective tag is tag. Every record in it has a
// raw tag r with tag <= r < the tag of the next layer up, so a higher
// layer's extents are always newer than a lower one's.
type layer struct {
	tag  uint32
	tree *btree.BTreeG[extent] // non-overlapping extents keyed by start
}

// object is the in-memory state of one object. An object exists from the
// first record for it until its volume is deleted, even when every block
// was trimmed, so that its version survives.
type object struct {
	layers  []layer // lowest tag first; none is empty
	blocks  int64   // data blocks held, all layers
	zblocks int64   // blocks of zero extents, all layers
	version uint64
	verSeg  uint32 // a segment holding a record that carries version
}

// held reports whether the object holds anything in any layer.
func (o *object) held() bool { return o.blocks > 0 || o.zblocks > 0 }

const btreeDegree = 8

// tagRange is a run [lo, hi] of deleted checkpoint tags of a volume.
type tagRange struct{ lo, hi uint32 }

// index is the in-memory block map. Every method that changes it requires
// Engine.idx held for writing, and Engine.appendMu too outside of
// recovery, so that the appender may read the index holding appendMu
// alone.
type index struct {
	vols     map[uint64]map[uint64]*object
	segs     map[uint32]*segment
	freelist *btree.FreeListG[extent]
	nextents int
	nobjs    int // objects holding data or zero extents
	scratch  []extent
	// gone holds, per volume, the deleted checkpoint tags as sorted,
	// disjoint, non-adjacent ranges. Tag 0 is never deleted.
	gone map[uint64][]tagRange
	// replay is set during recovery only (see replayState).
	replay *replayState
}

// replayState is what recovery tracks to detect, and then avoid, one
// order dependence of replay. A CLEAR copied by the collector keeps its
// sequence number c but lands in the log after records newer than c. In
// a layer holding several raw tags (after a DeleteCheckpoint), an extent
// of a higher raw tag wins over one of a lower raw tag whatever their
// sequence numbers, so a record older than c (which the clear removes)
// may, until the copied clear is replayed, shadow part of a record newer
// than c (which the clear keeps): put drops that part, and the clear then
// removes the winner, leaving a hole. When this may have happened (a clear
// above the sequence number of the winner of such an inversion), recovery
// replays the log a second time knowing every object's highest clear from
// the start, and leaves out the records below it, which the clears remove
// anyway.
type replayState struct {
	// floor is, per object, the highest sequence number of a CLEAR replayed
	// so far (the whole log's, in a second replay).
	floor map[ObjectID]uint64
	// inv is, per object, the lowest sequence number of an extent that won
	// over one with a higher sequence number (by raw tag).
	inv map[*object]uint64
	// again is set when a clear was replayed above an inversion's winner.
	again bool
}

func newReplayState(floor map[ObjectID]uint64) *replayState {
	if floor == nil {
		floor = make(map[ObjectID]uint64)
	}
	return &replayState{floor: floor, inv: make(map[*object]uint64)}
}

// inverted records, during recovery, that an extent with sequence number
// seq of o won over one with a higher sequence number.
func (ix *index) inverted(o *object, seq uint64) {
	if r := ix.replay; r != nil {
		if s, ok := r.inv[o]; !ok || seq < s {
			r.inv[o] = seq
		}
	}
}

// clearedBefore reports, during recovery, whether a CLEAR of id removes a
// record with sequence number seq (so that replay may leave it out).
func (ix *index) clearedBefore(id ObjectID, seq uint64) bool {
	return ix.replay != nil && seq < ix.replay.floor[id]
}

func newIndex() *index {
	return &index{
		vols:     make(map[uint64]map[uint64]*object),
		segs:     make(map[uint32]*segment),
		freelist: btree.NewFreeListG[extent](1024),
		gone:     make(map[uint64][]tagRange),
	}
}

func (ix *index) lookup(id ObjectID) *object { return ix.vols[id.Volume][id.Index] }

// eff returns the effective tag of raw tag r in a volume: the largest tag
// <= r that is not deleted.
func (ix *index) eff(vol uint64, r uint32) uint32 {
	rs := ix.gone[vol]
	if len(rs) == 0 {
		return r
	}
	i, found := slices.BinarySearchFunc(rs, r, func(x tagRange, r uint32) int {
		switch {
		case x.hi < r:
			return -1
		case x.lo > r:
			return 1
		}
		return 0
	})
	if found {
		return rs[i].lo - 1
	}
	return r
}

// deleteTag marks tag c (> 0) of a volume deleted; it reports whether it
// was not already.
func (ix *index) deleteTag(vol uint64, c uint32) bool {
	rs, added := addTag(ix.gone[vol], c)
	ix.gone[vol] = rs
	return added
}

// addTag adds tag c to the sorted, disjoint, non-adjacent ranges rs (which
// it may modify) and returns them, and whether c was not in them.
func addTag(rs []tagRange, c uint32) ([]tagRange, bool) {
	i, found := slices.BinarySearchFunc(rs, c, func(x tagRange, c uint32) int {
		switch {
		case x.hi < c:
			return -1
		case x.lo > c:
			return 1
		}
		return 0
	})
	if found {
		return rs, false
	}
	// rs[i-1].hi < c < rs[i].lo: extend a neighbour, join two, or insert.
	joinLeft := i > 0 && rs[i-1].hi == c-1
	joinRight := i < len(rs) && rs[i].lo == c+1
	switch {
	case joinLeft && joinRight:
		rs[i-1].hi = rs[i].hi
		rs = slices.Delete(rs, i, i+1)
	case joinLeft:
		rs[i-1].hi = c
	case joinRight:
		rs[i].lo = c
	default:
		rs = slices.Insert(rs, i, tagRange{c, c})
	}
	return rs, true
}

// layerSet selects layers by effective tag: those in [lo, hi).
type layerSet struct{ lo, hi uint64 }

var allLayers = layerSet{0, 1 << 33}

func (s layerSet) has(t uint32) bool { return uint64(t) >= s.lo && uint64(t) < s.hi }

// viewSet is the layers view v sees: all for the head (0), else those
// below v.
func viewSet(v uint32) layerSet {
	if v == 0 {
		return allLayers
	}
	return layerSet{0, uint64(v)}
}

// upToSet is the layers a record with raw tag r sees beneath it (and its
// own): effective tags <= eff(r). A partial block is merged with this.
func (ix *index) upToSet(vol uint64, r uint32) layerSet {
	return layerSet{0, uint64(ix.eff(vol, r)) + 1}
}

// includes reports whether layer l of an object of vol is in set.
func (ix *index) includes(vol uint64, l *layer, set layerSet) bool {
	if set == allLayers {
		return true
	}
	return set.has(ix.eff(vol, l.tag))
}

func (ix *index) getOrCreate(id ObjectID, seg *segment, version uint64) *object {
	if o := ix.lookup(id); o != nil {
		return o
	}
	v := ix.vols[id.Volume]
	if v == nil {
		v = make(map[uint64]*object)
		ix.vols[id.Volume] = v
	}
	o := &object{version: version, verSeg: seg.id}
	seg.verObjs++
	v[id.Index] = o
	return o
}

// setVersion raises the object's version; a record carrying the highest
// version becomes the one the garbage collector must preserve.
func (ix *index) setVersion(o *object, seg *segment, version uint64) {
	if version < o.version {
		return
	}
	o.version = version
	if o.verSeg != seg.id {
		if old := ix.segs[o.verSeg]; old != nil {
			old.verObjs--
		}
		seg.verObjs++
		o.verSeg = seg.id
	}
}

// layerFor returns the position in o.layers of the layer a record with raw
// tag r goes into, creating the layer if needed: the object's highest layer
// with a tag <= r if its tag is at least eff(r) (it can be above eff(r)
// while a DeleteCheckpoint has not merged this object yet), else a new
// layer eff(r).
func (ix *index) layerFor(vol uint64, o *object, r uint32) int {
	i := findLayer(o, r)
	t := ix.eff(vol, r)
	if i >= 0 && o.layers[i].tag >= t {
		return i
	}
	o.layers = slices.Insert(o.layers, i+1, layer{tag: t, tree: btree.NewWithFreeListG(btreeDegree, extentLess, ix.freelist)})
	return i + 1
}

// findLayer returns the position of the highest layer of o with a tag <=
// r, or -1.
func findLayer(o *object, r uint32) int {
	i := len(o.layers) - 1
	for i >= 0 && o.layers[i].tag > r {
		i--
	}
	return i
}

// existingLayer returns the position of the layer a record with raw tag r
// would go into, or -1 if the object has none.
func (ix *index) existingLayer(vol uint64, o *object, r uint32) int {
	i := findLayer(o, r)
	if i >= 0 && o.layers[i].tag >= ix.eff(vol, r) {
		return i
	}
	return -1
}

// account adds (n = 1) or removes (n = -1) x to or from the counters of
// its object and segment.
func (ix *index) account(o *object, x extent, n int64) {
	ix.nextents += int(n)
	s := ix.segs[x.seg]
	if x.zero() {
		o.zblocks += n * int64(x.count)
		s.liveZeros += n
	} else {
		o.blocks += n * int64(x.count)
		s.liveBlocks += n * int64(x.count)
	}
}

func (ix *index) insert(o *object, l *layer, x extent) {
	l.tree.ReplaceOrInsert(x)
	ix.account(o, x, 1)
}

func (ix *index) delete(o *object, l *layer, x extent) {
	l.tree.Delete(x)
	ix.account(o, x, -1)
}

// overlapping returns the extents of t that overlap [s, e), in order, in a
// scratch slice valid until the next call.
func (ix *index) overlapping(t *btree.BTreeG[extent], s, e uint32) []extent {
	ix.scratch = overlappingInto(t, s, e, ix.scratch[:0])
	return ix.scratch
}

// overlappingInto appends the extents of t overlapping [s, e) to dst.
func overlappingInto(t *btree.BTreeG[extent], s, e uint32, dst []extent) []extent {
	t.DescendLessOrEqual(extent{start: s}, func(x extent) bool {
		if x.end() > s {
			dst = append(dst, x)
		}
		return false
	})
	t.AscendRange(extent{start: s + 1}, extent{start: e}, func(x extent) bool {
		dst = append(dst, x)
		return true
	})
	return dst
}

// removePart takes blocks [s, e) (within y) out of extent y of l, keeping
// the parts of y outside.
func (ix *index) removePart(o *object, l *layer, y extent, s, e uint32) {
	ix.delete(o, l, y)
	if y.start < s {
		ix.insert(o, l, y.clip(y.start, s))
	}
	if y.end() > e {
		ix.insert(o, l, y.clip(e, y.end()))
	}
}

// put maps x's blocks in layer l wherever x is newer than what l holds
// there; elsewhere x is shadowed and left out.
func (ix *index) put(o *object, l *layer, x extent) {
	pos := x.start
	for _, y := range ix.overlapping(l.tree, x.start, x.end()) {
		ys, ye := max(y.start, x.start), min(y.end(), x.end())
		if x.newer(y) {
			if x.seq < y.seq {
				ix.inverted(o, x.seq)
			}
			ix.removePart(o, l, y, ys, ye)
			continue
		}
		if y.seq < x.seq {
			ix.inverted(o, y.seq)
		}
		if ys > pos {
			ix.insert(o, l, x.clip(pos, ys))
		}
		pos = ye
	}
	if pos < x.end() {
		ix.insert(o, l, x.clip(pos, x.end()))
	}
}

// cut removes blocks [s, e) of the extents of l for which hit is true.
func (ix *index) cut(o *object, l *layer, s, e uint32, hit func(extent) bool) {
	for _, y := range ix.overlapping(l.tree, s, e) {
		if hit(y) {
			ix.removePart(o, l, y, max(y.start, s), min(y.end(), e))
		}
	}
}

// dropEmpty removes the layers that hold nothing.
func (ix *index) dropEmpty(o *object) {
	o.layers = slices.DeleteFunc(o.layers, func(l layer) bool {
		if l.tree.Len() == 0 {
			l.tree.Clear(true)
			return true
		}
		return false
	})
}

func (ix *index) trackHeld(o *object, had bool) {
	switch has := o.held(); {
	case has && !had:
		ix.nobjs++
	case !has && had:
		ix.nobjs--
	}
}

// applyWrite maps blocks [start, start+count) of id, in the layer of the
// record's tag, to the data of a WRITE record in seg at off whose CRCs
// start at crcIdx.
func (ix *index) applyWrite(id ObjectID, h *recHeader, seg *segment, off int64, crcIdx uint32) {
	o := ix.getOrCreate(id, seg, h.version)
	had := o.held()
	li := ix.layerFor(id.Volume, o, h.tag)
	if off+int64(h.count)*BlockSize > 1<<32 {
		panic(fmt.Sprintf("engine: internal error: data at offset %d of %s, beyond 4 GiB", off, segName(seg.id)))
	}
	ix.put(o, &o.layers[li], extent{start: h.start, count: h.count, seg: seg.id, crcIdx: crcIdx, off: uint32(off), seq: h.seq, tag: h.tag})
	ix.setVersion(o, seg, h.version)
	ix.trackHeld(o, had)
}

// applyTrim applies a TRIM record. With flagZero its blocks become zero
// extents in its layer, like a write of zeros. Without, it removes from
// its layer the blocks of records older than it (by tag and sequence
// number: a copied trim keeps its sequence number and must not remove
// what was written after the trim it copies).
func (ix *index) applyTrim(h *recHeader, seg *segment) {
	o := ix.getOrCreate(h.id, seg, h.version)
	had := o.held()
	if h.flags&flagZero != 0 {
		li := ix.layerFor(h.id.Volume, o, h.tag)
		ix.put(o, &o.layers[li], extent{start: h.start, count: h.count, seg: seg.id, crcIdx: zeroExtent, seq: h.seq, tag: h.tag})
	} else {
		if li := ix.existingLayer(h.id.Volume, o, h.tag); li >= 0 {
			t := extent{seq: h.seq, tag: h.tag}
			ix.cut(o, &o.layers[li], h.start, h.start+h.count, t.newer)
			ix.dropEmpty(o)
		}
		seg.trimBytes += recHeaderSize
		seg.maxTrimSeq = max(seg.maxTrimSeq, h.seq)
	}
	ix.setVersion(o, seg, h.version)
	ix.trackHeld(o, had)
}

// applyClear removes from every layer of the object the blocks of records
// older than the CLEAR record (by sequence number: a copied clear keeps
// its own). See replayState for what recovery must watch for.
func (ix *index) applyClear(h *recHeader, seg *segment) {
	o := ix.getOrCreate(h.id, seg, h.version)
	had := o.held()
	if r := ix.replay; r != nil {
		r.floor[h.id] = max(r.floor[h.id], h.seq)
		if s, ok := r.inv[o]; ok && s < h.seq {
			r.again = true
		}
	}
	for i := range o.layers {
		ix.cut(o, &o.layers[i], 0, objectBlocks, func(y extent) bool { return y.seq < h.seq })
	}
	ix.dropEmpty(o)
	seg.trimBytes += recHeaderSize
	seg.maxTrimSeq = max(seg.maxTrimSeq, h.seq)
	ix.setVersion(o, seg, h.version)
	ix.trackHeld(o, had)
}

func (ix *index) applyVersion(h *recHeader, seg *segment) {
	o := ix.getOrCreate(h.id, seg, h.version)
	ix.setVersion(o, seg, h.version)
}

// normalize merges the layers of o whose tags have the same effective tag
// (after a DeleteCheckpoint) and relabels them with it. The blocks of the
// lower layer that the upper one shadows are dropped from the index: they
// become garbage. It reports whether anything changed.
func (ix *index) normalize(vol uint64, o *object) bool {
	if len(ix.gone[vol]) == 0 {
		return false
	}
	changed := false
	out := o.layers[:0]
	for _, l := range o.layers {
		t := ix.eff(vol, l.tag)
		if t != l.tag {
			changed = true
		}
		if n := len(out); n > 0 && out[n-1].tag == t {
			ix.mergeLayers(o, &out[n-1], l)
			continue
		}
		l.tag = t
		out = append(out, l)
	}
	clear(o.layers[len(out):])
	o.layers = out
	return changed
}

// mergeLayers moves the extents of src into dst; where both hold a block,
// the newer extent wins. It walks the smaller of the two trees.
func (ix *index) mergeLayers(o *object, dst *layer, src layer) {
	if src.tree.Len() > dst.tree.Len() {
		dst.tree, src.tree = src.tree, dst.tree
	}
	var xs []extent
	src.tree.Ascend(func(x extent) bool {
		xs = append(xs, x)
		return true
	})
	for _, x := range xs {
		ix.account(o, x, -1)
	}
	src.tree.Clear(true)
	for _, x := range xs {
		ix.put(o, dst, x)
	}
}

// dropVolume forgets every object of a volume and its deleted checkpoints.
func (ix *index) dropVolume(vol uint64) {
	for _, o := range ix.vols[vol] {
		if o.held() {
			ix.nobjs--
		}
		for _, l := range o.layers {
			l.tree.Ascend(func(x extent) bool {
				ix.account(o, x, -1)
				return true
			})
			l.tree.Clear(true)
		}
		o.layers = nil
		if s := ix.segs[o.verSeg]; s != nil {
			s.verObjs--
		}
	}
	delete(ix.vols, vol)
	delete(ix.gone, vol)
}
