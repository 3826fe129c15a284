// Package daemon wires a computed process: the hypervisor driver chosen by --hypervisor, the VM host
// (computed/vmhost) that reconciles the VMs assigned to this node and attaches their volumes (metad/attach), its
// ComputeService on the node's gRPC server, this node's replica of the HA controller (computed/ha), and the
// Prometheus metrics endpoint. computed/cmd/computed only parses flags into a Config and hands Wire to
// the node runtime. It depends on computed/vmhost, computed/ha, the drivers, metad/attach and metad/api, and internal/node.
package daemon

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/cloudhv"
	"github.com/basalt-hv/basalt/computed/ha"
	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu"
	"github.com/basalt-hv/basalt/computed/vmhost"
	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/attach"
)

// Config is computed's own configuration.
type Config struct {
	// RunDir holds a directory per VM; empty means <data-dir>/vms.
	RunDir string
	// Hypervisor is the driver: qemu or cloudhv.
	Hypervisor string
	// BlockdSocket is the local blockd's NBD socket; empty finds it in the registry.
	BlockdSocket string
	// Memory is what the host offers to VMs, in bytes; 0 means the host's memory less 1 GiB.
	Memory uint64
	VCPUs  int
	// NetdNode is the netd on this host; empty finds it in the registry.
	NetdNode string
	// MigrationHost is the address incoming migrations listen on; empty means the host of --listen.
	MigrationHost string
	// MaxMigrations is how many outgoing migrations run at once outside a drain.
	MaxMigrations int
	// ConsoleLogBytes bounds each of a VM's two console log files.
	ConsoleLogBytes uint64
	// MetricsListen serves /metrics (Prometheus text format) on this address; empty: off.
	MetricsListen string
	// QEMUAccel forces kvm or tcg; empty probes. QEMUStateDir keeps the probe's result.
	QEMUAccel    string
	QEMUStateDir string
	// HA runs this computed's replica of the HA controller (computed/ha); HADaemonGrace is how long a host
	// whose computed alone is down keeps its VMs.
	HA            bool
	HADaemonGrace time.Duration
}

// Flags registers computed's flags.
func (c *Config) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.RunDir, "run-dir", "", "directory for the VMs' sockets, pid files and console logs (default <data-dir>/vms; keep it short: Unix socket paths are limited to 107 bytes)")
	fs.StringVar(&c.Hypervisor, "hypervisor", "qemu", "hypervisor driver: qemu or cloudhv")
	fs.StringVar(&c.BlockdSocket, "blockd-socket", "", "NBD Unix socket of this host's blockd (default: found in the registry, a blockd with this host name)")
	fs.Func("memory", "memory offered to VMs, e.g. 16G (default: the host's memory less 1 GiB)", func(s string) error {
		n, err := parseSize(s)
		c.Memory = n
		return err
	})
	fs.IntVar(&c.VCPUs, "vcpus", runtime.NumCPU(), "CPUs offered to VMs (published; vCPUs are not reserved)")
	fs.StringVar(&c.NetdNode, "netd-node", "", "node ID of this host's netd (default: found in the registry, the netd with this host name)")
	fs.StringVar(&c.MigrationHost, "migration-host", "", "address incoming live migrations listen on (default: the host of --listen)")
	fs.IntVar(&c.MaxMigrations, "max-migrations", 2, "outgoing live migrations at once (a drain sets its own)")
	c.ConsoleLogBytes = 1 << 20
	fs.Func("console-log-size", "size of each of a VM's two console log files, e.g. 1M (default 1M)", func(s string) error {
		n, err := parseSize(s)
		c.ConsoleLogBytes = n
		return err
	})
	fs.StringVar(&c.MetricsListen, "metrics-listen", "", "host:port to serve VM metrics on (/metrics, Prometheus text format); empty: off")
	fs.StringVar(&c.QEMUAccel, "qemu-accel", "", "QEMU accelerator: kvm or tcg (default: probe whether KVM boots guests here)")
	fs.StringVar(&c.QEMUStateDir, "qemu-state-dir", "", "where the QEMU driver keeps its accelerator probe result (default: the user cache directory)")
	fs.BoolVar(&c.HA, "ha", true, "take part in the HA controller's election: the leader fences failed hosts and restarts their VMs elsewhere (docs/ha.md)")
	fs.DurationVar(&c.HADaemonGrace, "ha-daemon-grace", 60*time.Second, "how long a host whose computed is down but whose blockd is up keeps its VMs before HA moves them")
}

// Daemon is computed's description for the node runtime.
func Daemon(c *Config) node.Daemon {
	return node.Daemon{
		Kind:          basaltv1.NodeKind_NODE_KIND_COMPUTED,
		DefaultListen: "127.0.0.1:7430",
		Flags:         c.Flags,
		Wire:          func(ctx context.Context, n *node.Node) (func(), error) { return Wire(ctx, n, *c) },
	}
}

