package cloudhv

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// fakeVMM stands in for cloud-hypervisor in the contract tests, because the real binary cannot be obtained or
// run here (it is not packaged in Debian 12, and it needs KVM that can run guests). It is deliberately small:
// it keeps the VM's configuration and a state machine close to Cloud Hypervisor's (vmm/src/lib.rs and the
// status codes the OpenAPI document lists), enough to check that the driver sends the right requests in the
// right order: no VM -> created -> running <-> paused, vm.shutdown back to created (as Cloud Hypervisor does),
// vm.delete back to no VM. It does not emulate a guest. Like Cloud Hypervisor it handles one request at a time
// (a receive-migration blocks every other request until the migration has arrived), it exits after a
// successful send-migration, after vmm.shutdown, and when the "guest" powers off after a power-button press.
//
// Migration between two fakes uses a private one-message protocol (the VM configuration as a JSON line),
// not Cloud Hypervisor's.
type fakeVMM struct {
	// exit is called after the answer to a request that makes Cloud Hypervisor exit.
	exit func()
	// record receives notable request bodies (send-migration) for tests to inspect; may be nil.
	record func(name string, body []byte)

	mu      sync.Mutex // one request at a time, like Cloud Hypervisor's VMM thread
	state   VMState    // "" when no VM is created
	config  VMConfig
	maxRAM  uint64 // size + hotplug_size when the VM was created
	nextBDF int
	serial  net.Listener
	reboots int
}

func newFakeVMM(exit func()) *fakeVMM {
	return &fakeVMM{exit: exit}
}

// fail answers like Cloud Hypervisor does: a status and the error text.
func fail(w http.ResponseWriter, status int, format string, args ...any) {
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(status)
	fmt.Fprintf(w, format, args...)
}

func answerJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	json.NewEncoder(w).Encode(v)
}

func decode(r *http.Request, v any) error {
	return json.NewDecoder(r.Body).Decode(v)
}

