package engine

import (
	"cmp"
	"context"
	"fmt"
	"slices"
)

// piece is a run of data blocks of one extent, clipped to a request, with
// a reference on its segment.
type piece struct {
	start, count uint32 // blocks in the object
	seg          *segment
	off          int64    // file offset of block start
	crcs         []uint32 // CRC of each block
	seq          uint64
	layer        uint32 // effective tag of the layer the extent is in
}

// span is a run of blocks [lo, hi).
type span struct{ lo, hi uint32 }

// resolver finds what a set of layers shows in a run of blocks: in each
// block, the extent of the highest layer of the set that covers it. It
// keeps its scratch between calls (it lives in the pooled readState), so
// that reads do not allocate.
type resolver struct {
	out        []extent
	gaps, next []span
	found      []extent
	lo         uint32
	firstFn    func(extent) bool
	restFn     func(extent) bool
}

func (r *resolver) init() {
	r.firstFn = func(x extent) bool {
		if x.end() > r.lo {
			r.found = append(r.found, x)
		}
		return false
	}
	r.restFn = func(x extent) bool {
		r.found = append(r.found, x)
		return true
	}
}

// resolve returns the extents of the layers of o in set that are visible in
// blocks [lo, hi), clipped to it and sorted by start; blocks none covers
// are absent from the result. The slice is valid until the next call.
// Engine.idx held (for reading), or appendMu.
func (r *resolver) resolve(ix *index, vol uint64, o *object, lo, hi uint32, set layerSet) []extent {
	r.out = r.out[:0]
	if o == nil || lo >= hi {
		return r.out
	}
	r.gaps = append(r.gaps[:0], span{lo, hi})
	used := 0
	for i := len(o.layers) - 1; i >= 0 && len(r.gaps) > 0; i-- {
		l := &o.layers[i]
		if !ix.includes(vol, l, set) {
			continue
		}
		n := len(r.out)
		r.next = r.next[:0]
		for _, g := range r.gaps {
			r.found, r.lo = r.found[:0], g.lo
			l.tree.DescendLessOrEqual(extent{start: g.lo}, r.firstFn)
			l.tree.AscendRange(extent{start: g.lo + 1}, extent{start: g.hi}, r.restFn)
			pos := g.lo
			for _, x := range r.found {
				s, t := max(x.start, g.lo), min(x.end(), g.hi)
				if s >= t {
					continue
				}
				if s > pos {
					r.next = append(r.next, span{pos, s})
				}
				r.out = append(r.out, x.clip(s, t))
				pos = t
			}
			if pos < g.hi {
				r.next = append(r.next, span{pos, g.hi})
			}
		}
		r.gaps, r.next = r.next, r.gaps
		if len(r.out) > n {
			used++
		}
	}
	if used > 1 {
		slices.SortFunc(r.out, func(a, b extent) int { return cmp.Compare(a.start, b.start) })
	}
	return r.out
}

// readState is the per-call scratch of reads, pooled so that the read path
// does not allocate.
type readState struct {
	resolver
	pieces []piece
	block  [BlockSize]byte
	// bad block range found by the current read
	badFirst, badEnd uint32
	badSeg           *segment
	badOff           int64
	badLayer         uint32
}

func newReadState() any {
	rs := &readState{}
	rs.resolver.init()
	return rs
}

// collect gathers, with references, the data extents visible through set
// in blocks [lo, hi) of o. Engine.idx held for reading.
func (rs *readState) collect(ix *index, vol uint64, o *object, lo, hi uint32, set layerSet) {
	rs.pieces = rs.pieces[:0]
	for _, x := range rs.resolve(ix, vol, o, lo, hi, set) {
		if x.zero() {
			continue
		}
		rs.pieces = append(rs.pieces, rs.piece(ix, vol, x))
	}
}

// piece returns the piece for data extent x of an object of vol, with a
// reference on its segment. Engine.idx held.
func (rs *readState) piece(ix *index, vol uint64, x extent) piece {
	seg := ix.segs[x.seg]
	seg.acquire()
	return piece{start: x.start, count: x.count, seg: seg, off: int64(x.off), crcs: seg.crcs[x.crcIdx : x.crcIdx+x.count],
		seq: x.seq, layer: ix.eff(vol, x.tag)}
}

