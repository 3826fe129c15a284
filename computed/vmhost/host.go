// Package vmhost is computed's VM lifecycle above the hypervisor drivers. It watches the VM declarations in
// etcd, and for every VM assigned to this host reconciles what runs with what is declared: it starts, stops,
// pauses, resumes and resizes machines through a hypervisor.Driver, finds machines an earlier computed started
// (a restart never kills a guest), and reports what it observes in each VM's status record. It multiplexes
// every machine's serial console to viewers and a bounded console log, serves ComputeService (consoles, stats,
// the destination side of live migration) on the node's gRPC server, drives live migrations as their source
// (and so host drains), keeps each VM's metering history in etcd, and exposes metering in the Prometheus text
// format. docs/compute.md describes the protocol. It depends on computed/hypervisor, metad's store, schema,
// registry and watch packages, and the API types; it never imports a driver.
package vmhost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Config configures a Host.
type Config struct {
	// NodeID is this computed's node ID: VMs whose host is NodeID run here.
	NodeID string
	Store  *store.Store
	Driver hypervisor.Driver
	// RunDir holds one directory per VM, named after it: the driver's run directory (control sockets, pid
	// file, hypervisor log) and the console log. Unix socket paths are limited to 107 bytes, so keep it short.
	RunDir string
	// BlockdSocket is the NBD Unix socket of this host's blockd, which every disk is attached through; empty
	// finds it in the registry (a blockd registered with this host's name that publishes a socket that exists).
	BlockdSocket string
	// MemoryBytes and VCPUs are what the host offers to VMs (published for placement).
	MemoryBytes uint64
	VCPUs       int
	// NetdNode is the netd on this host; empty finds it in the registry (the netd with this host's name), and
	// a host without one takes no VM with NICs.
	NetdNode string
	// TapExists reports whether netd has created a tap where the hypervisor opens it; nil looks in computed's
	// own network namespace. (Tests whose hypervisor runs in another namespace look there.)
	TapExists func(name string) bool
	// MigrationHost is the address incoming migrations listen on.
	MigrationHost string
	// MaxMigrations is how many outgoing migrations run at once outside a drain (a drain says its own); 0: 2.
	MaxMigrations int
	// ConsoleLogBytes bounds each of a VM's two console log files; 0: 1 MiB.
	ConsoleLogBytes int64
	// StartTimeout bounds a machine's start; 0: 2 minutes.
	StartTimeout time.Duration
	// Interval is how often each machine is checked and metered; 0: 2 s.
	Interval time.Duration
	// MeteringInterval is how often a VM's use is appended to its metering history in etcd (metering.go);
	// 0: a minute. It is measured in readings taken every Interval, so a sample spans at least this long.
	MeteringInterval time.Duration
	// MeteringSamples bounds each hour's record of a VM's metering history (the oldest samples are dropped);
	// 0: 1440, no bound at one a minute (the history is kept for a day: metad/metering.Retention).
	MeteringSamples int
	// Accel, if set, names the accelerator guests run with (it may take a while: it runs in the background).
	Accel func(ctx context.Context) (string, error)
	// Attacher gives every machine's disks their attachment generations; nil opens disks without one (a host
	// whose NBD server is not blockd, as in this package's tests).
	Attacher Attacher
	// LeaseTTL is this computed's lease TTL: a host that cannot reach etcd for most of it pauses its guests
	// (guardLease). 0 disables that.
	LeaseTTL time.Duration
	Log      *slog.Logger
}

// Host runs the VMs assigned to one computed.
type Host struct {
	cfg      Config
	log      *slog.Logger
	hostname string
	peers    *peers
	slots    *slots

	mu       sync.Mutex
	ctx      context.Context // Run's, for the workers
	workers  map[string]*worker
	incoming map[string]*incoming
	hostRec  *basaltv1.ComputeHost
	prepMu   sync.Mutex // one PrepareIncoming at a time
	pubMu    sync.Mutex // one publish at a time
	wg       sync.WaitGroup

	// selfFenced is set while guardLease holds every guest paused because etcd is out of reach.
	selfFenced atomic.Bool
	fencedAt   time.Time // owned by guardLease
}

