// Command basalt is the command line for Basalt cluster admins; `basalt up` runs a whole cluster on one
// machine. See `basalt --help`.
package main

import (
	"context"
	"os"

	"github.com/basalt-hv/basalt/tools/cli"
)

func main() {
	os.Exit(cli.Execute(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
