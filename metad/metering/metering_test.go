package metering

import (
	"context"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestHourRecords: samples land in the record of the hour they end in, History reads them back in order across
// records, records older than the retention are deleted by the next append, and DeleteOp removes them all.
// (Merging, bounds and concurrent appenders are tested through computed/vmhost's appendMetering.)
func TestHourRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Create(ctx, schema.VMKey("vm1"), &basaltv1.VM{Name: "vm1"}); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 25, 12, 30, 0, 0, time.UTC)
	at := func(ago time.Duration) *basaltv1.VMMeteringSample {
		end := now.Add(-ago)
		return &basaltv1.VMMeteringSample{Host: "h1", Start: timestamppb.New(end.Add(-time.Minute)), End: timestamppb.New(end), CpuTimeNs: uint64(ago)}
	}
	// 12:29 and 12:25 in one record, 11:40 in another, 25 hours ago in a third.
	if err := Append(ctx, s, "vm1", []*basaltv1.VMMeteringSample{at(25 * time.Hour), at(50 * time.Minute), at(5 * time.Minute), at(time.Minute)}, 1440, now.Add(-25*time.Hour)); err != nil {
		t.Fatal(err)
	}
	keys := func() []string {
		resp, err := s.Client.Get(ctx, schema.VMMeteringVMPrefix("vm1"), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, kv := range resp.Kvs {
			out = append(out, string(kv.Key)[len(schema.VMMeteringVMPrefix("vm1")):])
		}
		return out
	}
	if got := keys(); len(got) != 3 || got[0] != "2026-11-24T11" || got[1] != "2026-11-25T11" || got[2] != "2026-11-25T12" {
		t.Fatalf("records %v", got)
	}
	// An append at now expires the record of yesterday's 11 o'clock.
	if err := Append(ctx, s, "vm1", []*basaltv1.VMMeteringSample{at(0)}, 1440, now); err != nil {
		t.Fatal(err)
	}
	if got := keys(); len(got) != 2 || got[0] != "2026-11-25T11" {
		t.Fatalf("records after expiry %v", got)
	}
	if _, err := s.Client.Txn(ctx).Then(DeleteOp("vm1")).Commit(); err != nil {
		t.Fatal(err)
	}
	if got := keys(); len(got) != 0 {
		t.Fatalf("records after DeleteOp %v", got)
	}
	// A VM that is gone gets no history back.
	if _, err := s.Client.Delete(ctx, schema.VMKey("vm1")); err != nil {
		t.Fatal(err)
	}
	if err := Append(ctx, s, "vm1", []*basaltv1.VMMeteringSample{at(0)}, 1440, now); err != ErrVMGone {
		t.Fatalf("append for a deleted VM: %v", err)
	}
}

// TestHistoryOrder: History returns samples of several records oldest first.
func TestHistoryOrder(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := store.New(etcdtest.Start(t, "").Client(t))
	if _, err := s.Create(ctx, schema.VMKey("vm1"), &basaltv1.VM{Name: "vm1"}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var add []*basaltv1.VMMeteringSample
	for i := 180; i >= 0; i -= 30 { // three hours, newest last, written in reverse order
		end := now.Add(-time.Duration(i) * time.Minute)
		add = append([]*basaltv1.VMMeteringSample{{Host: "h1", Start: timestamppb.New(end.Add(-time.Minute)), End: timestamppb.New(end)}}, add...)
	}
	if err := Append(ctx, s, "vm1", add, 1440, now); err != nil {
		t.Fatal(err)
	}
	got, err := History(ctx, s, "vm1")
	if err != nil || len(got) != len(add) {
		t.Fatalf("history: %d samples, %v; want %d", len(got), err, len(add))
	}
	for i := 1; i < len(got); i++ {
		if !got[i].GetEnd().AsTime().After(got[i-1].GetEnd().AsTime()) {
			t.Fatalf("history not in order at %d: %v", i, got)
		}
	}
}
