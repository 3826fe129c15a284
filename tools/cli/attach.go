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

// addAttachmentCmds adds the attachment commands to the command groups they belong to (`volume attachments`,
// `host fence`), so that the files building those groups need no change.
func (a *app) addAttachmentCmds(root *cobra.Command) {
	for _, c := range root.Commands() {
		switch c.Name() {
		case "volume":
			c.AddCommand(a.volumeAttachmentsCmd())
		case "host":
			c.AddCommand(a.hostFenceCmd())
		}
	}
}

func (a *app) attachments(ctx context.Context, fn func(context.Context, basaltv1.AttachmentServiceClient) error) error {
	return a.call(ctx, func(ctx context.Context, c *grpc.ClientConn) error {
		return fn(ctx, basaltv1.NewAttachmentServiceClient(c))
	})
}

func (a *app) volumeAttachmentsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "attachments [VOLUME]",
		Short: "List which hosts volumes are attached to, with their generations",
		Long: `Lists the attachments of one volume, or of every volume. A host writes an attached volume through the NBD export
VOLUME?generation=N; writes with any other generation are refused (an exclusive volume has one writer). An
incoming attachment belongs to a live migration's destination and accepts writes only after the switchover.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("%s takes at most one volume name (see '%s --help')", cmd.CommandPath(), cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &basaltv1.ListAttachmentsRequest{}
			if len(args) == 1 {
				req.Volume = args[0]
			}
			var resp *basaltv1.ListAttachmentsResponse
			err := a.attachments(cmd.Context(), func(ctx context.Context, c basaltv1.AttachmentServiceClient) (err error) {
				resp, err = c.ListAttachments(ctx, req)
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "VOLUME\tHOST\tGENERATION\tMODE\tAGE")
				for _, at := range resp.GetAttachments() {
					mode := "shared"
					if at.GetExclusive() {
						mode = "exclusive"
					}
					if at.GetIncoming() {
						mode += ", incoming"
					}
					fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", at.GetVolume(), at.GetHost(), at.GetGeneration(), mode, age(time.Since(at.GetAttachedAt().AsTime())))
				}
			})
		},
	}
}

func (a *app) hostFenceCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "fence HOST",
		Short: "Take every volume attachment away from a host, so that it can never write them again",
		Long: `Fences a host: every volume attached to it gets a new attachment generation and loses the host's attachment,
and the command returns once every storage node that is up refuses the host's writes. Use it before restarting
a failed host's VMs elsewhere. The host's VMs see their disk writes fail (QEMU pauses them).`,
		Args: exactArgs(1, "one host (node ID)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var resp *basaltv1.FenceHostResponse
			err := a.attachments(cmd.Context(), func(ctx context.Context, c basaltv1.AttachmentServiceClient) (err error) {
				resp, err = c.FenceHost(ctx, &basaltv1.FenceHostRequest{Host: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.print(resp, nil)
			}
			vols := "no volumes"
			if len(resp.GetVolumes()) > 0 {
				vols = "volumes " + strings.Join(resp.GetVolumes(), ", ")
			}
			_, err = fmt.Fprintf(a.out, "host %s fenced: %s; every storage node up enforces it (etcd revision %d)\n", args[0], vols, resp.GetRevision())
			return err
		},
	}
}
