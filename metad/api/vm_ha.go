package api

import (
	"context"
	"fmt"
	"slices"
	"sort"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The parts of VMService and of VM placement that serve high availability (docs/ha.md): a VM's priority,
// anti-affinity group and monitoring, and the moves the HA controller (computed/ha) makes off a failed host.

// Bounds of VMMonitoring.
const (
	DefaultHeartbeatTimeout = 10
	MinHeartbeatTimeout     = 3
	MaxHeartbeatTimeout     = 3600
	DefaultMaxResets        = 3
	MaxMaxResets            = 100
)

// validateHA checks the HA parts of a spec.
func validateHA(spec *basaltv1.VMSpec) error {
	if _, ok := basaltv1.VMPriority_name[int32(spec.GetPriority())]; !ok {
		return invalid("unknown priority %d", spec.GetPriority())
	}
	if g := spec.GetPlacement().GetAntiAffinityGroup(); g != "" {
		if err := schema.ValidateName("anti-affinity group", g); err != nil {
			return invalid("placement: %v", err)
		}
	}
	if mon := spec.GetMonitoring(); mon != nil {
		if t := mon.GetTimeoutSeconds(); t != 0 && (t < MinHeartbeatTimeout || t > MaxHeartbeatTimeout) {
			return invalid("monitoring: heartbeat timeout %ds: want %d to %d seconds", t, MinHeartbeatTimeout, MaxHeartbeatTimeout)
		}
		if r := mon.GetMaxResets(); r > MaxMaxResets {
			return invalid("monitoring: %d resets: at most %d", r, MaxMaxResets)
		}
	}
	return nil
}

// PriorityRank orders priorities for restarts: 0 (high) first; NO_AUTO_START last.
func PriorityRank(p basaltv1.VMPriority) int {
	switch p {
	case basaltv1.VMPriority_VM_PRIORITY_HIGH:
		return 0
	case basaltv1.VMPriority_VM_PRIORITY_LOW:
		return 2
	case basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START:
		return 3
	}
	return 1 // medium, and unspecified
}

// PriorityName is the CLI's word for a priority.
func PriorityName(p basaltv1.VMPriority) string {
	switch p {
	case basaltv1.VMPriority_VM_PRIORITY_HIGH:
		return "high"
	case basaltv1.VMPriority_VM_PRIORITY_LOW:
		return "low"
	case basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START:
		return "no-auto-start"
	}
	return "medium"
}

// ParsePriority is the inverse of PriorityName.
func ParsePriority(s string) (basaltv1.VMPriority, error) {
	for _, p := range []basaltv1.VMPriority{basaltv1.VMPriority_VM_PRIORITY_HIGH, basaltv1.VMPriority_VM_PRIORITY_MEDIUM,
		basaltv1.VMPriority_VM_PRIORITY_LOW, basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START} {
		if PriorityName(p) == s {
			return p, nil
		}
	}
	return 0, fmt.Errorf("priority %q: want high, medium, low or no-auto-start", s)
}

// updatablePaths are the update_mask paths UpdateVM takes.
var updatablePaths = []string{"priority", "placement.preferred_hosts", "placement.possible_hosts", "placement.anti_affinity_group", "monitoring"}

// UpdateVM changes a VM's priority, placement or monitoring.
func (s *VMServer) UpdateVM(ctx context.Context, r *basaltv1.UpdateVMRequest) (*basaltv1.VM, error) {
	paths := r.GetUpdateMask().GetPaths()
	if len(paths) == 0 {
		return nil, invalid("update_mask names no field (want some of %v)", updatablePaths)
	}
	for _, p := range paths {
		if !slices.Contains(updatablePaths, p) {
			return nil, invalid("update_mask: %q cannot be changed on a VM (want some of %v)", p, updatablePaths)
		}
	}
	in := r.GetSpec()
	return s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		spec := vm.GetSpec()
		if spec.Placement == nil {
			spec.Placement = &basaltv1.VMPlacement{}
		}
		for _, p := range paths {
			switch p {
			case "priority":
				spec.Priority = in.GetPriority()
			case "placement.preferred_hosts":
				spec.Placement.PreferredHosts = slices.Clone(in.GetPlacement().GetPreferredHosts())
			case "placement.possible_hosts":
				spec.Placement.PossibleHosts = slices.Clone(in.GetPlacement().GetPossibleHosts())
			case "placement.anti_affinity_group":
				spec.Placement.AntiAffinityGroup = in.GetPlacement().GetAntiAffinityGroup()
			case "monitoring":
				spec.Monitoring = proto.Clone(in.GetMonitoring()).(*basaltv1.VMMonitoring)
			}
		}
		if err := validateSpec(spec); err != nil {
			return nil, err
		}
		for _, h := range append(slices.Clone(spec.Placement.GetPreferredHosts()), spec.Placement.GetPossibleHosts()...) {
			if w.hosts[h] == nil {
				return nil, status.Errorf(codes.NotFound, "host %q is not a computed host (see 'basalt host list')", h)
			}
		}
		possible := spec.Placement.GetPossibleHosts()
		for _, h := range []string{vm.GetHost(), vm.GetMigration().GetTarget()} {
			if h != "" && len(possible) > 0 && !slices.Contains(possible, h) && w.holds(vm.GetName(), vm, h) {
				return nil, status.Errorf(codes.FailedPrecondition, "VM %q is on %s, which its new possible hosts (%v) leave out: migrate it first", vm.GetName(), h, possible)
			}
		}
		return vm, nil
	})
}

