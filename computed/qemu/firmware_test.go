package qemu

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// bootSector is a 512-byte MBR boot sector (the 0x55aa signature goes at 510) that prints "BASALT bios boot
// from disk" on the first serial port and halts. Assembled with GNU as (.code16, linked at 0x7c00) from:
//
//	cli; cld
//	xorw %ax, %ax; movw %ax, %ds
//	movw $msg, %si
//	movw $0x3f8, %dx
//	1: lodsb; testb %al, %al; jz 2f; outb %al, %dx; jmp 1b
//	2: hlt; jmp 2b
//	msg: .asciz "BASALT bios boot from disk\r\n"
var bootSector = []byte{
	0xfa, 0xfc, 0x31, 0xc0, 0x8e, 0xd8, 0xbe, 0x17, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74,
	0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd, 0x42, 0x41, 0x53, 0x41, 0x4c, 0x54, 0x20, 0x62, 0x69,
	0x6f, 0x73, 0x20, 0x62, 0x6f, 0x6f, 0x74, 0x20, 0x66, 0x72, 0x6f, 0x6d, 0x20, 0x64, 0x69, 0x73,
	0x6b, 0x0d, 0x0a, 0x00,
}

// TestFirmware boots through each firmware: SeaBIOS from an NBD disk chosen by boot index, OVMF (UEFI) loading
// the test guest's kernel, and OVMF with Secure Boot enforced (the guest kernel reports it).
func TestFirmware(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel) // not defer: the parallel subtests run after this function returns
	d := newDriver(t)

	t.Run("bios", func(t *testing.T) {
		t.Parallel()
		blank, _ := nbdDisk(t, "blank", 1<<20)
		boot, img := nbdDisk(t, "boot", 1<<20)
		sector := make([]byte, 512)
		copy(sector, bootSector)
		sector[510], sector[511] = 0x55, 0xaa
		f, err := os.OpenFile(img, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(sector, 0); err != nil {
			t.Fatal(err)
		}
		f.Close()
		// The blank disk comes first on the bus; the boot index must make SeaBIOS skip it.
		blank.BootIndex, boot.BootIndex = 2, 1
		spec := hypervisor.Spec{ID: "bios", VCPUs: 1, Memory: 64 * mib, Disks: []hypervisor.Disk{blank, boot},
			Firmware: hypervisor.FirmwareBIOS, RunDir: shortDir(t, "vm")}
		m := start(t, ctx, d, spec)
		con, _ := watch(t, ctx, m)
		if _, _, err := con.Wait(ctx, 0, func(l testguest.Line) bool { return strings.Contains(l.Text, "BASALT bios boot from disk") }); err != nil {
			t.Fatalf("%v\n%s", err, con.Tail(10))
		}
	})

	uefi := func(t *testing.T, fw hypervisor.Firmware, cmdline string, marker string) {
		for _, f := range []string{"OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"} {
			if _, err := os.Stat("/usr/share/OVMF/" + f); err != nil {
				t.Skipf("OVMF not installed (Debian package ovmf): %v", err)
			}
		}
		disk, _ := nbdDisk(t, "root", 16<<20)
		spec := guestSpec(t, "uefi", 256, disk)
		spec.Firmware, spec.Cmdline = fw, cmdline
		m := start(t, ctx, d, spec)
		con, _ := watch(t, ctx, m)
		if marker != "" {
			if _, _, err := con.Wait(ctx, 0, func(l testguest.Line) bool { return strings.Contains(l.Text, marker) }); err != nil {
				t.Fatalf("%v\n%s", err, con.Tail(20))
			}
		}
		if _, err := con.WaitRecord(ctx, 3); err != nil {
			t.Fatalf("guest did not boot through OVMF: %v\n%s", err, con.Tail(20))
		}
		vars, err := os.Stat(runPaths(spec.RunDir).vars)
		if err != nil || vars.Size() == 0 {
			t.Fatalf("per-machine UEFI variable store: %v", err)
		}
	}
	t.Run("uefi", func(t *testing.T) {
		t.Parallel()
		uefi(t, hypervisor.FirmwareUEFI, testGuest(t).Cmdline(), "")
	})
	t.Run("secure boot", func(t *testing.T) {
		t.Parallel()
		// Not quiet: the kernel's own report of Secure Boot is an info message.
		uefi(t, hypervisor.FirmwareUEFISecureBoot, "console=ttyS0 panic=-1", "secureboot: Secure boot enabled")
	})
}

