// Package etcdserver runs a single-node etcd embedded in the metad process (go.etcd.io/etcd/server/v3/embed),
// its data kept on disk across restarts. It is Basalt's default metadata backend; a real cluster points metad
// at external etcd endpoints instead and does not use this package. It depends on etcd's embed package only.
package etcdserver

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Config says where the embedded etcd keeps its data and listens.
type Config struct {
	// Dir holds etcd's write-ahead log and snapshots.
	Dir string
	// Name is the etcd member name.
	Name string
	// ClientURL is where clients (every Basalt daemon) reach etcd, e.g. http://127.0.0.1:2379.
	ClientURL string
	// PeerURL is the raft peer URL; a single node listens on it so that members can be added later.
	PeerURL string
	// LogLevel is etcd's own (zap) log level: debug, info, warn, error.
	LogLevel string
	// StartTimeout bounds how long Start waits for etcd to become ready.
	StartTimeout time.Duration
}

// Server is a running embedded etcd.
type Server struct {
	etcd      *embed.Etcd
	level     zap.AtomicLevel
	closeOnce sync.Once
	// Endpoints are the client URLs to hand to clientv3.
	Endpoints []string
}

// Start starts etcd and waits until it serves clients. On error nothing is left running.
func Start(ctx context.Context, c Config) (*Server, error) {
	cu, err := url.Parse(c.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("etcd client URL %q: %w", c.ClientURL, err)
	}
	pu, err := url.Parse(c.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("etcd peer URL %q: %w", c.PeerURL, err)
	}
	// Checking the ports first turns a taken port into one clear error instead of etcd's own multi-line log.
	for _, u := range []*url.URL{cu, pu} {
		if err := checkFree(u.Host); err != nil {
			return nil, err
		}
	}
	level, err := zap.ParseAtomicLevel(c.LogLevel)
	if c.LogLevel == "" || err != nil {
		level = zap.NewAtomicLevelAt(zap.WarnLevel)
	}
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.Dir
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.New(zapcore.NewCore(
		zapcore.NewConsoleEncoder(zap.NewProductionEncoderConfig()), zapcore.Lock(os.Stderr), level)))
	// Old revisions are only needed by watchers that fell behind; an hour is far more than any of ours.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"
	// Metadata is small (it grows with objects, never with data); 2 GiB of backend leaves a wide margin.
	cfg.QuotaBackendBytes = 2 << 30

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", c.Dir, err)
	}
	timeout := c.StartTimeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
		return &Server{etcd: e, level: level, Endpoints: []string{cu.String()}}, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd failed while starting: %w", err)
	case <-t.C:
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s not ready after %s", c.Dir, timeout)
	case <-ctx.Done():
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("start embedded etcd: %w", ctx.Err())
	}
}

// Err reports a fatal error of the running etcd.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops etcd, letting in-flight requests finish.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		// While it stops, etcd logs its closing listeners as errors; they are not.
		s.level.SetLevel(zap.FatalLevel)
		s.etcd.Close()
	})
}

func checkFree(hostport string) error {
	l, err := net.Listen("tcp", hostport)
	if err != nil {
		return fmt.Errorf("embedded etcd cannot listen on %s: %w", hostport, err)
	}
	return l.Close()
}
