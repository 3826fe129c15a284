package cloudhv

// Tests of the driver against a stand-in cloud-hypervisor: the test binary re-executed as a fakeVMM behind the
// contract validator (see TestMain). The real binary cannot run here (it is not packaged in Debian 12 and
// needs KVM that can boot guests), so this checks the driver's process handling for real (its own session, pid
// file, finding the process again, exit watching, clean-up) and its API use against the OpenAPI contract and a
// small model of Cloud Hypervisor's state machine. Disks are attached by fileDisks, which hands out plain files:
// the kernel NBD path needs the nbd module, which these machines lack (see nbd_test.go).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// fileDisks attaches a disk as a file in dir named after its export, and records what is attached.
type fileDisks struct {
	dir string
	// missing makes Attach hand out a path that does not exist, so that Cloud Hypervisor fails to open it.
	missing bool

	mu       sync.Mutex
	attached map[string]int // path -> attach count
}

type fileDisk struct {
	d    *fileDisks
	path string
}

func (f *fileDisks) Attach(ctx context.Context, d hypervisor.Disk) (AttachedDisk, error) {
	path := filepath.Join(f.dir, d.Export+".img")
	if f.missing {
		path = filepath.Join(f.dir, "missing", d.Export+".img")
	} else if err := os.WriteFile(path, make([]byte, 1<<16), 0o600); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.attached == nil {
		f.attached = make(map[string]int)
	}
	f.attached[path]++
	return &fileDisk{d: f, path: path}, nil
}

func (a *fileDisk) Path() string { return a.path }

func (a *fileDisk) Detach(ctx context.Context) error {
	a.d.mu.Lock()
	defer a.d.mu.Unlock()
	if a.d.attached[a.path] == 0 {
		return fmt.Errorf("%s detached twice", a.path)
	}
	a.d.attached[a.path]--
	return nil
}

func (f *fileDisks) stillAttached() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for p, n := range f.attached {
		if n > 0 {
			out = append(out, p)
		}
	}
	return out
}

// testDriver returns a driver whose "cloud-hypervisor" is this test binary in fake VMM mode.
func testDriver(t *testing.T) (*Driver, *fileDisks) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(envFakeVMM, "1")
	disks := &fileDisks{dir: shortTempDir(t)}
	t.Cleanup(func() {
		if p := disks.stillAttached(); len(p) > 0 {
			t.Errorf("disks still attached at the end: %v", p)
		}
	})
	// Warnings and errors only: the driver's info logs would drown the test output.
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return New(Config{Binary: exe, Disks: disks, UEFIFirmware: "/usr/share/cloudhv/CLOUDHV.fd", Logger: log}), disks
}

// testSpec is a machine with two disks and a NIC, in a fresh RunDir.
func testSpec(t *testing.T, id string) hypervisor.Spec {
	t.Helper()
	return hypervisor.Spec{
		ID:        id,
		VCPUs:     2,
		Memory:    512 << 20,
		MaxMemory: 1 << 30,
		Disks: []hypervisor.Disk{
			{ID: "data", NBDSocket: "/run/basalt/nbd.sock", Export: id + "-data"},
			{ID: "root", NBDSocket: "/run/basalt/nbd.sock", Export: id + "-root", BootIndex: 1},
		},
		NICs:     []hypervisor.NIC{{ID: "nic0", MAC: "52:54:00:aa:bb:cc", Tap: "tap-" + id}},
		Firmware: hypervisor.FirmwareDirectKernel,
		Kernel:   "/boot/vmlinuz",
		Cmdline:  "console=ttyS0",
		RunDir:   filepath.Join(shortTempDir(t), id),
	}
}

// startMachine starts spec and makes sure the process is gone and the contract held at the end of the test.
func startMachine(t *testing.T, d *Driver, spec hypervisor.Spec) *Machine {
	t.Helper()
	ctx := testContext(t)
	hm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	m := hm.(*Machine)
	cleanupMachine(t, m)
	return m
}

