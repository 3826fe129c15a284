// Package node is what every Basalt daemon shares: it owns the daemon's data directory, connects to etcd,
// checks the cluster's identity, serves the node's gRPC server (with the standard gRPC health service), and
// keeps the node registered on an etcd lease until it stops. A daemon's main parses its flags into a Config,
// registers its own services on Node.GRPC, and calls Serve. It depends on metad's store and registry packages,
// internal/datadir and the API types; it never imports a daemon package.
package node

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/buildinfo"
	"github.com/basalt-hv/basalt/internal/datadir"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Config is the part of a daemon's configuration every node has.
type Config struct {
	Kind          basaltv1.NodeKind
	ID            string
	DataDir       string
	Listen        string
	FailureDomain string
	EtcdEndpoints []string
	LeaseTTL      time.Duration
	// DebugListen, if set, serves Go's pprof profiles (/debug/pprof/) on this address, for profiling.
	DebugListen string
	// EtcdTimeout bounds the first contact with etcd, so an unreachable etcd is a clear error, not a hang.
	EtcdTimeout time.Duration
	// Dir, if set, is the node's already opened data directory (metad opens it before starting the embedded
	// etcd inside it); the node takes ownership. Otherwise Start opens DataDir.
	Dir *datadir.Dir
	// ServerOptions are extra options for the node's gRPC server (interceptors, message sizes).
	ServerOptions []grpc.ServerOption
	// NBDAddress and NBDSocket are published in the node's registration (blockd sets them once it listens).
	NBDAddress string
	NBDSocket  string
	// InitCluster makes this node create the cluster's identity if etcd has none (metad does; others wait
	// for metad).
	InitCluster bool
}

// DefaultLeaseTTL is how long a silent node stays listed as up. Shorter detects failures sooner; it must stay
// well above the longest pause (GC, fsync stall) a healthy node can have.
const DefaultLeaseTTL = 5 * time.Second

// Flags registers the shared flags on fs with the given defaults for listen and etcd.
func (c *Config) Flags(fs *flag.FlagSet, defaultListen string) {
	host, _ := os.Hostname()
	kind := c.Kind.Name()
	fs.StringVar(&c.ID, "node-id", strings.ToLower(kind+"-"+host), "node ID, unique in the cluster and stable across restarts")
	fs.StringVar(&c.DataDir, "data-dir", "/var/lib/basalt/"+kind, "directory for this node's data")
	fs.StringVar(&c.Listen, "listen", defaultListen, "host:port of this node's gRPC server")
	fs.StringVar(&c.FailureDomain, "failure-domain", host, "failure domain (replicas are spread across domains)")
	fs.Func("etcd-endpoints", "comma-separated etcd client URLs (default http://127.0.0.1:2379)", func(s string) error {
		c.EtcdEndpoints = splitList(s)
		if len(c.EtcdEndpoints) == 0 {
			return errors.New("no endpoint given")
		}
		return nil
	})
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", DefaultLeaseTTL, "how long this node stays listed as up after it stops answering (min 2s)")
	fs.DurationVar(&c.EtcdTimeout, "etcd-timeout", 10*time.Second, "how long to wait for etcd at startup")
	fs.StringVar(&c.DebugListen, "debug-listen", "", "host:port to serve pprof profiles on (/debug/pprof/); empty: off")
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Node is a started daemon: data directory held, etcd connected, gRPC port bound, not yet registered.
type Node struct {
	Config  Config
	Dir     *datadir.Dir
	Etcd    *clientv3.Client
	Store   *store.Store
	Cluster *basaltv1.ClusterInfo
	GRPC    *grpc.Server
	Health  *health.Server
	Log     *slog.Logger

	listener net.Listener
}

// Start acquires everything the node needs, in an order that fails fast on operator errors (bad ID, data
// directory in use or incompatible, port taken, etcd unreachable). On error everything acquired is released.
func Start(ctx context.Context, c Config, log *slog.Logger) (_ *Node, err error) {
	if err := schema.ValidateName("node", c.ID); err != nil {
		return nil, err
	}
	if c.LeaseTTL < registry.MinTTL {
		return nil, fmt.Errorf("--lease-ttl %s is shorter than the minimum %s", c.LeaseTTL, registry.MinTTL)
	}
	if len(c.EtcdEndpoints) == 0 {
		c.EtcdEndpoints = []string{"http://127.0.0.1:2379"}
	}
	if c.EtcdTimeout == 0 {
		c.EtcdTimeout = 10 * time.Second
	}
	n := &Node{Config: c, Log: log.With("node", c.ID)}
	defer func() {
		if err != nil {
			n.release()
		}
	}()
	if n.Dir = c.Dir; n.Dir == nil {
		if n.Dir, err = datadir.Open(c.DataDir, c.Kind.Name(), c.ID); err != nil {
			return nil, err
		}
	}
	if n.listener, err = net.Listen("tcp", c.Listen); err != nil {
		return nil, fmt.Errorf("listen for gRPC: %w", err)
	}
	if n.Etcd, err = Dial(ctx, c.EtcdEndpoints, c.EtcdTimeout); err != nil {
		return nil, err
	}
	n.Store = store.New(n.Etcd)
	if c.InitCluster {
		n.Cluster, err = registry.InitCluster(ctx, n.Store)
	} else {
		n.Cluster, err = registry.CheckCluster(ctx, n.Store)
	}
	if err != nil {
		return nil, err
	}
	n.GRPC = grpc.NewServer(c.ServerOptions...)
	n.Health = health.NewServer()
	healthpb.RegisterHealthServer(n.GRPC, n.Health)
	return n, nil
}

// Dial connects to etcd and proves it answers within timeout: clientv3 dials lazily, so without this probe an
// unreachable etcd would only show up as a hang in the first real request.
func Dial(ctx context.Context, endpoints []string, timeout time.Duration) (*clientv3.Client, error) {
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: timeout,
		Logger:      zap.NewNop(),
		// Keepalives let a client notice a dead etcd connection instead of waiting on it forever.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd at %s: %w", strings.Join(endpoints, ","), err)
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := c.Get(pctx, schema.Cluster); err != nil {
		c.Close()
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("cannot reach etcd at %s within %s", strings.Join(endpoints, ","), timeout)
		}
		return nil, fmt.Errorf("cannot reach etcd at %s: %w", strings.Join(endpoints, ","), err)
	}
	return c, nil
}

