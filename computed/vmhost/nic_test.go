package vmhost

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/qemu"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/netd/agent"
	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/vishvananda/netlink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestLiveMigrationWithNIC migrates a real guest with a NIC between two hosts, each with its own netd, while a
// peer on a third host pings it every 50 ms. The hosts are network namespaces of a netlab; each runs a netd
// agent in-process, and each computed runs QEMU inside its host's namespace (the driver's binary is a wrapper
// that enters it). Everything goes through the API and vmhost: the start binds the port to host A's netd;
// a migration to a computed that shares A's netd is refused with the reason and leaves the guest and its port
// alone; the migration to B prepares the port on B's netd (incoming placement, tap created there), moves it
// at the switchover, and A's netd removes its tap; the guest answers at B, and back at A after a second
// migration. The pings lost around each switchover are counted and logged.
func TestLiveMigrationWithNIC(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a QEMU guest (TCG) in network namespaces: not in -short")
	}
	if err := netlab.Check(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	e.volume("disk0", 64*mib)
	lab, err := netlab.New(fmt.Sprintf("bsvh%d", os.Getpid()%100000), 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})
	// The guests run inside the lab's namespaces: they go before the namespaces do.
	t.Cleanup(func() { killProcessesUsing(e.dir) })
	hA, hB, hC := lab.Hosts[0], lab.Hosts[1], lab.Hosts[2]
	startNetd(t, e, hA, "netd-a")
	startNetd(t, e, hB, "netd-b")
	startNetd(t, e, hC, "netd-c")

	qemuBin, _ := exec.LookPath("qemu-system-x86_64")
	where := map[string]*netlab.Host{"computed-a": hA, "computed-a2": hA, "computed-b": hB}
	netdOf := map[string]string{"computed-a": "netd-a", "computed-a2": "netd-a", "computed-b": "netd-b"}
	e.configure = func(id string, c *Config) {
		h := where[id]
		wrapper := filepath.Join(e.dir, "qemu-"+id)
		script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", h.Name, qemuBin)
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		drv, err := qemu.New(qemu.Config{Binary: wrapper, Accel: "tcg", StateDir: t.TempDir(), Logger: e.log.With("node", id)})
		if err != nil {
			t.Fatal(err)
		}
		c.Driver, c.NetdNode, c.MigrationHost = drv, netdOf[id], h.IP.String()
		c.TapExists = linkChecker(t, h)
	}
	a := e.addHost("computed-a", 1024*mib)
	a2 := e.addHost("computed-a2", 1024*mib)
	b := e.addHost("computed-b", 1024*mib)

	nets := &api.NetworkServer{Store: e.store}
	if _, err := nets.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "vnet", Tenant: "acme", Vni: 500, Subnets: []string{"10.50.0.0/24"}}}); err != nil {
		t.Fatal(err)
	}
	peerMAC, _ := net.ParseMAC("52:54:00:50:00:02")
	peer, err := lab.AddVM(hC, "peer", "tpeer", peerMAC, netip.MustParsePrefix("10.50.0.2/24"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*basaltv1.Port{
		{Network: "vnet", Name: "peer", Mac: peerMAC.String(), Ips: []string{"10.50.0.2"}, Host: "netd-c", Tap: "tpeer"},
		{Network: "vnet", Name: "web", Mac: "52:54:00:50:00:05", Ips: []string{"10.50.0.5"}},
	} {
		if _, err := nets.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: p}); err != nil {
			t.Fatal(err)
		}
	}
	spec := e.agentSpec("disk0", a.id)
	spec.Cmdline = e.guest.Cmdline("basalt.interval=50ms", "basalt.ip=10.50.0.5/24")
	spec.Nics = []*basaltv1.VMNic{{Network: "vnet", Port: "web"}}
	start := time.Now()
	if _, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "web", Spec: spec, Start: true}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("web", "running on a", time.Minute, running)
	v := e.attach("web", &basaltv1.ConsoleInput{SinceStart: true})
	if _, _, err := v.con.Wait(ctx, 0, func(l testguest.Line) bool {
		return strings.Contains(l.Text, "BASALT net") && strings.Contains(l.Text, "dev=eth0") && strings.Contains(l.Text, "state=up")
	}); err != nil {
		t.Fatalf("the guest's eth0 never came up: %v\n%s", err, v.con.Tail(20))
	}
	port := func() *basaltv1.Port {
		t.Helper()
		p, err := nets.GetPort(ctx, &basaltv1.GetPortRequest{Network: "vnet", Name: "web"})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	tap := port().GetTap()
	if p := port(); p.GetHost() != "netd-a" || p.GetIncomingHost() != "" {
		t.Fatalf("after the start the port is on %q (incoming %q); want netd-a", p.GetHost(), p.GetIncomingHost())
	}
	for deadline := time.Now().Add(20 * time.Second); !peer.Ping(ctx, 1, "10.50.0.5"); {
		if time.Now().After(deadline) {
			t.Fatalf("the peer on %s never reached the guest on %s\nconsole:\n%s", hC.Name, hA.Name, v.con.Tail(20))
		}
	}
	t.Logf("guest with a NIC up on %s, reached from the peer %s after the create", a.id, time.Since(start).Round(time.Millisecond))

	t.Run("same netd refused", func(t *testing.T) {
		// metad refuses it up front; prepareIncoming refuses it too, should a host's netd change meanwhile.
		_, err := e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: a2.id})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "shares netd netd-a") {
			t.Fatalf("a migration to a host sharing the netd: %v; want FAILED_PRECONDITION naming the netd", err)
		}
		e.waitVM("web", "running on a", 30*time.Second, func(vm *basaltv1.VM) bool { return vm.GetHost() == a.id && running(vm) })
		if p := port(); p.GetHost() != "netd-a" || p.GetIncomingHost() != "" {
			t.Fatalf("after the refusal the port is on %q (incoming %q); want netd-a, no incoming placement", p.GetHost(), p.GetIncomingHost())
		}
		if !peer.Ping(ctx, 3, "10.50.0.5") {
			t.Fatal("the guest is unreachable after the refused migration")
		}
	})

	migrate := func(from, to *testHost, fromNS, toNS *netlab.Host, toNetd string) {
		t.Helper()
		pings := startPings(t, ctx, peer, "10.50.0.5")
		before := port()
		mstart := time.Now()
		if _, err := e.api.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: to.id}); err != nil {
			t.Fatal(err)
		}
		vm := e.waitVM("web", "migrated to "+to.id, time.Minute, func(vm *basaltv1.VM) bool {
			return vm.GetHost() == to.id && running(vm) && vm.GetStatus().GetHost() == to.id
		})
		took := time.Since(mstart)
		time.Sleep(time.Second) // pings after the switchover
		lost, gap, sent := pings()
		p := port()
		if p.GetHost() != toNetd || p.GetIncomingHost() != "" {
			t.Fatalf("after the migration the port is on %q (incoming %q); want %s", p.GetHost(), p.GetIncomingHost(), toNetd)
		}
		// The ports moved in the pause before the switchover, before the declaration did.
		decl, err := store.Get[basaltv1.VM](ctx, e.store, schema.VMKey("web"))
		if err != nil {
			t.Fatal(err)
		}
		if p.GetRevision() <= before.GetRevision() || p.GetRevision() >= decl.ModRevision {
			t.Fatalf("port written at revision %d, declaration moved at %d (port before: %d); want the port first", p.GetRevision(), decl.ModRevision, before.GetRevision())
		}
		if _, err := toNS.NL.LinkByName(tap); err != nil {
			t.Fatalf("no tap %s on %s after the migration: %v", tap, toNS.Name, err)
		}
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if _, err := fromNS.NL.LinkByName(tap); err != nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still has tap %s after the migration", fromNS.Name, tap)
			}
		}
		if !peer.Ping(ctx, 3, "10.50.0.5") {
			t.Fatalf("the guest is unreachable on %s after the migration", to.id)
		}
		downtime := vm.GetStatus().GetMigration().GetDowntimeMs()
		t.Logf("%s -> %s in %s (QEMU downtime %d ms): %d of %d pings lost (every 50 ms), longest silence %s",
			from.id, to.id, took.Round(time.Millisecond), downtime, lost, sent, gap)
		// A lost ping is 50 ms; the switchover costs QEMU's downtime plus netd's convergence, well under 2 s
		// even on a loaded TCG host.
		if gap > 2*time.Second {
			t.Fatalf("the guest was unreachable for %s around the switchover", gap)
		}
	}
	migrate(a, b, hA, hB, "netd-b")
	migrate(b, a, hB, hA, "netd-a")

	// The guest ran throughout: its counter went on across both migrations.
	last, _ := v.con.LastRecord()
	if _, err := v.con.WaitRecord(ctx, last.Seq+5); err != nil {
		t.Fatalf("the guest's counter stopped after the migrations: %v\n%s", err, v.con.Tail(10))
	}
}

