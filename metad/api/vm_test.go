package api_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const mib = 1 << 20

// vmEnv is metad's API on a real etcd with compute hosts as computed publishes them (host records and
// registrations). No computed runs: the tests write the status records a computed would, which is the one
// edge they stand in for (computed/vmhost's tests run the whole loop with QEMU).
type vmEnv struct {
	t   *testing.T
	ctx context.Context
	s   *store.Store
	vms basaltv1.VMServiceClient
}

func newVMEnv(t *testing.T) *vmEnv {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	e := &vmEnv{t: t, ctx: ctx, s: s, vms: basaltv1.NewVMServiceClient(c)}
	for _, v := range []string{"d1", "d2", "d3", "shared"} {
		if _, err := s.Create(ctx, schema.VolumeKey(v), &basaltv1.Volume{Name: v, SizeBytes: 64 * mib, Replicas: 3, SectorSize: 512, Shared: v == "shared"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Create(ctx, schema.NetworkKey("net1"), &basaltv1.Network{Name: "net1", Vni: 10}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, schema.PortKey("net1", "p1"), &basaltv1.Port{Network: "net1", Name: "p1", Mac: "52:54:00:00:00:01", Tap: "bt1"}); err != nil {
		t.Fatal(err)
	}
	return e
}

// host publishes a compute host of memory MiB and registers its node (up until the test ends).
func (e *vmEnv) host(id string, memMiB uint64, netd string) {
	e.t.Helper()
	if _, err := e.s.Put(e.ctx, schema.ComputeHostKey(id), &basaltv1.ComputeHost{Node: id, Hypervisor: "qemu", MemoryBytes: memMiB * mib, NetdNode: netd}); err != nil {
		e.t.Fatal(err)
	}
	reg, err := registry.Register(e.ctx, e.s, &basaltv1.Node{Id: id, Kind: basaltv1.NodeKind_NODE_KIND_COMPUTED, GrpcAddress: "127.0.0.1:1"}, "v", 2*time.Second, slog.Default())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { reg.Close(context.Background()) })
}

// report writes the status a host reports for a VM, having acted on its current declaration.
func (e *vmEnv) report(name, host string, state basaltv1.VMState) {
	e.t.Helper()
	vm, err := store.Get[basaltv1.VM](e.ctx, e.s, schema.VMKey(name))
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.s.Put(e.ctx, schema.VMStatusKey(name), &basaltv1.VMStatus{Name: name, Host: host, State: state, ObservedGeneration: vm.Value.GetGeneration()}); err != nil {
		e.t.Fatal(err)
	}
}

func spec(memMiB uint64, disks ...string) *basaltv1.VMSpec {
	s := &basaltv1.VMSpec{Vcpus: 1, Memory: &basaltv1.VMMemory{StartupBytes: memMiB * mib}, Kernel: "/boot/vmlinuz"}
	for _, d := range disks {
		s.Disks = append(s.Disks, &basaltv1.VMDisk{Volume: d})
	}
	return s
}

func expectCode(t *testing.T, what string, err error, code codes.Code, text string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), text) {
		t.Errorf("%s: got %v; want %s mentioning %q", what, err, code, text)
	}
}

