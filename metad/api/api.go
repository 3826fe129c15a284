// Package api implements Basalt's public gRPC API (proto/basalt/v1) on top of the metadata store. metad serves
// it. Services whose machinery is not built yet are registered all the same and answer Unimplemented with a
// message naming what is missing, never a silent success. It depends on metad's store, registry, schema and
// attach packages and the API types; it never imports a daemon.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/metad/attach"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ClusterServer serves ClusterService.
type ClusterServer struct {
	basaltv1.UnimplementedClusterServiceServer
	Store *store.Store
	// EtcdEndpoints and EmbeddedEtcd describe the etcd this metad uses, for the status report.
	EtcdEndpoints []string
	EmbeddedEtcd  bool
	MetadID       string
	Version       string
	// Peers reaches storage nodes, for the calls that coordinate them (checkpoints, attachment barriers).
	Peers *blockrpc.Peers
	// Log receives what the services report on their own (takeovers, fencing); nil means slog.Default().
	Log *slog.Logger
}

// Register registers every API service on s. Install UnimplementedInterceptor on s too, so that services not
// built yet say what they lack.
func Register(s *grpc.Server, c *ClusterServer) {
	basaltv1.RegisterClusterServiceServer(s, c)
	basaltv1.RegisterVolumeServiceServer(s, &VolumeServer{Store: c.Store, Peers: c.Peers})
	basaltv1.RegisterCheckpointServiceServer(s, &CheckpointServer{Store: c.Store, Peers: c.Peers})
	log := c.Log
	if log == nil {
		log = slog.Default()
	}
	basaltv1.RegisterAttachmentServiceServer(s, &AttachmentServer{Client: &attach.Client{Store: c.Store, Peers: c.Peers, Log: log.With("component", "attach")}})
	basaltv1.RegisterVMServiceServer(s, NewVMServer(c.Store, c.Peers))
	basaltv1.RegisterNetworkServiceServer(s, &NetworkServer{Store: c.Store})
}

// unbuilt says, per service registered before its machinery exists ("basalt.v1.XService"), what it lacks, for
// its Unimplemented answers. Every service is built today.
var unbuilt = map[string]string{}

// missing says what an unbuilt service lacks.
func missing(service string) string { return unbuilt[service] }

// UnimplementedInterceptor rewrites the generated "method X not implemented" answers into ones that say what is
// missing, so a client learns why, not only that, a call failed.
func UnimplementedInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if status.Code(err) != codes.Unimplemented {
		return resp, err
	}
	service, method, _ := strings.Cut(strings.TrimPrefix(info.FullMethod, "/"), "/")
	if why := missing(service); why != "" {
		return nil, status.Errorf(codes.Unimplemented, "%s is not available: %s", method, why)
	}
	return resp, err
}

// GetClusterStatus reports the cluster's identity, its etcd's health and its nodes.
func (c *ClusterServer) GetClusterStatus(ctx context.Context, _ *basaltv1.GetClusterStatusRequest) (*basaltv1.ClusterStatus, error) {
	info, err := registry.CheckCluster(ctx, c.Store)
	if err != nil {
		return nil, toStatus(err)
	}
	nodes, err := registry.List(ctx, c.Store, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, true)
	if err != nil {
		return nil, toStatus(err)
	}
	counts := map[basaltv1.NodeKind]*basaltv1.NodeCount{}
	var order []basaltv1.NodeKind
	for _, n := range nodes {
		k := n.GetNode().GetKind()
		nc, ok := counts[k]
		if !ok {
			nc = &basaltv1.NodeCount{Kind: k}
			counts[k] = nc
			order = append(order, k)
		}
		if n.GetState() == basaltv1.NodeState_NODE_STATE_UP {
			nc.Up++
		} else {
			nc.Down++
		}
	}
	st := &basaltv1.ClusterStatus{
		Info:         info,
		Etcd:         c.etcdStatus(ctx),
		MetadVersion: c.Version,
		MetadId:      c.MetadID,
	}
	for _, k := range order {
		st.Nodes = append(st.Nodes, counts[k])
	}
	return st, nil
}

// etcdStatus asks every endpoint for its status; an endpoint that does not answer is reported, not fatal.
func (c *ClusterServer) etcdStatus(ctx context.Context) *basaltv1.EtcdStatus {
	es := &basaltv1.EtcdStatus{Endpoints: c.EtcdEndpoints, Embedded: c.EmbeddedEtcd}
	if ml, err := c.Store.Client.MemberList(ctx); err != nil {
		es.Errors = append(es.Errors, fmt.Sprintf("list members: %v", err))
	} else {
		es.Members = int32(len(ml.Members))
	}
	for _, ep := range c.EtcdEndpoints {
		s, err := c.Store.Client.Status(ctx, ep)
		if err != nil {
			es.Errors = append(es.Errors, fmt.Sprintf("%s: %v", ep, err))
			continue
		}
		es.Version = s.Version
		es.Leader = fmt.Sprintf("%x", s.Leader)
		es.DbSizeBytes = s.DbSize
		es.RaftTerm = s.RaftTerm
		es.Revision = s.Header.GetRevision()
		es.Errors = append(es.Errors, s.Errors...)
	}
	return es
}

// ListNodes lists nodes, by default only those that are up.
func (c *ClusterServer) ListNodes(ctx context.Context, r *basaltv1.ListNodesRequest) (*basaltv1.ListNodesResponse, error) {
	nodes, err := registry.List(ctx, c.Store, r.GetKind(), r.GetIncludeDown())
	if err != nil {
		return nil, toStatus(err)
	}
	return &basaltv1.ListNodesResponse{Nodes: nodes}, nil
}

// GetNode returns one node, up or down.
func (c *ClusterServer) GetNode(ctx context.Context, r *basaltv1.GetNodeRequest) (*basaltv1.NodeStatus, error) {
	if err := schema.ValidateName("node", r.GetId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	n, err := registry.Get(ctx, c.Store, r.GetId())
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "node %q is not registered (see 'basalt node list --all')", r.GetId())
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return n, nil
}

// RemoveNode forgets a node that is down.
func (c *ClusterServer) RemoveNode(ctx context.Context, r *basaltv1.RemoveNodeRequest) (*basaltv1.RemoveNodeResponse, error) {
	if err := schema.ValidateName("node", r.GetId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	err := registry.Remove(ctx, c.Store, r.GetId())
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "node %q is not registered (see 'basalt node list --all')", r.GetId())
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return &basaltv1.RemoveNodeResponse{}, nil
}

// toStatus maps the store's and registry's errors onto gRPC codes; the message keeps the whole chain.
func toStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, store.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, store.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, store.ErrConflict):
		code = codes.Aborted
	case errors.Is(err, registry.ErrNodeUp), errors.Is(err, registry.ErrNoCluster):
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, clientv3.ErrNoAvailableEndpoints):
		code = codes.Unavailable
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}
