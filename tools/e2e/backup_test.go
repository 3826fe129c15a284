package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
)

// backupCreated is the part of `basalt backup create -o json` the tests read.
type backupCreated struct {
	Checkpoint string `json:"checkpoint"`
	Points     []struct {
		Volume    string   `json:"volume"`
		Point     string   `json:"point"`
		Kind      string   `json:"kind"`
		Base      string   `json:"base"`
		Group     []string `json:"group"`
		SizeBytes uint64   `json:"size_bytes"`
		BytesRead uint64   `json:"bytes_read"`
		DataBytes uint64   `json:"data_bytes"`
	} `json:"points"`
	DeletedCheckpoints []string `json:"deleted_checkpoints"`
	Seconds            float64  `json:"seconds"`
}

// pointExtents reads the extents a point recorded, from its point.json.
func pointExtents(t *testing.T, dir, volume, point string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, volume, point, "point.json"))
	if err != nil {
		t.Fatal(err)
	}
	var p struct {
		Extents []struct {
			Offset, Length uint64
			Zero           bool
		}
	}
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range p.Extents {
		out = append(out, fmt.Sprintf("%d+%d zero=%v", e.Offset, e.Length, e.Zero))
	}
	return out
}

// deviceSHA256 reads a whole export through NBD and hashes it.
func deviceSHA256(t *testing.T, uri string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := nbdclient.Dial(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := sha256.New()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < c.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), c.Size()-off)
		if err := c.ReadAt(ctx, buf[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", uri, off, err)
		}
		h.Write(buf[:n])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestBackupRestoreIsByteIdentical backs a volume up in full, changes 1% of it and trims some, backs it up
// incrementally, changes it again and backs it up again; each incremental point records exactly the changed
// extents, and each point restored into a new volume hashes like the checkpoint it was taken from. A
// corrupted data file makes a restore fail before any volume is created. A consistency group of two volumes
// is backed up and restored too.
func TestBackupRestoreIsByteIdentical(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	basalt := func(args ...string) string {
		t.Helper()
		out, errOut, code := e.basalt(nil, args...)
		if code != 0 {
			t.Fatalf("basalt %s: exit %d: %s", strings.Join(args, " "), code, errOut)
		}
		return out
	}
	uri := func(export string) string { return fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+11, export) }
	dir := filepath.Join(t.TempDir(), "backups")
	backup := func(volumes ...string) backupCreated {
		t.Helper()
		var res backupCreated
		out := basalt(append([]string{"backup", "create", dir, "-o", "json"}, volumes...)...)
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("backup create output: %v\n%s", err, out)
		}
		return res
	}

	basalt("volume", "create", "bk", "--size", "64M")
	qemuIOAll(t, uri("bk"), false, "write -P 1 0 16M", "write -P 2 24M 8M") // 40 MiB never written

	var points, sums []string
	r1 := backup("bk")
	p1 := r1.Points[0]
	if p1.Kind != "full" || p1.BytesRead != 24*mib {
		t.Fatalf("first backup: %s point reading %d bytes; want a full point reading the 24 MiB written (holes are not read)", p1.Kind, p1.BytesRead)
	}
	points, sums = append(points, p1.Point), append(sums, deviceSHA256(t, uri("bk@"+r1.Checkpoint)))

	// 1% of the volume rewritten, 2 MiB trimmed, 64 KiB written in a hole.
	qemuIOAll(t, uri("bk"), false, "write -P 3 4M 640k", "discard 24M 2M", "write -P 4 40M 64k")
	r2 := backup("bk")
	p2 := r2.Points[0]
	if p2.Kind != "incremental" || p2.Base != p1.Point || p2.BytesRead != 640<<10+64<<10 {
		t.Fatalf("second backup: %s point on %q reading %d bytes; want an incremental point on %s reading the %d bytes changed",
			p2.Kind, p2.Base, p2.BytesRead, p1.Point, 640<<10+64<<10)
	}
	want := fmt.Sprint([]string{fmt.Sprintf("%d+%d zero=false", 4*mib, 640<<10), fmt.Sprintf("%d+%d zero=true", 24*mib, 2*mib),
		fmt.Sprintf("%d+%d zero=false", 40*mib, 64<<10)})
	if got := fmt.Sprint(pointExtents(t, dir, "bk", p2.Point)); got != want {
		t.Fatalf("extents of the incremental point: %s, want exactly what changed: %s", got, want)
	}
	if len(r2.DeletedCheckpoints) != 1 || r2.DeletedCheckpoints[0] != "bk@"+r1.Checkpoint {
		t.Fatalf("second backup deleted checkpoints %v, want bk@%s", r2.DeletedCheckpoints, r1.Checkpoint)
	}
	t.Logf("incremental backup of %d bytes changed in a 64 MiB volume read %d bytes (%.2f%%)", 704<<10, p2.BytesRead, 100*float64(p2.BytesRead)/float64(64*mib))
	points, sums = append(points, p2.Point), append(sums, deviceSHA256(t, uri("bk@"+r2.Checkpoint)))

	// Zeroing that may unmap (-u) is recorded as a zero extent, not read.
	qemuIOAll(t, uri("bk"), false, "write -P 5 60M 4M", "write -z -u 0 1M")
	r3 := backup("bk")
	if p := r3.Points[0]; p.Kind != "incremental" || p.BytesRead != 4*mib || p.DataBytes != 4*mib {
		t.Fatalf("third backup: %s point reading %d bytes and storing %d, want an incremental one reading and storing 4 MiB", p.Kind, p.BytesRead, p.DataBytes)
	}
	points, sums = append(points, r3.Points[0].Point), append(sums, deviceSHA256(t, uri("bk@"+r3.Checkpoint)))
	var ckpts struct{ Checkpoints []struct{ Name string } }
	json.Unmarshal([]byte(basalt("checkpoint", "list", "bk", "-o", "json")), &ckpts)
	if len(ckpts.Checkpoints) != 1 || ckpts.Checkpoints[0].Name != r3.Checkpoint {
		t.Fatalf("checkpoints of bk after three backups: %+v, want only %s", ckpts.Checkpoints, r3.Checkpoint)
	}

	basalt("backup", "verify", dir)
	var listed struct {
		Volumes []struct {
			Volume string
			Points []struct{ Point, Kind string }
		}
	}
	if err := json.Unmarshal([]byte(basalt("backup", "list", dir, "-o", "json")), &listed); err != nil {
		t.Fatal(err)
	}
	if len(listed.Volumes) != 1 || fmt.Sprint(listed.Volumes[0].Points) != fmt.Sprintf("[{%s full} {%s incremental} {%s incremental}]", points[0], points[1], points[2]) {
		t.Fatalf("backup list: %+v", listed)
	}
	if table := basalt("backup", "list", dir); !strings.Contains(table, points[2]) || !strings.Contains(table, points[1]) {
		t.Fatalf("backup list:\n%s", table)
	}
	for i, p := range points {
		to := fmt.Sprintf("bk-restored-%d", i+1)
		out := basalt("backup", "restore", dir, "bk", "--point", p, "--to", to)
		if got := deviceSHA256(t, uri(to)); got != sums[i] {
			t.Fatalf("point %s restored into %s hashes %s, the checkpoint it was taken from %s\n%s", p, to, got, sums[i], out)
		}
		t.Logf("point %s restored byte for byte: %s", p, strings.TrimSpace(out))
	}

	// A corrupted full point: verify names the file, and a restore fails before creating anything.
	data := filepath.Join(dir, "bk", points[0], "data")
	b, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(data, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := e.basalt(nil, "backup", "verify", dir)
	if code != 1 || !strings.Contains(out, data) || !strings.Contains(errOut, "damaged") {
		t.Fatalf("verify of a corrupted backup: exit %d\n%s%s", code, out, errOut)
	}
	_, errOut, code = e.basalt(nil, "backup", "restore", dir, "bk", "--to", "bk-bad")
	oneLine(t, "restore of a corrupted chain", errOut, code, 1, data)
	if strings.Contains(basalt("volume", "list"), "bk-bad") {
		t.Fatal("a volume was left by a restore of a corrupted chain")
	}
	_, errOut, code = e.basalt(nil, "backup", "restore", dir, "bk", "--point", "2", "--to", "bk-restored-1")
	oneLine(t, "restore onto an existing volume", errOut, code, 1, "already exists")
	_, errOut, code = e.basalt(nil, "backup", "restore", dir, "bk")
	oneLine(t, "restore without --to", errOut, code, 2, "--to")

	// A consistency group: two volumes cut at one instant, restored each to its own checkpoint's content.
	for i, v := range []string{"g1", "g2"} {
		basalt("volume", "create", v, "--size", "32M")
		qemuIOAll(t, uri(v), false, fmt.Sprintf("write -P %d 0 8M", 10+i))
	}
	gr := backup("g1", "g2")
	if len(gr.Points) != 2 || gr.Points[0].Point != gr.Points[1].Point || fmt.Sprint(gr.Points[0].Group) != "[g1 g2]" {
		t.Fatalf("group backup: %+v", gr.Points)
	}
	qemuIOAll(t, uri("g2"), false, "write -P 12 16M 1M")
	gr2 := backup("g1", "g2")
	if gr2.Points[0].BytesRead != 0 || gr2.Points[1].BytesRead != mib {
		t.Fatalf("second group backup read %d and %d bytes, want 0 and 1 MiB", gr2.Points[0].BytesRead, gr2.Points[1].BytesRead)
	}
	for _, v := range []string{"g1", "g2"} {
		sum := deviceSHA256(t, uri(v+"@"+gr2.Checkpoint))
		basalt("backup", "restore", dir, v, "--to", v+"-restored")
		if got := deviceSHA256(t, uri(v+"-restored")); got != sum {
			t.Fatalf("%s restored from the group backup hashes %s, its checkpoint %s", v, got, sum)
		}
	}
}

