// Command basalt-netbench measures netd in network namespaces (see netd/netbench): the TCP throughput between
// two VMs on two hosts over VXLAN with every policy on, against a plain veth pair, and the time netd takes to
// converge a host with 1,000 ports. It prints a Markdown section for docs/benchmarks.md. Needs root and
// iperf3; every namespace it creates is deleted before it exits, also on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/netd/netbench"
	"github.com/basalt-hv/basalt/netd/netlab"
)

func main() {
	suites := flag.String("suites", "throughput,converge", "what to measure: throughput, converge")
	secs := flag.Int("seconds", 5, "seconds per iperf3 run")
	streams := flag.Int("streams", 1, "parallel TCP streams per iperf3 run")
	runs := flag.Int("runs", 3, "iperf3 runs per path (the median is reported)")
	acl := flag.Int("acl-rules", 10, "ACL rules every packet walks on the VXLAN path")
	ports := flag.Int("ports", 1000, "ports on the converged host")
	networks := flag.Int("networks", 10, "networks the ports are spread over")
	remote := flag.Int("remote", 200, "ports of the same networks on another host")
	verbose := flag.Bool("verbose", false, "log every step of the measured agents (the data plane times each step of every Apply)")
	flag.Parse()
	agentLevel := slog.LevelWarn
	if *verbose {
		agentLevel = slog.LevelDebug
	}
	agentLog := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: agentLevel}))
	if err := run(*suites, *secs, *streams, *runs, *acl, *ports, *networks, *remote, agentLog); err != nil {
		fmt.Fprintf(os.Stderr, "basalt-netbench: %v\n", err)
		os.Exit(1)
	}
}

func run(suites string, secs, streams, runs, acl, ports, networks, remote int, agentLog *slog.Logger) error {
	if err := netlab.Check(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	id := fmt.Sprintf("bsnb%d", os.Getpid()%100000)
	var b strings.Builder
	fmt.Fprintf(&b, "## netd, %s (%s)\n", time.Now().Format("2006-01-02"), machine())
	fmt.Fprintf(&b, "Command: `basalt-netbench --suites %s --seconds %d --streams %d --runs %d --ports %d`\n\n", suites, secs, streams, runs, ports)
	for _, s := range strings.Split(suites, ",") {
		switch strings.TrimSpace(s) {
		case "throughput":
			r, err := netbench.Throughput(ctx, netbench.ThroughputOptions{LabID: id + "t", Seconds: secs, Streams: streams, Runs: runs, ACLRules: acl, Logger: agentLog})
			if err != nil {
				return fmt.Errorf("throughput: %w", err)
			}
			met := "no"
			if r.Ratio() >= 0.7 {
				met = "yes"
			}
			fmt.Fprintf(&b, "TCP goodput, iperf3, %d stream(s), %d s per run, %d runs alternating the two paths; MTU 1450 on both; the ratio is the median of the runs' ratios.\n\n", streams, secs, runs)
			fmt.Fprintf(&b, "| path | Gbit/s (median) | runs | ratio |\n|---|---|---|---|\n")
			fmt.Fprintf(&b, "| plain veth pair | %.2f | %s | 1.00× |\n", r.Veth/1e9, gbps(r.VethRuns))
			fmt.Fprintf(&b, "| VXLAN across two hosts, spoofing + DHCP guards, isolation, %d-rule ACL | %.2f | %s | %.2f× (bar ≥ 0.7×: %s) |\n",
				acl, r.VXLAN/1e9, gbps(r.VXLANRuns), r.Ratio(), met)
			fmt.Fprintf(&b, "| the same VXLAN path without policy (reference) | %.2f | %s | %.2f× |\n\n", r.Bare/1e9, gbps(r.BareRuns), r.BareRatio())
		case "converge":
			r, err := netbench.Converge(ctx, netbench.ConvergeOptions{LabID: id + "c", Ports: ports, Networks: networks, Remote: remote, Logger: log, AgentLogger: agentLog})
			if err != nil {
				return fmt.Errorf("converge: %w", err)
			}
			fmt.Fprintf(&b, "Convergence of one host: %d local ports (guards, 3 ACL rules each) in %d networks, %d remote ports; from netd's start to the host converged (etcd read, every check, every change).\n\n",
				ports, networks, remote)
			fmt.Fprintf(&b, "| case | time |\n|---|---|\n")
			fmt.Fprintf(&b, "| fresh host (everything created) | %s |\n", r.Fresh.Round(time.Millisecond))
			fmt.Fprintf(&b, "| restart, nothing changed (no tap recreated: %v) | %s |\n", r.Unchanged, r.Restart.Round(time.Millisecond))
			fmt.Fprintf(&b, "| restart after %d ports deleted, %d created, %d ACLs changed | %s |\n", r.Options.Changed, r.Options.Changed, r.Options.Changed, r.RestartChanged.Round(time.Millisecond))
			if r.Move > 0 {
				fmt.Fprintf(&b, "| a remote port moves to another host: etcd update to entries applied on this host | %s |\n", r.Move.Round(time.Millisecond))
			}
			fmt.Fprintln(&b)
		default:
			return fmt.Errorf("unknown suite %q (want throughput, converge)", s)
		}
	}
	fmt.Print(b.String())
	return nil
}

func gbps(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.2f", x/1e9)
	}
	return strings.Join(parts, ", ")
}

// machine describes the machine for the report: cores, memory, kernel.
func machine() string {
	out, _ := exec.Command("uname", "-r").Output()
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int
		fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb)
		mem = fmt.Sprintf(", %d GiB", (kb+(1<<19))>>20)
	}
	return fmt.Sprintf("%d cores%s, kernel %s", runtime.NumCPU(), mem, strings.TrimSpace(string(out)))
}
