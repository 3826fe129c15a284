package qemu

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
)

func startIncoming(t *testing.T, ctx context.Context, d *Driver, spec hypervisor.Spec, opts hypervisor.MigrateOptions) (hypervisor.Machine, string) {
	t.Helper()
	cleanupMachine(t, nil, spec)
	m, uri, err := d.StartIncomingWith(ctx, spec, "127.0.0.1", opts)
	if err != nil {
		t.Fatal(err)
	}
	cleanupMachine(t, m, spec)
	info, err := m.Info(ctx)
	if err != nil || info.State != hypervisor.StateIncoming {
		t.Fatalf("destination info = %+v, %v", info, err)
	}
	return m, uri
}

// TestLiveMigration moves one running guest A -> B (plain), B -> C (compressed), then cancels C -> D, all on
// loopback with the disk on one qemu-nbd that every QEMU connects to. The guest's counter must go on with no
// gap and no repeat on the console (read across the consoles of A, B and C as one stream) and on the disk.
func TestLiveMigration(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := newDriver(t)
	disk, img := nbdDisk(t, "root", 64<<20)
	specA := guestSpec(t, "mig", 128, disk)
	a := start(t, ctx, d, specA)
	conA, _ := watch(t, ctx, a)
	if _, err := conA.WaitRecord(ctx, 25); err != nil {
		t.Fatalf("%v\n%s", err, conA.Tail(20))
	}
	respec := func() hypervisor.Spec { s := specA; s.RunDir = shortDir(t, "vm"); return s }

	// A -> B, uncompressed.
	b, uriB := startIncoming(t, ctx, d, respec(), hypervisor.MigrateOptions{})
	conB, _ := watch(t, ctx, b)
	var reports int
	st, err := a.Migrate(ctx, uriB, hypervisor.MigrateOptions{MaxDowntime: 200 * time.Millisecond}, func(hypervisor.MigrationStatus) { reports++ })
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("A -> B: %+v, %d progress reports", st, reports)
	if st.Status != "completed" || st.TotalBytes < 128*mib || st.TransferredBytes == 0 || reports == 0 {
		t.Fatalf("A -> B status %+v", st)
	}
	if info, err := a.Info(ctx); err != nil || info.State != hypervisor.StatePaused {
		t.Fatalf("source after migration: %+v, %v", info, err)
	}
	if err := a.Resume(ctx); err == nil {
		t.Fatal("the migrated-away source resumed")
	}
	lastA, _ := conA.LastRecord()
	if _, err := conB.WaitRecord(ctx, lastA.Seq+10); err != nil {
		t.Fatalf("counter did not go on at B: %v\n%s", err, conB.Tail(10))
	}
	if info, err := b.Info(ctx); err != nil || info.State != hypervisor.StateRunning {
		t.Fatalf("destination after migration: %+v, %v", info, err)
	}
	if err := a.Kill(ctx); err != nil {
		t.Fatal(err)
	}

	// B -> C, compressed.
	c, uriC := startIncoming(t, ctx, d, respec(), hypervisor.MigrateOptions{Compress: true})
	if u, _ := url.ParseQuery(uriC[strings.Index(uriC, "#")+1:]); u.Get("compress") == "none" || u.Get("compress") == "" {
		t.Fatalf("compressed destination's URI %s", uriC)
	}
	conC, _ := watch(t, ctx, c)
	if _, err := b.Migrate(ctx, uriC, hypervisor.MigrateOptions{}, nil); err == nil || !strings.Contains(err.Error(), "compression") {
		t.Fatalf("uncompressed migration to a compressing destination: %v", err)
	}
	st, err = b.Migrate(ctx, uriC, hypervisor.MigrateOptions{Compress: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("B -> C compressed (%s): %+v", uriC, st)
	lastB, _ := conB.LastRecord()
	if _, err := conC.WaitRecord(ctx, lastB.Seq+10); err != nil {
		t.Fatalf("counter did not go on at C: %v", err)
	}
	if err := b.Kill(ctx); err != nil {
		t.Fatal(err)
	}

	// C -> D, slowed to 2 MiB/s and cancelled: the guest stays at C and keeps counting.
	dm, uriD := startIncoming(t, ctx, d, respec(), hypervisor.MigrateOptions{})
	started := make(chan struct{}, 1)
	type result struct {
		st  hypervisor.MigrationStatus
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := c.Migrate(ctx, uriD, hypervisor.MigrateOptions{BandwidthBytes: 2 << 20}, func(s hypervisor.MigrationStatus) {
			if s.TransferredBytes > 0 {
				select {
				case started <- struct{}{}:
				default:
				}
			}
		})
		done <- result{st, err}
	}()
	select {
	case <-started:
	case r := <-done:
		t.Fatalf("throttled migration ended before it could be cancelled: %+v, %v", r.st, r.err)
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	if info, err := c.Info(ctx); err != nil || info.State != hypervisor.StateMigrating {
		t.Fatalf("source during migration: %+v, %v", info, err)
	}
	if err := c.CancelMigration(ctx); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err == nil || r.st.Status != "cancelled" {
		t.Fatalf("cancelled migration returned %+v, %v", r.st, r.err)
	}
	if info, err := c.Info(ctx); err != nil || info.State != hypervisor.StateRunning {
		t.Fatalf("source after cancel: %+v, %v", info, err)
	}
	lastC, _ := conC.LastRecord()
	if _, err := conC.WaitRecord(ctx, lastC.Seq+10); err != nil {
		t.Fatalf("counter stopped at C after the cancel: %v", err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	if err := dm.Wait(wctx); err != nil {
		t.Logf("destination still up after the cancel (%v); killing it", err)
		dm.Kill(ctx)
	}
	wcancel()

	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	<-conC.Done()
	recs, err := testguest.Records(testguest.Join(conA, conB, conC))
	if err != nil {
		t.Fatal(err)
	}
	cont, err := testguest.CheckContinuity(recs)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("console: records %d..%d, longest gap %s after record %d (guest clock: %s)", cont.First, cont.Last,
		cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter, cont.MaxGuestGap.Round(time.Millisecond))
	verifyDisk(t, img, recs)
}

// TestMigrationSwitchoverHook checks MigrateOptions.BeforeSwitchover: it runs once, while the guest is stopped
// on the source (no counter record appears there while it runs) and before the destination runs it; a hook
// that fails cancels the migration and the guest goes on at the source.
func TestMigrationSwitchoverHook(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := newDriver(t)
	disk, _ := nbdDisk(t, "root", 64<<20)
	specA := guestSpec(t, "sw", 128, disk)
	a := start(t, ctx, d, specA)
	conA, _ := watch(t, ctx, a)
	if _, err := conA.WaitRecord(ctx, 10); err != nil {
		t.Fatalf("%v\n%s", err, conA.Tail(20))
	}
	respec := func() hypervisor.Spec { s := specA; s.RunDir = shortDir(t, "vm"); return s }

	b, uriB := startIncoming(t, ctx, d, respec(), hypervisor.MigrateOptions{})
	conB, _ := watch(t, ctx, b)
	calls := 0
	hook := func(ctx context.Context) error {
		calls++
		before, _ := conA.LastRecord()
		time.Sleep(300 * time.Millisecond) // the agent writes a record every 20 ms while it runs
		after, _ := conA.LastRecord()
		if after.Seq != before.Seq {
			t.Errorf("the guest ran on the source during the hook: record %d, then %d", before.Seq, after.Seq)
		}
		if info, err := b.Info(ctx); err != nil || info.State != hypervisor.StateIncoming {
			t.Errorf("destination during the hook: %+v, %v", info, err)
		}
		return nil
	}
	st, err := a.Migrate(ctx, uriB, hypervisor.MigrateOptions{BeforeSwitchover: hook}, nil)
	if err != nil || st.Status != "completed" {
		t.Fatalf("migrate with a hook: %+v, %v", st, err)
	}
	if calls != 1 {
		t.Fatalf("hook called %d times", calls)
	}
	lastA, _ := conA.LastRecord()
	if _, err := conB.WaitRecord(ctx, lastA.Seq+10); err != nil {
		t.Fatalf("counter did not go on at B: %v\n%s", err, conB.Tail(10))
	}
	a.Kill(ctx)

	// A failing hook: the migration is cancelled, the guest runs on at B, C never runs it.
	c, uriC := startIncoming(t, ctx, d, respec(), hypervisor.MigrateOptions{})
	_, err = b.Migrate(ctx, uriC, hypervisor.MigrateOptions{BeforeSwitchover: func(context.Context) error {
		return errors.New("attachment refused")
	}}, nil)
	if err == nil || !strings.Contains(err.Error(), "before the switchover: attachment refused") {
		t.Fatalf("migrate with a failing hook: %v", err)
	}
	lastB, _ := conB.LastRecord()
	if _, err := conB.WaitRecord(ctx, lastB.Seq+10); err != nil {
		t.Fatalf("guest did not go on at B after the cancelled switchover: %v\n%s", err, conB.Tail(10))
	}
	if info, err := c.Info(ctx); err == nil && info.State == hypervisor.StateRunning {
		t.Fatalf("destination runs the guest after a cancelled switchover: %+v", info)
	}
}
