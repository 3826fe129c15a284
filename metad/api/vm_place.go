package api

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/metering"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// vmWorld is everything placement looks at, read at one etcd revision: the VMs (declarations and statuses),
// the compute hosts and their maintenance state, and which computed nodes are up.
type vmWorld struct {
	rev      int64
	vms      map[string]store.Record[*basaltv1.VM]
	statuses map[string]*basaltv1.VMStatus
	hosts    map[string]*basaltv1.ComputeHost
	maint    map[string]*basaltv1.HostMaintenance
	nodes    map[string]*basaltv1.NodeStatus
}

// loadWorld reads the world. The VM declarations are read first and everything else at their revision, so
// the revision can guard a transaction that writes a declaration (see putVM).
func (s *VMServer) loadWorld(ctx context.Context) (*vmWorld, error) {
	recs, rev, err := store.List[basaltv1.VM](ctx, s.Store, schema.VMsPrefix)
	if err != nil {
		return nil, toStatus(err)
	}
	w := &vmWorld{rev: rev, vms: map[string]store.Record[*basaltv1.VM]{}, statuses: map[string]*basaltv1.VMStatus{},
		hosts: map[string]*basaltv1.ComputeHost{}, maint: map[string]*basaltv1.HostMaintenance{}, nodes: map[string]*basaltv1.NodeStatus{}}
	for _, r := range recs {
		w.vms[schema.IDFromKey(schema.VMsPrefix, r.Key)] = r
	}
	if err := listAt(ctx, s.Store, schema.VMStatusPrefix, rev, func(key string, st *basaltv1.VMStatus) {
		w.statuses[schema.IDFromKey(schema.VMStatusPrefix, key)] = st
	}); err != nil {
		return nil, err
	}
	if err := listAt(ctx, s.Store, schema.ComputeHostsPrefix, rev, func(key string, h *basaltv1.ComputeHost) {
		w.hosts[schema.IDFromKey(schema.ComputeHostsPrefix, key)] = h
	}); err != nil {
		return nil, err
	}
	if err := listAt(ctx, s.Store, schema.HostMaintenancePrefix, rev, func(key string, m *basaltv1.HostMaintenance) {
		w.maint[schema.IDFromKey(schema.HostMaintenancePrefix, key)] = m
	}); err != nil {
		return nil, err
	}
	nodes, err := registry.List(ctx, s.Store, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, true)
	if err != nil {
		return nil, toStatus(err)
	}
	for _, n := range nodes {
		w.nodes[n.GetNode().GetId()] = n
	}
	return w, nil
}

// listAt decodes every record under prefix at revision rev.
func listAt[M any, P store.Message[M]](ctx context.Context, s *store.Store, prefix string, rev int64, fn func(string, P)) error {
	resp, err := s.Client.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		return toStatus(fmt.Errorf("list %s: %w", prefix, err))
	}
	for _, kv := range resp.Kvs {
		r, err := store.Decode[M, P](string(kv.Key), kv.Value, kv.ModRevision, kv.CreateRevision, kv.Lease)
		if err != nil {
			return toStatus(err)
		}
		fn(string(kv.Key), r.Value)
	}
	return nil
}

// up reports whether a computed host is registered as a computed and holds a live lease.
func (w *vmWorld) up(host string) bool {
	n := w.nodes[host]
	return n != nil && n.GetNode().GetKind() == basaltv1.NodeKind_NODE_KIND_COMPUTED && n.GetState() == basaltv1.NodeState_NODE_STATE_UP
}

func (w *vmWorld) draining(host string) bool { return w.maint[host].GetDraining() }

// running reports whether the status says the VM's hypervisor process is alive on status.host.
func running(st *basaltv1.VMStatus) bool {
	switch st.GetState() {
	case basaltv1.VMState_VM_STATE_RUNNING, basaltv1.VMState_VM_STATE_PAUSED, basaltv1.VMState_VM_STATE_STOPPING,
		basaltv1.VMState_VM_STATE_MIGRATING, basaltv1.VMState_VM_STATE_STARTING:
		return true
	}
	return false
}

// memoryTarget is the memory a VM holds on its host: its balloon target (its startup memory until changed).
func memoryTarget(vm *basaltv1.VM) uint64 {
	if t := vm.GetMemoryTargetBytes(); t != 0 {
		return t
	}
	return vm.GetSpec().GetMemory().GetStartupBytes()
}

// maxMemoryOf is the most memory a VM can ever be given (what the hypervisor sizes its RAM for).
func maxMemoryOf(spec *basaltv1.VMSpec) uint64 {
	return max(spec.GetMemory().GetMaximumBytes(), spec.GetMemory().GetStartupBytes())
}

