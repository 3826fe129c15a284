package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/basalt-hv/basalt/tools/backup"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func (a *app) backupCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "backup",
		Short: "Back volumes up to a directory, incrementally, and restore them",
		Long: `Backs volumes up into a plain directory (a local disk, an NFS mount...) that needs no cluster to be read, and
restores them from it.

A backup is a chain of points per volume: the first is full (everything allocated), the next ones incremental
(only what changed since the point before, found by changed-block tracking between checkpoints, without
reading the rest of the volume). Each point is checksummed (SHA-256 of its data and of its description,
point.json), and written so that an interrupted backup never leaves a point that looks complete. Any point can
be restored into a new volume. DIR/README.txt lists what a directory holds; docs/backup.md describes the
format.

Every backup takes a checkpoint named backup-<UTC time> of its volumes. The newest one is kept: the next
incremental backup starts from it. Older backup checkpoints are deleted once the new point is safely written.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.backupCreateCmd(), a.backupListCmd(), a.backupVerifyCmd(), a.backupRestoreCmd())
	return cmd
}

// interruptible makes Ctrl-C (or SIGTERM) cancel ctx instead of killing the process, so that a backup
// deletes the checkpoint it took and a restore deletes the volume it created.
func interruptible(ctx context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
}

// backupAPI dials metad for a long operation: no --timeout on the whole, since reading or writing a large
// volume takes as long as it takes.
func (a *app) backupAPI() (backup.API, func(), string, error) {
	c, where, err := a.conn()
	if err != nil {
		return backup.API{}, nil, "", err
	}
	return backup.NewAPI(c), func() { c.Close() }, where, nil
}

// apiFailure turns an unreachable metad into the same sentence as the other commands.
func apiFailure(err error, where string) error {
	if status.Code(err) == codes.Unavailable {
		return fmt.Errorf("cannot reach metad at %s: %v (is the cluster running? try 'basalt up', or set --endpoint)", where, err)
	}
	return err
}

func (a *app) backupCreateCmd() *cobra.Command {
	var full, progress bool
	var nbdURI string
	cmd := &cobra.Command{
		Use:   "create DIR VOLUME [VOLUME...]",
		Short: "Back volumes up into DIR: a full point the first time, incremental ones afterwards",
		Long: `Checkpoints the volumes at one instant (several volumes make a consistency group: a VM's disks backed up
together), then writes one point per volume into DIR/VOLUME/:

  - incremental, when the volume has a backup in DIR whose checkpoint still exists: only the extents written
    or trimmed since that checkpoint are read;
  - full otherwise, or with --full: every allocated extent is read (holes are not).

Once the new points are on disk (fsynced), the previous backup checkpoint of each volume is deleted: only the
newest backup checkpoint of a volume is kept, as the base of the next incremental point. So back a volume up
into one directory only, or each run into another directory will have to be --full.

