package ha

import (
	"context"
	"log/slog"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

const mib = 1 << 20

// These tests run the controller against a real etcd. The compute hosts are registrations and host records
// written by the test (the test plays each computed: it reports the VMs it is given as running), and the
// fencer records what it is asked (the real one, metad/attach, is tested in its package and end to end in
// chaos/): what is checked here is the controller's decisions and their order.

type recordingFencer struct {
	mu    sync.Mutex
	calls []string
	at    map[string]time.Time
}

func (f *recordingFencer) FenceHost(_ context.Context, host string) ([]string, int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, host)
	if f.at == nil {
		f.at = map[string]time.Time{}
	}
	f.at[host] = time.Now()
	return nil, 1, nil
}

func (f *recordingFencer) fenced() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

type env struct {
	t    *testing.T
	ctx  context.Context
	s    *store.Store
	vms  *api.VMServer
	regs map[string]*registry.Registration
}

func newEnv(t *testing.T) *env {
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return &env{t: t, ctx: ctx, s: s, vms: api.NewVMServer(s, nil), regs: map[string]*registry.Registration{}}
}

func (e *env) register(id string, kind basaltv1.NodeKind) {
	e.t.Helper()
	reg, err := registry.Register(e.ctx, e.s, &basaltv1.Node{Id: id, Kind: kind, GrpcAddress: "127.0.0.1:1"}, "test", 2*time.Second, slog.Default())
	if err != nil {
		e.t.Fatal(err)
	}
	e.regs[id] = reg
	e.t.Cleanup(func() { reg.Close(context.Background()) })
}

// host registers a computed and its blockd, and publishes the host with memMiB of memory.
func (e *env) host(id, blockd string, memMiB uint64) {
	e.t.Helper()
	e.register(id, basaltv1.NodeKind_NODE_KIND_COMPUTED)
	e.register(blockd, basaltv1.NodeKind_NODE_KIND_BLOCKD)
	if _, err := e.s.Put(e.ctx, schema.ComputeHostKey(id), &basaltv1.ComputeHost{Node: id, Hypervisor: "qemu", MemoryBytes: memMiB * mib, BlockdNode: blockd}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) down(id string) {
	e.t.Helper()
	if err := e.regs[id].Close(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) vm(name, host string, prio basaltv1.VMPriority, group string) {
	e.t.Helper()
	spec := &basaltv1.VMSpec{Vcpus: 1, Memory: &basaltv1.VMMemory{StartupBytes: 64 * mib}, Kernel: "/boot/vmlinuz", Priority: prio,
		Placement: &basaltv1.VMPlacement{AntiAffinityGroup: group}}
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: name, Spec: spec}); err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.vms.StartVM(e.ctx, &basaltv1.StartVMRequest{Name: name, Host: host}); err != nil {
		e.t.Fatal(err)
	}
	e.report(name, host)
}

func (e *env) report(name, host string) {
	if _, err := e.s.Put(e.ctx, schema.VMStatusKey(name), &basaltv1.VMStatus{Name: name, Host: host, State: basaltv1.VMState_VM_STATE_RUNNING}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) controller(candidate string, f Fencer, grace time.Duration) context.CancelFunc {
	e.t.Helper()
	c, err := New(Config{Candidate: candidate, Store: e.s, VMs: e.vms, Fencer: f, DaemonGrace: grace, TierWait: 5 * time.Second,
		Interval: 200 * time.Millisecond, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("ha", candidate)})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	e.t.Cleanup(func() { cancel(); <-done })
	return func() { cancel(); <-done }
}

func (e *env) get(name string) *basaltv1.VM {
	e.t.Helper()
	vm, err := e.vms.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: name})
	if err != nil {
		e.t.Fatal(err)
	}
	return vm
}

