package engine

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
)

// Layers. Every record carries the raw tag of its layer, and an object's
// state is a stack of layers keyed by effective tag; see docs/engine.md.

// Layer is one effective layer of an object: its tag and what it holds,
// data and zero extents (Hole is always false), in order, runs of the same
// kind merged.
type Layer struct {
	Tag     uint32
	Extents []Extent
}

// Usage is what a view of a volume takes, in bytes: see Engine.Usage.
type Usage struct{ Visible, Exclusive int64 }

// ClearObject removes every layer's content of the object, as replacing a
// replica's copy wholesale needs before the new content is written layer
// by layer. The object keeps existing (it is created if the engine held
// nothing of it) and its version becomes max(current, o.Version). It is
// one record: after a crash the clear happened or it did not; the writes
// that follow are separate operations. With o.Sync it is durable when it
// returns.
func (e *Engine) ClearObject(ctx context.Context, id ObjectID, o WriteOptions) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	e.appendMu.Lock()
	h := recHeader{typ: recClear, id: id, version: o.Version}
	err := e.appendAndApplyLocked(&h, nil, nil)
	lsn := e.appendLSN
	e.appendMu.Unlock()
	if err != nil {
		return fmt.Errorf("engine: clear %v: %w", id, err)
	}
	hook("clear-appended")
	if o.Sync {
		if err := e.syncTo(ctx, lsn); err != nil {
			return fmt.Errorf("engine: clear %v: sync: %w", id, err)
		}
	}
	return nil
}

// layerTags returns the distinct effective tags of the layers of o, in
// increasing order. Engine.idx held.
func (ix *index) layerTags(vol uint64, o *object) []uint32 {
	var tags []uint32
	if o == nil {
		return nil
	}
	for i := range o.layers {
		t := ix.eff(vol, o.layers[i].tag)
		if n := len(tags); n == 0 || tags[n-1] != t {
			tags = append(tags, t)
		}
	}
	return tags
}

// runs converts resolved extents (sorted, non-overlapping) to Extents of
// data and zero runs, merged.
func runs(xs []extent) []Extent {
	var out extentList
	for _, x := range xs {
		out.add(int64(x.start)*BlockSize, int64(x.end())*BlockSize, false, x.zero())
	}
	return out
}

// Layers describes the object's effective layers, lowest first, for copying
// it wholesale to another node: for each, its effective tag and its data
// and zero extents as stored in that layer (also where a higher layer
// shadows them). Writing each layer's data with Write and its zero extents
// with an Opaque Trim, with Layer set to the tag, lowest layer first, into
// a cleared object reproduces the object: the same ObjectChecksum.
func (e *Engine) Layers(ctx context.Context, id ObjectID) ([]Layer, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	if !e.enter() {
		return nil, ErrClosed
	}
	defer e.leave()
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	var out []Layer
	e.idx.RLock()
	defer e.idx.RUnlock()
	o := e.ix.lookup(id)
	for _, t := range e.ix.layerTags(id.Volume, o) {
		xs := rs.resolve(e.ix, id.Volume, o, 0, objectBlocks, layerSet{uint64(t), uint64(t) + 1})
		if len(xs) > 0 {
			out = append(out, Layer{Tag: t, Extents: runs(xs)})
		}
	}
	return out, nil
}

