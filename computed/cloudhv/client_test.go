package cloudhv

// Contract tests of the API client. Cloud Hypervisor cannot run here (no binary, no KVM that boots guests), so
// the server is fakeVMM behind a validator built from the OpenAPI document: every request the client sends is
// checked for method, path and body against the schema (any violation fails the test), and every answer is
// checked against the response schema. The negative tests show that the validator does catch bad requests and
// bad answers, so these tests can fail.

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ptr[T any](v T) *T { return &v }

// TestClientEveryEndpoint drives every client method through the validating fake, following Cloud
// Hypervisor's sequencing rules.
func TestClientEveryEndpoint(t *testing.T) {
	ctx := testContext(t)
	vmm := startInProcessVMM(t)
	c := NewClient(vmm.socket)
	defer c.Close()
	dir := shortTempDir(t)
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}

	ping, err := c.Ping(ctx)
	if err != nil || ping.Version == "" {
		t.Fatalf("Ping = %+v, %v", ping, err)
	}
	if _, err := c.Info(ctx); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("Info before create: %v, want 404", err)
	}
	if err := c.BootVM(ctx); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("BootVM before create: %v, want 404", err)
	}

	cfg := VMConfig{
		CPUs: &CPUsConfig{BootVCPUs: 1, MaxVCPUs: 4},
		Memory: &MemoryConfig{Size: 512 << 20, HotplugSize: 512 << 20,
			Zones: []MemoryZoneConfig{{ID: "z0", Size: 256 << 20, HotplugSize: 256 << 20}}},
		Payload: PayloadConfig{Kernel: "/boot/vmlinuz", Initramfs: "/boot/initrd.img", Cmdline: "console=ttyS0"},
		Balloon: &BalloonConfig{Size: 0},
		Serial:  &SerialConfig{Mode: ConsoleSocket, Socket: filepath.Join(dir, "console.sock")},
		Console: &ConsoleConfig{Mode: ConsoleOff},
		Net:     []NetConfig{{ID: "nic0", Tap: "tap0", MAC: "52:54:00:12:34:56"}},
	}
	if err := c.CreateVM(ctx, cfg); err != nil {
		t.Fatalf("CreateVM: %v", err)
	}
	if err := c.CreateVM(ctx, cfg); err == nil {
		t.Fatal("second CreateVM succeeded")
	}
	// Cold plug before boot answers 204, so no PCI info.
	info, err := c.AddDisk(ctx, DiskConfig{ID: "root", Path: disk, ImageType: "Raw", Serial: "root"})
	if err != nil || info != nil {
		t.Fatalf("cold AddDisk = %+v, %v; want nil info", info, err)
	}
	if err := c.PauseVM(ctx); !IsStatus(err, http.StatusMethodNotAllowed) {
		t.Fatalf("PauseVM before boot: %v, want 405", err)
	}
	if err := c.BootVM(ctx); err != nil {
		t.Fatalf("BootVM: %v", err)
	}
	vi, err := c.Info(ctx)
	if err != nil || vi.State != VMStateRunning || len(vi.Config.Disks) != 1 || vi.DeviceTree["root"].ID != "root" {
		t.Fatalf("Info after boot = %+v, %v", vi, err)
	}
	// Hot plug answers 200 with the PCI address.
	info, err = c.AddDisk(ctx, DiskConfig{ID: "data", Path: disk, ReadOnly: true})
	if err != nil || info == nil || info.ID != "data" || info.BDF == "" {
		t.Fatalf("hot AddDisk = %+v, %v", info, err)
	}
	if _, err := c.AddDisk(ctx, DiskConfig{ID: "data", Path: disk}); !IsStatus(err, http.StatusConflict) {
		t.Fatalf("AddDisk with a used ID: %v, want 409", err)
	}
	if info, err := c.AddNet(ctx, NetConfig{ID: "nic1", Tap: "tap1"}); err != nil || info == nil {
		t.Fatalf("AddNet = %+v, %v", info, err)
	}
	counters, err := c.Counters(ctx)
	if err != nil || counters["data"]["read_bytes"] == 0 {
		t.Fatalf("Counters = %v, %v", counters, err)
	}
	if err := c.Resize(ctx, VMResize{DesiredVCPUs: ptr(2), DesiredRAM: ptr(uint64(768 << 20)), DesiredBalloon: ptr(uint64(256 << 20))}); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	if err := c.Resize(ctx, VMResize{DesiredVCPUs: ptr(8)}); err == nil {
		t.Fatal("Resize beyond max_vcpus succeeded")
	}
	if err := c.ResizeZone(ctx, VMResizeZone{ID: "z0", DesiredRAM: 384 << 20}); err != nil {
		t.Fatalf("ResizeZone: %v", err)
	}
	vi, err = c.Info(ctx)
	if err != nil || vi.Config.CPUs.BootVCPUs != 2 || vi.Config.Memory.Size != 768<<20 || vi.MemoryActualSize != 512<<20 {
		t.Fatalf("Info after resize = %+v, %v", vi, err)
	}
	if err := c.RemoveDevice(ctx, "nic1"); err != nil {
		t.Fatalf("RemoveDevice: %v", err)
	}
	if err := c.RemoveDevice(ctx, "nic1"); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("RemoveDevice twice: %v, want 404", err)
	}
	if err := c.PauseVM(ctx); err != nil {
		t.Fatalf("PauseVM: %v", err)
	}
	snap := shortTempDir(t)
	if err := c.Snapshot(ctx, "file://"+snap); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if err := c.ResumeVM(ctx); err != nil {
		t.Fatalf("ResumeVM: %v", err)
	}
	if err := c.ResumeVM(ctx); !IsStatus(err, http.StatusMethodNotAllowed) {
		t.Fatalf("ResumeVM when running: %v, want 405", err)
	}
	if err := c.RebootVM(ctx); err != nil {
		t.Fatalf("RebootVM: %v", err)
	}
	if err := c.Restore(ctx, RestoreConfig{SourceURL: "file://" + snap}); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("Restore into a created VMM: %v, want 404", err)
	}
	if err := c.ShutdownVM(ctx); err != nil {
		t.Fatalf("ShutdownVM: %v", err)
	}
	if vi, err := c.Info(ctx); err != nil || vi.State != VMStateCreated {
		t.Fatalf("Info after ShutdownVM = %v, %v; want Created, as Cloud Hypervisor reports", vi.State, err)
	}
	if err := c.DeleteVM(ctx); err != nil {
		t.Fatalf("DeleteVM: %v", err)
	}
	if _, err := c.Info(ctx); !IsStatus(err, http.StatusNotFound) {
		t.Fatalf("Info after delete: %v, want 404", err)
	}
	if err := c.Restore(ctx, RestoreConfig{SourceURL: "file://" + snap, Resume: true, MemoryRestoreMode: "Copy"}); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if vi, err := c.Info(ctx); err != nil || vi.State != VMStateRunning || len(vi.Config.Disks) != 2 {
		t.Fatalf("Info after restore = %+v, %v", vi, err)
	}
	if err := c.PowerButton(ctx); err != nil {
		t.Fatalf("PowerButton: %v", err)
	}
	select {
	case <-vmm.exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the fake VMM did not exit after the guest powered off")
	}
}

