package cloudhv

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctls and constants (include/uapi/linux/kvm.h), x86-64.
const (
	kvmCreateVM              = 0xae01
	kvmSetUserMemoryRegion   = 0x4020ae46
	kvmCreateVCPU            = 0xae41
	kvmGetVCPUMmapSize       = 0xae04
	kvmRun                   = 0xae80
	kvmExitHLT               = 5
	kvmRunExitReasonOffset   = 8
	x86ResetVectorPage       = 0xfffff000
	x86ResetVectorPageOffset = 0xff0
)

type kvmUserspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

func kvmIoctl(fd uintptr, req uintptr, arg uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return r, nil
	}
}

// probeKVM checks that KVM can actually run a guest: it creates a VM whose only memory is the page holding the
// x86 reset vector, puts a HLT there, and runs one vCPU from reset, which must exit with KVM_EXIT_HLT. Nested
// setups where /dev/kvm exists but guests cannot run fail here (or hang, which is why callers run it in a
// child process with a timeout).
func probeKVM() error {
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/kvm: %w", err)
	}
	defer kvm.Close()
	vmfd, err := kvmIoctl(kvm.Fd(), kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer unix.Close(int(vmfd))
	mem, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap guest memory: %w", err)
	}
	defer unix.Munmap(mem)
	mem[x86ResetVectorPageOffset] = 0xf4 // hlt
	region := kvmUserspaceMemoryRegion{
		GuestPhysAddr: x86ResetVectorPage,
		MemorySize:    uint64(len(mem)),
		UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0]))),
	}
	if _, err := kvmIoctl(vmfd, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpufd, err := kvmIoctl(vmfd, kvmCreateVCPU, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpufd))
	size, err := kvmIoctl(kvm.Fd(), kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(int(vcpufd), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer unix.Munmap(run)
	if _, err := kvmIoctl(vcpufd, kvmRun, 0); err != nil {
		return fmt.Errorf("KVM_RUN: %w", err)
	}
	if reason := binary.LittleEndian.Uint32(run[kvmRunExitReasonOffset:]); reason != kvmExitHLT {
		return fmt.Errorf("KVM_RUN exited with reason %d, want KVM_EXIT_HLT (%d)", reason, kvmExitHLT)
	}
	return nil
}