// Wire starts computed's services on a started node and returns what to release once it stopped serving.
// Releasing leaves the VMs running: the next computed finds them.
func Wire(ctx context.Context, n *node.Node, c Config) (func(), error) {
	runDir := c.RunDir
	if runDir == "" {
		runDir = filepath.Join(n.Dir.Path, "vms")
	}
	var drv hypervisor.Driver
	var accel func(context.Context) (string, error)
	switch c.Hypervisor {
	case "qemu":
		d, err := qemu.New(qemu.Config{Accel: c.QEMUAccel, StateDir: c.QEMUStateDir, Logger: n.Log.With("component", "qemu")})
		if err != nil {
			return nil, err
		}
		drv = d
		accel = func(ctx context.Context) (string, error) {
			p, err := d.Accel(ctx)
			return p.Accel, err
		}
	case "cloudhv":
		drv = cloudhv.New(cloudhv.Config{Logger: n.Log.With("component", "cloudhv")})
	default:
		return nil, fmt.Errorf("--hypervisor %q: want qemu or cloudhv", c.Hypervisor)
	}
	mem := c.Memory
	if mem == 0 {
		total, err := hostMemory()
		if err != nil {
			return nil, fmt.Errorf("%w (give --memory)", err)
		}
		mem = max(total/2, total-1<<30)
	}
	migHost := c.MigrationHost
	if migHost == "" {
		host, _, err := net.SplitHostPort(n.Addr())
		if err != nil {
			return nil, fmt.Errorf("migration address from --listen: %w", err)
		}
		migHost = host
	}
	peers := blockrpc.NewPeers()
	attacher := &attach.Client{Store: n.Store, Peers: peers, Log: n.Log.With("component", "attach")}
	h, err := vmhost.New(vmhost.Config{
		NodeID: n.Config.ID, Store: n.Store, Driver: drv, RunDir: runDir, BlockdSocket: c.BlockdSocket,
		MemoryBytes: mem, VCPUs: c.VCPUs, NetdNode: c.NetdNode, MigrationHost: migHost,
		MaxMigrations: c.MaxMigrations, ConsoleLogBytes: int64(c.ConsoleLogBytes), Accel: accel,
		Attacher: attacher, LeaseTTL: n.Config.LeaseTTL, Log: n.Log.With("component", "vmhost"),
	})
	if err != nil {
		return nil, err
	}
	var ctrl *ha.Controller
	if c.HA {
		ctrl, err = ha.New(ha.Config{Candidate: n.Config.ID, Store: n.Store, VMs: api.NewVMServer(n.Store, peers), Fencer: attacher,
			ElectionTTL: n.Config.LeaseTTL, DaemonGrace: c.HADaemonGrace, Log: n.Log.With("component", "ha")})
		if err != nil {
			return nil, err
		}
	}
	basaltv1.RegisterComputeServiceServer(n.GRPC, h.Service())

	var stopMetrics func()
	if c.MetricsListen != "" {
		ln, err := net.Listen("tcp", c.MetricsListen)
		if err != nil {
			return nil, fmt.Errorf("listen for metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", h.MetricsHandler())
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		stopMetrics = func() { srv.Close() }
		n.Log.Info("serving metrics", "addr", ln.Addr().String())
	}

	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := h.Run(rctx); err != nil && rctx.Err() == nil {
			// Without its VM host, computed would look alive while managing nothing: stop as on SIGTERM.
			n.Log.Error("VM host failed; stopping this node", "err", err)
			syscall.Kill(os.Getpid(), syscall.SIGTERM)
		}
	}()
	if ctrl != nil {
		wg.Add(1)
		go func() { defer wg.Done(); ctrl.Run(rctx) }()
	}
	n.Log.Info("computed ready", "hypervisor", drv.Name(), "run_dir", runDir, "memory", mem, "migration_host", migHost, "ha", c.HA)
	return func() {
		cancel()
		wg.Wait()
		if stopMetrics != nil {
			stopMetrics()
		}
	}, nil
}

// hostMemory reads MemTotal from /proc/meminfo.
func hostMemory() (uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("read the host's memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("read the host's memory: MemTotal %q", rest)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("read the host's memory: no MemTotal in /proc/meminfo")
}

// parseSize reads a byte count with an optional binary unit: 512M, 16G, 1T.
func parseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	mult := uint64(1)
	if s != "" {
		switch strings.ToUpper(s[len(s)-1:]) {
		case "K":
			mult = 1 << 10
		case "M":
			mult = 1 << 20
		case "G":
			mult = 1 << 30
		case "T":
			mult = 1 << 40
		}
		if mult != 1 {
			s = s[:len(s)-1]
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a size (a positive number with an optional K, M, G or T)", s)
	}
	return n * mult, nil
}
