// Command metad serves Basalt's cluster metadata and public API. By default it runs a single-node etcd
// embedded in its own process, its data under --data-dir; with --etcd-endpoints it uses an external etcd
// cluster instead, and several metad can then serve the same cluster.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/server"
)

func main() {
	fs := flag.NewFlagSet("metad", flag.ContinueOnError)
	var c server.Config
	c.Flags(fs)
	logger := node.LogLevelFlag(fs)
	if code, ok := node.ParseFlags(fs, os.Args[1:]); !ok {
		os.Exit(code)
	}
	ctx, stop := node.SignalContext()
	defer stop()
	if err := server.Run(ctx, c, logger()); err != nil {
		fmt.Fprintf(os.Stderr, "metad: %v\n", err)
		os.Exit(1)
	}
}
