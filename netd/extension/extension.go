// Package extension runs netd's extensions: external filter programs placed in the path of ports, in the
// spirit of the Hyper-V extensible switch. For every local port whose policy names an extension, the runner
// keeps one process of that extension's program running, handing it the port's two sides (see package
// filter and docs/netd.md, "Extensions"): a packet socket on the VM's tap and a queue of the bridge-side tap
// the data plane attached in the tap's place.
//
// Extension processes outlive netd (their own session, no parent-death signal), so traffic through an
// extension port keeps flowing while netd restarts: a new runner finds them again through their pid files
// and supervises them from there. A port whose extension process is not running is cut off (fails closed).
// It depends on the netns library, x/sys and netd/extension/filter (for the environment's names).
package extension

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/netd/extension/filter"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Port is a local port with an extension.
type Port struct {
	// Name is "<network>/<port>".
	Name string
	// Tap is the VM's side; ExtTap the bridge-side tap (dataplane.ExtensionTap).
	Tap, ExtTap string
	// Extension names the program (a key of Config.Programs).
	Extension string
}

// Config configures a Runner.
type Config struct {
	// Programs maps extension names to their command line (program and arguments).
	Programs map[string][]string
	// StateDir holds one directory per port: the pid file, the process's log and whatever it writes.
	StateDir string
	// NetNS is the namespace the taps live in; <= 0 means the caller's.
	NetNS  netns.NsHandle
	Logger *slog.Logger
}

// Runner keeps the extension processes of a host running.
type Runner struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	procs map[string]*proc // by port name
	wg    sync.WaitGroup
}

type proc struct {
	port   Port
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	pid    int
}

// New returns a runner; it starts nothing until Sync.
func New(cfg Config) (*Runner, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("extension: StateDir is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	for name, argv := range cfg.Programs {
		if len(argv) == 0 {
			return nil, fmt.Errorf("extension %q: no program", name)
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o750); err != nil {
		return nil, fmt.Errorf("extension: %w", err)
	}
	return &Runner{cfg: cfg, log: cfg.Logger.With("component", "extension"), procs: map[string]*proc{}}, nil
}

// Has reports whether an extension of that name is configured.
func (r *Runner) Has(name string) bool { _, ok := r.cfg.Programs[name]; return ok }

// dirName is a port's state directory name: "<network>+<port>" ('+' appears in no name).
func dirName(port string) string { return strings.ReplaceAll(port, "/", "+") }

func (r *Runner) dirOf(port string) string { return filepath.Join(r.cfg.StateDir, dirName(port)) }

// StateDir is the directory of a port's extension (where it may write its reports).
func (r *Runner) StateDir(port string) string { return r.dirOf(port) }

// Sync makes the running extensions exactly ports: it starts (or adopts) what is missing, and stops the
// processes of ports that are gone or whose extension or taps changed.
func (r *Runner) Sync(ctx context.Context, ports []Port) {
	want := map[string]Port{}
	for _, p := range ports {
		want[p.Name] = p
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for name, pr := range r.procs {
		if w, ok := want[name]; ok && w == pr.port {
			continue
		}
		pr.stop(r.log)
		delete(r.procs, name)
	}
	// Leftovers of ports this runner never supervised (removed while netd was down).
	if ents, err := os.ReadDir(r.cfg.StateDir); err == nil {
		for _, e := range ents {
			if isWanted(want, e.Name()) {
				continue
			}
			if pid, ok := alivePid(filepath.Join(r.cfg.StateDir, e.Name())); ok {
				r.log.Info("stopping the extension of a removed port", "dir", e.Name(), "pid", pid)
				terminate(pid)
			}
			os.RemoveAll(filepath.Join(r.cfg.StateDir, e.Name()))
		}
	}
	for name, p := range want {
		if r.procs[name] != nil {
			continue
		}
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		pr := &proc{port: p, cancel: cancel, done: make(chan struct{})}
		r.procs[name] = pr
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer close(pr.done)
			r.supervise(pctx, pr)
		}()
	}
}

func isWanted(want map[string]Port, dir string) bool {
	for name := range want {
		if dirName(name) == dir {
			return true
		}
	}
	return false
}

// Pid returns the pid of a port's extension process, 0 if none runs.
func (r *Runner) Pid(port string) int {
	r.mu.Lock()
	pr := r.procs[port]
	r.mu.Unlock()
	if pr == nil {
		return 0
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.pid
}

// Close stops supervising, leaving the processes running (a restarted netd adopts them).
func (r *Runner) Close() {
	r.mu.Lock()
	for _, pr := range r.procs {
		pr.cancel()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// stop ends a port's process and its supervision.
func (pr *proc) stop(log *slog.Logger) {
	pr.cancel()
	<-pr.done
	pr.mu.Lock()
	pid := pr.pid
	pr.mu.Unlock()
	if pid != 0 {
		log.Info("stopping extension", "port", pr.port.Name, "pid", pid)
		terminate(pid)
	}
}

// terminate sends SIGTERM, then SIGKILL if the process is still there after two seconds.
func terminate(pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(fd)
	unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	if !waitPidfd(context.Background(), fd, 2*time.Second) {
		unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		waitPidfd(context.Background(), fd, 2*time.Second)
	}
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, unix.WNOHANG, nil) // reap it if it is our child (an adopted one is init's)
}

// waitPidfd waits for the process to exit; false on timeout or ctx end.
func waitPidfd(ctx context.Context, fd int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 100)
		if err == nil && n > 0 {
			return true
		}
	}
	return false
}

// supervise keeps the port's process running until ctx ends.
func (r *Runner) supervise(ctx context.Context, pr *proc) {
	dir := r.dirOf(pr.port.Name)
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		pid, adopted := alivePid(dir)
		if adopted && !sameArgs(pid, r.cfg.Programs[pr.port.Extension]) {
			terminate(pid) // the extension's program changed: start the new one
			adopted = false
		}
		if !adopted {
			var err error
			pid, err = r.start(pr.port, dir)
			if err != nil {
				r.log.Error("cannot start extension; retrying", "port", pr.port.Name, "extension", pr.port.Extension, "err", err, "retry_in", backoff)
				sleep(ctx, backoff)
				backoff = min(2*backoff, 30*time.Second)
				continue
			}
			r.log.Info("started extension", "port", pr.port.Name, "extension", pr.port.Extension, "pid", pid)
		} else {
			r.log.Info("adopted running extension", "port", pr.port.Name, "extension", pr.port.Extension, "pid", pid)
		}
		pr.mu.Lock()
		pr.pid = pid
		pr.mu.Unlock()
		start := time.Now()
		exited := r.wait(ctx, pid)
		if !exited {
			return // supervision ends; the process runs on
		}
		pr.mu.Lock()
		pr.pid = 0
		pr.mu.Unlock()
		os.Remove(filepath.Join(dir, "pid"))
		if time.Since(start) > time.Minute {
			backoff = 500 * time.Millisecond
		}
		r.log.Warn("extension exited; restarting (the port is cut off meanwhile)", "port", pr.port.Name, "pid", pid, "retry_in", backoff,
			"log", filepath.Join(dir, "log"))
		sleep(ctx, backoff)
		backoff = min(2*backoff, 30*time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// wait waits for pid to exit (true), or for ctx to end (false). The runner reaps its own children; an
// adopted process is watched through a pidfd.
func (r *Runner) wait(ctx context.Context, pid int) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return true
	}
	defer unix.Close(fd)
	for {
		if waitPidfd(ctx, fd, time.Second) {
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, unix.WNOHANG, nil) // reap it if it was our child
			return true
		}
		if ctx.Err() != nil {
			return false
		}
	}
}