func cleanupMachine(t *testing.T, m *Machine) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Kill(ctx); err != nil {
			t.Errorf("Kill at cleanup: %v", err)
		}
		checkNoViolations(t, m.spec.RunDir)
		checkCleanedUp(t, m.spec)
	})
}

// checkCleanedUp checks that an exited machine left no sockets, pid file or disk links behind.
func checkCleanedUp(t *testing.T, spec hypervisor.Spec) {
	t.Helper()
	for _, name := range []string{apiSocketName, consoleSocketName, pidFileName} {
		if _, err := os.Lstat(filepath.Join(spec.RunDir, name)); err == nil {
			t.Errorf("%s left behind", name)
		}
	}
	links, _ := os.ReadDir(filepath.Join(spec.RunDir, disksDirName))
	for _, l := range links {
		t.Errorf("disk link %s left behind", l.Name())
	}
}

func TestDriverLifecycle(t *testing.T) {
	d, disks := testDriver(t)
	spec := testSpec(t, "vm1")
	m := startMachine(t, d, spec)
	ctx := testContext(t)

	// The process runs in its own session, so signals to computed's process group do not reach it.
	if sid := sessionID(t, m.PID()); sid != m.PID() {
		t.Errorf("cloud-hypervisor's session is %d, want its own (%d)", sid, m.PID())
	}
	if pid, err := readPIDFile(filepath.Join(spec.RunDir, pidFileName)); err != nil || pid != m.PID() {
		t.Errorf("pid file holds %d, %v; want %d", pid, err, m.PID())
	}

	// What Cloud Hypervisor was given.
	vi, err := m.Client().Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg := vi.Config
	if cfg.CPUs.BootVCPUs != 2 || cfg.CPUs.MaxVCPUs != 2 || cfg.Memory.Size != 512<<20 || cfg.Memory.HotplugSize != 512<<20 {
		t.Errorf("cpus %+v memory %+v", cfg.CPUs, cfg.Memory)
	}
	if cfg.Payload.Kernel != "/boot/vmlinuz" || cfg.Payload.Cmdline != "console=ttyS0" || cfg.Payload.Firmware != "" {
		t.Errorf("payload %+v", cfg.Payload)
	}
	if cfg.Serial == nil || cfg.Serial.Mode != ConsoleSocket || cfg.Serial.Socket != filepath.Join(spec.RunDir, consoleSocketName) {
		t.Errorf("serial %+v", cfg.Serial)
	}
	if cfg.Console == nil || cfg.Console.Mode != ConsoleOff {
		t.Errorf("console %+v", cfg.Console)
	}
	if cfg.Balloon == nil {
		t.Error("no balloon")
	}
	if len(cfg.Disks) != 2 || cfg.Disks[0].ID != "root" || cfg.Disks[1].ID != "data" {
		t.Fatalf("disks %+v, want root (boot index 1) first", cfg.Disks)
	}
	for _, dc := range cfg.Disks {
		target, err := os.Readlink(dc.Path)
		if err != nil || target != filepath.Join(disks.dir, "vm1-"+dc.ID+".img") {
			t.Errorf("disk %s path %s -> %s, %v", dc.ID, dc.Path, target, err)
		}
	}
	if len(cfg.Net) != 1 || cfg.Net[0] != (NetConfig{ID: "nic0", Tap: "tap-vm1", MAC: "52:54:00:aa:bb:cc"}) {
		t.Errorf("net %+v", cfg.Net)
	}

	info, err := m.Info(ctx)
	if err != nil || info.State != hypervisor.StateRunning || info.VCPUs != 2 || info.Memory != 512<<20 || info.PID != m.PID() || info.BalloonActual != 512<<20 {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	stats, err := m.Stats(ctx)
	if err != nil || len(stats.Disks) != 2 || stats.Disks["root"].ReadBytes == 0 || stats.BalloonActual != 512<<20 {
		t.Fatalf("Stats = %+v, %v", stats, err)
	}
	if _, ok := stats.Disks["nic0"]; ok {
		t.Error("a NIC's counters were taken for a disk")
	}

	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if info, _ := m.Info(ctx); info.State != hypervisor.StatePaused {
		t.Fatalf("state after Pause = %s", info.State)
	}
	// Cloud Hypervisor refuses to pause a paused VM; the error carries its status and text.
	if err := m.Pause(ctx); !IsStatus(err, http.StatusMethodNotAllowed) || !strings.Contains(err.Error(), "InvalidStateTransition") {
		t.Fatalf("second Pause: %v, want a 405 with Cloud Hypervisor's reason", err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}

	// Balloon: below the current RAM inflates the balloon, above it hot-plugs memory.
	if err := m.SetBalloon(ctx, 256<<20); err != nil {
		t.Fatal(err)
	}
	if info, _ := m.Info(ctx); info.BalloonActual != 256<<20 || info.Memory != 512<<20 {
		t.Fatalf("after SetBalloon(256M): %+v", info)
	}
	if err := m.SetBalloon(ctx, 1<<30); err != nil {
		t.Fatal(err)
	}
	if info, _ := m.Info(ctx); info.BalloonActual != 1<<30 || info.Memory != 1<<30 {
		t.Fatalf("after SetBalloon(1G): %+v", info)
	}
	if err := m.SetBalloon(ctx, 2<<30); err == nil {
		t.Fatal("SetBalloon beyond MaxMemory succeeded")
	}

	// Hot-plug.
	extra := hypervisor.Disk{ID: "extra", NBDSocket: "/run/basalt/nbd.sock", Export: "vm1-extra", ReadOnly: true}
	if err := m.AddDisk(ctx, extra); err != nil {
		t.Fatal(err)
	}
	if err := m.AddDisk(ctx, extra); err == nil {
		t.Fatal("adding the same disk twice succeeded")
	}
	if err := m.AddNIC(ctx, hypervisor.NIC{ID: "nic1", Tap: "tap1"}); err != nil {
		t.Fatal(err)
	}
	vi, _ = m.Client().Info(ctx)
	if len(vi.Config.Disks) != 3 || !vi.Config.Disks[2].ReadOnly || len(vi.Config.Net) != 2 {
		t.Fatalf("after hot-plug: disks %+v net %+v", vi.Config.Disks, vi.Config.Net)
	}
	if err := m.RemoveDisk(ctx, "extra"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(diskPath(spec, "extra")); err == nil {
		t.Error("link of a removed disk left behind")
	}
	if err := m.RemoveNIC(ctx, "nic1"); err != nil {
		t.Fatal(err)
	}
	if err := m.RemoveNIC(ctx, "nic1"); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("removing a NIC twice: %v, want 404", err)
	}

	// Console: the serial socket.
	con, err := m.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(con)
	if line, err := r.ReadString('\n'); err != nil || !strings.Contains(line, "serial console") {
		t.Fatalf("console banner %q, %v", line, err)
	}
	io.WriteString(con, "echo hello\n")
	if line, err := r.ReadString('\n'); err != nil || line != "echo hello\n" {
		t.Fatalf("console echo %q, %v", line, err)
	}
	con.Close()

	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if info, err := m.Info(ctx); err != nil || info.State != hypervisor.StateShutdown {
		t.Fatalf("Info after Kill = %+v, %v", info, err)
	}
	checkCleanedUp(t, spec)
	if _, err := d.Find(ctx, spec); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find after Kill: %v, want ErrNotFound", err)
	}
}

func sessionID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	sid, _ := strconv.Atoi(fields[3])
	return sid
}

