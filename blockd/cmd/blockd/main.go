// Command blockd is a Basalt storage node. In this build it joins the cluster (registration on an etcd lease, heartbeat) and serves gRPC health; the block layer (storage engine, replication, NBD export) plugs into the node it starts.
package main

import (
	"os"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/node"
)

func main() {
	os.Exit(node.Main(basaltv1.NodeKind_NODE_KIND_BLOCKD, "127.0.0.1:7410", os.Args[1:], nil))
}