// Addr is the address the gRPC server listens on (useful with port 0).
func (n *Node) Addr() string { return n.listener.Addr().String() }

// Serve registers the node, serves gRPC until ctx ends, then leaves the cluster at once (revoking its lease) and
// stops gracefully. Register the daemon's own services on n.GRPC before calling it.
func (n *Node) Serve(ctx context.Context) error {
	defer n.release()
	host, _ := os.Hostname()
	reg, err := registry.Register(ctx, n.Store, &basaltv1.Node{
		Id:            n.Config.ID,
		Kind:          n.Config.Kind,
		GrpcAddress:   n.Addr(),
		FailureDomain: n.Config.FailureDomain,
		Hostname:      host,
		NbdAddress:    n.Config.NBDAddress,
		NbdSocket:     n.Config.NBDSocket,
	}, buildinfo.Version(), n.Config.LeaseTTL, n.Log)
	if err != nil {
		return err
	}
	if n.Config.DebugListen != "" {
		stop, err := serveDebug(n.Config.DebugListen)
		if err != nil {
			reg.Close(context.WithoutCancel(ctx))
			return err
		}
		defer stop()
		n.Log.Info("serving pprof", "addr", n.Config.DebugListen)
	}
	n.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	served := make(chan error, 1)
	go func() { served <- n.GRPC.Serve(n.listener) }()
	n.Log.Info("node up", "kind", n.Config.Kind.Name(), "grpc", n.Addr(), "cluster", n.Cluster.GetClusterId(), "version", buildinfo.Version())

	select {
	case <-ctx.Done():
	case err = <-served:
		err = fmt.Errorf("gRPC server stopped: %w", err)
	}
	n.Health.Shutdown()
	// Leave the cluster before draining requests, so others stop routing here while we finish.
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if rerr := reg.Close(rctx); rerr != nil {
		n.Log.Warn("leave cluster", "err", rerr)
	}
	cancel()
	stopped := make(chan struct{})
	go func() { n.GRPC.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		n.GRPC.Stop()
	}
	n.Log.Info("node stopped")
	return err
}

// Close releases a node that was started but will not Serve (wiring its services failed).
func (n *Node) Close() { n.release() }

func (n *Node) release() {
	if n.listener != nil {
		n.listener.Close()
	}
	if n.Etcd != nil {
		n.Etcd.Close()
	}
	if n.Dir != nil {
		n.Dir.Close()
	}
}

// serveDebug serves pprof on its own mux (never on the default one) and returns how to stop it.
func serveDebug(addr string) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for pprof: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return func() { srv.Close() }, nil
}