// holds reports whether vm takes memory on host: it is assigned there and should run, or still runs there
// (stopping), or is migrating there.
func (w *vmWorld) holds(name string, vm *basaltv1.VM, host string) bool {
	if vm.GetHost() == host && (vm.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED ||
		(w.statuses[name].GetHost() == host && running(w.statuses[name]))) {
		return true
	}
	return vm.GetMigration().GetTarget() == host
}

// committed sums the memory of the VMs host holds, leaving out skip.
func (w *vmWorld) committed(host, skip string) uint64 {
	var sum uint64
	for name, r := range w.vms {
		if name != skip && w.holds(name, r.Value, host) {
			sum += memoryTarget(r.Value)
		}
	}
	return sum
}

// free is the memory host still offers, leaving out skip's share.
func (w *vmWorld) free(host, skip string) uint64 {
	offered := w.hosts[host].GetMemoryBytes()
	used := w.committed(host, skip)
	if used >= offered {
		return 0
	}
	return offered - used
}

// placeRequest describes what a host must offer.
type placeRequest struct {
	vm     string
	spec   *basaltv1.VMSpec
	memory uint64
	// exclude are hosts that must not be chosen (a migration's source); hypervisor, if set, must match.
	exclude    []string
	hypervisor string
	// last is the host the VM last ran on, preferred among otherwise equal hosts.
	last string
	// sourceNetd, for a migration of a VM with NICs, is the netd of its source: a target sharing it cannot take
	// the VM (one tap cannot be held by two QEMUs; docs/netd.md).
	sourceNetd string
}

// candidates are the hosts the VM may ever run on: registered compute hosts, within its possible hosts.
func (w *vmWorld) candidates(spec *basaltv1.VMSpec) []string {
	var out []string
	possible := spec.GetPlacement().GetPossibleHosts()
	for h := range w.hosts {
		if len(possible) == 0 || slices.Contains(possible, h) {
			out = append(out, h)
		}
	}
	sort.Strings(out)
	return out
}

// check says why host cannot take the VM now, or nil.
func (w *vmWorld) check(host string, r placeRequest) error {
	h := w.hosts[host]
	switch {
	case h == nil:
		return status.Errorf(codes.NotFound, "host %q is not a computed host (see 'basalt host list')", host)
	case slices.Contains(r.exclude, host):
		return status.Errorf(codes.FailedPrecondition, "host %q is the VM's own host", host)
	case !w.up(host):
		return status.Errorf(codes.FailedPrecondition, "host %q is down", host)
	case w.draining(host):
		return status.Errorf(codes.FailedPrecondition, "host %q is in maintenance (draining); 'basalt host undrain %s' ends it", host, host)
	case r.hypervisor != "" && h.GetHypervisor() != r.hypervisor:
		return status.Errorf(codes.FailedPrecondition, "host %q runs %s, the VM runs under %s", host, h.GetHypervisor(), r.hypervisor)
	}
	if possible := r.spec.GetPlacement().GetPossibleHosts(); len(possible) > 0 && !slices.Contains(possible, host) {
		return status.Errorf(codes.FailedPrecondition, "host %q is not one of the VM's possible hosts (%s)", host, strings.Join(possible, ", "))
	}
	if len(r.spec.GetNics()) > 0 && h.GetNetdNode() == "" {
		return status.Errorf(codes.FailedPrecondition, "host %q lacks the VM's networks (%s): it has no netd", host, strings.Join(nicNetworks(r.spec), ", "))
	}
	if len(r.spec.GetNics()) > 0 && r.sourceNetd != "" && h.GetNetdNode() == r.sourceNetd {
		return status.Errorf(codes.FailedPrecondition, "host %q shares netd %s with the VM's host: a VM with NICs migrates only to a host with a netd of its own", host, r.sourceNetd)
	}
	if maxMem := maxMemoryOf(r.spec); maxMem > h.GetMemoryBytes() {
		return status.Errorf(codes.FailedPrecondition, "host %q offers %s of memory, the VM may grow to %s", host, sizeText(h.GetMemoryBytes()), sizeText(maxMem))
	}
	if free := w.free(host, r.vm); free < r.memory {
		return status.Errorf(codes.FailedPrecondition, "host %q has %s of memory free (of %s), the VM needs %s", host, sizeText(free), sizeText(h.GetMemoryBytes()), sizeText(r.memory))
	}
	return nil
}

