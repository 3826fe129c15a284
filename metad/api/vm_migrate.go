package api

import (
	"context"
	"errors"
	"sort"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// DefaultDrainParallel is how many migrations a draining host runs at once unless told otherwise.
const DefaultDrainParallel = 2

// MigrateVM records a migration request; the VM's source host carries it out (docs/compute.md).
func (s *VMServer) MigrateVM(ctx context.Context, r *basaltv1.MigrateVMRequest) (*basaltv1.VM, error) {
	if t := r.GetTargetHost(); t != "" {
		if err := schema.ValidateName("host", t); err != nil {
			return nil, invalid("target: %v", err)
		}
	}
	return s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		mig, err := w.planMigration(r.GetName(), vm, r.GetTargetHost())
		if err != nil {
			return nil, err
		}
		mig.Compress, mig.BandwidthBytesPerSecond, mig.MaxDowntimeMs = r.GetCompress(), r.GetBandwidthBytesPerSecond(), r.GetMaxDowntimeMs()
		vm.Migration = mig
		return vm, nil
	})
}

// planMigration checks that vm can move now and picks (or checks) its target.
func (w *vmWorld) planMigration(name string, vm *basaltv1.VM, target string) (*basaltv1.VMMigration, error) {
	if m := vm.GetMigration(); m != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %q is already migrating to %s (requested %s); wait for it, or cancel it with 'basalt vm migrate %s --cancel'",
			name, m.GetTarget(), m.GetRequestedAt().AsTime().Format(time.RFC3339), name)
	}
	st := w.statuses[name]
	if vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %q is stopped: start it on the host you want with 'basalt vm start %s --host HOST'", name, name)
	}
	if st.GetHost() != vm.GetHost() || (st.GetState() != basaltv1.VMState_VM_STATE_RUNNING && st.GetState() != basaltv1.VMState_VM_STATE_PAUSED) {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %q is %s, not running on %s: only a running VM migrates", name, stateWord(observedState(vm, st)), vm.GetHost())
	}
	source := vm.GetHost()
	if !w.up(source) {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %q's host %s is down", name, source)
	}
	req := placeRequest{vm: name, spec: vm.GetSpec(), memory: memoryTarget(vm), exclude: []string{source},
		hypervisor: w.hosts[source].GetHypervisor(), sourceNetd: w.hosts[source].GetNetdNode()}
	if target == "" {
		var err error
		if target, err = w.place(req); err != nil {
			return nil, err
		}
	} else if err := w.check(target, req); err != nil {
		return nil, err
	}
	return &basaltv1.VMMigration{Id: newToken()[:16], Source: source, Target: target, RequestedAt: timestamppb.Now()}, nil
}

// CancelMigration marks a VM's migration cancelled; its source host stops it and keeps the VM.
func (s *VMServer) CancelMigration(ctx context.Context, r *basaltv1.CancelMigrationRequest) (*basaltv1.VM, error) {
	return s.updateVM(ctx, r.GetName(), func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
		if vm.GetMigration() == nil {
			return nil, status.Errorf(codes.FailedPrecondition, "VM %q is not migrating", r.GetName())
		}
		vm.Migration.Cancel = true
		return vm, nil
	})
}

// ListHosts lists compute hosts with what they hold.
func (s *VMServer) ListHosts(ctx context.Context, _ *basaltv1.ListHostsRequest) (*basaltv1.ListHostsResponse, error) {
	w, err := s.loadWorld(ctx)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(w.hosts))
	for h := range w.hosts {
		names = append(names, h)
	}
	sort.Strings(names)
	out := &basaltv1.ListHostsResponse{}
	for _, h := range names {
		out.Hosts = append(out.Hosts, w.hostStatus(h))
	}
	return out, nil
}

