package vmhost

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/qemu"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/internal/nbdtest"
	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const mib = 1 << 20

// needQEMU skips a test on a host without QEMU and its NBD server.
func needQEMU(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"qemu-system-x86_64", "qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian packages qemu-system-x86, qemu-utils; make deps installs them)", bin)
		}
	}
}

var guest = sync.OnceValues(func() (testguest.Guest, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return testguest.Build(ctx, testguest.Options{})
})

type testLogWriter struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func (w *testLogWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(b), "\n"))
	}
	return len(b), nil
}

// env is a small cluster in one process: a real etcd, metad's API on a loopback port, and computed hosts
// added with addHost. Disks are served by qemu-nbd on a Unix socket, with the volume's name as the export,
// the way a blockd serves them (the end-to-end test in tools/e2e runs real blockd nodes).
type env struct {
	t     *testing.T
	ctx   context.Context
	store *store.Store
	api   basaltv1.VMServiceClient
	log   *slog.Logger
	guest testguest.Guest
	// sock is the NBD socket every host attaches disks through.
	sock  string
	dir   string
	hosts map[string]*testHost
	etcd  *etcdtest.Etcd
	// leaseTTL is given to hosts started from now on (Config.LeaseTTL: self-fencing); 0: off.
	leaseTTL time.Duration
	// configure, if set, adjusts the Config of each host started from now on (its driver, netd, ...).
	configure func(id string, c *Config)
}

type testHost struct {
	id     string
	runDir string
	h      *Host
	cancel context.CancelFunc
	done   chan error
	srv    *grpc.Server
	reg    *registry.Registration
	addr   string
}

