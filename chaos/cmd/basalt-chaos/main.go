// Command basalt-chaos runs the chaos suite (`make chaos`): every scenario of chaos/scenario on its own
// multi-host cluster in network namespaces, printing each one's timeline, bars and checks, then a summary; or,
// with --rounds N (`make chaos ROUNDS=N`), N randomized rounds of random faults on random hosts of one
// long-lived cluster, checked after each round. It needs root, QEMU and the binaries of `make build`. It exits
// 1 if anything failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/chaos/cluster"
	"github.com/basalt-hv/basalt/chaos/scenario"
	"github.com/basalt-hv/basalt/computed/testguest"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout))
}

func run(args []string, out io.Writer) int {
	fs := flag.NewFlagSet("basalt-chaos", flag.ContinueOnError)
	exe, _ := os.Executable()
	binDir := fs.String("bin-dir", filepath.Dir(exe), "directory of metad, blockd, computed and basalt-chaos-etcd")
	dir := fs.String("dir", filepath.Join(os.TempDir(), "basalt-chaos"), "run directory (a subdirectory per run; daemon and console logs are kept)")
	names := fs.String("scenarios", "", "comma-separated scenarios to run (default: all, or none with --rounds)")
	rounds := fs.Int("rounds", 0, "randomized rounds to run on one cluster")
	seed := fs.Uint64("seed", 0, "seed of the randomized rounds (0: random, printed)")
	list := fs.Bool("list", false, "list the scenarios and exit")
	verbose := fs.Bool("v", false, "log the harness's progress")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *list {
		for _, s := range scenario.All {
			fmt.Fprintf(out, "%-18s %s\n", s.Name, s.Doc)
		}
		return 0
	}
	var todo []scenario.Scenario
	switch {
	case *names == "" && *rounds > 0:
	case *names == "" || *names == "all":
		todo = scenario.All
	default:
		for _, n := range strings.Split(*names, ",") {
			s, ok := scenario.Named(strings.TrimSpace(n))
			if !ok {
				fmt.Fprintf(os.Stderr, "basalt-chaos: no scenario %q (see --list)\n", n)
				return 2
			}
			todo = append(todo, s)
		}
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if err := cluster.Check(); err != nil {
		fmt.Fprintf(os.Stderr, "basalt-chaos: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	guest, err := testguest.Build(ctx, testguest.Options{Logger: log})
	if err != nil {
		fmt.Fprintf(os.Stderr, "basalt-chaos: build the test guest: %v\n", err)
		return 1
	}
	runDir := filepath.Join(*dir, time.Now().Format("20060102-150405"))
	if err := os.MkdirAll(runDir, 0o750); err != nil {
		fmt.Fprintf(os.Stderr, "basalt-chaos: %v\n", err)
		return 1
	}
	fmt.Fprintf(out, "basalt-chaos: run directory %s\n", runDir)
	o := scenario.Options{Dir: runDir, BinDir: *binDir, EtcdBin: filepath.Join(*binDir, "basalt-chaos-etcd"), Guest: guest, Log: log}

	failed := false
	var reports []*scenario.Report
	for _, s := range todo {
		if ctx.Err() != nil {
			break
		}
		start := time.Now()
		r := scenario.Run(ctx, s, o)
		r.Print(out)
		fmt.Fprintf(out, "(%s in %s)\n", s.Name, time.Since(start).Round(time.Second))
		if r.Failed() {
			failed = true
			path := filepath.Join(runDir, s.Name, "failure-logs.txt")
			if err := os.WriteFile(path, []byte(r.Logs), 0o640); err == nil {
				fmt.Fprintf(out, "daemon log tails: %s (full logs next to it)\n", path)
			}
		}
		reports = append(reports, r)
	}
	if len(reports) > 0 {
		summary(out, reports)
	}
	if *rounds > 0 && ctx.Err() == nil {
		s, err := scenario.RunRounds(ctx, scenario.RoundsOptions{Options: o, Rounds: *rounds, Seed: *seed, Out: out})
		s.Print(out)
		if err != nil && !errors.Is(err, context.Canceled) {
			fmt.Fprintf(out, "randomized rounds stopped: %v\n", err)
			failed = true
		}
		failed = failed || s.Failed > 0
	}
	if ctx.Err() != nil {
		fmt.Fprintln(out, "interrupted")
		return 1
	}
	if failed {
		return 1
	}
	return 0
}

// summary prints one line per scenario and its bars.
func summary(w io.Writer, reports []*scenario.Report) {
	fmt.Fprintf(w, "\n=== summary\n")
	for _, r := range reports {
		verdict := "PASS"
		if r.Failed() {
			verdict = "FAIL"
		}
		fmt.Fprintf(w, "  %-4s %s\n", verdict, r.Scenario)
		for _, b := range r.Bars {
			fmt.Fprintf(w, "         bar %s\n", b)
		}
		for _, c := range r.Checks {
			if c.Err != nil {
				fmt.Fprintf(w, "         failed: %s\n", c.Name)
			}
		}
		if r.Err != nil {
			fmt.Fprintf(w, "         error: %s\n", firstLine(r.Err.Error()))
		}
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
