package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
)

// The deleted-volumes table. Deleting a volume must hide every record of
// it, in any segment, from replay. A tombstone in the log would have to be
// copied forward by the collector for as long as any older segment exists,
// and, being replayed after newer writes to a re-created volume of the same
// number, would need per-record bookkeeping to not hide them. Deletions are
// rare, so they go to a small table instead, rewritten atomically: volume
// -> sequence number of the deletion. Replay skips records of the volume
// with a lower sequence number. An entry is dropped once every segment was
// started after the deletion (firstSeq above it), since no record it hides
// can remain.

const (
	deletedFile  = "deleted-volumes"
	deletedMagic = "BSLTDEL1"
)

// DeleteVolume removes every object of a volume, durably: when it returns,
// the volume reads as holes after any crash, and its space is reclaimed
// by the collector. Versions of its objects are forgotten too; a volume
// number may be reused afterwards and starts from scratch.
func (e *Engine) DeleteVolume(ctx context.Context, volume uint64) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	e.appendMu.Lock()
	if e.failed != nil {
		err := e.failed
		e.appendMu.Unlock()
		return fmt.Errorf("engine: delete volume %d: %w", volume, err)
	}
	e.idx.Lock()
	_, pending := e.deleted[volume]
	if len(e.ix.vols[volume]) == 0 && !pending {
		e.idx.Unlock()
		e.appendMu.Unlock()
		return nil
	}
	if len(e.ix.vols[volume]) > 0 {
		d := e.nextSeq
		e.nextSeq++
		e.ix.dropVolume(volume)
		e.deleted[volume] = d
	}
	e.idx.Unlock()
	e.appendMu.Unlock()
	// Written even when nothing was dropped now, so that a concurrent
	// deletion of the same volume is durable before either returns.
	if err := e.writeDeleted(); err != nil {
		return fmt.Errorf("engine: delete volume %d: %w", volume, err)
	}
	return nil
}

func (e *Engine) writeDeleted() error {
	e.tableMu.Lock()
	defer e.tableMu.Unlock()
	type ent struct{ vol, seq uint64 }
	e.idx.RLock()
	ents := make([]ent, 0, len(e.deleted))
	for v, d := range e.deleted {
		ents = append(ents, ent{v, d})
	}
	e.idx.RUnlock()
	slices.SortFunc(ents, func(a, b ent) int {
		switch {
		case a.vol < b.vol:
			return -1
		case a.vol > b.vol:
			return 1
		}
		return 0
	})
	le := binary.LittleEndian
	b := make([]byte, 16+16*len(ents)+4)
	copy(b, deletedMagic)
	le.PutUint32(b[8:], uint32(len(ents)))
	for i, x := range ents {
		le.PutUint64(b[16+16*i:], x.vol)
		le.PutUint64(b[24+16*i:], x.seq)
	}
	n := len(b) - 4
	le.PutUint32(b[n:], crc32c(b[:n]))

	path := filepath.Join(e.dir, deletedFile)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return ioErr("writing "+deletedFile, err)
	}
	if _, err = f.Write(b); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(e.dir)
	}
	if err != nil {
		os.Remove(tmp)
		return ioErr("writing "+deletedFile, err)
	}
	return nil
}

// loadDeleted reads the table at Open; it returns the highest sequence
// number in it.
func (e *Engine) loadDeleted() (uint64, error) {
	b, err := os.ReadFile(filepath.Join(e.dir, deletedFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, ioErr("reading "+deletedFile, err)
	}
	le := binary.LittleEndian
	if len(b) < 20 || string(b[:8]) != deletedMagic {
		return 0, fmt.Errorf("engine: %s: %w: bad header", deletedFile, ErrCorrupt)
	}
	cnt := int(le.Uint32(b[8:]))
	if len(b) != 16+16*cnt+4 || le.Uint32(b[len(b)-4:]) != crc32c(b[:len(b)-4]) {
		return 0, fmt.Errorf("engine: %s: %w: bad length or checksum", deletedFile, ErrCorrupt)
	}
	var maxSeq uint64
	for i := range cnt {
		v, d := le.Uint64(b[16+16*i:]), le.Uint64(b[24+16*i:])
		e.deleted[v] = d
		maxSeq = max(maxSeq, d)
	}
	return maxSeq, nil
}

// pruneDeleted drops the entries that can no longer hide anything.
func (e *Engine) pruneDeleted() error {
	e.appendMu.Lock()
	e.idx.Lock()
	oldest := uint64(math.MaxUint64)
	for _, s := range e.ix.segs {
		oldest = min(oldest, s.firstSeq)
	}
	changed := false
	for v, d := range e.deleted {
		if d < oldest {
			delete(e.deleted, v)
			changed = true
		}
	}
	e.idx.Unlock()
	e.appendMu.Unlock()
	if !changed {
		return nil
	}
	return e.writeDeleted()
}
