package etcdserver_test

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/basalt-hv/basalt/metad/etcdserver"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
)

func TestDataSurvivesARestart(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	c := e.Client(t)
	if _, err := c.Put(ctx, "/k", "kept"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	e.Stop()

	e.Restart(t)
	c = e.Client(t)
	resp, err := c.Get(ctx, "/k")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "kept" {
		t.Fatalf("after restart /k = %v, want kept", resp.Kvs)
	}
}

func TestTakenPortIsOneClearError(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = etcdserver.Start(context.Background(), etcdserver.Config{
		Dir:       t.TempDir(),
		Name:      "x",
		ClientURL: "http://" + l.Addr().String(),
		PeerURL:   "http://" + etcdtest.FreeAddr(t),
	})
	if err == nil || !strings.Contains(err.Error(), "address already in use") || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Fatalf("Start on a taken port = %v", err)
	}
}
