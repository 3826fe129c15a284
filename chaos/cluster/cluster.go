// Package cluster runs a multi-host Basalt cluster on one machine for the chaos suite, with each host in its
// own network namespace, and injects the faults the scenarios need.
//
// Layout: the root namespace holds the bridge bch-br (10.213.0.1/24) and metad, listening on the bridge's
// address, with its embedded etcd — or, for the etcd-member-loss scenario, three etcd members (the
// basalt-chaos-etcd program), each in its own namespace bch-eN (10.213.0.2N), with metad and every daemon
// pointed at all three. Host N is the namespace bch-hN (10.213.0.1N on its eth0, a veth to the bridge) running
// blockd-N, whose data directory is on a size-limited tmpfs of its own (so that a full disk is real), and
// computed-N (QEMU under TCG, its VMs attached through blockd-N's Unix socket). A host's processes are the
// processes in its namespace, QEMU included, which is what the faults act on: SIGKILL (the host died),
// SIGSTOP/SIGCONT (frozen, then woken up), a pulled cable (the veth's link down) or a firewall drop (nftables
// inside the namespace), and a filled disk.
//
// Everything the harness creates is named with the bch- prefix; Start first removes whatever an earlier,
// crashed run left (processes, namespaces, interfaces, mounts), under a lock that keeps two harnesses from
// running at once. It depends on iproute2 (`ip netns exec`), the netlink, netns and nftables libraries, the
// public API, and etcd's client for the members' status.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Ports. Every host has its own address, so every host's daemons use the same ports.
const (
	MetadPort      = 7400
	etcdClientPort = 7401
	etcdPeerPort   = 7402
	BlockdPort     = 7410
	NBDPort        = 7411
	ComputedPort   = 7430
	metricsPort    = 7431
	memberClient   = 2379
	memberPeer     = 2380
)

// etcdMemberBinary is the program an etcd member runs (chaos/cmd/basalt-chaos-etcd).
const etcdMemberBinary = "basalt-chaos-etcd"

// Options configure a chaos cluster.
type Options struct {
	// Dir holds every daemon's data and logs (a host's blockd data on its tmpfs, mounted below Dir). Keep it
	// short: QEMU's Unix sockets live below it, and their paths are limited to 107 bytes.
	Dir string
	// BinDir holds metad, blockd and computed (and basalt-chaos-etcd when EtcdMembers is 3).
	BinDir string
	// EtcdBin is the etcd member program; default BinDir/basalt-chaos-etcd.
	EtcdBin string
	// Hosts is the number of hosts (1 to 9; default 3).
	Hosts int
	// EtcdMembers is 0 or 1 for metad's embedded single-node etcd, or 3 for a three-member etcd cluster.
	EtcdMembers int
	// LeaseTTL is every daemon's lease TTL (default 2 s, the minimum): how long a dead host still looks alive.
	LeaseTTL time.Duration
	// DiskSize is the size of each host's blockd tmpfs (default 1 GiB).
	DiskSize int64
	// HostMemory is the memory each computed offers to VMs (default 2G).
	HostMemory string
	// Extra are additional flags per daemon kind ("metad", "blockd", "computed").
	Extra map[string][]string
	// StartTimeout bounds Start (default 2 minutes).
	StartTimeout time.Duration
	Log          *slog.Logger
}

func (o *Options) defaults() error {
	if o.Dir == "" || o.BinDir == "" {
		return errors.New("chaos cluster: Dir and BinDir are required")
	}
	if o.Hosts == 0 {
		o.Hosts = 3
	}
	if o.Hosts < 1 || o.Hosts > 9 {
		return fmt.Errorf("chaos cluster: %d hosts (1 to 9)", o.Hosts)
	}
	if o.EtcdMembers != 0 && o.EtcdMembers != 1 && o.EtcdMembers != 3 {
		return fmt.Errorf("chaos cluster: %d etcd members (1 or 3)", o.EtcdMembers)
	}
	if o.EtcdBin == "" {
		o.EtcdBin = filepath.Join(o.BinDir, etcdMemberBinary)
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 2 * time.Second
	}
	if o.DiskSize == 0 {
		o.DiskSize = 1 << 30
	}
	if o.HostMemory == "" {
		o.HostMemory = "2G"
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return fmt.Errorf("chaos cluster: %w", err)
	}
	o.Dir = dir
	return nil
}

// Check returns why the harness cannot run here (not root, no iproute2, no QEMU), or nil.
func Check() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, veth, nftables, tmpfs mounts)")
	}
	for _, tool := range []string{"ip", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("needs %s on PATH", tool)
		}
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		return fmt.Errorf("no network namespaces: %w", err)
	}
	return nil
}

