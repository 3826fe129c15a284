// Command basalt-chaos-etcd runs one member of a multi-member etcd cluster, embedded
// (go.etcd.io/etcd/server/v3/embed), for the chaos harness's etcd-member-loss scenario: the harness runs three
// of them, each in its own network namespace, points metad and every daemon at all three, and SIGKILLs one.
// metad's own embedded etcd is single-node by design; a real cluster runs an external etcd, which is what this
// stands in for, built from the module's own etcd so that nothing is downloaded.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func main() {
	fs := flag.NewFlagSet("basalt-chaos-etcd", flag.ContinueOnError)
	name := fs.String("name", "", "member name, as in --initial-cluster")
	dir := fs.String("data-dir", "", "directory of the member's write-ahead log and snapshots")
	clientURL := fs.String("client-url", "", "client URL to listen on and advertise, e.g. http://10.213.0.21:2379")
	peerURL := fs.String("peer-url", "", "peer URL to listen on and advertise, e.g. http://10.213.0.21:2380")
	initial := fs.String("initial-cluster", "", "every member as name=peerURL, comma-separated")
	state := fs.String("initial-cluster-state", embed.ClusterStateFlagNew, "new, or existing to join a running cluster")
	level := fs.String("log-level", "warn", "etcd's log level: debug, info, warn or error")
	timeout := fs.Duration("start-timeout", time.Minute, "how long to wait for the member to join its cluster")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if *name == "" || *dir == "" || *clientURL == "" || *peerURL == "" || *initial == "" {
		fmt.Fprintln(os.Stderr, "basalt-chaos-etcd: --name, --data-dir, --client-url, --peer-url and --initial-cluster are required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(ctx, log, *name, *dir, *clientURL, *peerURL, *initial, *state, *level, *timeout); err != nil {
		fmt.Fprintf(os.Stderr, "basalt-chaos-etcd: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, log *slog.Logger, name, dir, clientURL, peerURL, initial, state, level string, timeout time.Duration) error {
	cu, err := url.Parse(clientURL)
	if err != nil {
		return fmt.Errorf("--client-url %q: %w", clientURL, err)
	}
	pu, err := url.Parse(peerURL)
	if err != nil {
		return fmt.Errorf("--peer-url %q: %w", peerURL, err)
	}
	lvl, err := zap.ParseAtomicLevel(level)
	if err != nil {
		return fmt.Errorf("--log-level %q: %w", level, err)
	}
	cfg := embed.NewConfig()
	cfg.Name = name
	cfg.Dir = dir
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = initial
	cfg.ClusterState = state
	cfg.InitialClusterToken = "basalt-chaos"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.New(zapcore.NewCore(
		zapcore.NewConsoleEncoder(zap.NewProductionEncoderConfig()), zapcore.Lock(os.Stderr), lvl)))
	// As metad's embedded etcd: old revisions serve only watchers that fell behind.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd member %s in %s: %w", name, dir, err)
	}
	defer e.Close()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
		log.Info("etcd member ready", "name", name, "client", clientURL, "peer", peerURL, "id", fmt.Sprintf("%x", e.Server.MemberID()))
	case err := <-e.Err():
		return fmt.Errorf("etcd member %s failed while starting: %w", name, err)
	case <-t.C:
		return fmt.Errorf("etcd member %s not ready after %s (are the other members up?)", name, timeout)
	case <-ctx.Done():
		return nil
	}
	select {
	case err := <-e.Err():
		return fmt.Errorf("etcd member %s: %w", name, err)
	case <-ctx.Done():
		log.Info("stopping etcd member", "name", name)
		return nil
	}
}
