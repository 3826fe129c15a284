// Package qemu is the hypervisor.Driver for QEMU (qemu-system-x86_64, Debian's qemu-system-x86). It builds the
// command line from a hypervisor.Spec, runs QEMU in its own session so that it outlives computed, and controls
// it over QMP (the qmp subpackage): lifecycle, hot-plug, balloon, metering and live migration. Guests reach
// their volumes through QEMU's own NBD client on the local blockd's Unix socket. KVM is used when a probe shows
// it can boot guests here, TCG otherwise (see Accel). It depends on the standard library, golang.org/x/sys/unix,
// computed/hypervisor and computed/qemu/qmp.
//
// Everything about one machine lives in Spec.RunDir: the QMP socket, the serial console socket, the guest agent
// channel's socket (Spec.Agent), QEMU's pid file and log, and the UEFI variable store. That directory is how Find gets back to a machine after computed
// restarts.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// Config configures a Driver. The zero value works on a Debian host with the packages in scripts/deps.sh.
type Config struct {
	// Binary is the QEMU system emulator; default qemu-system-x86_64 from PATH.
	Binary string
	// StateDir keeps the driver's per-host state (the accelerator probe result); default
	// <os.UserCacheDir>/basalt/qemu.
	StateDir string
	// Accel forces "kvm" or "tcg"; empty probes (see Driver.Accel).
	Accel string
	// CPU is the guest CPU model; default "host" under KVM (or "qemu64" when QEMU cannot start a vCPU with
	// "host", see Accel) and "max" under TCG. "host" and "max" expose everything the host (or QEMU's
	// emulator) can do, which is the fastest choice, and migrate only between identical hosts running the
	// same QEMU version; a cluster of mixed hosts should name a common model here.
	CPU string
	// OVMFDir holds the UEFI firmware; default /usr/share/OVMF (Debian's ovmf).
	OVMFDir string
	// HotplugPorts is the number of PCIe root ports every machine gets for disks and NICs, cold-plugged or
	// hot-plugged; default 16. It must be the same on a migration's source and destination.
	HotplugPorts int
	// ProbeTimeout bounds each run of the accelerator probe; default 15 s.
	ProbeTimeout time.Duration
	Logger       *slog.Logger
}

// Driver runs machines with QEMU. It is safe for concurrent use.
type Driver struct {
	cfg Config
	log *slog.Logger

	accelMu sync.Mutex
	accel   *AccelProbe
}

var _ hypervisor.Driver = (*Driver)(nil)

// New returns a driver for cfg. It checks that QEMU is installed but runs nothing yet.
func New(cfg Config) (*Driver, error) {
	if cfg.Binary == "" {
		cfg.Binary = "qemu-system-x86_64"
	}
	bin, err := exec.LookPath(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (install Debian's qemu-system-x86)", err)
	}
	cfg.Binary = bin
	if cfg.StateDir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			return nil, fmt.Errorf("qemu: no state directory configured and no cache directory: %w", err)
		}
		cfg.StateDir = filepath.Join(cache, "basalt", "qemu")
	}
	if cfg.OVMFDir == "" {
		cfg.OVMFDir = "/usr/share/OVMF"
	}
	if cfg.HotplugPorts == 0 {
		cfg.HotplugPorts = 16
	}
	if cfg.HotplugPorts < 1 || cfg.HotplugPorts > maxPorts {
		return nil, fmt.Errorf("qemu: HotplugPorts %d out of range 1..%d", cfg.HotplugPorts, maxPorts)
	}
	if cfg.ProbeTimeout == 0 {
		cfg.ProbeTimeout = 15 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Driver{cfg: cfg, log: cfg.Logger}, nil
}

// Name is "qemu".
func (d *Driver) Name() string { return "qemu" }

// PausesBeforeSwitchover: QEMU's pause-before-switchover capability stops the migration where
// MigrateOptions.BeforeSwitchover runs.
func (d *Driver) PausesBeforeSwitchover() bool { return true }

// tcgCPU is the CPU model under TCG.
func (d *Driver) tcgCPU() string {
	if d.cfg.CPU != "" {
		return d.cfg.CPU
	}
	return "max"
}

// vhostNet reports whether the host offers in-kernel virtio-net (vhost-net).
func (d *Driver) vhostNet() bool {
	_, err := os.Stat("/dev/vhost-net")
	return err == nil
}

// Start launches a machine from spec and boots it.
func (d *Driver) Start(ctx context.Context, spec hypervisor.Spec) (hypervisor.Machine, error) {
	m, err := d.launch(ctx, spec, false)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// StartIncoming launches a machine that waits for a live migration on listenHost (an unused port is chosen)
// and returns the URI for the source's Migrate. The destination expects an uncompressed stream; use
// StartIncomingWith for a compressed one (QEMU needs the same multifd settings on both ends, and the Driver
// interface does not carry them to the destination).
func (d *Driver) StartIncoming(ctx context.Context, spec hypervisor.Spec, listenHost string) (hypervisor.Machine, string, error) {
	return d.StartIncomingWith(ctx, spec, listenHost, hypervisor.MigrateOptions{})
}

// Find reconnects to the machine of spec that an earlier computed started: through the QMP socket in
// spec.RunDir, checking that the socket's peer is the process in the pid file. It returns
// hypervisor.ErrNotFound if that machine is not running. QEMU serves one QMP client at a time, so Find waits
// (until ctx ends) while another handle to the same machine is open.
func (d *Driver) Find(ctx context.Context, spec hypervisor.Spec) (hypervisor.Machine, error) {
	if err := validateSpec(spec); err != nil {
		return nil, err
	}
	p := runPaths(spec.RunDir)
	pid, err := readPidFile(p.pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("qemu: find %s: no pid file: %w", spec.ID, hypervisor.ErrNotFound)
		}
		return nil, fmt.Errorf("qemu: find %s: %w", spec.ID, err)
	}
	proc, err := openProcess(pid)
	if err != nil {
		return nil, fmt.Errorf("qemu: find %s: pid %d: %w", spec.ID, pid, err)
	}
	m, err := d.attach(ctx, spec, proc, false)
	if err != nil {
		proc.close()
		return nil, fmt.Errorf("qemu: find %s: %w", spec.ID, err)
	}
	return m, nil
}
