package vmhost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// worker reconciles one VM on this host. Its run goroutine owns the machine; the declaration arrives through
// update, the service reads the console and meters under mu, and an outgoing migration runs beside it.
type worker struct {
	h    *Host
	name string
	dir  string
	log  *slog.Logger
	wake chan struct{}

	mu      sync.Mutex
	decl    *basaltv1.VM
	rev     int64
	seenRev int64
	m       hypervisor.Machine
	con     *console
	exited  chan struct{} // closed when the machine's process has exited
	mig     *outgoing
	samples [2]statSample // older, newer
	// movedRev is the revision of the declaration that moved the VM to another host after a migration from
	// here: older declarations the watch may still deliver are not acted on.
	movedRev int64
	mon      *monitor // the machine's agent channel (monitor.go)

	// Owned by the run goroutine.
	meter        meter // metering history (metering.go)
	found        int   // attempts at finding an earlier machine; -1 once done
	startedAt    time.Time
	applied      uint64    // balloon target applied to the machine
	shutdownSent time.Time // stop request for which the power button was pressed
	failedGen    uint64    // generation whose start failed
	failures     int
	retryAt      time.Time
	nextWake     time.Time
	diskRetries  int       // resumes of a guest paused on a disk error since it last ran cleanly
	diskRetryAt  time.Time // when the next such resume is due

	stMu   sync.Mutex
	st     *basaltv1.VMStatus
	stSent []byte
}

type statSample struct {
	at time.Time
	st hypervisor.Stats
}

func newWorker(h *Host, name string) *worker {
	return &worker{h: h, name: name, dir: h.dir(name), log: h.log.With("vm", name), wake: make(chan struct{}, 1),
		st: &basaltv1.VMStatus{Name: name, Host: h.cfg.NodeID, Hypervisor: h.cfg.Driver.Name(),
			ConsoleLog: filepath.Join(h.dir(name), "console.log")}}
}

// update hands the worker a newer declaration (nil: deleted).
func (w *worker) update(vm *basaltv1.VM, rev int64) {
	w.mu.Lock()
	if rev >= w.rev {
		w.decl, w.rev = vm, rev
	}
	w.mu.Unlock()
	w.poke()
}

func (w *worker) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// latest returns the newest declaration and whether the worker has not acted on it.
func (w *worker) latest() (*basaltv1.VM, int64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.decl, w.rev, w.rev > w.seenRev
}

func (w *worker) run(ctx context.Context) {
	w.loadStatus(ctx)
	tick := time.NewTicker(w.h.cfg.Interval)
	defer tick.Stop()
	for {
		if w.reconcile(ctx) {
			return
		}
		var timer <-chan time.Time
		if !w.nextWake.IsZero() {
			timer = time.After(time.Until(w.nextWake))
		}
		w.mu.Lock()
		exited := w.exited
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			w.letGo()
			return
		case <-w.wake:
		case <-tick.C:
		case <-exited:
		case <-timer:
		}
	}
}

// letGo releases the machine without stopping it (computed is stopping; the next one finds it).
func (w *worker) letGo() {
	w.mu.Lock()
	mig := w.mig
	w.mu.Unlock()
	if mig != nil {
		<-mig.done
	}
	w.release()
}

// attach makes m this worker's machine: its console is multiplexed and its exit watched.
func (w *worker) attach(ctx context.Context, m hypervisor.Machine, con *console) error {
	if con == nil {
		var err error
		if con, err = openConsole(ctx, m, w.dir, w.h.cfg.ConsoleLogBytes, w.log); err != nil {
			return err
		}
	}
	exited := make(chan struct{})
	w.mu.Lock()
	w.m, w.con, w.exited = m, con, exited
	w.samples = [2]statSample{}
	w.mu.Unlock()
	go func() {
		if m.Wait(context.WithoutCancel(ctx)) == nil {
			close(exited)
			w.poke()
		}
	}()
	w.applied = 0
	w.startMonitor(ctx, m)
	return nil
}

