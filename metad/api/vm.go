package api

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// VMServer serves VMService: VM declarations in etcd, placement on computed hosts, and the calls that need a
// host (console, stats), relayed to the computed running the VM (docs/compute.md).
type VMServer struct {
	basaltv1.UnimplementedVMServiceServer
	Store *store.Store
	// Peers reaches storage nodes, for the checkpoints of CloneVM.
	Peers *blockrpc.Peers

	mu    sync.Mutex
	conns map[string]*computeConn
}

// NewVMServer returns a VMServer on s.
func NewVMServer(s *store.Store, peers *blockrpc.Peers) *VMServer {
	return &VMServer{Store: s, Peers: peers, conns: map[string]*computeConn{}}
}

// Limits of a VM spec.
const (
	MaxVCPUs = 255
	// MaxVMDisks and MaxVMNics together stay within the QEMU driver's PCIe ports (16 by default).
	MaxVMDisks = 12
	MaxVMNics  = 4
	mib        = 1 << 20
	// DefaultStopTimeout is how long StopVM waits for the guest's ACPI shutdown before forcing it off.
	DefaultStopTimeout = 60 * time.Second
)

// validateSpec checks a spec on its own and fills in defaults (minimum and maximum memory, firmware).
func validateSpec(spec *basaltv1.VMSpec) error {
	if spec == nil {
		return invalid("the VM has no spec")
	}
	if spec.Vcpus == 0 {
		spec.Vcpus = 1
	}
	if spec.GetVcpus() > MaxVCPUs {
		return invalid("%d vCPUs: at most %d", spec.GetVcpus(), MaxVCPUs)
	}
	if spec.Memory == nil {
		spec.Memory = &basaltv1.VMMemory{}
	}
	m := spec.Memory
	if m.StartupBytes == 0 || m.StartupBytes%mib != 0 {
		return invalid("startup memory %d: want a positive multiple of 1 MiB", m.StartupBytes)
	}
	if m.MinimumBytes == 0 {
		m.MinimumBytes = m.StartupBytes
	}
	if m.MaximumBytes == 0 {
		m.MaximumBytes = m.StartupBytes
	}
	if m.MinimumBytes%mib != 0 || m.MaximumBytes%mib != 0 {
		return invalid("memory minimum %d and maximum %d must be multiples of 1 MiB", m.MinimumBytes, m.MaximumBytes)
	}
	if m.MinimumBytes > m.StartupBytes || m.StartupBytes > m.MaximumBytes {
		return invalid("memory: want minimum (%s) <= startup (%s) <= maximum (%s)", sizeText(m.MinimumBytes), sizeText(m.StartupBytes), sizeText(m.MaximumBytes))
	}
	if len(spec.Disks) > MaxVMDisks {
		return invalid("%d disks: at most %d", len(spec.Disks), MaxVMDisks)
	}
	if len(spec.Nics) > MaxVMNics {
		return invalid("%d NICs: at most %d", len(spec.Nics), MaxVMNics)
	}
	vols, boots := map[string]bool{}, map[uint32]string{}
	for _, d := range spec.Disks {
		if err := schema.ValidateName("volume", d.GetVolume()); err != nil {
			return invalid("disk: %v", err)
		}
		if vols[d.GetVolume()] {
			return invalid("volume %q is given twice", d.GetVolume())
		}
		vols[d.GetVolume()] = true
		if o := d.GetBootOrder(); o != 0 {
			if other, dup := boots[o]; dup {
				return invalid("volumes %q and %q both have boot order %d", other, d.GetVolume(), o)
			}
			boots[o] = d.GetVolume()
		}
	}
	ports := map[string]bool{}
	for _, n := range spec.Nics {
		if err := schema.ValidateName("network", n.GetNetwork()); err != nil {
			return invalid("NIC: %v", err)
		}
		if err := schema.ValidateName("port", n.GetPort()); err != nil {
			return invalid("NIC: %v", err)
		}
		if k := n.GetNetwork() + "/" + n.GetPort(); ports[k] {
			return invalid("port %s is given twice", k)
		} else {
			ports[k] = true
		}
	}
	if spec.Firmware == basaltv1.Firmware_FIRMWARE_UNSPECIFIED {
		spec.Firmware = basaltv1.Firmware_FIRMWARE_BIOS
		if spec.Kernel != "" {
			spec.Firmware = basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL
		}
	}
	switch spec.Firmware {
	case basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL:
		if spec.Kernel == "" {
			return invalid("direct kernel boot needs a kernel")
		}
	case basaltv1.Firmware_FIRMWARE_BIOS:
		if spec.Kernel != "" || spec.Initrd != "" || spec.Cmdline != "" {
			return invalid("a kernel, initrd or command line with BIOS firmware: use direct kernel boot (or UEFI, whose firmware boots the kernel)")
		}
	case basaltv1.Firmware_FIRMWARE_UEFI, basaltv1.Firmware_FIRMWARE_UEFI_SECURE_BOOT:
	default:
		return invalid("unknown firmware %d", spec.Firmware)
	}
	if spec.Kernel == "" && (spec.Initrd != "" || spec.Cmdline != "") {
		return invalid("an initrd or command line without a kernel")
	}
	for _, p := range []struct{ what, path string }{{"kernel", spec.Kernel}, {"initrd", spec.Initrd}} {
		if p.path != "" && !filepath.IsAbs(p.path) {
			return invalid("%s %q: want an absolute path on the hosts", p.what, p.path)
		}
	}
	if spec.Firmware != basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL && len(boots) == 0 && spec.Kernel == "" {
		return invalid("nothing to boot: give a disk a boot order, or a kernel")
	}
	if err := validateHA(spec); err != nil {
		return err
	}
	pl := spec.GetPlacement()
	for _, h := range append(slices.Clone(pl.GetPreferredHosts()), pl.GetPossibleHosts()...) {
		if err := schema.ValidateName("host", h); err != nil {
			return invalid("placement: %v", err)
		}
	}
	if possible := pl.GetPossibleHosts(); len(possible) > 0 {
		for _, h := range pl.GetPreferredHosts() {
			if !slices.Contains(possible, h) {
				return invalid("placement: preferred host %q is not one of the possible hosts", h)
			}
		}
	}
	return nil
}

