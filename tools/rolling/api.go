package rolling

import (
	"context"
	"errors"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// VMAPI is the part of the VMService a rolling update uses. basaltv1.NewVMServiceClient satisfies it.
type VMAPI interface {
	ListHosts(ctx context.Context, in *basaltv1.ListHostsRequest, opts ...grpc.CallOption) (*basaltv1.ListHostsResponse, error)
	ListVMs(ctx context.Context, in *basaltv1.ListVMsRequest, opts ...grpc.CallOption) (*basaltv1.ListVMsResponse, error)
	DrainHost(ctx context.Context, in *basaltv1.DrainHostRequest, opts ...grpc.CallOption) (*basaltv1.DrainHostResponse, error)
	UndrainHost(ctx context.Context, in *basaltv1.UndrainHostRequest, opts ...grpc.CallOption) (*basaltv1.ComputeHostStatus, error)
	MigrateVM(ctx context.Context, in *basaltv1.MigrateVMRequest, opts ...grpc.CallOption) (*basaltv1.VM, error)
}

// NodeAPI is the part of the ClusterService a rolling update uses (a computed's lease, to tell a restart).
// basaltv1.NewClusterServiceClient satisfies it.
type NodeAPI interface {
	GetNode(ctx context.Context, in *basaltv1.GetNodeRequest, opts ...grpc.CallOption) (*basaltv1.NodeStatus, error)
}

// apiError turns a gRPC error into a sentence: the server's message, or what was wrong with reaching it.
// The sentence keeps the error's code, for transient.
func apiError(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		return &callError{st.Code(), "cannot reach metad: " + st.Message()}
	case codes.DeadlineExceeded:
		return &callError{st.Code(), "metad did not answer in time"}
	}
	return &callError{st.Code(), st.Message()}
}

// callError is a failed API call, as a sentence.
type callError struct {
	code codes.Code
	msg  string
}

func (e *callError) Error() string { return e.msg }

// transient reports whether a failed poll is worth repeating: metad briefly unreachable or slow (a loaded
// machine, a metad restart) should not fail a ten-minute drain.
func transient(err error) bool {
	var ce *callError
	return errors.As(err, &ce) && (ce.code == codes.Unavailable || ce.code == codes.DeadlineExceeded)
}

// findHost returns the host's entry in a ListHosts answer, or nil.
func findHost(hosts []*basaltv1.ComputeHostStatus, node string) *basaltv1.ComputeHostStatus {
	for _, h := range hosts {
		if h.GetHost().GetNode() == node {
			return h
		}
	}
	return nil
}

// vmsByName indexes a ListVMs answer.
func vmsByName(vms []*basaltv1.VM) map[string]*basaltv1.VM {
	m := make(map[string]*basaltv1.VM, len(vms))
	for _, vm := range vms {
		m[vm.GetName()] = vm
	}
	return m
}