// openConsole connects to m's console and multiplexes it, logging to the VM's console log.
func openConsole(ctx context.Context, m hypervisor.Machine, dir string, logBytes int64, log *slog.Logger) (*console, error) {
	file, err := openRotatingLog(filepath.Join(dir, "console.log"), logBytes)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := m.Console(cctx)
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("open the console: %w", err)
	}
	return newConsole(conn, file, log), nil
}

// release closes the console and the handle; the process is not touched.
func (w *worker) release() {
	w.meterEnd() // before the readings are cleared: the last partial interval is recorded
	w.stopMonitor()
	w.mu.Lock()
	m, con := w.m, w.con
	w.m, w.con, w.exited = nil, nil, nil
	w.samples = [2]statSample{}
	w.mu.Unlock()
	if con != nil {
		con.Close()
	}
	if m != nil {
		m.Close()
	}
	w.shutdownSent = time.Time{}
}

func (w *worker) machine() (hypervisor.Machine, *console) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.m, w.con
}

func (w *worker) hasExited() bool {
	w.mu.Lock()
	ch := w.exited
	w.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (w *worker) migration() *outgoing {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.mig
}

// reconcile brings the machine in line with the declaration once; it returns true when the worker has
// nothing more to do for this VM.
func (w *worker) reconcile(ctx context.Context) bool {
	w.nextWake = time.Time{}
	w.mu.Lock()
	d, rev := w.decl, w.rev
	if d != nil {
		d = proto.Clone(d).(*basaltv1.VM)
	}
	w.seenRev = rev
	stale := w.movedRev != 0 && rev < w.movedRev
	w.mu.Unlock()
	if stale {
		return false // the switchover's declaration is on its way
	}
	me := w.h.cfg.NodeID

	if w.found >= 0 {
		w.findEarlier(ctx, d, rev)
	}
	if w.hasExited() && w.migration() == nil {
		w.machineExited(ctx, d)
	}

	switch {
	case d == nil:
		return w.deleted(ctx)
	case d.GetHost() != me:
		return w.elsewhere(ctx, d, rev)
	}
	if m, _ := w.machine(); m == nil {
		w.adoptIncoming(ctx)
	}
	if d.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
		return w.stopMachine(ctx, d)
	}
	w.runMachine(ctx, d, rev)
	return false
}

// findEarlier looks for a machine an earlier computed started for this VM, once.
func (w *worker) findEarlier(ctx context.Context, d *basaltv1.VM, rev int64) {
	if w.h.getIncoming(w.name) != nil {
		w.found = -1 // this computed started the machine there is
		return
	}
	spec := hypervisor.Spec{ID: w.name, RunDir: w.dir}
	if d != nil {
		sock, _ := w.h.nbdSocket(ctx)
		spec = w.h.machineSpec(d, &sock, nil, nil)
	}
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	m, err := w.h.cfg.Driver.Find(fctx, spec)
	cancel()
	switch {
	case errors.Is(err, hypervisor.ErrNotFound):
		w.found = -1
		return
	case err != nil:
		w.found++
		if w.found >= 5 {
			w.log.Error("cannot reach the machine an earlier computed started; leaving it alone", "err", err)
			w.setStatus(func(st *basaltv1.VMStatus) { setError(st, fmt.Errorf("find the running machine: %w", err)) })
			w.found = -1
		} else {
			w.log.Warn("find the machine an earlier computed started", "err", err)
		}
		return
	}
	w.found = -1
	info, _ := m.Info(ctx)
	w.log.Info("found a machine started before this computed", "pid", info.PID, "state", info.State)
	if info.State == hypervisor.StateMigrating {
		// The computed that drove this migration is gone; nobody will finish the switchover. Cancel it: the
		// guest stays here, and the migration is cleared below.
		if err := m.CancelMigration(ctx); err != nil {
			w.log.Warn("cancel the migration an earlier computed left running", "err", err)
		}
	}
	me := w.h.cfg.NodeID
	if d != nil && d.GetHost() != me && d.GetMigration().GetTarget() == me {
		// An incoming machine: it belongs to the migration, which either completes (the VM moves here) or is
		// aborted by its source.
		con, err := openConsole(ctx, m, w.dir, w.h.cfg.ConsoleLogBytes, w.log)
		if err != nil {
			w.log.Warn("incoming machine", "err", err)
			m.Close()
			return
		}
		w.h.addIncoming(w.name, &incoming{id: d.GetMigration().GetId(), rev: rev, m: m, con: con, nics: d.GetSpec().GetNics()})
		return
	}
	if err := w.attach(ctx, m, nil); err != nil {
		w.log.Warn("attach to the machine an earlier computed started", "err", err)
		m.Close()
		return
	}
	w.startedAt = time.Now()
	if mig := d.GetMigration(); mig != nil && mig.GetSource() == me {
		w.endMigration(ctx, mig, "failed", errors.New("interrupted: computed restarted on the source"))
	}
}