func (rs *readState) release() {
	for i := range rs.pieces {
		rs.pieces[i].seg.release()
		rs.pieces[i] = piece{}
	}
	rs.pieces = rs.pieces[:0]
	rs.badSeg = nil
}

// verify checks the blocks in p (read from pc starting at block b) against
// their CRCs, recording bad ones.
func (rs *readState) verify(pc *piece, b uint32, p []byte) {
	for i := 0; i < len(p); i += BlockSize {
		bb := b + uint32(i/BlockSize)
		if crc32c(p[i:i+BlockSize]) != pc.crcs[bb-pc.start] {
			if rs.badSeg == nil {
				rs.badFirst, rs.badSeg, rs.badLayer = bb, pc.seg, pc.layer
				rs.badOff = pc.off + int64(bb-pc.start)*BlockSize
			}
			rs.badEnd = bb + 1
		}
	}
}

func (rs *readState) corruptErr(id ObjectID) error {
	if rs.badSeg == nil {
		return nil
	}
	return &CorruptError{
		ID: id, Offset: int64(rs.badFirst) * BlockSize, Length: int64(rs.badEnd-rs.badFirst) * BlockSize,
		Layer: rs.badLayer, Segment: segName(rs.badSeg.id), FileOffset: rs.badOff,
	}
}

// Read fills p with the object's content at off, as the head sees it (all
// layers). off and len(p) must be multiples of SectorSize within the
// object. Holes and zero extents read as zeros. Every block is verified
// against its CRC; a mismatch returns a *CorruptError (errors.Is
// ErrCorrupt) naming the damaged blocks.
func (e *Engine) Read(ctx context.Context, id ObjectID, off int64, p []byte) error {
	return e.ReadView(ctx, id, 0, off, p)
}

// ReadView is Read through a view: 0 is the head (every layer), c > 0 the
// content of checkpoint c (the layers whose effective tag is below c).
func (e *Engine) ReadView(ctx context.Context, id ObjectID, view uint32, off int64, p []byte) error {
	if err := checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("engine: read %v view %d at %d length %d: %w", id, view, off, len(p), err)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	if err := e.read(id, off, p, viewSet(view)); err != nil {
		return fmt.Errorf("engine: read %v view %d at %d length %d: %w", id, view, off, len(p), err)
	}
	return nil
}

func (e *Engine) read(id ObjectID, off int64, p []byte, set layerSet) error {
	if len(p) == 0 {
		return nil
	}
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	lo := uint32(off / BlockSize)
	hi := uint32((off + int64(len(p)) + BlockSize - 1) / BlockSize)
	e.idx.RLock()
	rs.collect(e.ix, id.Volume, e.ix.lookup(id), lo, hi, set)
	e.idx.RUnlock()
	defer rs.release()
	return rs.readPieces(id, off, p)
}

// readPieces fills p, which holds the object from off, from the collected
// pieces, and zeros where there is none.
func (rs *readState) readPieces(id ObjectID, off int64, p []byte) error {
	end := off + int64(len(p))
	pos := off // bytes of the object before pos are filled
	for i := range rs.pieces {
		pc := &rs.pieces[i]
		ps := max(int64(pc.start)*BlockSize, off)
		if ps > pos {
			clear(p[pos-off : ps-off])
		}
		if err := rs.readPiece(pc, p, off); err != nil {
			return err
		}
		pos = min(int64(pc.start+pc.count)*BlockSize, end)
	}
	if pos < end {
		clear(p[pos-off:])
	}
	return rs.corruptErr(id)
}

// readPiece reads the part of pc that falls into p (which holds the object
// from off), verifying every block. Blocks that lie wholly inside p are
// read in place; a block that p covers only in part goes through the
// scratch block.
func (rs *readState) readPiece(pc *piece, p []byte, off int64) error {
	end := off + int64(len(p))
	b0, b1 := pc.start, pc.start+pc.count
	partial := func(b uint32) error {
		bs := int64(b) * BlockSize
		if err := pread(pc.seg.fd, rs.block[:], pc.off+int64(b-pc.start)*BlockSize); err != nil {
			return ioErr("reading "+segName(pc.seg.id), err)
		}
		rs.verify(pc, b, rs.block[:])
		s, t := max(bs, off), min(bs+BlockSize, end)
		copy(p[s-off:t-off], rs.block[s-bs:t-bs])
		return nil
	}
	if int64(b0)*BlockSize < off || int64(b0+1)*BlockSize > end {
		if err := partial(b0); err != nil {
			return err
		}
		b0++
	}
	if b1 > b0 && int64(b1)*BlockSize > end {
		if err := partial(b1 - 1); err != nil {
			return err
		}
		b1--
	}
	if b1 > b0 {
		dst := p[int64(b0)*BlockSize-off : int64(b1)*BlockSize-off]
		if err := pread(pc.seg.fd, dst, pc.off+int64(b0-pc.start)*BlockSize); err != nil {
			return ioErr("reading "+segName(pc.seg.id), err)
		}
		rs.verify(pc, b0, dst)
	}
	return nil
}

