package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/buildinfo"
	"github.com/basalt-hv/basalt/tools/rolling"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
)

func (a *app) clusterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Show the state of the cluster, and update its hosts one at a time",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.clusterUpdateCmd())
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show the cluster's identity, its etcd's health and how many nodes of each kind are up",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var st *basaltv1.ClusterStatus
			err := a.call(cmd.Context(), func(ctx context.Context, c *grpc.ClientConn) (err error) {
				st, err = basaltv1.NewClusterServiceClient(c).GetClusterStatus(ctx, &basaltv1.GetClusterStatusRequest{})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(st, func(w *tabwriter.Writer) {
				info, etcd := st.GetInfo(), st.GetEtcd()
				fmt.Fprintf(w, "Cluster:\t%s (created %s, metadata format %d)\n", info.GetClusterId(),
					info.GetCreatedAt().AsTime().Local().Format(time.RFC3339), info.GetDataFormat())
				fmt.Fprintf(w, "API:\tmetad %s, version %s\n", st.GetMetadId(), st.GetMetadVersion())
				mode := "external"
				if etcd.GetEmbedded() {
					mode = "embedded"
				}
				health := "healthy"
				if len(etcd.GetErrors()) > 0 {
					health = "UNHEALTHY: " + strings.Join(etcd.GetErrors(), "; ")
				}
				fmt.Fprintf(w, "etcd:\t%s %s, %d member(s), leader %s, revision %d, %s, %s\n", mode, etcd.GetVersion(),
					etcd.GetMembers(), etcd.GetLeader(), etcd.GetRevision(), byteSize(etcd.GetDbSizeBytes()), health)
				fmt.Fprintf(w, "\t%s\n", strings.Join(etcd.GetEndpoints(), ", "))
				fmt.Fprintln(w, "Nodes:")
				for _, n := range st.GetNodes() {
					fmt.Fprintf(w, "  %s\t%d up, %d down\n", kindName(n.GetKind()), n.GetUp(), n.GetDown())
				}
			})
		},
	})
	return cmd
}

func (a *app) clusterUpdateCmd() *cobra.Command {
	var o rolling.Options
	var bandwidth string
	cmd := &cobra.Command{
		Use:   "update --rolling CMD",
		Short: "Update every compute host in turn without stopping VMs: drain it, run CMD, move its VMs back",
		Long: `Updates the compute hosts one at a time, keeping every VM running. For each host (every computed host in
the order of their node IDs; --hosts chooses and orders them, --exclude leaves some out):

  1. record  note the VMs on the host;
  2. drain   put it in maintenance and live-migrate those VMs to other hosts, --parallel at a time (with
             --compress and --bandwidth, as 'basalt host drain'); wait until it holds no VM and none is
             migrating away, printing each migration's state as it changes (at most --drain-timeout);
  3. update  run CMD with /bin/sh -c on THIS machine (where basalt runs), with BASALT_HOST=<node ID> and
             BASALT_HOSTNAME=<the host's machine name> in its environment and no stdin; its output is shown
             with a "[node ID] " prefix. A non-zero exit is a failure (at most --command-timeout). CMD does
             the update itself, e.g. over ssh: ssh root@"$BASALT_HOSTNAME" /usr/local/sbin/update-basalt;
  4. wait-up wait until the host's computed is up again and has held its lease for a lease period and a
             half (CMD may restart computed, even in the background; at most --up-timeout);
  5. undrain end its maintenance;
  6. return  migrate back the VMs recorded in step 1 that still exist, still run and are elsewhere, and wait
             for them (at most --drain-timeout).

The first failure stops the update: it names the host, the step and the error, leaves that host as it is
(drained: the operator decides), prints what state the host and its VMs are in and the commands that undo it
('basalt host undrain HOST', then 'basalt vm migrate VM --to HOST'), and exits non-zero. Hosts after it are
not touched. On success it prints a table: per host, the VMs moved, the drain's time, the update's (CMD and
the wait for computed) and the return's.

Ctrl-C (or SIGTERM) stops it between steps, or in the middle of a step's wait, and reports where it stopped;
migrations already requested go on. A running CMD runs in its own process group: it gets SIGTERM, then
SIGKILL 10 s later. --dry-run prints the plan and changes nothing.`,
		Example: `  basalt cluster update --rolling 'ssh root@"$BASALT_HOSTNAME" /usr/local/sbin/update-basalt' --dry-run
  basalt cluster update --rolling 'ssh root@"$BASALT_HOSTNAME" apt-get -y upgrade' --hosts computed-a,computed-b
  basalt cluster update --rolling ./update.sh --exclude computed-c --parallel 4 --compress`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.Command == "" {
				return usageError{fmt.Errorf("say what to run on each host with --rolling CMD (see '%s --help')", cmd.CommandPath())}
			}
			if bandwidth != "" {
				n, err := parseSize(bandwidth)
				if err != nil {
					return usageError{fmt.Errorf("--bandwidth: %w", err)}
				}
				o.BandwidthBytesPerSecond = n
			}
			c, _, err := a.conn()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			o.CallTimeout = a.timeout
			rep, err := rolling.Run(ctx, basaltv1.NewVMServiceClient(c), basaltv1.NewClusterServiceClient(c), o, a.out)
			var se *rolling.StepError
			switch {
			case errors.As(err, &se):
				if len(rep.Done) > 0 {
					rolling.FormatSummary(a.out, rep)
				}
				rolling.FormatFailure(a.errOut, se)
				return err
			case err != nil:
				return err
			case o.DryRun:
				return nil
			}
			return rolling.FormatSummary(a.out, rep)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Command, "rolling", "", "the update command, run with /bin/sh -c on this machine for each host in turn")
	f.StringSliceVar(&o.Hosts, "hosts", nil, "only these computed hosts, in this order (comma-separated node IDs)")
	f.StringSliceVar(&o.Exclude, "exclude", nil, "leave these computed hosts out (comma-separated node IDs)")
	f.Uint32Var(&o.Parallel, "parallel", rolling.DefaultParallel, "migrations at once while a host drains")
	f.BoolVar(&o.Compress, "compress", false, "compress the memory streams")
	f.StringVar(&bandwidth, "bandwidth", "", "limit each stream, bytes per second with a unit, e.g. 100M")
	f.DurationVar(&o.DrainTimeout, "drain-timeout", rolling.DefaultDrainTimeout, "how long a host may take to drain, and its VMs to come back")
	f.DurationVar(&o.CommandTimeout, "command-timeout", rolling.DefaultCommandTimeout, "how long the update command may run on one host")
	f.DurationVar(&o.UpTimeout, "up-timeout", rolling.DefaultUpTimeout, "how long to wait for a host's computed to be up after the command")
	f.BoolVar(&o.DryRun, "dry-run", false, "print the plan and change nothing")
	cmd.RegisterFlagCompletionFunc("hosts", a.completeNodeIDs)
	cmd.RegisterFlagCompletionFunc("exclude", a.completeNodeIDs)
	return cmd
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this basalt command",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, _ := structpb.NewStruct(map[string]any{"version": buildinfo.Version()})
			return a.print(v, func(w *tabwriter.Writer) { fmt.Fprintln(w, buildinfo.Version()) })
		},
	}
}

// byteSize formats a size in binary units.
func byteSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