// machineExited handles a machine whose process ended without being asked to by this worker: the guest
// powered off, or the hypervisor died.
func (w *worker) machineExited(ctx context.Context, d *basaltv1.VM) {
	w.release()
	me := w.h.cfg.NodeID
	if d == nil || d.GetHost() != me || d.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
		return
	}
	w.detachRun(ctx)
	why := fmt.Errorf("the guest powered off, or the hypervisor exited (its log: %s)", filepath.Join(w.dir, "qemu.log"))
	w.log.Warn("machine exited", "why", why)
	gen := d.GetGeneration()
	_, err := w.h.updateDecl(ctx, w.name, func(vm *basaltv1.VM) bool {
		if vm.GetHost() != me || vm.GetGeneration() != gen {
			return false // declared otherwise meanwhile: reconcile that instead
		}
		vm.DesiredState, vm.Stop = basaltv1.VMState_VM_STATE_STOPPED, nil
		return true
	})
	if err != nil {
		w.log.Warn("record that the VM stopped", "err", err)
	}
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.State = basaltv1.VMState_VM_STATE_STOPPED
		st.Pid = 0
		setError(st, why)
	})
	w.flushStatus(ctx)
}

// deleted kills whatever this host runs for a deleted VM and removes its directory.
func (w *worker) deleted(ctx context.Context) bool {
	if mig := w.migration(); mig != nil {
		mig.cancel()
		<-mig.done
	}
	if m, _ := w.machine(); m != nil {
		w.log.Info("VM deleted: killing its machine")
		kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := m.Kill(kctx); err != nil {
			w.log.Warn("kill the machine of a deleted VM", "err", err)
		}
		cancel()
		w.release()
	}
	w.detachRun(ctx)
	w.h.dropIncoming(ctx, w.name, "", "the VM was deleted")
	if err := os.RemoveAll(w.dir); err != nil {
		w.log.Warn("remove the run directory of a deleted VM", "err", err)
	}
	return true
}

// elsewhere handles a VM assigned to another host: a machine here (left behind by a completed migration)
// stops; an incoming machine waits for its migration to end.
func (w *worker) elsewhere(ctx context.Context, d *basaltv1.VM, rev int64) bool {
	if mig := w.migration(); mig != nil {
		return false // it ends, and moves the VM, on its own
	}
	me := w.h.cfg.NodeID
	if m, _ := w.machine(); m != nil {
		info, _ := m.Info(ctx)
		if info.State == hypervisor.StateRunning {
			w.log.Error("the VM is assigned to another host but its guest runs here; killing it here", "host", d.GetHost())
		} else {
			w.log.Info("the VM moved to another host; stopping the machine left here", "host", d.GetHost(), "state", info.State)
		}
		kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := m.Kill(kctx); err != nil {
			w.log.Warn("stop the machine left here", "err", err)
		}
		cancel()
		w.release()
	}
	if in := w.h.getIncoming(w.name); in != nil {
		mig := d.GetMigration()
		if mig.GetTarget() == me && mig.GetId() == in.id {
			return false
		}
		if rev >= in.rev {
			w.h.dropIncoming(ctx, w.name, in.id, "its migration is over")
		} else {
			return false
		}
	}
	return true
}

