package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// TestLifecycle boots the test guest by direct kernel boot with its disk on NBD, and runs it through the
// machine's life: the counter on console and disk, Info and Stats, pause and resume, the balloon, a computed
// restart (Find through a fresh driver), an ACPI shutdown, and a second boot that resumes the counter.
func TestLifecycle(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := newDriver(t)
	disk, img := nbdDisk(t, "root", 64<<20)
	// 256 MiB of RAM, 192 MiB of it given to the guest at boot: the balloon holds the rest from the start.
	spec := guestSpec(t, "life", 192, disk)
	spec.MaxMemory = 256 * mib
	m := start(t, ctx, d, spec)
	con, closeCon := watch(t, ctx, m)

	first, err := con.WaitRecord(ctx, 10)
	if err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, con.Tail(20))
	}
	t.Logf("counter at %d", first.Seq)

	t.Run("info", func(t *testing.T) {
		info, err := m.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		probe, _ := d.Accel(ctx)
		pid, _ := readPidFile(runPaths(spec.RunDir).pid)
		if info.State != hypervisor.StateRunning || info.VCPUs != 1 || info.Memory != 256*mib || info.PID != pid ||
			info.Accel != probe.Accel || info.BalloonActual == 0 || info.BalloonActual > 256*mib {
			t.Fatalf("info = %+v (pid file %d, probe %s)", info, pid, probe.Accel)
		}
		st, err := m.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ds, ok := st.Disks["root"]
		if st.CPUTime <= 0 || !ok || ds.WriteOps < 10 || ds.WriteBytes < 10*4096 || ds.ReadBytes < 64<<20 {
			// The agent read the whole 64 MiB ring at boot and has written at least 10 records since.
			t.Fatalf("stats = %+v", st)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		if err := m.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if info, err := m.Info(ctx); err != nil || info.State != hypervisor.StatePaused {
			t.Fatalf("info after Pause = %+v, %v", info, err)
		}
		time.Sleep(300 * time.Millisecond) // a line in flight at the pause may still arrive
		before, _ := con.LastRecord()
		time.Sleep(time.Second)
		if after, _ := con.LastRecord(); after.Seq != before.Seq {
			t.Fatalf("counter went on from %d to %d while paused", before.Seq, after.Seq)
		}
		if err := m.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := con.WaitRecord(ctx, before.Seq+5); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("balloon", func(t *testing.T) {
		if err := m.SetBalloon(ctx, 0); err == nil {
			t.Fatal("balloon of 0 bytes accepted")
		}
		if err := m.SetBalloon(ctx, 257*mib); err == nil {
			t.Fatal("balloon above MaxMemory accepted")
		}
		balloon := func(want uint64) error {
			return waitFor(ctx, fmt.Sprintf("balloon at %d MiB", want/mib), func() (bool, error) {
				info, err := m.Info(ctx)
				return info.BalloonActual == want, err
			})
		}
		if err := balloon(192 * mib); err != nil {
			t.Fatalf("boot-time target: %v", err)
		}
		memLine := func(from int, ok func(testguest.Mem) bool) (testguest.Mem, error) {
			_, l, err := con.Wait(ctx, from, func(l testguest.Line) bool { mem, isMem := testguest.ParseMem(l); return isMem && ok(mem) })
			mem, _ := testguest.ParseMem(l)
			return mem, err
		}
		// Deflate fully: the guest gets its whole 256 MiB back (less what the kernel keeps for itself).
		from := len(con.Lines())
		if err := m.SetBalloon(ctx, 256*mib); err != nil {
			t.Fatal(err)
		}
		full, err := memLine(from, func(m testguest.Mem) bool { return m.Total >= 200*mib })
		if err != nil {
			t.Fatalf("guest never got its memory back: %v\n%s", err, con.Tail(5))
		}
		// Inflate to 128 MiB: MemTotal drops by what the balloon took.
		from = len(con.Lines())
		if err := m.SetBalloon(ctx, 128*mib); err != nil {
			t.Fatal(err)
		}
		now, err := memLine(from, func(m testguest.Mem) bool { return m.Total <= full.Total-120*mib })
		if err != nil {
			t.Fatalf("guest memory stayed near %d MiB: %v", full.Total/mib, err)
		}
		t.Logf("guest MemTotal %d MiB -> %d MiB", full.Total/mib, now.Total/mib)
		if err := balloon(128 * mib); err != nil {
			t.Fatal(err)
		}
	})

	// computed restarts: every handle is dropped, a new driver finds the machine through its run directory.
	closeCon()
	last, _ := con.LastRecord()
	recs1, err := testguest.Records(con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Info(ctx); err == nil {
		t.Fatal("Info works on a closed handle")
	}
	d2 := newDriver(t)
	if _, err := d2.Find(ctx, guestSpec(t, "nobody", 64)); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find of a machine never started = %v", err)
	}
	m2, err := d2.Find(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupMachine(t, m2, spec)
	info, err := m2.Info(ctx)
	if err != nil || info.State != hypervisor.StateRunning {
		t.Fatalf("found machine: %+v, %v", info, err)
	}
	con2, _ := watch(t, ctx, m2)
	if _, err := con2.WaitRecord(ctx, last.Seq+10); err != nil {
		t.Fatalf("counter did not go on after Find: %v", err)
	}
	if _, err := m2.Console(ctx); err == nil {
		t.Fatal("a second console stream was opened")
	}

	// ACPI power button: the agent powers off, QEMU exits, Wait (on a process that is not a child of this
	// driver's handle) returns.
	if err := m2.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if err := m2.Wait(wctx); err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, con2.Tail(10))
	}
	<-con2.Done()
	if _, _, err := con2.Wait(ctx, 0, func(l testguest.Line) bool { return strings.HasSuffix(l.Text, "BASALT poweroff") }); err != nil {
		t.Fatalf("no poweroff line: %v", err)
	}
	m2.Close()
	if _, err := d2.Find(ctx, spec); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find after shutdown = %v", err)
	}

	recs2, err := testguest.Records(con2.Lines())
	if err != nil {
		t.Fatal(err)
	}
	all := append(recs1, recs2...)
	s := verifyDisk(t, img, all)
	// The agent prints a record once it is on the disk, so the power-off may fall between the two: the disk
	// may hold one record the console never showed, never fewer.
	if last2 := recs2[len(recs2)-1]; s.Last != last2.Seq && s.Last != last2.Seq+1 {
		t.Fatalf("disk ends at %d, console at %d", s.Last, last2.Seq)
	}

	// A second boot resumes the counter after the last record on the disk, as the same disk's next writer.
	m3 := start(t, ctx, d2, spec)
	con3, _ := watch(t, ctx, m3)
	_, l, err := con3.Wait(ctx, 0, func(l testguest.Line) bool { return strings.Contains(l.Text, "BASALT resume ") })
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(l.Text, "seq="+strconv.FormatUint(s.Last, 10)+" ") {
		t.Fatalf("second boot: %q, disk ended at %d", l.Text, s.Last)
	}
	r, err := con3.WaitRecord(ctx, s.Last+1)
	if err != nil || r.Seq != s.Last+1 {
		t.Fatalf("second boot's first record %d, %v; want %d", r.Seq, err, s.Last+1)
	}
	if r.Boot == recs2[0].Boot {
		t.Fatal("second boot reused the boot id")
	}
	if err := m3.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(runPaths(spec.RunDir).log); err != nil {
		t.Fatalf("no QEMU log: %v", err)
	}
}
