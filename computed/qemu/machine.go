package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu/qmp"
)

// machine is one QEMU process.
type machine struct {
	d     *Driver
	spec  hypervisor.Spec
	paths paths
	proc  *process
	qmp   *qmp.Client
	accel string

	// hasAgent says the machine has an agent channel (read from QEMU's device tree, so also for a found one).
	hasAgent bool

	mu          sync.Mutex
	consoleOpen bool
	agentOpen   bool
	closed      bool

	// migrating serialises Migrate calls: QEMU runs one outgoing migration at a time.
	migrating sync.Mutex
	// hotplug serialises device changes, so two cannot pick the same free port.
	hotplug sync.Mutex
}

var _ hypervisor.Machine = (*machine)(nil)

// launch starts QEMU for spec and connects to it.
func (d *Driver) launch(ctx context.Context, spec hypervisor.Spec, incoming bool) (*machine, error) {
	if err := validateLaunch(spec, d.cfg.HotplugPorts); err != nil {
		return nil, err
	}
	accel, err := d.Accel(ctx)
	if err != nil {
		return nil, err
	}
	p := runPaths(spec.RunDir)
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return nil, fmt.Errorf("qemu: machine %s: %w", spec.ID, err)
	}
	if err := checkNotRunning(p); err != nil {
		return nil, fmt.Errorf("qemu: machine %s: %w", spec.ID, err)
	}
	for _, f := range []string{p.qmp, p.console, p.agent, p.pid} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("qemu: machine %s: remove stale %s: %w", spec.ID, f, err)
		}
	}
	fw := d.firmwareFor(spec.Firmware)
	if err := prepareFirmware(fw, p); err != nil {
		return nil, fmt.Errorf("qemu: machine %s: %w", spec.ID, err)
	}
	args := buildArgs(spec, p, launchArgs{
		accel: accel.Accel, cpu: accel.CPU, ports: d.cfg.HotplugPorts, fw: fw, incoming: incoming,
		vhost: accel.Accel == "kvm" && d.vhostNet(),
	})

	logf, err := os.OpenFile(p.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemu: machine %s: %w", spec.ID, err)
	}
	defer logf.Close()
	logStart, _ := logf.Seek(0, io.SeekEnd)
	fmt.Fprintf(logf, "--- %s: %s %s\n", time.Now().Format(time.RFC3339), d.cfg.Binary, strings.Join(args, " "))

	cmd := exec.Command(d.cfg.Binary, args...)
	cmd.Dir = p.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: QEMU must outlive computed (a restart or an upgrade of computed is not a reason to stop
	// guests), and signals meant for computed's process group must not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: machine %s: start %s: %w", spec.ID, d.cfg.Binary, err)
	}
	// While this computed lives, QEMU is its child and must be reaped; the pidfd, not Wait, tells the machine
	// that it exited, so the same code serves machines found after a restart.
	proc, err := openProcess(cmd.Process.Pid)
	go cmd.Wait()
	if err != nil {
		cmd.Process.Kill()
		return nil, fmt.Errorf("qemu: machine %s: %w", spec.ID, err)
	}
	m, err := d.attach(ctx, spec, proc, true)
	if err != nil {
		// When QEMU died (bad device, missing export, ...), its log says why; the QMP error is only a symptom.
		select {
		case <-proc.exited:
			err = errors.New("QEMU exited during start")
		case <-time.After(time.Second):
		}
		proc.signal(syscall.SIGKILL)
		wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		proc.wait(wctx)
		cancel()
		proc.close()
		return nil, fmt.Errorf("qemu: machine %s: %w%s", spec.ID, err, logTail(p.log, logStart))
	}
	d.log.Info("qemu machine started", "id", spec.ID, "pid", proc.pid, "accel", m.accel, "incoming", incoming,
		"firmware", spec.Firmware, "disks", len(spec.Disks), "nics", len(spec.NICs))
	if !incoming && spec.MaxMemory > spec.Memory {
		// The guest gets Memory at boot: QEMU sizes RAM for MaxMemory, and the balloon takes back the rest as
		// soon as the guest's driver loads (QEMU keeps the target until then).
		if err := m.SetBalloon(ctx, spec.Memory); err != nil {
			m.Kill(context.Background())
			m.Close()
			return nil, err
		}
	}
	return m, nil
}

