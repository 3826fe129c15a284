package cloudhv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// ErrMigrationCancelUnsupported is returned by CancelMigration: Cloud Hypervisor's API has no request that
// cancels a migration in flight. A migration started with a context deadline is given that deadline as its
// timeout_s with timeout_strategy Cancel, so Cloud Hypervisor abandons it itself and keeps the VM running.
var ErrMigrationCancelUnsupported = fmt.Errorf("cloudhv: Cloud Hypervisor's API cannot cancel a migration in flight: %w", errors.ErrUnsupported)

// Machine is one cloud-hypervisor process and its VM.
type Machine struct {
	d      *Driver
	spec   hypervisor.Spec
	client *Client
	log    *slog.Logger
	proc   *process
	accel  string

	// bg bounds work that outlives the call that started it (the receive-migration request); it ends when
	// the machine's handle is closed or the process exits.
	bg       context.Context
	cancelBg context.CancelFunc

	// incoming is non-nil for a machine started by StartIncoming, and closed when receive-migration has
	// answered; incomingErr is set before.
	incoming    chan struct{}
	incomingErr error

	closeOnce sync.Once
	closed    chan struct{}
	// cleaned is closed when the files and disks of an exited process have been released.
	cleaned chan struct{}

	mu        sync.Mutex
	disks     map[string]AttachedDisk
	migrating bool
	// last is the last Info read from the API, returned while the API is busy with a migration.
	last hypervisor.Info
}

var _ hypervisor.Machine = (*Machine)(nil)

func newMachine(d *Driver, spec hypervisor.Spec, apiSocket string) *Machine {
	bg, cancel := context.WithCancel(context.Background())
	return &Machine{
		d:        d,
		spec:     spec,
		client:   NewClient(apiSocket),
		log:      d.log.With("machine", spec.ID),
		bg:       bg,
		cancelBg: cancel,
		closed:   make(chan struct{}),
		cleaned:  make(chan struct{}),
		disks:    make(map[string]AttachedDisk),
	}
}

// ID is the spec's ID.
func (m *Machine) ID() string { return m.spec.ID }

// PID is the cloud-hypervisor process's ID.
func (m *Machine) PID() int { return m.proc.pid }

// Client is the machine's API client, for requests the hypervisor seam has no method for (snapshot, reboot,
// vCPU resize, ...).
func (m *Machine) Client() *Client { return m.client }

func (m *Machine) logPath() string { return filepath.Join(m.spec.RunDir, logFileName) }

// attachDisk attaches d and points its stable path (diskPath) at the attached device.
func (m *Machine) attachDisk(ctx context.Context, d hypervisor.Disk) error {
	m.mu.Lock()
	_, dup := m.disks[d.ID]
	m.mu.Unlock()
	if dup {
		return fmt.Errorf("disk %s is already attached", d.ID)
	}
	a, err := m.d.disks.Attach(ctx, d)
	if err != nil {
		return err
	}
	link := diskPath(m.spec, d.ID)
	// Replace any old link atomically: another process on this host may still hold the old target open.
	tmp := link + ".new"
	os.Remove(tmp)
	if err := os.Symlink(a.Path(), tmp); err == nil {
		err = os.Rename(tmp, link)
	}
	if err != nil {
		os.Remove(tmp)
		detachErr := a.Detach(context.WithoutCancel(ctx))
		return errors.Join(fmt.Errorf("linking disk %s to %s: %w", d.ID, a.Path(), err), detachErr)
	}
	m.mu.Lock()
	m.disks[d.ID] = a
	m.mu.Unlock()
	return nil
}

// detachDisk detaches a disk this handle attached, and removes its link if it still points at that device.
func (m *Machine) detachDisk(ctx context.Context, id string) error {
	m.mu.Lock()
	a, ok := m.disks[id]
	delete(m.disks, id)
	m.mu.Unlock()
	link := diskPath(m.spec, id)
	if !ok {
		return nil
	}
	// Another machine (the other end of a migration on this host) may have re-pointed the link already.
	if target, err := os.Readlink(link); err == nil && target == a.Path() {
		os.Remove(link)
	}
	if err := a.Detach(ctx); err != nil {
		return fmt.Errorf("detaching disk %s: %w", id, err)
	}
	return nil
}

