// Package cloudhv is computed's driver for Cloud Hypervisor: it implements hypervisor.Driver by running one
// cloud-hypervisor process per machine and driving it through the REST API on its --api-socket (the contract
// is testdata/cloud-hypervisor-openapi.yaml, a copy of shared/reference/cloud-hypervisor-openapi.yaml).
//
// What lives here:
//   - Client, a typed client for that API over the Unix socket (client.go, api.go);
//   - Driver and Machine, the hypervisor seam's implementation (driver.go, machine.go, process.go);
//   - the disk path: Cloud Hypervisor has no network disk type, so each Basalt volume (an NBD export of the
//     local blockd) is attached as a kernel NBD device by KernelNBD, after an NBD handshake done here
//     (nbd.go, nbdkernel.go). github.com/pojntfx/go-nbd would provide that client but is not available from
//     the Go module proxy this project uses.
//
// It depends on computed/hypervisor, the standard library and golang.org/x/sys/unix, and is Linux-only (KVM,
// /proc, pidfds, NBD ioctls).
package cloudhv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// ErrSecureBootUnsupported is returned for hypervisor.FirmwareUEFISecureBoot: Cloud Hypervisor's API has no
// Secure Boot setting and no UEFI variable store to enrol keys in (PayloadConfig takes a firmware image and
// nothing else about it).
var ErrSecureBootUnsupported = errors.New("cloudhv: UEFI Secure Boot is not supported: Cloud Hypervisor's API has no Secure Boot or UEFI variable-store setting")

