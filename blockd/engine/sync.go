package engine

import (
	"context"
	"fmt"
	"sync"
)

// groupSync implements group commit. Positions in the log are LSNs: bytes
// appended by this process (sync markers excluded), which grow across
// segments. A caller that needs its writes durable waits until the durable
// LSN passes its own. At most one fdatasync is in flight; callers that
// arrive meanwhile wait for it and then share the next one, so N
// concurrent FUA writes cost about two fdatasyncs, not N.
type groupSync struct {
	mu      sync.Mutex
	durable uint64
	flight  *flight
}

type flight struct {
	done chan struct{}
}

// Sync makes every write that completed before it was called durable.
func (e *Engine) Sync(ctx context.Context) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if !e.enter() {
		return ErrClosed
	}
	defer e.leave()
	e.appendMu.Lock()
	lsn := e.appendLSN
	e.appendMu.Unlock()
	if err := e.syncTo(ctx, lsn); err != nil {
		return fmt.Errorf("engine: sync: %w", err)
	}
	return nil
}

// syncTo returns once every byte up to lsn is durable.
func (e *Engine) syncTo(ctx context.Context, lsn uint64) error {
	g := &e.gs
	counted := false
	for {
		g.mu.Lock()
		if g.durable >= lsn {
			g.mu.Unlock()
			return nil
		}
		if !counted {
			e.statSyncReqs.Add(1)
			counted = true
		}
		if f := g.flight; f != nil {
			g.mu.Unlock()
			select {
			case <-f.done:
				continue
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		f := &flight{done: make(chan struct{})}
		g.flight = f
		g.mu.Unlock()

		target, err := e.doSync()

		g.mu.Lock()
		if err == nil && target > g.durable {
			g.durable = target
		}
		g.flight = nil
		close(f.done)
		g.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// doSync makes everything appended so far durable and returns the LSN it
// covered. Afterwards it appends a sync marker recording the durable
// offset of the head segment, so that recovery knows which part of the
// head was acknowledged and need not re-verify its data.
func (e *Engine) doSync() (uint64, error) {
	e.appendMu.Lock()
	if e.failed != nil {
		err := e.failed
		e.appendMu.Unlock()
		return 0, err
	}
	head := e.head
	head.acquire()
	target, off := e.appendLSN, e.headOff
	e.appendMu.Unlock()
	defer head.release()

	if err := fdatasync(head.fd); err != nil {
		e.appendMu.Lock()
		err = e.failLocked(ioErr("syncing "+segName(head.id), err))
		e.appendMu.Unlock()
		return 0, err
	}
	e.statSyncs.Add(1)

	e.appendMu.Lock()
	if e.head == head && off > max(e.markerOff, segHeaderSize) && e.failed == nil {
		h := recHeader{typ: recSync, aux: uint64(off)}
		if _, _, _, err := e.appendLocked(&h, nil, nil); err == nil {
			e.markerOff = off
		}
	}
	e.appendMu.Unlock()
	return target, nil
}
