// Command basalt-migbench runs the live-migration benchmark of the qemu driver (computed/qemu/bench): test
// guests under memory load migrated on loopback, one and four at a time, with and without compression, and
// prints a Markdown table.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/computed/qemu/bench"
)

func main() {
	var opts bench.Options
	flag.IntVar(&opts.MemoryMiB, "memory", 512, "memory of each guest, MiB")
	flag.IntVar(&opts.LoadMiB, "load", 256, "memory each guest keeps dirtying, MiB")
	flag.IntVar(&opts.DirtyMiBps, "dirty-rate", 32, "how fast each guest dirties its load, MiB/s")
	flag.DurationVar(&opts.Warmup, "warmup", 5*time.Second, "how long the load runs before migrating")
	flag.DurationVar(&opts.MaxDowntime, "max-downtime", 0, "downtime limit per migration (0: QEMU's 300ms)")
	parallel := flag.String("parallel", "1,4", "comma-separated numbers of simultaneous migrations to run")
	compress := flag.String("compress", "both", "off, on or both")
	flag.StringVar(&opts.WorkDir, "dir", "", "scratch directory (default the system temp directory)")
	flag.StringVar(&opts.Driver.Accel, "accel", "", "force kvm or tcg (default: probe)")
	verbose := flag.Bool("v", false, "log progress")
	flag.Parse()

	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	var modes []bool
	switch *compress {
	case "off":
		modes = []bool{false}
	case "on":
		modes = []bool{true}
	case "both":
		modes = []bool{false, true}
	default:
		fmt.Fprintf(os.Stderr, "basalt-migbench: -compress must be off, on or both\n")
		os.Exit(2)
	}
	for _, p := range strings.Split(*parallel, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "basalt-migbench: bad -parallel %q\n", *parallel)
			os.Exit(2)
		}
		for _, c := range modes {
			opts.Scenarios = append(opts.Scenarios, bench.Scenario{Parallel: n, Compress: c})
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := bench.Run(ctx, opts)
	if len(rep.Results) > 0 {
		fmt.Print(bench.Table(rep))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "basalt-migbench: %v\n", err)
		os.Exit(1)
	}
}