// Config configures the driver.
type Config struct {
	// Binary is the cloud-hypervisor executable; empty means "cloud-hypervisor" found on PATH.
	Binary string
	// UEFIFirmware is the firmware for hypervisor.FirmwareUEFI: an OVMF built for Cloud Hypervisor's platform
	// (edk2 OvmfPkg/CloudHv/CloudHvX64.dsc, released as CLOUDHV.fd). QEMU's OVMF builds, such as Debian's
	// /usr/share/OVMF/OVMF_CODE_4M.fd, expect QEMU's fw_cfg, pflash and chipset and do not boot under Cloud
	// Hypervisor; Debian 12 ships no CloudHv build.
	UEFIFirmware string
	// BIOSFirmware is the firmware for hypervisor.FirmwareBIOS. Cloud Hypervisor has no legacy BIOS; its usual
	// "boot from the disk" firmware is rust-hypervisor-firmware (hypervisor-fw), which loads an EFI bootloader
	// or a Boot Loader Specification entry from the first disk.
	BIOSFirmware string
	// Disks attaches volumes; nil means the kernel NBD client (KernelNBD).
	Disks DiskAttacher
	// Logger receives the driver's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Driver runs machines under Cloud Hypervisor.
type Driver struct {
	cfg   Config
	log   *slog.Logger
	disks DiskAttacher
}

var _ hypervisor.Driver = (*Driver)(nil)

// New returns a driver.
func New(cfg Config) *Driver {
	if cfg.Binary == "" {
		cfg.Binary = "cloud-hypervisor"
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	disks := cfg.Disks
	if disks == nil {
		disks = &KernelNBD{Logger: log}
	}
	return &Driver{cfg: cfg, log: log.With("driver", "cloudhv"), disks: disks}
}

// Name is "cloudhv".
func (d *Driver) Name() string { return "cloudhv" }

// maxUnixPath is the room in sockaddr_un.sun_path, less the terminating NUL.
const maxUnixPath = 107

func validName(s string) bool {
	return s != "" && s != "." && s != ".." && !strings.ContainsAny(s, "/\x00")
}

// validateSpec checks what Cloud Hypervisor would otherwise reject later, or what would break the driver's own
// file layout.
func validateSpec(spec hypervisor.Spec) error {
	if !validName(spec.ID) {
		return fmt.Errorf("machine ID %q is not usable", spec.ID)
	}
	if spec.RunDir == "" {
		return errors.New("spec has no RunDir")
	}
	if p := filepath.Join(spec.RunDir, consoleSocketName); len(p) > maxUnixPath {
		return fmt.Errorf("RunDir %s is too long for Unix socket paths inside it (%d > %d bytes)", spec.RunDir, len(p), maxUnixPath)
	}
	if spec.VCPUs < 1 {
		return fmt.Errorf("VCPUs is %d, need at least 1", spec.VCPUs)
	}
	if spec.Memory == 0 {
		return errors.New("memory is 0")
	}
	if spec.MaxMemory != 0 && spec.MaxMemory < spec.Memory {
		return fmt.Errorf("MaxMemory %d is below Memory %d", spec.MaxMemory, spec.Memory)
	}
	ids := make(map[string]bool)
	for _, d := range spec.Disks {
		if err := validateDisk(d); err != nil {
			return err
		}
		if ids[d.ID] {
			return fmt.Errorf("device ID %q is used twice", d.ID)
		}
		ids[d.ID] = true
	}
	for _, n := range spec.NICs {
		if err := validateNIC(n); err != nil {
			return err
		}
		if ids[n.ID] {
			return fmt.Errorf("device ID %q is used twice", n.ID)
		}
		ids[n.ID] = true
	}
	return nil
}

func validateDisk(d hypervisor.Disk) error {
	if !validName(d.ID) {
		return fmt.Errorf("disk ID %q is not usable", d.ID)
	}
	if d.NBDSocket == "" || d.Export == "" {
		return fmt.Errorf("disk %s has no NBD socket or export", d.ID)
	}
	return nil
}

func validateNIC(n hypervisor.NIC) error {
	if !validName(n.ID) {
		return fmt.Errorf("NIC ID %q is not usable", n.ID)
	}
	if n.Tap == "" {
		return fmt.Errorf("NIC %s has no tap device", n.ID)
	}
	if n.MAC != "" {
		if _, err := net.ParseMAC(n.MAC); err != nil {
			return fmt.Errorf("NIC %s: %w", n.ID, err)
		}
	}
	return nil
}

// payload maps the spec's firmware choice to what Cloud Hypervisor boots.
func (d *Driver) payload(spec hypervisor.Spec) (PayloadConfig, error) {
	switch spec.Firmware {
	case hypervisor.FirmwareDirectKernel:
		if spec.Kernel == "" {
			return PayloadConfig{}, errors.New("direct kernel boot without a kernel")
		}
		return PayloadConfig{Kernel: spec.Kernel, Initramfs: spec.Initrd, Cmdline: spec.Cmdline}, nil
	case hypervisor.FirmwareUEFI:
		if d.cfg.UEFIFirmware == "" {
			return PayloadConfig{}, errors.New("UEFI boot needs Config.UEFIFirmware (CLOUDHV.fd, an OVMF built for Cloud Hypervisor)")
		}
		return PayloadConfig{Firmware: d.cfg.UEFIFirmware}, nil
	case hypervisor.FirmwareUEFISecureBoot:
		return PayloadConfig{}, ErrSecureBootUnsupported
	case hypervisor.FirmwareBIOS:
		if d.cfg.BIOSFirmware == "" {
			return PayloadConfig{}, errors.New("BIOS boot needs Config.BIOSFirmware: Cloud Hypervisor has no legacy BIOS (use rust-hypervisor-firmware)")
		}
		return PayloadConfig{Firmware: d.cfg.BIOSFirmware}, nil
	default:
		return PayloadConfig{}, fmt.Errorf("unknown firmware %d", spec.Firmware)
	}
}

// diskPath is where Cloud Hypervisor opens a disk: a symlink in RunDir to the attached device. The migrated
// configuration carries disk paths, and /dev/nbdN numbers differ between hosts; the link's path does not, as
// long as both hosts use the same RunDir for the machine.
func diskPath(spec hypervisor.Spec, id string) string {
	return filepath.Join(spec.RunDir, disksDirName, id)
}

func diskConfig(spec hypervisor.Spec, d hypervisor.Disk) DiskConfig {
	serial := d.ID
	// virtio-blk serials are 20 bytes (VIRTIO_BLK_ID_BYTES).
	if len(serial) > 20 {
		serial = serial[:20]
	}
	return DiskConfig{ID: d.ID, Path: diskPath(spec, d.ID), ReadOnly: d.ReadOnly, Serial: serial, ImageType: "Raw"}
}

func netConfig(n hypervisor.NIC) NetConfig {
	return NetConfig{ID: n.ID, Tap: n.Tap, MAC: n.MAC}
}

// vmConfig builds the VmConfig for spec.
func (d *Driver) vmConfig(spec hypervisor.Spec) (VMConfig, error) {
	payload, err := d.payload(spec)
	if err != nil {
		return VMConfig{}, err
	}
	mem := &MemoryConfig{Size: spec.Memory}
	if spec.MaxMemory > spec.Memory {
		// Growing beyond the boot size is ACPI memory hotplug (vm.resize desired_ram); shrinking is the
		// balloon's job, since ACPI-hotplugged memory cannot be unplugged.
		mem.HotplugSize = spec.MaxMemory - spec.Memory
	}
	cfg := VMConfig{
		CPUs:    &CPUsConfig{BootVCPUs: spec.VCPUs, MaxVCPUs: spec.VCPUs},
		Memory:  mem,
		Payload: payload,
		Balloon: &BalloonConfig{Size: 0},
		// ttyS0 goes to a socket computed connects to; the virtio console is off so nothing writes to
		// cloud-hypervisor's stdout (its Tty default would).
		Serial:  &SerialConfig{Mode: ConsoleSocket, Socket: filepath.Join(spec.RunDir, consoleSocketName)},
		Console: &ConsoleConfig{Mode: ConsoleOff},
	}
	// Cloud Hypervisor has no boot order setting; firmware boots the first bootable disk in PCI order, which
	// follows the order of the list. Disks with a BootIndex come first, by index.
	disks := slices.Clone(spec.Disks)
	slices.SortStableFunc(disks, func(a, b hypervisor.Disk) int {
		switch {
		case a.BootIndex == b.BootIndex:
			return 0
		case a.BootIndex == 0:
			return 1
		case b.BootIndex == 0:
			return -1
		default:
			return a.BootIndex - b.BootIndex
		}
	})
	for _, disk := range disks {
		cfg.Disks = append(cfg.Disks, diskConfig(spec, disk))
	}
	for _, n := range spec.NICs {
		cfg.Net = append(cfg.Net, netConfig(n))
	}
	return cfg, nil
}

// Start launches cloud-hypervisor for spec, attaches its disks, and creates and boots the VM.
func (d *Driver) Start(ctx context.Context, spec hypervisor.Spec) (hypervisor.Machine, error) {
	if err := validateSpec(spec); err != nil {
		return nil, fmt.Errorf("cloudhv: starting %s: %w", spec.ID, err)
	}
	cfg, err := d.vmConfig(spec)
	if err != nil {
		return nil, fmt.Errorf("cloudhv: starting %s: %w", spec.ID, err)
	}
	m, err := d.launch(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("cloudhv: starting %s: %w", spec.ID, err)
	}
	if err := m.client.CreateVM(ctx, cfg); err != nil {
		m.abort(ctx)
		return nil, fmt.Errorf("cloudhv: starting %s: creating VM: %w", spec.ID, err)
	}
	if err := m.client.BootVM(ctx); err != nil {
		m.abort(ctx)
		return nil, fmt.Errorf("cloudhv: starting %s: booting VM: %w", spec.ID, err)
	}
	m.log.Info("machine started", "pid", m.proc.pid, "vcpus", spec.VCPUs, "memory", spec.Memory, "disks", len(spec.Disks), "nics", len(spec.NICs))
	return m, nil
}

// StartIncoming launches cloud-hypervisor with no VM, attaches spec's disks at the paths the source uses, and
// has it receive a migration. listenHost is the address to listen on ("tcp:" migration), or "unix:<path>" for a
// migration between two processes on one host. It returns once Cloud Hypervisor listens; the returned URI is
// the one to give the source's Migrate.
func (d *Driver) StartIncoming(ctx context.Context, spec hypervisor.Spec, listenHost string) (hypervisor.Machine, string, error) {
	if err := validateSpec(spec); err != nil {
		return nil, "", fmt.Errorf("cloudhv: starting incoming %s: %w", spec.ID, err)
	}
	url, err := receiverURL(listenHost)
	if err != nil {
		return nil, "", fmt.Errorf("cloudhv: starting incoming %s: %w", spec.ID, err)
	}
	m, err := d.launch(ctx, spec)
	if err != nil {
		return nil, "", fmt.Errorf("cloudhv: starting incoming %s: %w", spec.ID, err)
	}
	m.startReceive(url)
	err = waitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-m.incoming:
			if m.incomingErr != nil {
				return false, fmt.Errorf("receiving migration: %w", m.incomingErr)
			}
			return false, errors.New("receive-migration ended before anything was sent")
		case <-m.proc.done:
			return false, fmt.Errorf("cloud-hypervisor exited: %s", logTail(m.logPath(), 500))
		default:
		}
		return listening(m.proc.pid, url)
	})
	if err != nil {
		m.abort(ctx)
		return nil, "", fmt.Errorf("cloudhv: starting incoming %s: waiting for %s to listen on %s: %w", spec.ID, m.client.Socket(), url, err)
	}
	m.log.Info("machine waiting for migration", "pid", m.proc.pid, "url", url)
	return m, url, nil
}

