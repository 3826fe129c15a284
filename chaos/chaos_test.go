package chaos_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/chaos/cluster"
	"github.com/basalt-hv/basalt/chaos/scenario"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// binDir and etcdBin are the programs under test (cluster.TestBinaries); setupErr says why there are none.
var (
	binDir, etcdBin string
	setupErr        error
)

func TestMain(m *testing.M) {
	flag.Parse() // for testing.Short
	if setupErr = cluster.Check(); setupErr != nil || testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "bch-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	binDir, etcdBin, setupErr = cluster.TestBinaries(ctx, dir)
	cancel()
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// long skips scenarios outside the default suite unless BASALT_CHAOS is set.
func long(t *testing.T) {
	if os.Getenv("BASALT_CHAOS") == "" {
		t.Skip("long chaos scenario: set BASALT_CHAOS=1 (`make chaos` runs it too)")
	}
}

// runScenario runs s on its own cluster and prints its report; any failed check or missed bar fails the test.
func runScenario(t *testing.T, s scenario.Scenario) {
	if testing.Short() {
		t.Skip("boots QEMU guests on a multi-host cluster; not in -short")
	}
	if setupErr != nil {
		t.Skipf("chaos harness unavailable: %v", setupErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	g, err := testguest.Build(ctx, testguest.Options{})
	if err != nil {
		t.Skipf("no test guest: %v", err)
	}
	log := slog.New(slog.NewTextHandler(&testWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r := scenario.Run(ctx, s, scenario.Options{Dir: t.TempDir(), BinDir: binDir, EtcdBin: etcdBin, Guest: g, Log: log})
	var out bytes.Buffer
	r.Print(&out)
	t.Log(out.String())
	if err := r.Failures(); err != nil {
		t.Logf("daemon logs:\n%s", r.Logs)
		t.Fatal(err)
	}
}

type testWriter struct{ t *testing.T }

func (w *testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(b, "\n")))
	return len(b), nil
}

// TestKillHost is the default suite's scenario: a host running a protected VM dies (SIGKILL of every process,
// QEMU included); the VM must beat again on another host within 10 s.
func TestKillHost(t *testing.T) { runScenario(t, scenario.KillHost) }

func TestKillHost8(t *testing.T) {
	long(t)
	runScenario(t, scenario.KillHost8)
}

func TestFreezeAndWake(t *testing.T) {
	long(t)
	runScenario(t, scenario.FreezeAndWake)
}

func TestPartitionLink(t *testing.T) {
	long(t)
	runScenario(t, scenario.PartitionLink)
}

func TestPartitionFirewall(t *testing.T) {
	long(t)
	runScenario(t, scenario.PartitionFirewall)
}

func TestDiskFull(t *testing.T) {
	long(t)
	runScenario(t, scenario.DiskFull)
}

func TestEtcdMemberLoss(t *testing.T) {
	long(t)
	runScenario(t, scenario.EtcdMemberLoss)
}
