package vmhost

import (
	"context"
	"io"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/testguest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func running(vm *basaltv1.VM) bool { return vm.GetState() == basaltv1.VMState_VM_STATE_RUNNING }

// agentSpec is the test guest booted directly from its kernel, its counter on the volume.
func (e *env) agentSpec(volume string, preferred ...string) *basaltv1.VMSpec {
	return &basaltv1.VMSpec{
		Vcpus:    1,
		Memory:   &basaltv1.VMMemory{StartupBytes: 160 * mib, MinimumBytes: 64 * mib, MaximumBytes: 192 * mib},
		Disks:    []*basaltv1.VMDisk{{Volume: volume, BootOrder: 1}},
		Firmware: basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL,
		Kernel:   e.guest.Kernel, Initrd: e.guest.Initrd, Cmdline: e.guest.Cmdline("basalt.interval=50ms"),
		Placement: &basaltv1.VMPlacement{PreferredHosts: preferred},
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code, text string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), text) {
		t.Fatalf("%s: got %v; want %s mentioning %q", what, err, code, text)
	}
	t.Logf("%s: %s", what, status.Convert(err).Message())
}

// TestVMLifecycleAcrossTwoHosts runs the agent guest through the API on two computed hosts: start, console
// through metad, balloon, live migration while the counter runs (and a second one refused meanwhile), a
// cancelled migration, a restart of computed that leaves the guest running, a drain, ACPI stop; and checks
// that the counter on the console never skipped or repeated and that the disk holds every record announced.
func TestVMLifecycleAcrossTwoHosts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	img := e.volume("disk0", 64*mib)
	a := e.addHost("computed-a", 1024*mib)
	b := e.addHost("computed-b", 1024*mib)

	start := time.Now()
	vm, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "agent", Spec: e.agentSpec("disk0", a.id), Start: true})
	if err != nil {
		t.Fatal(err)
	}
	if vm.GetHost() != a.id || vm.GetDesiredState() != basaltv1.VMState_VM_STATE_RUNNING {
		t.Fatalf("created VM: host %q desired %v", vm.GetHost(), vm.GetDesiredState())
	}
	vm = e.waitVM("agent", "running on a", time.Minute, running)
	t.Logf("running on %s after %s: accel %s, pid %d, console log %s", vm.GetStatus().GetHost(), time.Since(start).Round(time.Millisecond),
		vm.GetStatus().GetAccel(), vm.GetStatus().GetPid(), vm.GetStatus().GetConsoleLog())

	v := e.attach("agent", nil)
	var restart struct{ from, to time.Time }
	if _, err := v.con.WaitRecord(ctx, 10); err != nil {
		t.Fatalf("no counter on the console: %v\n%s", err, v.con.Tail(20))
	}
	t.Logf("counter on the console through metad %s after the start", time.Since(start).Round(time.Millisecond))

	t.Run("bad input changes nothing", func(t *testing.T) {
		_, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "other", Spec: e.agentSpec("disk0")})
		wantCode(t, "a volume another VM uses", err, codes.FailedPrecondition, `disk of VM "agent"`)
		_, err = e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "other", Spec: e.agentSpec("nope")})
		wantCode(t, "a missing volume", err, codes.NotFound, `volume "nope" does not exist`)
		big := e.agentSpec("disk0")
		big.Disks = nil
		big.Memory = &basaltv1.VMMemory{StartupBytes: 4096 * mib}
		_, err = e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "other", Spec: big})
		wantCode(t, "more memory than any host", err, codes.FailedPrecondition, "more than any host")
		_, err = e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: a.id})
		wantCode(t, "a migration to its own host", err, codes.FailedPrecondition, "the VM's own host")
		_, err = e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: "computed-x"})
		wantCode(t, "a migration to an unknown host", err, codes.NotFound, "not a computed host")
		_, err = e.api.SetVMMemory(ctx, &basaltv1.SetVMMemoryRequest{Name: "agent", TargetBytes: 32 * mib})
		wantCode(t, "a balloon below the minimum", err, codes.InvalidArgument, "between the VM's minimum")
		l, err := e.api.ListVMs(ctx, &basaltv1.ListVMsRequest{})
		if err != nil || len(l.GetVms()) != 1 {
			t.Fatalf("VMs after refused calls: %v, %v", l, err)
		}
	})

	t.Run("balloon", func(t *testing.T) {
		memLine := func(from int, ok func(testguest.Mem) bool) testguest.Mem {
			_, l, err := v.con.Wait(ctx, from, func(l testguest.Line) bool { m, isMem := testguest.ParseMem(l); return isMem && ok(m) })
			if err != nil {
				t.Fatalf("%v\n%s", err, v.con.Tail(5))
			}
			m, _ := testguest.ParseMem(l)
			return m
		}
		before := memLine(0, func(testguest.Mem) bool { return true })
		from := len(v.con.Lines())
		if _, err := e.api.SetVMMemory(ctx, &basaltv1.SetVMMemoryRequest{Name: "agent", TargetBytes: 96 * mib}); err != nil {
			t.Fatal(err)
		}
		after := memLine(from, func(m testguest.Mem) bool { return m.Total <= before.Total-48*mib })
		t.Logf("guest MemTotal %d MiB -> %d MiB after a balloon target of 96 MiB", before.Total/mib, after.Total/mib)
		e.waitVM("agent", "balloon reported", 30*time.Second, func(vm *basaltv1.VM) bool {
			return vm.GetStatus().GetMemoryActualBytes() == 96*mib && vm.GetStatus().GetMemoryTargetBytes() == 96*mib
		})
	})

	t.Run("pause and resume", func(t *testing.T) {
		if _, err := e.api.PauseVM(ctx, &basaltv1.PauseVMRequest{Name: "agent"}); err != nil {
			t.Fatal(err)
		}
		e.waitVM("agent", "paused", 30*time.Second, func(vm *basaltv1.VM) bool {
			return vm.GetState() == basaltv1.VMState_VM_STATE_PAUSED && vm.GetStatus().GetObservedGeneration() == vm.GetGeneration()
		})
		time.Sleep(300 * time.Millisecond) // output already on its way
		paused, _ := v.con.LastRecord()
		time.Sleep(time.Second)
		if now, _ := v.con.LastRecord(); now.Seq != paused.Seq {
			t.Fatalf("the counter went on while paused: %d -> %d", paused.Seq, now.Seq)
		}
		if _, err := e.api.ResumeVM(ctx, &basaltv1.ResumeVMRequest{Name: "agent"}); err != nil {
			t.Fatal(err)
		}
		if _, err := v.con.WaitRecord(ctx, paused.Seq+5); err != nil {
			t.Fatalf("the counter did not resume: %v", err)
		}
	})

	t.Run("stats and metrics", func(t *testing.T) {
		st, err := e.api.GetVMStats(ctx, &basaltv1.GetVMStatsRequest{Name: "agent"})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetCpuTimeNs() == 0 || len(st.GetDisks()) != 1 || st.GetDisks()[0].GetWriteOps() == 0 || st.GetMemoryActualBytes() != 96*mib {
			t.Fatalf("stats: %v", st)
		}
		t.Logf("stats: cpu %.1fs (%.2f CPUs), disk %s: %d writes (%.1f/s), %d bytes", float64(st.GetCpuTimeNs())/1e9, st.GetCpuUsage(),
			st.GetDisks()[0].GetVolume(), st.GetDisks()[0].GetWriteOps(), st.GetDisks()[0].GetWriteIops(), st.GetDisks()[0].GetWriteBytes())
		rec := httptest.NewRecorder()
		a.h.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		body := rec.Body.String()
		for _, want := range []string{
			`basalt_vm_cpu_seconds_total{host="computed-a",vm="agent"} `,
			`basalt_vm_memory_actual_bytes{host="computed-a",vm="agent"} 1.00663296e+08`,
			`basalt_vm_disk_writes_total{host="computed-a",vm="agent",volume="disk0"} `,
			`basalt_vm_state{host="computed-a",vm="agent",state="running"} 1`,
			"# TYPE basalt_vm_disk_written_bytes_total counter",
		} {
			if !strings.Contains(body, want) {
				t.Fatalf("metrics lack %q:\n%s", want, body)
			}
		}
	})

	t.Run("live migration while the counter runs", func(t *testing.T) {
		beforeMig, _ := v.con.LastRecord()
		vm, err := e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: b.id, MaxDowntimeMs: 300})
		if err != nil {
			t.Fatal(err)
		}
		_, err = e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: b.id})
		wantCode(t, "a second migration at once", err, codes.FailedPrecondition, "already migrating")
		id := vm.GetMigration().GetId()
		done := e.waitVM("agent", "on b", 2*time.Minute, func(vm *basaltv1.VM) bool {
			return vm.GetHost() == b.id && vm.GetMigration() == nil && running(vm) && vm.GetStatus().GetHost() == b.id
		})
		p := done.GetStatus().GetMigration()
		if p.GetId() != id || p.GetStatus() != "completed" || p.GetTransferredBytes() == 0 {
			t.Fatalf("migration progress: %v", p)
		}
		t.Logf("migration %s: %d MiB in %s, downtime %d ms", p.GetId(), p.GetTransferredBytes()/mib,
			p.GetFinishedAt().AsTime().Sub(p.GetStartedAt().AsTime()).Round(time.Millisecond), p.GetDowntimeMs())
		if _, err := v.con.WaitRecord(ctx, beforeMig.Seq+40); err != nil {
			t.Fatalf("the counter did not go on through the console after the migration: %v\n%s", err, v.con.Tail(10))
		}
		if pids := qemuPIDs(a.runDir); len(pids) != 0 {
			t.Fatalf("QEMU still runs on the source: %v", pids)
		}
		if !slices.ContainsFunc(v.noticeList(), func(n string) bool { return strings.Contains(n, "moved from computed-a to computed-b") }) {
			t.Fatalf("no notice of the move: %v", v.noticeList())
		}
	})

	t.Run("cancelled migration keeps the VM at its source", func(t *testing.T) {
		// 1 MiB/s makes the copy of 192 MiB take minutes: there is time to cancel.
		if _, err := e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: a.id, BandwidthBytesPerSecond: mib}); err != nil {
			t.Fatal(err)
		}
		e.waitVM("agent", "migration active", time.Minute, func(vm *basaltv1.VM) bool {
			return vm.GetStatus().GetMigration().GetStatus() == "active" && vm.GetStatus().GetMigration().GetTransferredBytes() > 0
		})
		if _, err := e.api.CancelMigration(ctx, &basaltv1.CancelMigrationRequest{Name: "agent"}); err != nil {
			t.Fatal(err)
		}
		vm := e.waitVM("agent", "cancelled", time.Minute, func(vm *basaltv1.VM) bool {
			return vm.GetMigration() == nil && vm.GetStatus().GetMigration().GetStatus() == "cancelled" && running(vm)
		})
		if vm.GetHost() != b.id || vm.GetStatus().GetHost() != b.id {
			t.Fatalf("after the cancel the VM is on %s (status %s)", vm.GetHost(), vm.GetStatus().GetHost())
		}
		last, _ := v.con.LastRecord()
		if _, err := v.con.WaitRecord(ctx, last.Seq+20); err != nil {
			t.Fatalf("the counter stopped after the cancel: %v", err)
		}
		waitNoQEMU(t, ctx, a.runDir)
	})

	t.Run("computed restart leaves the guest running", func(t *testing.T) {
		pids := qemuPIDs(b.runDir)
		if len(pids) != 1 {
			t.Fatalf("QEMU processes on b: %v", pids)
		}
		restart.from = time.Now()
		e.stopHost(b)
		last, _ := v.con.LastRecord()
		time.Sleep(time.Second)
		e.startHost(b, 1024*mib)
		if got := qemuPIDs(b.runDir); !slices.Equal(got, pids) {
			t.Fatalf("QEMU processes after the restart: %v, before %v", got, pids)
		}
		vm := e.waitVM("agent", "running after the restart", time.Minute, running)
		if vm.GetStatus().GetPid() != int32(pids[0]) {
			t.Fatalf("status pid %d, QEMU pid %d", vm.GetStatus().GetPid(), pids[0])
		}
		if _, err := v.con.WaitRecord(ctx, last.Seq+40); err != nil {
			t.Fatalf("the console did not come back after the restart: %v\n%s", err, v.con.Tail(5))
		}
		restart.to = time.Now()
	})

	t.Run("drain empties the host", func(t *testing.T) {
		resp, err := e.api.DrainHost(ctx, &basaltv1.DrainHostRequest{Host: b.id, Parallel: 1})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetMoving()) != 1 || len(resp.GetProblems()) != 0 || resp.GetMoving()[0].GetMigration().GetTarget() != a.id {
			t.Fatalf("drain: %v", resp)
		}
		e.waitVM("agent", "drained to a", 2*time.Minute, func(vm *basaltv1.VM) bool {
			return vm.GetHost() == a.id && running(vm) && vm.GetStatus().GetHost() == a.id
		})
		hosts, err := e.api.ListHosts(ctx, &basaltv1.ListHostsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hosts.GetHosts() {
			if h.GetHost().GetNode() == b.id && (len(h.GetVms()) != 0 || !h.GetMaintenance().GetDraining() || h.GetMemoryCommittedBytes() != 0) {
				t.Fatalf("drained host: %v", h)
			}
		}
		waitNoQEMU(t, ctx, b.runDir)
		_, err = e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "agent", TargetHost: b.id})
		wantCode(t, "a migration to a draining host", err, codes.FailedPrecondition, "in maintenance")
		if _, err := e.api.UndrainHost(ctx, &basaltv1.UndrainHostRequest{Host: b.id}); err != nil {
			t.Fatal(err)
		}
	})

	// The console, read through metad as one stream across two migrations, a cancelled one and a restart of
	// computed, counts up by one from the first record to the last.
	last, _ := v.con.LastRecord()
	if _, err := v.con.WaitRecord(ctx, last.Seq+10); err != nil {
		t.Fatal(err)
	}
	recs, err := testguest.Records(v.con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	// While no computed holds the console (the restart), QEMU drops the guest's output: one jump of the
	// counter is allowed there, and only there; the disk check below shows the guest skipped nothing.
	split := 0
	for i := 1; i < len(recs); i++ {
		if recs[i].Seq != recs[i-1].Seq+1 && recs[i-1].At.Before(restart.to) && recs[i].At.After(restart.from) && split == 0 {
			t.Logf("console: records %d..%d printed while computed restarted were not read", recs[i-1].Seq+1, recs[i].Seq-1)
			split = i
		}
	}
	for _, part := range [][]testguest.Rec{recs[:max(split, 1)], recs[split:]} {
		cont, err := testguest.CheckContinuity(part)
		if err != nil {
			t.Fatalf("console: %v", err)
		}
		t.Logf("console through metad: records %d..%d (%d), longest gap between lines at the host %s (after %d)",
			cont.First, cont.Last, cont.Count, cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter)
	}

	t.Run("ACPI stop", func(t *testing.T) {
		if _, err := e.api.StopVM(ctx, &basaltv1.StopVMRequest{Name: "agent", TimeoutSeconds: 60}); err != nil {
			t.Fatal(err)
		}
		vm := e.waitVM("agent", "stopped", time.Minute, func(vm *basaltv1.VM) bool { return vm.GetState() == basaltv1.VMState_VM_STATE_STOPPED })
		if strings.Contains(vm.GetStatus().GetLastError(), "forced off") {
			t.Fatalf("the guest ignored the power button: %s", vm.GetStatus().GetLastError())
		}
		waitNoQEMU(t, ctx, a.runDir)
		// The stream ends with a notice once the VM stopped.
		if _, _, err := v.con.Wait(ctx, 0, func(testguest.Line) bool { return false }); err == nil || !strings.Contains(err.Error(), io.EOF.Error()) {
			t.Fatalf("console after the stop: %v", err)
		}
		if !slices.ContainsFunc(v.noticeList(), func(n string) bool { return strings.Contains(n, "stopped") }) {
			t.Fatalf("no notice of the stop: %v", v.noticeList())
		}
	})

	all, _ := testguest.Records(v.con.Lines())
	s := verifyDisk(t, img, all)
	t.Logf("disk: records %d..%d, all announced ones present", s.First, s.Last)

	t.Run("console log after the stop", func(t *testing.T) {
		lv := e.attach("agent", &basaltv1.ConsoleInput{TailBytes: 4096, NoFollow: true})
		<-lv.con.Done()
		if !strings.Contains(lv.con.Tail(50), "BASALT rec") {
			t.Fatalf("console log tail: %q", lv.con.Tail(50))
		}
	})

	t.Run("kill, and delete of a running VM", func(t *testing.T) {
		if _, err := e.api.StartVM(ctx, &basaltv1.StartVMRequest{Name: "agent"}); err != nil {
			t.Fatal(err)
		}
		vm := e.waitVM("agent", "running again", time.Minute, running)
		if vm.GetHost() != a.id {
			t.Fatalf("restarted on %s, not on the host it ran on last (%s)", vm.GetHost(), a.id)
		}
		if _, err := e.api.KillVM(ctx, &basaltv1.KillVMRequest{Name: "agent"}); err != nil {
			t.Fatal(err)
		}
		e.waitVM("agent", "killed", 30*time.Second, func(vm *basaltv1.VM) bool { return vm.GetState() == basaltv1.VMState_VM_STATE_STOPPED })
		waitNoQEMU(t, ctx, a.runDir)
		if _, err := e.api.StartVM(ctx, &basaltv1.StartVMRequest{Name: "agent", Host: b.id}); err != nil {
			t.Fatal(err)
		}
		e.waitVM("agent", "running on b", time.Minute, func(vm *basaltv1.VM) bool { return running(vm) && vm.GetHost() == b.id })
		_, err := e.api.DeleteVM(ctx, &basaltv1.DeleteVMRequest{Name: "agent"})
		wantCode(t, "deleting a running VM", err, codes.FailedPrecondition, "stop it first")
		if _, err := e.api.DeleteVM(ctx, &basaltv1.DeleteVMRequest{Name: "agent", Force: true}); err != nil {
			t.Fatal(err)
		}
		waitNoQEMU(t, ctx, b.runDir)
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if _, err := os.Stat(b.h.dir("agent")); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the run directory of the deleted VM is still there")
			}
		}
	})
}

func waitNoQEMU(t *testing.T, ctx context.Context, dir string) {
	t.Helper()
	for len(qemuPIDs(dir)) > 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("QEMU still runs in %s: %v", dir, qemuPIDs(dir))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
