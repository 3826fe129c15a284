package engine

import (
	"context"
	"crypto/sha256"
	"fmt"
)

// piece is a run of blocks of one extent, clipped to a request, with a
// reference on its segment.
type piece struct {
	start, count uint32 // blocks in the object
	seg          *segment
	off          int64    // file offset of block start
	crcs         []uint32 // CRC of each block
	seq          uint64
}

// readState is the per-call scratch of reads, pooled so that the read path
// does not allocate.
type readState struct {
	pieces  []piece
	block   [BlockSize]byte
	lo, hi  uint32
	ix      *index
	firstFn func(extent) bool
	restFn  func(extent) bool
	// bad block range found by the current read
	badFirst, badEnd uint32
	badSeg           *segment
	badOff           int64
}

func newReadState() any {
	rs := &readState{}
	rs.firstFn = func(x extent) bool { rs.add(x); return false }
	rs.restFn = func(x extent) bool { rs.add(x); return true }
	return rs
}

func (rs *readState) add(x extent) {
	s, t := max(x.start, rs.lo), min(x.end(), rs.hi)
	if s >= t {
		return
	}
	seg := rs.ix.segs[x.seg]
	seg.acquire()
	d := s - x.start
	rs.pieces = append(rs.pieces, piece{
		start: s, count: t - s, seg: seg,
		off:  x.off + int64(d)*BlockSize,
		crcs: seg.crcs[x.crcIdx+d : x.crcIdx+d+(t-s)],
		seq:  x.seq,
	})
}

// collect gathers, with references, the extents of o overlapping blocks
// [lo, hi). Engine.idx held for reading.
func (rs *readState) collect(ix *index, o *object, lo, hi uint32) {
	rs.pieces = rs.pieces[:0]
	if o == nil {
		return
	}
	rs.lo, rs.hi, rs.ix = lo, hi, ix
	o.tree.DescendLessOrEqual(extent{start: lo}, rs.firstFn)
	o.tree.AscendRange(extent{start: lo + 1}, extent{start: hi}, rs.restFn)
	rs.ix = nil
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
				rs.badFirst, rs.badSeg = bb, pc.seg
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
		Segment: segName(rs.badSeg.id), FileOffset: rs.badOff,
	}
}

// Read fills p with the object's content at off. off and len(p) must be
// multiples of SectorSize within the object. Holes read as zeros. Every
// block is verified against its CRC; a mismatch returns a *CorruptError
// (errors.Is ErrCorrupt) naming the damaged blocks.
func (e *Engine) Read(ctx context.Context, id ObjectID, off int64, p []byte) error {
	if err := checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("engine: read %v at %d length %d: %w", id, off, len(p), err)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	if err := e.read(id, off, p); err != nil {
		return fmt.Errorf("engine: read %v at %d length %d: %w", id, off, len(p), err)
	}
	return nil
}

func (e *Engine) read(id ObjectID, off int64, p []byte) error {
	if len(p) == 0 {
		return nil
	}
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	lo := uint32(off / BlockSize)
	hi := uint32((off + int64(len(p)) + BlockSize - 1) / BlockSize)
	e.idx.RLock()
	rs.collect(e.ix, e.ix.lookup(id), lo, hi)
	e.idx.RUnlock()
	defer rs.release()

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

// readBlock reads block b of id into buf, verified, and returns the
// sequence number of the record it came from (0 for a hole, which reads as
// zeros).
func (e *Engine) readBlock(id ObjectID, b uint32, buf []byte) (uint64, error) {
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	e.idx.RLock()
	rs.collect(e.ix, e.ix.lookup(id), b, b+1)
	e.idx.RUnlock()
	defer rs.release()
	if len(rs.pieces) == 0 {
		clear(buf)
		return 0, nil
	}
	pc := &rs.pieces[0]
	if err := pread(pc.seg.fd, buf, pc.off); err != nil {
		return 0, ioErr("reading "+segName(pc.seg.id), err)
	}
	rs.verify(pc, b, buf)
	if err := rs.corruptErr(id); err != nil {
		return 0, err
	}
	return pc.seq, nil
}

// Extents describes [off, off+length) of the object as consecutive data
// and hole extents, at block granularity, clipped to the range: a write of
// one sector makes its whole block data.
func (e *Engine) Extents(ctx context.Context, id ObjectID, off, length int64) ([]Extent, error) {
	if err := checkRange(off, length); err != nil {
		return nil, fmt.Errorf("engine: extents of %v at %d length %d: %w", id, off, length, err)
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
	var runs []extent
	e.idx.RLock()
	if o := e.ix.lookup(id); o != nil {
		o.tree.DescendLessOrEqual(extent{start: lo}, func(x extent) bool {
			if x.end() > lo {
				runs = append(runs, x)
			}
			return false
		})
		o.tree.AscendRange(extent{start: lo + 1}, extent{start: hi}, func(x extent) bool {
			runs = append(runs, x)
			return true
		})
	}
	e.idx.RUnlock()

	var out []Extent
	add := func(s, t int64, hole bool) {
		if t <= s {
			return
		}
		if n := len(out); n > 0 && out[n-1].Hole == hole && out[n-1].Offset+out[n-1].Length == s {
			out[n-1].Length += t - s
			return
		}
		out = append(out, Extent{Offset: s, Length: t - s, Hole: hole})
	}
	pos := off
	for _, x := range runs {
		s, t := max(int64(x.start)*BlockSize, off), min(int64(x.end())*BlockSize, end)
		add(pos, s, true)
		add(s, t, false)
		pos = t
	}
	add(pos, end, true)
	return out, nil
}

// ObjectChecksum returns the SHA-256 of the object's logical content: all
// ObjectSize bytes, holes as zeros. Replicas with equal content have equal
// checksums whatever their layout on disk. It reads (and verifies) the
// object's data.
func (e *Engine) ObjectChecksum(ctx context.Context, id ObjectID) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	if err := ctxErr(ctx); err != nil {
		return sum, err
	}
	if !e.enter() {
		return sum, ErrClosed
	}
	defer e.leave()
	const chunk = 256 << 10
	buf := make([]byte, chunk)
	h := sha256.New()
	for off := int64(0); off < ObjectSize; off += chunk {
		if err := ctxErr(ctx); err != nil {
			return sum, err
		}
		if err := e.read(id, off, buf); err != nil {
			return sum, fmt.Errorf("engine: checksum of %v: %w", id, err)
		}
		h.Write(buf)
	}
	h.Sum(sum[:0])
	return sum, nil
}