func TestVMSpecValidation(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "")
	for _, c := range []struct {
		what string
		name string
		spec *basaltv1.VMSpec
		code codes.Code
		text string
	}{
		{"bad name", "Bad_Name", spec(64), codes.InvalidArgument, "not allowed"},
		{"no spec", "a", nil, codes.InvalidArgument, "no spec"},
		{"no memory", "a", &basaltv1.VMSpec{Kernel: "/k"}, codes.InvalidArgument, "startup memory 0"},
		{"odd memory", "a", &basaltv1.VMSpec{Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: mib + 1}}, codes.InvalidArgument, "multiple of 1 MiB"},
		{"minimum above startup", "a", &basaltv1.VMSpec{Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib, MinimumBytes: 128 * mib}}, codes.InvalidArgument, "minimum"},
		{"too many vCPUs", "a", &basaltv1.VMSpec{Vcpus: 1000, Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}}, codes.InvalidArgument, "vCPUs"},
		{"a volume twice", "a", spec(64, "d1", "d1"), codes.InvalidArgument, "given twice"},
		{"a missing volume", "a", spec(64, "nope"), codes.NotFound, `volume "nope" does not exist`},
		{"a missing port", "a", &basaltv1.VMSpec{Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}, Nics: []*basaltv1.VMNic{{Network: "net1", Port: "p9"}}}, codes.NotFound, `port "p9"`},
		{"BIOS with a kernel", "a", &basaltv1.VMSpec{Kernel: "/k", Firmware: basaltv1.Firmware_FIRMWARE_BIOS, Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}}, codes.InvalidArgument, "direct kernel boot"},
		{"nothing to boot", "a", &basaltv1.VMSpec{Firmware: basaltv1.Firmware_FIRMWARE_BIOS, Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}, Disks: []*basaltv1.VMDisk{{Volume: "d1"}}}, codes.InvalidArgument, "nothing to boot"},
		{"a relative kernel", "a", &basaltv1.VMSpec{Kernel: "vmlinuz", Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}}, codes.InvalidArgument, "absolute"},
		{"more memory than the host has", "a", spec(2048), codes.FailedPrecondition, "more than any host"},
		{"preferred not possible", "a", &basaltv1.VMSpec{Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib},
			Placement: &basaltv1.VMPlacement{PreferredHosts: []string{"computed-2"}, PossibleHosts: []string{"computed-1"}}}, codes.InvalidArgument, "not one of the possible hosts"},
	} {
		_, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: c.name, Spec: c.spec})
		expectCode(t, c.what, err, c.code, c.text)
	}
	if l, err := e.vms.ListVMs(e.ctx, &basaltv1.ListVMsRequest{}); err != nil || len(l.GetVms()) != 0 {
		t.Fatalf("refused creates left VMs: %v, %v", l, err)
	}

	vm, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "a", Spec: spec(64, "d1", "shared")})
	if err != nil {
		t.Fatal(err)
	}
	m := vm.GetSpec().GetMemory()
	if vm.GetState() != basaltv1.VMState_VM_STATE_STOPPED || m.GetMinimumBytes() != 64*mib || m.GetMaximumBytes() != 64*mib ||
		vm.GetSpec().GetFirmware() != basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL || vm.GetGeneration() != 1 {
		t.Fatalf("created VM: %v", vm)
	}
	_, err = e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "a", Spec: spec(64)})
	expectCode(t, "a VM that exists", err, codes.AlreadyExists, "already exists")
	_, err = e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "b", Spec: spec(64, "d1")})
	expectCode(t, "a volume another VM uses", err, codes.FailedPrecondition, `disk of VM "a"`)
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "b", Spec: spec(64, "shared")}); err != nil {
		t.Fatalf("a shared volume in two VMs: %v", err)
	}
}

func TestVMPlacementNeverOvercommits(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "")
	e.host("computed-2", 512, "")
	// Eight 192 MiB VMs started at once on 1.5 GiB: seven fit (5 + 2), one is refused, whatever the interleaving.
	for i := range 8 {
		if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "vm" + string(rune('0'+i)), Spec: spec(192)}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.vms.StartVM(e.ctx, &basaltv1.StartVMRequest{Name: "vm" + string(rune('0'+i))})
		}()
	}
	wg.Wait()
	refused := 0
	for _, err := range errs {
		if err != nil {
			expectCode(t, "a start with no room", err, codes.FailedPrecondition, "no host can take")
			refused++
		}
	}
	hosts, err := e.vms.ListHosts(e.ctx, &basaltv1.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts.GetHosts() {
		t.Logf("%s: %d MiB committed of %d, VMs %v", h.GetHost().GetNode(), h.GetMemoryCommittedBytes()/mib, h.GetHost().GetMemoryBytes()/mib, h.GetVms())
		if h.GetMemoryCommittedBytes() > h.GetHost().GetMemoryBytes() {
			t.Errorf("%s overcommitted", h.GetHost().GetNode())
		}
	}
	if refused != 1 {
		t.Fatalf("%d starts refused, want 1: %v", refused, errs)
	}
	// Growing a VM's memory needs room too.
	var onTwo string
	for _, h := range hosts.GetHosts() {
		if h.GetHost().GetNode() == "computed-2" && len(h.GetVms()) > 0 {
			onTwo = h.GetVms()[0]
		}
	}
	if onTwo != "" {
		_, err = e.vms.SetVMMemory(e.ctx, &basaltv1.SetVMMemoryRequest{Name: onTwo, TargetBytes: 256 * mib})
		expectCode(t, "growing past the maximum", err, codes.InvalidArgument, "maximum")
	}
}

