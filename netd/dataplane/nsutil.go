package dataplane

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inNS runs fn on a locked OS thread switched into ns. If the thread cannot be switched
// back it stays locked, so the Go runtime discards it when the goroutine ends.
func inNS(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(ferr, fmt.Errorf("restore netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// dupNS duplicates a namespace handle so the plane owns its own descriptor.
func dupNS(ns netns.NsHandle) (netns.NsHandle, error) {
	fd, err := unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return netns.None(), fmt.Errorf("dup netns handle: %w", err)
	}
	return netns.NsHandle(fd), nil
}

// createTap creates a persistent, single-queue tap named name inside ns. The tun
// device is opened inside ns (a tun device lives in the namespace of the process
// that opened /dev/net/tun); the ioctls then work from any namespace. A hypervisor
// attaches later with TUNSETIFF on the same name (IFF_TAP|IFF_NO_PI[|IFF_VNET_HDR]).
func createTap(ns netns.NsHandle, name string) error {
	var fd int
	if err := inNS(ns, func() error {
		var err error
		fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		return err
	}); err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("TUNSETPERSIST %s: %w", name, err)
	}
	return nil
}

// newNamedNS creates a network namespace bind-mounted at /run/netns/<name> (iproute2's convention, so
// operators can enter it with ip netns exec) and returns a handle to it. The calling goroutine's thread
// returns to its namespace; if it cannot, it stays locked and the runtime discards it.
func newNamedNS(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		return netns.None(), err
	}
	if err := netns.Set(orig); err != nil {
		ns.Close()
		return netns.None(), fmt.Errorf("return from the new namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return ns, nil
}
