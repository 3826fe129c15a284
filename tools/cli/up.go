package cli

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/tools/clientconfig"
	"github.com/basalt-hv/basalt/tools/up"
	"github.com/spf13/cobra"
)

func (a *app) upCmd() *cobra.Command {
	o := up.Options{}
	var noConfig bool
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run a whole Basalt cluster on this machine until Ctrl-C",
		Long: `up runs a whole Basalt cluster on this machine: metad with an embedded etcd, --blockd storage nodes, one
computed and one netd, each its own process, every port on 127.0.0.1, all data under --data-dir. It waits
until every node is up, prints where everything is, and writes the client config so that 'basalt ...' in
another terminal talks to this cluster. The data is kept: running 'basalt up' again on the same --data-dir
brings the same cluster back.

Ports: the metad API listens on --base-port, its etcd on the next two; node number i (blockd first, then
computed, then netd) uses --base-port + 10*i for gRPC and, for blockd, the next port for NBD. A crashed daemon is restarted after --restart-delay (doubling
while it keeps crashing), long enough that the rest of the cluster sees the failure as a real one. Ctrl-C
stops the nodes, then metad; daemon logs are in <data-dir>/logs, running PIDs in <data-dir>/up.json.`,
		Example: `  basalt up
  basalt up --data-dir /tmp/basalt --blockd 5 --base-port 9400`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.BinDir == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("find the daemon binaries: %w (pass --bin-dir)", err)
				}
				o.BinDir = filepath.Dir(exe)
			}
			if !noConfig {
				p, err := clientconfig.Path()
				if err != nil {
					return err
				}
				o.ConfigPath = p
			}
			o.Out = a.out
			// Ctrl-C and SIGTERM stop the cluster cleanly; the context of the command would end on neither.
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return up.Run(ctx, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.DataDir, "data-dir", defaultDataDir(), "directory for all of the cluster's data and logs")
	f.IntVar(&o.Blockd, "blockd", 3, fmt.Sprintf("number of blockd storage nodes (1 to %d)", up.MaxBlockd))
	f.IntVar(&o.Computed, "computed", 1, fmt.Sprintf("number of computed nodes (1 to %d; two for live migration)", up.MaxComputed))
	f.IntVar(&o.BasePort, "base-port", 7400, "first port of the cluster's port range (see above)")
	f.DurationVar(&o.LeaseTTL, "lease-ttl", node.DefaultLeaseTTL, "lease TTL of every node: how soon a dead node is listed as down")
	f.DurationVar(&o.RestartDelay, "restart-delay", 10*time.Second, "how long a crashed daemon stays down before it is restarted; 0 never restarts")
	f.DurationVar(&o.DownOut, "down-out-interval", 0, "how long a blockd may be down before its data is re-placed on other nodes (default: metad's, 10m)")
	f.DurationVar(&o.StartTimeout, "start-timeout", 2*time.Minute, "how long to wait for every node to come up")
	f.StringVar(&o.BinDir, "bin-dir", "", "directory holding metad, blockd, computed and netd (default: next to this basalt)")
	f.BoolVar(&noConfig, "no-client-config", false, "do not write the client config file")
	f.BoolVar(&o.Debug, "debug", false, "serve pprof profiles on the last port of every daemon's range (metad: --base-port + 9)")
	return cmd
}

// defaultDataDir is $XDG_DATA_HOME/basalt, else ~/.local/share/basalt.
func defaultDataDir() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "basalt")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "basalt")
	}
	return "basalt-data"
}
