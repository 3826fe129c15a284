package cloudhv

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// TestDriverResetAndAgent: Reset is vm.reboot, checked against the contract, and the VM goes on running in the
// same process; a Spec that asks for an agent channel still starts (with the virtio console off: Cloud
// Hypervisor, and the fake after it, refuses a console socket), and Agent says why there is none.
func TestDriverResetAndAgent(t *testing.T) {
	d, _ := testDriver(t)
	spec := testSpec(t, "vm-agent")
	spec.Agent = true
	m := startMachine(t, d, spec)
	ctx := testContext(t)

	vi, err := m.Client().Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if vi.Config.Console == nil || vi.Config.Console.Mode != ConsoleOff {
		t.Fatalf("console %+v: the virtio console must stay off", vi.Config.Console)
	}
	_, err = m.Agent(ctx)
	if !errors.Is(err, hypervisor.ErrNoAgent) || !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Agent: %v, want ErrNoAgent and ErrUnsupported", err)
	}

	for n := 1; n <= 2; n++ {
		if err := m.Reset(ctx); err != nil {
			t.Fatalf("Reset %d: %v", n, err)
		}
		b, err := os.ReadFile(filepath.Join(spec.RunDir, "fake-reboot.json"))
		if err != nil || string(b) != strconv.Itoa(n) {
			t.Fatalf("after Reset %d the fake counted %q reboots (%v)", n, b, err)
		}
	}
	info, err := m.Info(ctx)
	if err != nil || info.State != hypervisor.StateRunning || info.PID != m.PID() {
		t.Fatalf("Info after Reset = %+v, %v", info, err)
	}

	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Reset(ctx); err == nil {
		t.Fatal("Reset of a killed machine succeeded")
	}
}
