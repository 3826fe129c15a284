package engine

import (
	"bytes"
	"context"
	"fmt"

	"golang.org/x/sys/unix"
)

// writeState is the per-call scratch of Write and Trim, pooled.
type writeState struct {
	head, tail [BlockSize]byte
	crcs       []uint32
	data       [][]byte
}

// Write stores p at off in the object. off and len(p) must be multiples of
// SectorSize and the range must lie within the object. A write that covers
// part of a block is merged with the block's current content. With o.Sync
// (FUA) the data is durable when Write returns nil; if ctx ends while it
// waits for that, Write returns the context's error and the data, already
// written, may or may not be durable. A failed Write may have stored part
// of p.
func (e *Engine) Write(ctx context.Context, id ObjectID, off int64, p []byte, o WriteOptions) error {
	if err := checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("engine: write %v at %d length %d: %w", id, off, len(p), err)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	var lsn uint64
	if len(p) > 0 {
		var err error
		if lsn, err = e.write(id, off, p, o.Version); err != nil {
			return fmt.Errorf("engine: write %v at %d length %d: %w", id, off, len(p), err)
		}
	}
	if o.Sync {
		if err := e.syncTo(ctx, lsn); err != nil {
			return fmt.Errorf("engine: write %v at %d length %d: sync: %w", id, off, len(p), err)
		}
	}
	return nil
}

// partialBlocks reports whether the first and last blocks of [off, off+n)
// are only partly covered, and the block range.
func partialBlocks(off, n int64) (first, end uint32, headPart, tailPart bool) {
	first = uint32(off / BlockSize)
	end = uint32((off + n + BlockSize - 1) / BlockSize)
	headPart = off%BlockSize != 0 || off+n < int64(first+1)*BlockSize
	tailPart = end-1 > first && (off+n)%BlockSize != 0
	return
}

func (e *Engine) write(id ObjectID, off int64, p []byte, version uint64) (uint64, error) {
	ws := e.writePool.Get().(*writeState)
	defer e.writePool.Put(ws)
	first, end, headPart, tailPart := partialBlocks(off, int64(len(p)))
	nb := int(end - first)
	if cap(ws.crcs) < nb {
		ws.crcs = make([]uint32, objectBlocks)
	}
	crcs := ws.crcs[:nb]
	for b := first; b < end; b++ {
		if (b == first && headPart) || (b == end-1 && tailPart) {
			continue
		}
		i := int64(b)*BlockSize - off
		crcs[b-first] = crc32c(p[i : i+BlockSize])
	}
	for {
		// Read-modify-write of partly covered blocks is optimistic: the
		// block's current extent is remembered (its sequence number, 0 for
		// a hole) and checked again under appendMu; if another write got
		// there first, merge again.
		var hs, ts uint64
		var err error
		if headPart {
			if hs, err = e.mergeBlock(id, first, ws.head[:], off, p); err != nil {
				return 0, err
			}
			crcs[0] = crc32c(ws.head[:])
		}
		if tailPart {
			if ts, err = e.mergeBlock(id, end-1, ws.tail[:], off, p); err != nil {
				return 0, err
			}
			crcs[nb-1] = crc32c(ws.tail[:])
		}
		e.appendMu.Lock()
		if (headPart && e.stampLocked(id, first) != hs) || (tailPart && e.stampLocked(id, end-1) != ts) {
			e.appendMu.Unlock()
			continue
		}
		var lsn uint64
		for cs := first; cs < end && err == nil; {
			ce := min(end, cs+e.maxRecBlocks)
			data := ws.data[:0]
			ms, me := cs, ce // blocks taken straight from p
			if cs == first && headPart {
				data = append(data, ws.head[:])
				ms++
			}
			if ce == end && tailPart && ce-1 >= ms {
				me--
			}
			if me > ms {
				i := int64(ms)*BlockSize - off
				data = append(data, p[i:i+int64(me-ms)*BlockSize])
			}
			if ce == end && tailPart {
				data = append(data, ws.tail[:])
			}
			ws.data = data
			h := recHeader{typ: recWrite, count: ce - cs, start: cs, id: id, version: version}
			err = e.appendAndApplyLocked(&h, crcs[cs-first:ce-first], data)
			cs = ce
		}
		lsn = e.appendLSN
		e.appendMu.Unlock()
		clear(ws.data)
		return lsn, err
	}
}

