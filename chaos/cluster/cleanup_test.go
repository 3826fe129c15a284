package cluster

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCleanupAfterACrashedRun leaves what a crashed run would (a bch- namespace with a process in it that
// escaped the parent-death signal, a bch- interface in the root namespace, a bch- tmpfs) and checks that the
// cleanup Start runs removes all of it. The leftovers are made under the harness lock, so that another
// harness running meanwhile (another test package) neither cleans them up half-made nor is disturbed.
func TestCleanupAfterACrashedRun(t *testing.T) {
	if err := Check(); err != nil {
		t.Skipf("chaos harness unavailable: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lock, err := acquireLock(ctx, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	ns, link := Prefix+"stale", Prefix+"stale0"
	mnt := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", ns).Run()
		exec.Command("ip", "link", "del", link).Run()
		unix.Unmount(mnt, unix.MNT_DETACH)
	})
	run("ip", "netns", "add", ns)
	run("ip", "link", "add", link, "type", "veth", "peer", "name", Prefix+"stale1")
	if err := unix.Mount(Prefix+"stale", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	// Its own session and no parent-death signal, like a QEMU whose computed was killed.
	stray := exec.Command("ip", "netns", "exec", ns, "sleep", "600")
	stray.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { stray.Wait(); close(exited) }()
	defer stray.Process.Kill()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ps, err := procsIn(ns)
		if err == nil && len(ps) == 1 && ps[0].Exe() == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stray process did not enter %s: %v %v", ns, ps, err)
		}
	}

	if err := cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the process left in a stale namespace still runs")
	}
	if _, err := os.Stat(nsPath(ns)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale namespace %s still exists (%v)", ns, err)
	}
	if err := exec.Command("ip", "link", "show", link).Run(); err == nil {
		t.Fatalf("stale interface %s still exists", link)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Fatalf("stale tmpfs still mounted at %s (%v)", mnt, err)
	}
}
