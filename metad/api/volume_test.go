package api_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/clustermap"
	"github.com/basalt-hv/basalt/metad/schema"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestVolumeLifecycle(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	vs := basaltv1.NewVolumeServiceClient(c)

	// A 1 PiB volume is a record, nothing more.
	const pib = 1 << 50
	v, err := vs.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: "big", SizeBytes: pib})
	if err != nil {
		t.Fatal(err)
	}
	if v.GetId() == 0 || v.GetReplicas() != 3 || v.GetSectorSize() != 512 || v.GetPool() != "default" || v.GetRevision() == 0 {
		t.Fatalf("created %v", v)
	}
	raw, err := s.Client.Get(ctx, schema.VolumeKey("big"))
	if err != nil || len(raw.Kvs) != 1 || len(raw.Kvs[0].Value) > 256 {
		t.Fatalf("a 1 PiB volume's metadata is %v bytes, want a small record", raw)
	}

	for _, tc := range []struct {
		req  *basaltv1.CreateVolumeRequest
		code codes.Code
	}{
		{&basaltv1.CreateVolumeRequest{Name: "big", SizeBytes: 4096}, codes.AlreadyExists},
		{&basaltv1.CreateVolumeRequest{Name: "Bad", SizeBytes: 4096}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 0}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 1000}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 4096, SectorSize: 1024}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 512, SectorSize: 4096}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 1 << 61}, codes.InvalidArgument},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 4096, Pool: "nope"}, codes.NotFound},
		{&basaltv1.CreateVolumeRequest{Name: "z", SizeBytes: 4096, Replicas: 2}, codes.InvalidArgument},
	} {
		if _, err := vs.CreateVolume(ctx, tc.req); status.Code(err) != tc.code {
			t.Errorf("CreateVolume(%v) = %v, want %s", tc.req, err, tc.code)
		}
	}

	// Concurrent creates get distinct IDs.
	var wg sync.WaitGroup
	ids := make(chan uint64, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := vs.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: "v" + string(rune('0'+i)), SizeBytes: 1 << 30, SectorSize: 4096})
			if err != nil {
				t.Error(err)
				return
			}
			ids <- v.GetId()
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[uint64]bool{v.GetId(): true}
	for id := range ids {
		if seen[id] {
			t.Fatalf("volume ID %d handed out twice", id)
		}
		seen[id] = true
	}
	list, err := vs.ListVolumes(ctx, &basaltv1.ListVolumesRequest{})
	if err != nil || len(list.GetVolumes()) != 11 {
		t.Fatalf("ListVolumes: %d volumes, %v; want 11", len(list.GetVolumes()), err)
	}

	// Resize: grow freely, shrink only with force, sizes validated.
	if v, err := vs.ResizeVolume(ctx, &basaltv1.ResizeVolumeRequest{Name: "v1", SizeBytes: 2 << 30}); err != nil || v.GetSizeBytes() != 2<<30 {
		t.Fatalf("grow: %v, %v", v, err)
	}
	// With a storage node down, nobody can vouch that nothing was written past the new end.
	if _, err := clustermap.Update(ctx, s, func(m *basaltv1.ClusterMap) error {
		m.Nodes = append(m.Nodes, &basaltv1.StorageNode{Id: "b9", FailureDomain: "b9", In: true})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := vs.ResizeVolume(ctx, &basaltv1.ResizeVolumeRequest{Name: "v1", SizeBytes: 1 << 20}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "b9 is down") {
		t.Fatalf("shrink without force, with a storage node down = %v", err)
	}
	if v, err := vs.ResizeVolume(ctx, &basaltv1.ResizeVolumeRequest{Name: "v1", SizeBytes: 1 << 20, Force: true}); err != nil || v.GetSizeBytes() != 1<<20 {
		t.Fatalf("shrink with force: %v, %v", v, err)
	}
	if _, err := vs.ResizeVolume(ctx, &basaltv1.ResizeVolumeRequest{Name: "v1", SizeBytes: 1000}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("resize to a non-multiple of the sector = %v", err)
	}

	// Delete, then it is gone; its ID is never reused.
	if _, err := vs.DeleteVolume(ctx, &basaltv1.DeleteVolumeRequest{Name: "big"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vs.GetVolume(ctx, &basaltv1.GetVolumeRequest{Name: "big"}); status.Code(err) != codes.NotFound {
		t.Fatalf("GetVolume after delete = %v", err)
	}
	again, err := vs.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: "big", SizeBytes: 4096})
	if err != nil || seen[again.GetId()] {
		t.Fatalf("re-created volume got ID %d (%v); IDs must not be reused", again.GetId(), err)
	}
}

func TestPoolsAndVolumeStatus(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	vs := basaltv1.NewVolumeServiceClient(c)
	p, err := vs.CreatePool(ctx, &basaltv1.CreatePoolRequest{Name: "two", Replicas: 2, PgCount: 16})
	if err != nil || p.GetId() != 2 {
		t.Fatalf("CreatePool = %v, %v", p, err)
	}
	for _, req := range []*basaltv1.CreatePoolRequest{{Name: "two", Replicas: 2}, {Name: "x", Replicas: 0}, {Name: "x", Replicas: 6}, {Name: "x", Replicas: 1, PgCount: 1 << 20}} {
		if _, err := vs.CreatePool(ctx, req); err == nil {
			t.Errorf("CreatePool(%v) accepted", req)
		}
	}
	if _, err := vs.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: "d", SizeBytes: 1 << 30, Pool: "two"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vs.DeletePool(ctx, &basaltv1.DeletePoolRequest{Name: "two"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeletePool of a pool with volumes = %v", err)
	}
	if _, err := vs.DeletePool(ctx, &basaltv1.DeletePoolRequest{Name: "default"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeletePool(default) = %v", err)
	}

	// Three storage nodes in three domains; one is down.
	_, err = clustermap.Update(ctx, s, func(m *basaltv1.ClusterMap) error {
		for i, id := range []string{"b1", "b2", "b3"} {
			m.Nodes = append(m.Nodes, &basaltv1.StorageNode{Id: id, FailureDomain: id, In: true, Up: i != 2})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := vs.GetVolumeStatus(ctx, &basaltv1.GetVolumeRequest{Name: "d"})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetPgsTotal() != 16 || st.GetPgsHealthy()+st.GetPgsDegraded() != 16 || st.GetPgsUnavailable() != 0 || st.GetPgsDegraded() == 0 {
		t.Fatalf("status with one of three nodes down (2 replicas) = %v", st)
	}
	var members uint32
	for _, n := range st.GetNodes() {
		members += n.GetPgs()
	}
	if members != 32 {
		t.Fatalf("%d PG memberships, want 16 PGs x 2 replicas", members)
	}
	if _, err := vs.DeleteVolume(ctx, &basaltv1.DeleteVolumeRequest{Name: "d"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vs.DeletePool(ctx, &basaltv1.DeletePoolRequest{Name: "two"}); err != nil {
		t.Fatalf("DeletePool of an empty pool: %v", err)
	}
}