// ReadLayer reads data of one effective layer of the object only, as
// Layers lists it. Every block of [off, off+len(p)) must be data in that
// layer, else ErrInvalid. Blocks are verified as Read does.
func (e *Engine) ReadLayer(ctx context.Context, id ObjectID, tag uint32, off int64, p []byte) error {
	fail := func(err error) error {
		return fmt.Errorf("engine: read layer %d of %v at %d length %d: %w", tag, id, off, len(p), err)
	}
	if err := checkRange(off, int64(len(p))); err != nil {
		return fail(err)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	if len(p) == 0 {
		return nil
	}
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	lo := uint32(off / BlockSize)
	hi := uint32((off + int64(len(p)) + BlockSize - 1) / BlockSize)
	e.idx.RLock()
	o := e.ix.lookup(id)
	pos := lo
	for _, x := range rs.resolve(e.ix, id.Volume, o, lo, hi, layerSet{uint64(tag), uint64(tag) + 1}) {
		if x.start != pos || x.zero() {
			break
		}
		pos = x.end()
	}
	if pos != hi {
		e.idx.RUnlock()
		return fail(fmt.Errorf("block %d is not data in the layer: %w", pos, ErrInvalid))
	}
	rs.collect(e.ix, id.Volume, o, lo, hi, layerSet{uint64(tag), uint64(tag) + 1})
	e.idx.RUnlock()
	defer rs.release()
	if err := rs.readPieces(id, off, p); err != nil {
		return fail(err)
	}
	return nil
}

// Changed lists the ranges of the object written or trimmed (data or zero
// extents) by records whose effective layer is in [from, to), to == 0
// meaning no upper bound (the head included), for incremental copies
// between checkpoints. Each Extent has Zero set if what a reader of view
// to sees from those layers there is a zero extent. Exact at block
// granularity. Blocks removed by a trim in layer 0 are not listed: layer 0
// has nothing beneath it, so they read as zeros in every view.
func (e *Engine) Changed(ctx context.Context, id ObjectID, from, to uint32) ([]Extent, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	if !e.enter() {
		return nil, ErrClosed
	}
	defer e.leave()
	set := layerSet{uint64(from), uint64(to)}
	if to == 0 {
		set.hi = allLayers.hi
	}
	if set.hi <= set.lo {
		return nil, nil
	}
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	e.idx.RLock()
	defer e.idx.RUnlock()
	return runs(rs.resolve(e.ix, id.Volume, e.ix.lookup(id), 0, objectBlocks, set)), nil
}

// Usage computes, over the objects of a volume for which include returns
// true (nil: all), for each view c in views (a live checkpoint): Visible,
// the bytes of data (not zeros) view c sees; Exclusive, the bytes of data
// only checkpoint c references: the blocks of the highest live layer below
// c that the layer starting at c shadows (with data or zeros), which is
// what deleting c would free. Key 0 always holds the head's Visible. The
// cost is proportional to the extents; no data is read. The index lock is
// held for one object at a time, so the figures are not a snapshot of the
// volume at one instant.
func (e *Engine) Usage(ctx context.Context, volume uint64, views []uint32, include func(ObjectID) bool) (map[uint32]Usage, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	if !e.enter() {
		return nil, ErrClosed
	}
	defer e.leave()
	views = append([]uint32{0}, views...)
	slices.Sort(views)
	views = slices.Compact(views)
	out := make(map[uint32]Usage, len(views))
	for _, c := range views {
		out[c] = Usage{}
	}
	ids := e.Objects(volume)
	if include != nil {
		ids = slices.DeleteFunc(ids, func(id ObjectID) bool { return !include(id) })
	}
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	var below []extent
	for _, id := range ids {
		if err := ctxErr(ctx); err != nil {
			return nil, err
		}
		e.idx.RLock()
		o := e.ix.lookup(id)
		for _, c := range views {
			u := out[c]
			for _, x := range rs.resolve(e.ix, volume, o, 0, objectBlocks, viewSet(c)) {
				if !x.zero() {
					u.Visible += int64(x.count) * BlockSize
				}
			}
			if c > 0 {
				b := uint64(e.ix.eff(volume, c-1))
				below = append(below[:0], rs.resolve(e.ix, volume, o, 0, objectBlocks, layerSet{b, b + 1})...)
				u.Exclusive += overlapData(below, rs.resolve(e.ix, volume, o, 0, objectBlocks, layerSet{uint64(c), uint64(c) + 1}))
			}
			out[c] = u
		}
		e.idx.RUnlock()
	}
	return out, nil
}

// overlapData returns the bytes of the data extents of a that b covers;
// both are sorted and non-overlapping.
func overlapData(a, b []extent) int64 {
	var n int64
	j := 0
	for _, x := range a {
		if x.zero() {
			continue
		}
		for j < len(b) && b[j].end() <= x.start {
			j++
		}
		for k := j; k < len(b) && b[k].start < x.end(); k++ {
			n += int64(min(x.end(), b[k].end())-max(x.start, b[k].start)) * BlockSize
		}
	}
	return n
}

// ObjectChecksum returns a SHA-256 of the object's layered state: for each
// effective layer, lowest first, its tag and its runs of data and zero
// extents (position, length, kind), and the data. Two replicas have equal
// checksums if and only if they hold the same layers with the same
// extents and data, whatever their layout on disk (and whether their
// deleted checkpoints were merged in memory yet). A block written with
// zeros differs from a zero extent and from a hole. It reads (and
// verifies) every data block of every layer.
func (e *Engine) ObjectChecksum(ctx context.Context, id ObjectID) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	if err := ctxErr(ctx); err != nil {
		return sum, err
	}
	if !e.enter() {
		return sum, ErrClosed
	}
	defer e.leave()
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	// First the shape of every layer (tag, merged runs of data and zero
	// extents), then the data in the same order. Collected under one lock,
	// so that the checksum is of one state of the object.
	h := sha256.New()
	h.Write([]byte("BSLTOBJ2"))
	le := binary.LittleEndian
	var hdr [13]byte
	rs.pieces = rs.pieces[:0]
	e.idx.RLock()
	o := e.ix.lookup(id)
	for _, t := range e.ix.layerTags(id.Volume, o) {
		for _, x := range runs(rs.resolve(e.ix, id.Volume, o, 0, objectBlocks, layerSet{uint64(t), uint64(t) + 1})) {
			le.PutUint32(hdr[0:], t)
			le.PutUint32(hdr[4:], uint32(x.Offset/BlockSize))
			le.PutUint32(hdr[8:], uint32(x.Length/BlockSize))
			hdr[12] = 1
			if x.Zero {
				hdr[12] = 2
			}
			h.Write(hdr[:])
		}
		for _, x := range rs.out {
			if !x.zero() {
				rs.pieces = append(rs.pieces, rs.piece(e.ix, id.Volume, x))
			}
		}
	}
	e.idx.RUnlock()
	defer rs.release()

	buf := make([]byte, 64*BlockSize)
	for i := range rs.pieces {
		if err := ctxErr(ctx); err != nil {
			return sum, err
		}
		pc := &rs.pieces[i]
		for b := uint32(0); b < pc.count; b += 64 {
			p := buf[:int(min(64, pc.count-b))*BlockSize]
			if err := pread(pc.seg.fd, p, pc.off+int64(b)*BlockSize); err != nil {
				return sum, fmt.Errorf("engine: checksum of %v: %w", id, ioErr("reading "+segName(pc.seg.id), err))
			}
			rs.verify(pc, pc.start+b, p)
			h.Write(p)
		}
	}
	if err := rs.corruptErr(id); err != nil {
		return sum, fmt.Errorf("engine: checksum of %v: %w", id, err)
	}
	h.Sum(sum[:0])
	return sum, nil
}
