package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

// CreateOptions qualify Create.
type CreateOptions struct {
	// Full makes a full point even when an incremental one is possible (it starts a new chain).
	Full bool
	// NBDURI is the blockd to read through (nbd://HOST:PORT or nbd+unix:///?socket=PATH); empty means one
	// that the volume's status lists, a local socket first.
	NBDURI string
	// Progress is told how reading advances; nil means silence.
	Progress Progress
}

// CreateResult is what Create did.
type CreateResult struct {
	// Checkpoint is the checkpoint taken for the backup, in every volume.
	Checkpoint string
	// Points are the new points, in the order the volumes were given.
	Points []*Point
	// DeletedCheckpoints are the previous backup checkpoints deleted, as VOLUME@CHECKPOINT.
	DeletedCheckpoints []string
	// RemovedLeftovers are unfinished points of interrupted runs that were removed.
	RemovedLeftovers []string
	// Warnings are problems that did not stop the backup (a previous checkpoint that could not be deleted).
	Warnings []string
}

// readChunk is the size of the reads issued, and readDepth how many are in flight at once: enough to keep a
// replicated volume busy, with at most 32 MiB in memory.
const (
	readChunk = 4 << 20
	readDepth = 8
)

// job is one volume's part of a Create.
type job struct {
	vol  *basaltv1.Volume
	list *Listing
	prev *Point // the newest point, if any: the base of an incremental point, whose checkpoint goes afterwards
	w    *pointWriter
}

// Create backs up volumes into dir: it checkpoints them all at one instant (a consistency group) with a
// checkpoint named backup-<UTC time>, then writes one point per volume. A volume's point is incremental when
// the volume has a readable newest point whose checkpoint still exists, unless opts.Full; otherwise it is full.
// Once every new point is durable, the previous backup checkpoint of each volume is deleted: only the newest
// is needed for the next incremental point. If anything fails before that, nothing is published and the new
// checkpoint is deleted.
func Create(ctx context.Context, api API, dir string, volumes []string, opts CreateOptions) (*CreateResult, error) {
	if len(volumes) == 0 {
		return nil, errors.New("name at least one volume to back up")
	}
	seen := map[string]bool{}
	for _, v := range volumes {
		if seen[v] {
			return nil, fmt.Errorf("volume %q is named twice", v)
		}
		seen[v] = true
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("backup directory: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	prog := orNone(opts.Progress)
	res := &CreateResult{}

	jobs := make([]*job, len(volumes))
	for i, name := range volumes {
		j, err := planVolume(ctx, api, dir, name, opts.Full, res)
		if err != nil {
			return res, err
		}
		jobs[i] = j
	}

	ckName := "backup-" + time.Now().UTC().Format("20060102-150405.000")
	resp, err := api.Checkpoints.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: ckName, Volumes: volumes})
	if err != nil {
		return res, fmt.Errorf("checkpoint %s: %w", joinVolumes(volumes), apiError(err))
	}
	res.Checkpoint = ckName
	published := false
	defer func() {
		if published {
			return
		}
		for _, j := range jobs {
			if j.w != nil {
				j.w.abort()
			}
		}
		// The new checkpoint is of no use without its points; the previous ones stay, so the next run can
		// still make incremental points.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		for _, v := range volumes {
			if _, err := api.Checkpoints.DeleteCheckpoint(cctx, &basaltv1.DeleteCheckpointRequest{Volume: v, Name: ckName}); err != nil {
				res.Warnings = append(res.Warnings, fmt.Sprintf("could not delete the unused checkpoint %s of %s: %v (delete it with 'basalt checkpoint delete %s %s')", ckName, v, apiError(err), v, ckName))
			}
		}
	}()
	byVolume := map[string]*basaltv1.Checkpoint{}
	for _, c := range resp.GetCheckpoints() {
		byVolume[c.GetVolume()] = c
	}

	for _, j := range jobs {
		name := j.vol.GetName()
		ck := byVolume[name]
		if ck == nil {
			return res, fmt.Errorf("checkpoint %s: the API did not report the checkpoint of %s", ckName, name)
		}
		p := &Point{
			Format: Format, Volume: name, VolumeID: j.vol.GetId(), Checkpoint: ckName, SizeBytes: ck.GetSizeBytes(),
			SectorSize: j.vol.GetSectorSize(), Kind: KindFull, Group: ck.GetGroup(), Created: ck.GetCreatedAt().AsTime().UTC(),
			Name: pointName(j.list.maxSeq+1, ckName),
		}
		if len(p.Group) == 0 {
			p.Group = volumes
		}
		if ck.GetCreatedAt() == nil {
			p.Created = time.Now().UTC()
		}
		if j.prev != nil && !opts.Full {
			p.Kind, p.Base = KindIncremental, j.prev.Name
		}
		if j.w, err = newPointWriter(dir, p); err != nil {
			return res, err
		}
		if err := readVolume(ctx, api, j, opts.NBDURI, prog); err != nil {
			return res, fmt.Errorf("back up %s: %w", name, err)
		}
		if err := j.w.finish(); err != nil {
			return res, fmt.Errorf("back up %s: %w", name, err)
		}
	}
	// Publishing is the commit: every point was made durable first, so a crash from here on leaves some
	// points of the group published and the others as leftovers, each published one complete.
	for _, j := range jobs {
		if err := j.w.publish(); err != nil {
			return res, err
		}
		published = true
		res.Points = append(res.Points, j.w.p)
	}
	if err := writeManifest(dir); err != nil {
		res.Warnings = append(res.Warnings, fmt.Sprintf("could not rewrite %s: %v", filepath.Join(dir, manifestFile), err))
	}
	for _, j := range jobs {
		if j.prev == nil || j.prev.Checkpoint == ckName || j.vol.CheckpointNamed(j.prev.Checkpoint) == nil {
			continue
		}
		name := j.vol.GetName()
		if _, err := api.Checkpoints.DeleteCheckpoint(ctx, &basaltv1.DeleteCheckpointRequest{Volume: name, Name: j.prev.Checkpoint}); err != nil {
			res.Warnings = append(res.Warnings, fmt.Sprintf("could not delete the previous backup checkpoint %s of %s: %v (delete it with 'basalt checkpoint delete %s %s')",
				j.prev.Checkpoint, name, apiError(err), name, j.prev.Checkpoint))
			continue
		}
		res.DeletedCheckpoints = append(res.DeletedCheckpoints, name+"@"+j.prev.Checkpoint)
	}
	return res, nil
}

