package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// recover rebuilds the index from the log. Sealed segments (all but the
// last) were synced before their successor was created, so they are read
// headers and CRC arrays only, and any damage in them is an error. The
// last segment may end in records that were never synced: its records
// after the last sync marker are verified with their data, and the
// segment is cut at the first one that is incomplete or damaged.
func (e *Engine) recover() error {
	start := time.Now()
	ents, err := os.ReadDir(e.dir)
	if err != nil {
		return ioErr("reading directory", err)
	}
	var ids []uint32
	for _, de := range ents {
		name := de.Name()
		switch {
		case strings.HasSuffix(name, ".tmp"):
			// An unfinished segment creation or table rewrite.
			if err := os.Remove(filepath.Join(e.dir, name)); err != nil {
				return ioErr("removing "+name, err)
			}
		case strings.HasPrefix(name, "seg-") && strings.HasSuffix(name, ".log"):
			id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, "seg-"), ".log"), 16, 32)
			if err != nil || name != segName(uint32(id)) {
				return fmt.Errorf("engine: unexpected file %s in %s", name, e.dir)
			}
			ids = append(ids, uint32(id))
		}
	}
	slices.Sort(ids)
	st, err := e.replayLog(ids, nil)
	if err != nil {
		return err
	}
	if e.ix.replay.again {
		// A copied CLEAR came after records it removes that shadowed newer
		// ones (see replayState): replay again from scratch, with every
		// object's highest clear known from the start. Rare: it takes a
		// clear, an out-of-order tag and a deleted checkpoint.
		floor := e.ix.replay.floor
		e.log.Info("replaying the log again, leaving out the records of cleared objects older than their clear",
			"objects", len(floor))
		for _, s := range e.ix.segs {
			s.release()
		}
		e.ix, e.deleted = newIndex(), make(map[uint64]uint64)
		truncated := st.truncated
		if st, err = e.replayLog(ids, floor); err != nil {
			return err
		}
		st.truncated += truncated
	}
	e.ix.replay = nil
	e.nextSeq = st.maxSeq + 1
	if len(ids) == 0 {
		s, err := createSegment(e.dir, 1, e.nextSeq, int((e.opts.SegmentSize-segHeaderSize)/BlockSize)+1)
		if err != nil {
			return err
		}
		e.ix.segs[s.id] = s
		ids = append(ids, 1)
	}
	e.head = e.ix.segs[ids[len(ids)-1]]
	e.headOff = e.head.size.Load()
	e.markerOff = st.durable
	e.nextSegID = e.head.id + 1
	// Whatever survived in the tail is now part of the state; make it
	// durable before anything new is acknowledged on top of it.
	if err := fdatasync(e.head.fd); err != nil {
		return ioErr("syncing "+segName(e.head.id), err)
	}
	e.log.Info("engine opened", "dir", e.dir, "segments", len(ids), "records", st.records,
		"objects", e.ix.nobjs, "extents", e.ix.nextents, "truncated_bytes", st.truncated,
		"verified_tail_bytes", st.verified, "elapsed", time.Since(start))
	return nil
}

// replayLog loads the deleted-volumes table and replays the segments ids
// into the index, which must be empty. floor, if not nil, is every
// object's highest CLEAR, from an earlier replay (see replayState).
func (e *Engine) replayLog(ids []uint32, floor map[ObjectID]uint64) (*replayStats, error) {
	e.ix.replay = newReplayState(floor)
	maxSeq, err := e.loadDeleted()
	if err != nil {
		return nil, err
	}
	st := &replayStats{maxSeq: maxSeq}
	for i, id := range ids {
		last := i == len(ids)-1
		s, err := e.openSegment(id, last)
		if err != nil {
			return nil, err
		}
		e.ix.segs[id] = s
		st.maxSeq = max(st.maxSeq, s.firstSeq)
		if last {
			err = e.replayTail(s, st)
		} else {
			err = e.replaySealed(s, st)
		}
		if err != nil {
			return nil, err
		}
	}
	return st, nil
}

