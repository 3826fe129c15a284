package cloudhv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
)

// apiBase is the server URL of the OpenAPI document. The host part is never resolved: every connection goes
// to the Unix socket, but Cloud Hypervisor's HTTP server (and the contract test's router) expect it.
const apiBase = "http://localhost/api/v1"

// maxResponseBody bounds what is read from one response. vm.info with a large device tree is the biggest
// answer the driver asks for, and is far below this.
const maxResponseBody = 16 << 20

// APIError is a non-2xx answer from Cloud Hypervisor. Body is what it said, usually the chain of Rust errors
// that explains the refusal.
type APIError struct {
	Method     string
	Path       string
	StatusCode int
	Body       string
}

func (e *APIError) Error() string {
	body := strings.TrimSpace(e.Body)
	if body == "" {
		body = "(empty body)"
	}
	return fmt.Sprintf("cloud-hypervisor %s %s: HTTP %d %s: %s", e.Method, e.Path, e.StatusCode,
		http.StatusText(e.StatusCode), body)
}

// IsStatus reports whether err is an APIError with the given HTTP status.
func IsStatus(err error, status int) bool {
	var apiErr *APIError
	return errors.As(err, &apiErr) && apiErr.StatusCode == status
}

// Client speaks Cloud Hypervisor's REST API over the Unix socket given to --api-socket. It is safe for
// concurrent use, but Cloud Hypervisor handles one request at a time on its VMM thread: a long request (a
// migration) delays every other one until it ends.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the API socket at path. It does not connect until a request is made.
func NewClient(path string) *Client {
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		// One connection per request: Cloud Hypervisor's micro_http server is not built for long-lived
		// client connections, and a fresh connection makes "socket gone" show up on the next call instead of
		// on a stale pooled one.
		DisableKeepAlives: true,
	}
	return &Client{socket: path, http: &http.Client{Transport: transport}}
}

// Socket is the API socket's path.
func (c *Client) Socket() string { return c.socket }

// Close releases idle resources. Requests in flight are not interrupted.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// do sends one request. in, if not nil, is sent as the JSON body; out, if not nil, receives the JSON body of a
// 200 answer. It returns the HTTP status of a 2xx answer, or an *APIError.
func (c *Client) do(ctx context.Context, method, path string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, fmt.Errorf("cloud-hypervisor %s %s: encoding request: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, apiBase+path, body)
	if err != nil {
		return 0, fmt.Errorf("cloud-hypervisor %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("cloud-hypervisor %s %s via %s: %w", method, path, c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody))
	if err != nil {
		return 0, fmt.Errorf("cloud-hypervisor %s %s: reading response: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, &APIError{Method: method, Path: path, StatusCode: resp.StatusCode, Body: string(data)}
	}
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("cloud-hypervisor %s %s: decoding response %q: %w", method, path,
				truncate(data, 200), err)
		}
	}
	return resp.StatusCode, nil
}

func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "..."
}

// Ping is GET /vmm.ping: is the VMM answering, and which version is it.
func (c *Client) Ping(ctx context.Context) (PingResponse, error) {
	var r PingResponse
	_, err := c.do(ctx, http.MethodGet, "/vmm.ping", nil, &r)
	return r, err
}

// ShutdownVMM is PUT /vmm.shutdown: stop the VM if any and exit the process.
func (c *Client) ShutdownVMM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vmm.shutdown", nil, nil)
	return err
}

// CreateVM is PUT /vm.create: store the configuration; nothing runs until BootVM.
func (c *Client) CreateVM(ctx context.Context, cfg VMConfig) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.create", cfg, nil)
	return err
}

// BootVM is PUT /vm.boot.
func (c *Client) BootVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.boot", nil, nil)
	return err
}

// ShutdownVM is PUT /vm.shutdown: stop the VM at once (no guest involvement); the VMM stays up.
func (c *Client) ShutdownVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.shutdown", nil, nil)
	return err
}

