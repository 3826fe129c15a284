package qemu

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// paths are a machine's files in its run directory.
type paths struct {
	dir, qmp, console, agent, pid, log, vars string
}

func runPaths(dir string) paths {
	return paths{
		dir:     dir,
		qmp:     filepath.Join(dir, "qmp.sock"),
		console: filepath.Join(dir, "console.sock"),
		agent:   filepath.Join(dir, "agent.sock"),
		pid:     filepath.Join(dir, "qemu.pid"),
		log:     filepath.Join(dir, "qemu.log"),
		vars:    filepath.Join(dir, "OVMF_VARS.fd"),
	}
}

// maxSocketPath is the longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
const maxSocketPath = 107

// maxPorts bounds the PCIe root ports: they sit on pcie.0 slots portSlot.. as multifunction groups of eight,
// and each takes a bus number.
const maxPorts = 64

// portSlot is the first pcie.0 slot holding root ports; slots below are left to QEMU's automatic placement of
// the fixed devices (balloon), so adding one of those never moves a port.
const portSlot = 0x08

func validID(kind, id string) error {
	if id == "" || len(id) > 64 {
		return fmt.Errorf("%s id %q: must be 1 to 64 characters", kind, id)
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("%s id %q: only letters, digits, '-', '_' and '.' are allowed", kind, id)
		}
	}
	return nil
}

const mib = 1 << 20

func validateSpec(s hypervisor.Spec) error {
	if err := validID("machine", s.ID); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	if !filepath.IsAbs(s.RunDir) {
		return fmt.Errorf("qemu: machine %s: RunDir %q must be an absolute path", s.ID, s.RunDir)
	}
	for _, p := range []string{runPaths(s.RunDir).qmp, runPaths(s.RunDir).console} {
		if len(p) > maxSocketPath {
			return fmt.Errorf("qemu: machine %s: socket path %s is longer than %d bytes", s.ID, p, maxSocketPath)
		}
	}
	return nil
}

func validateLaunch(s hypervisor.Spec, ports int) error {
	if err := validateSpec(s); err != nil {
		return err
	}
	if s.VCPUs < 1 || s.VCPUs > 255 {
		return fmt.Errorf("qemu: machine %s: %d vCPUs (1..255)", s.ID, s.VCPUs)
	}
	if s.Memory == 0 || s.Memory%mib != 0 {
		return fmt.Errorf("qemu: machine %s: memory %d must be a positive multiple of 1 MiB", s.ID, s.Memory)
	}
	if s.MaxMemory != 0 && (s.MaxMemory < s.Memory || s.MaxMemory%mib != 0) {
		return fmt.Errorf("qemu: machine %s: MaxMemory %d must be a multiple of 1 MiB and at least Memory %d", s.ID, s.MaxMemory, s.Memory)
	}
	seen := map[string]bool{}
	for _, d := range s.Disks {
		if err := validateDisk(d); err != nil {
			return fmt.Errorf("qemu: machine %s: %w", s.ID, err)
		}
		if seen["d"+d.ID] {
			return fmt.Errorf("qemu: machine %s: two disks with id %q", s.ID, d.ID)
		}
		seen["d"+d.ID] = true
	}
	for _, n := range s.NICs {
		if err := validateNIC(n); err != nil {
			return fmt.Errorf("qemu: machine %s: %w", s.ID, err)
		}
		if seen["n"+n.ID] {
			return fmt.Errorf("qemu: machine %s: two NICs with id %q", s.ID, n.ID)
		}
		seen["n"+n.ID] = true
	}
	if len(s.Disks)+len(s.NICs) > ports {
		return fmt.Errorf("qemu: machine %s: %d disks and NICs, but only %d PCIe ports (Config.HotplugPorts)", s.ID, len(s.Disks)+len(s.NICs), ports)
	}
	switch s.Firmware {
	case hypervisor.FirmwareDirectKernel:
		if s.Kernel == "" {
			return fmt.Errorf("qemu: machine %s: direct kernel boot without a kernel", s.ID)
		}
	case hypervisor.FirmwareUEFI, hypervisor.FirmwareUEFISecureBoot:
		// OVMF boots Kernel itself when one is given (UEFI direct boot), else the disks.
	case hypervisor.FirmwareBIOS:
		if s.Kernel != "" {
			return fmt.Errorf("qemu: machine %s: a kernel with BIOS firmware; use FirmwareDirectKernel", s.ID)
		}
	default:
		return fmt.Errorf("qemu: machine %s: unknown firmware %d", s.ID, s.Firmware)
	}
	if s.Kernel == "" && (s.Initrd != "" || s.Cmdline != "") {
		return fmt.Errorf("qemu: machine %s: initrd or command line without a kernel", s.ID)
	}
	return nil
}

