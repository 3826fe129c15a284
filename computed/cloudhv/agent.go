package cloudhv

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// ErrAgentUnsupported is what Agent returns: Cloud Hypervisor has no channel a guest agent could use. Its only
// virtio-serial device is the virtio console (one unnamed port, hvc0), which cannot be a socket: the OpenAPI
// document lists "Socket" among the ConsoleConfig modes, but Cloud Hypervisor refuses it for the console
// (NoSocketOptionSupportForConsoleDevice, vmm/src/console_devices.rs; only the serial port takes a socket, and
// that is the guest's console). A machine whose Spec asks for an agent therefore starts without one, and VM
// monitoring reports that it cannot hear the guest.
var ErrAgentUnsupported = fmt.Errorf("cloudhv: no guest agent channel: Cloud Hypervisor's virtio console cannot be a socket and it has no named virtio-serial ports: %w (%w)",
	hypervisor.ErrNoAgent, errors.ErrUnsupported)

// Agent always fails with ErrAgentUnsupported.
func (m *Machine) Agent(ctx context.Context) (io.ReadWriteCloser, error) {
	return nil, ErrAgentUnsupported
}

// Reset is vm.reboot: Cloud Hypervisor tears the VM's devices down and boots it again from its configuration
// without asking the guest, in the same process. The API socket stays; the console devices are recreated, so
// a console client may have to reconnect.
func (m *Machine) Reset(ctx context.Context) error {
	return m.call(ctx, "resetting", m.client.RebootVM)
}
