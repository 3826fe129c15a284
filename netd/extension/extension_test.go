package extension

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/netlab"
)

// flowcountBinary is $BASALT_BIN_DIR/basalt-flowcount (set by `make test`), else a fresh build.
func flowcountBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("BASALT_BIN_DIR"); dir != "" {
		if bin := filepath.Join(dir, "basalt-flowcount"); fileExists(bin) {
			return bin
		}
	}
	bin := filepath.Join(t.TempDir(), "basalt-flowcount")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/basalt-flowcount").CombinedOutput(); err != nil {
		t.Fatalf("build basalt-flowcount: %v\n%s", err, out)
	}
	return bin
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

type flows struct {
	Flows []struct {
		Dir, Proto, Src, Dst string
		Packets              uint64
	}
}

func (f flows) count(dir, proto, src, dst string) uint64 {
	for _, x := range f.Flows {
		if x.Dir == dir && x.Proto == proto && x.Src == src && x.Dst == dst {
			return x.Packets
		}
	}
	return 0
}

// The example extension in the path of a port: the port is cut off while no filter runs (fails closed);
// with basalt-flowcount running it passes traffic and counts it per flow in both directions; a killed filter
// is restarted; a new runner (a netd restart) adopts the running process without interrupting the port; and
// removing the extension stops the process.
func TestFlowcountExtension(t *testing.T) {
	if err := netlab.Check(); err != nil {
		t.Skip(err)
	}
	bin := flowcountBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lab, err := netlab.New(fmt.Sprintf("bsex%d", os.Getpid()%100000), 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})
	h1, h2 := lab.Hosts[0], lab.Hosts[1]
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var planes []*dataplane.Plane
	for _, h := range lab.Hosts {
		p, err := dataplane.New(dataplane.Options{NetNS: h.Handle, GatewayNetNS: h.Name + "-gw", Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		planes = append(planes, p)
	}
	mac := func(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }
	a, err := lab.AddVM(h1, "a", "tpa", mac("52:54:00:00:00:01"), netip.MustParsePrefix("10.0.0.1/24"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := lab.AddVM(h2, "b", "tpb", mac("52:54:00:00:00:02"), netip.MustParsePrefix("10.0.0.2/24"))
	if err != nil {
		t.Fatal(err)
	}
	nw := []dataplane.Network{{Name: "n", VNI: 100}}
	guards := dataplane.PortPolicy{SpoofGuard: true, DHCPGuard: true}
	pa := dataplane.Port{Network: "n", Name: "n/a", MAC: a.MAC, IPs: []netip.Addr{a.IP()}, Tap: a.Tap, Policy: guards}
	pa.Policy.Extension = true
	s1 := dataplane.HostState{UnderlayIP: h1.IP, UnderlayDev: "eth0", Networks: nw, Ports: []dataplane.Port{pa},
		Remote: []dataplane.RemotePort{{Network: "n", MAC: b.MAC, IPs: []netip.Addr{b.IP()}, HostVTEP: h2.IP}}}
	s2 := dataplane.HostState{UnderlayIP: h2.IP, UnderlayDev: "eth0", Networks: nw,
		Ports:  []dataplane.Port{{Network: "n", Name: "n/b", MAC: b.MAC, IPs: []netip.Addr{b.IP()}, Tap: b.Tap, Policy: guards}},
		Remote: []dataplane.RemotePort{{Network: "n", MAC: a.MAC, IPs: []netip.Addr{a.IP()}, HostVTEP: h1.IP}}}
	for i, s := range []dataplane.HostState{s1, s2} {
		if err := planes[i].Apply(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if err := h2.WaitForwarding(ctx, b.Tap); err != nil {
		t.Fatal(err)
	}
	if a.Ping(ctx, 2, "10.0.0.2") {
		t.Fatal("an extension port without its filter process passes traffic; it must be cut off")
	}

	state := t.TempDir()
	newRunner := func() *Runner {
		r, err := New(Config{Programs: map[string][]string{"flowcount": {bin}}, StateDir: state, NetNS: h1.Handle, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	ext := Port{Name: "n/a", Tap: a.Tap, ExtTap: planes[0].ExtensionTap(a.Tap), Extension: "flowcount"}
	r := newRunner()
	t.Cleanup(func() { r.Sync(ctx, nil); r.Close() })
	r.Sync(ctx, []Port{ext})
	waitPing := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !a.Ping(ctx, 1, "10.0.0.2") {
			if time.Now().After(deadline) {
				logb, _ := os.ReadFile(filepath.Join(r.StateDir("n/a"), "log"))
				t.Fatalf("%s: a cannot reach b through the extension\nextension log:\n%s", what, logb)
			}
		}
	}
	waitPing("first start")
	if _, err := a.Run(ctx, "busybox", "ping", "-q", "-c", "3", "-i", "0.2", "10.0.0.2"); err != nil {
		t.Fatal(err)
	}
	var f flows
	deadline := time.Now().Add(5 * time.Second)
	for {
		bs, err := os.ReadFile(filepath.Join(r.StateDir("n/a"), "flows.json"))
		if err == nil && json.Unmarshal(bs, &f) == nil && f.count("from-vm", "icmp", "10.0.0.1", "10.0.0.2") >= 4 &&
			f.count("to-vm", "icmp", "10.0.0.2", "10.0.0.1") >= 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("flows.json does not show the pings both ways: %s (%v)", bs, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("flowcount saw %d echo requests and %d replies", f.count("from-vm", "icmp", "10.0.0.1", "10.0.0.2"), f.count("to-vm", "icmp", "10.0.0.2", "10.0.0.1"))

	// A killed filter is restarted.
	pid := r.Pid("n/a")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitPing("after the filter was killed")
	if p := r.Pid("n/a"); p == pid || p == 0 {
		t.Fatalf("pid after restart = %d (was %d)", p, pid)
	}

	// netd restarts: the process runs on unsupervised, and the next runner adopts it.
	pid = r.Pid("n/a")
	r.Close()
	wait := pingBackground(ctx, a, "10.0.0.2", 20)
	r = newRunner()
	r.Sync(ctx, []Port{ext})
	time.Sleep(300 * time.Millisecond)
	if p := r.Pid("n/a"); p != pid {
		t.Fatalf("the new runner runs pid %d; want the adopted %d", p, pid)
	}
	if sent, got := wait(); got != sent {
		t.Fatalf("%d of %d pings lost while the runner was replaced", sent-got, sent)
	}

	// Off: the process stops; the port works without the extension.
	r.Sync(ctx, nil)
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
		if st, _ := startTime(pid); st != 0 {
			t.Fatalf("the extension process %d still runs after its port lost the extension", pid)
		}
	}
	s1.Ports[0].Policy.Extension = false
	if err := planes[0].Apply(ctx, s1); err != nil {
		t.Fatal(err)
	}
	if err := h1.WaitForwarding(ctx, a.Tap); err != nil {
		t.Fatal(err)
	}
	waitPing("without the extension")
	if _, err := h1.NL.LinkByName(planes[0].ExtensionTap(a.Tap)); err == nil {
		t.Fatal("the extension tap survived the extension")
	}
}

// pingBackground pings every 50 ms; the returned function waits and returns sent and received.
func pingBackground(ctx context.Context, from *netlab.VM, dst string, count int) func() (int, int) {
	ch := make(chan [2]int, 1)
	go func() {
		out, _ := from.Run(ctx, "busybox", "ping", "-q", "-c", fmt.Sprint(count), "-i", "0.05", "-W", "1", dst)
		var s, r int
		if i := strings.Index(out, "packets transmitted"); i >= 0 {
			fmt.Sscanf(out[strings.LastIndex(out[:i], "\n")+1:], "%d packets transmitted, %d packets received", &s, &r)
		}
		ch <- [2]int{s, r}
	}()
	return func() (int, int) { v := <-ch; return v[0], v[1] }
}