func validateDisk(d hypervisor.Disk) error {
	if err := validID("disk", d.ID); err != nil {
		return err
	}
	if !filepath.IsAbs(d.NBDSocket) || d.Export == "" {
		return fmt.Errorf("disk %s: needs an absolute NBD socket path and an export name", d.ID)
	}
	if d.BootIndex < 0 {
		return fmt.Errorf("disk %s: negative boot index", d.ID)
	}
	return nil
}

func validateNIC(n hypervisor.NIC) error {
	if err := validID("nic", n.ID); err != nil {
		return err
	}
	mac, err := net.ParseMAC(n.MAC)
	if err != nil || len(mac) != 6 {
		return fmt.Errorf("nic %s: MAC %q is not a 6-byte MAC address", n.ID, n.MAC)
	}
	if mac[0]&1 != 0 {
		return fmt.Errorf("nic %s: MAC %s is a multicast address", n.ID, n.MAC)
	}
	if n.Tap == "" || len(n.Tap) > 15 || strings.ContainsAny(n.Tap, "/ \t") {
		return fmt.Errorf("nic %s: tap name %q is not a valid interface name", n.ID, n.Tap)
	}
	return nil
}

// QEMU ids. Prefixes keep disks, NICs and the driver's own devices apart whatever ids computed chooses.
func diskDevID(id string) string { return "disk-" + id }
func nicDevID(id string) string  { return "nic-" + id }
func netdevID(id string) string  { return "net-" + id }
func portID(i int) string        { return fmt.Sprintf("port%d", i) }

// The agent channel's QEMU ids: its chardev, the virtio-serial controller and the port on it.
const (
	agentChardevID = "agent0"
	agentBusID     = "agent-serial"
	agentDevID     = "agent0"
)

// nodeName is the block node of a disk. Node names are limited to 31 characters, so long ids are hashed.
func nodeName(id string) string {
	if n := "blk-" + id; len(n) <= 31 {
		return n
	}
	h := sha256.Sum256([]byte(id))
	return "blk-" + hex.EncodeToString(h[:12])
}

// opt escapes a value for QEMU's key=value,key=value option syntax, where a comma is written twice.
func opt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// jsonArg renders a device or backend description as QEMU's JSON option syntax, which needs no escaping and
// is the same object QMP's device_add and blockdev-add take, so cold-plug and hot-plug cannot drift apart.
func jsonArg(v map[string]any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // maps of strings, numbers and bools always marshal
	}
	return string(b)
}

// diskBackend is the NBD block node for d. The settings suit a replicated network disk:
//   - cache.no-flush=false: the guest's flushes reach blockd as NBD_CMD_FLUSH; they are what makes its writes
//     durable on every replica, so they must never be dropped.
//   - cache.direct is left off: it means O_DIRECT on a host file and has no meaning for NBD, where QEMU keeps
//     no cache of its own.
//   - discard=unmap passes the guest's TRIM to blockd as NBD_CMD_TRIM, so thin volumes give space back.
//   - detect-zeroes=unmap turns writes of zeroes into NBD_CMD_WRITE_ZEROES (with trim allowed): one small
//     request instead of the data, sent to every replica, for what mkfs and zeroing tools write.
//   - reconnect-delay: if the local blockd restarts (upgrade, crash), QEMU reconnects and holds requests for
//     this long instead of failing them; only after that do they fail (and the device's error policy stops
//     the guest, see diskDevice).
//
// open-timeout (retry the first connection) is deliberately not set: QEMU retries for that long even when the
// export does not exist, and a hot-plug's blockdev-add holds QEMU's main loop (QMP, the console) meanwhile.
// A start that fails because blockd is not up yet fails at once, and computed retries.
func diskBackend(d hypervisor.Disk) map[string]any {
	return map[string]any{
		"driver":          "nbd",
		"node-name":       nodeName(d.ID),
		"server":          map[string]any{"type": "unix", "path": d.NBDSocket},
		"export":          d.Export,
		"reconnect-delay": 15,
		"cache":           map[string]any{"direct": false, "no-flush": false},
		"discard":         "unmap",
		"detect-zeroes":   "unmap",
		"read-only":       d.ReadOnly,
	}
}