// TestDriverShutdown presses the power button: the fake guest powers off and the VMM exits, as Cloud Hypervisor
// does, and Wait sees it.
func TestDriverShutdown(t *testing.T) {
	d, _ := testDriver(t)
	spec := testSpec(t, "vm2")
	m := startMachine(t, d, spec)
	ctx := testContext(t)
	if err := m.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	checkCleanedUp(t, spec)
}

// TestDriverFind simulates a computed restart: the first driver lets go of the machine, a second one finds it
// by its pid file and controls it.
func TestDriverFind(t *testing.T) {
	d, _ := testDriver(t)
	spec := testSpec(t, "vm3")
	ctx := testContext(t)
	if _, err := d.Find(ctx, spec); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find before Start: %v, want ErrNotFound", err)
	}
	hm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	first := hm.(*Machine)
	pid := first.PID()
	t.Cleanup(func() {
		// In case the test failed before killing it through the found handle.
		if isCloudHypervisor(pid, filepath.Join(spec.RunDir, apiSocketName)) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		checkNoViolations(t, spec.RunDir)
	})
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if err := first.Wait(ctx); err == nil {
		t.Fatal("Wait on a closed handle succeeded")
	}
	if _, err := d.Start(ctx, spec); err == nil || !strings.Contains(err.Error(), "already runs") {
		t.Fatalf("starting a machine that runs: %v", err)
	}

	restarted := New(Config{Binary: d.cfg.Binary, Disks: d.disks, Logger: d.cfg.Logger})
	hm, err = restarted.Find(ctx, spec)
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	found := hm.(*Machine)
	if found.PID() != pid {
		t.Fatalf("found pid %d, want %d", found.PID(), pid)
	}
	if info, err := found.Info(ctx); err != nil || info.State != hypervisor.StateRunning || info.VCPUs != 2 {
		t.Fatalf("Info of found machine = %+v, %v", info, err)
	}
	// The found process is not our child: Kill goes through its pidfd and Wait through polling it.
	if err := found.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	checkCleanedUp(t, spec)
	// The first handle's disk attachments outlive Close (the guest needed them); in computed they end with
	// the old process. Release them here.
	first.detachAll(ctx)
	if _, err := restarted.Find(ctx, spec); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find after Kill: %v, want ErrNotFound", err)
	}

	// A pid file whose process is something else (a recycled pid) is stale.
	if err := writePIDFile(filepath.Join(spec.RunDir, pidFileName), os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := restarted.Find(ctx, spec); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("Find with a stale pid file: %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(filepath.Join(spec.RunDir, pidFileName)); err == nil {
		t.Error("stale pid file not removed")
	}
}

