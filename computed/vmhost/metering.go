package vmhost

import (
	"context"
	"errors"
	"slices"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/metering"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Metering history (docs/compute.md, "Metering"): the host a VM runs on turns the worker's readings of the
// machine's counters into one VMMeteringSample per MeteringInterval and appends it to the VM's
// VMMeteringHistory in etcd. Keeping it in etcd rather than on the host makes it follow the VM across
// migrations and survive restarts of computed.
const (
	DefaultMeteringInterval = time.Minute
	DefaultMeteringSamples  = 1440 // per hour's record: only tests set fewer
	// MeteringRetention is the age past which an append drops samples, whatever their number: a VM that ran
	// again after a long stop should not show the previous week as its last day.
	MeteringRetention = metering.Retention
	// meteringWriteTimeout bounds one append; it also bounds how long releasing a machine waits for its last
	// sample to be written.
	meteringWriteTimeout = 5 * time.Second
	// maxMeteringAttempts bounds the compare-and-swap retries of one append: the record has one writer most of
	// the time and two around a migration, so losing this many races in a row means something else is wrong,
	// and the samples wait for the next interval instead of spinning.
	maxMeteringAttempts = 20
)

// errVMGone is returned by appendMetering when the VM's declaration no longer exists: DeleteVM removed its
// history with it, and a late sample must not bring the record back.
var errVMGone = metering.ErrVMGone

// meter is a worker's metering state, owned by the run goroutine (runMachine and release).
type meter struct {
	base    statSample                   // the reading the current interval started from; zero: none yet
	pending []*basaltv1.VMMeteringSample // samples not yet in etcd (it could not be reached), oldest first
}

// meterTick closes the current metering interval once it is MeteringInterval long, from the worker's latest
// reading of its machine, and appends the sample. It is called from runMachine only, so only a machine that
// runs on this host for this VM is metered, never an incoming one.
func (w *worker) meterTick(ctx context.Context) {
	w.mu.Lock()
	cur := w.samples[1]
	w.mu.Unlock()
	if cur.at.IsZero() {
		return
	}
	if w.meter.base.at.IsZero() {
		w.meter.base = cur
		return
	}
	if cur.at.Sub(w.meter.base.at) < w.h.cfg.MeteringInterval {
		return
	}
	w.closeInterval(cur)
	w.writeMetering(ctx)
}

// meterEnd closes the current interval at the last reading and writes what is pending, as the machine is let
// go of (it stopped, left by migration, or computed is stopping): its last partial interval is kept, and the
// next machine starts a new baseline. release has no context and runs also after Run's context ended (computed
// stopping, when the partial interval is still worth recording), hence a context of its own.
func (w *worker) meterEnd() {
	w.mu.Lock()
	last := w.samples[1]
	w.mu.Unlock()
	if !w.meter.base.at.IsZero() && last.at.After(w.meter.base.at) {
		w.closeInterval(last)
	}
	w.meter.base = statSample{}
	if len(w.meter.pending) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), meteringWriteTimeout)
	defer cancel()
	w.writeMetering(ctx)
	// Nothing will retry what is left: this worker may be about to end.
	w.meter.pending = nil
}

// closeInterval turns the interval from the baseline to cur into a pending sample and makes cur the baseline.
func (w *worker) closeInterval(cur statSample) {
	s, ok := meteringSample(w.h.cfg.NodeID, w.meter.base, cur, w.applied)
	w.meter.base = cur
	if !ok {
		w.log.Info("the machine's counters went backwards: metering starts a new baseline")
		return
	}
	w.meter.pending = append(w.meter.pending, s)
	if n := len(w.meter.pending) - w.h.cfg.MeteringSamples; n > 0 {
		w.meter.pending = slices.Delete(w.meter.pending, 0, n)
	}
}

// writeMetering appends the pending samples to the VM's history; on failure they stay pending for the next
// interval.
func (w *worker) writeMetering(ctx context.Context) {
	wctx, cancel := context.WithTimeout(ctx, meteringWriteTimeout)
	defer cancel()
	err := appendMetering(wctx, w.h.cfg.Store, w.name, w.meter.pending, w.h.cfg.MeteringSamples, time.Now())
	switch {
	case err == nil, errors.Is(err, errVMGone):
		w.meter.pending = nil
	case ctx.Err() == nil:
		w.log.Warn("append to the VM's metering history; kept for the next interval", "samples", len(w.meter.pending), "err", err)
	}
}

// meteringSample is the VM's use between two readings of one machine. ok is false when a counter went
// backwards: the readings are of two machines (a restart or a migration raced with a reading), and the difference
// means nothing. Disks count only when both readings have them; a disk added meanwhile starts at the next one.
func meteringSample(host string, from, to statSample, target uint64) (*basaltv1.VMMeteringSample, bool) {
	if to.st.CPUTime < from.st.CPUTime {
		return nil, false
	}
	s := &basaltv1.VMMeteringSample{
		Start: timestamppb.New(from.at), End: timestamppb.New(to.at), Host: host,
		CpuTimeNs:         uint64((to.st.CPUTime - from.st.CPUTime).Nanoseconds()),
		MemoryActualBytes: to.st.BalloonActual, MemoryTargetBytes: target,
	}
	if secs := to.at.Sub(from.at).Seconds(); secs > 0 {
		s.CpuUsage = float64(s.CpuTimeNs) / 1e9 / secs
	}
	for id, n := range to.st.Disks {
		o, ok := from.st.Disks[id]
		if !ok {
			continue
		}
		if n.ReadBytes < o.ReadBytes || n.WriteBytes < o.WriteBytes || n.ReadOps < o.ReadOps || n.WriteOps < o.WriteOps {
			return nil, false
		}
		s.ReadBytes += n.ReadBytes - o.ReadBytes
		s.WriteBytes += n.WriteBytes - o.WriteBytes
		s.ReadOps += n.ReadOps - o.ReadOps
		s.WriteOps += n.WriteOps - o.WriteOps
	}
	return s, true
}

// appendMetering adds samples to the VM's metering history (metad/metering); limit bounds each hour's record.
func appendMetering(ctx context.Context, s *store.Store, name string, add []*basaltv1.VMMeteringSample, limit int, now time.Time) error {
	if len(add) == 0 {
		return nil
	}
	return metering.Append(ctx, s, name, add, limit, now)
}