If the backup fails or is interrupted, no point is written and the checkpoint it took is deleted; the
previous one stays. Leftovers of a run that was killed are removed by the next one.`,
		Example: "  basalt backup create /backups disk0\n  basalt backup create /backups vm1-boot vm1-data      # one consistency group\n" +
			"  basalt backup create /backups disk0 --full               # start a new chain",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError{fmt.Errorf("%s takes a directory and at least one volume (see '%s --help')", cmd.CommandPath(), cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			api, closeAPI, where, err := a.backupAPI()
			if err != nil {
				return err
			}
			defer closeAPI()
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			start := time.Now()
			res, err := backup.Create(ctx, api, args[0], args[1:], backup.CreateOptions{Full: full, NBDURI: nbdURI, Progress: a.progress(progress)})
			if res != nil {
				for _, w := range res.Warnings {
					fmt.Fprintf(a.errOut, "basalt: warning: %s\n", w)
				}
			}
			if err != nil {
				return apiFailure(err, where)
			}
			took := time.Since(start)
			return a.printValue(createOutput(res, took), func(w *tabwriter.Writer) {
				for _, l := range res.RemovedLeftovers {
					fmt.Fprintf(w, "removed %s, left by an interrupted backup\n", l)
				}
				fmt.Fprintln(w, "VOLUME\tPOINT\tKIND\tVOLUME SIZE\tREAD\tSTORED")
				var read uint64
				for _, p := range res.Points {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s (%.2f%%)\t%s\n", p.Volume, p.Name, p.Kind, humanBytes(p.SizeBytes), humanBytes(p.BytesRead),
						100*float64(p.BytesRead)/float64(p.SizeBytes), humanBytes(p.DataBytes))
					read += p.BytesRead
				}
				for _, d := range res.DeletedCheckpoints {
					fmt.Fprintf(w, "deleted the previous backup checkpoint %s\n", d)
				}
				fmt.Fprintf(w, "read %s in %s (%s/s)\n", humanBytes(read), took.Round(time.Millisecond), humanBytes(uint64(float64(read)/took.Seconds())))
			})
		},
	}
	cmd.Flags().BoolVar(&full, "full", false, "make full points even if incremental ones are possible (starts new chains)")
	cmd.Flags().StringVar(&nbdURI, "nbd-uri", "", "read through this blockd: nbd://HOST:PORT or nbd+unix:///?socket=PATH (default: one the volume's status lists, a local socket first)")
	cmd.Flags().BoolVar(&progress, "progress", false, "show progress on stderr even when it is not a terminal")
	return cmd
}

func (a *app) backupListCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "list DIR",
		Short:   "List the backup points in DIR, oldest first",
		Long:    `Lists every volume's points, checking each point's description (point.json) but not its data: 'basalt backup verify' reads everything.`,
		Example: "  basalt backup list /backups",
		Args:    exactArgs(1, "a backup directory"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ls, err := backup.List(args[0])
			if err != nil {
				return err
			}
			return a.printValue(listOutput(ls), func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "VOLUME\tPOINT\tKIND\tTAKEN\tVOLUME SIZE\tSTORED\tBASE\tGROUP")
				for _, l := range ls {
					for _, p := range l.Points {
						base := p.Base
						if base == "" {
							base = "-"
						}
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Volume, p.Name, p.Kind, p.Created.Local().Format("2006-01-02 15:04:05"),
							humanBytes(p.SizeBytes), humanBytes(p.DataBytes), base, strings.Join(p.Group, ","))
					}
					for _, d := range l.Damaged {
						fmt.Fprintf(w, "%s\t%s\tDAMAGED\t%v\n", l.Volume, d.Name, d.Err)
					}
					for _, lo := range l.Leftovers {
						fmt.Fprintf(w, "%s\t%s\tleftover of an interrupted backup (ignored; the next backup removes it)\n", l.Volume, lo)
					}
				}
			})
		},
	}
}

func (a *app) backupVerifyCmd() *cobra.Command {
	var progress bool
	cmd := &cobra.Command{
		Use:   "verify DIR [VOLUME [POINT]]",
		Short: "Check backup points: every checksum, every extent and every link of their chains",
		Long: `Reads every point (of every volume, of one volume, or one point and the points it is based on) and checks
its description against its own checksum, its extents (sorted, in range, aligned, not overlapping, adding up
to the data size), the link to its base point, and its data's size and SHA-256. No cluster is needed. Exits
with status 1 if anything is wrong, naming the file and what is wrong with it.