// playHosts acts as the computed hosts: every VM placed on a live host is reported running there, after a
// short start time, until ctx ends.
func (e *env) playHosts(ctx context.Context, live ...string) {
	done := make(chan struct{})
	e.t.Cleanup(func() { <-done })
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			recs, _, err := store.List[basaltv1.VM](ctx, e.s, schema.VMsPrefix)
			if err == nil {
				for _, r := range recs {
					vm := r.Value
					st, _ := store.Get[basaltv1.VMStatus](ctx, e.s, schema.VMStatusKey(vm.GetName()))
					for _, h := range live {
						if vm.GetHost() == h && vm.GetDesiredState() == basaltv1.VMState_VM_STATE_RUNNING && st.Value.GetHost() != h {
							time.Sleep(50 * time.Millisecond)
							// Not e.report: this goroutine may outlive the test, which must not fail from here.
							e.s.Put(ctx, schema.VMStatusKey(vm.GetName()), &basaltv1.VMStatus{Name: vm.GetName(), Host: h, State: basaltv1.VMState_VM_STATE_RUNNING})
						}
					}
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
}

// TestFailoverByPriority: a host holding 8 VMs of mixed priorities fails (computed and blockd leases gone).
// The controller fences it once, then places high before medium before low, keeps the anti-affinity group
// apart, and leaves the no-auto-start VM stopped.
func TestFailoverByPriority(t *testing.T) {
	e := newEnv(t)
	e.host("h1", "b1", 4096)
	e.host("h2", "b2", 4096)
	e.host("h3", "b3", 4096)
	H, M, L, N := basaltv1.VMPriority_VM_PRIORITY_HIGH, basaltv1.VMPriority_VM_PRIORITY_MEDIUM, basaltv1.VMPriority_VM_PRIORITY_LOW, basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START
	prios := map[string]basaltv1.VMPriority{"a-low": L, "b-high": H, "c-med": M, "d-high": H, "e-low": L, "f-med": basaltv1.VMPriority_VM_PRIORITY_UNSPECIFIED, "g-none": N, "h-high": H}
	for name, p := range prios {
		group := ""
		if p == H {
			group = "db" // three high VMs, two other hosts: spread 2+1
		}
		e.vm(name, "h1", p, group)
	}
	f := &recordingFencer{}
	e.controller("c1", f, time.Hour)
	pctx, stop := context.WithCancel(e.ctx)
	defer stop()
	e.playHosts(pctx, "h2", "h3")

	e.down("h1")
	e.down("b1")
	deadline := time.Now().Add(30 * time.Second)
	for {
		done := true
		for name, p := range prios {
			vm := e.get(name)
			if p == N {
				done = done && vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED
			} else {
				done = done && vm.GetHost() != "h1" && vm.GetStatus().GetHost() == vm.GetHost()
			}
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("VMs not moved within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := f.fenced(); len(got) != 1 || got[0] != "h1" {
		t.Fatalf("fenced %v, want [h1] once", got)
	}
	type placed struct {
		name string
		rank int
		at   time.Time
	}
	var order []placed
	perHost := map[string]int{}
	for name, p := range prios {
		vm := e.get(name)
		fo := vm.GetFailover()
		if fo.GetFromHost() != "h1" || fo.GetDetectedAt() == nil || fo.GetFencedAt() == nil {
			t.Fatalf("%s: failover record %v", name, fo)
		}
		if !fo.GetFencedAt().AsTime().After(f.at["h1"].Add(-time.Millisecond)) {
			t.Fatalf("%s: fenced_at %v before the fence call %v", name, fo.GetFencedAt().AsTime(), f.at["h1"])
		}
		if p == N {
			if fo.GetError() == "" || vm.GetHost() != "h1" {
				t.Fatalf("no-auto-start VM: %v on %s", fo, vm.GetHost())
			}
			continue
		}
		if fo.GetPlacedAt() == nil || fo.GetToHost() != vm.GetHost() {
			t.Fatalf("%s: failover record %v, host %s", name, fo, vm.GetHost())
		}
		order = append(order, placed{name, api.PriorityRank(p), fo.GetPlacedAt().AsTime()})
		if p == H {
			perHost[vm.GetHost()]++
		}
	}
	sort.Slice(order, func(i, j int) bool { return order[i].at.Before(order[j].at) })
	for i := 1; i < len(order); i++ {
		if order[i].rank < order[i-1].rank {
			t.Fatalf("placed out of priority order: %+v", order)
		}
	}
	if perHost["h2"]+perHost["h3"] != 3 || perHost["h2"] == 0 || perHost["h3"] == 0 {
		t.Fatalf("anti-affinity group db spread %v", perHost)
	}
	t.Logf("placement order: %+v", order)
}

// TestComputedAloneDownGetsAGrace: a computed that is down while its host's blockd is up keeps its VMs for the
// grace; a new leader takes over when the first controller stops.
func TestComputedAloneDownGetsAGrace(t *testing.T) {
	e := newEnv(t)
	e.host("h1", "b1", 1024)
	e.host("h2", "b2", 1024)
	e.vm("vm1", "h1", basaltv1.VMPriority_VM_PRIORITY_MEDIUM, "")
	f := &recordingFencer{}
	stop1 := e.controller("c1", f, 4*time.Second)
	e.controller("c2", f, 4*time.Second)
	pctx, stopPlay := context.WithCancel(e.ctx)
	defer stopPlay()
	e.playHosts(pctx, "h2")

	e.down("h1") // computed only; b1 stays up
	time.Sleep(2 * time.Second)
	if vm := e.get("vm1"); vm.GetHost() != "h1" || len(f.fenced()) != 0 {
		t.Fatalf("moved within the grace: host %s, fenced %v", vm.GetHost(), f.fenced())
	}
	stop1() // the leader goes; c2 takes over and starts its own grace, which is over 4 s later at most
	deadline := time.Now().Add(15 * time.Second)
	for e.get("vm1").GetHost() != "h2" {
		if time.Now().After(deadline) {
			t.Fatalf("not moved after the grace: %v", e.get("vm1"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	fo := e.get("vm1").GetFailover()
	if got := f.fenced(); len(got) != 1 || fo.GetReason() == "" {
		t.Fatalf("fenced %v, failover %v", got, fo)
	}
	t.Logf("failover: %v", fo)
}

// TestMonitoringGaveUp: a VM whose host reports that heartbeat monitoring gave up is moved, without fencing
// the (live) host.
func TestMonitoringGaveUp(t *testing.T) {
	e := newEnv(t)
	e.host("h1", "b1", 1024)
	e.host("h2", "b2", 1024)
	e.vm("vm1", "h1", basaltv1.VMPriority_VM_PRIORITY_LOW, "")
	f := &recordingFencer{}
	e.controller("c1", f, time.Hour)
	if _, err := e.s.Put(e.ctx, schema.VMStatusKey("vm1"), &basaltv1.VMStatus{Name: "vm1", Host: "h1", State: basaltv1.VMState_VM_STATE_RUNNING, MonitorGaveUp: true}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for e.get("vm1").GetHost() != "h2" {
		if time.Now().After(deadline) {
			t.Fatalf("not moved: %v", e.get("vm1"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(f.fenced()) != 0 {
		t.Fatalf("a live host was fenced: %v", f.fenced())
	}
	if fo := e.get("vm1").GetFailover(); fo.GetReason() != "heartbeat monitoring gave up" || fo.GetToHost() != "h2" {
		t.Fatalf("failover record %v", fo)
	}
}
