package cli

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/buildinfo"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
)

func (a *app) clusterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Show the state of the cluster",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
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