func (m *Machine) detachAll(ctx context.Context) {
	m.mu.Lock()
	var ids []string
	for id := range m.disks {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	for _, id := range ids {
		if err := m.detachDisk(ctx, id); err != nil {
			m.log.Error("releasing disk", "disk", id, "err", err)
		}
	}
}

// abort undoes a start that failed half-way: the process is killed and everything released.
func (m *Machine) abort(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if m.proc == nil {
		m.detachAll(ctx)
		return
	}
	if err := m.Kill(ctx); err != nil {
		m.log.Error("killing cloud-hypervisor after a failed start", "err", err)
	}
}

// watchExit releases the machine's disks and files once the process has exited.
func (m *Machine) watchExit() {
	select {
	case <-m.proc.done:
	case <-m.closed:
		m.proc.release()
		return
	}
	defer close(m.cleaned)
	m.cancelBg()
	m.log.Info("cloud-hypervisor exited", "pid", m.proc.pid, "status", m.proc.exitErr)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m.detachAll(ctx)
	// Links of disks this handle did not attach (a machine found after a restart) point at devices that
	// ended with the process that attached them.
	links, _ := os.ReadDir(filepath.Join(m.spec.RunDir, disksDirName))
	for _, l := range links {
		os.Remove(filepath.Join(m.spec.RunDir, disksDirName, l.Name()))
	}
	for _, name := range []string{apiSocketName, consoleSocketName} {
		os.Remove(filepath.Join(m.spec.RunDir, name))
	}
	pidFile := filepath.Join(m.spec.RunDir, pidFileName)
	if pid, err := readPIDFile(pidFile); err == nil && pid == m.proc.pid {
		os.Remove(pidFile)
	}
}

// busy reports why the API cannot be asked now, if it cannot: Cloud Hypervisor's VMM thread is occupied for
// the whole of a migration, in either direction.
func (m *Machine) busy() (hypervisor.State, bool) {
	m.mu.Lock()
	migrating := m.migrating
	m.mu.Unlock()
	if migrating {
		return hypervisor.StateMigrating, true
	}
	if m.incoming != nil {
		select {
		case <-m.incoming:
		default:
			return hypervisor.StateIncoming, true
		}
	}
	return "", false
}

func (m *Machine) errBusy(op string, state hypervisor.State) error {
	return fmt.Errorf("cloudhv: %s %s: the machine is %s and Cloud Hypervisor answers no other request until that ends", op, m.spec.ID, state)
}

func mapState(s VMState) hypervisor.State {
	switch s {
	case VMStateRunning:
		return hypervisor.StateRunning
	case VMStatePaused, VMStateBreakPoint:
		// BreakPoint is a guest stopped by the gdb stub: not running, resumable.
		return hypervisor.StatePaused
	default:
		// Created is a VM configured but not booted, which is also what vm.shutdown leaves.
		return hypervisor.StateShutdown
	}
}

// Info reads vm.info. While a migration is in flight it returns the last observed values with the state
// Migrating or Incoming, because the API does not answer then.
func (m *Machine) Info(ctx context.Context) (hypervisor.Info, error) {
	if m.proc.exited() {
		m.mu.Lock()
		info := m.last
		m.mu.Unlock()
		info.State = hypervisor.StateShutdown
		info.PID = m.proc.pid
		return info, nil
	}
	if state, ok := m.busy(); ok {
		m.mu.Lock()
		info := m.last
		m.mu.Unlock()
		info.State, info.PID, info.Accel = state, m.proc.pid, m.accel
		if info.VCPUs == 0 {
			info.VCPUs, info.Memory = m.spec.VCPUs, m.spec.Memory
		}
		return info, nil
	}
	vi, err := m.client.Info(ctx)
	if IsStatus(err, http.StatusNotFound) {
		// No VM: a failed incoming migration, or vm.delete.
		return hypervisor.Info{State: hypervisor.StateShutdown, PID: m.proc.pid, Accel: m.accel}, nil
	}
	if err != nil {
		return hypervisor.Info{}, fmt.Errorf("cloudhv: info of %s: %w", m.spec.ID, err)
	}
	info := hypervisor.Info{State: mapState(vi.State), PID: m.proc.pid, Accel: m.accel}
	if vi.Config.CPUs != nil {
		info.VCPUs = vi.Config.CPUs.BootVCPUs
	}
	if vi.Config.Memory != nil {
		info.Memory = vi.Config.Memory.Size + vi.Config.Memory.HotpluggedSize
	}
	if vi.Config.Balloon != nil && vi.MemoryActualSize > 0 {
		info.BalloonActual = uint64(vi.MemoryActualSize)
	}
	m.mu.Lock()
	m.last = info
	m.mu.Unlock()
	return info, nil
}

// Stats reads vm.counters (disk I/O) and vm.info (balloon), and the process's CPU time from /proc. While a
// migration is in flight only the CPU time and the last balloon value are returned.
func (m *Machine) Stats(ctx context.Context) (hypervisor.Stats, error) {
	cpu, err := cpuTime(m.proc.pid)
	if err != nil {
		return hypervisor.Stats{}, fmt.Errorf("cloudhv: stats of %s: CPU time: %w", m.spec.ID, err)
	}
	if _, ok := m.busy(); ok {
		m.mu.Lock()
		balloon := m.last.BalloonActual
		m.mu.Unlock()
		return hypervisor.Stats{CPUTime: cpu, BalloonActual: balloon}, nil
	}
	counters, err := m.client.Counters(ctx)
	if err != nil {
		return hypervisor.Stats{}, fmt.Errorf("cloudhv: stats of %s: %w", m.spec.ID, err)
	}
	info, err := m.Info(ctx)
	if err != nil {
		return hypervisor.Stats{}, fmt.Errorf("cloudhv: stats of %s: %w", m.spec.ID, err)
	}
	st := hypervisor.Stats{CPUTime: cpu, BalloonActual: info.BalloonActual, Disks: make(map[string]hypervisor.DiskStats)}
	for id, c := range counters {
		// Block devices are the ones with byte counters for reads; network devices count rx/tx instead.
		rb, ok := c["read_bytes"]
		if !ok {
			continue
		}
		st.Disks[id] = hypervisor.DiskStats{
			ReadBytes:  uint64(rb),
			WriteBytes: uint64(c["write_bytes"]),
			ReadOps:    uint64(c["read_ops"]),
			WriteOps:   uint64(c["write_ops"]),
		}
	}
	return st, nil
}

// call runs one API request that the seam exposes, refusing it while the API is busy.
func (m *Machine) call(ctx context.Context, op string, f func(context.Context) error) error {
	if state, ok := m.busy(); ok {
		return m.errBusy(op, state)
	}
	if err := f(ctx); err != nil {
		return fmt.Errorf("cloudhv: %s %s: %w", op, m.spec.ID, err)
	}
	return nil
}

// Shutdown presses the ACPI power button. Cloud Hypervisor exits when the guest has powered off.
func (m *Machine) Shutdown(ctx context.Context) error {
	return m.call(ctx, "shutting down", m.client.PowerButton)
}

// Kill sends SIGKILL to cloud-hypervisor and waits for it to exit and for the machine's disks to be released.
func (m *Machine) Kill(ctx context.Context) error {
	if err := m.proc.signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("cloudhv: killing %s (pid %d): %w", m.spec.ID, m.proc.pid, err)
	}
	return m.Wait(ctx)
}