// mergeBlock reads block b of id into buf and copies over it the part of
// p (written at off) that falls into the block. It returns the block's
// stamp.
func (e *Engine) mergeBlock(id ObjectID, b uint32, buf []byte, off int64, p []byte) (uint64, error) {
	stamp, err := e.readBlock(id, b, buf)
	if err != nil {
		return 0, err
	}
	bs := int64(b) * BlockSize
	s, t := max(bs, off), min(bs+BlockSize, off+int64(len(p)))
	copy(buf[s-bs:t-bs], p[s-off:t-off])
	return stamp, nil
}

// stampLocked returns the sequence number of the record holding block b
// of id, 0 for a hole. appendMu held.
func (e *Engine) stampLocked(id ObjectID, b uint32) uint64 {
	o := e.ix.lookup(id)
	if o == nil {
		return 0
	}
	var seq uint64
	o.tree.DescendLessOrEqual(extent{start: b}, func(x extent) bool {
		if x.end() > b {
			seq = x.seq
		}
		return false
	})
	return seq
}

// appendAndApplyLocked appends a record and publishes it in the index.
// appendMu held.
func (e *Engine) appendAndApplyLocked(h *recHeader, crcs []uint32, data [][]byte) error {
	seg, dataOff, crcIdx, err := e.appendLocked(h, crcs, data)
	if err != nil {
		return err
	}
	e.idx.Lock()
	switch h.typ {
	case recWrite:
		e.ix.applyWrite(h.id, h, seg, dataOff, crcIdx)
	case recTrim:
		e.ix.applyTrim(h, seg)
	case recVersion:
		e.ix.applyVersion(h, seg)
	}
	e.idx.Unlock()
	return nil
}

// appendLocked writes one record at the head of the log, rolling to a new
// segment when it does not fit. It assigns the sequence number unless h
// carries one (a copied trim). For a WRITE it returns where the data went
// and where its CRCs are in the segment's table. appendMu held.
func (e *Engine) appendLocked(h *recHeader, crcs []uint32, data [][]byte) (seg *segment, dataOff int64, crcIdx uint32, err error) {
	if e.failed != nil {
		return nil, 0, 0, e.failed
	}
	n := h.length()
	if e.headOff+n > e.opts.SegmentSize && e.headOff > segHeaderSize {
		if h.typ == recSync {
			return nil, 0, 0, errNoRoom
		}
		if err := e.rollLocked(); err != nil {
			return nil, 0, 0, err
		}
	}
	if h.seq == 0 && h.typ != recSync {
		h.seq = e.nextSeq
		e.nextSeq++
	}
	seg = e.head
	iov := append(e.iov[:0], h.encode(e.hdrBuf, crcs))
	iov = append(iov, data...)
	e.iov = iov
	off := e.headOff
	err = pwritev(seg.fd, iov, off)
	clear(e.iov)
	if err != nil {
		// Take back whatever part of the record reached the file, so that
		// the next record follows the last good one.
		e.headDirty = unix.Ftruncate(seg.fd, off) != nil
		return nil, 0, 0, ioErr(fmt.Sprintf("appending to %s at %d", segName(seg.id), off), err)
	}
	e.headOff += n
	seg.size.Store(e.headOff)
	if h.typ != recSync {
		e.appendLSN += uint64(n)
	}
	if h.typ == recWrite {
		crcIdx = seg.nblocks
		copy(seg.crcs[crcIdx:], crcs)
		seg.nblocks += h.count
		dataOff = off + recHeaderSize + h.crcArrayLen()
	}
	return seg, dataOff, crcIdx, nil
}

// rollLocked seals the head segment and starts a new one. appendMu held.
func (e *Engine) rollLocked() error {
	old := e.head
	if e.headDirty {
		if err := unix.Ftruncate(old.fd, e.headOff); err != nil {
			return ioErr("truncating "+segName(old.id), err)
		}
		e.headDirty = false
	}
	// A segment is durable before its successor exists, so that recovery
	// only has to distrust the last one.
	if err := fdatasync(old.fd); err != nil {
		return e.failLocked(ioErr("syncing "+segName(old.id), err))
	}
	crcCap := int((e.opts.SegmentSize-segHeaderSize)/BlockSize) + 1
	seg, err := createSegment(e.dir, e.nextSegID, e.nextSeq, crcCap)
	if err != nil {
		return err
	}
	e.idx.Lock()
	e.ix.segs[seg.id] = seg
	e.idx.Unlock()
	e.nextSegID++
	e.head, e.headOff, e.markerOff = seg, segHeaderSize, 0
	select {
	case e.gcKick <- struct{}{}:
	default:
	}
	return nil
}

