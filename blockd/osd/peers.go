package osd

import (
	"github.com/basalt-hv/basalt/internal/blockrpc"
	"google.golang.org/grpc"
)

// Peers is the pool of connections to other storage nodes (see internal/blockrpc).
type Peers = blockrpc.Peers

// NewPeers returns an empty connection pool.
func NewPeers() *Peers { return blockrpc.NewPeers() }

// ServerOptions are the gRPC server options a blockd needs for BlockService.
func ServerOptions() []grpc.ServerOption { return blockrpc.ServerOptions() }
