package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// waitDevices waits for an agent "dev" report that satisfies ok.
func waitDevices(ctx context.Context, con *testguest.Console, ok func(testguest.Devices) bool) (testguest.Devices, error) {
	var got testguest.Devices
	_, _, err := con.Wait(ctx, 0, func(l testguest.Line) bool {
		d, isDev := testguest.ParseDevices(l)
		if isDev && ok(d) {
			got = d
			return true
		}
		return false
	})
	return got, err
}

// lastDevices is the newest agent "dev" report.
func lastDevices(con *testguest.Console) testguest.Devices {
	ls := con.Lines()
	for i := len(ls) - 1; i >= 0; i-- {
		if d, ok := testguest.ParseDevices(ls[i]); ok {
			return d
		}
	}
	return testguest.Devices{}
}

// TestHotplug adds and removes a disk (and, as root, a NIC on a tap that is never brought up, so the guest
// reaches no network) while the guest runs, and checks what the guest sees.
func TestHotplug(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := newDriver(t)
	root, img := nbdDisk(t, "root", 64<<20)
	spec := guestSpec(t, "hot", 128, root)
	m := start(t, ctx, d, spec)
	con, _ := watch(t, ctx, m)
	if _, err := con.WaitRecord(ctx, 5); err != nil {
		t.Fatalf("%v\n%s", err, con.Tail(20))
	}

	data, _ := nbdDisk(t, "data", 16<<20)
	data.BootIndex = 0
	start := time.Now()
	if err := m.AddDisk(ctx, data); err != nil {
		t.Fatal(err)
	}
	if _, err := waitDevices(ctx, con, func(d testguest.Devices) bool { return d.Block["vdb"] == 16<<20 }); err != nil {
		t.Fatalf("guest never saw the added disk: %v\n%s", err, con.Tail(10))
	}
	t.Logf("disk added in %s", time.Since(start).Round(time.Millisecond))
	if err := m.AddDisk(ctx, data); err == nil {
		t.Fatal("the same disk was added twice")
	}
	broken := data
	broken.ID, broken.Export = "broken", "no-such-export"
	if err := m.AddDisk(ctx, broken); err == nil {
		t.Fatal("a disk with a missing export was added")
	}
	if mm := m.(*machine); true {
		layout, err := mm.portLayout(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if layout[0] != "disk-root:virtio-blk-pci" || layout[1] != "disk-data:virtio-blk-pci" || layout[2] != "" {
			t.Fatalf("layout after hot-plug: %q", layout)
		}
	}
	// The guest uses the new disk: Stats sees it (the kernel reads its partition table on probe).
	st, err := m.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.Disks["data"]; !ok {
		t.Fatalf("stats of the added disk missing: %+v", st.Disks)
	}

	start = time.Now()
	if err := m.RemoveDisk(ctx, "data"); err != nil {
		t.Fatal(err)
	}
	t.Logf("disk removed in %s", time.Since(start).Round(time.Millisecond))
	if _, err := waitDevices(ctx, con, func(d testguest.Devices) bool { _, ok := d.Block["vdb"]; return !ok }); err != nil {
		t.Fatal(err)
	}
	if err := m.RemoveDisk(ctx, "data"); err == nil {
		t.Fatal("removing a removed disk succeeded")
	}

	t.Run("nic", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to create a tap device")
		}
		tap := fmt.Sprintf("bt%d", os.Getpid()%100000)
		if out, err := exec.Command("ip", "tuntap", "add", "dev", tap, "mode", "tap").CombinedOutput(); err != nil {
			t.Skipf("cannot create a tap: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "tuntap", "del", "dev", tap, "mode", "tap").Run() })
		nic := hypervisor.NIC{ID: "eth", MAC: "52:54:00:12:34:56", Tap: tap}
		start := time.Now()
		if err := m.AddNIC(ctx, nic); err != nil {
			t.Fatal(err)
		}
		if _, err := waitDevices(ctx, con, func(d testguest.Devices) bool {
			for _, mac := range d.Net {
				if mac == nic.MAC {
					return true
				}
			}
			return false
		}); err != nil {
			t.Fatalf("guest never saw the NIC: %v", err)
		}
		t.Logf("nic added in %s", time.Since(start).Round(time.Millisecond))
		if err := m.RemoveNIC(ctx, "eth"); err != nil {
			t.Fatal(err)
		}
		if _, err := waitDevices(ctx, con, func(d testguest.Devices) bool { return len(d.Net) == 0 }); err != nil {
			t.Fatal(err)
		}
	})

	// The counter never stopped through all this.
	recs, err := testguest.Records(con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testguest.CheckContinuity(recs); err != nil {
		t.Fatal(err)
	}
	if dev := lastDevices(con); !strings.HasPrefix(fmt.Sprint(dev.Block), "map[vda:") {
		t.Fatalf("devices at the end: %+v", dev)
	}
	m.Kill(ctx)
	verifyDisk(t, img, recs)
}
