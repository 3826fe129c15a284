package api_test

import (
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/metering"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestVMMeteringHistoryAPI: GetVMStats with history returns the history the hosts stored, oldest first, for a
// stopped VM and for a running one whose host does not answer, with the current meters left empty; without
// history the call is what it was. Deleting the VM deletes its history.
func TestVMMeteringHistoryAPI(t *testing.T) {
	e := newVMEnv(t)
	e.host("computed-1", 1024, "") // registered at 127.0.0.1:1: nothing answers there
	if _, err := e.vms.CreateVM(e.ctx, &basaltv1.CreateVMRequest{Name: "v1", Spec: spec(64, "d1")}); err != nil {
		t.Fatal(err)
	}
	stats := func(history bool) (*basaltv1.VMStats, error) {
		return e.vms.GetVMStats(e.ctx, &basaltv1.GetVMStatsRequest{Name: "v1", History: history})
	}

	st, err := stats(true)
	if err != nil || st.GetName() != "v1" || len(st.GetHistory()) != 0 {
		t.Fatalf("history of a VM that never ran: %v, %v", st, err)
	}

	t0 := time.Now().Add(-time.Hour).Truncate(time.Minute)
	hist := &basaltv1.VMMeteringHistory{}
	for i, host := range []string{"computed-1", "computed-1", "computed-2"} {
		start := t0.Add(time.Duration(i) * time.Minute)
		hist.Samples = append(hist.Samples, &basaltv1.VMMeteringSample{Start: timestamppb.New(start), End: timestamppb.New(start.Add(time.Minute)),
			Host: host, CpuTimeNs: uint64(i+1) * 1e9, CpuUsage: float64(i+1) / 60, MemoryActualBytes: 64 * mib, WriteBytes: 4096, WriteOps: 1})
	}
	if err := metering.Append(e.ctx, e.s, "v1", hist.Samples, 1440, time.Now()); err != nil {
		t.Fatal(err)
	}
	same := func(what string, st *basaltv1.VMStats) {
		t.Helper()
		got := &basaltv1.VMMeteringHistory{Samples: st.GetHistory()}
		if !proto.Equal(got, hist) || st.GetHost() != "" || st.GetSampledAt() != nil || st.GetCpuTimeNs() != 0 {
			t.Fatalf("%s: %v; want the stored history %v and no current meters", what, st, hist)
		}
	}

	st, err = stats(true)
	if err != nil {
		t.Fatal(err)
	}
	same("history of a stopped VM", st)
	_, err = stats(false)
	expectCode(t, "current meters of a stopped VM", err, codes.FailedPrecondition, "meters exist only while it runs")

	if _, err := e.vms.StartVM(e.ctx, &basaltv1.StartVMRequest{Name: "v1"}); err != nil {
		t.Fatal(err)
	}
	e.report("v1", "computed-1", basaltv1.VMState_VM_STATE_RUNNING)
	st, err = stats(true)
	if err != nil {
		t.Fatal(err)
	}
	same("history of a running VM whose host does not answer", st)
	if _, err := stats(false); err == nil {
		t.Fatal("current meters from a host that does not answer")
	}

	if _, err := e.vms.DeleteVM(e.ctx, &basaltv1.DeleteVMRequest{Name: "v1", Force: true}); err != nil {
		t.Fatal(err)
	}
	if got, err := metering.History(e.ctx, e.s, "v1"); err != nil || len(got) != 0 {
		t.Fatalf("the metering history outlived its VM: %v, %v", got, err)
	}
	_, err = stats(true)
	expectCode(t, "history of a deleted VM", err, codes.NotFound, `VM "v1" does not exist`)
}
