package vmhost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/metering"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestMeteringSample: a sample is the difference of two readings of one machine; a counter that went backwards
// (another machine) gives no sample, and a disk only the newer reading has does not count yet.
func TestMeteringSample(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	from := statSample{at: t0, st: hypervisor.Stats{CPUTime: 10 * time.Second, BalloonActual: 64 * mib,
		Disks: map[string]hypervisor.DiskStats{"a": {ReadBytes: 1000, WriteBytes: 2000, ReadOps: 10, WriteOps: 20}}}}
	to := statSample{at: t0.Add(time.Minute), st: hypervisor.Stats{CPUTime: 40 * time.Second, BalloonActual: 96 * mib,
		Disks: map[string]hypervisor.DiskStats{
			"a": {ReadBytes: 5000, WriteBytes: 2000, ReadOps: 14, WriteOps: 20},
			"b": {ReadBytes: 1 << 30, WriteBytes: 1 << 30, ReadOps: 1 << 20, WriteOps: 1 << 20}, // added meanwhile
		}}}
	s, ok := meteringSample("h1", from, to, 128*mib)
	want := &basaltv1.VMMeteringSample{Start: timestamppb.New(from.at), End: timestamppb.New(to.at), Host: "h1",
		CpuTimeNs: uint64(30 * time.Second), CpuUsage: 0.5, MemoryActualBytes: 96 * mib, MemoryTargetBytes: 128 * mib,
		ReadBytes: 4000, ReadOps: 4}
	if !ok || !proto.Equal(s, want) {
		t.Fatalf("meteringSample = %v, %v; want %v", s, ok, want)
	}

	restarted := to
	restarted.st.CPUTime = time.Second
	if s, ok := meteringSample("h1", to, restarted, 0); ok {
		t.Errorf("CPU time going backwards gave a sample: %v", s)
	}
	fewer := to
	fewer.st.Disks = map[string]hypervisor.DiskStats{"a": {ReadBytes: 5000, WriteBytes: 2000, ReadOps: 3, WriteOps: 20}}
	if s, ok := meteringSample("h1", to, fewer, 0); ok {
		t.Errorf("disk operations going backwards gave a sample: %v", s)
	}
}

// meteringStore is a real etcd holding the declaration of VM "vm1".
func meteringStore(t *testing.T, ctx context.Context) *store.Store {
	t.Helper()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Create(ctx, schema.VMKey("vm1"), &basaltv1.VM{Name: "vm1"}); err != nil {
		t.Fatal(err)
	}
	return s
}

func minuteSample(host string, start time.Time) *basaltv1.VMMeteringSample {
	return &basaltv1.VMMeteringSample{Host: host, Start: timestamppb.New(start), End: timestamppb.New(start.Add(time.Minute)), CpuTimeNs: 1}
}

func storedHistory(t *testing.T, ctx context.Context, s *store.Store, name string) []*basaltv1.VMMeteringSample {
	t.Helper()
	got, err := metering.History(ctx, s, name)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestMeteringAppendConcurrent: two hosts appending to one VM's history at once (a migration's switchover) lose
