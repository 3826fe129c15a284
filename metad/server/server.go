// Package server wires a metad process: its data directory, the embedded etcd (unless external endpoints are
// given), the node runtime and the public API. metad/cmd/metad only parses flags into a Config and calls Run.
// It depends on metad's packages and internal/node.
package server

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/internal/buildinfo"
	"github.com/basalt-hv/basalt/internal/datadir"
	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/clustermap"
	"github.com/basalt-hv/basalt/metad/etcdserver"
	"google.golang.org/grpc"
)

// Config is metad's configuration.
type Config struct {
	Node node.Config
	// EtcdClientURL and EtcdPeerURL are where the embedded etcd listens; unused with external endpoints.
	EtcdClientURL string
	EtcdPeerURL   string
	EtcdLogLevel  string
	// DownOut is how long a storage node may be down before its data is re-placed elsewhere.
	DownOut time.Duration
}

// DefaultListen is metad's default API address, the one the CLI tries when nothing else is configured.
const DefaultListen = "127.0.0.1:7400"

// Flags registers metad's flags.
func (c *Config) Flags(fs *flag.FlagSet) {
	c.Node.Kind = basaltv1.NodeKind_NODE_KIND_METAD
	c.Node.Flags(fs, DefaultListen)
	fs.StringVar(&c.EtcdClientURL, "etcd-client-url", "http://127.0.0.1:2379", "client URL of the embedded etcd (ignored with --etcd-endpoints)")
	fs.StringVar(&c.EtcdPeerURL, "etcd-peer-url", "http://127.0.0.1:2380", "peer URL of the embedded etcd (ignored with --etcd-endpoints)")
	fs.StringVar(&c.EtcdLogLevel, "etcd-log-level", "error", "log level of the embedded etcd: debug, info, warn or error")
	fs.DurationVar(&c.DownOut, "down-out-interval", clustermap.DefaultDownOut, "how long a blockd may be down before its data is re-placed on other nodes")
}

// Run serves until ctx ends. With no external etcd endpoints it runs etcd embedded, its data in
// <data-dir>/etcd, and stops it last, after the API has drained.
func Run(ctx context.Context, c Config, log *slog.Logger) error {
	c.Node.Kind = basaltv1.NodeKind_NODE_KIND_METAD
	c.Node.InitCluster = true
	dir, err := datadir.Open(c.Node.DataDir, "metad", c.Node.ID)
	if err != nil {
		return err
	}
	c.Node.Dir = dir
	embedded := len(c.Node.EtcdEndpoints) == 0
	etcdFailed := make(chan error, 1)
	if embedded {
		etcdDir, err := dir.Sub("etcd")
		if err != nil {
			dir.Close()
			return err
		}
		e, err := etcdserver.Start(ctx, etcdserver.Config{
			Dir:       etcdDir,
			Name:      c.Node.ID,
			ClientURL: c.EtcdClientURL,
			PeerURL:   c.EtcdPeerURL,
			LogLevel:  c.EtcdLogLevel,
		})
		if err != nil {
			dir.Close()
			return err
		}
		defer e.Close()
		c.Node.EtcdEndpoints = e.Endpoints
		log.Info("embedded etcd ready", "dir", filepath.Clean(etcdDir), "client_url", c.EtcdClientURL)
		// A fatal etcd error ends metad rather than leaving an API that cannot answer.
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go func() {
			select {
			case err := <-e.Err():
				etcdFailed <- err
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	c.Node.ServerOptions = append(c.Node.ServerOptions, grpc.ChainUnaryInterceptor(api.UnimplementedInterceptor))
	n, err := node.Start(ctx, c.Node, log)
	if err != nil {
		return err
	}
	if err := clustermap.Init(ctx, n.Store); err != nil {
		n.Close()
		return err
	}
	ctl := &clustermap.Controller{
		Store:       n.Store,
		Candidate:   c.Node.ID,
		DownOut:     c.DownOut,
		ElectionTTL: c.Node.LeaseTTL,
		Log:         log.With("component", "clustermap"),
	}
	ctlDone := make(chan struct{})
	ctlCtx, stopCtl := context.WithCancel(ctx)
	go func() { ctl.Run(ctlCtx); close(ctlDone) }()
	defer func() { stopCtl(); <-ctlDone }()
	peers := blockrpc.NewPeers()
	defer peers.Close()
	api.Register(n.GRPC, &api.ClusterServer{
		Peers:         peers,
		Store:         n.Store,
		EtcdEndpoints: c.Node.EtcdEndpoints,
		EmbeddedEtcd:  embedded,
		MetadID:       c.Node.ID,
		Version:       buildinfo.Version(),
		Log:           log,
	})
	if err := n.Serve(ctx); err != nil {
		return err
	}
	select {
	case err := <-etcdFailed:
		return fmt.Errorf("embedded etcd failed: %w", err)
	default:
		return nil
	}
}