// checkNotRunning refuses to start a second QEMU on a run directory whose QEMU still runs.
func checkNotRunning(p paths) error {
	pid, err := readPidFile(p.pid)
	if err != nil {
		return nil
	}
	proc, err := openProcess(pid)
	if err != nil {
		return nil
	}
	defer proc.close()
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if strings.Contains(string(cmdline), p.qmp) {
		return fmt.Errorf("already running as pid %d", pid)
	}
	return nil
}

// logTail returns what QEMU wrote to its log since offset, for an error message.
func logTail(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	f.Seek(offset, io.SeekStart)
	b, _ := io.ReadAll(io.LimitReader(f, 64<<10))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 0 && strings.HasPrefix(lines[0], "--- ") {
		lines = lines[1:] // our own header with the command line
	}
	if len(lines) == 0 {
		return ""
	}
	return ": " + oneLine(strings.Join(lines, "\n"))
}

// attach connects to the QMP socket of proc's QEMU. starting says QEMU was just launched, so a socket that is
// not there yet is waited for; otherwise (Find) it means the machine is gone.
func (d *Driver) attach(ctx context.Context, spec hypervisor.Spec, proc *process, starting bool) (*machine, error) {
	p := runPaths(spec.RunDir)
	var c *qmp.Client
	for {
		var err error
		c, err = qmp.Dial(ctx, p.qmp)
		if err == nil {
			break
		}
		gone := errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
		if !gone || ctx.Err() != nil {
			return nil, err
		}
		if !starting {
			return nil, fmt.Errorf("no QMP socket: %w", hypervisor.ErrNotFound)
		}
		if !proc.alive() {
			return nil, errors.New("qemu exited during start")
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the QMP socket: %w", ctx.Err())
		case <-proc.exited:
			return nil, errors.New("qemu exited during start")
		case <-time.After(20 * time.Millisecond):
		}
	}
	fail := func(err error) (*machine, error) {
		c.Close()
		return nil, err
	}
	// The pid file says which process; the socket's peer credentials say who actually listens there.
	peer, err := c.PeerPID()
	if err != nil {
		return fail(err)
	}
	if peer != proc.pid {
		return fail(fmt.Errorf("QMP socket %s belongs to pid %d, pid file says %d", p.qmp, peer, proc.pid))
	}
	var name struct{ Name string }
	if err := c.Execute(ctx, "query-name", nil, &name); err != nil {
		return fail(err)
	}
	if name.Name != spec.ID {
		return fail(fmt.Errorf("QEMU at %s runs machine %q, not %q", p.dir, name.Name, spec.ID))
	}
	var kvm struct{ Enabled bool }
	if err := c.Execute(ctx, "query-kvm", nil, &kvm); err != nil {
		return fail(err)
	}
	accel := "tcg"
	if kvm.Enabled {
		accel = "kvm"
	}
	m := &machine{d: d, spec: spec, paths: p, proc: proc, qmp: c, accel: accel}
	// Find's spec need not say whether the machine was started with an agent channel; QEMU knows.
	if m.hasAgent, err = m.devicePresent(ctx, agentDevID); err != nil {
		return fail(err)
	}
	return m, nil
}

func (m *machine) ID() string { return m.spec.ID }

// errf wraps err with the machine and what was being done.
func (m *machine) errf(err error, format string, args ...any) error {
	return fmt.Errorf("qemu: machine %s: %s: %w", m.spec.ID, fmt.Sprintf(format, args...), err)
}

// qemuStatus is query-status's answer.
type qemuStatus struct {
	Status  string
	Running bool
}

func (m *machine) status(ctx context.Context) (qemuStatus, error) {
	var st qemuStatus
	err := m.qmp.Execute(ctx, "query-status", nil, &st)
	return st, err
}

