package cli

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
)

func (a *app) volumeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "volume",
		Aliases: []string{"vol"},
		Short:   "Create, inspect, resize and delete block volumes",
		Long: `A volume is a thin, replicated block device. Creating one stores only its record, whatever its size; space
is used as data is written. Every blockd exports every volume over NBD (the export name is the volume name);
'basalt volume inspect' prints the URIs.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.volumeCreateCmd(), a.volumeListCmd(), a.volumeInspectCmd(), a.volumeResizeCmd(), a.volumeDeleteCmd(), a.volumeScrubCmd(),
		a.volumeFlattenCmd(), a.volumeCopyCmd())
	return cmd
}

func (a *app) volumes(ctx context.Context, fn func(context.Context, basaltv1.VolumeServiceClient) error) error {
	return a.call(ctx, func(ctx context.Context, c *grpc.ClientConn) error {
		return fn(ctx, basaltv1.NewVolumeServiceClient(c))
	})
}

func (a *app) volumeCreateCmd() *cobra.Command {
	var size, pool, from string
	var sector uint32
	var shared bool
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE | --from VOLUME@CHECKPOINT",
		Short: "Create a thin volume, or a linked clone of a checkpoint",
		Long: `Creates a thin volume: only its record is stored, whatever its size.

With --from, the volume is a linked clone of a checkpoint, created in constant time: it reads the checkpoint's
blocks until it writes its own, so a hundred clones of a template cost one template. Its size defaults to the
checkpoint's. 'basalt volume flatten' copies the shared blocks in and detaches it from its parent.`,
		Example: "  basalt volume create disk0 --size 20G\n  basalt volume create quorum --size 1G --shared --pool two-copies\n" +
			"  basalt volume create vm7-boot --from golden@v3",
		Args: exactArgs(1, "one volume name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var n uint64
			if size == "" && from == "" {
				return usageError{fmt.Errorf("give the volume a --size, or make it a clone with --from VOLUME@CHECKPOINT")}
			}
			if size != "" {
				var err error
				if n, err = parseSize(size); err != nil {
					return usageError{fmt.Errorf("--size: %w", err)}
				}
			}
			if !cmd.Flags().Changed("sector-size") && from != "" {
				sector = 0 // the parent's
			}
			var v *basaltv1.Volume
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				v, err = c.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: args[0], SizeBytes: n, SectorSize: sector, Shared: shared, Pool: pool, Source: from})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "volume %s created: %s, %d replicas (pool %s), %d-byte sectors", v.GetName(), sizeString(v.GetSizeBytes()), v.GetReplicas(), v.GetPool(), v.GetSectorSize())
			if p := v.GetParent(); p != nil {
				fmt.Fprintf(a.out, ", linked clone of %s@%s", p.GetVolume(), p.GetCheckpoint())
			}
			fmt.Fprintln(a.out)
			return nil
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "create a linked clone of this checkpoint (VOLUME@CHECKPOINT)")
	cmd.Flags().StringVar(&size, "size", "", "size, in bytes or with a unit: 512M, 20G, 1T, 1P (binary units)")
	cmd.Flags().StringVar(&pool, "pool", "", "pool to create the volume in (default \"default\": 3 copies)")
	cmd.Flags().Uint32Var(&sector, "sector-size", 512, "logical sector size: 512 or 4096")
	cmd.Flags().BoolVar(&shared, "shared", false, "allow several attachments at once (guest clusters)")
	return cmd
}