// checkResources checks what a spec names against the cluster: its volumes and ports exist and no other VM
// uses them (a volume may be in several VMs only if it is shared), and some candidate host is big enough.
func (s *VMServer) checkResources(ctx context.Context, w *vmWorld, name string, spec *basaltv1.VMSpec) error {
	for _, d := range spec.GetDisks() {
		vol, err := store.Get[basaltv1.Volume](ctx, s.Store, schema.VolumeKey(d.GetVolume()))
		if errors.Is(err, store.ErrNotFound) {
			return status.Errorf(codes.NotFound, "volume %q does not exist (basalt volume create %s --size SIZE)", d.GetVolume(), d.GetVolume())
		}
		if err != nil {
			return toStatus(err)
		}
		if vol.Value.GetShared() {
			continue
		}
		for other, r := range w.vms {
			if other == name {
				continue
			}
			for _, od := range r.Value.GetSpec().GetDisks() {
				if od.GetVolume() == d.GetVolume() {
					return status.Errorf(codes.FailedPrecondition, "volume %q is a disk of VM %q; only a shared volume (--shared) may be in several VMs", d.GetVolume(), other)
				}
			}
		}
	}
	for _, n := range spec.GetNics() {
		if _, err := store.Get[basaltv1.Network](ctx, s.Store, schema.NetworkKey(n.GetNetwork())); errors.Is(err, store.ErrNotFound) {
			return status.Errorf(codes.NotFound, "network %q does not exist", n.GetNetwork())
		} else if err != nil {
			return toStatus(err)
		}
		if _, err := store.Get[basaltv1.Port](ctx, s.Store, schema.PortKey(n.GetNetwork(), n.GetPort())); errors.Is(err, store.ErrNotFound) {
			return status.Errorf(codes.NotFound, "port %q does not exist in network %q", n.GetPort(), n.GetNetwork())
		} else if err != nil {
			return toStatus(err)
		}
		for other, r := range w.vms {
			if other == name {
				continue
			}
			for _, on := range r.Value.GetSpec().GetNics() {
				if on.GetNetwork() == n.GetNetwork() && on.GetPort() == n.GetPort() {
					return status.Errorf(codes.FailedPrecondition, "port %s/%s is a NIC of VM %q", n.GetNetwork(), n.GetPort(), other)
				}
			}
		}
	}
	cands := w.candidates(spec)
	if len(cands) == 0 {
		if len(spec.GetPlacement().GetPossibleHosts()) > 0 {
			return status.Errorf(codes.FailedPrecondition, "none of the possible hosts (%v) is a computed host (see 'basalt host list')", spec.GetPlacement().GetPossibleHosts())
		}
		return status.Error(codes.FailedPrecondition, "no computed host is registered (see 'basalt host list')")
	}
	var biggest string
	for _, h := range cands {
		if biggest == "" || w.hosts[h].GetMemoryBytes() > w.hosts[biggest].GetMemoryBytes() {
			biggest = h
		}
	}
	if need := maxMemoryOf(spec); need > w.hosts[biggest].GetMemoryBytes() {
		return status.Errorf(codes.FailedPrecondition, "the VM may use %s of memory, more than any host it may run on has (the largest, %s, offers %s)",
			sizeText(need), biggest, sizeText(w.hosts[biggest].GetMemoryBytes()))
	}
	return nil
}