// none of each other's samples, and the history is kept in the order of the samples' ends.
func TestMeteringAppendConcurrent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := meteringStore(t, ctx)
	now := time.Now()
	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for h, host := range []string{"h1", "h2"} {
		wg.Go(func() {
			for i := range n {
				// The two hosts' samples interleave in time, so that order is checked as well as count.
				start := now.Add(-2 * time.Hour).Add(time.Duration(2*i+h) * time.Minute)
				if err := appendMetering(ctx, s, "vm1", []*basaltv1.VMMeteringSample{minuteSample(host, start)}, 1000, now); err != nil {
					errs <- fmt.Errorf("%s sample %d: %w", host, i, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got := storedHistory(t, ctx, s, "vm1")
	if len(got) != 2*n {
		t.Fatalf("%d samples stored, want %d", len(got), 2*n)
	}
	for i, smp := range got {
		wantHost := []string{"h1", "h2"}[i%2]
		if smp.GetHost() != wantHost || !smp.GetStart().AsTime().Equal(now.Add(-2*time.Hour).Add(time.Duration(i)*time.Minute)) {
			t.Fatalf("sample %d is %v; want %s's, starting %d minutes into the run", i, smp, wantHost, i)
		}
	}
}

// TestMeteringAppendBounds: the history keeps at most its limit of samples and none older than a day, a sample
// stored already (its write's answer was lost) is not added twice, and a deleted VM gets no history back.
func TestMeteringAppendBounds(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := meteringStore(t, ctx)
	now := time.Now()
	old := minuteSample("h1", now.Add(-25*time.Hour))
	var recent []*basaltv1.VMMeteringSample
	for i := range 5 {
		recent = append(recent, minuteSample("h1", now.Add(time.Duration(i-10)*time.Minute)))
	}
	if err := appendMetering(ctx, s, "vm1", []*basaltv1.VMMeteringSample{old, recent[0]}, 3, now); err != nil {
		t.Fatal(err)
	}
	if got := storedHistory(t, ctx, s, "vm1"); len(got) != 1 || !proto.Equal(got[0], recent[0]) {
		t.Fatalf("after a sample older than a day and a recent one: %v", got)
	}
	if err := appendMetering(ctx, s, "vm1", recent, 3, now); err != nil {
		t.Fatal(err)
	}
	got := storedHistory(t, ctx, s, "vm1")
	if len(got) != 3 || !proto.Equal(got[0], recent[2]) || !proto.Equal(got[2], recent[4]) {
		t.Fatalf("history bounded to 3 after 5 samples (one of them twice): %v", got)
	}

	if _, err := s.Client.Delete(ctx, schema.VMKey("vm1")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client.Txn(ctx).Then(metering.DeleteOp("vm1")).Commit(); err != nil {
		t.Fatal(err)
	}
	if err := appendMetering(ctx, s, "vm1", recent, 3, now); !errors.Is(err, errVMGone) {
		t.Fatalf("append for a deleted VM: %v, want errVMGone", err)
	}
	if got, err := metering.History(ctx, s, "vm1"); err != nil || len(got) != 0 {
		t.Fatalf("a deleted VM's history came back: %v, %v", got, err)
	}
}

// TestMeterBaselines drives one worker's metering through readings of three machines in turn: samples close
// once an interval is long; a machine whose counters went backwards (a reading of a new machine raced with the
// old one's release) starts a new baseline instead of a sample; releasing a machine records its last partial
// interval and forgets the baseline, so the next machine (here with higher counters: found after a computed
// restart) is not metered against the old one.
func TestMeterBaselines(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := meteringStore(t, ctx)
	h := &Host{cfg: Config{NodeID: "h1", Store: s, MeteringInterval: time.Minute, MeteringSamples: 10}}
	w := &worker{h: h, name: "vm1", log: slog.Default(), applied: 64 * mib}
	t0 := time.Now().Add(-time.Hour)
	read := func(at, cpu time.Duration, writes uint64) {
		w.mu.Lock()
		w.samples[1] = statSample{at: t0.Add(at), st: hypervisor.Stats{CPUTime: cpu, BalloonActual: 64 * mib,
			Disks: map[string]hypervisor.DiskStats{"d": {WriteOps: writes, WriteBytes: 4096 * writes}}}}
		w.mu.Unlock()
		w.meterTick(ctx)
	}
	read(0, time.Second, 10)
	read(30*time.Second, 20*time.Second, 40)
	read(61*time.Second, 31*time.Second, 70) // sample 1: 30 s of CPU, 60 writes
	read(70*time.Second, 500*time.Millisecond, 2)
	read(125*time.Second, 600*time.Millisecond, 3)    // backwards: a new baseline
	read(190*time.Second, 10600*time.Millisecond, 23) // sample 2: 10 s, 20 writes
	read(200*time.Second, 11600*time.Millisecond, 25)
	w.meterEnd()                                 // sample 3, partial: 1 s, 2 writes
	read(300*time.Second, 100*time.Second, 1000) // a found machine: a baseline only
	read(361*time.Second, 130*time.Second, 1100) // sample 4: 30 s, 100 writes
	want := []struct {
		from, to time.Duration
		cpu      time.Duration
		writes   uint64
	}{{0, 61 * time.Second, 30 * time.Second, 60}, {125 * time.Second, 190 * time.Second, 10 * time.Second, 20},
		{190 * time.Second, 200 * time.Second, time.Second, 2}, {300 * time.Second, 361 * time.Second, 30 * time.Second, 100}}
	got := storedHistory(t, ctx, s, "vm1")
	if len(got) != len(want) {
		t.Fatalf("%d samples stored, want %d: %v", len(got), len(want), got)
	}
	for i, smp := range got {
		wt := want[i]
		if !smp.GetStart().AsTime().Equal(t0.Add(wt.from)) || !smp.GetEnd().AsTime().Equal(t0.Add(wt.to)) ||
			smp.GetCpuTimeNs() != uint64(wt.cpu) || smp.GetWriteOps() != wt.writes || smp.GetWriteBytes() != 4096*wt.writes ||
			smp.GetMemoryTargetBytes() != 64*mib || smp.GetHost() != "h1" {
			t.Errorf("sample %d: %v; want %s..%s, cpu %s, %d writes", i, smp, wt.from, wt.to, wt.cpu, wt.writes)
		}
	}
}

// TestVMMeteringHistory runs the counter-writing test guest with a metering interval of 1 s and a history of at
// most 6 samples: samples reach etcd with the CPU time and disk writes of their interval; the history stays at
// its bound while its newest sample moves on; a restart of computed and a restart of the machine (kill, start)
// each start a new baseline, so that no sample spans the gap or carries the new machine's counters as a
// delta; and the history is read through metad for the stopped VM, and deleted with it.
func TestVMMeteringHistory(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	const bound = 6
	e.configure = func(_ string, c *Config) { c.MeteringInterval, c.MeteringSamples = time.Second, bound }
	e.volume("meterdisk", 64*mib)
	a := e.addHost("computed-a", 1024*mib)
	if _, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "meter", Spec: e.agentSpec("meterdisk", a.id), Start: true}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("meter", "running", time.Minute, running)

	// history polls the stored history until cond holds.
	history := func(what string, cond func([]*basaltv1.VMMeteringSample) bool) []*basaltv1.VMMeteringSample {
		t.Helper()
		var got []*basaltv1.VMMeteringSample
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			var err error
			if got, err = metering.History(ctx, e.store, "meter"); err != nil {
				t.Fatal(err)
			}
			if cond(got) {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("metering history: %s: not within 30 s; last: %v", what, got)
			}
		}
	}
	// sane checks what every sample must hold: its own host, a span of at most a few intervals (the last one of
	// a machine is shorter), and no more CPU time than the host's two CPUs can give in it (and the 10 ms
	// granularity of /proc/<pid>/stat).
	sane := func(samples []*basaltv1.VMMeteringSample) {
		t.Helper()
		for i, s := range samples {
			span := s.GetEnd().AsTime().Sub(s.GetStart().AsTime())
			if s.GetHost() != a.id || span <= 0 || span > 5*time.Second || s.GetCpuTimeNs() > uint64(2*span+20*time.Millisecond) ||
				s.GetMemoryActualBytes() == 0 {
				t.Fatalf("sample %d is not sane: %v (span %s)", i, s, span)
			}
			if i > 0 && s.GetEnd().AsTime().Before(samples[i-1].GetEnd().AsTime()) {
				t.Fatalf("sample %d ends before sample %d: %v", i, i-1, samples)
			}
		}
	}

	// Samples with the guest's work in them: it runs, and once booted writes its counter to the disk every 50 ms.
	var work *basaltv1.VMMeteringSample
	got := history("a sample with the guest's disk writes", func(samples []*basaltv1.VMMeteringSample) bool {
		for _, s := range samples {
			if s.GetWriteOps() > 0 {
				work = s
				return true
			}
		}
		return false
	})
	sane(got)
	for i, s := range got {
		if s.GetCpuTimeNs() == 0 {
			t.Fatalf("sample %d has no CPU time: %v", i, s)
		}
	}
	span := work.GetEnd().AsTime().Sub(work.GetStart().AsTime())
	if work.GetWriteBytes() < work.GetWriteOps()*512 || span < time.Second {
		t.Fatalf("sample with writes: %v (span %s)", work, span)
	}
	t.Logf("a sample with writes: %s, cpu %s (%.2f CPUs), %d writes, %d bytes written, memory %d MiB",
		span.Round(time.Millisecond), time.Duration(work.GetCpuTimeNs()).Round(time.Millisecond),
		work.GetCpuUsage(), work.GetWriteOps(), work.GetWriteBytes(), work.GetMemoryActualBytes()/mib)

	// Bounded: at the bound, the newest sample moves on and the oldest goes.
	full := history("full", func(s []*basaltv1.VMMeteringSample) bool { return len(s) == bound })
	later := history("moved on", func(s []*basaltv1.VMMeteringSample) bool {
		return len(s) > 0 && s[len(s)-1].GetEnd().AsTime().After(full[len(full)-1].GetEnd().AsTime().Add(2*time.Second))
	})
	sane(later)
	if len(later) != bound || !later[0].GetStart().AsTime().After(full[0].GetStart().AsTime()) {
		t.Fatalf("history past its bound of %d: %d samples, oldest from %s (was %s)", bound, len(later),
			later[0].GetStart().AsTime(), full[0].GetStart().AsTime())
	}

	// noSpan checks that no sample spans from before `from` to after `to` (a gap when nothing metered it).
	noSpan := func(samples []*basaltv1.VMMeteringSample, from, to time.Time, what string) {
		t.Helper()
		for _, s := range samples {
			if s.GetStart().AsTime().Before(from) && s.GetEnd().AsTime().After(to) {
				t.Fatalf("sample %v spans the %s (%s to %s)", s, what, from.Format(time.StampMilli), to.Format(time.StampMilli))
			}
		}
	}

	// A restart of computed: the machine runs on, the new computed's worker meters it from a new baseline into
	// the same history.
	stopAt := time.Now()
	e.stopHost(a)
	time.Sleep(1500 * time.Millisecond) // longer than the interval: a sample across it would show
	e.startHost(a, 1024*mib)
	backAt := time.Now()
	got = history("a sample after the computed restart", func(s []*basaltv1.VMMeteringSample) bool {
		return len(s) > 0 && s[len(s)-1].GetStart().AsTime().After(backAt)
	})
	sane(got)
	noSpan(got, stopAt, backAt, "computed restart")

	// A restart of the machine: its counters start again from zero, and a new baseline with them.
	if _, err := e.api.KillVM(ctx, &basaltv1.KillVMRequest{Name: "meter"}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("meter", "stopped", time.Minute, func(vm *basaltv1.VM) bool { return vm.GetState() == basaltv1.VMState_VM_STATE_STOPPED })
	killedAt := time.Now()
	if _, err := e.api.StartVM(ctx, &basaltv1.StartVMRequest{Name: "meter"}); err != nil {
		t.Fatal(err)
	}
	vm := e.waitVM("meter", "running again", time.Minute, running)
	restartedAt := vm.GetStatus().GetStartedAt().AsTime()
	got = history("two samples of the new machine", func(s []*basaltv1.VMMeteringSample) bool {
		return len(s) >= 2 && s[len(s)-2].GetStart().AsTime().After(restartedAt)
	})
	sane(got)
	noSpan(got, killedAt, restartedAt, "machine restart")

	// Stopped: metad returns the history without current meters, and only when asked for it.
	if _, err := e.api.KillVM(ctx, &basaltv1.KillVMRequest{Name: "meter"}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("meter", "stopped", time.Minute, func(vm *basaltv1.VM) bool { return vm.GetState() == basaltv1.VMState_VM_STATE_STOPPED })
	stored := history("kept", func(s []*basaltv1.VMMeteringSample) bool { return len(s) > 0 })
	st, err := e.api.GetVMStats(ctx, &basaltv1.GetVMStatsRequest{Name: "meter", History: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetHost() != "" || st.GetSampledAt() != nil || len(st.GetHistory()) != len(stored) || !proto.Equal(st.GetHistory()[0], stored[0]) {
		t.Fatalf("GetVMStats(history) of the stopped VM: %v; stored: %v", st, stored)
	}
	if _, err := e.api.GetVMStats(ctx, &basaltv1.GetVMStatsRequest{Name: "meter"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("GetVMStats of the stopped VM without history: %v, want FailedPrecondition", err)
	}
	if _, err := e.api.DeleteVM(ctx, &basaltv1.DeleteVMRequest{Name: "meter"}); err != nil {
		t.Fatal(err)
	}
	if got, err := metering.History(ctx, e.store, "meter"); err != nil || len(got) != 0 {
		t.Fatalf("the deleted VM's history: %v, %v, want it gone", got, err)
	}
}
