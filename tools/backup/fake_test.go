package backup

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/blockd/nbd"
	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// fakeCluster stands in for metad and a blockd in the package's tests: the API calls a backup makes, and
// blockd's real NBD server (in-process, on a Unix socket) over in-memory volumes. Volumes are maps of 4 KiB
// pages that are never modified in place, so a checkpoint is a copy of the map, and what changed between two
// checkpoints is the pages whose pointers differ: changed-block tracking at the engine's granularity. The
// end-to-end test (tools/e2e/backup_test.go) runs the same operations against a real cluster.
type fakeCluster struct {
	sock string

	mu     sync.Mutex
	vols   map[string]*fakeVol
	nextID uint64

	// checkpointReads counts the bytes read through checkpoint exports.
	checkpointReads atomic.Int64
	// failWritesAfter, when positive, makes writes fail once that many bytes have been written.
	failWritesAfter atomic.Int64
	written         atomic.Int64
	// failCheckpointReads makes every read of a checkpoint export fail.
	failCheckpointReads atomic.Bool
}

const pageSize = 4096

type pageMap map[int64]*[pageSize]byte

type fakeVol struct {
	id     uint64
	name   string
	size   uint64
	sector uint32
	pages  pageMap
	ckpts  []*fakeCkpt
	nextCk uint32
}

type fakeCkpt struct {
	name    string
	id      uint32
	size    uint64
	pages   pageMap
	group   []string
	created time.Time
}

func newFakeCluster(t *testing.T) *fakeCluster {
	c := &fakeCluster{vols: map[string]*fakeVol{}, sock: filepath.Join(t.TempDir(), "nbd.sock")}
	ln, err := net.Listen("unix", c.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := &nbd.Server{Exports: c, Logger: slog.New(slog.DiscardHandler)}
	go func() { srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func (c *fakeCluster) api() API { return API{Volumes: c, Checkpoints: c} }

func (c *fakeCluster) vol(name string) (*fakeVol, error) {
	v := c.vols[name]
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %q does not exist", name)
	}
	return v, nil
}

func (v *fakeVol) proto() *basaltv1.Volume {
	out := &basaltv1.Volume{Name: v.name, SizeBytes: v.size, SectorSize: v.sector, Id: v.id, CheckpointSeq: v.nextCk}
	for _, ck := range v.ckpts {
		out.Checkpoints = append(out.Checkpoints, ck.proto(v.name))
	}
	return out
}

func (ck *fakeCkpt) proto(volume string) *basaltv1.Checkpoint {
	return &basaltv1.Checkpoint{Volume: volume, Name: ck.name, Id: ck.id, SizeBytes: ck.size, Group: ck.group, CreatedAt: timestamppb.New(ck.created)}
}

func (v *fakeVol) checkpoint(name string) *fakeCkpt {
	for _, ck := range v.ckpts {
		if ck.name == name {
			return ck
		}
	}
	return nil
}

// VolumeAPI.

func (c *fakeCluster) GetVolume(ctx context.Context, in *basaltv1.GetVolumeRequest, _ ...grpc.CallOption) (*basaltv1.Volume, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, err := c.vol(in.GetName())
	if err != nil {
		return nil, err
	}
	return v.proto(), nil
}

func (c *fakeCluster) CreateVolume(ctx context.Context, in *basaltv1.CreateVolumeRequest, _ ...grpc.CallOption) (*basaltv1.Volume, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.vols[in.GetName()] != nil {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", in.GetName())
	}
	sector := in.GetSectorSize()
	if sector == 0 {
		sector = 512
	}
	if in.GetSizeBytes() == 0 || in.GetSizeBytes()%uint64(sector) != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "size %d", in.GetSizeBytes())
	}
	c.nextID++
	v := &fakeVol{id: c.nextID, name: in.GetName(), size: in.GetSizeBytes(), sector: sector, pages: pageMap{}}
	c.vols[v.name] = v
	return v.proto(), nil
}

func (c *fakeCluster) DeleteVolume(ctx context.Context, in *basaltv1.DeleteVolumeRequest, _ ...grpc.CallOption) (*basaltv1.DeleteVolumeResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.vol(in.GetName()); err != nil {
		return nil, err
	}
	delete(c.vols, in.GetName())
	return &basaltv1.DeleteVolumeResponse{}, nil
}

