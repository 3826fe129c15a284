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

// Write stores p at off in the object, in the layer of o.Layer. off and
// len(p) must be multiples of SectorSize and the range must lie within the
// object. A write that covers part of a block is merged with the block's
// content as the layers up to its own see it (lower layers included; a
// block absent from all of them merges with zeros). With o.Sync
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
		if lsn, err = e.write(id, off, p, o.Version, o.Layer); err != nil {
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

func (e *Engine) write(id ObjectID, off int64, p []byte, version uint64, tag uint32) (uint64, error) {
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
		// stamp of the extent the block comes from (its sequence number, 0
		// if absent) is remembered and checked again under appendMu; if
		// another write got there first, merge again. Deleting a checkpoint
		// changes no stamp: what the layers up to tag show is the same
		// whether they are merged or not.
		var hs, ts uint64
		var err error
		if headPart {
			if hs, err = e.mergeBlock(id, first, ws.head[:], off, p, tag); err != nil {
				return 0, err
			}
			crcs[0] = crc32c(ws.head[:])
		}
		if tailPart {
			if ts, err = e.mergeBlock(id, end-1, ws.tail[:], off, p, tag); err != nil {
				return 0, err
			}
			crcs[nb-1] = crc32c(ws.tail[:])
		}
		e.appendMu.Lock()
		if (headPart && e.stampLocked(id, first, tag) != hs) || (tailPart && e.stampLocked(id, end-1, tag) != ts) {
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
			h := recHeader{typ: recWrite, count: ce - cs, start: cs, id: id, version: version, tag: tag}
			err = e.appendAndApplyLocked(&h, crcs[cs-first:ce-first], data)
			cs = ce
		}
		lsn = e.appendLSN
		e.appendMu.Unlock()
		clear(ws.data)
		return lsn, err
	}
}

// mergeBlock reads block b of id, as the layers up to tag see it, into
// buf and copies over it the part of p (written at off) that falls into
// the block. It returns the block's stamp.
func (e *Engine) mergeBlock(id ObjectID, b uint32, buf []byte, off int64, p []byte, tag uint32) (uint64, error) {
	e.idx.RLock()
	set := e.ix.upToSet(id.Volume, tag)
	e.idx.RUnlock()
	stamp, err := e.readBlock(id, b, buf, set)
	if err != nil {
		return 0, err
	}
	bs := int64(b) * BlockSize
	s, t := max(bs, off), min(bs+BlockSize, off+int64(len(p)))
	copy(buf[s-bs:t-bs], p[s-off:t-off])
	return stamp, nil
}

