package cli

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
)

func (a *app) checkpointCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "checkpoint",
		Aliases: []string{"ckpt", "snapshot"},
		Short:   "Take, list, delete and revert to checkpoints (snapshots) of volumes",
		Long: `A checkpoint freezes a volume's content at one instant, in constant time whatever the volume's size: writes made
after it land in a new layer, and the checkpoint keeps the blocks they replace. Several volumes checkpointed
together (a VM's disks) are cut at the same instant: a consistency group.

A checkpoint reads as a read-only NBD export named VOLUME@CHECKPOINT on every blockd. Deleting one merges its
blocks into its neighbour online, while the volume stays in use; the space nothing references any longer is
freed. Reverting copies back, from the checkpoint, what changed since it, and needs the volume detached.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.checkpointCreateCmd(), a.checkpointListCmd(), a.checkpointDeleteCmd(), a.checkpointRevertCmd(), a.checkpointChangedCmd())
	return cmd
}

func (a *app) checkpoints(ctx context.Context, fn func(context.Context, basaltv1.CheckpointServiceClient) error) error {
	return a.call(ctx, func(ctx context.Context, c *grpc.ClientConn) error {
		return fn(ctx, basaltv1.NewCheckpointServiceClient(c))
	})
}

func (a *app) checkpointCreateCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "create NAME VOLUME [VOLUME...]",
		Short:             "Checkpoint one volume, or several at one instant",
		Example:           "  basalt checkpoint create before-upgrade disk0\n  basalt checkpoint create nightly vm1-boot vm1-data",
		Args:              cobra.MinimumNArgs(2),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			var resp *basaltv1.CreateCheckpointResponse
			err := a.checkpoints(cmd.Context(), func(ctx context.Context, c basaltv1.CheckpointServiceClient) (err error) {
				resp, err = c.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: args[0], Volumes: args[1:]})
				return err
			})
			if err != nil {
				return err
			}
			took := time.Since(start).Round(time.Microsecond)
			return a.print(resp, func(w *tabwriter.Writer) {
				for _, c := range resp.GetCheckpoints() {
					fmt.Fprintf(w, "checkpoint %s of %s taken (number %d, %s)\n", c.GetName(), c.GetVolume(), c.GetId(), sizeString(c.GetSizeBytes()))
				}
				fmt.Fprintf(w, "took %s\n", took)
			})
		},
	}
}

func (a *app) checkpointListCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "list VOLUME",
		Short:             "List a volume's checkpoints with the space each holds alone (EXCLUSIVE: freed by deleting it) and shares",
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			var resp *basaltv1.ListCheckpointsResponse
			err := a.checkpoints(cmd.Context(), func(ctx context.Context, c basaltv1.CheckpointServiceClient) (err error) {
				resp, err = c.ListCheckpoints(ctx, &basaltv1.ListCheckpointsRequest{Volume: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NAME\tNUMBER\tSIZE\tEXCLUSIVE\tSHARED\tGROUP\tAGE")
				for _, c := range resp.GetCheckpoints() {
					group := "-"
					if len(c.GetGroup()) > 0 {
						group = strings.Join(c.GetGroup(), ",")
					}
					fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", c.GetName(), c.GetId(), sizeString(c.GetSizeBytes()),
						sizeString(c.GetExclusiveBytes()), sizeString(c.GetSharedBytes()), group, age(time.Since(c.GetCreatedAt().AsTime())))
				}
			})
		},
	}
}

func (a *app) checkpointDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete VOLUME NAME",
		Short: "Delete a checkpoint; its blocks merge into its neighbour online",
		Args:  exactArgs(2, "a volume name and a checkpoint name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.checkpoints(cmd.Context(), func(ctx context.Context, c basaltv1.CheckpointServiceClient) error {
				_, err := c.DeleteCheckpoint(ctx, &basaltv1.DeleteCheckpointRequest{Volume: args[0], Name: args[1]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "checkpoint %s of %s deleted; storage nodes merge its blocks in the background\n", args[1], args[0])
			return nil
		},
	}
}

func (a *app) checkpointRevertCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revert VOLUME NAME",
		Short: "Roll a detached volume back to a checkpoint (later checkpoints are kept)",
		Long: `Makes the volume's content and size those of the checkpoint, by copying back what changed since it. The volume
must not be attached (no NBD client may have it open). If the revert is interrupted, run it again: it finishes
the copy.`,
		Args: exactArgs(2, "a volume name and a checkpoint name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			err := a.checkpoints(cmd.Context(), func(ctx context.Context, c basaltv1.CheckpointServiceClient) error {
				_, err := c.RevertVolume(ctx, &basaltv1.RevertVolumeRequest{Volume: args[0], Checkpoint: args[1]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "volume %s reverted to checkpoint %s in %s\n", args[0], args[1], time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
}

func (a *app) checkpointChangedCmd() *cobra.Command {
	var from, to string
	cmd := &cobra.Command{
		Use:   "changed VOLUME [--from CHECKPOINT] [--to CHECKPOINT]",
		Short: "List the ranges of a volume written or trimmed between two checkpoints (changed-block tracking)",
		Example: "  basalt checkpoint changed disk0 --from monday --to tuesday\n" +
			"  basalt checkpoint changed disk0 --from monday          # since monday, up to now",
		Args: exactArgs(1, "one volume name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var resp *basaltv1.GetChangedExtentsResponse
			err := a.checkpoints(cmd.Context(), func(ctx context.Context, c basaltv1.CheckpointServiceClient) (err error) {
				resp, err = c.GetChangedExtents(ctx, &basaltv1.GetChangedExtentsRequest{Volume: args[0], From: from, To: to})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "OFFSET\tLENGTH\tKIND")
				for _, e := range resp.GetExtents() {
					kind := "data"
					if e.GetZero() {
						kind = "zero"
					}
					fmt.Fprintf(w, "%d\t%d\t%s\n", e.GetOffset(), e.GetLength(), kind)
				}
				fmt.Fprintf(w, "changed:\t%s (%d bytes)\n", sizeString(resp.GetChangedBytes()), resp.GetChangedBytes())
			})
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "changes after this checkpoint (default: since the volume was created)")
	cmd.Flags().StringVar(&to, "to", "", "changes up to this checkpoint (default: up to now)")
	return cmd
}