// planVolume reads what the volume and its existing points are, cleans leftovers of interrupted runs, and
// decides whether an incremental point is possible.
func planVolume(ctx context.Context, api API, dir, name string, full bool, res *CreateResult) (*job, error) {
	vol, err := api.Volumes.GetVolume(ctx, &basaltv1.GetVolumeRequest{Name: name})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, apiError(err))
	}
	l, err := listVolume(dir, name)
	if err != nil {
		return nil, err
	}
	for _, lo := range l.Leftovers {
		path := filepath.Join(dir, name, lo)
		if err := os.RemoveAll(path); err != nil {
			return nil, fmt.Errorf("remove the leftover %s of an interrupted backup: %w", path, err)
		}
		res.RemovedLeftovers = append(res.RemovedLeftovers, path)
	}
	j := &job{vol: vol, list: l}
	if len(l.Points) == 0 && len(l.Damaged) == 0 {
		return j, nil
	}
	prev, err := l.find("")
	if full {
		// The previous point's checkpoint is still deleted afterwards, if the point is readable.
		if err == nil {
			j.prev = prev
		}
		return j, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cannot add an incremental point for %s: %v; run with --full to start a new chain", name, err)
	}
	if prev.VolumeID != vol.GetId() {
		return nil, fmt.Errorf("volume %s was deleted and created again since its point %s (volume id %d, now %d): run with --full to start a new chain",
			name, prev.Name, prev.VolumeID, vol.GetId())
	}
	if vol.CheckpointNamed(prev.Checkpoint) == nil {
		return nil, fmt.Errorf("volume %s no longer has checkpoint %s, which its newest point %s was taken at, so what changed since cannot be known: run with --full to start a new chain",
			name, prev.Checkpoint, prev.Name)
	}
	j.prev = prev
	return j, nil
}

