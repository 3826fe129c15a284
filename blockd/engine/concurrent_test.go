package engine

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestConcurrent runs writers, each with its own objects and model, against
// readers, syncs, scrubs, checksums, explicit compactions and the background
// collector, all at once; run it with -race. Then it reopens the engine and
// checks every writer's model.
func TestConcurrent(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 256 << 10, GCInterval: time.Millisecond, GCRate: -1, GCThreshold: 0.8}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	d := time.Second
	if testing.Short() {
		d = 200 * time.Millisecond
	}
	const writers = 6
	models := make([]*model, writers)
	var stop atomic.Bool
	var wg, bg sync.WaitGroup
	for w := range writers {
		models[w] = newModel()
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := models[w]
			r := rand.New(rand.NewPCG(uint64(w), 1))
			buf, got, want := make([]byte, 256<<10), make([]byte, 256<<10), make([]byte, 256<<10)
			for v := uint64(1); !stop.Load(); v++ {
				id := ObjectID{7, uint64(w*2 + r.IntN(2))}
				n := int64(1+r.IntN(len(buf)/SectorSize)) * SectorSize
				if r.IntN(2) == 0 {
					n = int64(1+r.IntN(8)) * SectorSize
				}
				off := min(int64(r.IntN(ObjectSize/SectorSize))*SectorSize, ObjectSize-n)
				wo := WriteOptions{Version: v, Sync: r.IntN(10) == 0}
				switch r.IntN(10) {
				case 0, 1:
					if err := e.Trim(ctx, id, off, n, wo); err != nil {
						t.Error(err)
						return
					}
					m.trim(id, off, n, v)
				case 2, 3, 4, 5:
					fillPattern(buf[:n], v<<8|uint64(w))
					if err := e.Write(ctx, id, off, buf[:n], wo); err != nil {
						t.Error(err)
						return
					}
					m.write(id, off, buf[:n], v)
				default:
					if err := e.Read(ctx, id, off, got[:n]); err != nil {
						t.Error(err)
						return
					}
					m.read(id, off, want[:n])
					if !bytes.Equal(got[:n], want[:n]) {
						t.Errorf("writer %d: read of %v at %d length %d differs from its model", w, id, off, n)
						return
					}
				}
				if got := e.ObjectVersion(id); m.objs[id] != nil && got != m.objs[id].version {
					t.Errorf("version of %v: %d, want %d", id, got, m.objs[id].version)
					return
				}
			}
		}()
	}
	background := func(fn func() error) {
		bg.Add(1)
		go func() {
			defer bg.Done()
			for !stop.Load() {
				if err := fn(); err != nil && !errors.Is(err, ErrClosed) {
					t.Error(err)
					return
				}
			}
		}()
	}
	background(func() error { return e.Compact(ctx) })
	background(func() error { return e.Sync(ctx) })
	background(func() error {
		_, err := e.Scrub(ctx, func(id ObjectID, off, n int64, err error) { t.Errorf("scrub: %v", err) })
		return err
	})
	background(func() error {
		for _, id := range e.AllObjects() {
			if _, err := e.ObjectChecksum(ctx, id); err != nil {
				return err
			}
			if _, err := e.Extents(ctx, id, 0, ObjectSize); err != nil {
				return err
			}
		}
		_ = e.Stats()
		return nil
	})
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	bg.Wait()
	st := e.Stats()
	t.Logf("%+v", st)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	all := newModel()
	var ids []ObjectID
	for _, m := range models {
		for id, o := range m.objs {
			all.objs[id] = o
			ids = append(ids, id)
		}
	}
	e = verifyModel(t, dir, opts, all, ids)
	if got, want := e.Stats().LiveBytes, all.liveBytes(); got != want {
		t.Errorf("live bytes %d after reopen, model %d", got, want)
	}
	e.Close()
}

// TestCloseDuringCompaction checks that Close waits for or stops a
// compaction in progress and that the engine reopens cleanly.
func TestCloseDuringCompaction(t *testing.T) {
	ctx := context.Background()
	opts := Options{SegmentSize: 64 << 10, GCInterval: time.Millisecond, GCRate: 1 << 20}
	dir := t.TempDir()
	e, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	m := newModel()
	p := make([]byte, 32<<10)
	for i := range 64 {
		fillPattern(p, uint64(i))
		id := ObjectID{1, uint64(i % 4)}
		off := int64(i%8) * int64(len(p))
		if err := e.Write(ctx, id, off, p, WriteOptions{Version: uint64(i)}); err != nil {
			t.Fatal(err)
		}
		m.write(id, off, p, uint64(i))
	}
	done := make(chan error, 1)
	go func() { done <- e.Compact(ctx) }()
	time.Sleep(5 * time.Millisecond)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil && !errors.Is(err, ErrClosed) {
		t.Fatalf("compact during close: %v", err)
	}
	e = verifyModel(t, dir, opts, m, []ObjectID{{1, 0}, {1, 1}, {1, 2}, {1, 3}})
	e.Close()
}
