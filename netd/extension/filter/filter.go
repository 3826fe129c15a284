// Package filter is the extension side of netd's extension point: what a filter program placed in the path
// of a port uses to receive the port's frames and pass them on. netd starts the program with two descriptors
// (docs/netd.md, "Extensions"): the VM side (a packet socket on the VM's tap: read what the VM sent, write to
// deliver to the VM) and the switch side (a queue of the bridge-side tap: read what the switch delivers to the
// VM, write to hand the switch a frame as if the VM had sent it). A frame the filter does not write on is
// dropped. It depends only on the standard library and x/sys.
package filter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Environment variables netd sets for an extension process.
const (
	EnvPort     = "BASALT_PORT"          // "<network>/<port>"
	EnvStateDir = "BASALT_EXT_STATE_DIR" // a directory the extension may write (its own, per port)
	EnvVMFD     = "BASALT_VM_FD"         // descriptor of the VM side
	EnvSwitchFD = "BASALT_SWITCH_FD"     // descriptor of the switch side
)

// Direction of a frame through the port.
type Direction int

const (
	// FromVM frames were sent by the VM, on their way to the switch.
	FromVM Direction = iota
	// ToVM frames come from the switch, on their way to the VM.
	ToVM
)

func (d Direction) String() string {
	if d == FromVM {
		return "from-vm"
	}
	return "to-vm"
}

// Verdict is what a Filter decides for a frame.
type Verdict int

const (
	Pass Verdict = iota
	Drop
)

// Filter sees every frame, in order per direction. The frame may be changed in place (same length); it is
// only valid during the call. Filters for the two directions run on two goroutines.
type Filter func(dir Direction, frame []byte) Verdict

// Port is the extension's end of a port.
type Port struct {
	// Name is "<network>/<port>".
	Name string
	// StateDir is the extension's own directory (for state and reports).
	StateDir string
	vm, sw   *os.File
}

// Open takes the port netd handed to this process.
func Open() (*Port, error) {
	p := &Port{Name: os.Getenv(EnvPort), StateDir: os.Getenv(EnvStateDir)}
	if p.Name == "" {
		return nil, fmt.Errorf("%s is not set: run this program as a netd extension (docs/netd.md)", EnvPort)
	}
	var err error
	if p.vm, err = fdFromEnv(EnvVMFD, "vm"); err != nil {
		return nil, err
	}
	if p.sw, err = fdFromEnv(EnvSwitchFD, "switch"); err != nil {
		return nil, err
	}
	return p, nil
}

func fdFromEnv(name, what string) (*os.File, error) {
	n, err := strconv.Atoi(os.Getenv(name))
	if err != nil || n < 3 {
		return nil, fmt.Errorf("%s=%q: want the descriptor netd passed", name, os.Getenv(name))
	}
	// Non-blocking, so the runtime's poller serves it and Close interrupts a pending read.
	if err := unix.SetNonblock(n, true); err != nil {
		return nil, fmt.Errorf("%s descriptor %d: %w", what, n, err)
	}
	return os.NewFile(uintptr(n), what), nil
}

// Inject sends a frame the extension made itself, in direction dir.
func (p *Port) Inject(dir Direction, frame []byte) error {
	out := p.sw
	if dir == ToVM {
		out = p.vm
	}
	_, err := out.Write(frame)
	return err
}

// Run moves frames through f in both directions until ctx ends or a side fails. A frame that cannot be
// written (the other side is congested or down) is dropped, as a switch would.
func (p *Port) Run(ctx context.Context, f Filter) error {
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for _, d := range []Direction{FromVM, ToVM} {
		in, out := p.vm, p.sw
		if d == ToVM {
			in, out = p.sw, p.vm
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 65536)
			for {
				n, err := in.Read(buf)
				if err != nil {
					errs <- fmt.Errorf("read %s: %w", d, err)
					return
				}
				if n == 0 || f(d, buf[:n]) != Pass {
					continue
				}
				_, _ = out.Write(buf[:n])
			}
		}()
	}
	select {
	case <-ctx.Done():
		// Closing the descriptors ends the blocked reads.
		p.Close()
		wg.Wait()
		return ctx.Err()
	case err := <-errs:
		p.Close()
		wg.Wait()
		return err
	}
}

// Close releases both sides.
func (p *Port) Close() error {
	return errors.Join(p.vm.Close(), p.sw.Close())
}
