package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/internal/nbdtest"
)

// needQEMU skips a test on a host without QEMU and its NBD server.
func needQEMU(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"qemu-system-x86_64", "qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian packages qemu-system-x86, qemu-utils; make deps installs them)", bin)
		}
	}
}

// guest builds the test guest once per test binary.
var guest = sync.OnceValues(func() (testguest.Guest, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return testguest.Build(ctx, testguest.Options{})
})

func testGuest(t *testing.T) testguest.Guest {
	t.Helper()
	g, err := guest()
	if err != nil {
		t.Skipf("no test guest: %v", err)
	}
	return g
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// newDriver returns a driver that logs to the test. The accelerator probe result is cached in the default
// state directory, so the suite pays for the probe once per host, not once per run.
func newDriver(t *testing.T) *Driver {
	t.Helper()
	d, err := New(Config{Logger: slog.New(slog.NewTextHandler(testLogWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// shortDir makes a temporary directory with a short path (nbdtest.ShortDir).
func shortDir(t *testing.T, prefix string) string { return nbdtest.ShortDir(t, prefix) }

// nbdDisk serves a fresh raw image of size bytes with qemu-nbd on a Unix socket, as blockd would: several
// connections at once (a migration's two ends), export name "vol". It returns the disk for a spec and the
// image path for verification.
func nbdDisk(t *testing.T, id string, size int64) (hypervisor.Disk, string) {
	t.Helper()
	return nbdDiskIn(t, shortDir(t, "nbd"), id, size)
}

// nbdDiskIn is nbdDisk with the image and the socket in dir.
func nbdDiskIn(t *testing.T, dir, id string, size int64) (hypervisor.Disk, string) {
	t.Helper()
	sock, img := nbdtest.Serve(t, dir, "vol", size)
	return hypervisor.Disk{ID: id, NBDSocket: sock, Export: "vol", BootIndex: 1}, img
}

// guestSpec is a direct-kernel-boot spec of the test guest with disks.
func guestSpec(t *testing.T, id string, memMiB uint64, disks ...hypervisor.Disk) hypervisor.Spec {
	g := testGuest(t)
	return hypervisor.Spec{
		ID: id, VCPUs: 1, Memory: memMiB * mib, Disks: disks, Firmware: hypervisor.FirmwareDirectKernel,
		Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline(), RunDir: shortDir(t, "vm"),
	}
}

// cleanupMachine makes sure the QEMU of spec is gone when the test ends, whatever state the test left it in:
// through the handle if there is one, else through the pid file.
func cleanupMachine(t *testing.T, m hypervisor.Machine, spec hypervisor.Spec) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if m != nil {
			m.Kill(ctx)
			m.Close()
		}
		if pid, err := readPidFile(runPaths(spec.RunDir).pid); err == nil {
			if proc, err := openProcess(pid); err == nil {
				cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				if strings.Contains(string(cmdline), spec.RunDir) {
					proc.signal(syscall.SIGKILL)
					proc.wait(ctx)
				}
				proc.close()
			}
		}
	})
}

// start starts spec and registers its cleanup.
func start(t *testing.T, ctx context.Context, d *Driver, spec hypervisor.Spec) hypervisor.Machine {
	t.Helper()
	cleanupMachine(t, nil, spec)
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupMachine(t, m, spec)
	return m
}

// watch opens the machine's console and collects it.
func watch(t *testing.T, ctx context.Context, m hypervisor.Machine) (*testguest.Console, func()) {
	t.Helper()
	c, err := m.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return testguest.WatchConsole(c), func() { c.Close() }
}

// verifyDisk checks the record ring in img and that it holds every record the consoles announced.
func verifyDisk(t *testing.T, img string, recs []testguest.Rec) testguest.DiskSummary {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, _ := f.Stat()
	s, err := testguest.VerifyDisk(f, info.Size())
	if err != nil {
		t.Fatalf("disk %s: %v", img, err)
	}
	if err := s.CheckAnnounced(recs); err != nil {
		t.Fatalf("disk %s: %v", img, err)
	}
	return s
}

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, what string, cond func() (bool, error)) error {
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