// diskDevice is the virtio-blk device for d on root port port. The guest sees a volatile write cache
// (write-cache=on) so that it sends flushes, and QEMU does not have to emulate write-through with a flush
// after every write, one network round trip each. On an I/O error the guest is paused (werror/rerror=stop)
// rather than handed an error its filesystem would turn read-only over: errors from a replicated store are
// transient (a failover, a reconnect), and a paused guest resumes where it stopped.
func diskDevice(d hypervisor.Disk, port int) map[string]any {
	dev := map[string]any{
		"driver":      "virtio-blk-pci",
		"id":          diskDevID(d.ID),
		"drive":       nodeName(d.ID),
		"bus":         portID(port),
		"write-cache": "on",
		"werror":      "stop",
		"rerror":      "stop",
	}
	if d.BootIndex > 0 {
		dev["bootindex"] = d.BootIndex
	}
	return dev
}

// nicBackend is the tap netdev of n. netd created the tap; QEMU must neither run scripts (it may not, under
// its sandbox) nor create one of its own. vhost-net needs KVM's ioeventfds, so it is used with KVM only.
func nicBackend(n hypervisor.NIC, vhost bool) map[string]any {
	return map[string]any{
		"type":       "tap",
		"id":         netdevID(n.ID),
		"ifname":     n.Tap,
		"script":     "no",
		"downscript": "no",
		"vhost":      vhost,
	}
}

// nicDevice is the virtio-net device of n. romfile="" leaves out the iPXE option ROM: guests boot from disks,
// and a ROM's size would be one more thing a migration's two ends must agree on.
func nicDevice(n hypervisor.NIC, port int) map[string]any {
	return map[string]any{
		"driver":  "virtio-net-pci",
		"id":      nicDevID(n.ID),
		"netdev":  netdevID(n.ID),
		"mac":     n.MAC,
		"bus":     portID(port),
		"romfile": "",
	}
}

// firmware is what a spec boots with.
type firmware struct {
	code, varsTemplate string // OVMF images; empty for SeaBIOS
	secure             bool
}

func (d *Driver) firmwareFor(f hypervisor.Firmware) firmware {
	switch f {
	case hypervisor.FirmwareUEFI:
		return firmware{code: filepath.Join(d.cfg.OVMFDir, "OVMF_CODE_4M.fd"), varsTemplate: filepath.Join(d.cfg.OVMFDir, "OVMF_VARS_4M.fd")}
	case hypervisor.FirmwareUEFISecureBoot:
		// The Secure Boot build (SMM-protected variable store) with Microsoft's keys enrolled, so that the
		// shim-signed boot chains of the common distributions boot and anything unsigned does not.
		return firmware{code: filepath.Join(d.cfg.OVMFDir, "OVMF_CODE_4M.secboot.fd"),
			varsTemplate: filepath.Join(d.cfg.OVMFDir, "OVMF_VARS_4M.ms.fd"), secure: true}
	}
	return firmware{}
}

// launchArgs are the settings of one QEMU process besides its spec.
type launchArgs struct {
	accel, cpu string
	ports      int
	fw         firmware
	incoming   bool
	vhost      bool
}