func (a *app) volumeFlattenCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "flatten NAME",
		Short: "Copy into a linked clone the blocks it shares with its parent, online, and detach it",
		Long: `Copies, inside the cluster, every block the clone still reads from its parent checkpoint, while the clone stays
in use, then detaches it: the parent checkpoint may then be deleted. Interrupted, it is simply run again.`,
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) error {
				_, err := c.FlattenVolume(ctx, &basaltv1.FlattenVolumeRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "volume %s flattened in %s\n", args[0], time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
}

func (a *app) volumeCopyCmd() *cobra.Command {
	var create bool
	var pool, srcOff, dstOff, length string
	cmd := &cobra.Command{
		Use:   "copy SOURCE DESTINATION",
		Short: "Copy a volume, a checkpoint or a range inside the cluster (offloaded copy)",
		Long: `Copies without the data passing through this machine. SOURCE is VOLUME or VOLUME@CHECKPOINT.

With --create, DESTINATION is a new volume with the source's content: a linked clone of the checkpoint (of a
temporary one for a VOLUME), flattened by the storage nodes. Without it, a range of the source is copied onto the
existing DESTINATION (--source-offset, --destination-offset, --length; holes stay holes).`,
		Example: "  basalt volume copy golden@v3 vm8-boot --create\n  basalt volume copy disk0 disk1 --source-offset 1G --destination-offset 0 --length 512M",
		Args:    exactArgs(2, "a source and a destination"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &basaltv1.CopyVolumeRequest{Source: args[0], Destination: args[1], Create: create, Pool: pool}
			for _, f := range []struct {
				name, val string
				dst       *uint64
			}{{"source-offset", srcOff, &req.SourceOffset}, {"destination-offset", dstOff, &req.DestinationOffset}, {"length", length, &req.Length}} {
				if f.val == "" {
					continue
				}
				n, err := parseSizeOrZero(f.val)
				if err != nil {
					return usageError{fmt.Errorf("--%s: %w", f.name, err)}
				}
				*f.dst = n
			}
			start := time.Now()
			var resp *basaltv1.CopyVolumeResponse
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				resp, err = c.CopyVolume(ctx, req)
				return err
			})
			if err != nil {
				return err
			}
			took := time.Since(start)
			fmt.Fprintf(a.out, "copied %s of data in %s (%.0f MB/s)\n", sizeString(resp.GetBytesCopied()), took.Round(time.Millisecond), float64(resp.GetBytesCopied())/took.Seconds()/1e6)
			return nil
		},
	}
	cmd.Flags().BoolVar(&create, "create", false, "create DESTINATION as a full copy of SOURCE")
	cmd.Flags().StringVar(&pool, "pool", "", "pool of a created destination (default: the source's)")
	cmd.Flags().StringVar(&srcOff, "source-offset", "", "first byte of the source range (with a unit, e.g. 1G)")
	cmd.Flags().StringVar(&dstOff, "destination-offset", "", "where the range goes in the destination")
	cmd.Flags().StringVar(&length, "length", "", "bytes to copy (default: to the end of the source)")
	return cmd
}

// parseSizeOrZero is parseSize that also accepts 0.
func parseSizeOrZero(s string) (uint64, error) {
	if strings.TrimSpace(s) == "0" {
		return 0, nil
	}
	return parseSize(s)
}

func (a *app) volumeListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListVolumesResponse
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				resp, err = c.ListVolumes(ctx, &basaltv1.ListVolumesRequest{})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NAME\tSIZE\tPOOL\tREPLICAS\tSECTOR\tSHARED\tAGE")
				for _, v := range resp.GetVolumes() {
					fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%v\t%s\n", v.GetName(), sizeString(v.GetSizeBytes()), v.GetPool(),
						v.GetReplicas(), v.GetSectorSize(), v.GetShared(), age(time.Since(v.GetCreatedAt().AsTime())))
				}
			})
		},
	}
}