// TestDriverMigrate migrates between two machines on this host, over TCP on the loopback and over a Unix
// socket.
func TestDriverMigrate(t *testing.T) {
	for _, listen := range []string{"127.0.0.1", "unix"} {
		t.Run(listen, func(t *testing.T) {
			d, _ := testDriver(t)
			ctx := testContext(t)
			srcSpec := testSpec(t, "mig")
			src := startMachine(t, d, srcSpec)

			dstSpec := srcSpec
			dstSpec.RunDir = filepath.Join(shortTempDir(t), "mig")
			listenHost := listen
			if listen == "unix" {
				listenHost = "unix:" + filepath.Join(shortTempDir(t), "migration.sock")
			}
			hm, uri, err := d.StartIncoming(ctx, dstSpec, listenHost)
			if err != nil {
				t.Fatalf("StartIncoming: %v", err)
			}
			dst := hm.(*Machine)
			cleanupMachine(t, dst)
			if listen == "unix" && uri != listenHost || listen != "unix" && !strings.HasPrefix(uri, "tcp:127.0.0.1:") {
				t.Fatalf("uri %q", uri)
			}
			// The destination's API is blocked in receive-migration (the fake, like Cloud Hypervisor, handles
			// one request at a time): Info must answer from what the driver knows.
			infoCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
			info, err := dst.Info(infoCtx)
			cancel()
			if err != nil || info.State != hypervisor.StateIncoming {
				t.Fatalf("destination Info while waiting = %+v, %v", info, err)
			}
			if err := dst.Pause(ctx); err == nil {
				t.Fatal("Pause of a machine waiting for a migration succeeded")
			}

			var mu sync.Mutex
			var reports []string
			migCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			st, err := src.Migrate(migCtx, uri, hypervisor.MigrateOptions{MaxDowntime: 200 * time.Millisecond}, func(s hypervisor.MigrationStatus) {
				mu.Lock()
				reports = append(reports, s.Status)
				mu.Unlock()
			})
			if err != nil || st.Status != "completed" {
				t.Fatalf("Migrate = %+v, %v", st, err)
			}
			mu.Lock()
			if len(reports) < 2 || reports[0] != "active" || reports[len(reports)-1] != "completed" {
				t.Errorf("progress reports %v", reports)
			}
			mu.Unlock()

			// What the source was asked to do.
			var sent SendMigrationData
			b, err := os.ReadFile(filepath.Join(srcSpec.RunDir, "fake-send-migration.json"))
			if err == nil {
				err = json.Unmarshal(b, &sent)
			}
			if err != nil || sent.DestinationURL != uri || sent.DowntimeMS != 200 || sent.TimeoutS < 25 || sent.TimeoutS > 30 || sent.TimeoutStrategy != "Cancel" {
				t.Errorf("send-migration body %s, %v", b, err)
			}

			// Cloud Hypervisor exits on the source after a successful migration.
			if err := src.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			checkCleanedUp(t, srcSpec)
			err = waitFor(ctx, 10*time.Millisecond, func() (bool, error) {
				info, err := dst.Info(ctx)
				return info.State == hypervisor.StateRunning, err
			})
			if err != nil {
				t.Fatalf("destination never ran: %v", err)
			}
			if info, _ := dst.Info(ctx); info.VCPUs != 2 || info.Memory != 512<<20 {
				t.Fatalf("destination Info = %+v", info)
			}
			if err := dst.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			if err := dst.Wait(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestDriverMigrateUnsupportedOptions: what the API cannot do is refused, not ignored.
func TestDriverMigrateUnsupportedOptions(t *testing.T) {
	d, _ := testDriver(t)
	m := startMachine(t, d, testSpec(t, "vm4"))
	ctx := testContext(t)
	for name, opts := range map[string]hypervisor.MigrateOptions{
		"compress":  {Compress: true},
		"bandwidth": {BandwidthBytes: 100 << 20},
	} {
		if _, err := m.Migrate(ctx, "tcp:127.0.0.1:1", opts, nil); !errors.Is(err, errors.ErrUnsupported) {
			t.Errorf("%s: %v, want ErrUnsupported", name, err)
		}
	}
	if err := m.CancelMigration(ctx); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("CancelMigration: %v, want ErrUnsupported", err)
	}
	// A migration to nowhere fails and leaves the machine running.
	st, err := m.Migrate(ctx, "tcp:127.0.0.1:1", hypervisor.MigrateOptions{}, nil)
	if err == nil || st.Status != "failed" {
		t.Fatalf("Migrate to a closed port = %+v, %v", st, err)
	}
	if info, err := m.Info(ctx); err != nil || info.State != hypervisor.StateRunning {
		t.Fatalf("Info after a failed migration = %+v, %v", info, err)
	}
}

// TestDriverStartFailures: refusals before anything runs, and failures after the process started, which
// must leave nothing behind.
func TestDriverStartFailures(t *testing.T) {
	d, disks := testDriver(t)
	ctx := testContext(t)

	spec := testSpec(t, "bad")
	spec.Firmware = hypervisor.FirmwareUEFISecureBoot
	if _, err := d.Start(ctx, spec); !errors.Is(err, ErrSecureBootUnsupported) {
		t.Errorf("Secure Boot: %v", err)
	}
	noFirmware := New(Config{Binary: d.cfg.Binary, Disks: disks, Logger: d.cfg.Logger})
	for _, fw := range []hypervisor.Firmware{hypervisor.FirmwareUEFI, hypervisor.FirmwareBIOS} {
		spec.Firmware = fw
		if _, err := noFirmware.Start(ctx, spec); err == nil || !strings.Contains(err.Error(), "Firmware") {
			t.Errorf("firmware %d without a configured image: %v", fw, err)
		}
	}
	for name, mutate := range map[string]func(*hypervisor.Spec){
		"no vcpus":          func(s *hypervisor.Spec) { s.VCPUs = 0 },
		"max below memory":  func(s *hypervisor.Spec) { s.MaxMemory = s.Memory - 1 },
		"duplicate id":      func(s *hypervisor.Spec) { s.NICs[0].ID = "root" },
		"disk id with /":    func(s *hypervisor.Spec) { s.Disks[0].ID = "a/b" },
		"no kernel":         func(s *hypervisor.Spec) { s.Kernel = "" },
		"bad mac":           func(s *hypervisor.Spec) { s.NICs[0].MAC = "nope" },
		"run dir too long":  func(s *hypervisor.Spec) { s.RunDir = "/" + strings.Repeat("x", 100) },
		"nbd export absent": func(s *hypervisor.Spec) { s.Disks[0].Export = "" },
	} {
		s := testSpec(t, "bad")
		mutate(&s)
		if _, err := d.Start(ctx, s); err == nil {
			t.Errorf("%s: Start succeeded", name)
		}
	}

	// A binary that is not there, and one that exits at once.
	for name, binary := range map[string]string{"missing": "/nonexistent/cloud-hypervisor", "exits": "/bin/false"} {
		s := testSpec(t, "bad")
		broken := New(Config{Binary: binary, Disks: disks, Logger: d.cfg.Logger})
		if _, err := broken.Start(ctx, s); err == nil {
			t.Errorf("%s binary: Start succeeded", name)
		} else {
			t.Logf("%s binary: %v", name, err)
		}
		checkCleanedUp(t, s)
	}

	// Cloud Hypervisor refuses to boot (it cannot open a disk): the process is killed and everything released.
	s := testSpec(t, "bad")
	missing := New(Config{Binary: d.cfg.Binary, Disks: &fileDisks{dir: disks.dir, missing: true}, Logger: d.cfg.Logger})
	_, err := missing.Start(ctx, s)
	if !IsStatus(err, http.StatusInternalServerError) || !strings.Contains(err.Error(), "booting VM") {
		t.Fatalf("Start with an unopenable disk: %v, want the boot's 500", err)
	}
	checkNoViolations(t, s.RunDir)
	checkCleanedUp(t, s)
}

// TestDriverAPIGone: errors when the API socket disappears under a running machine.
func TestDriverAPIGone(t *testing.T) {
	d, _ := testDriver(t)
	spec := testSpec(t, "vm5")
	m := startMachine(t, d, spec)
	ctx := testContext(t)
	if err := os.Remove(filepath.Join(spec.RunDir, apiSocketName)); err != nil {
		t.Fatal(err)
	}
	_, err := m.Info(ctx)
	if err == nil || !strings.Contains(err.Error(), apiSocketName) {
		t.Fatalf("Info without the API socket: %v", err)
	}
	if err := m.Pause(ctx); err == nil {
		t.Fatal("Pause without the API socket succeeded")
	}
	// Kill still works: it does not need the API.
	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestVMConfigPayloads(t *testing.T) {
	d := New(Config{UEFIFirmware: "/fw/CLOUDHV.fd", BIOSFirmware: "/fw/hypervisor-fw"})
	base := hypervisor.Spec{ID: "p", VCPUs: 1, Memory: 1 << 30, RunDir: "/run/x", Kernel: "/k", Initrd: "/i", Cmdline: "c"}
	for fw, want := range map[hypervisor.Firmware]PayloadConfig{
		hypervisor.FirmwareDirectKernel: {Kernel: "/k", Initramfs: "/i", Cmdline: "c"},
		hypervisor.FirmwareUEFI:         {Firmware: "/fw/CLOUDHV.fd"},
		hypervisor.FirmwareBIOS:         {Firmware: "/fw/hypervisor-fw"},
	} {
		spec := base
		spec.Firmware = fw
		cfg, err := d.vmConfig(spec)
		if err != nil || cfg.Payload != want {
			t.Errorf("firmware %d: payload %+v, %v; want %+v", fw, cfg.Payload, err, want)
		}
		if cfg.Memory.HotplugSize != 0 {
			t.Errorf("hotplug_size %d without MaxMemory", cfg.Memory.HotplugSize)
		}
	}
	long := base
	long.Disks = []hypervisor.Disk{{ID: strings.Repeat("d", 30), NBDSocket: "s", Export: "e"}}
	cfg, _ := d.vmConfig(long)
	if got := cfg.Disks[0].Serial; len(got) != 20 {
		t.Errorf("serial %q, want the 20 bytes virtio-blk allows", got)
	}
}
