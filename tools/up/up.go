// Package up runs a whole Basalt cluster on one machine: an embedded-etcd metad, N blockd, one or more computed
// and one netd, each its own process, every port on 127.0.0.1, all data under one directory. It waits until every
// node is up, writes the client config so `basalt` in another terminal just works, restarts a daemon that
// crashes (after a delay, so that the crash is seen by the cluster exactly as a real node failure would be),
// and on cancellation stops the nodes, then metad, cleanly. It starts daemons as processes from a bin
// directory, talks to metad over the public API, and depends on internal/datadir and tools/clientconfig.
package up

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/datadir"
	"github.com/basalt-hv/basalt/tools/clientconfig"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Options configure a local cluster.
type Options struct {
	// DataDir holds every node's data, the logs and the state file.
	DataDir string
	// Blockd is the number of storage nodes (1 to MaxBlockd).
	Blockd int
	// Computed is the number of compute nodes (1 to MaxComputed; 0 means 1). Two are enough for live
	// migration between them on one machine.
	Computed int
	// BasePort is the first of the ports the cluster uses; see Plan for the layout.
	BasePort int
	// LeaseTTL is every node's lease TTL.
	LeaseTTL time.Duration
	// RestartDelay is how long a crashed daemon stays down before it is restarted; 0 disables restarts.
	RestartDelay time.Duration
	// Debug gives every daemon a pprof endpoint on the last port of its range (metad: BasePort+9).
	Debug bool
	// DownOut is how long a blockd may be down before its data is re-placed (metad's --down-out-interval);
	// 0 keeps metad's default.
	DownOut time.Duration
	// BinDir holds the metad, blockd, computed and netd binaries.
	BinDir string
	// ConfigPath is the client config file to write; empty writes none.
	ConfigPath string
	// StartTimeout bounds the wait for the cluster to come up.
	StartTimeout time.Duration
	// Out receives progress lines.
	Out io.Writer
}

// MaxBlockd bounds --blockd so that the port plan stays inside 100 ports.
const MaxBlockd = 7

// MaxComputed bounds --computed; blockd and computed nodes together are at most MaxBlockd+1, for the same
// reason.
const MaxComputed = 3

// StateFile is written under DataDir while the cluster runs: which processes run where (for scripts, the
// chaos harness and operators).
const StateFile = "up.json"

// Process is one daemon of the cluster.
type Process struct {
	ID      string   `json:"id"`
	Kind    string   `json:"kind"`
	GRPC    string   `json:"grpc"`
	PID     int      `json:"pid"`
	Log     string   `json:"log"`
	DataDir string   `json:"data_dir"`
	Args    []string `json:"args"`
	// Ports are every port this process listens on (checked free before anything starts).
	Ports []int `json:"-"`
}

// State is the content of the state file.
type State struct {
	Endpoint  string     `json:"endpoint"`
	EtcdURL   string     `json:"etcd_url"`
	DataDir   string     `json:"data_dir"`
	Processes []*Process `json:"processes"`
}