// Wait returns when cloud-hypervisor has exited and the machine's disks and sockets have been released. A
// closed handle no longer watches the process, and Wait on it fails at once.
func (m *Machine) Wait(ctx context.Context) error {
	select {
	case <-m.cleaned:
		return nil
	case <-m.closed:
		return fmt.Errorf("cloudhv: waiting for %s: the handle is closed", m.spec.ID)
	case <-ctx.Done():
		return fmt.Errorf("cloudhv: waiting for %s to exit: %w", m.spec.ID, ctx.Err())
	}
}

// Pause pauses the vCPUs.
func (m *Machine) Pause(ctx context.Context) error {
	return m.call(ctx, "pausing", m.client.PauseVM)
}

// Resume resumes a paused VM.
func (m *Machine) Resume(ctx context.Context) error {
	return m.call(ctx, "resuming", m.client.ResumeVM)
}

// SetBalloon makes bytes of memory available to the guest. Up to the VM's current RAM this inflates or deflates
// the balloon; beyond it (up to MaxMemory) RAM is hot-plugged through ACPI and the balloon emptied. The guest
// must online hot-plugged memory (memhp_default_state=online or a udev rule).
func (m *Machine) SetBalloon(ctx context.Context, bytes uint64) error {
	maxMem := m.spec.MaxMemory
	if maxMem == 0 {
		maxMem = m.spec.Memory
	}
	if bytes == 0 || bytes > maxMem {
		return fmt.Errorf("cloudhv: balloon of %s: %d bytes is outside (0, %d]", m.spec.ID, bytes, maxMem)
	}
	return m.call(ctx, "resizing balloon of", func(ctx context.Context) error {
		vi, err := m.client.Info(ctx)
		if err != nil {
			return err
		}
		if vi.Config.Memory == nil || vi.Config.Balloon == nil {
			return errors.New("the VM has no balloon device")
		}
		ram := vi.Config.Memory.Size + vi.Config.Memory.HotpluggedSize
		var r VMResize
		if bytes > ram {
			zero := uint64(0)
			r.DesiredRAM, r.DesiredBalloon = &bytes, &zero
		} else {
			balloon := ram - bytes
			r.DesiredBalloon = &balloon
		}
		return m.client.Resize(ctx, r)
	})
}

