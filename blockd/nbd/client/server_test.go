package nbdclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/blockd/nbd"
)

// memDisk is an nbd.Backend over a sparse in-memory disk of 4 KiB pages, for running blockd's own NBD server
// in-process. block, when set, is waited on by every read at offset blockAt.
type memDisk struct {
	size    int64
	mu      sync.Mutex
	pages   map[int64][]byte
	blockAt int64
	block   chan struct{}
}

const page = 4096

func (m *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if m.block != nil && off == m.blockAt {
		<-m.block
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range p {
		if pg := m.pages[(off+int64(i))/page]; pg != nil {
			p[i] = pg[(off+int64(i))%page]
		} else {
			p[i] = 0
		}
	}
	return nil
}

func (m *memDisk) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, b := range p {
		pg := m.pages[(off+int64(i))/page]
		if pg == nil {
			pg = make([]byte, page)
			m.pages[(off+int64(i))/page] = pg
		}
		pg[(off+int64(i))%page] = b
	}
	return nil
}

func (m *memDisk) Flush(ctx context.Context) error { return nil }

func (m *memDisk) Trim(ctx context.Context, off, length int64, fua bool) error {
	return m.WriteZeroes(ctx, off, length, nbd.ZeroFlags{})
}

func (m *memDisk) WriteZeroes(ctx context.Context, off, length int64, f nbd.ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for pg := off / page; pg*page < off+length; pg++ {
		delete(m.pages, pg) // the tests zero whole pages only
	}
	return nil
}

func (m *memDisk) BlockStatus(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []nbd.Extent
	for at := off; at < off+length; at += page {
		hole := m.pages[at/page] == nil
		if k := len(out); k > 0 && out[k-1].Hole == hole {
			out[k-1].Length += page
		} else {
			out = append(out, nbd.Extent{Length: page, Hole: hole, Zero: hole})
		}
	}
	return out, nil
}

type exports map[string]*nbd.Export

func (e exports) Export(ctx context.Context, name string) (*nbd.Export, error) {
	if x, ok := e[name]; ok {
		return x, nil
	}
	return nil, fmt.Errorf("%q: %w", name, nbd.ErrNoSuchExport)
}

func (e exports) ExportNames(ctx context.Context) ([]string, error) { return nil, nil }

// serveOwn runs blockd's NBD server on a Unix socket until the test ends.
func serveOwn(t *testing.T, ex exports) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := &nbd.Server{Exports: ex, Logger: slog.New(slog.DiscardHandler)}
	go func() { srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

// TestOwnServer negotiates with blockd's NBD server: the block size constraints it states are honoured (a
// misaligned request is refused before it is sent), block status and read-only exports work, and a
// checkpoint-style name with '@' reaches the server intact.
func TestOwnServer(t *testing.T) {
	disk := &memDisk{size: 16 * mib, pages: map[int64][]byte{}}
	sock := serveOwn(t, exports{
		"vol":    {Size: disk.size, MinBlockSize: 512, Backend: disk},
		"vol@c1": {Size: disk.size, MinBlockSize: 512, ReadOnly: true, Backend: disk},
	})
	ctx := testCtx(t)
	c := dial(t, unixURI(sock, "vol"))
	if min, pref, max := c.BlockSizes(); min != 512 || pref != 4096 || max != nbd.DefaultMaxBlockSize {
		t.Fatalf("block sizes %d/%d/%d, want 512/4096/%d", min, pref, max, nbd.DefaultMaxBlockSize)
	}
	if !c.Structured() || !c.CanBlockStatus() || c.ReadOnly() {
		t.Fatalf("structured %v, block status %v, read-only %v", c.Structured(), c.CanBlockStatus(), c.ReadOnly())
	}
	if err := c.ReadAt(ctx, make([]byte, 100), 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a misaligned read: %v, want ErrInvalid", err)
	}
	p := bytes.Repeat([]byte("basalt!!"), 8192) // 64 KiB
	if err := c.WriteAt(ctx, p, 4*mib, true); err != nil {
		t.Fatal(err)
	}
	exts, err := c.BlockStatus(ctx, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{4 * mib, true, true}, {64 << 10, false, false}, {c.Size() - 4*mib - 64<<10, true, true}}
	if fmt.Sprint(exts) != fmt.Sprint(want) {
		t.Fatalf("block status %v, want %v", exts, want)
	}

	ro := dial(t, unixURI(sock, "vol@c1"))
	if !ro.ReadOnly() || ro.Export() != "vol@c1" {
		t.Fatalf("export %q read-only %v", ro.Export(), ro.ReadOnly())
	}
	got := make([]byte, len(p))
	if err := ro.ReadAt(ctx, got, 4*mib); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read through the read-only export: %v", err)
	}
	if err := ro.WriteAt(ctx, p[:512], 0, false); !errors.Is(err, ErrPermission) {
		t.Fatalf("write to a read-only export: %v, want EPERM", err)
	}
	if err := ro.WriteZeroes(ctx, 0, 4096, ZeroFlags{}); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("zeroing a read-only export: %v, want ErrNotSupported (not advertised)", err)
	}
}

