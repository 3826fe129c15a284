package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// TestDiskErrorPausesTheGuest: a disk whose writes fail with ENOSPC (its image on a full tmpfs, served by
// qemu-nbd) pauses the guest (werror=stop) instead of handing it the error; Info says paused and names the disk
// and the error; once space is freed, Resume retries the write and the guest's counter goes on.
func TestDiskErrorPausesTheGuest(t *testing.T) {
	needQEMU(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := shortDir(t, "full")
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	disk, _ := nbdDiskIn(t, dir, "root", 64<<20)
	d := newDriver(t)
	m := start(t, ctx, d, guestSpec(t, "full", 128, disk))
	con, _ := watch(t, ctx, m)
	if _, err := con.WaitRecord(ctx, 5); err != nil {
		t.Fatalf("%v\n%s", err, con.Tail(20))
	}

	// Fill what is left of the tmpfs: the guest's next write to a block it has not written yet fails.
	filler := filepath.Join(dir, "filler")
	exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=64k").Run() // ends with ENOSPC
	var info hypervisor.Info
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var err error
		if info, err = m.Info(ctx); err != nil {
			t.Fatal(err)
		}
		if info.State == hypervisor.StatePaused {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest still %s with its disk full\n%s", info.State, con.Tail(5))
		}
	}
	if !strings.Contains(info.DiskError, "disk-root") || !strings.Contains(info.DiskError, "nospace") {
		t.Fatalf("paused guest's disk error %q; want disk-root and nospace", info.DiskError)
	}
	last, _ := con.LastRecord()
	t.Logf("paused on a full disk after record %d: %s", last.Seq, info.DiskError)

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := con.WaitRecord(ctx, last.Seq+10); err != nil {
		t.Fatalf("counter did not go on after space was freed: %v\n%s", err, con.Tail(10))
	}
	if info, err := m.Info(ctx); err != nil || info.State != hypervisor.StateRunning || info.DiskError != "" {
		t.Fatalf("after the resume: %+v, %v", info, err)
	}
}