// AddDisk attaches d and hot-plugs it.
func (m *Machine) AddDisk(ctx context.Context, d hypervisor.Disk) error {
	if err := validateDisk(d); err != nil {
		return fmt.Errorf("cloudhv: adding disk to %s: %w", m.spec.ID, err)
	}
	if state, ok := m.busy(); ok {
		return m.errBusy("adding disk to", state)
	}
	if err := m.attachDisk(ctx, d); err != nil {
		return fmt.Errorf("cloudhv: adding disk %s to %s: %w", d.ID, m.spec.ID, err)
	}
	info, err := m.client.AddDisk(ctx, diskConfig(m.spec, d))
	if err != nil {
		if derr := m.detachDisk(context.WithoutCancel(ctx), d.ID); derr != nil {
			m.log.Error("releasing disk after a failed hot-plug", "disk", d.ID, "err", derr)
		}
		return fmt.Errorf("cloudhv: adding disk %s to %s: %w", d.ID, m.spec.ID, err)
	}
	if info != nil {
		m.log.Info("disk hot-plugged", "disk", d.ID, "bdf", info.BDF)
	}
	return nil
}

// RemoveDisk unplugs a disk, waits until the guest has let go of it, and detaches it.
func (m *Machine) RemoveDisk(ctx context.Context, id string) error {
	if err := m.removeDevice(ctx, "removing disk from", id); err != nil {
		return err
	}
	if err := m.detachDisk(ctx, id); err != nil {
		return fmt.Errorf("cloudhv: removing disk %s from %s: %w", id, m.spec.ID, err)
	}
	return nil
}

// AddNIC hot-plugs a NIC on its tap device.
func (m *Machine) AddNIC(ctx context.Context, n hypervisor.NIC) error {
	if err := validateNIC(n); err != nil {
		return fmt.Errorf("cloudhv: adding NIC to %s: %w", m.spec.ID, err)
	}
	return m.call(ctx, "adding NIC "+n.ID+" to", func(ctx context.Context) error {
		info, err := m.client.AddNet(ctx, netConfig(n))
		if err == nil && info != nil {
			m.log.Info("NIC hot-plugged", "nic", n.ID, "bdf", info.BDF)
		}
		return err
	})
}

// RemoveNIC unplugs a NIC and waits until the guest has let go of it, so that netd may then remove the tap.
func (m *Machine) RemoveNIC(ctx context.Context, id string) error {
	return m.removeDevice(ctx, "removing NIC from", id)
}

// removeDevice asks for the device's removal and, for a booted VM, waits until it has left the device tree:
// hot-unplug is an ACPI eject that completes only when the guest acknowledges it.
func (m *Machine) removeDevice(ctx context.Context, op, id string) error {
	return m.call(ctx, op, func(ctx context.Context) error {
		if err := m.client.RemoveDevice(ctx, id); err != nil {
			return fmt.Errorf("device %s: %w", id, err)
		}
		err := waitFor(ctx, 100*time.Millisecond, func() (bool, error) {
			vi, err := m.client.Info(ctx)
			if err != nil {
				return false, err
			}
			_, present := vi.DeviceTree[id]
			return !present, nil
		})
		if err != nil {
			return fmt.Errorf("waiting for the guest to release device %s: %w", id, err)
		}
		return nil
	})
}

// Console connects to the serial port's socket. Cloud Hypervisor serves one connection at a time.
func (m *Machine) Console(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", filepath.Join(m.spec.RunDir, consoleSocketName))
	if err != nil {
		return nil, fmt.Errorf("cloudhv: console of %s: %w", m.spec.ID, err)
	}
	return conn, nil
}