// Plan lays out the cluster's processes and ports: metad's API on BasePort and its etcd on BasePort+1 (client)
// and BasePort+2 (peer); node i (blockd first, then computed, then netd) gets the ten ports from
// BasePort+10*(i+1): its gRPC server on the first, a blockd's NBD server or a computed's metrics endpoint on the
// second. Computed number i attaches its VMs' disks through blockd number i (cycling when there are fewer).
func Plan(o Options) (*State, error) {
	if o.Blockd < 1 || o.Blockd > MaxBlockd {
		return nil, fmt.Errorf("--blockd %d is out of range (1 to %d)", o.Blockd, MaxBlockd)
	}
	if o.Computed == 0 {
		o.Computed = 1
	}
	if o.Computed < 1 || o.Computed > MaxComputed || o.Blockd+o.Computed > MaxBlockd+1 {
		return nil, fmt.Errorf("--computed %d is out of range (1 to %d, and at most %d blockd and computed together)", o.Computed, MaxComputed, MaxBlockd+1)
	}
	count := o.Blockd + o.Computed + 1
	if o.BasePort < 1024 || o.BasePort+10*(count+1) > 65535 {
		return nil, fmt.Errorf("--base-port %d is out of range (1024 to %d)", o.BasePort, 65535-10*(count+1))
	}
	hp := func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
	dataDir, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("resolve --data-dir: %w", err)
	}
	etcdURL := "http://" + hp(o.BasePort+1)
	ttl := o.LeaseTTL.String()
	s := &State{Endpoint: hp(o.BasePort), EtcdURL: etcdURL, DataDir: dataDir}
	add := func(id, kind string, grpcPort int, ports []int, extra ...string) {
		dir := filepath.Join(dataDir, id)
		args := append([]string{
			"--node-id", id, "--data-dir", dir, "--listen", hp(grpcPort),
			"--lease-ttl", ttl, "--failure-domain", id,
		}, extra...)
		if o.Debug {
			// Every range starts at a multiple of ten from BasePort; its last port is free for pprof.
			debugPort := grpcPort - (grpcPort-o.BasePort)%10 + 9
			args = append(args, "--debug-listen", hp(debugPort))
			ports = append(ports, debugPort)
		}
		s.Processes = append(s.Processes, &Process{
			ID: id, Kind: kind, GRPC: hp(grpcPort), DataDir: dir, Args: args, Ports: ports,
			Log: filepath.Join(dataDir, "logs", id+".log"),
		})
	}
	metadArgs := []string{"--etcd-client-url", etcdURL, "--etcd-peer-url", "http://" + hp(o.BasePort+2)}
	if o.DownOut > 0 {
		metadArgs = append(metadArgs, "--down-out-interval", o.DownOut.String())
	}
	add("metad-1", "metad", o.BasePort, []int{o.BasePort, o.BasePort + 1, o.BasePort + 2}, metadArgs...)
	var nodes []struct{ id, kind string }
	for i := 1; i <= o.Blockd; i++ {
		nodes = append(nodes, struct{ id, kind string }{fmt.Sprintf("blockd-%d", i), "blockd"})
	}
	for i := 1; i <= o.Computed; i++ {
		nodes = append(nodes, struct{ id, kind string }{fmt.Sprintf("computed-%d", i), "computed"})
	}
	nodes = append(nodes, struct{ id, kind string }{"netd-1", "netd"})
	computed := 0
	for i, n := range nodes {
		port := o.BasePort + 10*(i+1)
		switch n.kind {
		case "blockd":
			add(n.id, n.kind, port, []int{port, port + 1}, "--etcd-endpoints", etcdURL, "--nbd-listen", hp(port+1))
		case "computed":
			// Every daemon runs on this one machine, so a computed cannot find "its" blockd by host name: it is
			// told which one to attach through (blockd's NBD socket is <its data dir>/nbd.sock).
			blockd := fmt.Sprintf("blockd-%d", computed%o.Blockd+1)
			computed++
			add(n.id, n.kind, port, []int{port, port + 1}, "--etcd-endpoints", etcdURL,
				"--blockd-socket", filepath.Join(dataDir, blockd, "nbd.sock"), "--metrics-listen", hp(port+1))
		default:
			add(n.id, n.kind, port, []int{port}, "--etcd-endpoints", etcdURL)
		}
	}
	return s, nil
}

// Run starts the cluster, supervises it until ctx ends, then stops it. It returns an error only if the cluster
// could not be started (and then nothing it started is left running) or could not be stopped cleanly.
func Run(ctx context.Context, o Options) error {
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	state, err := Plan(o)
	if err != nil {
		return err
	}
	for _, p := range state.Processes {
		bin := filepath.Join(o.BinDir, p.Kind)
		if _, err := os.Stat(bin); err != nil {
			return fmt.Errorf("daemon binary %s not found (build with `make build`, or pass --bin-dir): %w", bin, errors.Unwrap(err))
		}
	}
	dir, err := datadir.Open(state.DataDir, "basalt-up", "")
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := os.MkdirAll(filepath.Join(state.DataDir, "logs"), 0o750); err != nil {
		return fmt.Errorf("create log directory: %w", err)
	}
	for _, p := range state.Processes {
		for _, port := range p.Ports {
			if err := checkFree(port); err != nil {
				return fmt.Errorf("port %d (for %s) is not free: %w; choose other ports with --base-port", port, p.ID, err)
			}
		}
	}

	c := &cluster{opts: o, state: state, procs: map[string]*proc{}, backoffs: map[string]time.Duration{}, stopped: make(chan struct{})}
	if err := c.start(ctx); err != nil {
		c.stop()
		return err
	}
	if err := c.writeState(); err != nil {
		c.stop()
		return err
	}
	if o.ConfigPath != "" {
		if err := clientconfig.Save(o.ConfigPath, clientconfig.Config{Endpoint: state.Endpoint, DataDir: state.DataDir}); err != nil {
			c.stop()
			return err
		}
	}
	c.banner()
	<-ctx.Done()
	c.logf("stopping the cluster")
	err = c.stop()
	os.Remove(filepath.Join(state.DataDir, StateFile))
	if err != nil {
		return err
	}
	c.logf("stopped")
	return nil
}