// diskError names the disks whose last I/O failed (query-block's io-status), for a guest paused on io-error.
func (m *machine) diskError(ctx context.Context) string {
	var blocks []struct {
		Qdev     string `json:"qdev"`
		IOStatus string `json:"io-status"`
	}
	if err := m.qmp.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return "unknown disk: " + err.Error()
	}
	var bad []string
	for _, b := range blocks {
		if b.IOStatus != "" && b.IOStatus != "ok" {
			// The qdev path is /machine/peripheral/<device id>/virtio-backend; the id is the disk's.
			id := strings.TrimPrefix(strings.TrimSuffix(b.Qdev, "/virtio-backend"), "/machine/peripheral/")
			bad = append(bad, id+": "+b.IOStatus)
		}
	}
	if len(bad) == 0 {
		return "a disk failed"
	}
	return strings.Join(bad, ", ")
}

// Info reports the machine's state from QEMU.
func (m *machine) Info(ctx context.Context) (hypervisor.Info, error) {
	st, err := m.status(ctx)
	if err != nil {
		return hypervisor.Info{}, m.errf(err, "info")
	}
	info := hypervisor.Info{PID: m.proc.pid, Accel: m.accel}
	switch st.Status {
	case "running":
		info.State = hypervisor.StateRunning
		mig, err := m.queryMigrate(ctx)
		if err != nil {
			return hypervisor.Info{}, m.errf(err, "info")
		}
		if migrationActive(mig.Status) {
			info.State = hypervisor.StateMigrating
		}
	case "inmigrate":
		info.State = hypervisor.StateIncoming
	case "finish-migrate":
		info.State = hypervisor.StateMigrating
	case "shutdown":
		info.State = hypervisor.StateShutdown
	case "io-error":
		info.State = hypervisor.StatePaused
		info.DiskError = m.diskError(ctx)
	default:
		// paused, postmigrate (migrated away: stopped for good), io-error (a disk failed and the error policy
		// stopped the guest), prelaunch, suspended, watchdog, guest-panicked, internal-error, ...: the guest
		// does not run.
		info.State = hypervisor.StatePaused
	}
	var cpus []struct{}
	if err := m.qmp.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return hypervisor.Info{}, m.errf(err, "info")
	}
	info.VCPUs = len(cpus)
	var mem struct {
		BaseMemory uint64 `json:"base-memory"`
	}
	if err := m.qmp.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
		return hypervisor.Info{}, m.errf(err, "info")
	}
	info.Memory = mem.BaseMemory
	if info.BalloonActual, err = m.balloonActual(ctx); err != nil {
		return hypervisor.Info{}, m.errf(err, "info")
	}
	return info, nil
}

func (m *machine) balloonActual(ctx context.Context) (uint64, error) {
	var b struct{ Actual uint64 }
	err := m.qmp.Execute(ctx, "query-balloon", nil, &b)
	var qe *qmp.Error
	if errors.As(err, &qe) && qe.Class == "DeviceNotActive" {
		return 0, nil // no balloon device
	}
	return b.Actual, err
}

// Stats reads the machine's meters.
func (m *machine) Stats(ctx context.Context) (hypervisor.Stats, error) {
	ticks, err := cpuTicks(m.proc.pid)
	if err != nil {
		return hypervisor.Stats{}, m.errf(err, "stats")
	}
	st := hypervisor.Stats{CPUTime: time.Duration(ticks) * time.Second / userHZ, Disks: map[string]hypervisor.DiskStats{}}
	if st.BalloonActual, err = m.balloonActual(ctx); err != nil {
		return hypervisor.Stats{}, m.errf(err, "stats")
	}
	var blk []struct {
		Qdev  string
		Stats struct {
			RdBytes      uint64 `json:"rd_bytes"`
			WrBytes      uint64 `json:"wr_bytes"`
			RdOperations uint64 `json:"rd_operations"`
			WrOperations uint64 `json:"wr_operations"`
		}
	}
	if err := m.qmp.Execute(ctx, "query-blockstats", nil, &blk); err != nil {
		return hypervisor.Stats{}, m.errf(err, "stats")
	}
	for _, b := range blk {
		id, ok := diskIDFromQdev(b.Qdev)
		if !ok {
			continue // a firmware flash or other node of our own
		}
		st.Disks[id] = hypervisor.DiskStats{ReadBytes: b.Stats.RdBytes, WriteBytes: b.Stats.WrBytes,
			ReadOps: b.Stats.RdOperations, WriteOps: b.Stats.WrOperations}
	}
	return st, nil
}