// adoptIncoming takes over the machine of a completed incoming migration. The worker holds its console
// before the incoming record is dropped, so a viewer attaching meanwhile always finds it.
func (w *worker) adoptIncoming(ctx context.Context) {
	in := w.h.getIncoming(w.name)
	if in == nil {
		return
	}
	info, err := in.m.Info(ctx)
	if err != nil || info.State == hypervisor.StateIncoming || in.dead() {
		// It never received the VM (a migration that failed without telling us): not a machine to run.
		w.log.Warn("discarding an incoming machine that holds no VM", "state", info.State, "err", err)
		w.h.dropIncoming(ctx, w.name, in.id, "it holds no VM")
		return
	}
	if err := w.attach(ctx, in.m, in.con); err != nil {
		w.log.Warn("adopt the migrated machine", "err", err)
		return
	}
	w.h.takeIncoming(w.name)
	w.startedAt = time.Now()
	w.setStatus(func(st *basaltv1.VMStatus) { st.AttachGenerations = in.gens })
	// Keep the source's report of the migration that brought the VM here.
	if prev, err := store.Get[basaltv1.VMStatus](ctx, w.h.cfg.Store, schema.VMStatusKey(w.name)); err == nil {
		w.setStatus(func(st *basaltv1.VMStatus) { st.Migration = prev.Value.GetMigration() })
	}
	w.log.Info("the VM arrived by live migration", "migration", in.id, "state", info.State)
}

// stopMachine carries out a declared stop: the ACPI power button, then the kill at the deadline.
func (w *worker) stopMachine(ctx context.Context, d *basaltv1.VM) bool {
	me := w.h.cfg.NodeID
	if mig := w.migration(); mig != nil {
		mig.cancel() // it wakes the worker when it has ended
		return false
	}
	if mig := d.GetMigration(); mig != nil && mig.GetSource() == me {
		w.endMigration(ctx, mig, "cancelled", nil)
	}
	m, _ := w.machine()
	if m == nil {
		w.detachRun(ctx)
		w.setStatus(func(st *basaltv1.VMStatus) {
			st.State, st.Pid, st.MemoryActualBytes = basaltv1.VMState_VM_STATE_STOPPED, 0, 0
			st.ObservedGeneration = d.GetGeneration()
		})
		w.flushStatus(ctx)
		return true
	}
	stop := d.GetStop()
	deadline := stop.GetRequestedAt().AsTime().Add(time.Duration(stop.GetTimeoutSeconds()) * time.Second)
	if stop == nil || stop.GetForce() || !time.Now().Before(deadline) {
		why := "killed"
		if stop != nil && !stop.GetForce() {
			why = fmt.Sprintf("forced off: the guest did not power off within %ds", stop.GetTimeoutSeconds())
		}
		w.log.Info("stopping the machine", "how", why)
		kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := m.Kill(kctx)
		cancel()
		if err != nil {
			w.log.Warn("kill the machine", "err", err)
			w.setStatus(func(st *basaltv1.VMStatus) { setError(st, err) })
			w.flushStatus(ctx)
			w.nextWake = time.Now().Add(5 * time.Second)
			return false
		}
		w.release()
		w.detachRun(ctx)
		w.setStatus(func(st *basaltv1.VMStatus) {
			st.State, st.Pid, st.MemoryActualBytes = basaltv1.VMState_VM_STATE_STOPPED, 0, 0
			st.ObservedGeneration = d.GetGeneration()
			if stop != nil && !stop.GetForce() {
				setError(st, errors.New(why))
			}
		})
		w.flushStatus(ctx)
		return true
	}
	if !w.shutdownSent.Equal(stop.GetRequestedAt().AsTime()) {
		w.log.Info("pressing the power button", "timeout", time.Duration(stop.GetTimeoutSeconds())*time.Second)
		if err := m.Shutdown(ctx); err != nil {
			w.log.Warn("press the power button", "err", err)
		} else {
			w.shutdownSent = stop.GetRequestedAt().AsTime()
		}
	}
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.State = basaltv1.VMState_VM_STATE_STOPPING
		st.ObservedGeneration = d.GetGeneration()
	})
	w.flushStatus(ctx)
	w.nextWake = deadline
	return false
}