// TestClientMigrationEndpoints sends a migration between two validating fakes: receive-migration blocks until
// the sender has connected, as in Cloud Hypervisor.
func TestClientMigrationEndpoints(t *testing.T) {
	ctx := testContext(t)
	src, dst := startInProcessVMM(t), startInProcessVMM(t)
	srcClient, dstClient := NewClient(src.socket), NewClient(dst.socket)
	cfg := VMConfig{CPUs: &CPUsConfig{BootVCPUs: 2, MaxVCPUs: 2}, Memory: &MemoryConfig{Size: 256 << 20},
		Payload: PayloadConfig{Kernel: "/boot/vmlinuz"}}
	if err := srcClient.CreateVM(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := srcClient.SendMigration(ctx, SendMigrationData{DestinationURL: "unix:/nonexistent"}); err == nil {
		t.Fatal("SendMigration of a VM that is not running succeeded")
	}
	if err := srcClient.BootVM(ctx); err != nil {
		t.Fatal(err)
	}
	url := "unix:" + filepath.Join(shortTempDir(t), "migration.sock")
	received := make(chan error, 1)
	go func() { received <- dstClient.ReceiveMigration(ctx, ReceiveMigrationData{ReceiverURL: url}) }()
	// The destination listens once its handler runs; retry until the send connects.
	err := waitFor(ctx, 20*time.Millisecond, func() (bool, error) {
		err := srcClient.SendMigration(ctx, SendMigrationData{DestinationURL: url, DowntimeMS: 200, TimeoutS: 30, TimeoutStrategy: "Cancel"})
		// Until the destination listens the socket is missing, or bound but not yet listening.
		if err != nil && (strings.Contains(err.Error(), "no such file") || strings.Contains(err.Error(), "connection refused")) {
			return false, nil
		}
		return true, err
	})
	if err != nil {
		t.Fatalf("SendMigration: %v", err)
	}
	if err := <-received; err != nil {
		t.Fatalf("ReceiveMigration: %v", err)
	}
	if vi, err := dstClient.Info(ctx); err != nil || vi.State != VMStateRunning || vi.Config.CPUs.BootVCPUs != 2 {
		t.Fatalf("destination Info = %+v, %v", vi, err)
	}
	select {
	case <-src.exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the source did not exit after a successful migration")
	}
	if err := dstClient.ShutdownVMM(ctx); err != nil {
		t.Fatalf("ShutdownVMM: %v", err)
	}
}

// rawRequest sends a body the typed client would not produce.
func rawRequest(ctx context.Context, c *Client, method, path string, body any) error {
	_, err := c.do(ctx, method, path, body, nil)
	return err
}

// TestContractRejectsBadRequests shows that requests breaking the schema are caught, so a driver bug of that
// kind fails the contract tests.
func TestContractRejectsBadRequests(t *testing.T) {
	ctx := testContext(t)
	vmm := startInProcessVMM(t)
	c := NewClient(vmm.socket)
	cases := []struct {
		name, method, path string
		body               any
	}{
		{"missing required payload", http.MethodPut, "/vm.create", map[string]any{"cpus": map[string]any{"boot_vcpus": 1, "max_vcpus": 1}}},
		{"boot_vcpus below minimum", http.MethodPut, "/vm.create", map[string]any{"payload": map[string]any{}, "cpus": map[string]any{"boot_vcpus": 0, "max_vcpus": 1}}},
		{"misspelt property", http.MethodPut, "/vm.create", map[string]any{"payload": map[string]any{"kernal": "/boot/vmlinuz"}}},
		{"wrong type", http.MethodPut, "/vm.create", map[string]any{"payload": map[string]any{}, "memory": map[string]any{"size": "1G"}}},
		{"bad enum", http.MethodPut, "/vm.create", map[string]any{"payload": map[string]any{}, "serial": map[string]any{"mode": "Sockets"}}},
		{"downtime_ms below minimum", http.MethodPut, "/vm.send-migration", map[string]any{"destination_url": "tcp:127.0.0.1:1", "downtime_ms": 0}},
		{"missing receiver_url", http.MethodPut, "/vm.receive-migration", map[string]any{}},
		{"body where none is specified", http.MethodPut, "/vm.boot", map[string]any{"now": true}},
		{"wrong method", http.MethodGet, "/vm.boot", nil},
		{"unknown path", http.MethodPut, "/vm.frobnicate", nil},
		{"missing required body", http.MethodPut, "/vm.resize", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := rawRequest(ctx, c, tc.method, tc.path, tc.body)
			if !isViolation(err) {
				t.Fatalf("got %v, want a contract violation", err)
			}
			if v := vmm.takeViolations(); len(v) != 1 {
				t.Fatalf("recorded violations %q, want one", v)
			} else {
				t.Logf("caught: %s", v[0])
			}
		})
	}
}

