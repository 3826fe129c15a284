// Package daemon wires a blockd process: the local storage engine in the node's data directory, the view of the
// cluster, the object service (BlockService) on the node's gRPC server, and the NBD server on TCP and a Unix
// socket in front of the gateway. blockd/cmd/blockd only parses flags into a Config and hands Wire to the node
// runtime. It depends on the blockd packages and internal/node.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/blockd/engine"
	"github.com/basalt-hv/basalt/blockd/gateway"
	"github.com/basalt-hv/basalt/blockd/nbd"
	"github.com/basalt-hv/basalt/blockd/osd"
	"github.com/basalt-hv/basalt/blockd/view"
	"github.com/basalt-hv/basalt/internal/node"
)

// Config is blockd's own configuration.
type Config struct {
	// NBDListen is the TCP address of the NBD server; empty disables it.
	NBDListen string
	// NBDSocket is the Unix socket of the NBD server; empty means <data-dir>/nbd.sock.
	NBDSocket string
	// RecoveryRate throttles background recovery, in bytes per second (0: unlimited).
	RecoveryRate int64
	// OpTimeout is how long a client operation keeps retrying through failures.
	OpTimeout time.Duration
	// ScrubInterval is how often the background scrubber verifies the PGs this node is primary of (0: never).
	ScrubInterval time.Duration
}

// Flags registers blockd's flags.
func (c *Config) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.NBDListen, "nbd-listen", "127.0.0.1:10809", "TCP address of the NBD server (empty: no TCP)")
	fs.StringVar(&c.NBDSocket, "nbd-socket", "", "Unix socket of the NBD server (default <data-dir>/nbd.sock)")
	fs.Int64Var(&c.RecoveryRate, "recovery-rate", 64<<20, "bytes per second background recovery may copy (0: unlimited)")
	fs.DurationVar(&c.ScrubInterval, "scrub-interval", 24*time.Hour, "how often to verify every copy of the data this node is primary of (0: never)")
	fs.DurationVar(&c.OpTimeout, "op-timeout", gateway.DefaultOpTimeout, "how long a client operation keeps retrying through node failures before it fails")
}

// Daemon is blockd's description for the node runtime.
func Daemon(c *Config) node.Daemon {
	return node.Daemon{
		Kind:          basaltv1.NodeKind_NODE_KIND_BLOCKD,
		DefaultListen: "127.0.0.1:7410",
		Flags:         c.Flags,
		ServerOptions: osd.ServerOptions(),
		Wire:          func(ctx context.Context, n *node.Node) (func(), error) { return Wire(ctx, n, *c) },
	}
}