// runMachine keeps a VM that should run running: started, paused or resumed, at its memory target, and
// migrating when asked.
func (w *worker) runMachine(ctx context.Context, d *basaltv1.VM, rev int64) {
	if w.h.selfFenced.Load() {
		return // cut off from etcd: guardLease holds the guest paused, and nothing new starts
	}
	me := w.h.cfg.NodeID
	m, _ := w.machine()
	if m == nil {
		if d.GetGeneration() == w.failedGen && time.Now().Before(w.retryAt) {
			w.nextWake = w.retryAt
			return
		}
		if err := w.start(ctx, d); err != nil {
			if d.GetGeneration() != w.failedGen {
				w.failures = 0
			}
			w.failures++
			w.failedGen = d.GetGeneration()
			w.retryAt = time.Now().Add(min(5*time.Second<<min(w.failures-1, 5), 2*time.Minute))
			w.nextWake = w.retryAt
			w.log.Warn("start the machine", "err", err, "retry_at", w.retryAt.Format(time.TimeOnly))
			w.setStatus(func(st *basaltv1.VMStatus) {
				st.State = basaltv1.VMState_VM_STATE_FAILED
				st.ObservedGeneration = d.GetGeneration()
				setError(st, err)
			})
			w.flushStatus(ctx)
			return
		}
		w.failures = 0
		m, _ = w.machine()
	}

	mig := w.migration()
	if req := d.GetMigration(); req != nil && req.GetSource() == me {
		switch {
		case mig == nil && req.GetCancel():
			w.endMigration(ctx, req, "cancelled", nil)
		case mig == nil:
			mig = w.startMigration(ctx, m, d, rev)
		case req.GetCancel() || req.GetId() != mig.id:
			mig.cancel()
		}
	} else if mig != nil {
		mig.cancel() // the request is gone
	}

	info, err := m.Info(ctx)
	if err != nil {
		w.log.Warn("machine info", "err", err)
		return
	}
	if mig == nil {
		switch {
		case d.GetDesiredState() == basaltv1.VMState_VM_STATE_PAUSED && info.State == hypervisor.StateRunning:
			err = m.Pause(ctx)
		case d.GetDesiredState() == basaltv1.VMState_VM_STATE_RUNNING && info.State == hypervisor.StatePaused && info.DiskError != "":
			err = w.resumeAfterDiskError(ctx, m, info.DiskError)
		case d.GetDesiredState() == basaltv1.VMState_VM_STATE_RUNNING && info.State == hypervisor.StatePaused:
			err = m.Resume(ctx)
		case info.State == hypervisor.StateRunning && time.Now().After(w.diskRetryAt.Add(time.Minute)):
			w.diskRetries = 0 // a minute of running since the last retry: the disk error is over
		}
		if err != nil {
			w.log.Warn("set the machine's run state", "want", d.GetDesiredState(), "err", err)
			w.setStatus(func(st *basaltv1.VMStatus) { setError(st, err) })
		} else if info, err = m.Info(ctx); err != nil {
			w.log.Warn("machine info", "err", err)
			return
		}
	}
	if t := d.GetMemoryTargetBytes(); t != 0 && t != w.applied {
		if err := m.SetBalloon(ctx, t); err != nil {
			w.log.Warn("set the balloon", "target", t, "err", err)
			w.setStatus(func(st *basaltv1.VMStatus) { setError(st, err) })
		} else {
			w.applied = t
			w.log.Info("balloon target set", "bytes", t)
		}
	}
	w.monitorGuest(ctx, d, m, info, mig != nil)
	w.sample(ctx, m)
	w.meterTick(ctx)
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.State = stateOf(info.State)
		if mig != nil {
			st.State = basaltv1.VMState_VM_STATE_MIGRATING
		}
		st.Accel, st.Pid = info.Accel, int32(info.PID)
		st.MemoryActualBytes, st.MemoryTargetBytes = info.BalloonActual, w.applied
		if st.StartedAt == nil || !st.StartedAt.AsTime().Equal(w.startedAt) {
			st.StartedAt = timestamppb.New(w.startedAt)
		}
		st.ObservedGeneration = d.GetGeneration()
		if st.State == basaltv1.VMState_VM_STATE_RUNNING && st.LastError != "" && time.Since(st.GetLastErrorAt().AsTime()) > time.Minute {
			st.LastError, st.LastErrorAt = "", nil // an old error no longer describes a VM that runs
		}
	})
	w.flushStatus(ctx)
}

