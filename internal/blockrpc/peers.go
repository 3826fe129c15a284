// Package blockrpc holds the gRPC plumbing every caller of BlockService shares: a pool of connections to storage
// nodes, redialled when a node's address changes, and the message limits both ends must agree on. blockd nodes
// use it to reach each other, metad to coordinate them (checkpoints, usage). It depends on grpc and the API types
// only.
package blockrpc

import (
	"fmt"
	"sync"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// MaxMessage bounds gRPC messages between blockd nodes: a whole object (4 MiB of data) plus framing, and a
// 32 MiB NBD write split into objects.
const MaxMessage = 64 << 20

// Peers holds one gRPC connection per other storage node, redialled when a node's address changes.
type Peers struct {
	mu    sync.Mutex
	conns map[string]*peerConn
}

type peerConn struct {
	addr string
	conn *grpc.ClientConn
	c    basaltv1.BlockServiceClient
}

// NewPeers returns an empty connection pool.
func NewPeers() *Peers { return &Peers{conns: map[string]*peerConn{}} }

// Client returns a BlockService client for node n.
func (p *Peers) Client(n *basaltv1.StorageNode) (basaltv1.BlockServiceClient, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pc := p.conns[n.GetId()]; pc != nil && pc.addr == n.GetAddress() {
		return pc.c, nil
	} else if pc != nil {
		pc.conn.Close()
	}
	conn, err := grpc.NewClient(n.GetAddress(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessage), grpc.MaxCallSendMsgSize(MaxMessage)))
	if err != nil {
		return nil, fmt.Errorf("connect to %s at %s: %w", n.GetId(), n.GetAddress(), err)
	}
	pc := &peerConn{addr: n.GetAddress(), conn: conn, c: basaltv1.NewBlockServiceClient(conn)}
	p.conns[n.GetId()] = pc
	return pc.c, nil
}

// Close closes every connection.
func (p *Peers) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, pc := range p.conns {
		pc.conn.Close()
		delete(p.conns, id)
	}
}

// ServerOptions are the gRPC server options a blockd needs for BlockService.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.MaxRecvMsgSize(MaxMessage), grpc.MaxSendMsgSize(MaxMessage)}
}
