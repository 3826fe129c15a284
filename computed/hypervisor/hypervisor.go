// Package hypervisor is the seam between computed and the programs that run guests. It defines what a driver
// must do (start a machine from a Spec, find it again after computed restarts, stop, pause, reset, migrate,
// resize and meter it, and reach its guest agent) and nothing about how; the qemu and cloudhv packages implement it. It depends on the standard
// library only, so drivers and computed can both import it.
package hypervisor

import (
	"context"
	"errors"
	"io"
	"time"
)

// Firmware is how a machine boots.
type Firmware int

const (
	// FirmwareBIOS boots from the first bootable disk through SeaBIOS (QEMU) or the hypervisor's default.
	FirmwareBIOS Firmware = iota
	// FirmwareUEFI boots through OVMF.
	FirmwareUEFI
	// FirmwareUEFISecureBoot boots through OVMF with Secure Boot enforced.
	FirmwareUEFISecureBoot
	// FirmwareDirectKernel boots Spec.Kernel with Spec.Initrd and Spec.Cmdline, no firmware.
	FirmwareDirectKernel
)

// Disk is a guest disk reached over NBD.
type Disk struct {
	// ID names the disk inside the machine (stable across migration and hot-plug).
	ID string
	// NBDSocket is the Unix socket of the local blockd's NBD server; Export is the volume name.
	NBDSocket string
	Export    string
	ReadOnly  bool
	// BootIndex orders boot devices; 0 means not bootable.
	BootIndex int
}

// NIC is a guest network interface on a host tap device that netd created.
type NIC struct {
	ID  string
	MAC string
	Tap string
}

// Spec declares a machine. Memory sizes are bytes.
type Spec struct {
	// ID is unique on the host and names the machine's run directory.
	ID     string
	VCPUs  int
	Memory uint64
	// MaxMemory bounds the balloon target; 0 means Memory.
	MaxMemory uint64
	Disks     []Disk
	NICs      []NIC
	Firmware  Firmware
	Kernel    string
	Initrd    string
	Cmdline   string
	// RunDir holds the machine's control sockets, pid file and console log; the driver creates it.
	RunDir string
	// Agent gives the guest a channel to a guest agent, which the guest sees as a port named AgentPort and the
	// host reaches through Machine.Agent. VM monitoring reads the agent's heartbeat from it. It is part of the
	// machine's device layout: a migration's two ends must agree on it.
	Agent bool
}

// AgentPort is the name under which the guest finds its agent channel (a virtio-serial port; Linux lists it in
// /sys/class/virtio-ports/*/name).
const AgentPort = "org.basalt.agent.0"

// State is what a machine is doing.
type State string

const (
	StateRunning   State = "running"
	StatePaused    State = "paused"
	StateMigrating State = "migrating"
	// StateIncoming is a destination process waiting for a migration stream.
	StateIncoming State = "incoming"
	StateShutdown State = "shutdown"
)

// Info is a machine's observed state.
type Info struct {
	State State
	VCPUs int
	// Memory is the guest's configured memory; BalloonActual what the balloon leaves it (0 if no balloon).
	Memory        uint64
	BalloonActual uint64
	// PID of the hypervisor process.
	PID int
	// Accel is the accelerator in use, e.g. "kvm" or "tcg".
	Accel string
	// DiskError, for a machine paused by a disk error (its I/O error policy stopped the guest instead of handing
	// it the error: the volume is full, unreachable or fenced), says which disk and what; empty otherwise.
	DiskError string
}

// DiskStats counts a disk's I/O since the machine started.
type DiskStats struct {
	ReadBytes, WriteBytes, ReadOps, WriteOps uint64
}

// Stats is a machine's meters.
type Stats struct {
	CPUTime       time.Duration
	BalloonActual uint64
	Disks         map[string]DiskStats
}