// failLocked makes a failure sticky: after a failed fdatasync the page
// cache may have dropped dirty pages, so nothing more may be acknowledged.
func (e *Engine) failLocked(err error) error {
	if e.failed == nil {
		e.failed = fmt.Errorf("%w: %w", ErrFailed, err)
		e.log.Error("engine failed; reopen required", "err", err)
	}
	return e.failed
}

// Trim makes [off, off+length) of the object read as zeros. Whole blocks
// become holes and stop taking space; the covered part of a partly covered
// block is zeroed, and the block becomes a hole if it is then all zeros.
// Trimming an object the engine holds nothing of is a no-op and records no
// version, so that discarding an unwritten petabyte costs nothing.
func (e *Engine) Trim(ctx context.Context, id ObjectID, off, length int64, o WriteOptions) error {
	if err := checkRange(off, length); err != nil {
		return fmt.Errorf("engine: trim %v at %d length %d: %w", id, off, length, err)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	if length == 0 {
		return nil
	}
	lsn, err := e.trim(id, off, length, o.Version)
	if err != nil {
		return fmt.Errorf("engine: trim %v at %d length %d: %w", id, off, length, err)
	}
	if o.Sync {
		if err := e.syncTo(ctx, lsn); err != nil {
			return fmt.Errorf("engine: trim %v at %d length %d: sync: %w", id, off, length, err)
		}
	}
	return nil
}

func (e *Engine) trim(id ObjectID, off, length int64, version uint64) (uint64, error) {
	ws := e.writePool.Get().(*writeState)
	defer e.writePool.Put(ws)
	first, end, headPart, tailPart := partialBlocks(off, length)
	for {
		e.idx.RLock()
		exists := e.ix.lookup(id) != nil
		e.idx.RUnlock()
		if !exists {
			return 0, nil
		}
		var hs, ts uint64
		headZero, tailZero := true, true
		var err error
		if headPart {
			if hs, err = e.zeroBlock(id, first, ws.head[:], off, length); err != nil {
				return 0, err
			}
			headZero = hs == 0 || isZero(ws.head[:])
		}
		if tailPart {
			if ts, err = e.zeroBlock(id, end-1, ws.tail[:], off, length); err != nil {
				return 0, err
			}
			tailZero = ts == 0 || isZero(ws.tail[:])
		}
		e.appendMu.Lock()
		if e.ix.lookup(id) == nil {
			e.appendMu.Unlock()
			return 0, nil
		}
		if (headPart && e.stampLocked(id, first) != hs) || (tailPart && e.stampLocked(id, end-1) != ts) {
			e.appendMu.Unlock()
			continue
		}
		ts0, te := first, end
		if headPart && !headZero {
			ts0++
			h := recHeader{typ: recWrite, count: 1, start: first, id: id, version: version}
			ws.crcs = append(ws.crcs[:0], crc32c(ws.head[:]))
			err = e.appendAndApplyLocked(&h, ws.crcs, [][]byte{ws.head[:]})
		}
		if tailPart && !tailZero && err == nil {
			te--
			h := recHeader{typ: recWrite, count: 1, start: end - 1, id: id, version: version}
			ws.crcs = append(ws.crcs[:0], crc32c(ws.tail[:]))
			err = e.appendAndApplyLocked(&h, ws.crcs, [][]byte{ws.tail[:]})
		}
		if te > ts0 && err == nil {
			h := recHeader{typ: recTrim, count: te - ts0, start: ts0, id: id, version: version}
			err = e.appendAndApplyLocked(&h, nil, nil)
		}
		lsn := e.appendLSN
		e.appendMu.Unlock()
		return lsn, err
	}
}

// zeroBlock reads block b into buf and zeroes the part of [off, off+n)
// that falls into it. It returns the block's stamp (0: a hole).
func (e *Engine) zeroBlock(id ObjectID, b uint32, buf []byte, off, n int64) (uint64, error) {
	stamp, err := e.readBlock(id, b, buf)
	if err != nil {
		return 0, err
	}
	bs := int64(b) * BlockSize
	s, t := max(bs, off), min(bs+BlockSize, off+n)
	clear(buf[s-bs : t-bs])
	return stamp, nil
}

var zeroBlock [BlockSize]byte

func isZero(p []byte) bool { return bytes.Equal(p, zeroBlock[:len(p)]) }