func (a *app) volumeInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "inspect NAME",
		Aliases:           []string{"status"},
		Short:             "Show a volume: size, replicas and their health, recovery progress, and the NBD URIs to attach it with",
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			var st *basaltv1.VolumeStatus
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				st, err = c.GetVolumeStatus(ctx, &basaltv1.GetVolumeRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(st, func(w *tabwriter.Writer) {
				v := st.GetVolume()
				fmt.Fprintf(w, "Name:\t%s (id %d)\n", v.GetName(), v.GetId())
				fmt.Fprintf(w, "Size:\t%s (%d bytes), %d-byte sectors\n", sizeString(v.GetSizeBytes()), v.GetSizeBytes(), v.GetSectorSize())
				fmt.Fprintf(w, "Pool:\t%s, %d replicas\n", v.GetPool(), v.GetReplicas())
				fmt.Fprintf(w, "Shared:\t%v\n", v.GetShared())
				fmt.Fprintf(w, "Created:\t%s\n", v.GetCreatedAt().AsTime().Local().Format(time.RFC3339))
				if p := v.GetParent(); p != nil {
					fmt.Fprintf(w, "Linked clone of:\t%s@%s (flatten with 'basalt volume flatten %s')\n", p.GetVolume(), p.GetCheckpoint(), v.GetName())
				}
				if cs := v.GetCheckpoints(); len(cs) > 0 {
					var names []string
					for _, c := range cs {
						names = append(names, c.GetName())
					}
					fmt.Fprintf(w, "Checkpoints:\t%s (NBD exports %s@NAME, read-only)\n", strings.Join(names, ", "), v.GetName())
				}
				health := "healthy"
				switch {
				case st.GetPgsUnavailable() > 0:
					health = "UNAVAILABLE"
				case st.GetPgsDegraded() > 0:
					health = "degraded"
				}
				fmt.Fprintf(w, "Health:\t%s: %d placement groups, %d healthy, %d degraded, %d unavailable (map epoch %d)\n", health,
					st.GetPgsTotal(), st.GetPgsHealthy(), st.GetPgsDegraded(), st.GetPgsUnavailable(), st.GetEpoch())
				if st.GetPgsRecovering() > 0 {
					pct := 100 * float64(st.GetObjectsRecovered()) / float64(max(st.GetObjectsToRecover(), 1))
					fmt.Fprintf(w, "Recovery:\t%d placement groups, %d of %d objects copied (%.0f%%)\n", st.GetPgsRecovering(),
						st.GetObjectsRecovered(), st.GetObjectsToRecover(), pct)
				} else {
					fmt.Fprintf(w, "Recovery:\tnone in progress\n")
				}
				fmt.Fprintln(w, "Replicas:")
				fmt.Fprintln(w, "  NODE\tDOMAIN\tSTATE\tPGS\tPRIMARY")
				for _, n := range st.GetNodes() {
					state := "up"
					switch {
					case !n.GetIn():
						state = "out"
					case !n.GetUp():
						state = "down"
					}
					fmt.Fprintf(w, "  %s\t%s\t%s\t%d\t%d\n", n.GetId(), n.GetFailureDomain(), state, n.GetPgs(), n.GetPrimaryPgs())
				}
				if len(st.GetNodes()) == 0 {
					fmt.Fprintln(w, "  (no storage node is in the cluster map yet)")
				}
				fmt.Fprintln(w, "Attach with:")
				for _, u := range st.GetNbdUris() {
					fmt.Fprintf(w, "  %s\n", u)
				}
				if len(st.GetNbdUris()) == 0 {
					fmt.Fprintln(w, "  (no blockd serving NBD is up)")
				}
			})
		},
	}
}

func (a *app) volumeResizeCmd() *cobra.Command {
	var size string
	var force bool
	cmd := &cobra.Command{
		Use:   "resize NAME --size SIZE",
		Short: "Grow or shrink a volume online",
		Long: `resize changes a volume's size while it stays attached. Connected NBD clients see the new size when they
reconnect. A shrink that would cut written data (or that cannot be checked, because a storage node is down)
needs --force; the data past the new end is then discarded.`,
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return usageError{fmt.Errorf("--size: %w", err)}
			}
			var v *basaltv1.Volume
			err = a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				v, err = c.ResizeVolume(ctx, &basaltv1.ResizeVolumeRequest{Name: args[0], SizeBytes: n, Force: force})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "volume %s is now %s\n", v.GetName(), sizeString(v.GetSizeBytes()))
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "new size, in bytes or with a unit: 512M, 20G, 1T")
	cmd.Flags().BoolVar(&force, "force", false, "shrink even if that discards data written past the new end")
	cmd.MarkFlagRequired("size")
	return cmd
}

func (a *app) volumeDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "delete NAME",
		Short:             "Delete a volume and its data",
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) error {
				_, err := c.DeleteVolume(ctx, &basaltv1.DeleteVolumeRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "volume %s deleted\n", args[0])
			return nil
		},
	}
}

func (a *app) volumeScrubCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "scrub NAME",
		Short: "Verify every copy of every block of a volume, and repair bad copies from good ones",
		Long: `scrub reads every block of every copy of the volume, checks it against its stored checksum, compares each
member's copy of every object with the primary's, and replaces bad copies with good ones. Every blockd also
scrubs everything in the background (blockd --scrub-interval).`,
		Args:              exactArgs(1, "one volume name"),
		ValidArgsFunction: a.completeVolumes,
		RunE: func(cmd *cobra.Command, args []string) error {
			a.timeout = timeout
			fmt.Fprintf(a.errOut, "scrubbing %s...\n", args[0])
			var res *basaltv1.ScrubVolumeResponse
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				res, err = c.ScrubVolume(ctx, &basaltv1.ScrubVolumeRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			if err := a.print(res, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "Scrubbed:\t%d objects in %d placement groups on %d nodes\n", res.GetObjects(), res.GetPgs(), res.GetNodes())
				fmt.Fprintf(w, "Corrupt copies:\t%d\n", res.GetCorrupt())
				fmt.Fprintf(w, "Mismatched copies:\t%d\n", res.GetMismatched())
				fmt.Fprintf(w, "Repaired:\t%d\n", res.GetRepaired())
				fmt.Fprintf(w, "Unrepaired:\t%d\n", res.GetUnrepaired())
				for _, e := range res.GetErrors() {
					fmt.Fprintf(w, "Not asked:\t%s\n", e)
				}
			}); err != nil {
				return err
			}
			if res.GetUnrepaired() > 0 {
				return fmt.Errorf("%d bad copies could not be repaired: no good copy was found (see the blockd logs)", res.GetUnrepaired())
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", time.Hour, "how long the scrub may take")
	return cmd
}