// buildArgs is QEMU's command line for spec.
func buildArgs(s hypervisor.Spec, p paths, a launchArgs) []string {
	machine := "q35"
	if a.fw.code != "" {
		machine += ",pflash0=fw-code,pflash1=fw-vars"
	}
	if a.fw.secure {
		// OVMF's Secure Boot build keeps its variable store behind SMM; without it, the guest could rewrite
		// the keys from the OS.
		machine += ",smm=on"
	}
	args := []string{
		"-name", "guest=" + opt(s.ID) + ",debug-threads=on",
		"-machine", machine,
		"-accel", a.accel,
		"-cpu", a.cpu,
		"-smp", fmt.Sprint(s.VCPUs),
		"-m", fmt.Sprintf("%dM", maxMemory(s)/mib),
		"-nodefaults", "-no-user-config", "-display", "none",
		// The sandbox keeps a compromised QEMU from spawning processes or gaining privileges; nothing the
		// driver uses needs either (taps are opened by name, no scripts).
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-msg", "timestamp=on",
		"-pidfile", p.pid,
		"-chardev", "socket,id=qmp,path=" + opt(p.qmp) + ",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		// The serial console is a socket computed connects to; with nobody connected, output is dropped
		// rather than blocking the guest.
		"-chardev", "socket,id=serial0,path=" + opt(p.console) + ",server=on,wait=off",
		"-serial", "chardev:serial0",
		// S3/S4 would look like a hung guest to computed; a VM is powered off, not suspended.
		"-global", "ICH9-LPC.disable_s3=1", "-global", "ICH9-LPC.disable_s4=1",
		"-device", jsonArg(map[string]any{"driver": "virtio-balloon-pci", "id": "balloon0", "bus": "pcie.0"}),
	}
	if s.Agent {
		args = append(args, agentArgs(p)...)
	}
	if a.fw.code != "" {
		args = append(args,
			"-blockdev", jsonArg(map[string]any{"driver": "file", "node-name": "fw-code", "filename": a.fw.code, "read-only": true}),
			"-blockdev", jsonArg(map[string]any{"driver": "file", "node-name": "fw-vars", "filename": p.vars}))
	}
	if a.fw.secure {
		args = append(args, "-global", "driver=cfi.pflash01,property=secure,value=on")
	}
	if s.Kernel != "" {
		args = append(args, "-kernel", s.Kernel)
		if s.Initrd != "" {
			args = append(args, "-initrd", s.Initrd)
		}
		if s.Cmdline != "" {
			args = append(args, "-append", s.Cmdline)
		}
	}
	// Root ports in groups of eight functions per slot. Every machine has the same number, whatever its
	// devices, so that a migration's destination has the same PCI layout as its source.
	for i := 0; i < a.ports; i++ {
		slot, fn := portSlot+i/8, i%8
		args = append(args, "-device", jsonArg(map[string]any{
			"driver": "pcie-root-port", "id": portID(i), "bus": "pcie.0",
			"addr": fmt.Sprintf("0x%x.0x%x", slot, fn), "multifunction": fn == 0,
			"chassis": i + 1, "port": i + 1,
			// Devices behind the ports are modern-only virtio and need no I/O space; reserving the default 4 KiB
			// per port would run the 64 KiB I/O space out after a dozen ports.
			"io-reserve": 0,
		}))
	}
	port := 0
	for _, d := range s.Disks {
		args = append(args, "-blockdev", jsonArg(diskBackend(d)), "-device", jsonArg(diskDevice(d, port)))
		port++
	}
	for _, n := range s.NICs {
		args = append(args, "-netdev", jsonArg(nicBackend(n, a.vhost)), "-device", jsonArg(nicDevice(n, port)))
		port++
	}
	if a.incoming {
		args = append(args, "-incoming", "defer")
	}
	return args
}

// agentArgs give the guest its agent channel: a virtio-serial controller with one port named
// hypervisor.AgentPort, on a socket computed connects to like the console's (server, no wait: with nobody
// connected QEMU tells the guest the host end is closed, and the guest's writes fail instead of piling up).
// The controller is a fixed device on pcie.0, placed automatically below portSlot after the balloon, so the
// root ports and what sits on them are where they are without it; the layout digest lists it (see
// portLayout), so a migration between a machine with and one without the channel is refused up front.
func agentArgs(p paths) []string {
	return []string{
		"-chardev", "socket,id=" + agentChardevID + ",path=" + opt(p.agent) + ",server=on,wait=off",
		"-device", jsonArg(map[string]any{"driver": "virtio-serial-pci", "id": agentBusID, "bus": "pcie.0",
			"max_ports": 2}), // port 0 is reserved for a virtconsole; ours is port 1
		"-device", jsonArg(map[string]any{"driver": "virtserialport", "id": agentDevID, "bus": agentBusID + ".0",
			"chardev": agentChardevID, "name": hypervisor.AgentPort}),
	}
}

// maxMemory is the guest's RAM as QEMU sizes it: the balloon can only take memory back from it.
func maxMemory(s hypervisor.Spec) uint64 {
	if s.MaxMemory > 0 {
		return s.MaxMemory
	}
	return s.Memory
}

// prepareFirmware gives the machine its own UEFI variable store, copied from the template on first start and
// kept afterwards (it holds boot entries and, with Secure Boot, the enrolled keys).
func prepareFirmware(fw firmware, p paths) error {
	if fw.code == "" {
		return nil
	}
	if _, err := os.Stat(fw.code); err != nil {
		return fmt.Errorf("UEFI firmware: %w (install Debian's ovmf)", err)
	}
	if _, err := os.Stat(p.vars); err == nil {
		return nil
	}
	b, err := os.ReadFile(fw.varsTemplate)
	if err != nil {
		return fmt.Errorf("UEFI variable store template: %w", err)
	}
	tmp := p.vars + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("UEFI variable store: %w", err)
	}
	return os.Rename(tmp, p.vars)
}
