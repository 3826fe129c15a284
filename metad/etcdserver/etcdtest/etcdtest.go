// Package etcdtest starts a real embedded etcd for tests, on free loopback ports in a test's temporary
// directory, and stops it when the test ends. It depends on metad/etcdserver and internal/node (for the
// client, dialled the way every daemon dials it).
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/etcdserver"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Etcd is a running test etcd and what is needed to restart it on the same data.
type Etcd struct {
	Server *etcdserver.Server
	Config etcdserver.Config
}

// Start starts an embedded etcd in dir (a fresh t.TempDir() if empty) and stops it at the end of the test.
func Start(t testing.TB, dir string) *Etcd {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	c := etcdserver.Config{
		Dir:       dir,
		Name:      "test",
		ClientURL: "http://" + FreeAddr(t),
		PeerURL:   "http://" + FreeAddr(t),
		LogLevel:  "error",
	}
	e := &Etcd{Config: c}
	e.Restart(t)
	return e
}

// Restart starts the etcd again, on the same data and ports (after Stop).
func (e *Etcd) Restart(t testing.TB) {
	t.Helper()
	s, err := etcdserver.Start(context.Background(), e.Config)
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	e.Server = s
	t.Cleanup(s.Close)
}

// Stop stops the etcd; Restart brings it back.
func (e *Etcd) Stop() { e.Server.Close() }

// Endpoints are the etcd's client URLs.
func (e *Etcd) Endpoints() []string { return []string{e.Config.ClientURL} }

// Client returns a new client of this etcd, closed at the end of the test.
func (e *Etcd) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	c, err := node.Dial(context.Background(), e.Endpoints(), 10*time.Second)
	if err != nil {
		t.Fatalf("dial etcd: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// FreeAddr returns a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr())
}