// CreateVM validates and records a VM, stopped unless the request asks to start it.
func (s *VMServer) CreateVM(ctx context.Context, r *basaltv1.CreateVMRequest) (*basaltv1.VM, error) {
	name := r.GetName()
	if err := schema.ValidateName("VM", name); err != nil {
		return nil, invalid("%v", err)
	}
	spec := proto.Clone(r.GetSpec()).(*basaltv1.VMSpec)
	if r.GetSpec() == nil {
		spec = nil
	}
	if err := validateSpec(spec); err != nil {
		return nil, err
	}
	return s.create(ctx, name, spec, r.GetStart(), "")
}

func (s *VMServer) create(ctx context.Context, name string, spec *basaltv1.VMSpec, start bool, clonedFrom string) (*basaltv1.VM, error) {
	for attempt := 0; ; attempt++ {
		w, err := s.loadWorld(ctx)
		if err != nil {
			return nil, err
		}
		if _, ok := w.vms[name]; ok {
			return nil, status.Errorf(codes.AlreadyExists, "VM %q already exists", name)
		}
		if err := s.checkResources(ctx, w, name, spec); err != nil {
			return nil, err
		}
		vm := &basaltv1.VM{
			Name: name, Spec: spec, CreatedAt: timestamppb.Now(), DesiredState: basaltv1.VMState_VM_STATE_STOPPED,
			MemoryTargetBytes: spec.GetMemory().GetStartupBytes(), ClonedFrom: clonedFrom,
		}
		if start {
			host, err := w.place(placeRequest{vm: name, spec: spec, memory: memoryTarget(vm)})
			if err != nil {
				return nil, err
			}
			vm.Host, vm.DesiredState = host, basaltv1.VMState_VM_STATE_RUNNING
		}
		rev, err := s.putVM(ctx, w, name, vm, true)
		if errors.Is(err, store.ErrConflict) && attempt < 20 && ctx.Err() == nil {
			continue
		}
		if err != nil {
			return nil, toStatus(err)
		}
		vm.Revision = rev
		vm.State = observedState(vm, nil)
		return vm, nil
	}
}

// observedState is the VM's state as the API reports it: the host's word, corrected for what the host has not
// acted on yet.
func observedState(vm *basaltv1.VM, st *basaltv1.VMStatus) basaltv1.VMState {
	desired := vm.GetDesiredState()
	if st.GetHost() != vm.GetHost() || st == nil {
		if mig := st.GetMigration(); mig.GetTarget() == vm.GetHost() && mig.GetStatus() == "completed" {
			return basaltv1.VMState_VM_STATE_RUNNING // the target has not reported yet
		}
		if desired == basaltv1.VMState_VM_STATE_STOPPED || desired == basaltv1.VMState_VM_STATE_UNSPECIFIED {
			return basaltv1.VMState_VM_STATE_STOPPED
		}
		return basaltv1.VMState_VM_STATE_STARTING
	}
	if st.GetObservedGeneration() < vm.GetGeneration() {
		switch {
		case desired == basaltv1.VMState_VM_STATE_STOPPED && running(st):
			return basaltv1.VMState_VM_STATE_STOPPING
		case desired != basaltv1.VMState_VM_STATE_STOPPED && !running(st):
			return basaltv1.VMState_VM_STATE_STARTING
		}
	}
	return st.GetState()
}

// view returns the API's view of a declaration: with its status and observed state.
func view(r store.Record[*basaltv1.VM], st *basaltv1.VMStatus) *basaltv1.VM {
	vm := r.Value
	vm.Revision = r.ModRevision
	vm.Status = st
	vm.State = observedState(vm, st)
	return vm
}

// GetVM returns a VM with its status.
func (s *VMServer) GetVM(ctx context.Context, r *basaltv1.GetVMRequest) (*basaltv1.VM, error) {
	rec, st, err := s.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	return view(rec, st), nil
}