func (f *fakeVMM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	op := strings.TrimPrefix(r.URL.Path, "/api/v1/")
	booted := f.state == VMStateRunning || f.state == VMStatePaused
	// Requests on a VM that does not exist: 404, as the document lists for most of them.
	needsVM := map[string]bool{
		"vm.boot": true, "vm.pause": true, "vm.resume": true, "vm.shutdown": true, "vm.reboot": true,
		"vm.power-button": true, "vm.info": true, "vm.resize": true, "vm.resize-zone": true,
		"vm.add-disk": true, "vm.add-net": true, "vm.remove-device": true, "vm.snapshot": true,
	}
	if needsVM[op] && f.state == "" {
		fail(w, http.StatusNotFound, "VmNotCreated")
		return
	}
	switch op {
	case "vmm.ping":
		answerJSON(w, PingResponse{Version: "v53.0-fake", BuildVersion: "fake", PID: int64(os.Getpid()), Features: []string{"kvm"}})
	case "vmm.shutdown":
		f.closeSerial()
		f.state = ""
		w.WriteHeader(http.StatusNoContent)
		f.exit()
	case "vm.create":
		if f.state != "" {
			fail(w, http.StatusInternalServerError, "Error creating VM: VmAlreadyCreated")
			return
		}
		var cfg VMConfig
		if err := decode(r, &cfg); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if cfg.Console != nil && cfg.Console.Mode == ConsoleSocket {
			// The document allows it; Cloud Hypervisor does not (vmm/src/console_devices.rs).
			fail(w, http.StatusInternalServerError, "Error creating VM: CreateConsoleDevices(NoSocketOptionSupportForConsoleDevice)")
			return
		}
		if err := f.openSerial(cfg); err != nil {
			fail(w, http.StatusInternalServerError, "Error creating VM: CreateConsoleDevices: %v", err)
			return
		}
		f.setConfig(cfg, VMStateCreated)
		w.WriteHeader(http.StatusNoContent)
	case "vm.delete":
		f.closeSerial()
		f.state, f.config = "", VMConfig{}
		w.WriteHeader(http.StatusNoContent)
	case "vm.boot":
		if f.state != VMStateCreated {
			fail(w, http.StatusInternalServerError, "Error booting VM: InvalidStateTransition(%s, Running)", f.state)
			return
		}
		for _, d := range f.config.Disks {
			if _, err := os.Stat(d.Path); err != nil {
				fail(w, http.StatusInternalServerError, "Error booting VM: DeviceManager(Disk(Open(%v)))", err)
				return
			}
		}
		f.state = VMStateRunning
		w.WriteHeader(http.StatusNoContent)
	case "vm.pause":
		if f.state != VMStateRunning {
			fail(w, http.StatusMethodNotAllowed, "Error pausing VM: InvalidStateTransition(%s, Paused)", f.state)
			return
		}
		f.state = VMStatePaused
		w.WriteHeader(http.StatusNoContent)
	case "vm.resume":
		if f.state != VMStatePaused {
			fail(w, http.StatusMethodNotAllowed, "Error resuming VM: InvalidStateTransition(%s, Running)", f.state)
			return
		}
		f.state = VMStateRunning
		w.WriteHeader(http.StatusNoContent)
	case "vm.shutdown":
		if !booted {
			fail(w, http.StatusMethodNotAllowed, "Error shutting down VM: VmNotRunning")
			return
		}
		f.state = VMStateCreated
		w.WriteHeader(http.StatusNoContent)
	case "vm.reboot":
		if !booted {
			fail(w, http.StatusMethodNotAllowed, "Error rebooting VM: VmNotRunning")
			return
		}
		f.state = VMStateRunning
		f.reboots++
		if f.record != nil {
			f.record("reboot", fmt.Appendf(nil, "%d", f.reboots))
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.power-button":
		if !booted {
			fail(w, http.StatusMethodNotAllowed, "Error triggering power button: VmNotRunning")
			return
		}
		w.WriteHeader(http.StatusNoContent)
		if f.state == VMStateRunning {
			// The guest acts on the button and powers off; without --no-shutdown the VMM then exits.
			f.closeSerial()
			f.exit()
		}
	case "vm.info":
		answerJSON(w, f.info())
	case "vm.counters":
		if !booted {
			fail(w, http.StatusInternalServerError, "Error getting counters: VmNotRunning")
			return
		}
		c := VMCounters{}
		for i, d := range f.config.Disks {
			c[d.ID] = map[string]int64{"read_bytes": int64(4096 * (i + 1)), "write_bytes": int64(512 * (i + 1)), "read_ops": int64(i + 1), "write_ops": 1}
		}
		for _, n := range f.config.Net {
			c[n.ID] = map[string]int64{"rx_bytes": 100, "tx_bytes": 200, "rx_frames": 1, "tx_frames": 2}
		}
		answerJSON(w, c)
	case "vm.resize":
		var rz VMResize
		if err := decode(r, &rz); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if err := f.resize(rz); err != nil {
			fail(w, http.StatusInternalServerError, "Error resizing VM: %v", err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.resize-zone":
		var rz VMResizeZone
		if err := decode(r, &rz); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		for i, z := range f.config.Memory.Zones {
			if z.ID == rz.ID {
				if rz.DesiredRAM > z.Size+z.HotplugSize {
					fail(w, http.StatusInternalServerError, "Error resizing zone: InvalidResizeAmount")
					return
				}
				f.config.Memory.Zones[i].Size = rz.DesiredRAM
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		fail(w, http.StatusInternalServerError, "Error resizing zone: unknown zone %s", rz.ID)
	case "vm.add-disk":
		var d DiskConfig
		if err := decode(r, &d); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if f.hasDevice(d.ID) {
			fail(w, http.StatusConflict, "Error adding disk: IdentifierNotUnique(%s)", d.ID)
			return
		}
		if booted {
			if _, err := os.Stat(d.Path); err != nil {
				fail(w, http.StatusInternalServerError, "Error adding disk: %v", err)
				return
			}
		}
		f.config.Disks = append(f.config.Disks, d)
		f.answerDevice(w, booted, d.ID)
	case "vm.add-net":
		var n NetConfig
		if err := decode(r, &n); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if f.hasDevice(n.ID) {
			fail(w, http.StatusConflict, "Error adding net: IdentifierNotUnique(%s)", n.ID)
			return
		}
		f.config.Net = append(f.config.Net, n)
		f.answerDevice(w, booted, n.ID)
	case "vm.remove-device":
		var rd VMRemoveDevice
		if err := decode(r, &rd); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if !f.removeDevice(rd.ID) {
			fail(w, http.StatusNotFound, "Error removing device: NoDeviceToRemove(%s)", rd.ID)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.snapshot":
		var s VMSnapshotConfig
		if err := decode(r, &s); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if !booted {
			fail(w, http.StatusMethodNotAllowed, "Error snapshotting VM: VmNotRunning")
			return
		}
		if f.state != VMStatePaused {
			fail(w, http.StatusInternalServerError, "Error snapshotting VM: the VM must be paused")
			return
		}
		dir, err := fileURLPath(s.DestinationURL)
		if err == nil {
			var b []byte
			b, err = json.Marshal(f.config)
			if err == nil {
				err = os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600)
			}
		}
		if err != nil {
			fail(w, http.StatusInternalServerError, "Error snapshotting VM: %v", err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.restore":
		var rc RestoreConfig
		if err := decode(r, &rc); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if f.state != "" {
			fail(w, http.StatusNotFound, "Error restoring VM: VmAlreadyCreated")
			return
		}
		dir, err := fileURLPath(rc.SourceURL)
		var cfg VMConfig
		if err == nil {
			var b []byte
			if b, err = os.ReadFile(filepath.Join(dir, "config.json")); err == nil {
				err = json.Unmarshal(b, &cfg)
			}
		}
		if err != nil {
			fail(w, http.StatusBadRequest, "Error restoring VM: %v", err)
			return
		}
		if err := f.openSerial(cfg); err != nil {
			fail(w, http.StatusInternalServerError, "Error restoring VM: %v", err)
			return
		}
		f.setConfig(cfg, VMStatePaused)
		if rc.Resume {
			f.state = VMStateRunning
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.receive-migration":
		var rm ReceiveMigrationData
		if err := decode(r, &rm); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if f.state != "" {
			fail(w, http.StatusInternalServerError, "Error receiving migration: VmAlreadyCreated")
			return
		}
		cfg, err := receiveFakeMigration(r.Context(), rm.ReceiverURL)
		if err == nil {
			err = f.openSerial(cfg)
		}
		if err != nil {
			fail(w, http.StatusInternalServerError, "Error receiving migration: %v", err)
			return
		}
		f.setConfig(cfg, VMStateRunning)
		w.WriteHeader(http.StatusNoContent)
	case "vm.send-migration":
		body, _ := io.ReadAll(r.Body)
		if f.record != nil {
			f.record("send-migration", body)
		}
		var sm SendMigrationData
		if err := json.Unmarshal(body, &sm); err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		if f.state != VMStateRunning {
			fail(w, http.StatusInternalServerError, "Error sending migration: VM is not in running state: %s", f.state)
			return
		}
		if err := sendFakeMigration(sm.DestinationURL, f.config); err != nil {
			fail(w, http.StatusInternalServerError, "Error sending migration: %v", err)
			return
		}
		f.closeSerial()
		w.WriteHeader(http.StatusNoContent)
		f.exit()
	default:
		fail(w, http.StatusNotFound, "unknown request %s", op)
	}
}

func (f *fakeVMM) setConfig(cfg VMConfig, state VMState) {
	f.config, f.state, f.maxRAM = cfg, state, 0
	if cfg.Memory != nil {
		f.maxRAM = cfg.Memory.Size + cfg.Memory.HotplugSize
	}
}

func (f *fakeVMM) info() VMInfo {
	vi := VMInfo{Config: f.config, State: f.state}
	if f.state == VMStateRunning || f.state == VMStatePaused {
		// Like Cloud Hypervisor, the device tree exists only for a booted VM.
		vi.DeviceTree = map[string]DeviceNode{}
		for _, d := range f.config.Disks {
			vi.DeviceTree[d.ID] = DeviceNode{ID: d.ID, Children: []string{}, PCIBDF: "0000:00:05.0"}
		}
		for _, n := range f.config.Net {
			vi.DeviceTree[n.ID] = DeviceNode{ID: n.ID, Children: []string{}, PCIBDF: "0000:00:06.0"}
		}
	}
	if m := f.config.Memory; m != nil {
		actual := m.Size + m.HotpluggedSize
		if b := f.config.Balloon; b != nil {
			actual -= b.Size
		}
		vi.MemoryActualSize = int64(actual)
	}
	return vi
}

// resize follows Cloud Hypervisor's rules for a booted VM with ACPI memory hotplug: vCPUs up to max_vcpus,
// RAM may grow up to size+hotplug_size but not shrink, the balloon may not exceed the RAM.
func (f *fakeVMM) resize(rz VMResize) error {
	cfg := &f.config
	if rz.DesiredVCPUs != nil {
		if cfg.CPUs == nil || *rz.DesiredVCPUs > cfg.CPUs.MaxVCPUs {
			return errors.New("CpuManager(DesiredVCPUCountExceedsMax)")
		}
		cfg.CPUs.BootVCPUs = *rz.DesiredVCPUs
	}
	if rz.DesiredRAM != nil {
		m := cfg.Memory
		if m == nil {
			return errors.New("no memory configuration")
		}
		switch {
		case *rz.DesiredRAM < m.Size:
			return errors.New("MemoryManager(InvalidResizeAmount): ACPI hotplugged memory cannot be removed")
		case *rz.DesiredRAM > f.maxRAM:
			return errors.New("MemoryManager(InvalidResizeAmount): beyond hotplug_size")
		}
		// With ACPI hotplug Cloud Hypervisor grows memory.size.
		m.Size = *rz.DesiredRAM
	}
	if rz.DesiredBalloon != nil {
		if cfg.Balloon == nil {
			return errors.New("NoBalloon")
		}
		if *rz.DesiredBalloon > cfg.Memory.Size {
			return errors.New("InvalidBalloonSize")
		}
		cfg.Balloon.Size = *rz.DesiredBalloon
	}
	return nil
}

func (f *fakeVMM) hasDevice(id string) bool {
	for _, d := range f.config.Disks {
		if d.ID == id {
			return true
		}
	}
	for _, n := range f.config.Net {
		if n.ID == id {
			return true
		}
	}
	return false
}

func (f *fakeVMM) removeDevice(id string) bool {
	for i, d := range f.config.Disks {
		if d.ID == id {
			f.config.Disks = append(f.config.Disks[:i:i], f.config.Disks[i+1:]...)
			return true
		}
	}
	for i, n := range f.config.Net {
		if n.ID == id {
			f.config.Net = append(f.config.Net[:i:i], f.config.Net[i+1:]...)
			return true
		}
	}
	return false
}

// answerDevice answers a hot-plug with 200 and the PCI address, a cold plug with 204.
func (f *fakeVMM) answerDevice(w http.ResponseWriter, booted bool, id string) {
	if !booted {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	f.nextBDF++
	answerJSON(w, PCIDeviceInfo{ID: id, BDF: fmt.Sprintf("0000:00:%02x.0", 8+f.nextBDF)})
}

// openSerial creates the serial socket, as Cloud Hypervisor does when the VM is created. A connected client
// gets a banner and an echo of what it writes, standing in for a guest's console.
func (f *fakeVMM) openSerial(cfg VMConfig) error {
	f.closeSerial()
	if cfg.Serial == nil || cfg.Serial.Mode != ConsoleSocket {
		return nil
	}
	os.Remove(cfg.Serial.Socket)
	ln, err := net.Listen("unix", cfg.Serial.Socket)
	if err != nil {
		return err
	}
	f.serial = ln
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			// One client at a time, as Cloud Hypervisor's serial socket.
			fmt.Fprintf(conn, "fake-vmm serial console\r\n")
			io.Copy(conn, conn)
			conn.Close()
		}
	}()
	return nil
}

func (f *fakeVMM) closeSerial() {
	if f.serial != nil {
		f.serial.Close()
		f.serial = nil
	}
}

func fileURLPath(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "file" || u.Path == "" {
		return "", fmt.Errorf("%q is not a file:// URL", s)
	}
	return u.Path, nil
}

// migrationAddr splits a migration URL into a network and address for net.Listen/Dial.
func migrationAddr(u string) (string, string, error) {
	if p, ok := strings.CutPrefix(u, "unix:"); ok {
		return "unix", p, nil
	}
	if a, ok := strings.CutPrefix(u, "tcp:"); ok {
		return "tcp", a, nil
	}
	return "", "", fmt.Errorf("unsupported migration URL %q", u)
}

// receiveFakeMigration listens on u and takes one migration. Unlike Cloud Hypervisor it gives up when the
// request is abandoned, so that a failed test does not leave it blocked.
func receiveFakeMigration(ctx context.Context, u string) (VMConfig, error) {
	network, addr, err := migrationAddr(u)
	if err != nil {
		return VMConfig{}, err
	}
	if network == "unix" {
		os.Remove(addr)
		defer os.Remove(addr)
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return VMConfig{}, err
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	// Cloud Hypervisor accepts exactly one connection for the migration.
	conn, err := ln.Accept()
	if err != nil {
		return VMConfig{}, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return VMConfig{}, fmt.Errorf("reading migration stream: %w", err)
	}
	var cfg VMConfig
	if err := json.Unmarshal(line, &cfg); err != nil {
		return VMConfig{}, fmt.Errorf("decoding migration stream: %w", err)
	}
	if _, err := io.WriteString(conn, "ok\n"); err != nil {
		return VMConfig{}, err
	}
	return cfg, nil
}

func sendFakeMigration(u string, cfg VMConfig) error {
	network, addr, err := migrationAddr(u)
	if err != nil {
		return err
	}
	conn, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	b, _ := json.Marshal(cfg)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return err
	}
	ack, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("waiting for the destination: %w", err)
	}
	if ack != "ok\n" {
		return fmt.Errorf("destination answered %q", ack)
	}
	return nil
}
