package api_test

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// serve runs the API on a loopback port against a real embedded etcd and returns a client connection.
func serve(t *testing.T) (*grpc.ClientConn, *store.Store) {
	t.Helper()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(api.UnimplementedInterceptor))
	api.Register(srv, &api.ClusterServer{Store: s, EtcdEndpoints: e.Endpoints(), EmbeddedEtcd: true, MetadID: "metad-t", Version: "test"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	c, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, s
}

func TestClusterService(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cs := basaltv1.NewClusterServiceClient(c)
	reg, err := registry.Register(ctx, s, &basaltv1.Node{Id: "blockd-1", Kind: basaltv1.NodeKind_NODE_KIND_BLOCKD}, "v", 2*time.Second, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close(ctx)

	st, err := cs.GetClusterStatus(ctx, &basaltv1.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetInfo().GetClusterId() == "" || st.GetEtcd().GetMembers() != 1 || st.GetEtcd().GetLeader() == "" || len(st.GetEtcd().GetErrors()) != 0 {
		t.Fatalf("status = %v", st)
	}
	if len(st.GetNodes()) != 1 || st.GetNodes()[0].GetUp() != 1 || st.GetNodes()[0].GetKind() != basaltv1.NodeKind_NODE_KIND_BLOCKD {
		t.Fatalf("node counts = %v", st.GetNodes())
	}

	list, err := cs.ListNodes(ctx, &basaltv1.ListNodesRequest{Kind: basaltv1.NodeKind_NODE_KIND_NETD})
	if err != nil || len(list.GetNodes()) != 0 {
		t.Fatalf("ListNodes(netd) = %v, %v; want none", list, err)
	}
	for _, tc := range []struct {
		id   string
		code codes.Code
	}{{"nope", codes.NotFound}, {"Not Valid", codes.InvalidArgument}, {"", codes.InvalidArgument}} {
		if _, err := cs.GetNode(ctx, &basaltv1.GetNodeRequest{Id: tc.id}); status.Code(err) != tc.code {
			t.Errorf("GetNode(%q) = %v, want %s", tc.id, err, tc.code)
		}
	}
	if _, err := cs.RemoveNode(ctx, &basaltv1.RemoveNodeRequest{Id: "blockd-1"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("RemoveNode of an up node = %v, want FailedPrecondition", err)
	}
}