// TestStartErrors checks that bad specs are refused before QEMU runs, that a QEMU that fails at start leaves
// no process behind and says why, and that a run directory in use is not started twice.
func TestStartErrors(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d := newDriver(t)
	disk, _ := nbdDisk(t, "root", 16<<20)
	good := guestSpec(t, "err", 64, disk)

	bad := map[string]func(*hypervisor.Spec){
		"no id":            func(s *hypervisor.Spec) { s.ID = "" },
		"id with comma":    func(s *hypervisor.Spec) { s.ID = "a,b" },
		"relative run dir": func(s *hypervisor.Spec) { s.RunDir = "run" },
		"long run dir":     func(s *hypervisor.Spec) { s.RunDir = "/" + strings.Repeat("x", 100) },
		"no vcpus":         func(s *hypervisor.Spec) { s.VCPUs = 0 },
		"odd memory":       func(s *hypervisor.Spec) { s.Memory = 64*mib + 1 },
		"max below memory": func(s *hypervisor.Spec) { s.MaxMemory = 32 * mib },
		"duplicate disk":   func(s *hypervisor.Spec) { s.Disks = append(s.Disks, s.Disks[0]) },
		"relative socket":  func(s *hypervisor.Spec) { s.Disks = []hypervisor.Disk{{ID: "x", NBDSocket: "s", Export: "v"}} },
		"bad mac":          func(s *hypervisor.Spec) { s.NICs = []hypervisor.NIC{{ID: "n", MAC: "zz", Tap: "t"}} },
		"multicast mac":    func(s *hypervisor.Spec) { s.NICs = []hypervisor.NIC{{ID: "n", MAC: "01:00:5e:00:00:01", Tap: "t"}} },
		"long tap": func(s *hypervisor.Spec) {
			s.NICs = []hypervisor.NIC{{ID: "n", MAC: "52:54:00:00:00:01", Tap: "tap-name-too-long"}}
		},
		"direct, no kernel":  func(s *hypervisor.Spec) { s.Kernel = "" },
		"bios with a kernel": func(s *hypervisor.Spec) { s.Firmware = hypervisor.FirmwareBIOS },
		"unknown firmware":   func(s *hypervisor.Spec) { s.Firmware = 9 },
		"too many devices": func(s *hypervisor.Spec) {
			for i := range 17 {
				s.NICs = append(s.NICs, hypervisor.NIC{ID: "n" + string(rune('a'+i)), MAC: "52:54:00:00:00:01", Tap: "t"})
			}
		},
	}
	for name, mutate := range bad {
		s := good
		s.Disks = append([]hypervisor.Disk(nil), good.Disks...)
		mutate(&s)
		if _, err := d.Start(ctx, s); err == nil {
			t.Errorf("%s: started", name)
		}
	}

	for _, host := range []string{"", "0.0.0.0", "::"} {
		if _, _, err := d.StartIncoming(ctx, good, host); err == nil {
			t.Errorf("incoming migration listening on %q accepted", host)
		}
	}

	// QEMU refuses the disk (no such export): Start fails with QEMU's reason and nothing is left running.
	missing := good
	missing.Disks = []hypervisor.Disk{{ID: "root", NBDSocket: disk.NBDSocket, Export: "no-such-volume"}}
	cleanupMachine(t, nil, missing)
	_, err := d.Start(ctx, missing)
	if err == nil || !strings.Contains(err.Error(), "export") {
		t.Fatalf("start with a missing export: %v", err)
	}
	t.Logf("start with a missing export: %v", err)
	if _, err := d.Find(ctx, missing); err == nil {
		t.Fatal("a failed start left a machine to find")
	}

	m := start(t, ctx, d, good)
	if _, err := d.Start(ctx, good); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second start on a busy run directory: %v", err)
	}
	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	// Kill and Wait on an exited process are fine; QMP calls are not.
	if err := m.Kill(ctx); err != nil {
		t.Fatalf("second Kill: %v", err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Info(ctx); err == nil {
		t.Fatal("Info on a dead machine")
	}
}