func (c *fakeCluster) GetVolumeStatus(ctx context.Context, in *basaltv1.GetVolumeRequest, _ ...grpc.CallOption) (*basaltv1.VolumeStatus, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, err := c.vol(in.GetName())
	if err != nil {
		return nil, err
	}
	return &basaltv1.VolumeStatus{Volume: v.proto(), NbdUris: []string{
		"nbd://127.0.0.1:1/" + v.name, // a blockd that is not there: the local socket must be preferred
		fmt.Sprintf("nbd+unix:///%s?socket=%s", v.name, c.sock),
	}}, nil
}

// CheckpointAPI.

func (c *fakeCluster) CreateCheckpoint(ctx context.Context, in *basaltv1.CreateCheckpointRequest, _ ...grpc.CallOption) (*basaltv1.CreateCheckpointResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, name := range in.GetVolumes() {
		v, err := c.vol(name)
		if err != nil {
			return nil, err
		}
		if v.checkpoint(in.GetName()) != nil {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already has a checkpoint %q", name, in.GetName())
		}
	}
	resp := &basaltv1.CreateCheckpointResponse{}
	now := time.Now()
	for _, name := range in.GetVolumes() {
		v := c.vols[name]
		v.nextCk++
		ck := &fakeCkpt{name: in.GetName(), id: v.nextCk, size: v.size, pages: pageMap{}, group: in.GetVolumes(), created: now}
		for k, p := range v.pages {
			ck.pages[k] = p
		}
		v.ckpts = append(v.ckpts, ck)
		resp.Checkpoints = append(resp.Checkpoints, ck.proto(name))
	}
	return resp, nil
}