// New checks cfg and returns a Host; Run starts it.
func New(cfg Config) (*Host, error) {
	if err := schema.ValidateName("node", cfg.NodeID); err != nil {
		return nil, err
	}
	if cfg.Store == nil || cfg.Driver == nil {
		return nil, errors.New("vmhost: a store and a driver are required")
	}
	if !filepath.IsAbs(cfg.RunDir) {
		return nil, fmt.Errorf("vmhost: run directory %q must be an absolute path", cfg.RunDir)
	}
	if cfg.MaxMigrations <= 0 {
		cfg.MaxMigrations = 2
	}
	if cfg.ConsoleLogBytes <= 0 {
		cfg.ConsoleLogBytes = 1 << 20
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 2 * time.Minute
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 2 * time.Second
	}
	if cfg.MeteringInterval <= 0 {
		cfg.MeteringInterval = DefaultMeteringInterval
	}
	if cfg.MeteringSamples <= 0 {
		cfg.MeteringSamples = DefaultMeteringSamples
	}
	if cfg.MigrationHost == "" {
		cfg.MigrationHost = "127.0.0.1"
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("vmhost: create run directory: %w", err)
	}
	hostname, _ := os.Hostname()
	h := &Host{cfg: cfg, log: cfg.Log, hostname: hostname, peers: newPeers(cfg.Store), slots: newSlots(cfg.MaxMigrations),
		workers: map[string]*worker{}, incoming: map[string]*incoming{}}
	return h, nil
}

// Run publishes the host, then reconciles the VMs until ctx ends. Machines keep running when it returns: it
// only lets go of them.
func (h *Host) Run(ctx context.Context) error {
	h.mu.Lock()
	h.ctx = ctx
	h.mu.Unlock()
	defer h.peers.close()
	netd := h.cfg.NetdNode
	if netd == "" {
		netd = h.findNode(ctx, basaltv1.NodeKind_NODE_KIND_NETD, nil)
	}
	h.mu.Lock()
	h.hostRec = &basaltv1.ComputeHost{Node: h.cfg.NodeID, Hostname: h.hostname, Hypervisor: h.cfg.Driver.Name(),
		MemoryBytes: h.cfg.MemoryBytes, Vcpus: uint32(h.cfg.VCPUs), NetdNode: netd}
	h.mu.Unlock()
	if err := h.publish(ctx); err != nil {
		return err
	}
	var bg sync.WaitGroup
	if netd == "" {
		// A netd that registers after this computed (they start together) still gives the host its networks.
		bg.Add(1)
		go func() { defer bg.Done(); h.awaitNetd(ctx) }()
	}
	if h.cfg.Accel != nil {
		bg.Add(1)
		go func() {
			defer bg.Done()
			accel, err := h.cfg.Accel(ctx)
			if err != nil {
				h.log.Warn("accelerator probe", "err", err)
				return
			}
			h.mu.Lock()
			h.hostRec.Accel = accel
			h.mu.Unlock()
			if err := h.publish(ctx); err != nil && ctx.Err() == nil {
				h.log.Warn("publish host", "err", err)
			}
		}()
	}
	bg.Add(1)
	go func() { defer bg.Done(); h.followMaintenance(ctx) }()
	bg.Add(1)
	go func() { defer bg.Done(); h.guardLease(ctx) }()
	bg.Add(1)
	go func() { defer bg.Done(); h.awaitBlockd(ctx) }()

	first := true
	err := watch.Run[basaltv1.VM](ctx, h.cfg.Store, schema.VMsPrefix, watch.Handlers[*basaltv1.VM]{
		Sync: func(recs []store.Record[*basaltv1.VM], _ int64) error {
			seen := map[string]bool{}
			for _, r := range recs {
				name := schema.IDFromKey(schema.VMsPrefix, r.Key)
				seen[name] = true
				h.dispatch(name, r.Value, r.ModRevision)
			}
			h.mu.Lock()
			var gone []string
			for name := range h.workers {
				if !seen[name] {
					gone = append(gone, name)
				}
			}
			h.mu.Unlock()
			if first {
				// Machines of VMs deleted while this computed was down: their directories are all that is left.
				ents, _ := os.ReadDir(h.cfg.RunDir)
				for _, e := range ents {
					if e.IsDir() && !seen[e.Name()] && schema.ValidateName("VM", e.Name()) == nil {
						gone = append(gone, e.Name())
					}
				}
				first = false
			}
			for _, name := range gone {
				h.dispatch(name, nil, 0)
			}
			return nil
		},
		Put: func(r store.Record[*basaltv1.VM]) error {
			h.dispatch(schema.IDFromKey(schema.VMsPrefix, r.Key), r.Value, r.ModRevision)
			return nil
		},
		Delete: func(key string, rev int64) error {
			h.dispatch(schema.IDFromKey(schema.VMsPrefix, key), nil, rev)
			return nil
		},
	}, h.log)
	h.wg.Wait()
	bg.Wait()
	h.mu.Lock()
	for name, in := range h.incoming {
		// An incoming machine is left to its fate: the source aborts it, or completes and moves the VM here,
		// where the next computed finds it.
		in.release()
		delete(h.incoming, name)
	}
	h.mu.Unlock()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// publish writes the host record. Publishes are serialized, so the last write carries every field set so far
// (the netd, the blockd and the accelerator are found by different goroutines).
func (h *Host) publish(ctx context.Context) error {
	h.pubMu.Lock()
	defer h.pubMu.Unlock()
	h.mu.Lock()
	rec := proto.Clone(h.hostRec).(*basaltv1.ComputeHost)
	h.mu.Unlock()
	rec.UpdatedAt = timestamppb.Now()
	if _, err := h.cfg.Store.Put(ctx, schema.ComputeHostKey(h.cfg.NodeID), rec); err != nil {
		return fmt.Errorf("publish compute host: %w", err)
	}
	return nil
}

// awaitNetd looks for this host's netd every few seconds until it registers, then publishes it.
func (h *Host) awaitNetd(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
		if id := h.findNode(ctx, basaltv1.NodeKind_NODE_KIND_NETD, nil); id != "" {
			h.mu.Lock()
			h.hostRec.NetdNode = id
			h.mu.Unlock()
			if err := h.publish(ctx); err != nil && ctx.Err() == nil {
				h.log.Warn("publish host", "err", err)
			}
			h.log.Info("this host's netd registered", "netd", id)
			return
		}
	}
}

