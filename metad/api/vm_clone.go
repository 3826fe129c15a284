package api

import (
	"context"
	"errors"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// CloneVM makes a new VM from a checkpoint of a VM's volumes: one consistency group, taken while the source
// runs (blockd holds the group's writes for the instant of the cut; the guest is never paused), then a linked
// clone of each volume. A failure removes what the call created.
func (s *VMServer) CloneVM(ctx context.Context, r *basaltv1.CloneVMRequest) (*basaltv1.VM, error) {
	name := r.GetName()
	if err := schema.ValidateName("VM", name); err != nil {
		return nil, invalid("%v", err)
	}
	src, _, err := s.get(ctx, r.GetSource())
	if err != nil {
		return nil, err
	}
	if _, err := store.Get[basaltv1.VM](ctx, s.Store, schema.VMKey(name)); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "VM %q already exists", name)
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, toStatus(err)
	}
	ckpt := r.GetCheckpoint()
	if ckpt == "" {
		ckpt = "clone-" + name
	}
	if err := schema.ValidateName("checkpoint", ckpt); err != nil {
		return nil, invalid("%v", err)
	}
	spec := proto.Clone(src.Value.GetSpec()).(*basaltv1.VMSpec)
	spec.Nics = nil // a port is one VM's NIC
	var vols, clones []string
	for _, d := range spec.GetDisks() {
		clone := name + "-" + d.GetVolume()
		if err := schema.ValidateName("volume", clone); err != nil {
			return nil, invalid("the clone's volume for %s: %v (choose a shorter VM name)", d.GetVolume(), err)
		}
		vols, clones = append(vols, d.GetVolume()), append(clones, clone)
	}
	cs := &CheckpointServer{Store: s.Store, Peers: s.Peers}
	vs := &VolumeServer{Store: s.Store, Peers: s.Peers}
	var created []string
	undo := func() {
		uctx := context.WithoutCancel(ctx)
		for _, v := range created {
			vs.DeleteVolume(uctx, &basaltv1.DeleteVolumeRequest{Name: v})
		}
		for _, v := range vols {
			cs.DeleteCheckpoint(uctx, &basaltv1.DeleteCheckpointRequest{Volume: v, Name: ckpt})
		}
	}
	if len(vols) > 0 {
		if _, err := cs.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: ckpt, Volumes: vols}); err != nil {
			return nil, err
		}
	}
	for i, v := range vols {
		if _, err := vs.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: clones[i], Source: v + "@" + ckpt}); err != nil {
			undo()
			return nil, err
		}
		created = append(created, clones[i])
		spec.Disks[i].Volume = clones[i]
	}
	vm, err := s.create(ctx, name, spec, r.GetStart(), r.GetSource()+"@"+ckpt)
	if err != nil {
		undo()
		return nil, err
	}
	return vm, nil
}
