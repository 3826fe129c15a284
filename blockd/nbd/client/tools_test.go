package nbdclient

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// These tests run the client against real servers: qemu-nbd and nbdkit (Debian packages qemu-utils and
// nbdkit, which `make test` installs).

const mib = 1 << 20

func needTool(t *testing.T, name, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed (Debian package %s; make test installs it)", name, pkg)
	}
}

// startTool runs an NBD server that listens on a Unix socket in a temporary directory until the test ends,
// and returns the socket path once it accepts connections.
func startTool(t *testing.T, name string, args func(sock string) []string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command(name, args(sock)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		select {
		case <-exited:
			t.Fatalf("%s exited: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening on %s after 10s: %s", name, sock, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func qemuNBD(t *testing.T, file, export string, readOnly bool) string {
	needTool(t, "qemu-nbd", "qemu-utils")
	return startTool(t, "qemu-nbd", func(sock string) []string {
		args := []string{"--persistent", "--shared=8", "-k", sock, "-f", "raw", "-x", export}
		if readOnly {
			args = append(args, "-r")
		}
		return append(args, file)
	})
}

func nbdkit(t *testing.T, args ...string) string {
	needTool(t, "nbdkit", "nbdkit")
	return startTool(t, "nbdkit", func(sock string) []string {
		return append([]string{"-f", "--exit-with-parent", "-U", sock}, args...)
	})
}

func unixURI(sock, export string) string {
	return URI{Network: "unix", Address: sock, Export: export}.String()
}

func dial(t *testing.T, uri string) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestQemuNBDReadWrite writes from many goroutines at once through one connection, reads back through it,
// and checks the file qemu-nbd serves: every byte where it should be. A read larger than the maximum block
// size is split and must still come back whole.
func TestQemuNBDReadWrite(t *testing.T) {
	file := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 64*mib); err != nil {
		t.Fatal(err)
	}
	c := dial(t, unixURI(qemuNBD(t, file, "disk", false), "disk"))
	ctx := testCtx(t)
	if c.Size() != 64*mib || c.ReadOnly() || !c.Structured() || !c.CanBlockStatus() || !c.CanTrim() || !c.CanWriteZeroes() || !c.CanFlush() {
		t.Fatalf("negotiated size %d read-only %v structured %v block status %v trim %v zeroes %v flush %v", c.Size(), c.ReadOnly(),
			c.Structured(), c.CanBlockStatus(), c.CanTrim(), c.CanWriteZeroes(), c.CanFlush())
	}

	// Sixteen writers, each in its own 4 MiB region, with requests of assorted sizes in flight together.
	want := make([]byte, 64*mib)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			base := int64(w) * 4 * mib
			for range 20 {
				n := 512 * (1 + r.IntN(512))
				off := base + int64(r.IntN(4*mib-n))
				p := randomBytes(r, n)
				if err := c.WriteAt(ctx, p, off, r.IntN(4) == 0); err != nil {
					errs <- err
					return
				}
				copy(want[off:], p) // regions do not overlap, so no lock is needed
				got := make([]byte, n)
				if err := c.ReadAt(ctx, got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, p) {
					errs <- fmt.Errorf("writer %d: read at %d differs from what was written", w, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(onDisk) != sha256.Sum256(want) {
		t.Fatal("the file qemu-nbd serves differs from what was written")
	}
	whole := make([]byte, 64*mib) // twice the 32 MiB maximum block size
	if err := c.ReadAt(ctx, whole, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(whole, want) {
		t.Fatal("a 64 MiB read differs from what was written")
	}

	// Zeroing, then trimming: the zeroed range reads as zeroes; a trim is accepted.
	if err := c.WriteZeroes(ctx, 1*mib, 2*mib, ZeroFlags{}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*mib)
	if err := c.ReadAt(ctx, got, 1*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 2*mib)) {
		t.Fatal("a zeroed range does not read as zeroes")
	}
	if err := c.Trim(ctx, 8*mib, 4*mib); err != nil {
		t.Fatal(err)
	}
}

// TestQemuNBDBlockStatus reads the allocation of a sparse file: exactly the written ranges are data, and a
// query inside one is clipped to it.
func TestQemuNBDBlockStatus(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sparse.raw")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, w := range []struct{ off, n int64 }{{8 * mib, mib}, {40 * mib, 64 << 10}} {
		if _, err := f.WriteAt(randomBytes(r, int(w.n)), w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(64 * mib); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c := dial(t, unixURI(qemuNBD(t, file, "", true), ""))
	ctx := testCtx(t)
	exts, err := c.BlockStatus(ctx, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	var data []string
	var total int64
	for _, e := range exts {
		if !e.Hole {
			data = append(data, fmt.Sprintf("%d+%d", total, e.Length))
		}
		if e.Hole && !e.Zero {
			t.Errorf("hole at %d not reported as zero", total)
		}
		total += e.Length
	}
	if want := fmt.Sprint([]string{fmt.Sprintf("%d+%d", 8*mib, mib), fmt.Sprintf("%d+%d", 40*mib, 64<<10)}); fmt.Sprint(data) != want || total != c.Size() {
		t.Fatalf("data extents %v covering %d bytes, want %s covering %d", data, total, want, c.Size())
	}
	exts, err = c.BlockStatus(ctx, 8*mib+4096, 8192)
	if err != nil {
		t.Fatal(err)
	}
	if len(exts) != 1 || exts[0] != (Extent{Length: 8192}) {
		t.Fatalf("block status inside the data extent = %+v, want one data extent of 8192 bytes", exts)
	}
}

// TestQemuNBDErrors checks that what the server refuses comes back as the right error, and that the
// connection stays usable afterwards.
func TestQemuNBDErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(file, bytes.Repeat([]byte{7}, mib), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	ro := dial(t, unixURI(qemuNBD(t, file, "ro", true), "ro"))
	if !ro.ReadOnly() {
		t.Fatal("a read-only export is not reported read-only")
	}
	err := ro.WriteAt(ctx, make([]byte, 4096), 0, false)
	var ne *Error
	// qemu-nbd 7.2 answers EINVAL, with a message; nbdkit answers EPERM (below).
	if !errors.As(err, &ne) || ne.Op != "write" || ne.Offset != 0 || ne.Length != 4096 || ne.Message == "" ||
		!errors.Is(err, ErrPermission) && !errors.Is(err, ErrInvalid) {
		t.Fatalf("write to a read-only export: %v, want EPERM or EINVAL with the server's message for a write of 4096 bytes at 0", err)
	}
	t.Logf("write to qemu-nbd's read-only export: %v", err)
	nro := dial(t, unixURI(nbdkit(t, "--readonly", "memory", "1M"), ""))
	if err := nro.WriteAt(ctx, make([]byte, 4096), 0, false); !errors.Is(err, ErrPermission) || !nro.ReadOnly() {
		t.Fatalf("write to nbdkit's read-only export: %v, want EPERM", err)
	} else {
		t.Logf("write to nbdkit's read-only export: %v", err)
	}

	rw := dial(t, unixURI(qemuNBD(t, file, "rw", false), "rw"))
	if err = rw.ReadAt(ctx, make([]byte, 4096), mib); !errors.Is(err, ErrInvalid) {
		t.Fatalf("read past the end: %v, want EINVAL", err)
	}
	t.Logf("read past the end: %v", err)
	if err := rw.WriteAt(ctx, make([]byte, 4096), mib-2048, false); !errors.Is(err, ErrNoSpace) && !errors.Is(err, ErrInvalid) {
		t.Fatalf("write across the end: %v, want ENOSPC or EINVAL", err)
	}
	if err := rw.ReadAt(ctx, make([]byte, 10), -1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("read at a negative offset: %v, want EINVAL", err)
	}
	got := make([]byte, 4096)
	if err := rw.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatalf("read after errors: %v", err)
	}

	if _, err := Dial(ctx, unixURI(filepath.Dir(file)+"/nosuch.sock", "x")); err == nil {
		t.Fatal("dialling a socket that does not exist succeeded")
	}
	sock := qemuNBD(t, file, "only-this", true)
	if c, err := Dial(ctx, unixURI(sock, "other")); !errors.Is(err, ErrUnknownExport) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("dialling an unknown export: %v, want ErrUnknownExport", err)
	} else {
		t.Logf("unknown export: %v", err)
	}

	// Calls after Close fail cleanly.
	rw.Close()
	if err := rw.ReadAt(ctx, got, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v, want ErrClosed", err)
	}
}

// TestNbdkitMemoryConcurrent runs readers and writers at once against nbdkit's memory plugin and compares
// the whole disk with a shadow copy at the end.
func TestNbdkitMemoryConcurrent(t *testing.T) {
	c := dial(t, unixURI(nbdkit(t, "memory", "64M"), ""))
	ctx := testCtx(t)
	shadow := make([]byte, 64*mib)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			base := int64(w) * 8 * mib
			for range 100 {
				n := 1 + r.IntN(256<<10)
				off := base + int64(r.IntN(8*mib-n))
				if r.IntN(3) == 0 {
					got := make([]byte, n)
					if err := c.ReadAt(ctx, got, off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, shadow[off:off+int64(n)]) {
						errs <- fmt.Errorf("worker %d: read %d bytes at %d differs", w, n, off)
						return
					}
					continue
				}
				p := randomBytes(r, n)
				if err := c.WriteAt(ctx, p, off, false); err != nil {
					errs <- err
					return
				}
				copy(shadow[off:], p)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := make([]byte, 64*mib)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, shadow) {
		t.Fatal("the disk differs from the shadow copy")
	}
}

// TestNbdkitSparseRandomBlockStatus compares our block status of a sparse-random disk with nbdinfo's (libnbd),
// and checks that holes read as zeroes and data does not.
func TestNbdkitSparseRandomBlockStatus(t *testing.T) {
	needTool(t, "nbdinfo", "libnbd-bin")
	sock := nbdkit(t, "sparse-random", "64M", "seed=42", "percent=10", "runlength=262144")
	c := dial(t, unixURI(sock, ""))
	ctx := testCtx(t)
	exts, err := c.BlockStatus(ctx, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("nbdinfo", "--map", "--json", unixURI(sock, "")).Output()
	if err != nil {
		t.Fatalf("nbdinfo --map: %v", err)
	}
	var ref []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal(out, &ref); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var want []Extent
	for _, r := range ref {
		e := Extent{Length: r.Length, Hole: r.Type&1 != 0, Zero: r.Type&2 != 0}
		if k := len(want); k > 0 && want[k-1].Hole == e.Hole && want[k-1].Zero == e.Zero {
			want[k-1].Length += e.Length
		} else {
			want = append(want, e)
		}
	}
	if fmt.Sprint(exts) != fmt.Sprint(want) {
		t.Fatalf("block status %v\nnbdinfo says %v", exts, want)
	}
	var off int64
	holes, data := 0, 0
	for _, e := range exts {
		buf := make([]byte, e.Length)
		if err := c.ReadAt(ctx, buf, off); err != nil {
			t.Fatal(err)
		}
		zero := bytes.Equal(buf, make([]byte, e.Length))
		if e.Zero != zero {
			t.Fatalf("extent %d+%d (zero %v): reads as zeroes: %v", off, e.Length, e.Zero, zero)
		}
		if e.Hole {
			holes++
		} else {
			data++
		}
		off += e.Length
	}
	if holes == 0 || data == 0 {
		t.Fatalf("%d holes and %d data extents: the test disk is not sparse", holes, data)
	}
}

// TestNbdkitWithoutStructuredReplies uses a server that refuses structured replies: the client falls back to
// simple replies, and block status is reported as unsupported instead of being sent.
func TestNbdkitWithoutStructuredReplies(t *testing.T) {
	c := dial(t, unixURI(nbdkit(t, "--no-sr", "memory", "16M"), ""))
	ctx := testCtx(t)
	if c.Structured() || c.CanBlockStatus() {
		t.Fatalf("structured %v, block status %v; want neither", c.Structured(), c.CanBlockStatus())
	}
	p := randomBytes(rand.New(rand.NewPCG(3, 4)), 3*mib)
	if err := c.WriteAt(ctx, p, mib, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, got, mib); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back with simple replies: %v", err)
	}
	if _, err := c.BlockStatus(ctx, 0, c.Size()); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("block status without the context: %v, want ErrNotSupported", err)
	}
	if err := c.ReadAt(ctx, got, 15*mib); !errors.Is(err, ErrInvalid) {
		t.Fatalf("read past the end with simple replies: %v, want EINVAL", err)
	}
}

// TestNbdkitErrorFilter has every read fail on the server with EIO: the error reaches the caller as ErrIO,
// and writes still work.
func TestNbdkitErrorFilter(t *testing.T) {
	c := dial(t, unixURI(nbdkit(t, "--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=100%"), ""))
	ctx := testCtx(t)
	if err := c.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	err := c.ReadAt(ctx, make([]byte, 4096), 0)
	if !errors.Is(err, ErrIO) {
		t.Fatalf("read through the error filter: %v, want EIO", err)
	}
	t.Logf("read through the error filter: %v", err)
}
