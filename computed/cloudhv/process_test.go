package cloudhv

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"
)

// TestListening checks the /proc scan StartIncoming uses to see that Cloud Hypervisor listens, on sockets of
// this process.
func TestListening(t *testing.T) {
	pid := os.Getpid()
	for _, network := range []string{"tcp4", "tcp6"} {
		host := "127.0.0.1"
		if network == "tcp6" {
			host = "::1"
		}
		ln, err := net.Listen(network, net.JoinHostPort(host, "0"))
		if err != nil {
			t.Logf("%s: %v", network, err)
			continue
		}
		url := "tcp:" + ln.Addr().String()
		if ok, err := listening(pid, url); !ok || err != nil {
			t.Errorf("listening(%s) = %v, %v while listening", url, ok, err)
		}
		ln.Close()
		if ok, err := listening(pid, url); ok || err != nil {
			t.Errorf("listening(%s) = %v, %v after close", url, ok, err)
		}
	}

	sock := filepath.Join(shortTempDir(t), "m.sock")
	if ok, _ := listening(pid, "unix:"+sock); ok {
		t.Error("listening on a socket that does not exist")
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := listening(pid, "unix:"+sock); !ok || err != nil {
		t.Errorf("listening(unix) = %v, %v while listening", ok, err)
	}
	// A connected (not listening) socket on the same path does not count.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if ok, _ := listening(pid, "unix:"+sock); ok {
		t.Error("listening(unix) after close")
	}
	conn.Close()

	if _, err := listening(pid, "rdma:x"); err == nil {
		t.Error("an unknown URL scheme was accepted")
	}
}

func TestCPUTime(t *testing.T) {
	before, err := cpuTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Burn ~50ms of CPU.
	deadline := time.Now().Add(50 * time.Millisecond)
	x := 0
	for time.Now().Before(deadline) {
		x++
	}
	runtime.KeepAlive(x)
	after, err := cpuTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Errorf("CPU time did not grow: %s -> %s", before, after)
	}
}

func TestPIDFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pid")
	if err := writePIDFile(path, 1234); err != nil {
		t.Fatal(err)
	}
	if pid, err := readPIDFile(path); err != nil || pid != 1234 {
		t.Fatalf("readPIDFile = %d, %v", pid, err)
	}
	os.WriteFile(path, []byte("garbage"), 0o600)
	if _, err := readPIDFile(path); err == nil {
		t.Error("garbage pid file accepted")
	}
	if isCloudHypervisor(os.Getpid(), "/run/x/api.sock") {
		t.Error("this test process taken for cloud-hypervisor")
	}
}

func TestReceiverURL(t *testing.T) {
	u, err := receiverURL("127.0.0.1")
	if err != nil || len(u) <= len("tcp:127.0.0.1:") || u[:len("tcp:127.0.0.1:")] != "tcp:127.0.0.1:" {
		t.Errorf("receiverURL(127.0.0.1) = %q, %v", u, err)
	}
	if _, err := strconv.Atoi(u[len("tcp:127.0.0.1:"):]); err != nil {
		t.Errorf("no port in %q", u)
	}
	if u, err := receiverURL("::1"); err == nil && u[:len("tcp:[::1]:")] != "tcp:[::1]:" {
		t.Errorf("receiverURL(::1) = %q", u)
	}
	if u, err := receiverURL("unix:/run/x/m.sock"); err != nil || u != "unix:/run/x/m.sock" {
		t.Errorf("unix = %q, %v", u, err)
	}
	for _, bad := range []string{"", "unix:", "192.0.2.1"} {
		if _, err := receiverURL(bad); err == nil {
			t.Errorf("receiverURL(%q) succeeded", bad)
		}
	}
}

// TestSpecCopyMatchesReference: the contract tests use testdata's copy of the OpenAPI document; it must be the
// project's reference copy when that is present (shared/ beside the repository).
func TestSpecCopyMatchesReference(t *testing.T) {
	ours, err := os.ReadFile(specPath())
	if err != nil {
		t.Fatal(err)
	}
	ref := filepath.Join(filepath.Dir(specPath()), "..", "..", "..", "..", "shared", "reference", "cloud-hypervisor-openapi.yaml")
	theirs, err := os.ReadFile(ref)
	if err != nil {
		t.Skipf("reference copy not found beside the repository: %v", err)
	}
	if !bytes.Equal(ours, theirs) {
		t.Errorf("testdata/cloud-hypervisor-openapi.yaml differs from %s: update the copy and the driver", ref)
	}
}

// TestWaitForHonoursContext is small but the driver's start-up relies on it.
func TestWaitForHonoursContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := waitFor(ctx, 10*time.Millisecond, func() (bool, error) { return false, nil }); err != context.DeadlineExceeded {
		t.Fatalf("waitFor = %v", err)
	}
}