func newEnv(t *testing.T, ctx context.Context) *env {
	t.Helper()
	needQEMU(t)
	g, err := guest()
	if err != nil {
		t.Skipf("no test guest: %v", err)
	}
	lw := &testLogWriter{t: t}
	t.Cleanup(func() { lw.mu.Lock(); lw.done = true; lw.mu.Unlock() })
	e := &env{t: t, ctx: ctx, guest: g, log: slog.New(slog.NewTextHandler(lw, &slog.HandlerOptions{Level: slog.LevelInfo})),
		hosts: map[string]*testHost{}}
	// Short: Unix socket paths are limited to 107 bytes, and t.TempDir's paths grow with test names.
	e.dir, err = os.MkdirTemp("", "vmh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		killProcessesUsing(e.dir)
		os.RemoveAll(e.dir)
	})
	et := etcdtest.Start(t, "")
	e.etcd = et
	e.store = store.New(et.Client(t))
	if _, err := registry.InitCluster(ctx, e.store); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(api.UnimplementedInterceptor))
	api.Register(srv, &api.ClusterServer{Store: e.store, EtcdEndpoints: et.Endpoints(), EmbeddedEtcd: true, MetadID: "metad-t", Version: "test"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	c, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	e.api = basaltv1.NewVMServiceClient(c)
	return e
}

// volume records a volume and serves a fresh raw image of it on the env's NBD socket (one qemu-nbd per env:
// call it once). It returns the image's path.
func (e *env) volume(name string, size int64) string {
	t := e.t
	t.Helper()
	if _, err := e.store.Create(e.ctx, schema.VolumeKey(name), &basaltv1.Volume{Name: name, SizeBytes: uint64(size), Replicas: 1, SectorSize: 512, Id: 1}); err != nil {
		t.Fatal(err)
	}
	var img string
	e.sock, img = nbdtest.Serve(t, e.dir, name, size)
	return img
}

// addHost starts a computed host: its VM host, its gRPC server (ComputeService) and its registration.
func (e *env) addHost(id string, memory uint64) *testHost {
	e.t.Helper()
	th := &testHost{id: id, runDir: filepath.Join(e.dir, id)}
	e.startHost(th, memory)
	e.hosts[id] = th
	e.t.Cleanup(func() { e.stopHost(th) })
	return th
}

func (e *env) startHost(th *testHost, memory uint64) {
	t := e.t
	t.Helper()
	drv, err := qemu.New(qemu.Config{Logger: e.log.With("node", th.id)})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{NodeID: th.id, Store: e.store, Driver: drv, RunDir: th.runDir, BlockdSocket: e.sock,
		MemoryBytes: memory, VCPUs: 2, MigrationHost: "127.0.0.1", Interval: 500 * time.Millisecond, LeaseTTL: e.leaseTTL,
		Log: e.log.With("node", th.id)}
	if e.configure != nil {
		e.configure(th.id, &cfg)
	}
	th.h, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	th.srv = grpc.NewServer()
	basaltv1.RegisterComputeServiceServer(th.srv, th.h.Service())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	th.addr = l.Addr().String()
	go th.srv.Serve(l)
	th.reg, err = registry.Register(e.ctx, e.store, &basaltv1.Node{Id: th.id, Kind: basaltv1.NodeKind_NODE_KIND_COMPUTED, GrpcAddress: th.addr},
		"test", 2*time.Second, e.log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	th.cancel, th.done = cancel, make(chan error, 1)
	go func() { th.done <- th.h.Run(ctx) }()
	// Placement needs the host's record: wait until Run has published it.
	for {
		if _, err := store.Get[basaltv1.ComputeHost](e.ctx, e.store, schema.ComputeHostKey(th.id)); err == nil {
			break
		}
		select {
		case <-e.ctx.Done():
			t.Fatalf("host %s never published its record", th.id)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stopHost stops a host the way computed stops: its machines keep running.
func (e *env) stopHost(th *testHost) {
	if th.cancel == nil {
		return
	}
	th.cancel()
	if err := <-th.done; err != nil {
		e.t.Errorf("host %s: %v", th.id, err)
	}
	th.srv.Stop()
	th.reg.Close(context.Background())
	th.cancel = nil
}

// killProcessesUsing kills every process whose command line mentions dir (the QEMUs of a test's hosts).
func killProcessesUsing(dir string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(dir)) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// qemuPIDs lists the QEMU processes running for dir.
func qemuPIDs(dir string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(dir)) && bytes.Contains(b, []byte("qemu-system")) {
			out = append(out, pid)
		}
	}
	return out
}

// apiViewer is a console attached through metad's API.
type apiViewer struct {
	con     *testguest.Console
	stream  basaltv1.VMService_StreamConsoleClient
	mu      sync.Mutex
	notices []string
	cancel  context.CancelFunc
}

func (e *env) attach(name string, opts *basaltv1.ConsoleInput) *apiViewer {
	e.t.Helper()
	ctx, cancel := context.WithCancel(e.ctx)
	s, err := e.api.StreamConsole(ctx)
	if err != nil {
		cancel()
		e.t.Fatal(err)
	}
	if opts == nil {
		opts = &basaltv1.ConsoleInput{}
	}
	opts.Name = name
	if err := s.Send(opts); err != nil {
		cancel()
		e.t.Fatal(err)
	}
	pr, pw := io.Pipe()
	v := &apiViewer{stream: s, cancel: cancel}
	go func() {
		for {
			out, err := s.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = io.EOF
				}
				pw.CloseWithError(err)
				return
			}
			if n := out.GetNotice(); n != "" {
				v.mu.Lock()
				v.notices = append(v.notices, n)
				v.mu.Unlock()
				e.log.Info("console notice", "vm", name, "notice", n)
			}
			if len(out.GetData()) > 0 {
				pw.Write(out.GetData())
			}
		}
	}()
	v.con = testguest.WatchConsole(pr)
	e.t.Cleanup(cancel)
	return v
}

func (v *apiViewer) noticeList() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.notices...)
}

// waitVM polls GetVM until cond holds.
func (e *env) waitVM(name, what string, within time.Duration, cond func(*basaltv1.VM) bool) *basaltv1.VM {
	e.t.Helper()
	deadline := time.Now().Add(within)
	var last *basaltv1.VM
	for {
		vm, err := e.api.GetVM(e.ctx, &basaltv1.GetVMRequest{Name: name})
		if err == nil {
			last = vm
			if cond(vm) {
				return vm
			}
		}
		if time.Now().After(deadline) || e.ctx.Err() != nil {
			e.t.Fatalf("VM %s: %s: not within %s; last: %v (err %v)", name, what, within, last, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// verifyDisk checks the agent's record ring in img and that it holds every record announced.
func verifyDisk(t *testing.T, img string, recs []testguest.Rec) testguest.DiskSummary {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, _ := f.Stat()
	s, err := testguest.VerifyDisk(f, info.Size())
	if err != nil {
		t.Fatalf("disk %s: %v", img, err)
	}
	if err := s.CheckAnnounced(recs); err != nil {
		t.Fatalf("disk %s: %v", img, err)
	}
	return s
}
