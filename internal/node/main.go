package node

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
)

// ParseFlags parses args on fs the way every Basalt daemon does: -h prints usage to stdout; a bad flag is one
// line on stderr. It returns false with the exit code when the program should stop.
func ParseFlags(fs *flag.FlagSet, args []string) (exit int, ok bool) {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.SetOutput(os.Stdout)
		fmt.Fprintf(os.Stdout, "Usage of %s:\n", fs.Name())
		fs.PrintDefaults()
		return 0, false
	case err != nil:
		fmt.Fprintf(os.Stderr, "%s: %v (see %s -h)\n", fs.Name(), err, fs.Name())
		return 2, false
	case fs.NArg() > 0:
		fmt.Fprintf(os.Stderr, "%s: unexpected argument %q (see %s -h)\n", fs.Name(), fs.Arg(0), fs.Name())
		return 2, false
	}
	return 0, true
}

// LogLevelFlag registers --log-level on fs and returns a function building the logger once flags are parsed.
func LogLevelFlag(fs *flag.FlagSet) func() *slog.Logger {
	var level slog.Level
	fs.TextVar(&level, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	return func() *slog.Logger {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	}
}

// SignalContext is cancelled by SIGINT or SIGTERM: the daemon's clean shutdown.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

// Daemon describes a daemon whose main is a node plus its own services.
type Daemon struct {
	Kind          basaltv1.NodeKind
	DefaultListen string
	// Flags registers the daemon's own flags; nil for none.
	Flags func(fs *flag.FlagSet)
	// ServerOptions are extra gRPC server options for the node's server.
	ServerOptions []grpc.ServerOption
	// Wire registers the daemon's services on the started node (before it registers in the cluster) and
	// returns what to release after the node stopped serving; nil for none.
	Wire func(ctx context.Context, n *Node) (cleanup func(), err error)
}

// Main is the whole main function of the daemon: flags, logging, start, serve until SIGINT/SIGTERM, one error
// line and a non-zero exit on failure.
func (d Daemon) Main(args []string) int {
	name := d.Kind.Name()
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	c := Config{Kind: d.Kind, ServerOptions: d.ServerOptions}
	c.Flags(fs, d.DefaultListen)
	if d.Flags != nil {
		d.Flags(fs)
	}
	logger := LogLevelFlag(fs)
	if code, ok := ParseFlags(fs, args); !ok {
		return code
	}
	log := logger()
	ctx, stop := SignalContext()
	defer stop()
	n, err := Start(ctx, c, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 1
	}
	cleanup := func() {}
	if d.Wire != nil {
		wctx, cancelWire := context.WithCancel(ctx)
		defer cancelWire()
		cl, err := d.Wire(wctx, n)
		if err != nil {
			cancelWire()
			n.release()
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			return 1
		}
		if cl != nil {
			cleanup = func() { cancelWire(); cl() }
		}
	}
	err = n.Serve(ctx)
	cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}
