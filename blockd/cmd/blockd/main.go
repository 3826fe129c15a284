// Command blockd is a Basalt storage node: it stores replicas of volume objects in its local storage engine,
// replicates the writes of the placement groups it is primary of, and exports every volume over NBD (TCP and a
// Unix socket), forwarding each request to the primary of the data it touches. See docs/replication.md.
package main

import (
	"os"

	"github.com/basalt-hv/basalt/blockd/daemon"
)

func main() {
	var c daemon.Config
	os.Exit(daemon.Daemon(&c).Main(os.Args[1:]))
}