// awaitBlockd looks for this host's blockd, at once and then every second until it registers, and publishes
// it: the HA controller judges the host by it (docs/ha.md).
func (h *Host) awaitBlockd(ctx context.Context) {
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
		if id := h.blockdNode(ctx); id != "" {
			h.mu.Lock()
			h.hostRec.BlockdNode = id
			h.mu.Unlock()
			if err := h.publish(ctx); err != nil && ctx.Err() == nil {
				h.log.Warn("publish host", "err", err)
			}
			return
		}
	}
}

// followMaintenance keeps the migration slots at the drain's parallelism while the host drains.
func (h *Host) followMaintenance(ctx context.Context) {
	key := schema.HostMaintenanceKey(h.cfg.NodeID)
	set := func(m *basaltv1.HostMaintenance) {
		limit := h.cfg.MaxMigrations
		if m.GetDraining() && m.GetParallel() > 0 {
			limit = int(m.GetParallel())
		}
		h.slots.setLimit(limit)
	}
	watch.Run[basaltv1.HostMaintenance](ctx, h.cfg.Store, key, watch.Handlers[*basaltv1.HostMaintenance]{
		Sync: func(recs []store.Record[*basaltv1.HostMaintenance], _ int64) error {
			var m *basaltv1.HostMaintenance
			for _, r := range recs {
				if r.Key == key {
					m = r.Value
				}
			}
			set(m)
			return nil
		},
		Put: func(r store.Record[*basaltv1.HostMaintenance]) error {
			if r.Key == key {
				set(r.Value)
			}
			return nil
		},
		Delete: func(k string, _ int64) error {
			if k == key {
				set(nil)
			}
			return nil
		},
	}, h.log)
}

