package engine

import (
	"cmp"
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
//
// The same file holds the deleted checkpoints: per volume, the tags that
// DeleteCheckpoint merged away, as ranges. Replay derives every record's
// effective layer from them. One file for both, so that DeleteVolume drops
// a volume's checkpoint entries in the same atomic rewrite that deletes
// the volume: a re-created volume starts with none, and no crash can leave
// one without the other. A table without checkpoint entries is written in
// the first format (BSLTDEL1), which engines without layers read too.

const (
	deletedFile   = "deleted-volumes"
	deletedMagic  = "BSLTDEL1" // volumes only
	deletedMagic2 = "BSLTDEL2" // volumes and checkpoint ranges
)

// DeleteVolume removes every object of a volume, durably: when it returns,
// the volume reads as holes after any crash, and its space is reclaimed
// by the collector. Versions of its objects and its deleted checkpoints
// are forgotten too; a volume number may be reused afterwards and starts
// from scratch.
func (e *Engine) DeleteVolume(ctx context.Context, volume uint64) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	// tableMu for the whole call: the in-memory change and the table write
	// must not interleave with a DeleteCheckpoint of the same volume.
	e.tableMu.Lock()
	defer e.tableMu.Unlock()
	e.appendMu.Lock()
	if e.failed != nil {
		err := e.failed
		e.appendMu.Unlock()
		return fmt.Errorf("engine: delete volume %d: %w", volume, err)
	}
	e.idx.Lock()
	_, pending := e.deleted[volume]
	objs, ckpts := len(e.ix.vols[volume]) > 0, len(e.ix.gone[volume]) > 0
	if !objs && !ckpts && !pending {
		e.idx.Unlock()
		e.appendMu.Unlock()
		return nil
	}
	if objs {
		d := e.nextSeq
		e.nextSeq++
		e.deleted[volume] = d
	}
	e.ix.dropVolume(volume)
	e.idx.Unlock()
	e.appendMu.Unlock()
	// Written even when nothing was dropped now, so that an earlier
	// deletion whose write failed is durable before this one returns.
	if err := e.writeDeleted(nil); err != nil {
		return fmt.Errorf("engine: delete volume %d: %w", volume, err)
	}
	return nil
}