// stampLocked returns the stamp of block b of id as the layers up to tag
// see it: the sequence number of the record it comes from, 0 if absent.
// appendMu held.
func (e *Engine) stampLocked(id ObjectID, b uint32, tag uint32) uint64 {
	o := e.ix.lookup(id)
	if o == nil {
		return 0
	}
	set := e.ix.upToSet(id.Volume, tag)
	var seq uint64
	for i := len(o.layers) - 1; i >= 0 && seq == 0; i-- {
		l := &o.layers[i]
		if !e.ix.includes(id.Volume, l, set) {
			continue
		}
		l.tree.DescendLessOrEqual(extent{start: b}, func(x extent) bool {
			if x.end() > b {
				seq = x.seq
			}
			return false
		})
	}
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
	case recClear:
		e.ix.applyClear(h, seg)
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

// Trim makes [off, off+length) of the object read as zeros, in the layer
// of o.Layer. Whole blocks are removed from the layer, or, if o.Layer > 0
// or o.Opaque, become zero extents in it (they must hide lower layers, and
// an incremental backup must see the trim). The covered part of a partly
// covered block is zeroed in the block's content as the layers up to
// o.Layer see it; the block is then treated as a whole block if it is all
// zeros, else written as data. Without o.Opaque, trimming an object the
// engine holds nothing of is a no-op and records no version, so that
// discarding an unwritten petabyte costs nothing; and a partly covered
// block that no layer up to o.Layer holds is left alone in a layer above
// 0, so that what lies beneath the object shows through its other sectors.
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
	lsn, err := e.trim(id, off, length, o)
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

func (e *Engine) trim(id ObjectID, off, length int64, o WriteOptions) (uint64, error) {
	ws := e.writePool.Get().(*writeState)
	defer e.writePool.Put(ws)
	first, end, headPart, tailPart := partialBlocks(off, length)
	tag := o.Layer
	// zeros: whole blocks become zero extents rather than being removed.
	zeros := tag > 0 || o.Opaque
	var flags uint8
	if zeros {
		flags = flagZero
	}
	for {
		e.idx.RLock()
		exists := e.ix.lookup(id) != nil
		set := e.ix.upToSet(id.Volume, tag)
		e.idx.RUnlock()
		if !exists && !o.Opaque {
			return 0, nil
		}
		var hs, ts uint64
		headDo, tailDo := inTrim, inTrim
		var err error
		if headPart {
			if hs, err = e.zeroBlock(id, first, ws.head[:], off, length, set); err != nil {
				return 0, err
			}
			headDo = partialFate(hs, ws.head[:], zeros, o.Opaque)
		}
		if tailPart {
			if ts, err = e.zeroBlock(id, end-1, ws.tail[:], off, length, set); err != nil {
				return 0, err
			}
			tailDo = partialFate(ts, ws.tail[:], zeros, o.Opaque)
		}
		e.appendMu.Lock()
		if e.ix.lookup(id) == nil && !o.Opaque {
			e.appendMu.Unlock()
			return 0, nil
		}
		if (headPart && e.stampLocked(id, first, tag) != hs) || (tailPart && e.stampLocked(id, end-1, tag) != ts) {
			e.appendMu.Unlock()
			continue
		}
		ts0, te := first, end
		recorded := false
		if headPart && headDo != inTrim {
			ts0++
			if headDo == asData {
				h := recHeader{typ: recWrite, count: 1, start: first, id: id, version: o.Version, tag: tag}
				ws.crcs = append(ws.crcs[:0], crc32c(ws.head[:]))
				err = e.appendAndApplyLocked(&h, ws.crcs, [][]byte{ws.head[:]})
				recorded = true
			}
		}
		if tailPart && tailDo != inTrim && te > ts0 && err == nil {
			te--
			if tailDo == asData {
				h := recHeader{typ: recWrite, count: 1, start: end - 1, id: id, version: o.Version, tag: tag}
				ws.crcs = append(ws.crcs[:0], crc32c(ws.tail[:]))
				err = e.appendAndApplyLocked(&h, ws.crcs, [][]byte{ws.tail[:]})
				recorded = true
			}
		}
		if te > ts0 && err == nil {
			h := recHeader{typ: recTrim, flags: flags, count: te - ts0, start: ts0, id: id, version: o.Version, tag: tag}
			err = e.appendAndApplyLocked(&h, nil, nil)
			recorded = true
		}
		if !recorded && err == nil {
			// Only blocks left alone: the version must still be recorded.
			h := recHeader{typ: recVersion, id: id, version: o.Version}
			err = e.appendAndApplyLocked(&h, nil, nil)
		}
		lsn := e.appendLSN
		e.appendMu.Unlock()
		return lsn, err
	}
}

// What a trim does with a partly covered block.
type partialAction int

const (
	inTrim partialAction = iota // all zeros: trimmed like a whole block
	asData                      // written as data, with the covered sectors zeroed
	leave                       // left alone (see partialFate)
)

// partialFate decides what a trim does with a partly covered block whose
// zeroed content is buf and whose stamp is stamp. A block that no layer up
// to the trim's holds (stamp 0) would read as zeros; but if the trim
// records zero extents and is not opaque, something beneath the object (a
// linked clone's parent) may show through there, and a zero extent over
// the whole block would hide it in the sectors the trim does not cover.
// An opaque trim asks for zeros over whatever is beneath: its caller is
// expected to have copied such a block up first.
func partialFate(stamp uint64, buf []byte, zeros, opaque bool) partialAction {
	switch {
	case stamp == 0 && zeros && !opaque:
		return leave
	case isZero(buf):
		return inTrim
	}
	return asData
}

// zeroBlock reads block b, as set sees it, into buf and zeroes the part of
// [off, off+n) that falls into it. It returns the block's stamp (0:
// absent).
func (e *Engine) zeroBlock(id ObjectID, b uint32, buf []byte, off, n int64, set layerSet) (uint64, error) {
	stamp, err := e.readBlock(id, b, buf, set)
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