// Cluster is a running chaos cluster.
type Cluster struct {
	Opts  Options
	Hosts []*Host
	// Etcd are the etcd members, when the cluster runs three; empty with metad's embedded etcd.
	Etcd  []*Member
	Metad *Daemon
	// Consoles follows every VM's console log on every host.
	Consoles *Consoles

	// The API, through metad.
	VMs         basaltv1.VMServiceClient
	Volumes     basaltv1.VolumeServiceClient
	Checkpoints basaltv1.CheckpointServiceClient
	Nodes       basaltv1.ClusterServiceClient

	conn       *grpc.ClientConn
	etcdClient *clientv3.Client

	lock   *os.File
	mounts []string
	log    *slog.Logger
}

// Endpoint is metad's API address.
func (c *Cluster) Endpoint() string {
	return net.JoinHostPort(BridgeIP.String(), strconv.Itoa(MetadPort))
}

// EtcdEndpoints are the client URLs of the cluster's etcd.
func (c *Cluster) EtcdEndpoints() []string {
	if len(c.Etcd) == 0 {
		return []string{"http://" + net.JoinHostPort(BridgeIP.String(), strconv.Itoa(etcdClientPort))}
	}
	var eps []string
	for _, m := range c.Etcd {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Host returns the host whose computed has node ID id, or nil.
func (c *Cluster) Host(id string) *Host {
	for _, h := range c.Hosts {
		if h.ComputedID() == id || h.Name == id {
			return h
		}
	}
	return nil
}

// Daemons returns every daemon of the cluster.
func (c *Cluster) Daemons() []*Daemon {
	var all []*Daemon
	for _, m := range c.Etcd {
		all = append(all, m.Daemon)
	}
	all = append(all, c.Metad)
	for _, h := range c.Hosts {
		all = append(all, h.Blockd, h.Computed)
	}
	// A Start that failed half-way leaves some unset.
	var ds []*Daemon
	for _, d := range all {
		if d != nil {
			ds = append(ds, d)
		}
	}
	return ds
}

// Start builds the network, starts the daemons and waits until every node is up. On error nothing is left
// behind.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if err := Check(); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	bins := []string{"metad", "blockd", "computed"}
	for _, b := range bins {
		if _, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil {
			return nil, fmt.Errorf("chaos cluster: %s not found in %s (run `make build`)", b, o.BinDir)
		}
	}
	if o.EtcdMembers == 3 {
		if _, err := os.Stat(o.EtcdBin); err != nil {
			return nil, fmt.Errorf("chaos cluster: etcd member program %s not found (run `make chaos`, or build ./chaos/cmd/basalt-chaos-etcd)", o.EtcdBin)
		}
	}
	c := &Cluster{Opts: o, log: o.Log}
	// The wait for another run is not part of the start's time budget.
	if c.lock, err = acquireLock(ctx, o.Log); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()
	if err := cleanup(ctx); err != nil {
		return nil, fmt.Errorf("chaos cluster: clean up an earlier run: %w", err)
	}
	if err := checkSubnetFree(); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	if err := os.MkdirAll(o.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	if err := createBridge(); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}

	if o.EtcdMembers == 3 {
		if err := c.startEtcd(ctx); err != nil {
			return nil, err
		}
	}
	eps := strings.Join(c.EtcdEndpoints(), ",")
	ttl := o.LeaseTTL.String()
	mdir := filepath.Join(o.Dir, "metad")
	if err := os.MkdirAll(mdir, 0o750); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	margs := []string{"--node-id", "metad-1", "--data-dir", filepath.Join(mdir, "data"), "--listen", c.Endpoint(),
		"--lease-ttl", ttl, "--failure-domain", "metad"}
	if len(c.Etcd) > 0 {
		margs = append(margs, "--etcd-endpoints", eps)
	} else {
		margs = append(margs, "--etcd-client-url", eps,
			"--etcd-peer-url", "http://"+net.JoinHostPort(BridgeIP.String(), strconv.Itoa(etcdPeerPort)))
	}
	c.Metad = &Daemon{ID: "metad-1", Kind: "metad", Bin: filepath.Join(o.BinDir, "metad"),
		Args: append(margs, o.Extra["metad"]...), Log: filepath.Join(mdir, "metad.log")}
	if err := c.Metad.start(); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	if c.conn, err = grpc.NewClient(c.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
		return nil, fmt.Errorf("chaos cluster: connect to metad: %w", err)
	}
	c.VMs = basaltv1.NewVMServiceClient(c.conn)
	c.Volumes = basaltv1.NewVolumeServiceClient(c.conn)
	c.Checkpoints = basaltv1.NewCheckpointServiceClient(c.conn)
	c.Nodes = basaltv1.NewClusterServiceClient(c.conn)
	if err := c.WaitUp(ctx, []*Daemon{c.Metad}, o.StartTimeout); err != nil {
		return nil, err
	}
	if c.etcdClient, err = clientv3.New(clientv3.Config{Endpoints: c.EtcdEndpoints(), DialTimeout: 2 * time.Second,
		Logger: zap.NewNop()}); err != nil {
		return nil, fmt.Errorf("chaos cluster: etcd client: %w", err)
	}

	var nodes []*Daemon
	roots := map[string]string{}
	for i := 1; i <= o.Hosts; i++ {
		h, err := c.addHost(i, eps, ttl)
		if err != nil {
			return nil, err
		}
		roots[h.ComputedID()] = h.RunDir()
		nodes = append(nodes, h.Daemons()...)
	}
	c.Consoles = newConsoles(roots)
	for _, h := range c.Hosts {
		for _, d := range h.Daemons() {
			if err := d.start(); err != nil {
				return nil, fmt.Errorf("chaos cluster: %w", err)
			}
		}
	}
	if err := c.WaitUp(ctx, nodes, o.StartTimeout); err != nil {
		return nil, err
	}
	c.log.Info("chaos cluster up", "hosts", o.Hosts, "etcd members", max(1, len(c.Etcd)), "dir", o.Dir)
	return c, nil
}

// addHost creates host i's namespace, cable and disk, and its daemons (not started).
func (c *Cluster) addHost(i int, eps, ttl string) (*Host, error) {
	o := c.Opts
	name := fmt.Sprintf("h%d", i)
	h := &Host{Name: name, NS: Prefix + name, IP: subnetAddr(byte(10 + i)), Dir: filepath.Join(o.Dir, name), c: c}
	h.DiskDir = filepath.Join(h.Dir, "disk")
	if err := newNamedNS(h.NS); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	c.Hosts = append(c.Hosts, h) // from here on, Close removes it
	if err := cable(h.NS, h.IP); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	for _, d := range []string{"logs", "computed", "vms"} {
		if err := os.MkdirAll(filepath.Join(h.Dir, d), 0o750); err != nil {
			return nil, fmt.Errorf("chaos cluster: %w", err)
		}
	}
	if err := mountDisk(h.NS, h.DiskDir, o.DiskSize); err != nil {
		return nil, fmt.Errorf("chaos cluster: %w", err)
	}
	c.mounts = append(c.mounts, h.DiskDir)
	ip := h.IP.String()
	common := func(id string, port int, data string) []string {
		return []string{"--node-id", id, "--data-dir", data, "--listen", net.JoinHostPort(ip, strconv.Itoa(port)),
			"--lease-ttl", ttl, "--failure-domain", name, "--etcd-endpoints", eps}
	}
	blockdData := filepath.Join(h.DiskDir, "blockd")
	bid, cid := fmt.Sprintf("blockd-%d", i), fmt.Sprintf("computed-%d", i)
	h.Blockd = &Daemon{ID: bid, Kind: "blockd", NS: h.NS, Bin: filepath.Join(o.BinDir, "blockd"),
		Args: append(append(common(bid, BlockdPort, blockdData), "--nbd-listen", h.NBDAddr()), o.Extra["blockd"]...),
		Log:  filepath.Join(h.Dir, "logs", "blockd.log")}
	h.Computed = &Daemon{ID: cid, Kind: "computed", NS: h.NS, Bin: filepath.Join(o.BinDir, "computed"),
		Args: append(append(common(cid, ComputedPort, filepath.Join(h.Dir, "computed")),
			"--blockd-socket", filepath.Join(blockdData, "nbd.sock"), "--run-dir", h.RunDir(),
			"--migration-host", ip, "--memory", o.HostMemory, "--qemu-accel", "tcg",
			// Large enough that a long randomized run never rotates away what the checkers read.
			"--console-log-size", "64M",
			"--metrics-listen", net.JoinHostPort(ip, strconv.Itoa(metricsPort))), o.Extra["computed"]...),
		Log: filepath.Join(h.Dir, "logs", "computed.log")}
	return h, nil
}

// startEtcd starts three etcd members, each in its own namespace, and waits until they serve.
func (c *Cluster) startEtcd(ctx context.Context) error {
	var initial []string
	for i := 1; i <= 3; i++ {
		m := &Member{Name: fmt.Sprintf("etcd-%d", i), NS: fmt.Sprintf("%se%d", Prefix, i), IP: subnetAddr(byte(20 + i))}
		m.ClientURL = "http://" + net.JoinHostPort(m.IP.String(), strconv.Itoa(memberClient))
		initial = append(initial, m.Name+"=http://"+net.JoinHostPort(m.IP.String(), strconv.Itoa(memberPeer)))
		c.Etcd = append(c.Etcd, m)
	}
	for _, m := range c.Etcd {
		if err := newNamedNS(m.NS); err != nil {
			return fmt.Errorf("chaos cluster: %w", err)
		}
		if err := cable(m.NS, m.IP); err != nil {
			return fmt.Errorf("chaos cluster: %w", err)
		}
		dir := filepath.Join(c.Opts.Dir, m.Name)
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return fmt.Errorf("chaos cluster: %w", err)
		}
		m.Daemon = &Daemon{ID: m.Name, Kind: "etcd", NS: m.NS, Bin: c.Opts.EtcdBin, Log: filepath.Join(dir, "etcd.log"),
			Args: []string{"--name", m.Name, "--data-dir", filepath.Join(dir, "data"), "--client-url", m.ClientURL,
				"--peer-url", "http://" + net.JoinHostPort(m.IP.String(), strconv.Itoa(memberPeer)),
				"--initial-cluster", strings.Join(initial, ",")}}
		if err := m.Daemon.start(); err != nil {
			return fmt.Errorf("chaos cluster: %w", err)
		}
	}
	for _, m := range c.Etcd {
		if err := c.WaitMember(ctx, m, time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// WaitMember waits until etcd member m answers a status request as part of a cluster with a leader.
func (c *Cluster) WaitMember(ctx context.Context, m *Member, within time.Duration) error {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.ClientURL}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd client for %s: %w", m.Name, err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var last error
	for {
		sctx, scancel := context.WithTimeout(ctx, time.Second)
		st, err := cli.Status(sctx, m.ClientURL)
		scancel()
		switch {
		case err != nil:
			last = err
		case st.Leader == 0:
			last = errors.New("no leader")
		default:
			return nil
		}
		if err := m.Daemon.exitErr(); err != nil {
			return fmt.Errorf("etcd member %s exited (%v): %s", m.Name, err, m.Daemon.Tail(5))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd member %s not serving after %s: %v", m.Name, within, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// EtcdLeader returns the member that is the etcd leader now.
func (c *Cluster) EtcdLeader(ctx context.Context) (*Member, error) {
	for _, m := range c.Etcd {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := c.etcdClient.Status(sctx, m.ClientURL)
		cancel()
		if err != nil {
			continue
		}
		for _, x := range c.Etcd {
			xctx, xcancel := context.WithTimeout(ctx, time.Second)
			xs, err := c.etcdClient.Status(xctx, x.ClientURL)
			xcancel()
			if err == nil && xs.Header.GetMemberId() == st.Leader {
				return x, nil
			}
		}
	}
	return nil, errors.New("no etcd member reports a leader that answers")
}

// EtcdHealthy returns how many members answer with a leader.
func (c *Cluster) EtcdHealthy(ctx context.Context) int {
	n := 0
	for _, m := range c.Etcd {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := c.etcdClient.Status(sctx, m.ClientURL)
		cancel()
		if err == nil && st.Leader != 0 {
			n++
		}
	}
	return n
}

// ReviveMember restarts a killed etcd member on its data and waits until it serves again.
func (c *Cluster) ReviveMember(ctx context.Context, m *Member) error {
	if !m.Daemon.Running() {
		if err := m.Daemon.start(); err != nil {
			return fmt.Errorf("revive etcd member %s: %w", m.Name, err)
		}
	}
	return c.WaitMember(ctx, m, time.Minute)
}

// WaitUp waits until every daemon in ds is listed up by metad with the pid of its current incarnation (so a
// restarted node's old, not yet expired lease is not taken for the new one). A daemon that exits fails the
// wait with its log's tail.
func (c *Cluster) WaitUp(ctx context.Context, ds []*Daemon, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var last error
	for {
		for _, d := range ds {
			if err := d.exitErr(); err != nil {
				return fmt.Errorf("%s exited while starting (%v):\n%s", d.ID, err, d.Tail(10))
			}
		}
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := c.Nodes.ListNodes(rctx, &basaltv1.ListNodesRequest{})
		rcancel()
		if err == nil {
			up := map[string]int32{}
			for _, n := range resp.GetNodes() {
				if n.GetState() == basaltv1.NodeState_NODE_STATE_UP {
					up[n.GetNode().GetId()] = n.GetLiveness().GetPid()
				}
			}
			var missing []string
			for _, d := range ds {
				if pid, ok := up[d.ID]; !ok || int(pid) != d.PID() {
					missing = append(missing, d.ID)
				}
			}
			if len(missing) == 0 {
				return nil
			}
			last = fmt.Errorf("not up yet: %s", strings.Join(missing, ", "))
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nodes not up within %s: %v", within, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// NodeStates returns every registered node's state.
func (c *Cluster) NodeStates(ctx context.Context) (map[string]basaltv1.NodeState, error) {
	resp, err := c.Nodes.ListNodes(ctx, &basaltv1.ListNodesRequest{IncludeDown: true})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	out := map[string]basaltv1.NodeState{}
	for _, n := range resp.GetNodes() {
		out[n.GetNode().GetId()] = n.GetState()
	}
	return out, nil
}

// QEMUs returns the hypervisor processes of every host by VM name.
func (c *Cluster) QEMUs() (map[string][]QEMU, error) {
	out := map[string][]QEMU{}
	for _, h := range c.Hosts {
		ps, err := h.Procs()
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			if vm, ok := p.QEMUGuest(); ok {
				out[vm] = append(out[vm], QEMU{Host: h.ComputedID(), Proc: p})
			}
		}
	}
	return out, nil
}

// QEMU is a hypervisor process on a host.
type QEMU struct {
	Host string
	Proc
}

// LogTails returns the last n lines of every daemon's log, for a failure report.
func (c *Cluster) LogTails(n int) string {
	var sb strings.Builder
	for _, d := range c.Daemons() {
		fmt.Fprintf(&sb, "==== %s (%s) ====\n%s\n", d.ID, d.Log, d.Tail(n))
	}
	return sb.String()
}

// Close kills every process of the cluster and removes its namespaces, interfaces and mounts, and etcd's data
// (its write-ahead log preallocates 64 MiB a member). The rest of the directory — daemon logs, console logs —
// is left for a post-mortem.
func (c *Cluster) Close() error {
	if c.Consoles != nil {
		c.Consoles.close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs []error
	var namespaces []string
	for _, h := range c.Hosts {
		namespaces = append(namespaces, h.NS)
		if err := killNS(ctx, h.NS); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Metad != nil {
		c.Metad.stop(10 * time.Second)
	}
	for _, m := range c.Etcd {
		namespaces = append(namespaces, m.NS)
		if err := killNS(ctx, m.NS); err != nil {
			errs = append(errs, err)
		}
	}
	if c.etcdClient != nil {
		c.etcdClient.Close()
	}
	if c.conn != nil {
		c.conn.Close()
	}
	for _, d := range c.mounts {
		errs = append(errs, unmountDisk(d))
	}
	// Only what this run made: anything else named bch- is a crashed run's, for the next Start to clean up
	// properly (its processes first).
	errs = append(errs, removeNet(namespaces))
	etcdData := []string{filepath.Join(c.Opts.Dir, "metad", "data", "etcd")}
	for _, m := range c.Etcd {
		etcdData = append(etcdData, filepath.Join(c.Opts.Dir, m.Name, "data"))
	}
	for _, d := range etcdData {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("remove etcd data: %w", err))
		}
	}
	if c.lock != nil {
		c.lock.Close() // releases the flock
	}
	return errors.Join(errs...)
}

// cleanup removes what a crashed run left behind: processes in bch- namespaces and stray daemons on the chaos
// subnet, the namespaces, the bridge and veths, and bch- tmpfs mounts. Start calls it under the lock.
func cleanup(ctx context.Context) error {
	var errs []error
	ents, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("list %s: %w", netnsDir, err))
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), Prefix) {
			if err := killNS(ctx, e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, killStrays(), cleanupMounts(), cleanupNet())
	return errors.Join(errs...)
}

// lockPath serialises harnesses on this machine: they share the bch- names and the subnet.
var lockPath = filepath.Join(os.TempDir(), "basalt-chaos.lock")

// acquireLock takes the harness lock, waiting for another run to finish.
func acquireLock(ctx context.Context, log *slog.Logger) (*os.File, error) {
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("chaos cluster: open %s: %w", lockPath, err)
	}
	logged := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("chaos cluster: lock %s: %w", lockPath, err)
		}
		if !logged {
			log.Info("waiting for another chaos run to finish", "lock", lockPath)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("chaos cluster: another chaos run holds %s: %w", lockPath, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