// TestContractRejectsBadResponses shows that the fake's answers are themselves checked: a handler that answers
// outside the response schema is reported.
func TestContractRejectsBadResponses(t *testing.T) {
	ctx := testContext(t)
	c, err := loadContract(specPath())
	if err != nil {
		t.Fatal(err)
	}
	broken := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/v1/vm.info": // no state, and config without its required payload
			answerJSON(w, map[string]any{"config": map[string]any{}})
		case "/api/v1/vmm.ping": // version is required
			answerJSON(w, map[string]any{"pid": 1})
		case "/api/v1/vm.add-disk": // bdf is required
			answerJSON(w, map[string]any{"id": "d"})
		case "/api/v1/vm.counters": // counters are integers
			answerJSON(w, map[string]any{"d": map[string]any{"read_bytes": "many"}})
		}
	})
	vmm := startInProcessVMMWith(t, c, broken)
	client := NewClient(vmm.socket)
	calls := map[string]func() error{
		"vm.info":     func() error { _, err := client.Info(ctx); return err },
		"vmm.ping":    func() error { _, err := client.Ping(ctx); return err },
		"vm.add-disk": func() error { _, err := client.AddDisk(ctx, DiskConfig{ID: "d", Path: "/dev/null"}); return err },
		"vm.counters": func() error { _, err := client.Counters(ctx); return err },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			if err := call(); !IsStatus(err, http.StatusInternalServerError) || !strings.Contains(err.Error(), "outside the contract") {
				t.Fatalf("got %v, want the validator's 500", err)
			}
			if v := vmm.takeViolations(); len(v) != 1 || !strings.HasPrefix(v[0], "response: ") {
				t.Fatalf("recorded violations %q, want one response violation", v)
			} else {
				t.Logf("caught: %s", v[0])
			}
		})
	}
}

// TestClientErrors covers Cloud Hypervisor refusing a request and the socket being gone.
func TestClientErrors(t *testing.T) {
	ctx := testContext(t)
	vmm := startInProcessVMM(t)
	c := NewClient(vmm.socket)
	err := c.PauseVM(ctx)
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("PauseVM without a VM: %v, want an *APIError", err)
	}
	if apiErr.StatusCode != http.StatusNotFound || apiErr.Method != http.MethodPut || apiErr.Path != "/vm.pause" || apiErr.Body != "VmNotCreated" {
		t.Fatalf("APIError = %+v", apiErr)
	}
	if msg := err.Error(); !strings.Contains(msg, "404") || !strings.Contains(msg, "VmNotCreated") || !strings.Contains(msg, "/vm.pause") {
		t.Fatalf("error text %q lacks status, body or path", msg)
	}

	gone := NewClient(filepath.Join(shortTempDir(t), "api.sock"))
	_, err = gone.Ping(ctx)
	if err == nil || errors.As(err, &apiErr) || !strings.Contains(err.Error(), "api.sock") {
		t.Fatalf("Ping on a missing socket: %v, want a connection error naming the socket", err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.Ping(cancelled); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ping with a cancelled context: %v", err)
	}
}
