package bench

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestRunSmall runs a small benchmark for real: two small guests migrated at once with compression. It checks
// that every figure was measured, that the guests' counters went on, and that the table shows it all. Skipped
// with -short: it boots two guests. The memory load is light on purpose: under TCG on an overloaded host, a
// migration of a guest that dirties memory hard can crash the guest (docs/compute.md), which the full benchmark
// reports; this test is about the benchmark's machinery.
func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("boots and migrates two guests")
	}
	// Migrating TCG guests that dirty memory loses guest state now and then on a loaded 2-core machine (a known
	// issue whose cause is not found: docs/compute.md), which would make the default suite flaky; `make bench`
	// runs the same machinery at full size and fails on any continuity loss.
	if os.Getenv("BASALT_MIGRATION_LOAD_TEST") == "" {
		t.Skip("set BASALT_MIGRATION_LOAD_TEST=1: migrations of memory-dirtying TCG guests hit a known, unexplained continuity loss under load (docs/compute.md)")
	}
	for _, bin := range []string{"qemu-system-x86_64", "qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian packages qemu-system-x86, qemu-utils)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rep, err := Run(ctx, Options{
		MemoryMiB: 192, LoadMiB: 16, DirtyMiBps: 4, Warmup: time.Second,
		Scenarios: []Scenario{{Parallel: 2, Compress: true}},
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	tab := Table(rep)
	t.Logf("\n%s", tab)
	if len(rep.Results) != 1 || len(rep.Results[0].Migrations) != 2 {
		t.Fatalf("results %+v", rep.Results)
	}
	for _, m := range rep.Results[0].Migrations {
		// The load alone is 16 MiB of half-random pages, besides the kernel and the initramfs: even compressed,
		// more than 16 MiB must cross.
		if m.Problem != "" || m.Status.Status != "completed" || m.Total <= 0 || m.QEMUDowntime <= 0 || m.Switchover <= 0 ||
			m.MaxGap < m.Switchover || m.WireBytes < 16<<20 || m.QEMUBytes == 0 {
			t.Errorf("migration %+v", m)
		}
	}
	if !strings.Contains(tab, "| 2 at once, compressed |") {
		t.Errorf("table:\n%s", tab)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