func checkFree(port int) error {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		var se *os.SyscallError
		if errors.As(err, &se) {
			return se.Err
		}
		return err
	}
	return l.Close()
}

// cluster is the running set of processes.
type cluster struct {
	opts  Options
	state *State

	mu       sync.Mutex
	procs    map[string]*proc
	backoffs map[string]time.Duration
	stopping bool
	// stopped is closed when stopping begins; it wakes restarts that are waiting out their delay.
	stopped chan struct{}
	wg      sync.WaitGroup
}

// proc is one supervised daemon.
type proc struct {
	spec *Process
	cmd  *exec.Cmd
	// exited is closed when the current incarnation has exited; err is its exit status.
	exited chan struct{}
	err    error
}

func (c *cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.opts.Out, "%s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// start starts metad, waits until it answers, then starts every node and waits until all are up.
func (c *cluster) start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.StartTimeout)
	defer cancel()
	conn, err := grpc.NewClient(c.state.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to metad: %w", err)
	}
	defer conn.Close()
	api := basaltv1.NewClusterServiceClient(conn)

	metad := c.state.Processes[0]
	if err := c.launch(metad); err != nil {
		return err
	}
	c.logf("started %s, waiting for its embedded etcd and API", metad.ID)
	if err := c.waitUp(ctx, api, []*Process{metad}); err != nil {
		return err
	}
	nodes := c.state.Processes[1:]
	for _, p := range nodes {
		if err := c.launch(p); err != nil {
			return err
		}
		c.logf("started %s", p.ID)
	}
	return c.waitUp(ctx, api, nodes)
}

// waitUp polls the API until every process in ps is listed as up, failing early if one of them exits.
func (c *cluster) waitUp(ctx context.Context, api basaltv1.ClusterServiceClient, ps []*Process) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		for _, p := range ps {
			c.mu.Lock()
			pr := c.procs[p.ID]
			c.mu.Unlock()
			select {
			case <-pr.exited:
				return fmt.Errorf("%s exited while starting (%v): %s", p.ID, pr.err, lastLine(p.Log))
			default:
			}
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := api.ListNodes(rctx, &basaltv1.ListNodesRequest{})
		cancel()
		if err == nil {
			up := map[string]bool{}
			for _, n := range resp.GetNodes() {
				up[n.GetNode().GetId()] = n.GetState() == basaltv1.NodeState_NODE_STATE_UP
			}
			missing := 0
			for _, p := range ps {
				if !up[p.ID] {
					missing++
				}
			}
			if missing == 0 {
				return nil
			}
			lastErr = fmt.Errorf("%d of %d nodes not up yet", missing, len(ps))
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster not up after %s: %v", c.opts.StartTimeout, lastErr)
		case <-tick.C:
		}
	}
}

// lastLine returns the last non-empty line of a log file: usually the daemon's one-line error.
func lastLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "no log"
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return fmt.Sprintf("%s (log: %s)", lines[len(lines)-1], path)
}

// errStopping is returned by launch once the cluster is stopping.
var errStopping = errors.New("cluster is stopping")

// launch starts one incarnation of p and a goroutine that supervises it. It holds the lock across the start so
// that stop never misses a process launched while it begins.
func (c *cluster) launch(p *Process) error {
	logf, err := os.OpenFile(p.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log of %s: %w", p.ID, err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(c.opts.BinDir, p.Kind), p.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: Ctrl-C reaches only basalt up, which then stops the daemons in order.
		Setpgid: true,
		// If basalt up itself is killed, the daemons are told to stop rather than left running.
		Pdeathsig: syscall.SIGTERM,
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return errStopping
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.ID, err)
	}
	pr := &proc{spec: p, cmd: cmd, exited: make(chan struct{})}
	p.PID = cmd.Process.Pid
	c.procs[p.ID] = pr
	started := time.Now()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		pr.err = cmd.Wait()
		close(pr.exited)
		c.supervise(p, pr, time.Since(started))
	}()
	return nil
}

