package vmhost

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

// machineSpec is the driver's spec of a VM on this host. Disks go through the local blockd's NBD socket (sock;
// nil when only finding a machine), the export being the volume with the attachment generation gens gives it
// (basaltv1.AttachedExport); a disk's ID is its volume's name, stable across hosts, so that a migration's two
// ends have the same devices.
func (h *Host) machineSpec(vm *basaltv1.VM, sock *string, nics []hypervisor.NIC, gens map[string]uint64) hypervisor.Spec {
	spec := vm.GetSpec()
	mem := spec.GetMemory()
	s := hypervisor.Spec{
		ID:      vm.GetName(),
		VCPUs:   int(max(spec.GetVcpus(), 1)),
		Memory:  mem.GetStartupBytes(),
		Kernel:  spec.GetKernel(),
		Initrd:  spec.GetInitrd(),
		Cmdline: spec.GetCmdline(),
		RunDir:  h.dir(vm.GetName()),
		NICs:    nics,
		// The guest agent's channel, for VM monitoring (monitor.go). Decided at start: a migration's
		// destination, built from the same declaration, gets the same device.
		Agent: spec.GetMonitoring().GetHeartbeat(),
	}
	if mem.GetMaximumBytes() > mem.GetStartupBytes() {
		s.MaxMemory = mem.GetMaximumBytes()
	}
	switch spec.GetFirmware() {
	case basaltv1.Firmware_FIRMWARE_UEFI:
		s.Firmware = hypervisor.FirmwareUEFI
	case basaltv1.Firmware_FIRMWARE_UEFI_SECURE_BOOT:
		s.Firmware = hypervisor.FirmwareUEFISecureBoot
	case basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL:
		s.Firmware = hypervisor.FirmwareDirectKernel
	case basaltv1.Firmware_FIRMWARE_UNSPECIFIED:
		if spec.GetKernel() != "" {
			s.Firmware = hypervisor.FirmwareDirectKernel
		}
	}
	for _, d := range spec.GetDisks() {
		disk := hypervisor.Disk{ID: d.GetVolume(), Export: basaltv1.AttachedExport(d.GetVolume(), gens[d.GetVolume()]), BootIndex: int(d.GetBootOrder())}
		if sock != nil {
			disk.NBDSocket = *sock
		}
		s.Disks = append(s.Disks, disk)
	}
	return s
}

// plugNICs binds the VM's ports to this host's netd and waits for the taps netd creates for them.
func (h *Host) plugNICs(ctx context.Context, vm *basaltv1.VM) ([]hypervisor.NIC, error) {
	if len(vm.GetSpec().GetNics()) == 0 {
		return nil, nil
	}
	h.mu.Lock()
	netd := h.hostRec.GetNetdNode()
	h.mu.Unlock()
	if netd == "" {
		return nil, errors.New("this host has no netd: it cannot plug the VM's NICs")
	}
	var out []hypervisor.NIC
	for _, n := range vm.GetSpec().GetNics() {
		key := schema.PortKey(n.GetNetwork(), n.GetPort())
		var port *basaltv1.Port
		for {
			rec, err := store.Get[basaltv1.Port](ctx, h.cfg.Store, key)
			if err != nil {
				return nil, fmt.Errorf("port %s/%s: %w", n.GetNetwork(), n.GetPort(), err)
			}
			port = rec.Value
			if port.GetHost() == netd {
				break
			}
			port.Host = netd
			_, err = h.cfg.Store.Update(ctx, key, port, rec.ModRevision)
			if err == nil {
				break
			}
			if !errors.Is(err, store.ErrConflict) {
				return nil, fmt.Errorf("bind port %s/%s to %s: %w", n.GetNetwork(), n.GetPort(), netd, err)
			}
		}
		if err := waitForLink(ctx, port.GetTap(), 30*time.Second); err != nil {
			return nil, fmt.Errorf("port %s/%s: %w", n.GetNetwork(), n.GetPort(), err)
		}
		out = append(out, hypervisor.NIC{ID: n.GetPort(), MAC: port.GetMac(), Tap: port.GetTap()})
	}
	return out, nil
}

// waitForLink waits until netd has created the interface name.
func waitForLink(ctx context.Context, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := net.InterfaceByName(name); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("netd did not create tap %s within %s", name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
