package osd

import (
	"testing"
	"time"

	"github.com/basalt-hv/basalt/blockd/engine"
)

func TestObjectLocks(t *testing.T) {
	o := &OSD{locks: map[engine.ObjectID]*objectLock{}}
	a, b := engine.ObjectID{Volume: 1, Index: 0}, engine.ObjectID{Volume: 1, Index: 1}
	unlockA := o.lock(a)

	// Another object is never blocked by it.
	done := make(chan struct{})
	go func() { o.lock(b)(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("locking another object waited for an unrelated lock")
	}

	// The same object waits until it is unlocked.
	got := make(chan struct{})
	go func() { unlock := o.lock(a); close(got); unlock() }()
	select {
	case <-got:
		t.Fatal("the same object was locked twice")
	case <-time.After(100 * time.Millisecond):
	}
	unlockA()
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not woken by unlock")
	}
	time.Sleep(10 * time.Millisecond)
	o.locksMu.Lock()
	n := len(o.locks)
	o.locksMu.Unlock()
	if n != 0 {
		t.Fatalf("%d lock entries left after every unlock; they must be freed", n)
	}
}