func (c *fakeCluster) DeleteCheckpoint(ctx context.Context, in *basaltv1.DeleteCheckpointRequest, _ ...grpc.CallOption) (*basaltv1.DeleteCheckpointResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, err := c.vol(in.GetVolume())
	if err != nil {
		return nil, err
	}
	for i, ck := range v.ckpts {
		if ck.name == in.GetName() {
			v.ckpts = append(v.ckpts[:i], v.ckpts[i+1:]...)
			return &basaltv1.DeleteCheckpointResponse{}, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", in.GetVolume(), in.GetName())
}

func (c *fakeCluster) GetChangedExtents(ctx context.Context, in *basaltv1.GetChangedExtentsRequest, _ ...grpc.CallOption) (*basaltv1.GetChangedExtentsResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, err := c.vol(in.GetVolume())
	if err != nil {
		return nil, err
	}
	from, to, end := pageMap{}, v.pages, v.size
	if in.GetFrom() != "" {
		ck := v.checkpoint(in.GetFrom())
		if ck == nil {
			return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", v.name, in.GetFrom())
		}
		from = ck.pages
	}
	if in.GetTo() != "" {
		ck := v.checkpoint(in.GetTo())
		if ck == nil {
			return nil, status.Errorf(codes.NotFound, "volume %q has no checkpoint %q", v.name, in.GetTo())
		}
		to, end = ck.pages, ck.size
	}
	var keys []int64
	for k := range from {
		if from[k] != to[k] {
			keys = append(keys, k)
		}
	}
	for k := range to {
		if _, ok := from[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	resp := &basaltv1.GetChangedExtentsResponse{}
	for _, k := range keys {
		off := uint64(k * pageSize)
		if off >= end {
			continue
		}
		e := &basaltv1.ChangedExtent{Offset: off, Length: min(pageSize, end-off), Zero: to[k] == nil}
		if n := len(resp.Extents); n > 0 {
			last := resp.Extents[n-1]
			if last.Offset+last.Length == e.Offset && last.Zero == e.Zero {
				last.Length += e.Length
				resp.ChangedBytes += e.Length
				continue
			}
		}
		resp.Extents = append(resp.Extents, e)
		resp.ChangedBytes += e.Length
	}
	return resp, nil
}

// nbd.ExportSource.

func (c *fakeCluster) Export(ctx context.Context, name string) (*nbd.Export, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	volName, ckName, atCk := strings.Cut(name, "@")
	v := c.vols[volName]
	if v == nil {
		return nil, fmt.Errorf("%q: %w", name, nbd.ErrNoSuchExport)
	}
	e := &nbd.Export{Name: name, Size: int64(v.size), MinBlockSize: v.sector, Backend: &fakeDisk{c: c, v: v}}
	if atCk {
		ck := v.checkpoint(ckName)
		if ck == nil {
			return nil, fmt.Errorf("%q: %w", name, nbd.ErrNoSuchExport)
		}
		e.Size, e.ReadOnly, e.Backend = int64(ck.size), true, &fakeDisk{c: c, v: v, ck: ck}
	}
	return e, nil
}

func (c *fakeCluster) ExportNames(ctx context.Context) ([]string, error) { return nil, nil }

// fakeDisk is the NBD backend of a volume or (ck set) one of its checkpoints.
type fakeDisk struct {
	c  *fakeCluster
	v  *fakeVol
	ck *fakeCkpt
}

func (d *fakeDisk) pages() pageMap {
	if d.ck != nil {
		return d.ck.pages
	}
	return d.v.pages
}

func (d *fakeDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if d.ck != nil {
		if d.c.failCheckpointReads.Load() {
			return fmt.Errorf("injected read failure: %w", nbd.ErrIO)
		}
		d.c.checkpointReads.Add(int64(len(p)))
	}
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	readPages(d.pages(), p, off)
	return nil
}

func readPages(pages pageMap, p []byte, off int64) {
	for len(p) > 0 {
		k, in := off/pageSize, off%pageSize
		n := min(int64(len(p)), pageSize-in)
		if pg := pages[k]; pg != nil {
			copy(p[:n], pg[in:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
}

func (d *fakeDisk) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if lim := d.c.failWritesAfter.Load(); lim > 0 && d.c.written.Add(int64(len(p))) > lim {
		return fmt.Errorf("injected write failure: %w", nbd.ErrIO)
	}
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	writePages(d.v.pages, p, off)
	return nil
}

// writePages writes p at off, replacing every page it touches with a new one (pages are never changed in
// place: checkpoints share them).
func writePages(pages pageMap, p []byte, off int64) {
	for len(p) > 0 {
		k, in := off/pageSize, off%pageSize
		n := min(int64(len(p)), pageSize-in)
		pg := new([pageSize]byte)
		if old := pages[k]; old != nil {
			*pg = *old
		}
		copy(pg[in:], p[:n])
		pages[k] = pg
		p, off = p[n:], off+n
	}
}

func zeroPages(pages pageMap, off, length int64) {
	for end := off + length; off < end; {
		k, in := off/pageSize, off%pageSize
		n := min(end-off, pageSize-in)
		if n == pageSize {
			delete(pages, k)
		} else if pages[k] != nil {
			writePages(pages, make([]byte, n), off)
		}
		off += n
	}
}

func (d *fakeDisk) Flush(ctx context.Context) error { return nil }

func (d *fakeDisk) Trim(ctx context.Context, off, length int64, fua bool) error {
	return d.WriteZeroes(ctx, off, length, nbd.ZeroFlags{})
}

func (d *fakeDisk) WriteZeroes(ctx context.Context, off, length int64, f nbd.ZeroFlags) error {
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	zeroPages(d.v.pages, off, length)
	return nil
}

func (d *fakeDisk) BlockStatus(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	d.c.mu.Lock()
	defer d.c.mu.Unlock()
	pages := d.pages()
	var out []nbd.Extent
	for at := off; at < off+length; {
		n := min(pageSize-at%pageSize, off+length-at)
		hole := pages[at/pageSize] == nil
		if k := len(out); k > 0 && out[k-1].Hole == hole {
			out[k-1].Length += n
		} else {
			out = append(out, nbd.Extent{Length: n, Hole: hole, Zero: hole})
		}
		at += n
	}
	return out, nil
}

// Test helpers that act as a guest would, without NBD.

func (c *fakeCluster) write(name string, off int64, p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	writePages(c.vols[name].pages, p, off)
}

func (c *fakeCluster) trim(name string, off, length int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	zeroPages(c.vols[name].pages, off, length)
}

// image is the volume's whole content.
func (c *fakeCluster) image(name string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.vols[name]
	b := make([]byte, v.size)
	readPages(v.pages, b, 0)
	return b
}

func (c *fakeCluster) checkpointNames(name string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, ck := range c.vols[name].ckpts {
		out = append(out, ck.name)
	}
	return out
}