func TestVMLifecycleDeclarations(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "netd-1")
	e.host("computed-2", 1024, "")
	e.host("computed-3", 128, "netd-3")
	e.host("computed-4", 1024, "netd-1") // shares computed-1's netd
	withNIC := &basaltv1.VMSpec{Kernel: "/k", Memory: &basaltv1.VMMemory{StartupBytes: 256 * mib, MinimumBytes: 128 * mib, MaximumBytes: 512 * mib},
		Disks: []*basaltv1.VMDisk{{Volume: "d1", BootOrder: 1}}, Nics: []*basaltv1.VMNic{{Network: "net1", Port: "p1"}}}
	vm, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "web", Spec: withNIC, Start: true})
	if err != nil {
		t.Fatal(err)
	}
	if vm.GetHost() != "computed-1" || vm.GetState() != basaltv1.VMState_VM_STATE_STARTING {
		t.Fatalf("a VM with a NIC went to %s (state %v); only computed-1 has a netd and room", vm.GetHost(), vm.GetState())
	}
	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: "computed-2"})
	expectCode(t, "a migration of a VM that is not running yet", err, codes.FailedPrecondition, "only a running VM migrates")
	e.report("web", "computed-1", basaltv1.VMState_VM_STATE_RUNNING)

	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: "computed-2"})
	expectCode(t, "a migration to a host that lacks the network", err, codes.FailedPrecondition, "lacks the VM's networks (net1)")
	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: "computed-3"})
	expectCode(t, "a migration to a host without room", err, codes.FailedPrecondition, "offers 128 MiB")
	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "web", TargetHost: "computed-4"})
	expectCode(t, "a migration to a host sharing the source's netd", err, codes.FailedPrecondition, "shares netd netd-1")
	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "web"})
	expectCode(t, "a migration with no possible target", err, codes.FailedPrecondition, "no host can take")
	got, _ := e.vms.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: "web"})
	if got.GetMigration() != nil || got.GetHost() != "computed-1" || got.GetGeneration() != vm.GetGeneration() {
		t.Fatalf("refused migrations changed the VM: %v", got)
	}

	// Without its NIC the VM may go to computed-2; a second request meanwhile is refused.
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "db", Spec: spec(128, "d2"), Start: true}); err != nil {
		t.Fatal(err)
	}
	db, _ := e.vms.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: "db"})
	e.report("db", db.GetHost(), basaltv1.VMState_VM_STATE_RUNNING)
	other := map[string]string{"computed-1": "computed-2", "computed-2": "computed-1"}[db.GetHost()]
	m, err := e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "db", TargetHost: other, Compress: true, BandwidthBytesPerSecond: 100 * mib})
	if err != nil {
		t.Fatal(err)
	}
	if mig := m.GetMigration(); mig.GetSource() != db.GetHost() || mig.GetTarget() != other || !mig.GetCompress() || mig.GetId() == "" {
		t.Fatalf("migration: %v", mig)
	}
	_, err = e.vms.MigrateVM(e.ctx, &basaltv1.MigrateVMRequest{Name: "db", TargetHost: other})
	expectCode(t, "two migrations of one VM at once", err, codes.FailedPrecondition, "already migrating")
	hosts, _ := e.vms.ListHosts(e.ctx, &basaltv1.ListHostsRequest{})
	for _, h := range hosts.GetHosts() {
		if h.GetHost().GetNode() == other && h.GetMemoryCommittedBytes() < 128*mib {
			t.Fatalf("the migration's target does not count the VM: %v", h)
		}
	}
	c, err := e.vms.CancelMigration(e.ctx, &basaltv1.CancelMigrationRequest{Name: "db"})
	if err != nil || !c.GetMigration().GetCancel() {
		t.Fatalf("cancel: %v, %v", c, err)
	}

	// Stop: the host is given the timeout; a second stop may only hurry it; kill forces it.
	s, err := e.vms.StopVM(e.ctx, &basaltv1.StopVMRequest{Name: "web", TimeoutSeconds: 30})
	if err != nil || s.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED || s.GetStop().GetTimeoutSeconds() != 30 || s.GetStop().GetForce() ||
		s.GetState() != basaltv1.VMState_VM_STATE_STOPPING {
		t.Fatalf("stop: %v, %v", s, err)
	}
	k, err := e.vms.KillVM(e.ctx, &basaltv1.KillVMRequest{Name: "web"})
	if err != nil || !k.GetStop().GetForce() || !k.GetStop().GetRequestedAt().AsTime().Equal(s.GetStop().GetRequestedAt().AsTime()) {
		t.Fatalf("kill after stop: %v, %v", k, err)
	}
	_, err = e.vms.DeleteVM(e.ctx, &basaltv1.DeleteVMRequest{Name: "web"})
	expectCode(t, "deleting a VM that still runs", err, codes.FailedPrecondition, "stop it first")
	_, err = e.vms.PauseVM(e.ctx, &basaltv1.PauseVMRequest{Name: "web"})
	expectCode(t, "pausing a stopped VM", err, codes.FailedPrecondition, "start it first")
	e.report("web", "computed-1", basaltv1.VMState_VM_STATE_STOPPED)
	if _, err := e.vms.DeleteVM(e.ctx, &basaltv1.DeleteVMRequest{Name: "web"}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Get[basaltv1.VMStatus](e.ctx, e.s, schema.VMStatusKey("web")); err == nil {
		t.Fatal("the status outlived its VM")
	}
}

