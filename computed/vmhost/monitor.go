package vmhost

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// VM monitoring (docs/compute.md, "VM monitoring"). A VM whose spec has monitoring.heartbeat gets an agent
// channel (hypervisor.Spec.Agent); the guest agent writes a heartbeat line on it every second. The worker keeps
// the last one in the VM's status and, while the VM should run and does (not paused, migrating or stopping),
// resets a guest that has been silent for monitoring.timeout_seconds. After monitoring.max_resets resets within
// an hour it stops resetting and says so in the status (monitor_gave_up); the HA controller then moves the VM,
// and its run on the next host starts with fresh counters.
const (
	defaultBeatTimeout = 10 * time.Second
	defaultMaxResets   = 3
	// resetWindow is how far back resets count against max_resets.
	resetWindow = time.Hour
	// bootAllowance is the least a guest gets to send its first heartbeat after a start or reset: guests take
	// longer to boot and start their agent than a heartbeat timeout (the test guest under TCG needs about 3 s
	// from a cold start and 8 s after a reset; a distribution's guest tens of seconds).
	bootAllowance = time.Minute
	// beatPublishEvery bounds how often the heartbeat alone rewrites the status record in etcd.
	beatPublishEvery = 5 * time.Second
	// agentRetry is the pause before reconnecting a broken agent channel.
	agentRetry = time.Second
)

// monitor is the agent channel of one machine and what came through it.
type monitor struct {
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	conn    io.ReadWriteCloser // the open stream; nil while (re)connecting
	noAgent error              // the machine has no agent channel (hypervisor.ErrNoAgent)
	beatAt  time.Time          // host time of the last heartbeat
	seq     uint64
	boot    string

	// Owned by the worker's run goroutine.
	since         time.Time // start of the current window: attach, last reset, or return to a judged state; zero while not judged
	booting       bool      // no heartbeat since the attach or the last reset: the window is at least bootAllowance
	warned        bool      // the missing channel was reported
	publishedAt   time.Time // beatAt last put in the status
	publishedBoot string
}

// startMonitor connects to m's agent channel in the background (attach calls it for every machine the worker
// takes on; a machine without a channel ends it at once).
func (w *worker) startMonitor(ctx context.Context, m hypervisor.Machine) {
	mctx, cancel := context.WithCancel(ctx)
	mon := &monitor{log: w.log, cancel: cancel, done: make(chan struct{}), since: time.Now(), booting: true}
	w.mu.Lock()
	old := w.mon
	w.mon = mon
	w.mu.Unlock()
	if old != nil {
		old.stop()
	}
	go func() {
		defer close(mon.done)
		mon.listen(mctx, m)
	}()
}

// stopMonitor closes the agent channel (release calls it: the machine is let go of).
func (w *worker) stopMonitor() {
	w.mu.Lock()
	mon := w.mon
	w.mon = nil
	w.mu.Unlock()
	if mon != nil {
		mon.stop()
	}
}

func (mon *monitor) stop() {
	mon.cancel()
	<-mon.done
}

// listen keeps the agent channel open and reads heartbeats from it until ctx ends. A stream that breaks is
// reopened: QEMU serves one client at a time on the channel's socket and takes the next when it closes.
func (mon *monitor) listen(ctx context.Context, m hypervisor.Machine) {
	for {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		conn, err := m.Agent(actx)
		cancel()
		if errors.Is(err, hypervisor.ErrNoAgent) {
			mon.mu.Lock()
			mon.noAgent = err
			mon.mu.Unlock()
			return
		}
		if err == nil {
			mon.mu.Lock()
			mon.conn = conn
			mon.mu.Unlock()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			err = mon.read(conn)
			stop()
			conn.Close()
			mon.mu.Lock()
			mon.conn = nil
			mon.mu.Unlock()
			if ctx.Err() == nil {
				// Also what a guest's power-off or a hypervisor's exit looks like from here, before the worker
				// learns of it: not a warning on its own.
				mon.log.Info("VM monitoring: the agent channel closed; reopening it", "err", err)
			}
		} else if ctx.Err() == nil {
			mon.log.Debug("VM monitoring: open the agent channel", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(agentRetry):
		}
	}
}

// read takes heartbeats from the stream until it ends. Other lines are the guest's business, not an error.
func (mon *monitor) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		seq, boot, ok := parseBeat(sc.Text())
		if !ok {
			mon.log.Debug("VM monitoring: not a heartbeat", "line", sc.Text())
			continue
		}
		mon.mu.Lock()
		mon.beatAt, mon.seq, mon.boot = time.Now(), seq, boot
		mon.mu.Unlock()
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return io.EOF
}

// parseBeat parses a heartbeat line, "BASALT beat seq=<n> boot=<id>": n counts the boot's heartbeats from 1,
// id names the boot. The test guest's agent writes it with computed/testguest/record.BeatLine.
func parseBeat(line string) (seq uint64, boot string, ok bool) {
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "BASALT" || f[1] != "beat" {
		return 0, "", false
	}
	s, okSeq := strings.CutPrefix(f[2], "seq=")
	boot, okBoot := strings.CutPrefix(f[3], "boot=")
	seq, err := strconv.ParseUint(s, 10, 64)
	if !okSeq || !okBoot || err != nil || boot == "" {
		return 0, "", false
	}
	return seq, boot, true
}

