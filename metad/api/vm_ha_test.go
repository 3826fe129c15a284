package api_test

import (
	"testing"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
)

// TestAntiAffinityPlacement: members of a group go to different hosts while there is room, then spread evenly;
// the group ranks above the preferred hosts.
func TestAntiAffinityPlacement(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 4096, "")
	e.host("computed-2", 4096, "")
	e.host("computed-3", 1024, "")
	hosts := map[string]int{}
	for _, name := range []string{"db1", "db2", "db3", "db4", "db5", "db6"} {
		s := spec(128)
		s.Placement = &basaltv1.VMPlacement{AntiAffinityGroup: "db", PreferredHosts: []string{"computed-1"}}
		vm, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: name, Spec: s, Start: true})
		if err != nil {
			t.Fatal(err)
		}
		hosts[vm.GetHost()]++
		if name == "db3" && (hosts["computed-1"] != 1 || hosts["computed-2"] != 1 || hosts["computed-3"] != 1) {
			t.Fatalf("three members on three hosts: %v", hosts)
		}
	}
	if hosts["computed-1"] != 2 || hosts["computed-2"] != 2 || hosts["computed-3"] != 2 {
		t.Fatalf("six members spread %v, want two per host", hosts)
	}
	// Outside the group, the preferred host wins again.
	vm, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "web", Spec: func() *basaltv1.VMSpec {
		s := spec(128)
		s.Placement = &basaltv1.VMPlacement{PreferredHosts: []string{"computed-3"}}
		return s
	}(), Start: true})
	if err != nil || vm.GetHost() != "computed-3" {
		t.Fatalf("preferred host: %v, %v", vm.GetHost(), err)
	}
}

func TestUpdateVM(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "")
	e.host("computed-2", 1024, "")
	s := spec(128)
	s.Placement = &basaltv1.VMPlacement{PossibleHosts: []string{"computed-1"}}
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "a", Spec: s, Start: true}); err != nil {
		t.Fatal(err)
	}
	update := func(in *basaltv1.VMSpec, paths ...string) (*basaltv1.VM, error) {
		return e.vms.UpdateVM(e.ctx, &basaltv1.UpdateVMRequest{Name: "a", Spec: in, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths}})
	}
	vm, err := update(&basaltv1.VMSpec{Priority: basaltv1.VMPriority_VM_PRIORITY_HIGH,
		Placement:  &basaltv1.VMPlacement{AntiAffinityGroup: "g1", PreferredHosts: []string{"computed-2"}},
		Monitoring: &basaltv1.VMMonitoring{Heartbeat: true, TimeoutSeconds: 30}},
		"priority", "placement.anti_affinity_group", "monitoring")
	if err != nil {
		t.Fatal(err)
	}
	sp := vm.GetSpec()
	if sp.GetPriority() != basaltv1.VMPriority_VM_PRIORITY_HIGH || sp.GetPlacement().GetAntiAffinityGroup() != "g1" ||
		!sp.GetMonitoring().GetHeartbeat() || len(sp.GetPlacement().GetPreferredHosts()) != 0 ||
		len(sp.GetPlacement().GetPossibleHosts()) != 1 || sp.GetMemory().GetStartupBytes() != 128*mib {
		t.Fatalf("only the masked fields change: %v", sp)
	}
	_, err = update(&basaltv1.VMSpec{Placement: &basaltv1.VMPlacement{PossibleHosts: []string{"computed-2"}}}, "placement.possible_hosts")
	expectCode(t, "possible hosts that leave out the VM's host", err, codes.FailedPrecondition, "migrate it first")
	_, err = update(&basaltv1.VMSpec{Placement: &basaltv1.VMPlacement{PossibleHosts: []string{"computed-9"}}}, "placement.possible_hosts")
	expectCode(t, "an unknown host", err, codes.NotFound, `"computed-9" is not a computed host`)
	_, err = update(&basaltv1.VMSpec{Memory: &basaltv1.VMMemory{StartupBytes: 256 * mib}}, "memory.startup_bytes")
	expectCode(t, "a field UpdateVM does not change", err, codes.InvalidArgument, "cannot be changed")
	_, err = update(&basaltv1.VMSpec{}, "")
	expectCode(t, "an empty path", err, codes.InvalidArgument, "cannot be changed")
	_, err = update(&basaltv1.VMSpec{Monitoring: &basaltv1.VMMonitoring{Heartbeat: true, TimeoutSeconds: 1}}, "monitoring")
	expectCode(t, "a heartbeat timeout too short", err, codes.InvalidArgument, "want 3 to 3600 seconds")
	_, err = update(&basaltv1.VMSpec{Priority: 9}, "priority")
	expectCode(t, "an unknown priority", err, codes.InvalidArgument, "unknown priority")
	_, err = update(&basaltv1.VMSpec{Placement: &basaltv1.VMPlacement{AntiAffinityGroup: "Bad Name"}}, "placement.anti_affinity_group")
	expectCode(t, "a bad group name", err, codes.InvalidArgument, "anti-affinity group")
	_, err = e.vms.UpdateVM(e.ctx, &basaltv1.UpdateVMRequest{Name: "a", Spec: &basaltv1.VMSpec{}})
	expectCode(t, "no mask", err, codes.InvalidArgument, "names no field")
	vm, _ = e.vms.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: "a"})
	if vm.GetSpec().GetPlacement().GetPossibleHosts()[0] != "computed-1" || vm.GetSpec().GetPriority() != basaltv1.VMPriority_VM_PRIORITY_HIGH {
		t.Fatalf("refused updates changed the VM: %v", vm.GetSpec())
	}
}