// PowerButton is PUT /vm.power-button: an ACPI power-button press the guest may act on.
func (c *Client) PowerButton(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.power-button", nil, nil)
	return err
}

// RebootVM is PUT /vm.reboot.
func (c *Client) RebootVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.reboot", nil, nil)
	return err
}

// PauseVM is PUT /vm.pause.
func (c *Client) PauseVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.pause", nil, nil)
	return err
}

// ResumeVM is PUT /vm.resume.
func (c *Client) ResumeVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.resume", nil, nil)
	return err
}

// DeleteVM is PUT /vm.delete: shut the VM down if booted and forget its configuration.
func (c *Client) DeleteVM(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.delete", nil, nil)
	return err
}

// Info is GET /vm.info. It answers 404 (see IsStatus) when no VM has been created.
func (c *Client) Info(ctx context.Context) (VMInfo, error) {
	var r VMInfo
	_, err := c.do(ctx, http.MethodGet, "/vm.info", nil, &r)
	return r, err
}

// Counters is GET /vm.counters: per-device counters of a booted VM.
func (c *Client) Counters(ctx context.Context) (VMCounters, error) {
	var r VMCounters
	_, err := c.do(ctx, http.MethodGet, "/vm.counters", nil, &r)
	return r, err
}

// Resize is PUT /vm.resize: vCPUs, memory (hotplug) and the balloon.
func (c *Client) Resize(ctx context.Context, r VMResize) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.resize", r, nil)
	return err
}

// ResizeZone is PUT /vm.resize-zone: the size of one memory zone.
func (c *Client) ResizeZone(ctx context.Context, r VMResizeZone) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.resize-zone", r, nil)
	return err
}

// AddDisk is PUT /vm.add-disk. A booted VM answers 200 with the new PCI device; a created but not booted VM
// answers 204 (cold plug) and the returned info is nil.
func (c *Client) AddDisk(ctx context.Context, d DiskConfig) (*PCIDeviceInfo, error) {
	return c.addDevice(ctx, "/vm.add-disk", d)
}

// AddNet is PUT /vm.add-net, answered like AddDisk.
func (c *Client) AddNet(ctx context.Context, n NetConfig) (*PCIDeviceInfo, error) {
	return c.addDevice(ctx, "/vm.add-net", n)
}

func (c *Client) addDevice(ctx context.Context, path string, body any) (*PCIDeviceInfo, error) {
	var info PCIDeviceInfo
	status, err := c.do(ctx, http.MethodPut, path, body, &info)
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, nil
	}
	return &info, nil
}

// RemoveDevice is PUT /vm.remove-device. For a booted VM the removal completes when the guest acknowledges
// the ACPI eject; until then the device is still in vm.info's device tree.
func (c *Client) RemoveDevice(ctx context.Context, id string) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.remove-device", VMRemoveDevice{ID: id}, nil)
	return err
}

// Snapshot is PUT /vm.snapshot of a paused VM to a destination URL such as "file:///dir".
func (c *Client) Snapshot(ctx context.Context, destinationURL string) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.snapshot", VMSnapshotConfig{DestinationURL: destinationURL}, nil)
	return err
}

// Restore is PUT /vm.restore into a VMM that has no VM yet.
func (c *Client) Restore(ctx context.Context, r RestoreConfig) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.restore", r, nil)
	return err
}

// SendMigration is PUT /vm.send-migration. It returns when the migration has completed or failed; Cloud
// Hypervisor exits after a successful one.
func (c *Client) SendMigration(ctx context.Context, d SendMigrationData) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.send-migration", d, nil)
	return err
}

// ReceiveMigration is PUT /vm.receive-migration. Cloud Hypervisor listens on the receiver URL and answers only
// when the migration has been received (or failed); meanwhile its API answers nothing else.
func (c *Client) ReceiveMigration(ctx context.Context, d ReceiveMigrationData) error {
	_, err := c.do(ctx, http.MethodPut, "/vm.receive-migration", d, nil)
	return err
}