// start opens the port's two sides in the taps' namespace and starts the program with them.
func (r *Runner) start(p Port, dir string) (int, error) {
	argv, ok := r.cfg.Programs[p.Extension]
	if !ok {
		return 0, fmt.Errorf("no extension %q is configured on this netd", p.Extension)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return 0, err
	}
	var vm, sw *os.File
	err := r.inNS(func() error {
		var err error
		if vm, err = packetSocket(p.Tap); err != nil {
			return err
		}
		if sw, err = openTap(p.ExtTap); err != nil {
			vm.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	defer vm.Close()
	defer sw.Close()
	logf, err := os.OpenFile(filepath.Join(dir, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(),
		filter.EnvPort+"="+p.Name, filter.EnvStateDir+"="+dir, filter.EnvVMFD+"=3", filter.EnvSwitchFD+"=4")
	cmd.ExtraFiles = []*os.File{vm, sw}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = dir
	// Its own session: netd's stop signals and its death do not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", argv[0], err)
	}
	pid := cmd.Process.Pid
	st, _ := startTime(pid)
	if err := os.WriteFile(filepath.Join(dir, "pid"), []byte(fmt.Sprintf("%d %d\n", pid, st)), 0o640); err != nil {
		terminate(pid)
		return 0, err
	}
	cmd.Process.Release() // reaped in wait, via Wait4
	return pid, nil
}

func (r *Runner) inNS(fn func() error) error {
	if r.cfg.NetNS <= 0 {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(r.cfg.NetNS); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(ferr, err) // the thread stays locked and dies with the goroutine
	}
	runtime.UnlockOSThread()
	return ferr
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// packetSocket is a raw packet socket bound to ifname that does not see the frames it sends itself.
func packetSocket(ifname string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	ifr, err := unix.NewIfreq(ifname)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err = unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("index of %s: %w", ifname, err)
	}
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: int(ifr.Uint32())}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind packet socket to %s: %w", ifname, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("PACKET_IGNORE_OUTGOING: %w", err)
	}
	return os.NewFile(uintptr(fd), "vm:"+ifname), nil
}

// openTap attaches a queue to an existing persistent tap (created by the data plane with these flags).
func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach to tap %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "switch:"+name), nil
}

// alivePid returns the process of a port's pid file if it is still the same process (same start time).
func alivePid(dir string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(dir, "pid"))
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, false
	}
	pid, err1 := strconv.Atoi(f[0])
	st, err2 := strconv.ParseUint(f[1], 10, 64)
	if err1 != nil || err2 != nil || pid <= 1 {
		return 0, false
	}
	if cur, err := startTime(pid); err != nil || cur != st {
		return 0, false
	}
	return pid, true
}

// startTime is field 22 of /proc/<pid>/stat: with the pid, it identifies a process (pids are reused).
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, errors.New("bad stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// sameArgs reports whether pid runs argv.
func sameArgs(pid int, argv []string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return strings.TrimRight(string(b), "\x00") == strings.Join(argv, "\x00")
}
