// Package watch keeps a controller's view of a key prefix in step with etcd: it lists the prefix, hands the
// full state to the controller, then streams every change after that revision. When the stream breaks or the
// revision it needs was compacted away, it lists again and hands over a fresh full state, so a controller
// written as "reconcile on Sync, apply on Put/Delete" never misses a change. It depends on metad/store.
package watch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// Handlers receive the state of a prefix. They run on the watching goroutine, one at a time, in revision
// order. An error returned by a handler stops Run with that error.
type Handlers[P proto.Message] struct {
	// Sync replaces the whole state: every record under the prefix at revision rev.
	Sync func(records []store.Record[P], rev int64) error
	// Put is a created or updated record.
	Put func(r store.Record[P]) error
	// Delete is a removed key (deleted, or its lease expired).
	Delete func(key string, rev int64) error
	// Progress says that every change under the prefix up to revision rev has been delivered, though nothing
	// changed there: etcd's answer to RequestProgress. Optional.
	Progress func(rev int64) error
}

// RequestProgress asks etcd to tell every watch that Run has open on s's client how far it has got; each
// calls its Handlers.Progress with that revision. etcd answers only once all those watches have caught up
// with it, so a caller waiting for a revision asks again until it sees it.
func RequestProgress(ctx context.Context, s *store.Store) error {
	// The request reaches only the watches of one gRPC stream, which the client picks by the context's
	// metadata: it must be decorated as follow decorates its watches.
	return s.Client.RequestProgress(clientv3.WithRequireLeader(ctx))
}

// Run watches prefix until ctx ends (returning ctx.Err()) or a handler fails.
func Run[M any, P store.Message[M]](ctx context.Context, s *store.Store, prefix string, h Handlers[P], log *slog.Logger) error {
	backoff := 100 * time.Millisecond
	for {
		rev, err := sync[M, P](ctx, s, prefix, h)
		if err == nil {
			err = follow[M, P](ctx, s, prefix, rev, h)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var he handlerError
		if errors.As(err, &he) {
			return he.err
		}
		log.Warn("watch interrupted; listing again", "prefix", prefix, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// handlerError marks errors that come from the caller's handlers, which end Run instead of a retry.
type handlerError struct{ err error }

func (e handlerError) Error() string { return e.err.Error() }

func sync[M any, P store.Message[M]](ctx context.Context, s *store.Store, prefix string, h Handlers[P]) (int64, error) {
	records, rev, err := store.List[M, P](ctx, s, prefix)
	if err != nil {
		return 0, err
	}
	if h.Sync != nil {
		if err := h.Sync(records, rev); err != nil {
			return 0, handlerError{err}
		}
	}
	return rev, nil
}

func follow[M any, P store.Message[M]](ctx context.Context, s *store.Store, prefix string, rev int64, h Handlers[P]) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range s.Client.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("watch %s from revision %d: %w", prefix, rev+1, err)
		}
		if resp.IsProgressNotify() {
			if h.Progress != nil {
				if err := h.Progress(resp.Header.GetRevision()); err != nil {
					return handlerError{err}
				}
			}
			continue
		}
		for _, ev := range resp.Events {
			switch ev.Type {
			case clientv3.EventTypePut:
				if h.Put == nil {
					continue
				}
				r, err := store.Decode[M, P](string(ev.Kv.Key), ev.Kv.Value, ev.Kv.ModRevision, ev.Kv.CreateRevision, ev.Kv.Lease)
				if err != nil {
					return handlerError{err}
				}
				if err := h.Put(r); err != nil {
					return handlerError{err}
				}
			case clientv3.EventTypeDelete:
				if h.Delete == nil {
					continue
				}
				if err := h.Delete(string(ev.Kv.Key), ev.Kv.ModRevision); err != nil {
					return handlerError{err}
				}
			}
		}
	}
	return fmt.Errorf("watch %s closed", prefix)
}