func TestDrainHost(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "")
	e.host("computed-2", 300, "")
	for _, name := range []string{"a", "b", "c"} {
		if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: name, Spec: spec(128), Start: true}); err != nil {
			t.Fatal(err)
		}
		e.report(name, "computed-1", basaltv1.VMState_VM_STATE_RUNNING)
	}
	resp, err := e.vms.DrainHost(e.ctx, &basaltv1.DrainHostRequest{Host: "computed-1", Parallel: 1})
	if err != nil {
		t.Fatal(err)
	}
	// computed-2 has room for two of the three.
	if len(resp.GetMoving()) != 2 || len(resp.GetProblems()) != 1 || !strings.Contains(resp.GetProblems()[0], "no host can take") {
		t.Fatalf("drain: %v", resp)
	}
	for _, vm := range resp.GetMoving() {
		if m := vm.GetMigration(); m.GetTarget() != "computed-2" || !m.GetDrain() {
			t.Fatalf("drain migration: %v", m)
		}
	}
	if h := resp.GetHost(); !h.GetMaintenance().GetDraining() || h.GetMaintenance().GetParallel() != 1 || len(h.GetMigrating()) != 2 {
		t.Fatalf("drained host: %v", h)
	}
	_, err = e.vms.StartVM(e.ctx, &basaltv1.StartVMRequest{Name: "a", Host: "computed-2"})
	expectCode(t, "moving a running VM by starting it", err, codes.FailedPrecondition, "already runs")
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "d", Spec: spec(32), Start: true}); err != nil {
		t.Fatal(err)
	}
	d, _ := e.vms.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: "d"})
	if d.GetHost() != "computed-2" {
		t.Fatalf("a new VM was placed on %s, a draining host", d.GetHost())
	}
	if _, err := e.vms.UndrainHost(e.ctx, &basaltv1.UndrainHostRequest{Host: "computed-1"}); err != nil {
		t.Fatal(err)
	}
	_, err = e.vms.DrainHost(e.ctx, &basaltv1.DrainHostRequest{Host: "computed-9"})
	expectCode(t, "draining an unknown host", err, codes.NotFound, "not a computed host")
}