// DeleteCheckpoint deletes checkpoint c of a volume: tag c becomes deleted,
// so the layer of tag c merges into the next lower live layer, whose
// blocks it shadows become garbage (an online merge: metadata only, no
// data is copied). It is durable when it returns: the deletion is written
// to the deleted-volumes table before the index changes, so the collector
// never frees a block that a crash could bring back into use. The merge
// then takes the index lock one object at a time, so I/O continues.
// Idempotent. c must not be 0.
func (e *Engine) DeleteCheckpoint(ctx context.Context, volume uint64, c uint32) error {
	if c == 0 {
		return fmt.Errorf("engine: delete checkpoint 0 of volume %d: %w", volume, ErrInvalid)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	if err := e.markDeleted(volume, c); err != nil {
		return fmt.Errorf("engine: delete checkpoint %d of volume %d: %w", c, volume, err)
	}
	// Also when it was deleted already: a call that found the deletion made
	// by a concurrent one must not return before the merge it waits for.
	e.mergeVolume(volume)
	return nil
}

// markDeleted makes tag c of a volume deleted: durably in the table, then
// in memory. Until mergeVolume runs, the objects keep their layer c apart
// (every reader groups layers by effective tag, and writes go into it).
func (e *Engine) markDeleted(volume uint64, c uint32) error {
	e.tableMu.Lock()
	defer e.tableMu.Unlock()
	e.appendMu.Lock()
	err := e.failed
	e.idx.RLock()
	done := e.ix.eff(volume, c) != c
	e.idx.RUnlock()
	e.appendMu.Unlock()
	if err != nil || done {
		return err
	}
	if err := e.writeDeleted(&tagDeletion{volume, c}); err != nil {
		return err
	}
	hook("checkpoint-durable")
	e.appendMu.Lock()
	e.idx.Lock()
	e.ix.deleteTag(volume, c)
	e.idx.Unlock()
	e.appendMu.Unlock()
	return nil
}

// mergeVolume merges the layers of every object of a volume whose tags
// were deleted, holding the locks for one object at a time.
func (e *Engine) mergeVolume(volume uint64) {
	e.idx.RLock()
	idxs := make([]uint64, 0, len(e.ix.vols[volume]))
	for i := range e.ix.vols[volume] {
		idxs = append(idxs, i)
	}
	e.idx.RUnlock()
	merged := 0
	for _, i := range idxs {
		e.appendMu.Lock()
		e.idx.Lock()
		if o := e.ix.lookup(ObjectID{volume, i}); o != nil && e.ix.normalize(volume, o) {
			merged++
		}
		e.idx.Unlock()
		e.appendMu.Unlock()
	}
	e.log.Debug("checkpoint layers merged", "volume", volume, "objects", merged)
}

// tagDeletion is a checkpoint deletion to include in the table being
// written, before it is applied in memory.
type tagDeletion struct {
	vol uint64
	tag uint32
}

// writeDeleted rewrites the table from memory, plus extra if not nil,
// atomically and durably. tableMu held.
func (e *Engine) writeDeleted(extra *tagDeletion) error {
	type volEnt struct{ vol, seq uint64 }
	type tagEnt struct {
		vol uint64
		r   tagRange
	}
	e.idx.RLock()
	vols := make([]volEnt, 0, len(e.deleted))
	for v, d := range e.deleted {
		vols = append(vols, volEnt{v, d})
	}
	var tags []tagEnt
	addVol := func(v uint64, rs []tagRange) {
		for _, r := range rs {
			tags = append(tags, tagEnt{v, r})
		}
	}
	for v, rs := range e.ix.gone {
		if extra == nil || v != extra.vol {
			addVol(v, rs)
		}
	}
	if extra != nil {
		rs, _ := addTag(slices.Clone(e.ix.gone[extra.vol]), extra.tag)
		addVol(extra.vol, rs)
	}
	e.idx.RUnlock()
	slices.SortFunc(vols, func(a, b volEnt) int { return cmp.Compare(a.vol, b.vol) })
	slices.SortFunc(tags, func(a, b tagEnt) int {
		if c := cmp.Compare(a.vol, b.vol); c != 0 {
			return c
		}
		return cmp.Compare(a.r.lo, b.r.lo)
	})
	le := binary.LittleEndian
	b := make([]byte, 16+16*len(vols)+16*len(tags)+4)
	copy(b, deletedMagic)
	if len(tags) > 0 {
		copy(b, deletedMagic2)
	}
	le.PutUint32(b[8:], uint32(len(vols)))
	le.PutUint32(b[12:], uint32(len(tags)))
	for i, x := range vols {
		le.PutUint64(b[16+16*i:], x.vol)
		le.PutUint64(b[24+16*i:], x.seq)
	}
	base := 16 + 16*len(vols)
	for i, x := range tags {
		le.PutUint64(b[base+16*i:], x.vol)
		le.PutUint32(b[base+16*i+8:], x.r.lo)
		le.PutUint32(b[base+16*i+12:], x.r.hi)
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
	bad := func(why string) (uint64, error) {
		return 0, fmt.Errorf("engine: %s: %w: %s", deletedFile, ErrCorrupt, why)
	}
	if len(b) < 20 || (string(b[:8]) != deletedMagic && string(b[:8]) != deletedMagic2) {
		return bad("bad header")
	}
	nvol, ntag := int(le.Uint32(b[8:])), int(le.Uint32(b[12:]))
	if string(b[:8]) == deletedMagic {
		ntag = 0 // reserved, zero, in the first format
	}
	if len(b) != 16+16*nvol+16*ntag+4 || le.Uint32(b[len(b)-4:]) != crc32c(b[:len(b)-4]) {
		return bad("bad length or checksum")
	}
	var maxSeq uint64
	for i := range nvol {
		v, d := le.Uint64(b[16+16*i:]), le.Uint64(b[24+16*i:])
		e.deleted[v] = d
		maxSeq = max(maxSeq, d)
	}
	base := 16 + 16*nvol
	for i := range ntag {
		v := le.Uint64(b[base+16*i:])
		r := tagRange{le.Uint32(b[base+16*i+8:]), le.Uint32(b[base+16*i+12:])}
		rs := e.ix.gone[v]
		if r.lo == 0 || r.hi < r.lo || (len(rs) > 0 && uint64(rs[len(rs)-1].hi)+1 >= uint64(r.lo)) {
			return bad(fmt.Sprintf("bad checkpoint range %d-%d of volume %d", r.lo, r.hi, v))
		}
		e.ix.gone[v] = append(rs, r)
	}
	return maxSeq, nil
}

// pruneDeleted drops the entries that can no longer hide anything.
func (e *Engine) pruneDeleted() error {
	e.tableMu.Lock()
	defer e.tableMu.Unlock()
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
	return e.writeDeleted(nil)
}