// resumeAfterDiskError retries a guest that its disk's error policy paused (a full volume, an unreachable or a
// fenced one): at once the first time, then with a back-off up to 5 s, saying why in the status. Resuming
// retries the failed request; a cause that went away (space freed, the cluster back) lets the guest go on.
func (w *worker) resumeAfterDiskError(ctx context.Context, m hypervisor.Machine, why string) error {
	if time.Now().Before(w.diskRetryAt) {
		w.nextWake = w.diskRetryAt
		return nil
	}
	if vol, err := w.fencedDisk(ctx); err != nil {
		w.log.Warn("check the disks' attachments", "err", err)
	} else if vol != "" {
		// Its writes can never be accepted again (the host was declared failed while it was cut off or frozen,
		// or another host took the volume over): this run is over. The next reconcile starts a new one, with
		// new attachments, if the VM is still declared running here.
		w.log.Warn("the guest's disk was fenced: killing this run of it", "volume", vol)
		kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := m.Kill(kctx)
		cancel()
		if err != nil {
			return fmt.Errorf("kill the fenced machine: %w", err)
		}
		w.release()
		w.diskRetries, w.diskRetryAt = 0, time.Time{} // the next run starts afresh
		w.setStatus(func(st *basaltv1.VMStatus) {
			st.AttachGenerations = nil // fenced: nothing of this host's to detach
			setError(st, fmt.Errorf("volume %s was fenced under this run (its host was taken for failed, or another host took the volume over); the run was killed", vol))
		})
		w.nextWake = time.Now()
		return nil
	}
	// At most 5 s: an operator who frees space expects the guest back soon, and a retry costs one request.
	wait := min(time.Second<<min(w.diskRetries, 3), 5*time.Second)
	w.diskRetries++
	w.diskRetryAt = time.Now().Add(wait)
	w.nextWake = w.diskRetryAt
	w.log.Warn("the guest paused on a disk error; resuming it", "disk_error", why, "attempt", w.diskRetries, "next_in", wait)
	w.setStatus(func(st *basaltv1.VMStatus) {
		setError(st, fmt.Errorf("the guest paused on a disk error (%s); resumed %d times, next in %s", why, w.diskRetries, wait))
	})
	return m.Resume(ctx)
}

// fencedDisk returns a volume whose attachment this run opened but no longer holds ("" if none): its writes are
// refused for good.
func (w *worker) fencedDisk(ctx context.Context) (string, error) {
	w.stMu.Lock()
	gens := maps.Clone(w.st.AttachGenerations)
	w.stMu.Unlock()
	for _, vol := range slices.Sorted(maps.Keys(gens)) {
		rec, err := store.Get[basaltv1.Volume](ctx, w.h.cfg.Store, schema.VolumeKey(vol))
		if err != nil {
			return "", fmt.Errorf("read volume %s: %w", vol, err)
		}
		held := false
		for _, a := range rec.Value.GetAttachments() {
			if a.GetHost() == w.h.cfg.NodeID && a.GetGeneration() == gens[vol] && !a.GetIncoming() {
				held = true
			}
		}
		if !held {
			return vol, nil
		}
	}
	return "", nil
}