POINT is a point's directory name, its checkpoint name, or its number.`,
		Example: "  basalt backup verify /backups\n  basalt backup verify /backups disk0 3",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 3 {
				return usageError{fmt.Errorf("%s takes a directory, optionally a volume and a point (see '%s --help')", cmd.CommandPath(), cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			args = append(args, "", "")
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			res, err := backup.Verify(ctx, args[0], args[1], args[2], a.progress(progress))
			if res == nil {
				return err
			}
			if perr := a.printValue(verifyOutput(res), func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "VOLUME\tPOINT\tKIND\tSTORED\tRESULT")
				for _, c := range res.Points {
					result := "ok"
					if c.Err != nil {
						result = c.Err.Error()
					}
					kind := c.Kind
					if kind == "" {
						kind = "?"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", c.Volume, c.Point, kind, humanBytes(c.DataBytes), result)
				}
				for _, lo := range res.Leftovers {
					fmt.Fprintf(w, "ignored %s: leftover of an interrupted backup\n", lo)
				}
			}); perr != nil {
				return perr
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&progress, "progress", false, "show progress on stderr even when it is not a terminal")
	return cmd
}

func (a *app) backupRestoreCmd() *cobra.Command {
	var point, to, nbdURI, pool string
	var progress bool
	cmd := &cobra.Command{
		Use:   "restore DIR VOLUME --to NEWVOLUME [--point POINT]",
		Short: "Restore a backup point of VOLUME into a new volume",
		Long: `Creates NEWVOLUME with the size and sector size VOLUME had at the point, and writes into it the point's full
base and every incremental point up to it, in order, through a blockd's NBD export. The point defaults to the
newest; --point takes a point's directory name, its checkpoint name, or its number (see 'basalt backup list').

Every point of the chain is verified (checksums and links) before anything is created. If anything fails
afterwards, or the restore is interrupted, NEWVOLUME is deleted: a volume is either fully restored or absent.
NEWVOLUME must not exist.`,
		Example: "  basalt backup restore /backups disk0 --to disk0-restored\n  basalt backup restore /backups disk0 --point 3 --to disk0-tuesday",
		Args:    exactArgs(2, "a backup directory and the volume whose backup to restore"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usageError{fmt.Errorf("name the new volume to restore into with --to NEWVOLUME (a restore never overwrites a volume)")}
			}
			api, closeAPI, where, err := a.backupAPI()
			if err != nil {
				return err
			}
			defer closeAPI()
			ctx, stop := interruptible(cmd.Context())
			defer stop()
			start := time.Now()
			res, err := backup.Restore(ctx, api, args[0], args[1], to, backup.RestoreOptions{Point: point, Pool: pool, NBDURI: nbdURI, Progress: a.progress(progress)})
			if err != nil {
				return apiFailure(err, where)
			}
			took := time.Since(start)
			var chain []string
			for _, p := range res.Chain {
				chain = append(chain, p.Name)
			}
			out := restoreOutput{Volume: res.Volume, From: args[1], Point: res.Point.Name, Chain: chain, SizeBytes: res.Point.SizeBytes,
				BytesWritten: res.BytesWritten, BytesZeroed: res.BytesZeroed, Seconds: took.Seconds()}
			return a.printValue(out, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "restored point %s of %s into the new volume %s (%s)\n", res.Point.Name, args[1], res.Volume, humanBytes(res.Point.SizeBytes))
				fmt.Fprintf(w, "points applied:\t%s\n", strings.Join(chain, " → "))
				fmt.Fprintf(w, "written:\t%s, zeroed %s, in %s (%s/s)\n", humanBytes(res.BytesWritten), humanBytes(res.BytesZeroed), took.Round(time.Millisecond),
					humanBytes(uint64(float64(res.BytesWritten)/took.Seconds())))
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "name of the new volume to restore into (required; it must not exist)")
	cmd.Flags().StringVar(&point, "point", "", "point to restore: directory name, checkpoint name or number (default: the newest)")
	cmd.Flags().StringVar(&pool, "pool", "", "pool of the new volume (default \"default\")")
	cmd.Flags().StringVar(&nbdURI, "nbd-uri", "", "write through this blockd: nbd://HOST:PORT or nbd+unix:///?socket=PATH (default: one the new volume's status lists, a local socket first)")
	cmd.Flags().BoolVar(&progress, "progress", false, "show progress on stderr even when it is not a terminal")
	return cmd
}

// printValue writes v as JSON when --output json, else calls table. The backup commands' results are not API
// messages, so a.print does not apply.
func (a *app) printValue(v any, table func(w *tabwriter.Writer)) error {
	if a.output == "json" {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("encode JSON: %w", err)
		}
		_, err = fmt.Fprintln(a.out, string(b))
		return err
	}
	w := tabwriter.NewWriter(a.out, 0, 0, 2, ' ', 0)
	table(w)
	return w.Flush()
}

// JSON shapes of the backup commands' results.

type pointOutput struct {
	Volume     string    `json:"volume"`
	Point      string    `json:"point"`
	Checkpoint string    `json:"checkpoint"`
	Kind       string    `json:"kind"`
	Base       string    `json:"base,omitempty"`
	Group      []string  `json:"group"`
	Created    time.Time `json:"created"`
	SizeBytes  uint64    `json:"size_bytes"`
	BytesRead  uint64    `json:"bytes_read"`
	DataBytes  uint64    `json:"data_bytes"`
}

func pointOut(p *backup.Point) pointOutput {
	return pointOutput{Volume: p.Volume, Point: p.Name, Checkpoint: p.Checkpoint, Kind: p.Kind, Base: p.Base, Group: p.Group,
		Created: p.Created, SizeBytes: p.SizeBytes, BytesRead: p.BytesRead, DataBytes: p.DataBytes}
}

type createResult struct {
	Checkpoint         string        `json:"checkpoint"`
	Points             []pointOutput `json:"points"`
	DeletedCheckpoints []string      `json:"deleted_checkpoints"`
	RemovedLeftovers   []string      `json:"removed_leftovers"`
	Warnings           []string      `json:"warnings"`
	Seconds            float64       `json:"seconds"`
}

func createOutput(res *backup.CreateResult, took time.Duration) createResult {
	out := createResult{Checkpoint: res.Checkpoint, DeletedCheckpoints: res.DeletedCheckpoints, RemovedLeftovers: res.RemovedLeftovers,
		Warnings: res.Warnings, Seconds: took.Seconds()}
	for _, p := range res.Points {
		out.Points = append(out.Points, pointOut(p))
	}
	return out
}

