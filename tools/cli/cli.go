// Package cli is the `basalt` command line for cluster admins: every command is a thin client of the public
// gRPC API (proto/basalt/v1) served by metad, plus `basalt up`, which runs a whole local cluster. Read commands
// print a table, or the API's own message as JSON with --output json. It depends on the API types,
// tools/clientconfig and tools/up; it never imports a daemon's internals.
package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/basalt-hv/basalt/tools/clientconfig"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// app holds what every command shares: global flags and the output streams.
type app struct {
	endpoint string
	output   string
	timeout  time.Duration
	out      io.Writer
	errOut   io.Writer
}

// Execute runs the CLI with args and returns the process exit code. Errors are printed as one line.
func Execute(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{out: stdout, errOut: stderr}
	root := a.root()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "basalt: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			return 2
		}
		return 1
	}
	return 0
}

// usageError marks errors in how the command was called (exit code 2).
type usageError struct{ error }

func (a *app) root() *cobra.Command {
	root := &cobra.Command{
		Use:   "basalt",
		Short: "Administer a Basalt cluster",
		Long: `basalt administers a Basalt cluster: a distributed, replicated block store with VMs and virtual
networks on top.

'basalt up' runs a whole cluster on this machine. Every other command talks to a metad API endpoint, taken
from --endpoint, else $BASALT_ENDPOINT, else the client config that 'basalt up' writes
($XDG_CONFIG_HOME/basalt/config), else ` + clientconfig.DefaultEndpoint + `.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&a.endpoint, "endpoint", "", "metad API address host:port (default: $BASALT_ENDPOINT, the client config, "+clientconfig.DefaultEndpoint+")")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", "table", "output format of read commands: table or json")
	root.PersistentFlags().DurationVar(&a.timeout, "timeout", 10*time.Second, "how long to wait for the API")
	root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if a.output != "table" && a.output != "json" {
			return usageError{fmt.Errorf("--output %q: want table or json", a.output)}
		}
		return nil
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%v (see '%s --help')", err, cmd.CommandPath())}
	})
	root.AddCommand(a.upCmd(), a.nodeCmd(), a.clusterCmd(), a.volumeCmd(), a.poolCmd(), a.netCmd(), a.portCmd(), a.versionCmd())
	root.AddCommand(a.checkpointCmd())
	root.AddCommand(a.backupCmd())
	root.AddCommand(a.vmCmd())
	root.AddCommand(a.hostCmd())
	a.addAttachmentCmds(root)
	// Unknown subcommands are usage errors too; cobra reports them from Args validation.
	root.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unknown command %q (see 'basalt --help')", args[0])}
		}
		return nil
	}
	root.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	return root
}

// exactArgs is cobra.ExactArgs with our usage-error type and a message naming what is expected.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s takes %s (see '%s --help')", cmd.CommandPath(), what, cmd.CommandPath())}
		}
		return nil
	}
}

// noArgs rejects positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments, got %q (see '%s --help')", cmd.CommandPath(), args[0], cmd.CommandPath())}
	}
	return nil
}

// conn dials the API endpoint. grpc dials lazily; connection errors surface from the first call.
func (a *app) conn() (*grpc.ClientConn, string, error) {
	path, err := clientconfig.Path()
	if err != nil {
		path = ""
	}
	ep, source, err := clientconfig.Resolve(a.endpoint, path)
	if err != nil {
		return nil, "", err
	}
	c, err := grpc.NewClient(ep, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, "", fmt.Errorf("endpoint %q (from %s): %w", ep, source, err)
	}
	return c, fmt.Sprintf("%s (from %s)", ep, source), nil
}

// call runs one API call with the timeout and turns gRPC errors into sentences.
func (a *app) call(ctx context.Context, fn func(context.Context, *grpc.ClientConn) error) error {
	c, where, err := a.conn()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	return explain(fn(ctx, c), where)
}

func explain(err error, where string) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Errorf("cannot reach metad at %s: %s (is the cluster running? try 'basalt up', or set --endpoint)", where, st.Message())
	case codes.DeadlineExceeded:
		return fmt.Errorf("metad at %s did not answer in time (raise --timeout?)", where)
	}
	return errors.New(st.Message())
}

// print writes m as JSON when --output json, else calls table.
func (a *app) print(m proto.Message, table func(w *tabwriter.Writer)) error {
	if a.output == "json" {
		b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode JSON: %w", err)
		}
		// protojson varies its whitespace on purpose; re-indenting gives scripts and humans stable output.
		var buf bytes.Buffer
		if err := json.Indent(&buf, b, "", "  "); err != nil {
			return fmt.Errorf("encode JSON: %w", err)
		}
		_, err = fmt.Fprintln(a.out, buf.String())
		return err
	}
	w := tabwriter.NewWriter(a.out, 0, 0, 2, ' ', 0)
	table(w)
	return w.Flush()
}

// age formats how long ago t was, coarsely.
func age(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}