// TestBackupBenchIncremental measures an incremental backup of a large volume with 1% of it changed: how many
// bytes it reads against the volume's size. Run it with
//
//	BASALT_BACKUP_BENCH=1 go test ./tools/e2e -run TestBackupBenchIncremental -v -timeout 60m
//
// BASALT_BACKUP_BENCH_SIZE sets the volume size (default 10G); the volume is filled completely first.
func TestBackupBenchIncremental(t *testing.T) {
	if os.Getenv("BASALT_BACKUP_BENCH") == "" {
		t.Skip("a benchmark: set BASALT_BACKUP_BENCH=1 to run it (it writes the whole volume, 10 GiB by default, three times over)")
	}
	size := int64(10 << 30)
	if s := os.Getenv("BASALT_BACKUP_BENCH_SIZE"); s != "" {
		n, err := strconv.ParseInt(strings.TrimSuffix(s, "G"), 10, 64)
		if err != nil {
			t.Fatalf("BASALT_BACKUP_BENCH_SIZE=%q: want a number of GiB, like 10G", s)
		}
		size = n << 30
	}
	e := newEnv(t)
	base := freeBase(t, 3)
	e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	if _, errOut, code := e.basalt(nil, "volume", "create", "big", "--size", fmt.Sprintf("%dG", size>>30)); code != 0 {
		t.Fatal(errOut)
	}
	ctx := context.Background()
	c, err := nbdclient.Dial(ctx, fmt.Sprintf("nbd://127.0.0.1:%d/big", base+11))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// Fill the volume, several writes in flight; every 4 MiB chunk gets its own byte.
	start := time.Now()
	const chunk = 4 << 20
	var wg sync.WaitGroup
	slots := make(chan struct{}, 8)
	errs := make(chan error, 1)
	for off := int64(0); off < size; off += chunk {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			buf := make([]byte, chunk)
			for i := range buf {
				buf[i] = byte(off/chunk) | 1
			}
			if err := c.WriteAt(ctx, buf, off, false); err != nil {
				select {
				case errs <- err:
				default:
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("filled %d GiB in %s", size>>30, time.Since(start).Round(time.Second))

	dir := t.TempDir()
	run := func() backupCreated {
		out, errOut, code := e.basalt(nil, "backup", "create", dir, "big", "-o", "json")
		if code != 0 {
			t.Fatalf("backup: %s", errOut)
		}
		var res backupCreated
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatal(err)
		}
		return res
	}
	full := run()
	t.Logf("full backup: read %d bytes in %.1fs (%.0f MB/s)", full.Points[0].BytesRead, full.Seconds, float64(full.Points[0].BytesRead)/full.Seconds/1e6)

	// 1% of the volume changed, in 64 KiB writes at distinct random places.
	const piece = 64 << 10
	r := rand.New(rand.NewPCG(1, 2))
	changed := map[int64]bool{}
	for int64(len(changed))*piece < size/100 {
		changed[r.Int64N(size/piece)*piece] = true
	}
	buf := make([]byte, piece)
	for i := range buf {
		buf[i] = 0xee
	}
	for off := range changed {
		if err := c.WriteAt(ctx, buf, off, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	inc := run()
	p := inc.Points[0]
	changedBytes := uint64(len(changed)) * piece
	t.Logf("incremental backup of a %d GiB volume with %d bytes (1%%) changed: read %d bytes = %.3f%% of the volume, in %.1fs",
		size>>30, changedBytes, p.BytesRead, 100*float64(p.BytesRead)/float64(size), inc.Seconds)
	if p.Kind != "incremental" || p.BytesRead != changedBytes {
		t.Fatalf("incremental backup: %s point read %d bytes, want exactly the %d changed", p.Kind, p.BytesRead, changedBytes)
	}
}