func (s *VMServer) get(ctx context.Context, name string) (store.Record[*basaltv1.VM], *basaltv1.VMStatus, error) {
	if err := schema.ValidateName("VM", name); err != nil {
		return store.Record[*basaltv1.VM]{}, nil, invalid("%v", err)
	}
	rec, err := store.Get[basaltv1.VM](ctx, s.Store, schema.VMKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return rec, nil, status.Errorf(codes.NotFound, "VM %q does not exist", name)
	}
	if err != nil {
		return rec, nil, toStatus(err)
	}
	st, err := store.Get[basaltv1.VMStatus](ctx, s.Store, schema.VMStatusKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return rec, nil, nil
	}
	if err != nil {
		return rec, nil, toStatus(err)
	}
	return rec, st.Value, nil
}

// ListVMs lists VMs by name, optionally only those assigned to one host.
func (s *VMServer) ListVMs(ctx context.Context, r *basaltv1.ListVMsRequest) (*basaltv1.ListVMsResponse, error) {
	w, err := s.loadWorld(ctx)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(w.vms))
	for n := range w.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	out := &basaltv1.ListVMsResponse{}
	for _, n := range names {
		rec := w.vms[n]
		if r.GetHost() != "" && rec.Value.GetHost() != r.GetHost() {
			continue
		}
		out.Vms = append(out.Vms, view(rec, w.statuses[n]))
	}
	return out, nil
}

// DeleteVM removes a VM's declaration, status and metering history. A VM that runs is refused unless forced;
// its host then kills it when it sees the declaration gone.
func (s *VMServer) DeleteVM(ctx context.Context, r *basaltv1.DeleteVMRequest) (*basaltv1.DeleteVMResponse, error) {
	_, err := s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		st := w.statuses[r.GetName()]
		if !r.GetForce() && (vm.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED || running(st)) {
			return nil, status.Errorf(codes.FailedPrecondition, "VM %q is %s on %s; stop it first (basalt vm stop %s), or delete it with --force (it is killed)",
				r.GetName(), stateWord(observedState(vm, st)), vm.GetHost(), r.GetName())
		}
		return nil, nil
	})
	if err != nil {
		return nil, err
	}
	return &basaltv1.DeleteVMResponse{}, nil
}

// StartVM places the VM and declares it running. A VM that is still shutting down is simply kept running
// where it is.
func (s *VMServer) StartVM(ctx context.Context, r *basaltv1.StartVMRequest) (*basaltv1.VM, error) {
	return s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		st := w.statuses[r.GetName()]
		stillRuns := st.GetHost() == vm.GetHost() && running(st)
		if vm.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED {
			if r.GetHost() != "" && r.GetHost() != vm.GetHost() {
				return nil, status.Errorf(codes.FailedPrecondition, "VM %q already runs on %s; move it with 'basalt vm migrate'", r.GetName(), vm.GetHost())
			}
			// Already started. The write still bumps the generation, which makes a host whose start failed try
			// again at once.
			return vm, nil
		}
		if stillRuns {
			if r.GetHost() != "" && r.GetHost() != vm.GetHost() {
				return nil, status.Errorf(codes.FailedPrecondition, "VM %q is still stopping on %s; wait for it to stop", r.GetName(), vm.GetHost())
			}
			vm.DesiredState, vm.Stop = basaltv1.VMState_VM_STATE_RUNNING, nil
			return vm, nil
		}
		vm.MemoryTargetBytes = vm.GetSpec().GetMemory().GetStartupBytes()
		req := placeRequest{vm: r.GetName(), spec: vm.GetSpec(), memory: memoryTarget(vm)}
		var host string
		switch {
		case r.GetHost() != "":
			if err := w.check(r.GetHost(), req); err != nil {
				return nil, err
			}
			host = r.GetHost()
		default:
			req.last = vm.GetHost()
			var err error
			if host, err = w.place(req); err != nil {
				return nil, err
			}
		}
		vm.Host, vm.DesiredState, vm.Stop, vm.Migration = host, basaltv1.VMState_VM_STATE_RUNNING, nil, nil
		return vm, nil
	})
}

// StopVM declares the VM stopped: its host presses the ACPI power button and forces it off after the timeout.
func (s *VMServer) StopVM(ctx context.Context, r *basaltv1.StopVMRequest) (*basaltv1.VM, error) {
	timeout := r.GetTimeoutSeconds()
	if timeout == 0 {
		timeout = uint32(DefaultStopTimeout / time.Second)
	}
	return s.stop(ctx, r.GetName(), timeout, r.GetForce())
}

// KillVM declares the VM stopped at once.
func (s *VMServer) KillVM(ctx context.Context, r *basaltv1.KillVMRequest) (*basaltv1.VM, error) {
	return s.stop(ctx, r.GetName(), 0, true)
}