// MigrateOptions tunes a live migration.
type MigrateOptions struct {
	// Compress turns on the hypervisor's stream compression (QEMU multifd zlib/zstd).
	Compress bool
	// BandwidthBytes limits the stream, in bytes per second; 0 means unlimited.
	BandwidthBytes uint64
	// MaxDowntime is the longest pause the switchover may cause; 0 means the driver's default.
	MaxDowntime time.Duration
	// BeforeSwitchover, if set, is called once, after the guest has stopped on the source for the last time
	// (its disk writes flushed) and before the destination may run it: the moment a disk's attachment
	// generation moves to the destination (docs/fencing.md). An error cancels the migration and the guest
	// runs on here. Only drivers that implement SwitchoverPauser with true honour it; others refuse it.
	BeforeSwitchover func(ctx context.Context) error
}

// SwitchoverPauser is implemented by drivers whose Migrate can stop between the source's last guest
// instruction and the destination's first, and call MigrateOptions.BeforeSwitchover there.
type SwitchoverPauser interface {
	PausesBeforeSwitchover() bool
}

// MigrationStatus is a migration's progress.
type MigrationStatus struct {
	// Status is the hypervisor's word for it: "active", "completed", "failed", "cancelled", ...
	Status           string
	TransferredBytes uint64
	RemainingBytes   uint64
	TotalBytes       uint64
	// Downtime is the measured switchover pause, once completed.
	Downtime time.Duration
}

// ErrNotFound means no machine with that ID runs on this host.
var ErrNotFound = errors.New("machine not found")

// ErrNoAgent means a machine has no agent channel: it was started without Spec.Agent, or its driver cannot
// give it one (the error then also wraps errors.ErrUnsupported).
var ErrNoAgent = errors.New("machine has no agent channel")

// Driver starts and finds machines of one hypervisor.
type Driver interface {
	// Name is the driver's name, e.g. "qemu".
	Name() string
	// Start launches a machine from spec and boots it.
	Start(ctx context.Context, spec Spec) (Machine, error)
	// StartIncoming launches a machine from spec that waits for a live migration instead of booting, and returns
	// the URI the source must send to.
	StartIncoming(ctx context.Context, spec Spec, listenHost string) (Machine, string, error)
	// Find reconnects to a machine that was started before computed restarted; ErrNotFound if it is not running.
	Find(ctx context.Context, spec Spec) (Machine, error)
}

// Machine is one running hypervisor process. Its methods are safe for concurrent use.
type Machine interface {
	ID() string
	Info(ctx context.Context) (Info, error)
	Stats(ctx context.Context) (Stats, error)
	// Shutdown asks the guest to power off (ACPI) and returns without waiting; Wait tells when it has.
	Shutdown(ctx context.Context) error
	// Kill stops the hypervisor process at once.
	Kill(ctx context.Context) error
	// Wait returns when the hypervisor process has exited.
	Wait(ctx context.Context) error
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// SetBalloon sets the memory the guest may use, within (0, MaxMemory].
	SetBalloon(ctx context.Context, bytes uint64) error
	AddDisk(ctx context.Context, d Disk) error
	RemoveDisk(ctx context.Context, id string) error
	AddNIC(ctx context.Context, n NIC) error
	RemoveNIC(ctx context.Context, id string) error
	// Console opens the guest's serial console. There is one such stream per machine; computed multiplexes it
	// to viewers and to the console log.
	Console(ctx context.Context) (io.ReadWriteCloser, error)
	// Agent opens the host end of the guest agent channel (Spec.Agent); ErrNoAgent if the machine has none.
	// Like Console, one stream at a time: a second call fails until the first stream is closed. Nothing the
	// guest sends while no stream is open is kept for the next one.
	Agent(ctx context.Context) (io.ReadWriteCloser, error)
	// Reset is a hard reset of the guest (the reset button: no guest cooperation, memory and devices start
	// over); the hypervisor process, its sockets and open streams stay.
	Reset(ctx context.Context) error
	// Migrate sends the machine's memory and device state to uri (from the destination's StartIncoming) and
	// returns once the migration has completed, failed or been cancelled; progress is called periodically. On
	// success the source machine is left stopped; on failure it keeps running here.
	Migrate(ctx context.Context, uri string, opts MigrateOptions, progress func(MigrationStatus)) (MigrationStatus, error)
	// CancelMigration cancels a migration in flight; the machine keeps running here.
	CancelMigration(ctx context.Context) error
	// Close releases the driver's handles to the machine without stopping it.
	Close() error
}