// monitorNewRun clears the monitoring record of the previous run (start calls it for a new machine): resets
// and giving up concern one run of the VM.
func (w *worker) monitorNewRun() {
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.LastHeartbeat, st.HeartbeatSeq, st.MonitorResets, st.MonitorGaveUp = nil, 0, nil, false
	})
}

// monitorGuest looks at the guest's heartbeat once; runMachine calls it with the machine's settled state,
// before it writes the status. It publishes the last heartbeat (at most every beatPublishEvery, and at once
// for a new boot), and resets the guest if it should be heard and has been silent too long, or gives up.
func (w *worker) monitorGuest(ctx context.Context, d *basaltv1.VM, m hypervisor.Machine, info hypervisor.Info, migrating bool) {
	w.mu.Lock()
	mon := w.mon
	w.mu.Unlock()
	if mon == nil {
		return
	}
	mon.mu.Lock()
	beatAt, seq, boot, noAgent := mon.beatAt, mon.seq, mon.boot, mon.noAgent
	mon.mu.Unlock()
	now := time.Now()
	if !beatAt.IsZero() && (boot != mon.publishedBoot || beatAt.Sub(mon.publishedAt) >= beatPublishEvery) {
		mon.publishedAt, mon.publishedBoot = beatAt, boot
		w.setStatus(func(st *basaltv1.VMStatus) {
			st.LastHeartbeat, st.HeartbeatSeq = timestamppb.New(beatAt), seq
		})
	}

	cfg := d.GetSpec().GetMonitoring()
	if !cfg.GetHeartbeat() {
		mon.since = time.Time{}
		return
	}
	if noAgent != nil {
		if !mon.warned {
			mon.warned = true
			err := fmt.Errorf("VM monitoring is off for this run: %w", noAgent)
			w.log.Warn("VM monitoring cannot hear the guest", "err", err)
			w.setStatus(func(st *basaltv1.VMStatus) { setError(st, err) })
		}
		return
	}
	if migrating || info.State != hypervisor.StateRunning || d.GetDesiredState() != basaltv1.VMState_VM_STATE_RUNNING {
		mon.since = time.Time{} // not judged; the window starts afresh when it is again
		return
	}
	var resets []*timestamppb.Timestamp
	w.stMu.Lock()
	gaveUp := w.st.GetMonitorGaveUp()
	for _, r := range w.st.GetMonitorResets() {
		if now.Sub(r.AsTime()) < resetWindow {
			resets = append(resets, r)
		}
	}
	pruned := len(resets) != len(w.st.GetMonitorResets())
	w.stMu.Unlock()
	if pruned {
		w.setStatus(func(st *basaltv1.VMStatus) { st.MonitorResets = resets })
	}
	if gaveUp {
		return // the HA controller moves the VM; resetting it again here would only disturb that
	}

	if mon.since.IsZero() {
		mon.since = now
	}
	timeout := time.Duration(cfg.GetTimeoutSeconds()) * time.Second
	if timeout == 0 {
		timeout = defaultBeatTimeout
	}
	var deadline time.Time
	switch {
	case beatAt.After(mon.since):
		mon.booting = false
		deadline = beatAt.Add(timeout)
	case mon.booting:
		deadline = mon.since.Add(max(timeout, bootAllowance))
	default:
		deadline = mon.since.Add(timeout)
	}
	if now.Before(deadline) {
		if w.nextWake.IsZero() || deadline.Before(w.nextWake) {
			w.nextWake = deadline
		}
		return
	}

	silent := now.Sub(mon.since)
	if beatAt.After(mon.since) {
		silent = now.Sub(beatAt)
	}
	maxResets := int(cfg.GetMaxResets())
	if maxResets == 0 {
		maxResets = defaultMaxResets
	}
	if len(resets) >= maxResets {
		err := fmt.Errorf("VM monitoring gave up: no heartbeat for %s, and %d resets within the last hour already", silent.Round(time.Second), len(resets))
		w.log.Error("VM monitoring gave up on this host; the HA controller moves the VM", "silent_for", silent.Round(time.Second),
			"resets", len(resets), "last_seq", seq)
		w.setStatus(func(st *basaltv1.VMStatus) {
			st.MonitorGaveUp = true
			setError(st, err)
		})
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := m.Reset(rctx)
	cancel()
	if err != nil {
		// Tried again at the next reconcile.
		w.log.Warn("VM monitoring: reset the silent guest", "err", err)
		w.setStatus(func(st *basaltv1.VMStatus) {
			setError(st, fmt.Errorf("VM monitoring: reset the silent guest: %w", err))
		})
		return
	}
	mon.since, mon.booting = time.Now(), true
	w.log.Warn("VM monitoring: no heartbeat; reset the guest", "silent_for", silent.Round(time.Second), "timeout", timeout,
		"last_seq", seq, "resets_in_last_hour", len(resets)+1, "max_resets", maxResets)
	w.setStatus(func(st *basaltv1.VMStatus) {
		st.MonitorResets = append(resets, timestamppb.New(now))
		setError(st, fmt.Errorf("VM monitoring reset the guest: no heartbeat for %s", silent.Round(time.Second)))
	})
}
