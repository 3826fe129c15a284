package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
)

func (a *app) nodeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "List, inspect and remove cluster nodes",
		Long: `A node is one Basalt daemon: metad, blockd (storage), computed (VMs) or netd (network). A node is up while
it holds its etcd lease; a node whose process dies is listed as down once its lease expires (--lease-ttl of
the daemon, 5s by default).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.nodeListCmd(), a.nodeGetCmd(), a.nodeRemoveCmd())
	return cmd
}

func (a *app) nodeListCmd() *cobra.Command {
	var all bool
	var kind string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the nodes that are up (with --all, also those that are down)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := parseKind(kind)
			if err != nil {
				return usageError{err}
			}
			var resp *basaltv1.ListNodesResponse
			err = a.call(cmd.Context(), func(ctx context.Context, c *grpc.ClientConn) (err error) {
				resp, err = basaltv1.NewClusterServiceClient(c).ListNodes(ctx, &basaltv1.ListNodesRequest{IncludeDown: all, Kind: k})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "ID\tKIND\tSTATE\tADDRESS\tFAILURE-DOMAIN\tUPTIME\tVERSION")
				for _, n := range resp.GetNodes() {
					uptime, version := "-", "-"
					if l := n.GetLiveness(); l != nil {
						uptime = age(time.Since(l.GetStartedAt().AsTime()))
						version = l.GetVersion()
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.GetNode().GetId(), kindName(n.GetNode().GetKind()),
						stateName(n.GetState()), n.GetNode().GetGrpcAddress(), n.GetNode().GetFailureDomain(), uptime, version)
				}
			})
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "also list registered nodes that are down")
	cmd.Flags().StringVar(&kind, "kind", "", "only nodes of this kind: metad, blockd, computed or netd")
	cmd.RegisterFlagCompletionFunc("kind", cobra.FixedCompletions([]string{"metad", "blockd", "computed", "netd"}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func (a *app) nodeGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "get ID",
		Short:             "Show one node, up or down",
		Args:              exactArgs(1, "one node ID"),
		ValidArgsFunction: a.completeNodeIDs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var n *basaltv1.NodeStatus
			err := a.call(cmd.Context(), func(ctx context.Context, c *grpc.ClientConn) (err error) {
				n, err = basaltv1.NewClusterServiceClient(c).GetNode(ctx, &basaltv1.GetNodeRequest{Id: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(n, func(w *tabwriter.Writer) {
				node := n.GetNode()
				fmt.Fprintf(w, "ID:\t%s\n", node.GetId())
				fmt.Fprintf(w, "Kind:\t%s\n", kindName(node.GetKind()))
				fmt.Fprintf(w, "State:\t%s\n", stateName(n.GetState()))
				fmt.Fprintf(w, "Address:\t%s\n", node.GetGrpcAddress())
				fmt.Fprintf(w, "Failure domain:\t%s\n", node.GetFailureDomain())
				fmt.Fprintf(w, "Host name:\t%s\n", node.GetHostname())
				fmt.Fprintf(w, "Registered:\t%s\n", node.GetRegisteredAt().AsTime().Local().Format(time.RFC3339))
				if l := n.GetLiveness(); l != nil {
					fmt.Fprintf(w, "Started:\t%s (up %s)\n", l.GetStartedAt().AsTime().Local().Format(time.RFC3339), age(time.Since(l.GetStartedAt().AsTime())))
					fmt.Fprintf(w, "PID:\t%d\n", l.GetPid())
					fmt.Fprintf(w, "Version:\t%s\n", l.GetVersion())
					fmt.Fprintf(w, "Lease:\t%x (TTL %ds)\n", l.GetLeaseId(), l.GetLeaseTtlSeconds())
				}
			})
		},
	}
}

func (a *app) nodeRemoveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "remove ID",
		Short: "Forget a node that is down",
		Long: `remove forgets a node that is down for good, so it is no longer listed with --all. A node that is up
cannot be removed: stop its process first, or wait for its lease to expire.`,
		Args:              exactArgs(1, "one node ID"),
		ValidArgsFunction: a.completeNodeIDs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.call(cmd.Context(), func(ctx context.Context, c *grpc.ClientConn) error {
				_, err := basaltv1.NewClusterServiceClient(c).RemoveNode(ctx, &basaltv1.RemoveNodeRequest{Id: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "node %s removed\n", args[0])
			return nil
		},
	}
}

// completeNodeIDs completes node IDs from the live cluster; it stays silent if the cluster cannot be reached.
func (a *app) completeNodeIDs(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var ids []string
	a.call(cmd.Context(), func(ctx context.Context, c *grpc.ClientConn) error {
		resp, err := basaltv1.NewClusterServiceClient(c).ListNodes(ctx, &basaltv1.ListNodesRequest{IncludeDown: true})
		for _, n := range resp.GetNodes() {
			ids = append(ids, n.GetNode().GetId())
		}
		return err
	})
	return ids, cobra.ShellCompDirectiveNoFileComp
}

func kindName(k basaltv1.NodeKind) string { return k.Name() }

func stateName(s basaltv1.NodeState) string { return s.Name() }

func parseKind(s string) (basaltv1.NodeKind, error) {
	k, err := basaltv1.ParseNodeKind(s)
	if err != nil {
		return 0, fmt.Errorf("--kind: %w", err)
	}
	return k, nil
}
