// Command netd is Basalt's per-host network agent: it programs the host's virtual switch (a bridge and a VXLAN
// device per virtual network, a tap per VM NIC, per-port policy in nftables) from the networks and ports
// declared in etcd, and keeps it converged. See docs/netd.md.
package main

import (
	"os"

	"github.com/basalt-hv/basalt/netd/daemon"
)

func main() {
	var c daemon.Config
	os.Exit(daemon.Daemon(&c).Main(os.Args[1:]))
}