func (a *app) completeVolumes(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) error {
		resp, err := c.ListVolumes(ctx, &basaltv1.ListVolumesRequest{})
		for _, v := range resp.GetVolumes() {
			names = append(names, v.GetName())
		}
		return err
	})
	return names, cobra.ShellCompDirectiveNoFileComp
}

func (a *app) poolCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pool",
		Short: "Create, list and delete pools (replication policies)",
		Long: `A pool says how many copies of every block to keep (1 to 5, each in a different failure domain) and over
how many placement groups to spread them. Every cluster has the pool "default" with 3 copies.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	var replicas, pgs uint32
	create := &cobra.Command{
		Use:     "create NAME --replicas N",
		Short:   "Create a pool",
		Example: "  basalt pool create two-copies --replicas 2",
		Args:    exactArgs(1, "one pool name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var p *basaltv1.Pool
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				p, err = c.CreatePool(ctx, &basaltv1.CreatePoolRequest{Name: args[0], Replicas: replicas, PgCount: pgs})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "pool %s created: %d replicas, %d placement groups\n", p.GetName(), p.GetReplicas(), p.GetPgCount())
			return nil
		},
	}
	create.Flags().Uint32Var(&replicas, "replicas", 3, "copies of every block (1 to 5)")
	create.Flags().Uint32Var(&pgs, "pgs", 0, "placement groups (default 64)")
	list := &cobra.Command{
		Use:   "list",
		Short: "List pools",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListPoolsResponse
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) (err error) {
				resp, err = c.ListPools(ctx, &basaltv1.ListPoolsRequest{})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NAME\tID\tREPLICAS\tPGS")
				for _, p := range resp.GetPools() {
					fmt.Fprintf(w, "%s\t%d\t%d\t%d\n", p.GetName(), p.GetId(), p.GetReplicas(), p.GetPgCount())
				}
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a pool that holds no volumes",
		Args:  exactArgs(1, "one pool name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.volumes(cmd.Context(), func(ctx context.Context, c basaltv1.VolumeServiceClient) error {
				_, err := c.DeletePool(ctx, &basaltv1.DeletePoolRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "pool %s deleted\n", args[0])
			return nil
		},
	}
	cmd.AddCommand(create, list, del)
	return cmd
}

// parseSize reads a byte count with an optional binary unit: 4096, 512K, 20G, 1.5T, 1PiB.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	if t == "" {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	mult := uint64(1)
	if i := strings.IndexAny(t, "KMGTPE"); i >= 0 {
		if i != len(t)-1 {
			return 0, fmt.Errorf("%q is not a size (want a number and one unit: K, M, G, T, P, E)", s)
		}
		mult = 1 << (10 * (strings.IndexByte("KMGTPE", t[i]) + 1))
		t = t[:i]
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f <= 0 {
		return 0, fmt.Errorf("%q is not a positive size", s)
	}
	v := f * float64(mult)
	if v >= 1<<63 {
		return 0, fmt.Errorf("%q is too large", s)
	}
	if v != float64(uint64(v)) {
		return 0, fmt.Errorf("%q is not a whole number of bytes", s)
	}
	return uint64(v), nil
}

// sizeString formats a byte count with the largest binary unit that divides it evenly.
func sizeString(n uint64) string {
	units := "KMGTPE"
	for i := len(units); i > 0; i-- {
		if m := uint64(1) << (10 * i); n >= m && n%m == 0 {
			return fmt.Sprintf("%d%ciB", n/m, units[i-1])
		}
	}
	return fmt.Sprintf("%d B", n)
}