// readBlock reads block b of id, as set sees it, into buf, verified, and
// returns its stamp: the sequence number of the record the block came from
// (a WRITE, or a TRIM for a zero extent), 0 if no layer of set holds it.
// Zero extents and absent blocks read as zeros.
func (e *Engine) readBlock(id ObjectID, b uint32, buf []byte, set layerSet) (uint64, error) {
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	rs.pieces = rs.pieces[:0]
	var stamp uint64
	e.idx.RLock()
	if xs := rs.resolve(e.ix, id.Volume, e.ix.lookup(id), b, b+1, set); len(xs) > 0 {
		stamp = xs[0].seq
		if !xs[0].zero() {
			rs.pieces = append(rs.pieces, rs.piece(e.ix, id.Volume, xs[0]))
		}
	}
	e.idx.RUnlock()
	defer rs.release()
	if len(rs.pieces) == 0 {
		clear(buf)
		return stamp, nil
	}
	pc := &rs.pieces[0]
	if err := pread(pc.seg.fd, buf, pc.off); err != nil {
		return 0, ioErr("reading "+segName(pc.seg.id), err)
	}
	rs.verify(pc, b, buf)
	if err := rs.corruptErr(id); err != nil {
		return 0, err
	}
	return stamp, nil
}

// Extents describes [off, off+length) of the object, as the head sees it,
// as consecutive data, zero and hole extents: ExtentsView with view 0.
func (e *Engine) Extents(ctx context.Context, id ObjectID, off, length int64) ([]Extent, error) {
	return e.ExtentsView(ctx, id, 0, off, length)
}

// ExtentsView describes [off, off+length) of the object as a view sees it
// (see ReadView): consecutive runs of data, zero extents (Zero) and holes
// (Hole: in no layer of the view), runs of the same kind merged, at block
// granularity, clipped to the range: a write of one sector makes its whole
// block data.
func (e *Engine) ExtentsView(ctx context.Context, id ObjectID, view uint32, off, length int64) ([]Extent, error) {
	if err := checkRange(off, length); err != nil {
		return nil, fmt.Errorf("engine: extents of %v view %d at %d length %d: %w", id, view, off, length, err)
	}
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	if !e.enter() {
		return nil, ErrClosed
	}
	defer e.leave()
	if length == 0 {
		return nil, nil
	}
	end := off + length
	lo, hi := uint32(off/BlockSize), uint32((end+BlockSize-1)/BlockSize)
	var out extentList
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	e.idx.RLock()
	for _, x := range rs.resolve(e.ix, id.Volume, e.ix.lookup(id), lo, hi, viewSet(view)) {
		out.add(int64(x.start)*BlockSize, int64(x.end())*BlockSize, false, x.zero())
	}
	e.idx.RUnlock()
	return out.fill(off, end), nil
}

// extentList builds a list of Extents from runs given in order, merging
// adjacent runs of the same kind.
type extentList []Extent

func (l *extentList) add(s, t int64, hole, zero bool) {
	if t <= s {
		return
	}
	if n := len(*l); n > 0 {
		last := &(*l)[n-1]
		if last.Hole == hole && last.Zero == zero && last.Offset+last.Length == s {
			last.Length += t - s
			return
		}
	}
	*l = append(*l, Extent{Offset: s, Length: t - s, Hole: hole, Zero: zero})
}

// fill returns the runs clipped to [off, end) with holes added between
// them.
func (l extentList) fill(off, end int64) []Extent {
	var out extentList
	pos := off
	for _, x := range l {
		s, t := min(max(x.Offset, off), end), max(min(x.Offset+x.Length, end), off)
		out.add(pos, s, true, false)
		out.add(s, t, false, x.Zero)
		pos = max(pos, t)
	}
	out.add(pos, end, true, false)
	return out
}
