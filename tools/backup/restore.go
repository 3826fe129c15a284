package backup

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// RestoreOptions qualify Restore.
type RestoreOptions struct {
	// Point names the point to restore: its directory name, its checkpoint name or its number. Empty means
	// the newest.
	Point string
	// Pool is the new volume's pool; empty means the default.
	Pool string
	// NBDURI is the blockd to write through (nbd://HOST:PORT or nbd+unix:///?socket=PATH); empty means one
	// that the new volume's status lists, a local socket first.
	NBDURI string
	// Progress is told how verifying and writing advance; nil means silence.
	Progress Progress
}

// RestoreResult is what Restore did.
type RestoreResult struct {
	Volume string
	// Point is the point restored, and Chain the points written to rebuild it, full point first.
	Point *Point
	Chain []*Point
	// BytesWritten and BytesZeroed are what was sent to the new volume.
	BytesWritten, BytesZeroed uint64
}

// writeDepth bounds the writes in flight during a restore.
const writeDepth = 8

// Restore rebuilds a point of volume's backups in dir as a new volume, newVolume. Every point of the chain
// is checked (point.json, links, data checksums) before anything is created; the data is hashed again as it
// is written, so a file changed in between is caught too. If anything fails once the volume exists, the
// volume is deleted: nothing is left half-restored.
func Restore(ctx context.Context, api API, dir, volume, newVolume string, opts RestoreOptions) (*RestoreResult, error) {
	prog := orNone(opts.Progress)
	// Refuse an existing target before spending minutes verifying; CreateVolume below settles races.
	if _, err := api.Volumes.GetVolume(ctx, &basaltv1.GetVolumeRequest{Name: newVolume}); err == nil {
		return nil, existsError(newVolume)
	} else if status.Code(err) != codes.NotFound {
		return nil, fmt.Errorf("look up volume %s: %w", newVolume, apiError(err))
	}
	l, err := listVolume(dir, volume)
	if err != nil {
		return nil, err
	}
	if len(l.Points) == 0 && len(l.Damaged) == 0 {
		return nil, fmt.Errorf("%s holds no backup of volume %q", dir, volume)
	}
	p, err := l.find(opts.Point)
	if err != nil {
		return nil, err
	}
	chain, err := l.chain(p)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, q := range chain {
		total += int64(q.DataBytes)
	}
	prog.Begin(volume+": verifying", total)
	for _, q := range chain {
		if err := q.checkData(ctx, filepath.Join(dir, volume, q.Name), prog.Add); err != nil {
			prog.End()
			return nil, fmt.Errorf("point %s cannot be restored: %w", p.Name, err)
		}
	}
	prog.End()

	_, err = api.Volumes.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: newVolume, SizeBytes: p.SizeBytes, SectorSize: p.SectorSize, Pool: opts.Pool})
	if status.Code(err) == codes.AlreadyExists {
		return nil, existsError(newVolume)
	}
	if err != nil {
		return nil, fmt.Errorf("create volume %s: %w", newVolume, apiError(err))
	}
	res := &RestoreResult{Volume: newVolume, Point: p, Chain: chain}
	if err := writeChain(ctx, api, dir, newVolume, chain, opts.NBDURI, prog, res); err != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if _, derr := api.Volumes.DeleteVolume(dctx, &basaltv1.DeleteVolumeRequest{Name: newVolume}); derr != nil {
			return nil, fmt.Errorf("restore into %s failed: %w; the half-restored volume could not be deleted (%v): delete it with 'basalt volume delete %s'", newVolume, err, apiError(derr), newVolume)
		}
		return nil, fmt.Errorf("restore into %s failed, and %s was deleted (nothing is left half-restored): %w", newVolume, newVolume, err)
	}
	return res, nil
}

// writeChain writes the points of chain, in order, into the new volume, and flushes it.
func writeChain(ctx context.Context, api API, dir, newVolume string, chain []*Point, override string, prog Progress, res *RestoreResult) error {
	uri, err := exportURI(ctx, api, newVolume, newVolume, override)
	if err != nil {
		return err
	}
	conn, err := nbdclient.Dial(ctx, uri)
	if err != nil {
		return err
	}
	defer conn.Close()
	target := chain[len(chain)-1]
	if uint64(conn.Size()) != target.SizeBytes {
		return fmt.Errorf("export %s is %d bytes, want %d", newVolume, conn.Size(), target.SizeBytes)
	}
	// What a point recorded beyond the size of a later point was cut off by a shrink: the restored volume
	// reads zeroes there unless a later point wrote it again. So each point is clipped to the smallest size
	// from it on.
	limits := make([]uint64, len(chain))
	limit := target.SizeBytes
	for k := len(chain) - 1; k >= 0; k-- {
		limit = min(limit, chain[k].SizeBytes)
		limits[k] = limit
	}
	var total int64
	for _, q := range chain {
		total += int64(q.DataBytes)
	}
	prog.Begin(newVolume+": writing", total)
	defer prog.End()
	for k, q := range chain {
		if err := writePoint(ctx, conn, filepath.Join(dir, q.Volume, q.Name), q, k == 0, limits[k], prog, res); err != nil {
			return fmt.Errorf("write point %s: %w", q.Name, err)
		}
	}
	if err := conn.Flush(ctx); err != nil {
		return fmt.Errorf("flush %s: %w", newVolume, err)
	}
	return nil
}