func joinVolumes(v []string) string {
	if len(v) == 1 {
		return v[0]
	}
	return fmt.Sprintf("%d volumes %v", len(v), v)
}

// span is a range to record: read (data) or not (zero).
type span struct {
	off, n uint64
	zero   bool
}

// readVolume reads what the point records from the checkpoint export and writes it into the point.
func readVolume(ctx context.Context, api API, j *job, override string, prog Progress) error {
	p := j.w.p
	export := p.Volume + "@" + p.Checkpoint
	uri, err := exportURI(ctx, api, p.Volume, export, override)
	if err != nil {
		return err
	}
	conn, err := nbdclient.Dial(ctx, uri)
	if err != nil {
		return err
	}
	defer conn.Close()
	if uint64(conn.Size()) != p.SizeBytes {
		return fmt.Errorf("export %s is %d bytes, the checkpoint %d", export, conn.Size(), p.SizeBytes)
	}

	var spans []span
	switch {
	case p.Kind == KindIncremental:
		resp, err := api.Checkpoints.GetChangedExtents(ctx, &basaltv1.GetChangedExtentsRequest{Volume: p.Volume, From: j.prev.Checkpoint, To: p.Checkpoint})
		if err != nil {
			return fmt.Errorf("list what changed in %s since %s: %w", p.Volume, j.prev.Checkpoint, apiError(err))
		}
		for _, e := range resp.GetExtents() {
			spans = append(spans, span{off: e.GetOffset(), n: e.GetLength(), zero: e.GetZero()})
		}
	case conn.CanBlockStatus():
		exts, err := conn.BlockStatus(ctx, 0, conn.Size())
		if err != nil {
			return fmt.Errorf("read the allocation of %s: %w", export, err)
		}
		off := uint64(0)
		for _, e := range exts {
			// Holes and ranges known to read as zeroes are not read.
			spans = append(spans, span{off: off, n: uint64(e.Length), zero: e.Hole || e.Zero})
			off += uint64(e.Length)
		}
	default:
		// A server without block status: read everything (zero blocks are still not stored).
		spans = []span{{off: 0, n: p.SizeBytes}}
	}
	var total uint64
	for i, s := range spans {
		if s.off+s.n > p.SizeBytes || i > 0 && s.off < spans[i-1].off+spans[i-1].n {
			return fmt.Errorf("the cluster listed a range of %d bytes at %d, outside the volume or out of order", s.n, s.off)
		}
		if !s.zero {
			total += s.n
		}
	}
	prog.Begin(p.Volume+": reading", int64(total))
	defer prog.End()
	return copySpans(ctx, conn, spans, j.w, prog)
}

// copySpans reads the data spans through conn, several reads in flight, and adds them to the point in
// order; zero spans are recorded without reading.
func copySpans(ctx context.Context, conn *nbdclient.Conn, spans []span, w *pointWriter, prog Progress) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		s   span
		buf []byte
		err error
	}
	futures := make(chan chan result, readDepth)
	go func() {
		defer close(futures)
		for _, s := range spans {
			// Zero spans go through the same queue, unsplit, so that the point's extents stay in order.
			step := uint64(readChunk)
			if s.zero {
				step = max(s.n, 1)
			}
			for at := s.off; at < s.off+s.n; at += step {
				piece := span{off: at, n: min(s.off+s.n-at, step), zero: s.zero}
				ch := make(chan result, 1)
				select {
				case futures <- ch:
				case <-ctx.Done():
					return
				}
				if piece.zero {
					ch <- result{s: piece}
					continue
				}
				go func() {
					buf := make([]byte, piece.n)
					err := conn.ReadAt(ctx, buf, int64(piece.off))
					ch <- result{s: piece, buf: buf, err: err}
				}()
			}
		}
	}()
	for ch := range futures {
		r := <-ch
		if r.err != nil {
			return fmt.Errorf("read %d bytes at %d of %s: %w", r.s.n, r.s.off, conn.Export(), r.err)
		}
		if r.s.zero {
			w.addZero(r.s.off, r.s.n)
			continue
		}
		if err := w.addData(r.s.off, r.buf); err != nil {
			return err
		}
		w.p.BytesRead += r.s.n
		prog.Add(int64(r.s.n))
	}
	return ctx.Err()
}
