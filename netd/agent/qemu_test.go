package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/internal/nbdtest"
	"github.com/vishvananda/netlink"
)

// A real QEMU guest on a tap that netd created: the guest's port is declared through the API with a tap name
// that does not exist, netd on host A creates it (a persistent TUN/TAP device), and QEMU, run inside host A's
// namespace by the computed/qemu driver, attaches to it by name. The test guest's agent brings eth0 up with
// the port's address (basalt.ip); a namespace VM on host B pings it across hosts over VXLAN. A second guest
// that uses an address its port does not declare is unreachable, and its port's spoofing counter rises.
func TestQEMUGuestOnNetdTap(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU guests (TCG): not in -short")
	}
	for _, bin := range []string{"qemu-system-x86_64", "qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian packages qemu-system-x86, qemu-utils)", bin)
		}
	}
	e := newEnv(t, 2) // skips when not root
	qemuBin, _ := exec.LookPath("qemu-system-x86_64")
	bctx, bcancel := context.WithTimeout(e.ctx, 5*time.Minute)
	g, err := testguest.Build(bctx, testguest.Options{Logger: testLogger(t, slog.LevelInfo)})
	bcancel()
	if err != nil {
		t.Skipf("no test guest: %v", err)
	}

	hA, hB := e.lab.Hosts[0], e.lab.Hosts[1]
	nA, nB := e.start(hA), e.start(hB)
	e.network("qnet", "acme", 300, "10.9.0.0/24")
	peer := e.vm(hB, "qnet", "peer", "52:54:00:09:00:02", "10.9.0.2", nil)
	type guestPort struct{ name, mac, ip, tap, bootIP string }
	good := guestPort{"guest", "52:54:00:09:00:05", "10.9.0.5", "tqguest", "10.9.0.5"}
	rogue := guestPort{"rogue", "52:54:00:09:00:06", "10.9.0.6", "tqrogue", "10.9.0.66"} // boots with an undeclared address
	for _, p := range []guestPort{good, rogue} {
		if _, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{
			Network: "qnet", Name: p.name, Mac: p.mac, Ips: []string{p.ip}, Host: nA.id, Tap: p.tap,
		}}); err != nil {
			t.Fatal(err)
		}
	}
	e.waitPorts(nA, "qnet/guest", "qnet/rogue")
	e.waitPorts(nB, "qnet/peer")
	for _, p := range []guestPort{good, rogue} {
		l, err := hA.NL.LinkByName(p.tap)
		if err != nil {
			t.Fatal(err)
		}
		if tt, ok := l.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TAP {
			t.Fatalf("netd made %s a %s, not a tap", p.tap, l.Type())
		}
	}

	// QEMU runs inside host A's namespace: the driver execs Config.Binary, here a wrapper that enters it. The
	// QMP and console sockets are files, reachable from here whatever the namespace.
	wrapper := filepath.Join(t.TempDir(), "qemu-in-"+hA.Name)
	script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", hA.Name, qemuBin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := qemu.New(qemu.Config{Binary: wrapper, StateDir: t.TempDir(), Accel: "tcg", Logger: testLogger(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	cons := map[string]*testguest.Console{}
	for _, p := range []guestPort{good, rogue} {
		spec := hypervisor.Spec{
			ID: "q" + p.name, VCPUs: 1, Memory: 128 << 20, Firmware: hypervisor.FirmwareDirectKernel,
			Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline("basalt.ip=" + p.bootIP + "/24"),
			RunDir: nbdtest.ShortDir(t, "vm"),
			Disks:  []hypervisor.Disk{qemuNBDDisk(t)},
			NICs:   []hypervisor.NIC{{ID: "eth0", MAC: p.mac, Tap: p.tap}},
		}
		cons[p.name] = startGuest(t, e.ctx, d, spec)
	}

	// Both guests boot at once; each says when its eth0 is up.
	wctx, wcancel := context.WithTimeout(e.ctx, 60*time.Second)
	defer wcancel()
	for _, p := range []guestPort{good, rogue} {
		con := cons[p.name]
		_, l, err := con.Wait(wctx, 0, func(l testguest.Line) bool {
			kind, f, ok := parseAgentLine(l.Text)
			return ok && kind == "net" && f["dev"] == "eth0" && f["state"] == "up"
		})
		if err != nil {
			t.Fatalf("guest %s: eth0 never came up: %v\nconsole:\n%s", p.name, err, con.Tail(30))
		}
		if _, f, _ := parseAgentLine(l.Text); f["addr"] != p.bootIP+"/24" {
			t.Fatalf("guest %s: eth0 up with %s, want %s/24", p.name, f["addr"], p.bootIP)
		}
		// The tap has a carrier now that QEMU holds it: wait until its bridge port forwards.
		fctx, fcancel := context.WithTimeout(e.ctx, 5*time.Second)
		err = hA.WaitForwarding(fctx, p.tap)
		fcancel()
		if err != nil {
			t.Fatal(err)
		}
	}

	// The guest's kernel answers across hosts over VXLAN. The first attempts may race the guest's last steps
	// of boot under TCG; after one reply, three in a row are required.
	deadline := time.Now().Add(15 * time.Second)
	for !peer.Ping(e.ctx, 1, good.ip) {
		if time.Now().After(deadline) {
			neigh, _ := peer.Run(e.ctx, "ip", "neigh")
			t.Fatalf("peer on %s never reached the QEMU guest %s on %s\nneighbours: %s\nguest console:\n%s",
				hB.Name, good.ip, hA.Name, neigh, cons[good.name].Tail(20))
		}
	}
	e.mustPing(peer, good.ip)
	if out, _ := peer.Run(e.ctx, "ip", "neigh", "show", good.ip); !strings.Contains(out, good.mac) {
		t.Fatalf("peer resolved %s to %q; want the guest's MAC %s", good.ip, out, good.mac)
	}
	c, err := e.api.GetPortCounters(e.ctx, &basaltv1.GetPortCountersRequest{Network: "qnet", Name: good.name})
	if err != nil {
		t.Fatal(err)
	}
	if c.GetHost() != nA.id || c.GetFromVm().GetPackets() == 0 || c.GetToVm().GetPackets() == 0 || c.GetSpoofDrops().GetPackets() != 0 {
		t.Fatalf("counters of the guest's port = %v; want traffic both ways on %s and no spoof drops", c, nA.id)
	}
	t.Logf("peer on %s reaches the QEMU guest on %s's netd tap; guest port counters: from VM %d, to VM %d packets",
		hB.Name, hA.Name, c.GetFromVm().GetPackets(), c.GetToVm().GetPackets())

	// The rogue guest answers ARP for 10.9.0.66, an address its port does not declare: the spoofing guard
	// drops the replies at its tap, so the peer cannot reach it, and the port's counter rises.
	spoof := func() uint64 {
		c, err := e.api.GetPortCounters(e.ctx, &basaltv1.GetPortCountersRequest{Network: "qnet", Name: rogue.name})
		if err != nil {
			t.Fatal(err)
		}
		return c.GetSpoofDrops().GetPackets()
	}
	before := spoof()
	e.mustNotPing(peer, rogue.bootIP)
	after := spoof()
	if after <= before {
		t.Fatalf("spoof drops of the rogue guest's port stayed at %d (was %d)", after, before)
	}
	t.Logf("rogue guest (boots with %s, port declares %s) unreachable; spoof drops %d -> %d", rogue.bootIP, rogue.ip, before, after)
}

