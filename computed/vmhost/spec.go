package vmhost

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
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

// plugNICs binds the VM's ports to this host's netd and waits for the taps netd creates for them. A VM that
// starts is not migrating: an incoming placement left on a port by a migration that ended without clearing
// it is cleared on the way.
func (h *Host) plugNICs(ctx context.Context, vm *basaltv1.VM) ([]hypervisor.NIC, error) {
	if len(vm.GetSpec().GetNics()) == 0 {
		return nil, nil
	}
	netd := h.netdNode()
	if netd == "" {
		return nil, errors.New("this host has no netd: it cannot plug the VM's NICs")
	}
	var out []hypervisor.NIC
	for _, n := range vm.GetSpec().GetNics() {
		port, err := h.updatePort(ctx, n, func(p *basaltv1.Port) (bool, error) {
			if p.GetHost() == netd && p.GetIncomingHost() == "" {
				return false, nil
			}
			p.Host, p.IncomingHost = netd, ""
			return true, nil
		})
		if err != nil {
			return nil, fmt.Errorf("bind port %s/%s to %s: %w", n.GetNetwork(), n.GetPort(), netd, err)
		}
		if err := h.waitForTap(ctx, port.GetTap(), 30*time.Second); err != nil {
			return nil, fmt.Errorf("port %s/%s: %w", n.GetNetwork(), n.GetPort(), err)
		}
		out = append(out, nicOf(n, port))
	}
	return out, nil
}

// nicOf is the driver's NIC of a VM's port. The ID is the port's name, the same on every host, so that a
// migration's two ends have the same devices.
func nicOf(n *basaltv1.VMNic, p *basaltv1.Port) hypervisor.NIC {
	return hypervisor.NIC{ID: n.GetPort(), MAC: p.GetMac(), Tap: p.GetTap()}
}

// waitForTap waits until netd has created the interface name where the hypervisor opens it.
func (h *Host) waitForTap(ctx context.Context, name string, timeout time.Duration) error {
	exists := h.cfg.TapExists
	if exists == nil {
		exists = func(name string) bool {
			_, err := net.InterfaceByName(name)
			return err == nil
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		if exists(name) {
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