// startReceive sends vm.receive-migration in the background: Cloud Hypervisor answers it only once the
// migration has ended.
func (m *Machine) startReceive(url string) {
	m.incoming = make(chan struct{})
	go func() {
		err := m.client.ReceiveMigration(m.bg, ReceiveMigrationData{ReceiverURL: url})
		m.incomingErr = err
		close(m.incoming)
		if err != nil {
			m.log.Error("receiving migration failed", "url", url, "err", err)
		} else {
			m.log.Info("migration received", "url", url)
		}
	}()
}

// migrationProgressInterval is how often Migrate reports progress.
const migrationProgressInterval = time.Second

// Migrate sends the VM to uri (from the destination's StartIncoming) with vm.send-migration, which returns
// when the migration has ended; Cloud Hypervisor then exits here. The API reports no progress figures, so
// progress gets Status "active" with zero counts while the request runs. Cloud Hypervisor has no stream
// compression or bandwidth limit: asking for either is an error, not silently ignored. A context deadline
// becomes the migration's timeout (timeout_strategy Cancel, which keeps the VM running here); cancelling the
// context without a deadline stops waiting but cannot stop the migration.
func (m *Machine) Migrate(ctx context.Context, uri string, opts hypervisor.MigrateOptions, progress func(hypervisor.MigrationStatus)) (hypervisor.MigrationStatus, error) {
	if opts.Compress {
		return hypervisor.MigrationStatus{}, fmt.Errorf("cloudhv: migrating %s: stream compression: %w (Cloud Hypervisor's send-migration has no compression setting)", m.spec.ID, errors.ErrUnsupported)
	}
	if opts.BeforeSwitchover != nil {
		return hypervisor.MigrationStatus{}, fmt.Errorf("cloudhv: migrating %s: a hook before the switchover: %w (send-migration cannot pause between the source's last and the destination's first instruction)", m.spec.ID, errors.ErrUnsupported)
	}
	if opts.BandwidthBytes != 0 {
		return hypervisor.MigrationStatus{}, fmt.Errorf("cloudhv: migrating %s: bandwidth limit: %w (Cloud Hypervisor's send-migration has no bandwidth setting)", m.spec.ID, errors.ErrUnsupported)
	}
	req := SendMigrationData{DestinationURL: uri}
	if opts.MaxDowntime > 0 {
		req.DowntimeMS = max(1, opts.MaxDowntime.Milliseconds())
	}
	if deadline, ok := ctx.Deadline(); ok {
		req.TimeoutS = max(1, int64(time.Until(deadline)/time.Second))
		req.TimeoutStrategy = "Cancel"
	}
	if state, ok := m.busy(); ok {
		return hypervisor.MigrationStatus{}, m.errBusy("migrating", state)
	}
	// Refresh the last observed info: Info serves it while the API is busy.
	if _, err := m.Info(ctx); err != nil {
		return hypervisor.MigrationStatus{}, err
	}
	m.mu.Lock()
	m.migrating = true
	m.mu.Unlock()
	report := func(s hypervisor.MigrationStatus) {
		if progress != nil {
			progress(s)
		}
	}

	m.log.Info("migration started", "uri", uri, "downtime_ms", req.DowntimeMS, "timeout_s", req.TimeoutS)
	result := make(chan error, 1)
	go func() { result <- m.client.SendMigration(ctx, req) }()
	tick := time.NewTicker(migrationProgressInterval)
	defer tick.Stop()
	report(hypervisor.MigrationStatus{Status: "active"})
	for {
		select {
		case err := <-result:
			m.mu.Lock()
			m.migrating = false
			m.mu.Unlock()
			if err != nil {
				st := hypervisor.MigrationStatus{Status: "failed"}
				if ctx.Err() != nil {
					// We stopped waiting; Cloud Hypervisor may still be migrating.
					st.Status = "unknown"
				}
				report(st)
				return st, fmt.Errorf("cloudhv: migrating %s to %s: %w", m.spec.ID, uri, err)
			}
			st := hypervisor.MigrationStatus{Status: "completed"}
			report(st)
			m.log.Info("migration completed", "uri", uri)
			return st, nil
		case <-tick.C:
			report(hypervisor.MigrationStatus{Status: "active"})
		}
	}
}

// CancelMigration always fails with ErrMigrationCancelUnsupported.
func (m *Machine) CancelMigration(ctx context.Context) error {
	return ErrMigrationCancelUnsupported
}

// Close releases this handle without stopping the machine. Disks this handle attached stay attached, since
// the guest still uses them; with KernelNBD they end when this process exits.
func (m *Machine) Close() error {
	m.closeOnce.Do(func() {
		close(m.closed)
		m.cancelBg()
		m.client.Close()
	})
	return nil
}
