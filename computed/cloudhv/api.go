package cloudhv

// Request and response bodies of the Cloud Hypervisor REST API, as declared in the OpenAPI document
// (testdata/cloud-hypervisor-openapi.yaml, a copy of shared/reference/cloud-hypervisor-openapi.yaml). Go names
// follow Go conventions (VMConfig for the schema's VmConfig); JSON names are the schema's. Only the schemas and
// properties the driver uses are declared: unknown properties in responses are ignored by encoding/json, and
// every optional property is omitempty so that Cloud Hypervisor applies its own default.

// PingResponse is the schema VmmPingResponse.
type PingResponse struct {
	BuildVersion string   `json:"build_version,omitempty"`
	Version      string   `json:"version"`
	PID          int64    `json:"pid,omitempty"`
	Features     []string `json:"features,omitempty"`
}

// VMState is the schema VmState.
type VMState string

// The values of VMState.
const (
	VMStateCreated    VMState = "Created"
	VMStateRunning    VMState = "Running"
	VMStateShutdown   VMState = "Shutdown"
	VMStatePaused     VMState = "Paused"
	VMStateBreakPoint VMState = "BreakPoint"
)

// VMInfo is the schema VmInfo (GET /vm.info).
type VMInfo struct {
	Config VMConfig `json:"config"`
	State  VMState  `json:"state"`
	// MemoryActualSize is the guest's memory less what the balloon holds, in bytes.
	MemoryActualSize int64                 `json:"memory_actual_size,omitempty"`
	DeviceTree       map[string]DeviceNode `json:"device_tree,omitempty"`
}

// DeviceNode is the schema DeviceNode. Resources are Rust enums the schema leaves untyped.
type DeviceNode struct {
	ID        string           `json:"id,omitempty"`
	Resources []map[string]any `json:"resources,omitempty"`
	Children  []string         `json:"children,omitempty"`
	PCIBDF    string           `json:"pci_bdf,omitempty"`
}

// VMCounters is the schema VmCounters (GET /vm.counters): device ID -> counter name -> value.
type VMCounters map[string]map[string]int64

// PCIDeviceInfo is the schema PciDeviceInfo, returned when a device is hot-plugged into a booted VM.
type PCIDeviceInfo struct {
	ID  string `json:"id"`
	BDF string `json:"bdf"`
}

