package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memBackend is the Backend the tests use: a sparse in-memory disk made of
// 4 KiB pages. The real storage engine lives in another package that does
// not exist yet; this one is enough to check what the server does, and it
// makes holes observable (absent pages) so that trim, write-zeroes and
// block status can be verified. The on* hooks, set before the server
// starts, let tests block or fail individual calls.
type memBackend struct {
	size int64

	mu    sync.Mutex
	pages map[int64]*[memPageSize]byte

	writes  atomic.Int64 // WriteAt calls that reached the pages
	flushes atomic.Int64

	onRead  func(ctx context.Context, off int64) error
	onWrite func(ctx context.Context, off int64) error
	onZero  func(ctx context.Context, off, length int64, flags ZeroFlags) error
	onFlush func(ctx context.Context) error
}

const memPageSize = 4096

func newMemBackend(size int64) *memBackend {
	return &memBackend{size: size, pages: make(map[int64]*[memPageSize]byte)}
}

func (m *memBackend) checkRange(off, length int64) error {
	if off < 0 || length < 0 || off+length > m.size {
		return fmt.Errorf("memBackend: range %d+%d outside size %d: %w", off, length, m.size, ErrInvalid)
	}
	return nil
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if m.onRead != nil {
		if err := m.onRead(ctx, off); err != nil {
			return err
		}
	}
	if err := m.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(p) > 0 {
		pg, po := off/memPageSize, off%memPageSize
		n := min(int64(len(p)), memPageSize-po)
		if page, ok := m.pages[pg]; ok {
			copy(p[:n], page[po:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if m.onWrite != nil {
		if err := m.onWrite(ctx, off); err != nil {
			return err
		}
	}
	if err := m.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes.Add(1)
	for len(p) > 0 {
		pg, po := off/memPageSize, off%memPageSize
		n := min(int64(len(p)), memPageSize-po)
		page, ok := m.pages[pg]
		if !ok {
			page = new([memPageSize]byte)
			m.pages[pg] = page
		}
		copy(page[po:], p[:n])
		p, off = p[n:], off+n
	}
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error {
	if m.onFlush != nil {
		if err := m.onFlush(ctx); err != nil {
			return err
		}
	}
	m.flushes.Add(1)
	return nil
}

func (m *memBackend) Trim(ctx context.Context, off, length int64, fua bool) error {
	return m.zero(off, length, false)
}

func (m *memBackend) WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error {
	if m.onZero != nil {
		if err := m.onZero(ctx, off, length, flags); err != nil {
			return err
		}
	}
	return m.zero(off, length, flags.NoHole)
}

// zero zeroes a range, dropping whole pages unless keep is set.
func (m *memBackend) zero(off, length int64, keep bool) error {
	if err := m.checkRange(off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for end := off + length; off < end; {
		pg, po := off/memPageSize, off%memPageSize
		n := min(end-off, memPageSize-po)
		page, ok := m.pages[pg]
		switch {
		case n == memPageSize && !keep:
			delete(m.pages, pg)
		case ok:
			clear(page[po : po+n])
		case keep:
			m.pages[pg] = new([memPageSize]byte)
		}
		off += n
	}
	return nil
}

func (m *memBackend) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := m.checkRange(off, length); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var exts []Extent
	for end := off + length; off < end; {
		pg, po := off/memPageSize, off%memPageSize
		n := min(end-off, memPageSize-po)
		_, ok := m.pages[pg]
		if k := len(exts) - 1; k >= 0 && exts[k].Hole == !ok {
			exts[k].Length += n
		} else {
			exts = append(exts, Extent{Length: n, Hole: !ok, Zero: !ok})
		}
		off += n
	}
	return exts, nil
}

// allocated returns the sorted offsets of allocated pages.
func (m *memBackend) allocated() []int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var offs []int64
	for pg := range m.pages {
		offs = append(offs, pg*memPageSize)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	return offs
}

// exportMap is an ExportSource over a fixed set of exports.
type exportMap map[string]*Export

func (m exportMap) Export(ctx context.Context, name string) (*Export, error) {
	e, ok := m[name]
	if !ok {
		return nil, fmt.Errorf("looking up %q: %w", name, ErrNoSuchExport)
	}
	return e, nil
}

func (m exportMap) ExportNames(ctx context.Context) ([]string, error) {
	var names []string
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}

// testServer is a Server listening on TCP and on a Unix socket.
type testServer struct {
	srv  *Server
	tcp  string // host:port
	unix string // socket path
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startServer serves exports until the test ends, then shuts the server
// down and waits for it.
func startServer(t testing.TB, srv *Server) *testServer {
	t.Helper()
	if srv.Logger == nil {
		srv.Logger = testLogger(t)
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	unix, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, ln := range []net.Listener{tcp, unix} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ctx, ln); err != nil {
				t.Errorf("Serve(%s): %v", ln.Addr(), err)
			}
		}()
	}
	t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("server did not shut down within 10s")
		}
	})
	return &testServer{srv: srv, tcp: tcp.Addr().String(), unix: sock}
}

// waitGoroutines waits for the goroutine count to drop to want, failing
// the test if it does not within a few seconds.
func waitGoroutines(t testing.TB, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := countGoroutines()
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines still running, want at most %d", n, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countGoroutines() int {
	return runtime.NumGoroutine()
}

var errInjected = errors.New("injected failure")

// discard drains r until EOF; used by fuzz and hangup tests to keep the
// server's writes from blocking on net.Pipe.
func discard(r io.Reader) { io.Copy(io.Discard, r) }
