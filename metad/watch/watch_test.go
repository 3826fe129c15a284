package watch_test

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
)

// view is what a controller would keep: the current records under the prefix, by key.
type view struct {
	mu    sync.Mutex
	items map[string]string
	syncs int
}

func (v *view) handlers() watch.Handlers[*basaltv1.Node] {
	return watch.Handlers[*basaltv1.Node]{
		Sync: func(rs []store.Record[*basaltv1.Node], _ int64) error {
			v.mu.Lock()
			defer v.mu.Unlock()
			v.syncs++
			v.items = map[string]string{}
			for _, r := range rs {
				v.items[r.Key] = r.Value.GetGrpcAddress()
			}
			return nil
		},
		Put: func(r store.Record[*basaltv1.Node]) error {
			v.mu.Lock()
			defer v.mu.Unlock()
			v.items[r.Key] = r.Value.GetGrpcAddress()
			return nil
		},
		Delete: func(key string, _ int64) error {
			v.mu.Lock()
			defer v.mu.Unlock()
			delete(v.items, key)
			return nil
		},
	}
}

// waitFor polls until the view equals want.
func (v *view) waitFor(t *testing.T, want map[string]string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		v.mu.Lock()
		got := fmt.Sprint(v.items)
		v.mu.Unlock()
		if got == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("view = %s, want %s", got, fmt.Sprint(want))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestWatchFollowsChangesAndSurvivesAnEtcdRestart(t *testing.T) {
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	put := func(id, addr string) {
		t.Helper()
		if _, err := s.Put(ctx, "/w/"+id, &basaltv1.Node{Id: id, GrpcAddress: addr}); err != nil {
			t.Fatal(err)
		}
	}
	put("a", "1")
	put("b", "1")

	v := &view{}
	done := make(chan error, 1)
	go func() { done <- watch.Run[basaltv1.Node](ctx, s, "/w/", v.handlers(), slog.Default()) }()
	v.waitFor(t, map[string]string{"/w/a": "1", "/w/b": "1"})

	put("a", "2")
	put("c", "1")
	if _, err := s.Client.Delete(ctx, "/w/b"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client.Put(ctx, "/wx", "outside the prefix"); err != nil {
		t.Fatal(err)
	}
	v.waitFor(t, map[string]string{"/w/a": "2", "/w/c": "1"})

	// Restart etcd under the watcher; changes made after it is back must still arrive.
	e.Stop()
	e.Restart(t)
	put("d", "1")
	v.waitFor(t, map[string]string{"/w/a": "2", "/w/c": "1", "/w/d": "1"})

	cancel()
	select {
	case err := <-done:
		if err != context.Canceled {
			t.Fatalf("Run returned %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}

func TestHandlerErrorEndsRun(t *testing.T) {
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	ctx := context.Background()
	boom := fmt.Errorf("controller gave up")
	errc := make(chan error, 1)
	go func() {
		errc <- watch.Run[basaltv1.Node](ctx, s, "/h/", watch.Handlers[*basaltv1.Node]{
			Put: func(store.Record[*basaltv1.Node]) error { return boom },
		}, slog.Default())
	}()
	time.Sleep(200 * time.Millisecond)
	if _, err := s.Put(ctx, "/h/x", &basaltv1.Node{Id: "x"}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err != boom {
			t.Fatalf("Run = %v, want the handler's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a failing handler did not end Run")
	}
}