// diskIDFromQdev maps query-blockstats' qdev (the device's id, or its QOM path such as
// /machine/peripheral/disk-x/virtio-backend) to the disk id.
func diskIDFromQdev(qdev string) (string, bool) {
	s := strings.TrimPrefix(qdev, "/machine/peripheral/")
	s, _, _ = strings.Cut(s, "/")
	return strings.CutPrefix(s, "disk-")
}

// Shutdown presses the ACPI power button.
func (m *machine) Shutdown(ctx context.Context) error {
	if err := m.qmp.Execute(ctx, "system_powerdown", nil, nil); err != nil {
		return m.errf(err, "shutdown")
	}
	return nil
}

// Kill stops QEMU at once (SIGKILL through the pidfd) and waits for it to be gone.
func (m *machine) Kill(ctx context.Context) error {
	if err := m.proc.signal(syscall.SIGKILL); err != nil {
		return m.errf(err, "kill")
	}
	if err := m.proc.wait(ctx); err != nil {
		return m.errf(err, "kill: wait for exit")
	}
	return nil
}

// Wait returns when QEMU has exited, whoever started it.
func (m *machine) Wait(ctx context.Context) error {
	if err := m.proc.wait(ctx); err != nil {
		return m.errf(err, "wait")
	}
	return nil
}

// Pause stops the vCPUs.
func (m *machine) Pause(ctx context.Context) error {
	if err := m.qmp.Execute(ctx, "stop", nil, nil); err != nil {
		return m.errf(err, "pause")
	}
	return nil
}

// Resume restarts the vCPUs. It refuses on a machine that has migrated away: QEMU would reactivate its disks
// and run the guest a second time, next to the copy on the destination, both writing the same volumes.
func (m *machine) Resume(ctx context.Context) error {
	st, err := m.status(ctx)
	if err != nil {
		return m.errf(err, "resume")
	}
	if st.Status == "postmigrate" {
		return m.errf(errors.New("the guest migrated away; it runs on the destination now"), "resume")
	}
	if err := m.qmp.Execute(ctx, "cont", nil, nil); err != nil {
		return m.errf(err, "resume")
	}
	return nil
}

// SetBalloon sets the balloon target: the memory the guest may use.
func (m *machine) SetBalloon(ctx context.Context, bytes uint64) error {
	limit := maxMemory(m.spec)
	if bytes == 0 || bytes > limit {
		return m.errf(fmt.Errorf("%d bytes is outside (0, %d]", bytes, limit), "set balloon")
	}
	if err := m.qmp.Execute(ctx, "balloon", map[string]any{"value": bytes}, nil); err != nil {
		return m.errf(err, "set balloon to %d bytes", bytes)
	}
	return nil
}

// Console connects to the serial console. Only one stream may be open at a time (QEMU serves one client on
// the socket; a second would silently wait), so a second call fails until the first stream is closed.
func (m *machine) Console(ctx context.Context) (io.ReadWriteCloser, error) {
	m.mu.Lock()
	if m.consoleOpen {
		m.mu.Unlock()
		return nil, m.errf(errors.New("already open"), "console")
	}
	m.consoleOpen = true
	m.mu.Unlock()
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", m.paths.console)
	if err != nil {
		m.mu.Lock()
		m.consoleOpen = false
		m.mu.Unlock()
		return nil, m.errf(err, "console")
	}
	return &consoleConn{Conn: conn, m: m}, nil
}

type consoleConn struct {
	net.Conn
	m    *machine
	once sync.Once
}

func (c *consoleConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.m.mu.Lock()
		c.m.consoleOpen = false
		c.m.mu.Unlock()
	})
	return err
}

// Close releases the QMP connection and the pidfd; QEMU keeps running.
func (m *machine) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	m.qmp.Close()
	m.proc.close()
	return nil
}