// TestAbandonedRead gives up on a read the server is slow to answer: the call returns the context's error at
// once, the late reply is dropped without touching the caller's buffer, and the connection goes on working.
func TestAbandonedRead(t *testing.T) {
	disk := &memDisk{size: mib, pages: map[int64][]byte{}, blockAt: 8192, block: make(chan struct{})}
	disk.WriteAt(context.Background(), bytes.Repeat([]byte{9}, mib), 0, false)
	c := dial(t, unixURI(serveOwn(t, exports{"d": {Size: disk.size, Backend: disk}}), "d"))

	buf := bytes.Repeat([]byte{0xaa}, 4096)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := c.ReadAt(ctx, buf, 8192); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("abandoned read: %v, want DeadlineExceeded", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("abandoned read returned after %s", took)
	}
	close(disk.block)
	// Wait for the late reply to be read and dropped.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.calls)
		c.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the late reply was never read")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !bytes.Equal(buf, bytes.Repeat([]byte{0xaa}, 4096)) {
		t.Fatal("the late reply was written into a buffer its caller had given up")
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(testCtx(t), got, 8192); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{9}, 4096)) {
		t.Fatalf("read after an abandoned one: %v", err)
	}
}

// TestServerGoesAway cuts the connection with a read in flight: the call fails instead of hanging, and so does
// every later call.
func TestServerGoesAway(t *testing.T) {
	disk := &memDisk{size: mib, pages: map[int64][]byte{}, blockAt: 0, block: make(chan struct{})}
	backend := serveOwn(t, exports{"d": {Size: disk.size, Backend: disk}})
	t.Cleanup(func() { close(disk.block) }) // before the server's cleanup, which waits for the blocked read
	// A proxy between client and server that the test can cut.
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cut := make(chan struct{})
	go func() {
		front, err := ln.Accept()
		if err != nil {
			return
		}
		back, err := net.Dial("unix", backend)
		if err != nil {
			front.Close()
			return
		}
		go io.Copy(back, front)
		go io.Copy(front, back)
		<-cut
		front.Close()
		back.Close()
	}()
	c := dial(t, unixURI(sock, "d"))
	errc := make(chan error, 1)
	go func() { errc <- c.ReadAt(testCtx(t), make([]byte, 4096), 0) }()
	time.Sleep(50 * time.Millisecond)
	close(cut)
	select {
	case err := <-errc:
		if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("a read in flight when the connection was cut: %v, want an unexpected EOF", err)
		}
		t.Logf("read in flight when the connection was cut: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("a read in flight when the connection was cut never returned")
	}
	if err := c.ReadAt(testCtx(t), make([]byte, 4096), 4096); err == nil {
		t.Fatal("a read after the connection was cut succeeded")
	}
}
