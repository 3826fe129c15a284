package engine

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"time"
)

// testHook, when set by a test, is called at the steps of a collection
// where a crash is most interesting.
var testHook func(event string)

func hook(event string) {
	if testHook != nil {
		testHook(event)
	}
}

// Compact collects every sealed segment whose live ratio is below
// Options.GCThreshold: it copies their live blocks to the head of the log,
// makes the copies durable, and deletes the segments. If the head segment
// itself is below the threshold it is sealed first, so that Compact after
// deleting or trimming everything returns the space. Client I/O continues
// meanwhile; locks are held for one batch of copies at a time.
func (e *Engine) Compact(ctx context.Context) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	e.gcUrgent.Add(1)
	defer e.gcUrgent.Add(-1)
	e.gcMu.Lock()
	defer e.gcMu.Unlock()
	if err := e.compact(ctx, true, -1); err != nil {
		return fmt.Errorf("engine: compact: %w", err)
	}
	return nil
}

func (e *Engine) gcLoop() {
	defer e.bgWG.Done()
	t := time.NewTicker(e.opts.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-e.bgCtx.Done():
			return
		case <-t.C:
		case <-e.gcKick:
		}
		if !e.enter() {
			return
		}
		e.gcMu.Lock()
		err := e.compact(e.bgCtx, false, e.opts.GCRate)
		e.gcMu.Unlock()
		e.leave()
		if err != nil && e.bgCtx.Err() == nil {
			e.log.Error("background compaction failed", "err", err)
		}
	}
}

// liveRatio is the part of a segment that compaction would have to copy.
// Engine.idx held.
func (e *Engine) liveRatio(s *segment) float64 {
	size := s.size.Load() - segHeaderSize
	if size <= 0 {
		return 0
	}
	live := s.liveBlocks*BlockSize + (s.verObjs+s.liveZeros)*recHeaderSize
	if s.trimBytes > 0 && e.oldestFirstSeqExcept(s) < s.maxTrimSeq {
		live += s.trimBytes
	}
	return float64(live) / float64(size)
}

// oldestFirstSeqExcept is the lowest firstSeq of the segments other than
// s. Data written before sequence number t can only be in a segment whose
// firstSeq is below t. Engine.idx held.
func (e *Engine) oldestFirstSeqExcept(s *segment) uint64 {
	oldest := uint64(math.MaxUint64)
	for _, x := range e.ix.segs {
		if x != s {
			oldest = min(oldest, x.firstSeq)
		}
	}
	return oldest
}

type limiter struct {
	rate  int64
	start time.Time
	bytes int64
}