// dispatch hands a declaration (nil: deleted) to the VM's worker, starting one if the VM concerns this host.
func (h *Host) dispatch(name string, vm *basaltv1.VM, rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	w := h.workers[name]
	if w == nil {
		if !h.concerns(name, vm) || h.ctx == nil || h.ctx.Err() != nil {
			return
		}
		w = newWorker(h, name)
		h.workers[name] = w
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			w.run(h.ctx)
			h.mu.Lock()
			if h.workers[name] == w {
				delete(h.workers, name)
			}
			h.mu.Unlock()
			// A declaration that arrived while the worker was finishing is looked at again.
			if d, r, unseen := w.latest(); unseen {
				h.dispatch(name, d, r)
			}
		}()
	}
	w.update(vm, rev)
}

// concerns reports whether this host has anything to do for a VM: it runs or will run here, migrates here,
// or left something here (a machine or a directory). Called with h.mu held.
func (h *Host) concerns(name string, vm *basaltv1.VM) bool {
	if vm.GetHost() == h.cfg.NodeID || vm.GetMigration().GetTarget() == h.cfg.NodeID || h.incoming[name] != nil {
		return true
	}
	_, err := os.Stat(h.dir(name))
	return err == nil
}

// dir is a VM's run directory.
func (h *Host) dir(name string) string { return filepath.Join(h.cfg.RunDir, name) }

// worker returns the VM's worker, if it has one.
func (h *Host) worker(name string) *worker {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.workers[name]
}

// workerList returns the workers sorted by VM name.
func (h *Host) workerList() []*worker {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*worker, 0, len(h.workers))
	for _, w := range h.workers {
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// findNode returns the ID of a node of kind registered with this host's name and up, for which ok (if set)
// holds; the first by ID, or "".
func (h *Host) findNode(ctx context.Context, kind basaltv1.NodeKind, ok func(*basaltv1.Node) bool) string {
	nodes, err := registry.List(ctx, h.cfg.Store, kind, false)
	if err != nil {
		return ""
	}
	for _, n := range nodes {
		if n.GetNode().GetHostname() == h.hostname && (ok == nil || ok(n.GetNode())) {
			return n.GetNode().GetId()
		}
	}
	return ""
}

// blockdNode is the node ID of this host's blockd: the one serving BlockdSocket when it is given, else the one
// nbdSocket finds; "" if none is registered (yet).
func (h *Host) blockdNode(ctx context.Context) string {
	return h.findNode(ctx, basaltv1.NodeKind_NODE_KIND_BLOCKD, func(n *basaltv1.Node) bool {
		if h.cfg.BlockdSocket != "" {
			return n.GetNbdSocket() == h.cfg.BlockdSocket
		}
		_, err := os.Stat(n.GetNbdSocket())
		return n.GetNbdSocket() != "" && err == nil
	})
}

// nbdSocket is the NBD socket of this host's blockd.
func (h *Host) nbdSocket(ctx context.Context) (string, error) {
	if h.cfg.BlockdSocket != "" {
		return h.cfg.BlockdSocket, nil
	}
	var sock string
	id := h.findNode(ctx, basaltv1.NodeKind_NODE_KIND_BLOCKD, func(n *basaltv1.Node) bool {
		if n.GetNbdSocket() == "" {
			return false
		}
		if _, err := os.Stat(n.GetNbdSocket()); err != nil {
			return false
		}
		sock = n.GetNbdSocket()
		return true
	})
	if id == "" {
		return "", fmt.Errorf("no blockd on this host (%s) serves NBD on a Unix socket: start one, or give computed --blockd-socket", h.hostname)
	}
	return sock, nil
}

// slots limits the outgoing migrations that run at once; the limit changes while a host drains.
type slots struct {
	mu      sync.Mutex
	limit   int
	inUse   int
	changed chan struct{}
}

func newSlots(limit int) *slots { return &slots{limit: limit, changed: make(chan struct{})} }

func (s *slots) broadcast() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *slots) setLimit(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.limit = n
	s.broadcast()
}

func (s *slots) acquire(ctx context.Context) error {
	for {
		s.mu.Lock()
		if s.inUse < s.limit {
			s.inUse++
			s.mu.Unlock()
			return nil
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (s *slots) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inUse--
	s.broadcast()
}
