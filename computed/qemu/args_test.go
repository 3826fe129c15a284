package qemu

import (
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

func TestBuildArgs(t *testing.T) {
	d := &Driver{cfg: Config{OVMFDir: "/fw"}}
	spec := hypervisor.Spec{
		ID: "vm1", VCPUs: 2, Memory: 512 * mib, MaxMemory: 1024 * mib, Firmware: hypervisor.FirmwareUEFISecureBoot,
		Disks: []hypervisor.Disk{{ID: "root", NBDSocket: "/run/blockd/nbd,1.sock", Export: "vol-a", BootIndex: 1},
			{ID: "data", NBDSocket: "/run/blockd/nbd.sock", Export: "vol-b", ReadOnly: true}},
		NICs:   []hypervisor.NIC{{ID: "eth0", MAC: "52:54:00:00:00:01", Tap: "tap0"}},
		RunDir: "/run/vms/vm,1",
	}
	p := runPaths(spec.RunDir)
	args := buildArgs(spec, p, launchArgs{accel: "tcg", cpu: "max", ports: 4, fw: d.firmwareFor(spec.Firmware), incoming: true})
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-machine q35,pflash0=fw-code,pflash1=fw-vars,smm=on", "-accel tcg", "-cpu max", "-smp 2",
		"-m 1024M", // RAM is sized for MaxMemory; the balloon gives back the rest
		"-chardev socket,id=qmp,path=/run/vms/vm,,1/qmp.sock,server=on,wait=off",
		"-global driver=cfi.pflash01,property=secure,value=on",
		"-incoming defer", "-pidfile /run/vms/vm,1/qemu.pid",
		"spawn=deny",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("args lack %q:\n%s", want, joined)
		}
	}
	// Every JSON option is valid JSON; devices sit on root ports in spec order.
	var devs []map[string]any
	for i, a := range args {
		if strings.HasPrefix(a, "{") {
			var v map[string]any
			if err := json.Unmarshal([]byte(a), &v); err != nil {
				t.Fatalf("%s %s: %v", args[i-1], a, err)
			}
			if args[i-1] == "-device" {
				devs = append(devs, v)
			}
			if v["driver"] == "nbd" && v["export"] == "vol-a" && v["server"].(map[string]any)["path"] != "/run/blockd/nbd,1.sock" {
				t.Errorf("NBD socket path mangled: %v", v)
			}
			if v["driver"] == "nbd" && v["export"] == "vol-b" && v["read-only"] != true {
				t.Errorf("read-only disk writable: %v", v)
			}
		}
	}
	var buses []string
	for _, v := range devs {
		if id, _ := v["id"].(string); strings.HasPrefix(id, "disk-") || strings.HasPrefix(id, "nic-") {
			buses = append(buses, id+"@"+v["bus"].(string))
		}
	}
	if !slices.Equal(buses, []string{"disk-root@port0", "disk-data@port1", "nic-eth0@port2"}) {
		t.Errorf("device placement %v", buses)
	}
	ports := 0
	for _, v := range devs {
		if v["driver"] == "pcie-root-port" {
			ports++
		}
	}
	if ports != 4 {
		t.Errorf("%d root ports, want 4", ports)
	}

	// Plain BIOS has no flash; direct kernel boot passes the kernel.
	bios := buildArgs(hypervisor.Spec{ID: "b", VCPUs: 1, Memory: 64 * mib}, p, launchArgs{accel: "kvm", cpu: "host", ports: 1})
	if j := strings.Join(bios, " "); strings.Contains(j, "pflash") || strings.Contains(j, "-incoming") || strings.Contains(j, "-kernel") {
		t.Errorf("BIOS args: %s", j)
	}
	k := buildArgs(hypervisor.Spec{ID: "k", VCPUs: 1, Memory: 64 * mib, Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0"}, p, launchArgs{accel: "tcg", cpu: "max", ports: 1})
	if j := strings.Join(k, " "); !strings.Contains(j, "-kernel /k -initrd /i -append console=ttyS0") {
		t.Errorf("direct kernel args: %s", j)
	}
}

func TestNames(t *testing.T) {
	if n := nodeName("root"); n != "blk-root" {
		t.Errorf("nodeName(root) = %s", n)
	}
	long := strings.Repeat("x", 40)
	if n := nodeName(long); len(n) > 31 || n == nodeName(long+"y") {
		t.Errorf("nodeName of long ids: %s", n)
	}
	for qdev, want := range map[string]string{
		"/machine/peripheral/disk-root/virtio-backend": "root",
		"disk-a.b": "a.b",
	} {
		if got, ok := diskIDFromQdev(qdev); !ok || got != want {
			t.Errorf("diskIDFromQdev(%s) = %s, %v", qdev, got, ok)
		}
	}
	if _, ok := diskIDFromQdev("/machine/unattached/device[3]"); ok {
		t.Error("non-disk qdev mapped to a disk")
	}
}

func TestParseMigrationURI(t *testing.T) {
	target, params, err := parseMigrationURI("tcp:[::1]:4444#compress=zstd&layout=abc")
	if err != nil || target != "tcp:[::1]:4444" || params.Get("compress") != "zstd" || params.Get("layout") != "abc" {
		t.Fatalf("= %s, %v, %v", target, params, err)
	}
	if target, _, err := parseMigrationURI("tcp:10.0.0.1:4444"); err != nil || target != "tcp:10.0.0.1:4444" {
		t.Fatalf("plain URI: %s, %v", target, err)
	}
	for _, bad := range []string{"unix:/x", "tcp:nohost", "exec:cat"} {
		if _, _, err := parseMigrationURI(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestCPUTicks(t *testing.T) {
	n, err := cpuTicks(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Burning CPU must show in the count within a few ticks.
	x := 0
	for deadline := time.Now().Add(5 * time.Second); ; {
		for i := range 1_000_000 {
			x += i
		}
		n2, err := cpuTicks(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if n2 > n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cpu ticks stuck at %d after 5 s of work (%d)", n, x)
		}
	}
	if _, err := cpuTicks(1 << 30); err == nil {
		t.Error("ticks of a nonexistent pid")
	}
}