type replayStats struct {
	maxSeq    uint64
	records   int64
	truncated int64
	verified  int64
	durable   int64 // offset of the last segment recorded durable by a sync marker
}

func (e *Engine) openSegment(id uint32, last bool) (*segment, error) {
	name := segName(id)
	path := filepath.Join(e.dir, name)
	flag := os.O_RDONLY
	if last {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, ioErr("opening "+name, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, ioErr("stat "+name, err)
	}
	size := fi.Size()
	b := make([]byte, segHeaderSize)
	if size < segHeaderSize {
		f.Close()
		return nil, fmt.Errorf("engine: %s: %w: file shorter than its header", name, ErrCorrupt)
	}
	if err := pread(int(f.Fd()), b, 0); err != nil {
		f.Close()
		return nil, ioErr("reading "+name, err)
	}
	sh, err := decodeSegHeader(b)
	if err == nil && sh.id != uint64(id) {
		err = fmt.Errorf("header names segment %d", sh.id)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("engine: %s: %w: %v", name, ErrCorrupt, err)
	}
	capBytes := size
	if last {
		capBytes = max(size, e.opts.SegmentSize)
	}
	s := &segment{id: id, path: path, f: f, fd: int(f.Fd()), firstSeq: sh.firstSeq,
		crcs: make([]uint32, (capBytes-segHeaderSize)/BlockSize+1)}
	s.refs.Store(1)
	s.size.Store(size)
	return s, nil
}

// replayRecord applies one record found in segment s at off.
func (e *Engine) replayRecord(s *segment, h *recHeader, crcb []byte, off int64, st *replayStats) {
	st.records++
	st.maxSeq = max(st.maxSeq, h.seq)
	var crcIdx uint32
	if h.typ == recWrite {
		crcIdx = s.nblocks
		for i := range h.count {
			s.crcs[crcIdx+i] = binary.LittleEndian.Uint32(crcb[4*i:])
		}
		s.nblocks += h.count
	}
	if h.typ == recSync {
		return
	}
	if d, ok := e.deleted[h.id.Volume]; ok && h.seq < d {
		return // written before its volume was deleted
	}
	if (h.typ == recWrite || h.typ == recTrim && h.flags&flagZero != 0) && e.ix.clearedBefore(h.id, h.seq) {
		// A CLEAR of the object removes it: left out, so that it cannot
		// shadow a newer record before a copied clear is replayed.
		e.ix.applyVersion(h, s)
		return
	}
	switch h.typ {
	case recWrite:
		e.ix.applyWrite(h.id, h, s, off+recHeaderSize+h.crcArrayLen(), crcIdx)
	case recTrim:
		e.ix.applyTrim(h, s)
	case recVersion:
		e.ix.applyVersion(h, s)
	case recClear:
		e.ix.applyClear(h, s)
	}
}

func corruptAt(s *segment, off int64, err error) error {
	if errors.Is(err, errBadRecord) || errors.Is(err, errTorn) {
		return fmt.Errorf("engine: %s offset %d: %w: %v", segName(s.id), off, ErrCorrupt, err)
	}
	return ioErr(fmt.Sprintf("reading %s at %d", segName(s.id), off), err)
}

func (e *Engine) replaySealed(s *segment, st *replayStats) error {
	size := s.size.Load()
	sc := newScanner(s.fd, size)
	for off := int64(segHeaderSize); off < size; {
		h, crcb, err := sc.record(off)
		if err != nil {
			return fmt.Errorf("%w (in a sealed segment: this node's copy must be rebuilt from replicas)", corruptAt(s, off, err))
		}
		e.replayRecord(s, &h, crcb, off, st)
		off += h.length()
	}
	return nil
}

type tailRec struct {
	h   recHeader
	off int64
}

func (e *Engine) replayTail(s *segment, st *replayStats) error {
	size := s.size.Load()
	sc := newScanner(s.fd, size)
	// Pass 1: headers, up to the first record that does not parse.
	var recs []tailRec
	var durable int64 = segHeaderSize
	cut := size
	var why error
	for off := int64(segHeaderSize); off < size; {
		h, _, err := sc.record(off)
		if err != nil {
			if !errors.Is(err, errBadRecord) && !errors.Is(err, errTorn) {
				return corruptAt(s, off, err) // an I/O error
			}
			cut, why = off, err
			break
		}
		recs = append(recs, tailRec{h, off})
		if h.typ == recSync && int64(h.aux) <= off {
			durable = max(durable, int64(h.aux))
		}
		off += h.length()
	}
	// Pass 2: the data of records past the durable point, which may have
	// been torn by a crash (pages reach the disk in any order).
	var buf []byte
	for _, r := range recs {
		if r.off < durable || r.h.typ != recWrite {
			continue
		}
		if r.off >= cut {
			break
		}
		_, crcb, err := sc.record(r.off)
		if err != nil {
			return corruptAt(s, r.off, err)
		}
		n := int(r.h.count) * BlockSize
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		data := buf[:n]
		if err := pread(s.fd, data, r.off+recHeaderSize+r.h.crcArrayLen()); err != nil {
			return corruptAt(s, r.off, err)
		}
		st.verified += int64(n)
		bad := -1
		for i := range int(r.h.count) {
			if crc32c(data[i*BlockSize:(i+1)*BlockSize]) != binary.LittleEndian.Uint32(crcb[4*i:]) {
				bad = i
				break
			}
		}
		if bad >= 0 {
			cut, why = r.off, fmt.Errorf("data block %d of the record fails its checksum", bad)
			break
		}
	}
	if cut < size {
		// A sync marker past the cut would prove that the damaged record was
		// acknowledged durable: that is corruption, not a torn append.
		if at, ok, err := findMarkerAfter(s.fd, cut, size); err != nil {
			return corruptAt(s, cut, err)
		} else if ok {
			return fmt.Errorf("engine: %s offset %d: %w: %v, but the sync marker at %d shows it was durable",
				segName(s.id), cut, ErrCorrupt, why, at)
		}
		e.log.Warn("dropping the incomplete tail of the log (a crash during an append)",
			"segment", segName(s.id), "offset", cut, "bytes", size-cut, "reason", why)
		if err := unix.Ftruncate(s.fd, cut); err != nil {
			return ioErr("truncating "+segName(s.id), err)
		}
		st.truncated += size - cut
		s.size.Store(cut)
		sc = newScanner(s.fd, cut)
	}
	// Pass 3: apply what survived.
	for _, r := range recs {
		if r.off >= cut {
			break
		}
		h, crcb, err := sc.record(r.off)
		if err != nil {
			return corruptAt(s, r.off, err)
		}
		e.replayRecord(s, &h, crcb, r.off, st)
	}
	st.durable = durable
	return nil
}

// findMarkerAfter looks for a valid sync marker in [from+8, size) whose
// durable offset lies beyond from. Records are 8-byte aligned.
func findMarkerAfter(fd int, from, size int64) (int64, bool, error) {
	const chunk = 1 << 20
	buf := make([]byte, chunk+recHeaderSize)
	for base := from + 8; base+recHeaderSize <= size; base += chunk {
		n := min(int64(len(buf)), size-base)
		b := buf[:n]
		if err := pread(fd, b, base); err != nil {
			return 0, false, err
		}
		for i := int64(0); i+recHeaderSize <= n && i < chunk; i += 8 {
			if binary.LittleEndian.Uint32(b[i:]) != recMagic || b[i+4] != recSync {
				continue
			}
			hb := b[i : i+recHeaderSize]
			h, err := decodeHeader(hb)
			if err != nil || checkHeaderCRC(hb) != nil {
				continue
			}
			if at := base + i; int64(h.aux) > from && int64(h.aux) <= at {
				return at, true, nil
			}
		}
	}
	return 0, false, nil
}