// writePoint writes one point's extents below limit. Extents of a point do not overlap, so its writes go out
// several at once; the next point starts only when they have all completed, because it may overwrite them.
func writePoint(ctx context.Context, conn *nbdclient.Conn, path string, p *Point, first bool, limit uint64, prog Progress, res *RestoreResult) error {
	f, err := os.Open(filepath.Join(path, DataFile))
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	r := bufio.NewReaderSize(io.TeeReader(f, h), 1<<20)
	w := newWriters(ctx, prog)
	for _, e := range p.Extents {
		if e.Zero {
			// A new volume reads zeroes already; later points must zero what earlier ones wrote.
			if first || e.Offset >= limit {
				continue
			}
			off, n := e.Offset, min(e.Length, limit-e.Offset)
			res.BytesZeroed += n
			if err := w.do(0, func(ctx context.Context) error { return zero(ctx, conn, off, n) }); err != nil {
				w.wait()
				return err
			}
			continue
		}
		for done := uint64(0); done < e.Length; {
			n := min(e.Length-done, readChunk)
			buf := make([]byte, n)
			if _, err := io.ReadFull(r, buf); err != nil {
				w.wait()
				return fmt.Errorf("read %s: %w", filepath.Join(path, DataFile), err)
			}
			off := e.Offset + done
			done += n
			if off >= limit {
				w.progress(int64(n))
				continue
			}
			buf = buf[:min(n, limit-off)]
			res.BytesWritten += uint64(len(buf))
			if err := w.do(int64(n), func(ctx context.Context) error { return conn.WriteAt(ctx, buf, int64(off), false) }); err != nil {
				w.wait()
				return err
			}
		}
	}
	if err := w.wait(); err != nil {
		return err
	}
	// The whole file must have been read, and be what was verified.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != p.DataSHA256 {
		return fmt.Errorf("%s changed since it was verified (SHA-256 now %s, point.json says %s)", filepath.Join(path, DataFile), got[:12], p.DataSHA256[:12])
	}
	return nil
}

// zero makes a range read as zeroes, writing zero buffers if the server cannot zero.
func zero(ctx context.Context, conn *nbdclient.Conn, off, n uint64) error {
	err := conn.WriteZeroes(ctx, int64(off), int64(n), nbdclient.ZeroFlags{})
	if !errors.Is(err, nbdclient.ErrNotSupported) {
		return err
	}
	buf := make([]byte, min(n, readChunk))
	for done := uint64(0); done < n; {
		m := min(n-done, uint64(len(buf)))
		if err := conn.WriteAt(ctx, buf[:m], int64(off+done), false); err != nil {
			return err
		}
		done += m
	}
	return nil
}

// writers runs up to writeDepth writes at once and keeps the first error.
type writers struct {
	ctx    context.Context
	cancel context.CancelFunc
	slots  chan struct{}
	wg     sync.WaitGroup
	prog   Progress

	mu  sync.Mutex // also serializes prog.Add
	err error
}

func newWriters(ctx context.Context, prog Progress) *writers {
	ctx, cancel := context.WithCancel(ctx)
	return &writers{ctx: ctx, cancel: cancel, slots: make(chan struct{}, writeDepth), prog: prog}
}

// do starts fn once a slot is free; it returns the first error so far, if any, instead of starting it.
func (w *writers) do(progress int64, fn func(context.Context) error) error {
	select {
	case w.slots <- struct{}{}:
	case <-w.ctx.Done():
		w.setErr(w.ctx.Err())
		return w.firstErr()
	}
	if err := w.firstErr(); err != nil {
		<-w.slots
		return err
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer func() { <-w.slots }()
		err := fn(w.ctx)
		w.mu.Lock()
		defer w.mu.Unlock()
		if err != nil {
			if w.err == nil {
				w.err = err
				w.cancel()
			}
			return
		}
		w.prog.Add(progress)
	}()
	return nil
}

// progress reports bytes dealt with without a write, serialized with the writes' reports.
func (w *writers) progress(n int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.prog.Add(n)
}

func (w *writers) setErr(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
}

func (w *writers) firstErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// wait waits for the writes started and returns the first error.
func (w *writers) wait() error {
	w.wg.Wait()
	w.cancel()
	return w.firstErr()
}

func existsError(volume string) error {
	return fmt.Errorf("volume %s already exists: a restore creates a new volume (choose another name with --to)", volume)
}