// supervise restarts a daemon that exited on its own, after RestartDelay, doubled while it keeps crashing
// soon after starting.
func (c *cluster) supervise(p *Process, pr *proc, ran time.Duration) {
	c.mu.Lock()
	stopping := c.stopping
	c.mu.Unlock()
	if stopping {
		return
	}
	if c.opts.RestartDelay == 0 {
		c.logf("%s exited (%v); not restarting (--restart-delay 0)", p.ID, pr.err)
		return
	}
	delay := c.opts.RestartDelay
	if ran < 10*time.Second {
		delay = min(c.backoff(p.ID), 5*time.Minute)
	} else {
		c.resetBackoff(p.ID)
	}
	c.logf("%s exited (%v); restarting in %s", p.ID, pr.err, delay)
	select {
	case <-time.After(delay):
	case <-c.stopped:
		return
	}
	if err := c.launch(p); err != nil {
		if !errors.Is(err, errStopping) {
			c.logf("restart %s: %v", p.ID, err)
		}
		return
	}
	c.mu.Lock()
	pid := p.PID
	c.mu.Unlock()
	c.logf("restarted %s (pid %d)", p.ID, pid)
	if err := c.writeState(); err != nil {
		c.logf("%v", err)
	}
}

// backoffs tracks the current restart delay of crash-looping daemons, keyed by process ID.
func (c *cluster) backoff(id string) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := c.backoffs[id]
	if d == 0 {
		d = c.opts.RestartDelay
	} else {
		d *= 2
	}
	c.backoffs[id] = d
	return d
}

func (c *cluster) resetBackoff(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.backoffs, id)
}

// stop stops the nodes, then metad (the nodes leave the cluster through it), each with SIGTERM and, after a
// grace period, SIGKILL.
func (c *cluster) stop() error {
	c.mu.Lock()
	if !c.stopping {
		c.stopping = true
		close(c.stopped)
	}
	var nodes, metad []*proc
	for _, p := range c.state.Processes {
		pr, ok := c.procs[p.ID]
		if !ok {
			continue
		}
		if p.Kind == "metad" {
			metad = append(metad, pr)
		} else {
			nodes = append(nodes, pr)
		}
	}
	c.mu.Unlock()
	errs := terminate(nodes, 15*time.Second)
	errs = append(errs, terminate(metad, 15*time.Second)...)
	c.wg.Wait()
	return errors.Join(errs...)
}

// terminate sends SIGTERM to every process, waits up to grace, then kills the rest.
func terminate(ps []*proc, grace time.Duration) []error {
	for _, p := range ps {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.After(grace)
	var errs []error
	for _, p := range ps {
		select {
		case <-p.exited:
		case <-deadline:
			p.cmd.Process.Kill()
			<-p.exited
			errs = append(errs, fmt.Errorf("%s did not stop within %s and was killed", p.spec.ID, grace))
		}
	}
	return errs
}

// writeState writes the state file atomically.
func (c *cluster) writeState() error {
	c.mu.Lock()
	b, err := json.MarshalIndent(c.state, "", "  ")
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	path := filepath.Join(c.state.DataDir, StateFile)
	if err := os.WriteFile(path+".tmp", append(b, '\n'), 0o640); err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	return nil
}

// ReadState reads the state file of a running cluster.
func ReadState(dataDir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("read cluster state (is basalt up running on %s?): %w", dataDir, err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decode %s: %w", filepath.Join(dataDir, StateFile), err)
	}
	return &s, nil
}

func (c *cluster) banner() {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.opts.Out
	fmt.Fprintf(w, "\nBasalt is up: %d nodes on 127.0.0.1, data in %s\n\n", len(c.state.Processes), c.state.DataDir)
	fmt.Fprintf(w, "  %-12s %-9s %-8s %-21s %s\n", "NODE", "KIND", "PID", "GRPC", "LOG")
	for _, p := range c.state.Processes {
		fmt.Fprintf(w, "  %-12s %-9s %-8d %-21s %s\n", p.ID, p.Kind, p.PID, p.GRPC, p.Log)
	}
	fmt.Fprintf(w, "\n  API (metad):  %s\n  etcd:         %s\n", c.state.Endpoint, c.state.EtcdURL)
	if c.opts.ConfigPath != "" {
		fmt.Fprintf(w, "  client config: %s\n", c.opts.ConfigPath)
	}
	fmt.Fprintf(w, "\nIn another terminal:\n  basalt node list\n  basalt volume create disk0 --size 10G\n  basalt volume inspect disk0      # NBD URIs to attach it with\n\nPress Ctrl-C to stop the cluster.\n\n")
}