func (w *vmWorld) hostStatus(host string) *basaltv1.ComputeHostStatus {
	hs := &basaltv1.ComputeHostStatus{Host: w.hosts[host], Up: w.up(host), Maintenance: w.maint[host], MemoryCommittedBytes: w.committed(host, "")}
	names := make([]string, 0, len(w.vms))
	for n := range w.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		vm := w.vms[n].Value
		if vm.GetHost() == host && w.holds(n, vm, host) {
			hs.Vms = append(hs.Vms, n)
			if vm.GetMigration() != nil {
				hs.Migrating = append(hs.Migrating, n)
			}
		}
	}
	return hs
}

// DrainHost puts the host in maintenance and requests a migration for every VM on it, one declaration at a
// time (each placed against the targets chosen before it).
func (s *VMServer) DrainHost(ctx context.Context, r *basaltv1.DrainHostRequest) (*basaltv1.DrainHostResponse, error) {
	host := r.GetHost()
	if err := schema.ValidateName("host", host); err != nil {
		return nil, invalid("%v", err)
	}
	w, err := s.loadWorld(ctx)
	if err != nil {
		return nil, err
	}
	if w.hosts[host] == nil {
		return nil, status.Errorf(codes.NotFound, "host %q is not a computed host (see 'basalt host list')", host)
	}
	parallel := r.GetParallel()
	if parallel == 0 {
		parallel = DefaultDrainParallel
	}
	m := &basaltv1.HostMaintenance{Node: host, Draining: true, Parallel: parallel, Compress: r.GetCompress(),
		BandwidthBytesPerSecond: r.GetBandwidthBytesPerSecond(), RequestedAt: timestamppb.Now()}
	if _, err := s.Store.Put(ctx, schema.HostMaintenanceKey(host), m); err != nil {
		return nil, toStatus(err)
	}
	out := &basaltv1.DrainHostResponse{}
	names := make([]string, 0, len(w.vms))
	for n, rec := range w.vms {
		if rec.Value.GetHost() == host && rec.Value.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		vm, err := s.updateVM(ctx, n, func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error) {
			if vm.GetHost() != host || vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED {
				return nil, errSkip
			}
			if vm.GetMigration() != nil {
				return nil, errSkip // already moving (perhaps from an earlier drain)
			}
			mig, err := w.planMigration(n, vm, "")
			if err != nil {
				return nil, err
			}
			mig.Compress, mig.BandwidthBytesPerSecond, mig.Drain = r.GetCompress(), r.GetBandwidthBytesPerSecond(), true
			vm.Migration = mig
			return vm, nil
		})
		switch {
		case errors.Is(err, errSkip) || status.Code(err) == codes.NotFound:
		case err != nil && status.Code(err) == codes.FailedPrecondition:
			out.Problems = append(out.Problems, n+": "+status.Convert(err).Message())
		case err != nil:
			return nil, err
		default:
			out.Moving = append(out.Moving, vm)
		}
	}
	if w, err = s.loadWorld(ctx); err != nil {
		return nil, err
	}
	out.Host = w.hostStatus(host)
	return out, nil
}

// errSkip is a DrainHost update that found nothing to do.
var errSkip = errors.New("nothing to do")

// UndrainHost ends a host's maintenance: VMs may be placed there again.
func (s *VMServer) UndrainHost(ctx context.Context, r *basaltv1.UndrainHostRequest) (*basaltv1.ComputeHostStatus, error) {
	host := r.GetHost()
	if err := schema.ValidateName("host", host); err != nil {
		return nil, invalid("%v", err)
	}
	if _, err := s.Store.Client.Delete(ctx, schema.HostMaintenanceKey(host)); err != nil {
		return nil, toStatus(err)
	}
	w, err := s.loadWorld(ctx)
	if err != nil {
		return nil, err
	}
	if w.hosts[host] == nil {
		return nil, status.Errorf(codes.NotFound, "host %q is not a computed host (see 'basalt host list')", host)
	}
	return w.hostStatus(host), nil
}

// hostOf is the host that runs (or last ran) a VM according to its status, else its declaration.
func hostOf(rec store.Record[*basaltv1.VM], st *basaltv1.VMStatus) string {
	if st.GetHost() != "" {
		return st.GetHost()
	}
	return rec.Value.GetHost()
}