// start launches the machine of d.
func (w *worker) start(ctx context.Context, d *basaltv1.VM) error {
	sock, err := w.h.nbdSocket(ctx)
	if err != nil {
		return err
	}
	nics, err := w.h.plugNICs(ctx, d)
	if err != nil {
		return err
	}
	w.detachRun(ctx) // generations of an earlier run that ended without detaching
	gens, err := w.h.attachDisks(ctx, d)
	if err != nil {
		return err
	}
	spec := w.h.machineSpec(d, &sock, nics, gens)
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.State = basaltv1.VMState_VM_STATE_STARTING
		st.ObservedGeneration = d.GetGeneration()
		st.AttachGenerations = gens
	})
	w.flushStatus(ctx)
	started := false
	defer func() {
		if !started {
			w.detachRun(ctx)
		}
	}()
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return fmt.Errorf("create the run directory: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, w.h.cfg.StartTimeout)
	defer cancel()
	m, err := w.h.cfg.Driver.Start(sctx, spec)
	if err != nil {
		return err
	}
	if err := w.attach(ctx, m, nil); err != nil {
		m.Kill(context.WithoutCancel(ctx))
		m.Close()
		return err
	}
	started = true
	w.startedAt = time.Now()
	w.monitorNewRun()
	w.log.Info("machine started", "vcpus", spec.VCPUs, "memory", spec.Memory, "max_memory", spec.MaxMemory, "disks", len(spec.Disks))
	return nil
}

// sample reads the machine's meters for rates and the metrics endpoint.
func (w *worker) sample(ctx context.Context, m hypervisor.Machine) {
	st, err := m.Stats(ctx)
	if err != nil {
		w.log.Debug("machine stats", "err", err)
		return
	}
	w.mu.Lock()
	w.samples[0], w.samples[1] = w.samples[1], statSample{at: time.Now(), st: st}
	w.mu.Unlock()
}

func stateOf(s hypervisor.State) basaltv1.VMState {
	switch s {
	case hypervisor.StateRunning:
		return basaltv1.VMState_VM_STATE_RUNNING
	case hypervisor.StatePaused:
		return basaltv1.VMState_VM_STATE_PAUSED
	case hypervisor.StateMigrating:
		return basaltv1.VMState_VM_STATE_MIGRATING
	case hypervisor.StateIncoming:
		return basaltv1.VMState_VM_STATE_STARTING
	case hypervisor.StateShutdown:
		return basaltv1.VMState_VM_STATE_STOPPING
	}
	return basaltv1.VMState_VM_STATE_UNSPECIFIED
}

func setError(st *basaltv1.VMStatus, err error) {
	st.LastError, st.LastErrorAt = err.Error(), timestamppb.Now()
}

// loadStatus starts from the status this host last wrote for the VM (an earlier worker's or computed's), so
// that what it recorded (errors, the last migration) is kept.
func (w *worker) loadStatus(ctx context.Context) {
	rec, err := store.Get[basaltv1.VMStatus](ctx, w.h.cfg.Store, schema.VMStatusKey(w.name))
	if err != nil || rec.Value.GetHost() != w.h.cfg.NodeID {
		return
	}
	w.stMu.Lock()
	defer w.stMu.Unlock()
	st := rec.Value
	st.Hypervisor, st.ConsoleLog, st.UpdatedAt = w.st.Hypervisor, w.st.ConsoleLog, nil
	w.st = st
	w.stSent, _ = proto.MarshalOptions{Deterministic: true}.Marshal(st)
}

// setStatus changes the status this worker reports.
func (w *worker) setStatus(fn func(st *basaltv1.VMStatus)) {
	w.stMu.Lock()
	defer w.stMu.Unlock()
	fn(w.st)
}

// flushStatus writes the status if it changed since the last write. Only the host a VM is assigned to
// writes its status, so the record has one writer at a time.
func (w *worker) flushStatus(ctx context.Context) {
	w.stMu.Lock()
	defer w.stMu.Unlock()
	w.st.UpdatedAt = nil
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(w.st)
	if err != nil || string(b) == string(w.stSent) {
		return
	}
	w.st.UpdatedAt = timestamppb.Now()
	if _, err := w.h.cfg.Store.Put(ctx, schema.VMStatusKey(w.name), w.st); err != nil {
		if ctx.Err() == nil {
			w.log.Warn("write the VM's status", "err", err)
		}
		return
	}
	w.stSent = b
}

// statusSnapshot returns a copy of the status.
func (w *worker) statusSnapshot() *basaltv1.VMStatus {
	w.stMu.Lock()
	defer w.stMu.Unlock()
	return proto.Clone(w.st).(*basaltv1.VMStatus)
}