// Wire starts blockd's services on a started node and returns what to release once it stopped serving.
func Wire(ctx context.Context, n *node.Node, c Config) (_ func(), err error) {
	var closers []func()
	release := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	dir, err := n.Dir.Sub("engine")
	if err != nil {
		return nil, err
	}
	eng, err := engine.Open(dir, engine.Options{Logger: n.Log.With("component", "engine")})
	if err != nil {
		return nil, fmt.Errorf("open storage engine: %w", err)
	}
	closers = append(closers, func() {
		if err := eng.Close(); err != nil {
			n.Log.Warn("close storage engine", "err", err)
		}
	})

	// Background work (view, deletion of dropped volumes, peering) stops after the NBD servers, before the
	// engine closes; each group has its own WaitGroup so that closing one never waits on the other.
	v := view.New()
	vctx, stopView := context.WithCancel(ctx)
	var bg sync.WaitGroup
	bg.Add(1)
	go func() { defer bg.Done(); v.Run(vctx, n.Store, n.Log.With("component", "view")) }()
	closers = append(closers, func() { stopView(); bg.Wait() })
	select {
	case <-v.Ready():
	case <-time.After(30 * time.Second):
		return nil, errors.New("could not read the cluster map and volumes from etcd within 30s")
	case <-ctx.Done():
		return nil, ctx.Err()
	}

	bg.Add(1)
	go func() { defer bg.Done(); dropDeletedVolumes(vctx, v, eng, n.Log) }()

	peers := osd.NewPeers()
	closers = append(closers, peers.Close)
	o := osd.New(n.Config.ID, eng, v, peers, n.Store, c.RecoveryRate, n.Log.With("component", "osd"))
	o.Fatal = func(err error) {
		// Shut down as on SIGTERM: the node revokes its lease on the way out, so the cluster stops routing here
		// at once; a restart reopens the engine, which re-verifies its log.
		n.Log.Error("storage engine failed; stopping this node", "err", err)
		syscall.Kill(os.Getpid(), syscall.SIGTERM)
	}
	gw := &gateway.Gateway{OSD: o, View: v, Store: n.Store, Peers: peers, OpTimeout: c.OpTimeout, Log: n.Log.With("component", "gateway")}
	basaltv1.RegisterBlockServiceServer(n.GRPC, &blockService{OSD: o, gw: gw, view: v})
	bg.Add(3)
	go func() { defer bg.Done(); o.Run(vctx) }()
	go func() { defer bg.Done(); o.RunScrubber(vctx, c.ScrubInterval) }()
	go func() { defer bg.Done(); o.RunMerges(vctx) }()

	srv := &nbd.Server{Exports: gw, Logger: n.Log.With("component", "nbd")}
	var listeners []net.Listener
	if c.NBDListen != "" {
		ln, err := net.Listen("tcp", c.NBDListen)
		if err != nil {
			return nil, fmt.Errorf("listen for NBD: %w", err)
		}
		listeners = append(listeners, ln)
		n.Config.NBDAddress = ln.Addr().String()
	}
	sock := c.NBDSocket
	if sock == "" {
		sock = filepath.Join(n.Dir.Path, "nbd.sock")
	}
	os.Remove(sock) // a socket left by a crash; the data directory lock proves nobody else uses it
	uln, err := net.Listen("unix", sock)
	if err != nil {
		for _, ln := range listeners {
			ln.Close()
		}
		return nil, fmt.Errorf("listen for NBD on %s: %w", sock, err)
	}
	listeners = append(listeners, uln)
	n.Config.NBDSocket = sock
	sctx, stopNBD := context.WithCancel(ctx)
	var nbdServers sync.WaitGroup
	for _, ln := range listeners {
		nbdServers.Add(1)
		go func() {
			defer nbdServers.Done()
			if err := srv.Serve(sctx, ln); err != nil {
				n.Log.Error("NBD server stopped", "listener", ln.Addr().String(), "err", err)
			}
		}()
	}
	// NBD stops before the engine closes (closers run in reverse).
	closers = append(closers, func() { stopNBD(); nbdServers.Wait() })
	n.Log.Info("serving NBD", "tcp", n.Config.NBDAddress, "unix", sock)
	return release, nil
}

// dropDeletedVolumes deletes the local objects of volumes whose record is gone, whenever the view changes.
// Only IDs at or below the highest ID seen are considered: IDs are never reused, so a volume created after
// the view was read is never mistaken for a deleted one.
func dropDeletedVolumes(ctx context.Context, v *view.View, eng *engine.Engine, log *slog.Logger) {
	for {
		changed := v.Changed()
		maxID := v.MaxVolumeID()
		gone := map[uint64]bool{}
		for _, id := range eng.AllObjects() {
			if id.Volume <= maxID && v.VolumeByID(id.Volume) == nil {
				gone[id.Volume] = true
			}
		}
		for vol := range gone {
			if err := eng.DeleteVolume(ctx, vol); err != nil {
				if ctx.Err() == nil {
					log.Warn("drop data of deleted volume", "volume_id", vol, "err", err)
				}
				continue
			}
			log.Info("dropped data of deleted volume", "volume_id", vol)
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
