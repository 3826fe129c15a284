package backup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32() | 1) // never a zero block
	}
	return b
}

func (c *fakeCluster) mustCreate(t *testing.T, name string, size uint64) {
	t.Helper()
	if _, err := c.CreateVolume(context.Background(), &basaltv1.CreateVolumeRequest{Name: name, SizeBytes: size}); err != nil {
		t.Fatal(err)
	}
}

func mustBackup(t *testing.T, c *fakeCluster, dir string, full bool, volumes ...string) *CreateResult {
	t.Helper()
	res, err := Create(testCtx(t), c.api(), dir, volumes, CreateOptions{Full: full})
	if err != nil {
		t.Fatalf("backup of %v: %v", volumes, err)
	}
	if len(res.Warnings) > 0 {
		t.Fatalf("backup of %v: warnings %v", volumes, res.Warnings)
	}
	return res
}

// TestBackupRestoreChain backs a volume up in full, changes 1% of it and trims some, backs it up
// incrementally, changes it again and backs it up again; every point restores to exactly the content the
// volume had when it was taken, and an incremental point reads exactly the changed data.
func TestBackupRestoreChain(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	const size = 32 << 20
	c.mustCreate(t, "disk", size)
	r := rand.New(rand.NewPCG(1, 1))
	c.write("disk", 0, randomBytes(r, 20<<20)) // 20 MiB written, 12 MiB never
	images := [][]byte{c.image("disk")}

	res := mustBackup(t, c, dir, false, "disk")
	full := res.Points[0]
	if full.Kind != KindFull || full.BytesRead != 20<<20 || full.DataBytes != 20<<20 {
		t.Fatalf("full point: kind %s, %d bytes read, %d stored; want full, 20 MiB each (holes are not read)", full.Kind, full.BytesRead, full.DataBytes)
	}

	// 1% of the volume rewritten in scattered 4 KiB blocks, 1 MiB trimmed, one block rewritten as zeroes.
	changed := map[int64]bool{}
	for len(changed) < size/100/4096 {
		changed[int64(r.IntN(16<<20/4096))*4096] = true
	}
	for off := range changed {
		c.write("disk", off, randomBytes(r, 4096))
	}
	c.trim("disk", 18<<20, 1<<20)
	c.write("disk", 17<<20, make([]byte, 4096))
	images = append(images, c.image("disk"))
	before := c.checkpointReads.Load()
	res = mustBackup(t, c, dir, false, "disk")
	inc := res.Points[0]
	wantRead := uint64(len(changed)*4096 + 4096)
	if inc.Kind != KindIncremental || inc.Base != full.Name || inc.BytesRead != wantRead || uint64(c.checkpointReads.Load()-before) != wantRead {
		t.Fatalf("incremental point: kind %s base %s, %d bytes read (server saw %d); want incremental on %s reading exactly the %d changed bytes",
			inc.Kind, inc.Base, inc.BytesRead, c.checkpointReads.Load()-before, full.Name, wantRead)
	}
	t.Logf("incremental point after 1%% changed: read %d of %d bytes (%.2f%%)", inc.BytesRead, size, 100*float64(inc.BytesRead)/size)
	if got := c.checkpointNames("disk"); len(got) != 1 || got[0] != inc.Checkpoint {
		t.Fatalf("checkpoints after the incremental backup: %v, want only %s (the previous backup checkpoint is deleted)", got, inc.Checkpoint)
	}
	if res.DeletedCheckpoints[0] != "disk@"+full.Checkpoint {
		t.Fatalf("deleted checkpoints %v", res.DeletedCheckpoints)
	}
	var zeroBytes uint64
	for _, e := range inc.Extents {
		if e.Zero {
			zeroBytes += e.Length
		}
	}
	if zeroBytes != 1<<20+4096 {
		t.Fatalf("zero extents of the incremental point cover %d bytes, want the 1 MiB trimmed and the 4 KiB zeroed", zeroBytes)
	}

	c.write("disk", 30<<20, randomBytes(r, 64<<10))
	c.trim("disk", 0, 64<<10)
	images = append(images, c.image("disk"))
	time.Sleep(2 * time.Millisecond) // checkpoint names have millisecond resolution
	mustBackup(t, c, dir, false, "disk")

	for i, ref := range []string{"1", full.Checkpoint, ""} {
		to := "restored" + string(rune('1'+i))
		rr, err := Restore(testCtx(t), c.api(), dir, "disk", to, RestoreOptions{Point: ref})
		if err != nil {
			t.Fatalf("restore of point %q: %v", ref, err)
		}
		want := images[[]int{0, 0, 2}[i]]
		if sha256.Sum256(c.image(to)) != sha256.Sum256(want) {
			t.Fatalf("restore of point %q (%s) differs from the volume when it was taken", ref, rr.Point.Name)
		}
	}
	rr, err := Restore(testCtx(t), c.api(), dir, "disk", "restored-2", RestoreOptions{Point: "2"})
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(c.image("restored-2")) != sha256.Sum256(images[1]) || len(rr.Chain) != 2 {
		t.Fatalf("restore of point 2 differs from the volume when it was taken (chain %d points)", len(rr.Chain))
	}
	if _, err := Verify(testCtx(t), dir, "", "", nil); err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(dir, manifestFile))
	if err != nil || !bytes.Contains(readme, []byte(inc.Name)) || !bytes.Contains(readme, []byte("Volume disk")) {
		t.Fatalf("README.txt: %v\n%s", err, readme)
	}
}

