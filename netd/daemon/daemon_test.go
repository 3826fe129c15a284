package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/google/nftables"
)

// netdBinary is $BASALT_BIN_DIR/netd (set by `make test`), else a fresh build.
func netdBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("BASALT_BIN_DIR"); dir != "" {
		return filepath.Join(dir, "netd")
	}
	bin := filepath.Join(t.TempDir(), "netd")
	out, err := exec.Command("go", "build", "-o", bin, "../cmd/netd").CombinedOutput()
	if err != nil {
		t.Fatalf("build netd: %v\n%s", err, out)
	}
	return bin
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type proc struct {
	cmd *exec.Cmd
	log *syncBuffer
}

// startNetd runs the netd binary for host h (node ID = the host's suffix), programming h's namespace, and
// waits until it is registered up (it registers only once the host has converged).
func startNetd(t *testing.T, ctx context.Context, bin string, etcd []string, s *store.Store, lab *netlab.Lab, h *netlab.Host) *proc {
	t.Helper()
	id := strings.TrimPrefix(h.Name, lab.ID+"-")
	p := &proc{log: &syncBuffer{}}
	p.cmd = exec.Command(bin, "--node-id", id, "--data-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--lease-ttl", "2s",
		"--etcd-endpoints", strings.Join(etcd, ","), "--netns", h.Name, "--gateway-netns-prefix", h.Name+"-gw", "--log-level", "warn")
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		p.cmd.Wait()
		if t.Failed() {
			t.Logf("netd %s log:\n%s", id, p.log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := registry.Get(ctx, s, id)
		if err == nil && st.GetState() == basaltv1.NodeState_NODE_STATE_UP && st.GetLiveness().GetPid() == int32(p.cmd.Process.Pid) {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("netd %s did not come up: %v\n%s", id, err, p.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The real netd binary, one per "host" namespace: ports across hosts reach each other; a netd killed with
// SIGKILL leaves traffic flowing and its successor serves the counters; a netd with nothing declared for its
// host leaves the host untouched; SIGTERM is a clean exit.
func TestNetdBinary(t *testing.T) {
	if err := netlab.Check(); err != nil {
		t.Skip(err)
	}
	bin := netdBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(ctx, s); err != nil {
		t.Fatal(err)
	}
	lab, err := netlab.New(fmt.Sprintf("bsnd%d", os.Getpid()%100000), 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})
	h1, h2, h3 := lab.Hosts[0], lab.Hosts[1], lab.Hosts[2]
	nsrv := &api.NetworkServer{Store: s}
	if _, err := nsrv.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: "red", Tenant: "acme", Subnets: []string{"10.0.0.0/24"}}}); err != nil {
		t.Fatal(err)
	}
	var vms []*netlab.VM
	for i, h := range []*netlab.Host{h1, h2} {
		mac := net.HardwareAddr{0x52, 0x54, 0, 0, 0, byte(i + 1)}
		ip := fmt.Sprintf("10.0.0.%d", i+1)
		v, err := lab.AddVM(h, fmt.Sprintf("vm%d", i+1), fmt.Sprintf("tvm%d", i+1), mac, netip.MustParsePrefix(ip+"/24"))
		if err != nil {
			t.Fatal(err)
		}
		vms = append(vms, v)
		if _, err := nsrv.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{
			Network: "red", Name: v.Name[len(lab.ID)+1:], Mac: mac.String(), Ips: []string{ip}, Host: fmt.Sprintf("h%d", i+1), Tap: v.Tap,
		}}); err != nil {
			t.Fatal(err)
		}
	}
	p1 := startNetd(t, ctx, bin, e.Endpoints(), s, lab, h1)
	startNetd(t, ctx, bin, e.Endpoints(), s, lab, h2)
	p3 := startNetd(t, ctx, bin, e.Endpoints(), s, lab, h3)
	for _, v := range vms {
		if err := v.Host.WaitForwarding(ctx, v.Tap); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := vms[0].Run(ctx, "busybox", "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", "10.0.0.2"); err != nil {
		t.Fatalf("vm1 cannot reach vm2 through netd: %v\n%s", err, out)
	}

	// h3 has no port: its netd must not have touched it.
	links, err := h3.Links()
	if err != nil || len(links) != 2 {
		t.Fatalf("host without ports has interfaces %v (%v); want lo and eth0 only", links, err)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(h3.Handle)))
	if err != nil {
		t.Fatal(err)
	}
	if tables, err := c.ListTables(); err != nil || len(tables) != 0 {
		t.Fatalf("host without ports has nftables tables %v (%v)", tables, err)
	}

	// SIGKILL: the data plane is the kernel's; traffic flows on, and the next netd serves counters.
	if err := p1.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p1.cmd.Wait()
	if out, err := vms[1].Run(ctx, "busybox", "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", "10.0.0.1"); err != nil {
		t.Fatalf("traffic stopped with netd: %v\n%s", err, out)
	}
	startNetd(t, ctx, bin, e.Endpoints(), s, lab, h1)
	cnt, err := nsrv.GetPortCounters(ctx, &basaltv1.GetPortCountersRequest{Network: "red", Name: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	if cnt.GetHost() != "h1" || cnt.GetFromVm().GetPackets() < 6 || cnt.GetToVm().GetPackets() < 6 {
		t.Fatalf("counters of vm1 = %v; want at least 6 packets each way, read on h1", cnt)
	}

	if err := p3.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p3.cmd.Wait(); err != nil {
		t.Fatalf("netd did not exit cleanly on SIGTERM: %v\n%s", err, p3.log.String())
	}
}