// receiverURL turns StartIncoming's listenHost into a receiver URL. For TCP it picks a free port by binding
// port 0 and closing it again; Cloud Hypervisor binds it a moment later (a small race with other programs
// taking ports, which then shows as a failed StartIncoming, not a wrong migration).
func receiverURL(listenHost string) (string, error) {
	if strings.HasPrefix(listenHost, "unix:") {
		if len(listenHost) == len("unix:") {
			return "", errors.New("unix: migration URL without a path")
		}
		return listenHost, nil
	}
	if listenHost == "" {
		return "", errors.New("no listen host for the migration")
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(listenHost, "0"))
	if err != nil {
		return "", fmt.Errorf("finding a free port on %s: %w", listenHost, err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return "tcp:" + net.JoinHostPort(listenHost, strconv.Itoa(port)), nil
}

// launch prepares RunDir, attaches the spec's disks and starts cloud-hypervisor, returning once its API answers.
func (d *Driver) launch(ctx context.Context, spec hypervisor.Spec) (*Machine, error) {
	if err := os.MkdirAll(filepath.Join(spec.RunDir, disksDirName), 0o750); err != nil {
		return nil, fmt.Errorf("creating run directory: %w", err)
	}
	apiSocket := filepath.Join(spec.RunDir, apiSocketName)
	pidFile := filepath.Join(spec.RunDir, pidFileName)
	if pid, err := readPIDFile(pidFile); err == nil && isCloudHypervisor(pid, apiSocket) {
		return nil, fmt.Errorf("cloud-hypervisor %d already runs in %s", pid, spec.RunDir)
	}
	// Leftovers of a machine that died without cleaning up: cloud-hypervisor cannot bind over a stale socket.
	for _, name := range []string{apiSocketName, consoleSocketName, pidFileName} {
		if err := os.Remove(filepath.Join(spec.RunDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing stale %s: %w", name, err)
		}
	}

	m := newMachine(d, spec, apiSocket)
	for _, disk := range spec.Disks {
		if err := m.attachDisk(ctx, disk); err != nil {
			m.detachAll(ctx)
			return nil, err
		}
	}
	proc, err := launch(d.cfg.Binary, []string{"--api-socket", apiSocket}, m.logPath())
	if err != nil {
		m.detachAll(ctx)
		return nil, err
	}
	m.proc = proc
	// The pid file is written before the exit watcher starts, so that a process that exits at once still has
	// its pid file removed by the watcher.
	pidErr := writePIDFile(pidFile, proc.pid)
	go m.watchExit()
	if pidErr != nil {
		m.abort(ctx)
		return nil, pidErr
	}
	var ping PingResponse
	err = waitFor(ctx, 20*time.Millisecond, func() (bool, error) {
		if proc.exited() {
			return false, fmt.Errorf("cloud-hypervisor exited: %v: %s", proc.exitErr, logTail(m.logPath(), 500))
		}
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		var err error
		ping, err = m.client.Ping(pctx)
		return err == nil, nil
	})
	if err != nil {
		m.abort(ctx)
		return nil, fmt.Errorf("waiting for the API on %s: %w", apiSocket, err)
	}
	m.accel = accelerator(ping.Features)
	m.log.Debug("cloud-hypervisor answering", "pid", proc.pid, "version", ping.Version, "features", ping.Features)
	return m, nil
}

// accelerator names what Cloud Hypervisor runs guests on. It uses KVM when built with it and /dev/kvm exists,
// Microsoft's hypervisor (MSHV) otherwise.
func accelerator(features []string) string {
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	switch {
	case slices.Contains(features, "kvm") && exists("/dev/kvm"):
		return "kvm"
	case slices.Contains(features, "mshv") && exists("/dev/mshv"):
		return "mshv"
	}
	return ""
}

// Find reconnects to the machine of spec if its cloud-hypervisor still runs. Disk attachments are not
// recovered: kernel NBD devices set up through the ioctl interface end with the process that set them up.
func (d *Driver) Find(ctx context.Context, spec hypervisor.Spec) (hypervisor.Machine, error) {
	if spec.RunDir == "" {
		return nil, fmt.Errorf("cloudhv: finding %s: spec has no RunDir", spec.ID)
	}
	apiSocket := filepath.Join(spec.RunDir, apiSocketName)
	pidFile := filepath.Join(spec.RunDir, pidFileName)
	pid, err := readPIDFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil, hypervisor.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cloudhv: finding %s: %w", spec.ID, err)
	}
	if !isCloudHypervisor(pid, apiSocket) {
		d.log.Info("removing stale pid file", "machine", spec.ID, "pid", pid)
		os.Remove(pidFile)
		return nil, hypervisor.ErrNotFound
	}
	proc, err := attach(pid)
	if errors.Is(err, os.ErrProcessDone) {
		os.Remove(pidFile)
		return nil, hypervisor.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("cloudhv: finding %s: %w", spec.ID, err)
	}
	// The pid may have been recycled between the check and pidfd_open; check again now that it is pinned.
	if !isCloudHypervisor(pid, apiSocket) {
		proc.release()
		os.Remove(pidFile)
		return nil, hypervisor.ErrNotFound
	}
	m := newMachine(d, spec, apiSocket)
	m.proc = proc
	go m.watchExit()
	ping, err := m.client.Ping(ctx)
	if err != nil {
		m.Close()
		// An incoming migration keeps the API busy until it ends; so can a hung VMM. Either way the machine
		// exists, so this is not ErrNotFound.
		return nil, fmt.Errorf("cloudhv: finding %s: cloud-hypervisor %d runs but its API does not answer: %w", spec.ID, pid, err)
	}
	m.accel = accelerator(ping.Features)
	if len(spec.Disks) > 0 {
		// With KernelNBD they ended with the computed process that attached them.
		m.log.Warn("the found machine's disks were attached by the computed process that started it; this one does not manage them", "pid", pid)
	}
	m.log.Info("machine found", "pid", pid, "version", ping.Version)
	return m, nil
}