// place picks a host for r. Ranked, best first: the fewest VMs of r's anti-affinity group (so members are
// kept apart when there is room, and spread evenly when there is not), then the order of the preferred hosts,
// then the host the VM last ran on (r.last: its console log stays in one place), then the most free memory,
// then the name. The error lists why each candidate was refused.
func (w *vmWorld) place(r placeRequest) (string, error) {
	type cand struct {
		host    string
		members int
		pref    int
		free    uint64
	}
	preferred := r.spec.GetPlacement().GetPreferredHosts()
	group := r.spec.GetPlacement().GetAntiAffinityGroup()
	var ok []cand
	var why []string
	for _, h := range w.candidates(r.spec) {
		if err := w.check(h, r); err != nil {
			why = append(why, status.Convert(err).Message())
			continue
		}
		pref := slices.Index(preferred, h)
		if pref < 0 {
			pref = len(preferred)
		}
		ok = append(ok, cand{host: h, members: w.groupMembers(group, h, r.vm), pref: pref, free: w.free(h, r.vm)})
	}
	if len(ok) == 0 {
		if len(why) == 0 {
			return "", status.Error(codes.FailedPrecondition, "no computed host is registered (start computed, or see 'basalt host list')")
		}
		return "", status.Errorf(codes.FailedPrecondition, "no host can take VM %q: %s", r.vm, strings.Join(why, "; "))
	}
	sort.Slice(ok, func(i, j int) bool {
		a, b := ok[i], ok[j]
		switch {
		case a.members != b.members:
			return a.members < b.members
		case a.pref != b.pref:
			return a.pref < b.pref
		case (a.host == r.last) != (b.host == r.last):
			return a.host == r.last
		case a.free != b.free:
			return a.free > b.free
		}
		return a.host < b.host
	})
	return ok[0].host, nil
}

// groupMembers counts the VMs of anti-affinity group (other than skip) that host holds; 0 for no group.
func (w *vmWorld) groupMembers(group, host, skip string) int {
	if group == "" {
		return 0
	}
	n := 0
	for name, r := range w.vms {
		if name != skip && r.Value.GetSpec().GetPlacement().GetAntiAffinityGroup() == group && w.holds(name, r.Value, host) {
			n++
		}
	}
	return n
}

func nicNetworks(spec *basaltv1.VMSpec) []string {
	var out []string
	for _, n := range spec.GetNics() {
		if !slices.Contains(out, n.GetNetwork()) {
			out = append(out, n.GetNetwork())
		}
	}
	return out
}

// sizeText writes a byte count with a binary unit.
func sizeText(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if v == float64(uint64(v)) {
		return fmt.Sprintf("%d %s", uint64(v), units[i])
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}

// putVM writes a VM's declaration in a transaction that holds only if no declaration changed since w was read:
// placement decisions (memory committed per host) are made on w, so a concurrent start or migration elsewhere
// forces a fresh look instead of committing the same memory twice. It bumps the generation. A nil vm deletes
// the declaration, the status and the metering history. It returns the new revision, or store.ErrConflict (wrapped).
func (s *VMServer) putVM(ctx context.Context, w *vmWorld, name string, vm *basaltv1.VM, create bool) (int64, error) {
	key := schema.VMKey(name)
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(schema.VMsPrefix).WithPrefix(), "<", w.rev+1)}
	if create {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
	}
	var ops []clientv3.Op
	if vm == nil {
		ops = []clientv3.Op{clientv3.OpDelete(key), clientv3.OpDelete(schema.VMStatusKey(name)), metering.DeleteOp(name)}
	} else {
		vm.Generation++
		vm.Status, vm.State, vm.Revision = nil, basaltv1.VMState_VM_STATE_UNSPECIFIED, 0
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(vm)
		if err != nil {
			return 0, status.Errorf(codes.Internal, "encode VM: %v", err)
		}
		ops = []clientv3.Op{clientv3.OpPut(key, string(b))}
	}
	resp, err := s.Store.Client.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return 0, toStatus(fmt.Errorf("write VM %s: %w", name, err))
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("write VM %s: %w", name, store.ErrConflict)
	}
	return resp.Header.Revision, nil
}

// updateVM applies fn to the VM's declaration and writes it, reading everything again when another
// declaration changed meanwhile. fn returns a gRPC status error to refuse the change (nothing is written),
// or nil with the VM modified in place. A nil VM from fn deletes it.
func (s *VMServer) updateVM(ctx context.Context, name string, fn func(w *vmWorld, vm *basaltv1.VM) (*basaltv1.VM, error)) (*basaltv1.VM, error) {
	if err := schema.ValidateName("VM", name); err != nil {
		return nil, invalid("%v", err)
	}
	for attempt := 0; ; attempt++ {
		w, err := s.loadWorld(ctx)
		if err != nil {
			return nil, err
		}
		rec, ok := w.vms[name]
		if !ok {
			return nil, status.Errorf(codes.NotFound, "VM %q does not exist", name)
		}
		vm, err := fn(w, proto.Clone(rec.Value).(*basaltv1.VM))
		if err != nil {
			return nil, err
		}
		rev, err := s.putVM(ctx, w, name, vm, false)
		if errors.Is(err, store.ErrConflict) && attempt < 20 && ctx.Err() == nil {
			continue
		}
		if err != nil {
			return nil, toStatus(err)
		}
		if vm == nil {
			return nil, nil
		}
		vm.Revision = rev
		vm.Status = w.statuses[name]
		vm.State = observedState(vm, vm.Status)
		return vm, nil
	}
}