func (s *VMServer) stop(ctx context.Context, name string, timeout uint32, force bool) (*basaltv1.VM, error) {
	return s.updateVM(ctx, name, func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		if vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED && !running(w.statuses[name]) {
			return nil, status.Errorf(codes.FailedPrecondition, "VM %q is not running", name)
		}
		if vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED && vm.GetStop() != nil {
			// A second stop may only hurry the first.
			if force {
				vm.Stop.Force = true
			}
			return vm, nil
		}
		vm.DesiredState = basaltv1.VMState_VM_STATE_STOPPED
		vm.Stop = &basaltv1.VMStop{RequestedAt: timestamppb.Now(), TimeoutSeconds: timeout, Force: force}
		if vm.Migration != nil {
			vm.Migration.Cancel = true
		}
		return vm, nil
	})
}

// PauseVM declares the VM paused (its vCPUs stopped, its memory kept).
func (s *VMServer) PauseVM(ctx context.Context, r *basaltv1.PauseVMRequest) (*basaltv1.VM, error) {
	return s.setRunState(ctx, r.GetName(), basaltv1.VMState_VM_STATE_PAUSED)
}

// ResumeVM declares a paused VM running.
func (s *VMServer) ResumeVM(ctx context.Context, r *basaltv1.ResumeVMRequest) (*basaltv1.VM, error) {
	return s.setRunState(ctx, r.GetName(), basaltv1.VMState_VM_STATE_RUNNING)
}

func (s *VMServer) setRunState(ctx context.Context, name string, to basaltv1.VMState) (*basaltv1.VM, error) {
	return s.updateVM(ctx, name, func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		if vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
			return nil, status.Errorf(codes.FailedPrecondition, "VM %q is stopped; start it first", name)
		}
		vm.DesiredState = to
		return vm, nil
	})
}

// SetVMMemory sets the balloon target within the spec's bounds; growing needs room on the host.
func (s *VMServer) SetVMMemory(ctx context.Context, r *basaltv1.SetVMMemoryRequest) (*basaltv1.VM, error) {
	return s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		m := vm.GetSpec().GetMemory()
		t := r.GetTargetBytes()
		if t%mib != 0 || t < m.GetMinimumBytes() || t > max(m.GetMaximumBytes(), m.GetStartupBytes()) {
			return nil, invalid("memory target %s: want a multiple of 1 MiB between the VM's minimum %s and maximum %s",
				sizeText(t), sizeText(m.GetMinimumBytes()), sizeText(max(m.GetMaximumBytes(), m.GetStartupBytes())))
		}
		if vm.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED && t > memoryTarget(vm) {
			for _, h := range []string{vm.GetHost(), vm.GetMigration().GetTarget()} {
				if h == "" {
					continue
				}
				if free := w.free(h, r.GetName()); free < t {
					return nil, status.Errorf(codes.FailedPrecondition, "host %q has %s of memory free for VM %q, not %s", h, sizeText(free), r.GetName(), sizeText(t))
				}
			}
		}
		vm.MemoryTargetBytes = t
		return vm, nil
	})
}

// stateWord is a VM state in lower case, for messages.
func stateWord(s basaltv1.VMState) string {
	switch s {
	case basaltv1.VMState_VM_STATE_STOPPED:
		return "stopped"
	case basaltv1.VMState_VM_STATE_STARTING:
		return "starting"
	case basaltv1.VMState_VM_STATE_RUNNING:
		return "running"
	case basaltv1.VMState_VM_STATE_PAUSED:
		return "paused"
	case basaltv1.VMState_VM_STATE_STOPPING:
		return "stopping"
	case basaltv1.VMState_VM_STATE_MIGRATING:
		return "migrating"
	case basaltv1.VMState_VM_STATE_FAILED:
		return "failed"
	}
	return "in an unknown state"
}

// computeConn is one connection to a computed's gRPC server.
type computeConn struct {
	addr string
	conn *grpc.ClientConn
}

// compute returns a ComputeService client for the computed node host, redialling when its address changed.
func (s *VMServer) compute(ctx context.Context, host string) (basaltv1.ComputeServiceClient, error) {
	n, err := store.Get[basaltv1.Node](ctx, s.Store, schema.NodeKey(host))
	if err != nil {
		return nil, toStatus(fmt.Errorf("find host %s: %w", host, err))
	}
	addr := n.Value.GetGrpcAddress()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[string]*computeConn{}
	}
	if c := s.conns[host]; c != nil && c.addr == addr {
		return basaltv1.NewComputeServiceClient(c.conn), nil
	} else if c != nil {
		c.conn.Close()
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "connect to host %s at %s: %v", host, addr, err)
	}
	s.conns[host] = &computeConn{addr: addr, conn: conn}
	return basaltv1.NewComputeServiceClient(conn), nil
}