// PayloadConfig is the schema PayloadConfig: what the VM boots.
type PayloadConfig struct {
	Firmware  string `json:"firmware,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	Initramfs string `json:"initramfs,omitempty"`
}

// VMConfig is the schema VmConfig (PUT /vm.create).
type VMConfig struct {
	CPUs    *CPUsConfig    `json:"cpus,omitempty"`
	Memory  *MemoryConfig  `json:"memory,omitempty"`
	Payload PayloadConfig  `json:"payload"`
	Disks   []DiskConfig   `json:"disks,omitempty"`
	Net     []NetConfig    `json:"net,omitempty"`
	Balloon *BalloonConfig `json:"balloon,omitempty"`
	Serial  *SerialConfig  `json:"serial,omitempty"`
	Console *ConsoleConfig `json:"console,omitempty"`
}

// CPUsConfig is the schema CpusConfig.
type CPUsConfig struct {
	BootVCPUs int `json:"boot_vcpus"`
	MaxVCPUs  int `json:"max_vcpus"`
}

// MemoryConfig is the schema MemoryConfig. Sizes are bytes.
type MemoryConfig struct {
	Size uint64 `json:"size"`
	// HotplugSize is how much memory may be added at run time (vm.resize desired_ram).
	HotplugSize uint64 `json:"hotplug_size,omitempty"`
	// HotpluggedSize is how much has been added (reported by vm.info for virtio-mem hotplug).
	HotpluggedSize uint64 `json:"hotplugged_size,omitempty"`
	// HotplugMethod is "Acpi" (the default) or "VirtioMem".
	HotplugMethod string             `json:"hotplug_method,omitempty"`
	Shared        bool               `json:"shared,omitempty"`
	Zones         []MemoryZoneConfig `json:"zones,omitempty"`
}

// MemoryZoneConfig is the schema MemoryZoneConfig.
type MemoryZoneConfig struct {
	ID          string `json:"id"`
	Size        uint64 `json:"size"`
	HotplugSize uint64 `json:"hotplug_size,omitempty"`
}

// DiskConfig is the schema DiskConfig. Path is a file or block device; Cloud Hypervisor has no network disk
// type, so Basalt volumes appear here as kernel NBD devices.
type DiskConfig struct {
	ID          string `json:"id,omitempty"`
	Path        string `json:"path,omitempty"`
	ReadOnly    bool   `json:"readonly,omitempty"`
	Direct      bool   `json:"direct,omitempty"`
	VhostUser   bool   `json:"vhost_user,omitempty"`
	VhostSocket string `json:"vhost_socket,omitempty"`
	// Serial is what the guest sees as the virtio-blk serial (/dev/disk/by-id/virtio-<serial>).
	Serial    string `json:"serial,omitempty"`
	ImageType string `json:"image_type,omitempty"`
}

// NetConfig is the schema NetConfig. With Tap set, Cloud Hypervisor opens that existing tap device; IP and
// mask are left unset so it does not configure the host side, which netd owns.
type NetConfig struct {
	ID  string `json:"id,omitempty"`
	Tap string `json:"tap,omitempty"`
	MAC string `json:"mac,omitempty"`
	MTU int    `json:"mtu,omitempty"`
}

// BalloonConfig is the schema BalloonConfig. Size is how much memory the balloon holds, in bytes.
type BalloonConfig struct {
	ID                string `json:"id,omitempty"`
	Size              uint64 `json:"size"`
	DeflateOnOOM      bool   `json:"deflate_on_oom,omitempty"`
	FreePageReporting bool   `json:"free_page_reporting,omitempty"`
}

// ConsoleMode is the schema ConsoleMode.
type ConsoleMode string

// The values of ConsoleMode.
const (
	ConsoleOff    ConsoleMode = "Off"
	ConsolePty    ConsoleMode = "Pty"
	ConsoleTty    ConsoleMode = "Tty"
	ConsoleFile   ConsoleMode = "File"
	ConsoleSocket ConsoleMode = "Socket"
	ConsoleNull   ConsoleMode = "Null"
)

// SerialConfig is the schema SerialConfig (the legacy 16550 serial port, ttyS0 in a Linux guest).
type SerialConfig struct {
	Mode   ConsoleMode `json:"mode"`
	File   string      `json:"file,omitempty"`
	Socket string      `json:"socket,omitempty"`
}

// ConsoleConfig is the schema ConsoleConfig (the virtio-console device, hvc0 in a Linux guest).
type ConsoleConfig struct {
	Mode   ConsoleMode `json:"mode"`
	File   string      `json:"file,omitempty"`
	Socket string      `json:"socket,omitempty"`
}

// VMResize is the schema VmResize (PUT /vm.resize). Nil fields are left as they are; DesiredBalloon is a
// pointer because 0 (deflate completely) is a meaningful value.
type VMResize struct {
	DesiredVCPUs   *int    `json:"desired_vcpus,omitempty"`
	DesiredRAM     *uint64 `json:"desired_ram,omitempty"`
	DesiredBalloon *uint64 `json:"desired_balloon,omitempty"`
}

// VMResizeZone is the schema VmResizeZone.
type VMResizeZone struct {
	ID         string `json:"id"`
	DesiredRAM uint64 `json:"desired_ram"`
}

// VMRemoveDevice is the schema VmRemoveDevice.
type VMRemoveDevice struct {
	ID string `json:"id"`
}

// VMSnapshotConfig is the schema VmSnapshotConfig. DestinationURL is e.g. "file:///var/lib/snap".
type VMSnapshotConfig struct {
	DestinationURL string `json:"destination_url"`
}

// RestoreConfig is the schema RestoreConfig.
type RestoreConfig struct {
	SourceURL         string `json:"source_url"`
	Prefault          bool   `json:"prefault,omitempty"`
	MemoryRestoreMode string `json:"memory_restore_mode,omitempty"`
	Resume            bool   `json:"resume,omitempty"`
}

// ReceiveMigrationData is the schema ReceiveMigrationData. ReceiverURL is "tcp:<host>:<port>" or
// "unix:<path>".
type ReceiveMigrationData struct {
	ReceiverURL string `json:"receiver_url"`
	TLSDir      string `json:"tls_dir,omitempty"`
	MemoryMode  string `json:"memory_mode,omitempty"`
}

// SendMigrationData is the schema SendMigrationData. The API has no compression or bandwidth setting.
type SendMigrationData struct {
	DestinationURL string `json:"destination_url"`
	// Local passes guest memory as file descriptors over a unix: URL (same host, shared memory only).
	Local bool `json:"local,omitempty"`
	// DowntimeMS is the longest switchover pause aimed for; 0 leaves Cloud Hypervisor's default (300 ms).
	DowntimeMS int64 `json:"downtime_ms,omitempty"`
	// TimeoutS bounds the whole migration; 0 leaves the default (3600 s).
	TimeoutS int64 `json:"timeout_s,omitempty"`
	// TimeoutStrategy is "Cancel" (keep the VM running on the source) or "Ignore".
	TimeoutStrategy string `json:"timeout_strategy,omitempty"`
	Connections     int64  `json:"connections,omitempty"`
	TLSDir          string `json:"tls_dir,omitempty"`
	MemoryMode      string `json:"memory_mode,omitempty"`
}
