package engine

import (
	"fmt"

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

// extent maps blocks [start, start+count) of an object to a run of data
// blocks of one WRITE record. 32 bytes, no pointers (cheap for Go's GC).
type extent struct {
	start  uint32 // first block in the object
	count  uint32
	seg    uint32 // segment id
	crcIdx uint32 // index in segment.crcs of the first block
	off    int64  // file offset of the first block's data
	seq    uint64 // sequence number of the record that wrote it
}

func (x extent) end() uint32 { return x.start + x.count }

func extentLess(a, b extent) bool { return a.start < b.start }

// object is the in-memory state of one object. An object exists from the
// first record for it until its volume is deleted, even when every block
// was trimmed, so that its version survives.
type object struct {
	tree    *btree.BTreeG[extent] // non-overlapping extents keyed by start
	blocks  int64                 // data blocks held (sum of extent counts)
	version uint64
	verSeg  uint32 // a segment holding a record that carries version
}

const btreeDegree = 8

// index is the in-memory block map. Every method requires Engine.idx held
// for writing, and Engine.appendMu too outside of recovery, so that the
// appender may read the index holding appendMu alone.
type index struct {
	vols     map[uint64]map[uint64]*object
	segs     map[uint32]*segment
	freelist *btree.FreeListG[extent]
	nextents int
	nobjs    int // objects holding data
	scratch  []extent
}

func newIndex() *index {
	return &index{
		vols:     make(map[uint64]map[uint64]*object),
		segs:     make(map[uint32]*segment),
		freelist: btree.NewFreeListG[extent](1024),
	}
}

func (ix *index) lookup(id ObjectID) *object { return ix.vols[id.Volume][id.Index] }

func (ix *index) getOrCreate(id ObjectID, seg *segment, version uint64) *object {
	if o := ix.lookup(id); o != nil {
		return o
	}
	v := ix.vols[id.Volume]
	if v == nil {
		v = make(map[uint64]*object)
		ix.vols[id.Volume] = v
	}
	o := &object{tree: btree.NewWithFreeListG(btreeDegree, extentLess, ix.freelist), version: version, verSeg: seg.id}
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

// overlapping returns the extents of o that overlap [s, e), in order, in a
// scratch slice valid until the next call.
func (ix *index) overlapping(o *object, s, e uint32) []extent {
	ov := ix.scratch[:0]
	o.tree.DescendLessOrEqual(extent{start: s}, func(x extent) bool {
		if x.end() > s {
			ov = append(ov, x)
		}
		return false
	})
	o.tree.AscendRange(extent{start: s + 1}, extent{start: e}, func(x extent) bool {
		ov = append(ov, x)
		return true
	})
	ix.scratch = ov
	return ov
}

// cut removes blocks [s, e) of o from the map, except blocks written by a
// record with a sequence number >= before (a copied trim must not remove
// data written after the trim it copies).
func (ix *index) cut(o *object, s, e uint32, before uint64) {
	for _, x := range ix.overlapping(o, s, e) {
		if x.seq >= before {
			continue
		}
		o.tree.Delete(x)
		cs, ce := max(x.start, s), min(x.end(), e)
		n := int64(ce - cs)
		ix.segs[x.seg].liveBlocks -= n
		o.blocks -= n
		ix.nextents--
		if x.start < cs {
			left := x
			left.count = cs - x.start
			o.tree.ReplaceOrInsert(left)
			ix.nextents++
		}
		if x.end() > ce {
			right := x
			d := ce - x.start
			right.start = ce
			right.count = x.end() - ce
			right.off += int64(d) * BlockSize
			right.crcIdx += d
			o.tree.ReplaceOrInsert(right)
			ix.nextents++
		}
	}
}

func (ix *index) trackData(o *object, had bool) {
	switch has := o.blocks > 0; {
	case has && !had:
		ix.nobjs++
	case !has && had:
		ix.nobjs--
	}
}

// applyWrite maps blocks [start, start+count) of id to the data of a WRITE
// record in seg at off whose CRCs start at crcIdx.
func (ix *index) applyWrite(id ObjectID, h *recHeader, seg *segment, off int64, crcIdx uint32) {
	o := ix.getOrCreate(id, seg, h.version)
	had := o.blocks > 0
	ix.cut(o, h.start, h.start+h.count, ^uint64(0))
	o.tree.ReplaceOrInsert(extent{start: h.start, count: h.count, seg: seg.id, crcIdx: crcIdx, off: off, seq: h.seq})
	ix.nextents++
	o.blocks += int64(h.count)
	seg.liveBlocks += int64(h.count)
	ix.setVersion(o, seg, h.version)
	ix.trackData(o, had)
}

// applyTrim turns blocks written before the trim into holes.
func (ix *index) applyTrim(h *recHeader, seg *segment) {
	o := ix.getOrCreate(h.id, seg, h.version)
	had := o.blocks > 0
	ix.cut(o, h.start, h.start+h.count, h.seq)
	seg.trimBytes += recHeaderSize
	seg.maxTrimSeq = max(seg.maxTrimSeq, h.seq)
	ix.setVersion(o, seg, h.version)
	ix.trackData(o, had)
}

func (ix *index) applyVersion(h *recHeader, seg *segment) {
	o := ix.getOrCreate(h.id, seg, h.version)
	ix.setVersion(o, seg, h.version)
}

// dropVolume forgets every object of a volume.
func (ix *index) dropVolume(vol uint64) {
	for _, o := range ix.vols[vol] {
		o.tree.Ascend(func(x extent) bool {
			ix.segs[x.seg].liveBlocks -= int64(x.count)
			ix.nextents--
			return true
		})
		if o.blocks > 0 {
			ix.nobjs--
		}
		if s := ix.segs[o.verSeg]; s != nil {
			s.verObjs--
		}
		o.tree.Clear(true)
	}
	delete(ix.vols, vol)
}