// startNetd runs a netd agent for host h in-process: a data plane on its namespace and an agent following
// the env's etcd. It stops at the end of the test, before the lab's namespaces are deleted.
func startNetd(t *testing.T, e *env, h *netlab.Host, id string) {
	t.Helper()
	log := e.log.With("node", id)
	plane, err := dataplane.New(dataplane.Options{NetNS: h.Handle, GatewayNetNS: h.Name + "-gw", Logger: log, NFTTrust: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(agent.Config{NodeID: id, Store: e.store, Plane: plane, NetNS: h.Handle, UnderlayDev: "eth0", Logger: log})
	if err != nil {
		plane.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		a.Close()
		plane.Close()
	})
}

// linkChecker tells whether an interface exists in h's namespace, for Config.TapExists (the hypervisor runs
// there). It has its own netlink handle: a handle is not safe for concurrent use.
func linkChecker(t *testing.T, h *netlab.Host) func(string) bool {
	nl, err := netlink.NewHandleAt(h.Handle)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	var mu sync.Mutex
	return func(name string) bool {
		mu.Lock()
		defer mu.Unlock()
		_, err := nl.LinkByName(name)
		return err == nil
	}
}

var pingSeq = regexp.MustCompile(`seq=(\d+) `)

// startPings pings dst from vm every 50 ms until the returned function is called, which reports how many
// pings got no answer, the longest run of them as time, and how many were sent.
func startPings(t *testing.T, ctx context.Context, vm *netlab.VM, dst string) func() (lost int, gap time.Duration, sent int) {
	t.Helper()
	cmd := vm.Command(ctx, "busybox", "ping", "-i", "0.05", "-W", "1", dst)
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	return func() (int, time.Duration, int) {
		// busybox ping counts the echo it sent last as lost if it stops before the answer: stop it, then
		// judge only the sequence numbers below the last one answered.
		cmd.Process.Signal(syscall.SIGINT)
		<-exited
		got := map[int]bool{}
		last := -1
		for _, m := range pingSeq.FindAllStringSubmatch(out.String(), -1) {
			n, _ := strconv.Atoi(m[1])
			got[n] = true
			last = max(last, n)
		}
		if last < 0 {
			t.Fatalf("no ping was answered:\n%s", out.String())
		}
		lost, run, longest := 0, 0, 0
		for i := 0; i <= last; i++ {
			if got[i] {
				run = 0
				continue
			}
			lost++
			run++
			longest = max(longest, run)
		}
		return lost, time.Duration(longest) * 50 * time.Millisecond, last + 1
	}
}