// TestGroupBackup backs two volumes up at one instant: their points share the checkpoint and list the group.
func TestGroupBackup(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	r := rand.New(rand.NewPCG(2, 2))
	for _, v := range []string{"boot", "data"} {
		c.mustCreate(t, v, 8<<20)
		c.write(v, 4096, randomBytes(r, 1<<20))
	}
	res := mustBackup(t, c, dir, false, "boot", "data")
	if len(res.Points) != 2 || res.Points[0].Checkpoint != res.Points[1].Checkpoint ||
		strings.Join(res.Points[0].Group, ",") != "boot,data" || strings.Join(res.Points[1].Group, ",") != "boot,data" {
		t.Fatalf("group points: %+v", res.Points)
	}
	c.write("data", 0, randomBytes(r, 4096))
	time.Sleep(2 * time.Millisecond)
	res = mustBackup(t, c, dir, false, "boot", "data")
	if res.Points[0].Kind != KindIncremental || res.Points[0].BytesRead != 0 || res.Points[1].BytesRead != 4096 {
		t.Fatalf("second group backup: boot %s read %d, data read %d; want incremental, 0 and 4096", res.Points[0].Kind, res.Points[0].BytesRead, res.Points[1].BytesRead)
	}
	for _, v := range []string{"boot", "data"} {
		if _, err := Restore(testCtx(t), c.api(), dir, v, v+"-copy", RestoreOptions{}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(c.image(v), c.image(v+"-copy")) {
			t.Fatalf("%s restored differs", v)
		}
	}
}

// TestIncrementalNeedsItsCheckpoint: without the previous point's checkpoint, an incremental backup is
// refused with a hint, and nothing is left behind; --full starts a new chain.
func TestIncrementalNeedsItsCheckpoint(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	c.mustCreate(t, "disk", 4<<20)
	res := mustBackup(t, c, dir, false, "disk")
	c.DeleteCheckpoint(context.Background(), &basaltv1.DeleteCheckpointRequest{Volume: "disk", Name: res.Checkpoint})
	_, err := Create(testCtx(t), c.api(), dir, []string{"disk"}, CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), "no longer has checkpoint "+res.Checkpoint) || !strings.Contains(err.Error(), "--full") {
		t.Fatalf("incremental backup without the base checkpoint: %v", err)
	}
	if ck := c.checkpointNames("disk"); len(ck) != 0 {
		t.Fatalf("checkpoints left: %v", ck)
	}
	time.Sleep(2 * time.Millisecond)
	res = mustBackup(t, c, dir, true, "disk")
	if p := res.Points[0]; p.Kind != KindFull || p.Seq() != 2 {
		t.Fatalf("backup --full: %s point number %d", p.Kind, p.Seq())
	}
}

// TestRestoreRefusesDamagedChain: a corrupted data file is found before anything is created.
func TestRestoreRefusesDamagedChain(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	c.mustCreate(t, "disk", 4<<20)
	c.write("disk", 0, randomBytes(rand.New(rand.NewPCG(3, 3)), 1<<20))
	full := mustBackup(t, c, dir, false, "disk").Points[0]
	c.write("disk", 1<<20, []byte(strings.Repeat("x", 4096)))
	time.Sleep(2 * time.Millisecond)
	mustBackup(t, c, dir, false, "disk")

	data := filepath.Join(dir, "disk", full.Name, DataFile)
	b, _ := os.ReadFile(data)
	b[12345] ^= 0x80
	os.WriteFile(data, b, 0o644)
	_, err := Restore(testCtx(t), c.api(), dir, "disk", "copy", RestoreOptions{})
	if err == nil || !strings.Contains(err.Error(), data) || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("restore of a chain with a corrupt full point: %v", err)
	}
	if _, gerr := c.GetVolume(context.Background(), &basaltv1.GetVolumeRequest{Name: "copy"}); gerr == nil {
		t.Fatal("a volume was created for a restore that could not succeed")
	}
	t.Logf("restore of a damaged chain: %v", err)

	// A restore never overwrites an existing volume.
	b[12345] ^= 0x80
	os.WriteFile(data, b, 0o644)
	if _, err := Restore(testCtx(t), c.api(), dir, "disk", "disk", RestoreOptions{}); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("restore onto an existing volume: %v", err)
	}
}