type listVolume struct {
	Volume    string          `json:"volume"`
	Points    []pointOutput   `json:"points"`
	Damaged   []damagedOutput `json:"damaged,omitempty"`
	Leftovers []string        `json:"leftovers,omitempty"`
}

type damagedOutput struct {
	Point string `json:"point"`
	Error string `json:"error"`
}

func listOutput(ls []*backup.Listing) map[string][]listVolume {
	out := []listVolume{}
	for _, l := range ls {
		v := listVolume{Volume: l.Volume, Points: []pointOutput{}, Leftovers: l.Leftovers}
		for _, p := range l.Points {
			v.Points = append(v.Points, pointOut(p))
		}
		for _, d := range l.Damaged {
			v.Damaged = append(v.Damaged, damagedOutput{Point: d.Name, Error: d.Err.Error()})
		}
		out = append(out, v)
	}
	return map[string][]listVolume{"volumes": out}
}

type checkedOutput struct {
	Volume    string `json:"volume"`
	Point     string `json:"point"`
	Kind      string `json:"kind,omitempty"`
	DataBytes uint64 `json:"data_bytes"`
	OK        bool   `json:"ok"`
	Error     string `json:"error,omitempty"`
}

func verifyOutput(res *backup.VerifyResult) map[string]any {
	points := []checkedOutput{}
	for _, c := range res.Points {
		o := checkedOutput{Volume: c.Volume, Point: c.Point, Kind: c.Kind, DataBytes: c.DataBytes, OK: c.Err == nil}
		if c.Err != nil {
			o.Error = c.Err.Error()
		}
		points = append(points, o)
	}
	return map[string]any{"points": points, "leftovers": res.Leftovers}
}

type restoreOutput struct {
	Volume       string   `json:"volume"`
	From         string   `json:"from"`
	Point        string   `json:"point"`
	Chain        []string `json:"chain"`
	SizeBytes    uint64   `json:"size_bytes"`
	BytesWritten uint64   `json:"bytes_written"`
	BytesZeroed  uint64   `json:"bytes_zeroed"`
	Seconds      float64  `json:"seconds"`
}

// humanBytes formats a byte count for people: 3.2 GiB.
func humanBytes(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/1024, 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, units[i])
}

// progress returns the progress display for long operations: a bar redrawn in place when stderr is a
// terminal, a line every few seconds when --progress asks for it elsewhere, nothing otherwise (scripts and
// logs do not want carriage returns).
func (a *app) progress(forced bool) backup.Progress {
	tty := isTerminal(a.errOut)
	if !tty && !forced {
		return nil
	}
	return &progressBar{w: a.errOut, tty: tty}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// progressBar draws "disk0: reading [#######.......] 52%  1.2 GiB / 2.3 GiB  310.2 MiB/s  ETA 4s".
type progressBar struct {
	w     io.Writer
	tty   bool
	phase string
	total int64
	done  int64
	start time.Time
	last  time.Time
}

func (p *progressBar) Begin(phase string, total int64) {
	p.phase, p.total, p.done, p.start, p.last = phase, total, 0, time.Now(), time.Time{}
	p.draw(false)
}

func (p *progressBar) Add(n int64) {
	p.done += n
	every := 200 * time.Millisecond
	if !p.tty {
		every = 5 * time.Second
	}
	if time.Since(p.last) >= every {
		p.draw(false)
	}
}

func (p *progressBar) End() { p.draw(true) }

func (p *progressBar) draw(final bool) {
	p.last = time.Now()
	elapsed := time.Since(p.start)
	pct := 100.0
	if p.total > 0 {
		pct = 100 * float64(p.done) / float64(p.total)
	}
	const width = 24
	filled := int(pct / 100 * width)
	bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
	rate := float64(p.done) / max(elapsed.Seconds(), 1e-3)
	line := fmt.Sprintf("%s [%s] %3.0f%%  %s / %s  %s/s", p.phase, bar, pct, humanBytes(uint64(p.done)), humanBytes(uint64(p.total)), humanBytes(uint64(rate)))
	if !final && rate > 0 && p.done < p.total {
		line += fmt.Sprintf("  ETA %s", time.Duration(float64(p.total-p.done)/rate*float64(time.Second)).Round(time.Second))
	} else if final {
		line += fmt.Sprintf("  in %s", elapsed.Round(time.Millisecond))
	}
	if p.tty {
		// \x1b[K clears what a longer previous line left.
		fmt.Fprintf(p.w, "\r%s\x1b[K", line)
		if final {
			fmt.Fprintln(p.w)
		}
		return
	}
	fmt.Fprintln(p.w, line)
}