// throttle sleeps so that the background collector copies at most rate
// bytes per second, unless an explicit Compact is waiting.
func (e *Engine) throttle(ctx context.Context, l *limiter, n int64) error {
	if l.rate <= 0 {
		return nil
	}
	if e.gcUrgent.Load() > 0 {
		l.start, l.bytes = time.Now(), 0
		return nil
	}
	l.bytes += n
	due := l.start.Add(time.Duration(float64(l.bytes) / float64(l.rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	return nil
}

func (e *Engine) gcCheck(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	if err := e.bgCtx.Err(); err != nil {
		return ErrClosed
	}
	return nil
}

func (e *Engine) compact(ctx context.Context, rollHead bool, rate int64) error {
	lim := &limiter{rate: rate, start: time.Now()}
	e.appendMu.Lock()
	if rollHead && e.failed == nil && e.headOff > segHeaderSize {
		e.idx.RLock()
		r := e.liveRatio(e.head)
		e.idx.RUnlock()
		if r < e.opts.GCThreshold {
			if err := e.rollLocked(); err != nil {
				e.appendMu.Unlock()
				return err
			}
		}
	}
	headID := e.head.id
	e.appendMu.Unlock()

	e.idx.RLock()
	var ids []uint32
	for id := range e.ix.segs {
		if id < headID {
			ids = append(ids, id)
		}
	}
	e.idx.RUnlock()
	slices.Sort(ids)
	// Oldest first: once older segments are gone, the trims of younger ones
	// shadow nothing and need not be copied.
	for _, id := range ids {
		if err := e.gcCheck(ctx); err != nil {
			return err
		}
		e.idx.RLock()
		s := e.ix.segs[id]
		ok := s != nil && e.liveRatio(s) < e.opts.GCThreshold
		if ok {
			s.acquire()
		}
		e.idx.RUnlock()
		if !ok {
			continue
		}
		err := e.collect(ctx, s, lim)
		s.release()
		if err != nil {
			return err
		}
	}
	return e.pruneDeleted()
}

// gcRec is a WRITE record of the segment being collected.
type gcRec struct {
	h       recHeader
	dataOff int64
}

// gcPiece is a live run of a gcRec, read into the collector's buffer.
type gcPiece struct {
	id           ObjectID
	seq          uint64
	tag          uint32
	start, count uint32
	off          int64 // file offset in the old segment
	crcs         []uint32
	buf          int // offset in the buffer
}

// collect moves the live content of segment s to the head and deletes s.
// gcMu held.
//
// Correctness rests on three rules. Copies are appended under appendMu
// only for blocks whose index entry still points at s (a compare-and-swap
// against concurrent writes), so a copy is always newer than everything
// before it in the log and replay order stays right. Trims are copied
// with their original sequence number, and replay applies a trim only to
// blocks written before it, so a copied trim never hides newer data; a
// trim is dropped once no other segment can hold data older than it. The
// segment is deleted only after the copies are durable.
func (e *Engine) collect(ctx context.Context, s *segment, lim *limiter) error {
	size := s.size.Load()
	sc := newScanner(s.fd, size)
	seen := make(map[ObjectID]struct{})
	var trims, zeroTrims []recHeader
	var batch []gcRec
	batchBlocks := 0
	var copied int64
	for off := int64(segHeaderSize); off < size; {
		h, _, err := sc.record(off)
		if err != nil {
			if errors.Is(err, errBadRecord) || errors.Is(err, errTorn) {
				err = fmt.Errorf("%w: %v", ErrCorrupt, err)
			}
			return fmt.Errorf("scanning %s at %d: %w", segName(s.id), off, err)
		}
		switch h.typ {
		case recWrite:
			seen[h.id] = struct{}{}
			batch = append(batch, gcRec{h: h, dataOff: off + recHeaderSize + h.crcArrayLen()})
			batchBlocks += int(h.count)
		case recTrim:
			seen[h.id] = struct{}{}
			if h.flags&flagZero != 0 {
				zeroTrims = append(zeroTrims, h)
			} else {
				trims = append(trims, h)
			}
		case recClear:
			seen[h.id] = struct{}{}
			trims = append(trims, h)
		case recVersion:
			seen[h.id] = struct{}{}
		}
		off += h.length()
		if batchBlocks >= maxRecordBlocks || (off >= size && len(batch) > 0) {
			n, err := e.copyLive(s, batch)
			if err != nil {
				return err
			}
			copied += n
			batch, batchBlocks = batch[:0], 0
			if err := e.gcCheck(ctx); err != nil {
				return err
			}
			if err := e.throttle(ctx, lim, n); err != nil {
				return err
			}
		}
	}
	if err := e.keepMetadata(s, trims, zeroTrims, seen); err != nil {
		return err
	}
	hook("gc-copied")
	e.appendMu.Lock()
	lsn := e.appendLSN
	e.appendMu.Unlock()
	if err := e.syncTo(ctx, lsn); err != nil {
		return err
	}
	hook("gc-synced")

	e.idx.Lock()
	if s.liveBlocks != 0 || s.verObjs != 0 || s.liveZeros != 0 {
		e.idx.Unlock()
		return fmt.Errorf("internal error: %s still referenced after compaction (%d blocks, %d versions, %d zero extents)",
			segName(s.id), s.liveBlocks, s.verObjs, s.liveZeros)
	}
	delete(e.ix.segs, s.id)
	e.idx.Unlock()
	if err := os.Remove(s.path); err != nil {
		return ioErr("removing "+segName(s.id), err)
	}
	if err := syncDir(e.dir); err != nil {
		return ioErr("syncing directory", err)
	}
	s.release() // the index's reference; readers may still hold theirs
	e.statGCSegs.Add(1)
	e.statGCBytes.Add(uint64(copied))
	e.log.Debug("segment collected", "segment", segName(s.id), "size", size, "copied", copied)
	return nil
}

// copyLive copies the blocks of the records in batch that are still live
// to the head of the log. It returns the bytes copied.
func (e *Engine) copyLive(s *segment, batch []gcRec) (int64, error) {
	// Find the live runs: extents that still point at these records.
	var pieces []gcPiece
	var xs []extent
	total := 0
	e.idx.RLock()
	for _, r := range batch {
		xs = liveExtents(e.ix.lookup(r.h.id), s.id, r.h.seq, r.h.start, r.h.start+r.h.count, false, xs[:0])
		for _, x := range xs {
			cs, ce := max(x.start, r.h.start), min(x.end(), r.h.start+r.h.count)
			d := cs - x.start
			pieces = append(pieces, gcPiece{
				id: r.h.id, seq: r.h.seq, tag: x.tag, start: cs, count: ce - cs,
				off:  int64(x.off) + int64(d)*BlockSize,
				crcs: slices.Clone(s.crcs[x.crcIdx+d : x.crcIdx+d+(ce-cs)]),
				buf:  total,
			})
			total += int(ce-cs) * BlockSize
		}
	}
	e.idx.RUnlock()
	if len(pieces) == 0 {
		return 0, nil
	}

	// Read them, outside every lock. A block that fails its CRC is copied
	// with its stored CRC, so it stays detectably corrupt instead of being
	// laundered into a good-looking block.
	if cap(e.gcBuf) < total {
		e.gcBuf = make([]byte, total)
	}
	buf := e.gcBuf[:total]
	for _, pc := range pieces {
		p := buf[pc.buf : pc.buf+int(pc.count)*BlockSize]
		if err := pread(s.fd, p, pc.off); err != nil {
			return 0, ioErr("reading "+segName(s.id)+" for compaction", err)
		}
		for i := range pc.count {
			if crc32c(p[i*BlockSize:(i+1)*BlockSize]) != pc.crcs[i] {
				e.log.Warn("compaction copied a corrupt block", "object", pc.id.String(),
					"offset", int64(pc.start+i)*BlockSize, "segment", segName(s.id))
			}
		}
	}

	// Append the copies of what is still live now.
	var copied int64
	e.appendMu.Lock()
	defer e.appendMu.Unlock()
	for _, pc := range pieces {
		o := e.ix.lookup(pc.id)
		xs = liveExtents(o, s.id, pc.seq, pc.start, pc.start+pc.count, false, xs[:0])
		for _, x := range xs {
			cs, ce := max(x.start, pc.start), min(x.end(), pc.start+pc.count)
			for cs < ce {
				n := min(ce-cs, e.maxRecBlocks)
				i := cs - pc.start
				data := buf[pc.buf+int(i)*BlockSize : pc.buf+int(i+n)*BlockSize]
				// The copy keeps the raw tag, so it goes back into the same
				// layer and ranks there as the original did.
				h := recHeader{typ: recWrite, flags: flagGC, count: n, start: cs, id: pc.id, version: o.version, tag: x.tag}
				if err := e.appendAndApplyLocked(&h, pc.crcs[i:i+n], [][]byte{data}); err != nil {
					return copied, err
				}
				copied += int64(n) * BlockSize
				cs += n
			}
		}
	}
	return copied, nil
}

// liveExtents appends to dst the extents of o in [start, end), in any
// layer, that still come from the record with sequence number seq in
// segment seg: data extents, or zero extents if zero.
func liveExtents(o *object, seg uint32, seq uint64, start, end uint32, zero bool, dst []extent) []extent {
	if o == nil {
		return dst
	}
	for _, l := range o.layers {
		n := len(dst)
		dst = overlappingInto(l.tree, start, end, dst)
		kept := dst[:n]
		for _, x := range dst[n:] {
			if x.seg == seg && x.seq == seq && x.zero() == zero {
				kept = append(kept, x)
			}
		}
		dst = kept
	}
	return dst
}

// keepMetadata copies the zero extents of s that are still live (like
// data: new sequence numbers, the same tags), copies the removal trims
// and clears of s that may still hide older data (with their sequence
// numbers), and writes a version record for every object whose version
// was carried only by s. gcMu held.
func (e *Engine) keepMetadata(s *segment, trims, zeroTrims []recHeader, seen map[ObjectID]struct{}) error {
	e.appendMu.Lock()
	defer e.appendMu.Unlock()
	e.idx.RLock()
	oldest := e.oldestFirstSeqExcept(s)
	e.idx.RUnlock()
	var xs []extent
	for _, t := range zeroTrims {
		o := e.ix.lookup(t.id)
		xs = liveExtents(o, s.id, t.seq, t.start, t.start+t.count, true, xs[:0])
		for _, x := range xs {
			h := recHeader{typ: recTrim, flags: flagGC | flagZero, count: x.count, start: x.start, id: t.id, version: o.version, tag: x.tag}
			if err := e.appendAndApplyLocked(&h, nil, nil); err != nil {
				return err
			}
		}
	}
	for _, t := range trims {
		if d, ok := e.deleted[t.id.Volume]; ok && t.seq < d {
			continue // its volume was deleted after it
		}
		if e.ix.lookup(t.id) == nil || oldest >= t.seq {
			continue // nothing older than it is left to hide
		}
		h := t
		h.flags |= flagGC
		if err := e.appendAndApplyLocked(&h, nil, nil); err != nil {
			return err
		}
	}
	for id := range seen {
		o := e.ix.lookup(id)
		if o == nil || o.verSeg != s.id {
			continue
		}
		h := recHeader{typ: recVersion, flags: flagGC, id: id, version: o.version}
		if err := e.appendAndApplyLocked(&h, nil, nil); err != nil {
			return err
		}
	}
	return nil
}