// TestRestoreFailureDeletesVolume: a write failing half way leaves no volume behind.
func TestRestoreFailureDeletesVolume(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	c.mustCreate(t, "disk", 16<<20)
	c.write("disk", 0, randomBytes(rand.New(rand.NewPCG(4, 4)), 12<<20))
	mustBackup(t, c, dir, false, "disk")
	c.failWritesAfter.Store(5 << 20)
	_, err := Restore(testCtx(t), c.api(), dir, "disk", "copy", RestoreOptions{})
	if err == nil || !strings.Contains(err.Error(), "copy was deleted") || !strings.Contains(err.Error(), "injected write failure") {
		t.Fatalf("restore with failing writes: %v", err)
	}
	if _, gerr := c.GetVolume(context.Background(), &basaltv1.GetVolumeRequest{Name: "copy"}); gerr == nil {
		t.Fatal("the half-restored volume is still there")
	}
	t.Logf("restore with failing writes: %v", err)
}

// TestCreateFailureLeavesNothing: a backup that fails while reading publishes no point, removes its
// temporary directory and its checkpoint, and keeps the previous checkpoint for the next incremental run.
func TestCreateFailureLeavesNothing(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	c.mustCreate(t, "disk", 4<<20)
	c.write("disk", 0, []byte(strings.Repeat("y", 8192)))
	first := mustBackup(t, c, dir, false, "disk")
	// A leftover of an interrupted run is removed by the next one.
	left := filepath.Join(dir, "disk", tmpPrefix+"000002-backup-x")
	os.Mkdir(left, 0o755)

	c.write("disk", 8192, []byte(strings.Repeat("z", 4096)))
	c.failCheckpointReads.Store(true)
	time.Sleep(2 * time.Millisecond)
	res, err := Create(testCtx(t), c.api(), dir, []string{"disk"}, CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), "injected read failure") {
		t.Fatalf("backup with failing reads: %v", err)
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "disk"))
	if len(entries) != 1 || entries[0].Name() != first.Points[0].Name {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("after a failed backup the volume's directory holds %v, want only %s", names, first.Points[0].Name)
	}
	if len(res.RemovedLeftovers) != 1 || res.RemovedLeftovers[0] != left {
		t.Fatalf("removed leftovers %v, want %s", res.RemovedLeftovers, left)
	}
	if ck := c.checkpointNames("disk"); len(ck) != 1 || ck[0] != first.Checkpoint {
		t.Fatalf("checkpoints after a failed backup: %v, want only %s", ck, first.Checkpoint)
	}
	c.failCheckpointReads.Store(false)
	time.Sleep(2 * time.Millisecond)
	if p := mustBackup(t, c, dir, false, "disk").Points[0]; p.Kind != KindIncremental || p.BytesRead != 4096 || p.Seq() != 2 {
		t.Fatalf("backup after a failed one: %s, %d bytes read, number %d", p.Kind, p.BytesRead, p.Seq())
	}
}

// TestConcurrentCreateIsRefused: two backups into one directory at once would pick the same point numbers.
func TestConcurrentCreateIsRefused(t *testing.T) {
	dir := t.TempDir()
	unlock, err := lockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	c := newFakeCluster(t)
	c.mustCreate(t, "disk", 1<<20)
	if _, err := Create(testCtx(t), c.api(), dir, []string{"disk"}, CreateOptions{}); err == nil || !strings.Contains(err.Error(), "another backup") {
		t.Fatalf("a second backup into a locked directory: %v", err)
	}
}

// TestRestoreClipsToShrunkSize: data a point recorded past the size of a later point (the volume shrank) is
// not written: the restored volume has the later size, and reads what the volume read.
func TestRestoreClipsToShrunkSize(t *testing.T) {
	c := newFakeCluster(t)
	dir := t.TempDir()
	write := func(seq int, size uint64, kind, base string, off uint64, b []byte) *Point {
		p := &Point{Format: Format, Volume: "vol", VolumeID: 1, Checkpoint: fmt.Sprintf("c%d", seq), SizeBytes: size, SectorSize: 512,
			Kind: kind, Base: base, Group: []string{"vol"}, Created: time.Now().UTC()}
		p.Name = pointName(seq, p.Checkpoint)
		w, err := newPointWriter(dir, p)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.addData(off, b); err != nil {
			t.Fatal(err)
		}
		if err := w.finish(); err != nil {
			t.Fatal(err)
		}
		if err := w.publish(); err != nil {
			t.Fatal(err)
		}
		return p
	}
	full := write(1, 1<<20, KindFull, "", 512<<10-4096, bytes.Repeat([]byte{1}, 8192)) // straddles 512 KiB
	write(2, 512<<10, KindIncremental, full.Name, 0, bytes.Repeat([]byte{2}, 4096))
	res, err := Restore(testCtx(t), c.api(), dir, "vol", "copy", RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 512<<10)
	copy(want, bytes.Repeat([]byte{2}, 4096))
	copy(want[512<<10-4096:], bytes.Repeat([]byte{1}, 4096))
	if got := c.image("copy"); !bytes.Equal(got, want) || res.BytesWritten != 8192 {
		t.Fatalf("restore across a shrink: %d bytes written, content equal: %v", res.BytesWritten, bytes.Equal(got, want))
	}
}
