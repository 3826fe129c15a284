// Command computed is a Basalt compute node. In this build it joins the cluster (registration on an etcd lease, heartbeat) and serves gRPC health; the hypervisor drivers and VM lifecycle plug into the node it starts.
package main

import (
	"os"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/node"
)

func main() {
	os.Exit(node.Daemon{Kind: basaltv1.NodeKind_NODE_KIND_COMPUTED, DefaultListen: "127.0.0.1:7430"}.Main(os.Args[1:]))
}