// FailedVMs lists the VMs a failed host held that HA must act on: assigned to it and meant to run, ordered
// for restarts (priority, then name).
func (s *VMServer) FailedVMs(ctx context.Context, host string) ([]*basaltv1.VM, error) {
	w, err := s.loadWorld(ctx)
	if err != nil {
		return nil, err
	}
	var out []*basaltv1.VM
	for name, r := range w.vms {
		vm := r.Value
		if vm.GetHost() != host || vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
			continue
		}
		vm = proto.Clone(vm).(*basaltv1.VM)
		vm.Name = name
		vm.Status = w.statuses[name]
		out = append(out, vm)
	}
	SortForRestart(out)
	return out, nil
}

// SortForRestart orders VMs as HA restarts them: by priority, then by name.
func SortForRestart(vms []*basaltv1.VM) {
	sort.SliceStable(vms, func(i, j int) bool {
		pi, pj := PriorityRank(vms[i].GetSpec().GetPriority()), PriorityRank(vms[j].GetSpec().GetPriority())
		if pi != pj {
			return pi < pj
		}
		return vms[i].GetName() < vms[j].GetName()
	})
}

// errNotOnHost is the code of Failover's "the VM is no longer on the failed host".
var errNotOnHost = codes.Aborted

// Failover moves a VM off a failed host: it places it on another host that can take it (never `from`) and
// declares it running there, dropping a migration the failure interrupted, and records rec (with placed_at
// and to_host filled in). A NO_AUTO_START VM is declared stopped instead. The caller must have fenced `from`
// first. ABORTED if the VM is no longer assigned to `from` or no longer meant to run; FAILED_PRECONDITION
// (with the reasons) if no host can take it now.
func (s *VMServer) Failover(ctx context.Context, name, from string, rec *basaltv1.VMFailover) (*basaltv1.VM, error) {
	return s.updateVM(ctx, name, func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		if vm.GetHost() != from || vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
			return nil, status.Errorf(errNotOnHost, "VM %q is no longer meant to run on %s", name, from)
		}
		fo := proto.Clone(rec).(*basaltv1.VMFailover)
		fo.FromHost = from
		if vm.GetSpec().GetPriority() == basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START {
			fo.Error = "not restarted: its priority is no-auto-start"
			vm.DesiredState = basaltv1.VMState_VM_STATE_STOPPED
			vm.Stop = &basaltv1.VMStop{RequestedAt: timestamppb.Now(), Force: true}
			vm.Migration, vm.Failover = nil, fo
			return vm, nil
		}
		host, err := w.place(placeRequest{vm: name, spec: vm.GetSpec(), memory: memoryTarget(vm), exclude: []string{from}})
		if err != nil {
			return nil, err
		}
		fo.ToHost, fo.PlacedAt, fo.Error = host, timestamppb.Now(), ""
		vm.Host, vm.Migration, vm.Stop, vm.Failover = host, nil, nil, fo
		return vm, nil
	})
}

// RecordFailoverError keeps a failover that could not place the VM visible on it (the VM stays assigned to
// its failed host; the controller tries again).
func (s *VMServer) RecordFailoverError(ctx context.Context, name, from string, rec *basaltv1.VMFailover, cause error) error {
	_, err := s.updateVM(ctx, name, func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		if vm.GetHost() != from {
			return nil, status.Errorf(errNotOnHost, "VM %q is no longer on %s", name, from)
		}
		fo := proto.Clone(rec).(*basaltv1.VMFailover)
		fo.FromHost, fo.Error = from, status.Convert(cause).Message()
		if proto.Equal(fo, vm.GetFailover()) {
			return nil, status.Error(errNotOnHost, "already recorded")
		}
		vm.Failover = fo
		return vm, nil
	})
	return err
}

// IsNotOnHost reports whether err is Failover's "no longer on that host".
func IsNotOnHost(err error) bool { return status.Code(err) == errNotOnHost }