// parseAgentLine splits an agent console line into its kind and key=value fields.
func parseAgentLine(line string) (string, map[string]string, bool) {
	const prefix = "BASALT "
	i := strings.Index(line, prefix)
	if i < 0 {
		return "", nil, false
	}
	parts := strings.Fields(line[i+len(prefix):])
	if len(parts) == 0 {
		return "", nil, false
	}
	f := map[string]string{}
	for _, p := range parts[1:] {
		if k, v, ok := strings.Cut(p, "="); ok {
			f[k] = v
		}
	}
	return parts[0], f, true
}

// qemuNBDDisk serves a small fresh raw image with qemu-nbd on a Unix socket (export "vol"), as blockd would.
func qemuNBDDisk(t *testing.T) hypervisor.Disk {
	t.Helper()
	sock, _ := nbdtest.Serve(t, nbdtest.ShortDir(t, "nbd"), "vol", 1<<20)
	return hypervisor.Disk{ID: "root", NBDSocket: sock, Export: "vol", BootIndex: 1}
}

// startGuest starts spec, makes sure its QEMU (a session leader: the driver starts it with Setsid) is gone
// when the test ends, before the namespaces are deleted, and collects its console.
func startGuest(t *testing.T, ctx context.Context, d *qemu.Driver, spec hypervisor.Spec) *testguest.Console {
	t.Helper()
	m, err := d.Start(ctx, spec)
	if err != nil {
		if b, rerr := os.ReadFile(filepath.Join(spec.RunDir, "qemu.log")); rerr == nil {
			t.Logf("qemu log:\n%s", b)
		}
		t.Fatal(err)
	}
	info, ierr := m.Info(ctx)
	t.Cleanup(func() {
		kctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		m.Kill(kctx)
		m.Close()
		if ierr == nil && info.PID > 0 {
			// Whatever is left of its session (nothing, normally): only if the pid is still this machine's QEMU.
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", info.PID)); err == nil && strings.Contains(string(b), spec.RunDir) {
				syscall.Kill(-info.PID, syscall.SIGKILL)
			}
		}
	})
	if ierr != nil {
		t.Fatal(ierr)
	}
	c, err := m.Console(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return testguest.WatchConsole(c)
}
