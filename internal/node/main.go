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

// Main is the whole main function of a daemon that is a node plus the services wire registers (nil for none).
func Main(kind basaltv1.NodeKind, defaultListen string, args []string, wire func(context.Context, *Node) error) int {
	name := kind.Name()
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	c := Config{Kind: kind}
	c.Flags(fs, defaultListen)
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
	if wire != nil {
		if err := wire(ctx, n); err != nil {
			n.release()
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			return 1
		}
	}
	if err := n.Serve(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}
