package engine

import (
	"context"
	"fmt"
)

// ScrubStats summarises a Scrub.
type ScrubStats struct {
	Objects   int64 // objects walked
	Blocks    int64 // live blocks verified
	BadBlocks int64 // blocks that failed their checksum
}

// Scrub reads every live block of every layer and verifies its CRC. For each run of bad
// blocks it calls bad with the object, the byte range (block aligned) and
// a *CorruptError; bad is called without engine locks held and may call
// the engine (for example to rewrite the range from a replica). Scrub
// does not pace itself: the caller does, by cancelling ctx or by calling it
// at the rate it wants.
func (e *Engine) Scrub(ctx context.Context, bad func(id ObjectID, off, length int64, err error)) (ScrubStats, error) {
	var st ScrubStats
	if err := ctxErr(ctx); err != nil {
		return st, err
	}
	if !e.enter() {
		return st, ErrClosed
	}
	ids := e.AllObjects()
	e.leave()
	buf := make([]byte, maxRecordBlocks*BlockSize)
	for _, id := range ids {
		if err := ctxErr(ctx); err != nil {
			return st, err
		}
		// Enter per object, so that bad runs outside and may call the
		// engine, and Close does not wait for a whole scrub.
		if !e.enter() {
			return st, ErrClosed
		}
		runs, err := e.scrubObject(id, buf, &st)
		e.leave()
		if err != nil {
			return st, fmt.Errorf("engine: scrub of %v: %w", id, err)
		}
		st.Objects++
		for i := range runs {
			r := runs[i]
			e.log.Warn("scrub found a corrupt range", "object", id.String(), "offset", r.Offset,
				"length", r.Length, "segment", r.Segment, "file_offset", r.FileOffset)
			if bad != nil {
				bad(id, r.Offset, r.Length, &r)
			}
		}
	}
	return st, nil
}

// scrubObject verifies the live blocks of one object and returns the bad
// runs.
func (e *Engine) scrubObject(id ObjectID, buf []byte, st *ScrubStats) ([]CorruptError, error) {
	rs := e.readPool.Get().(*readState)
	defer e.readPool.Put(rs)
	// Every data block of every layer: blocks shadowed by a higher layer
	// are still live, checkpoints read them.
	rs.pieces = rs.pieces[:0]
	e.idx.RLock()
	if o := e.ix.lookup(id); o != nil {
		for _, l := range o.layers {
			l.tree.Ascend(func(x extent) bool {
				if !x.zero() {
					rs.pieces = append(rs.pieces, rs.piece(e.ix, id.Volume, x))
				}
				return true
			})
		}
	}
	e.idx.RUnlock()
	var runs []CorruptError
	var cur *CorruptError
	flush := func() {
		if cur != nil {
			runs = append(runs, *cur)
			cur = nil
		}
	}
	for i := range rs.pieces {
		pc := &rs.pieces[i]
		for b := uint32(0); b < pc.count; {
			n := min(pc.count-b, maxRecordBlocks)
			p := buf[:int(n)*BlockSize]
			if err := pread(pc.seg.fd, p, pc.off+int64(b)*BlockSize); err != nil {
				rs.release()
				return nil, ioErr("reading "+segName(pc.seg.id), err)
			}
			for j := range n {
				blk := pc.start + b + j
				st.Blocks++
				if crc32c(p[int(j)*BlockSize:int(j+1)*BlockSize]) == pc.crcs[b+j] {
					flush()
					continue
				}
				st.BadBlocks++
				if cur != nil && cur.Layer == pc.layer && cur.Offset+cur.Length == int64(blk)*BlockSize {
					cur.Length += BlockSize
					continue
				}
				flush()
				cur = &CorruptError{ID: id, Offset: int64(blk) * BlockSize, Length: BlockSize, Layer: pc.layer,
					Segment: segName(pc.seg.id), FileOffset: pc.off + int64(b+j)*BlockSize}
			}
			b += n
		}
	}
	flush()
	rs.release()
	return runs, nil
}
