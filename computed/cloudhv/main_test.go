package cloudhv

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The test binary doubles as a stand-in cloud-hypervisor (see fakeVMM) and as the KVM probe, selected by
// environment variables, so that the driver's real process handling (own session, pid file, pidfd, exit
// watching) is exercised on a real child process.
const (
	envFakeVMM  = "BASALT_CLOUDHV_TEST_FAKE_VMM"
	envKVMProbe = "BASALT_CLOUDHV_TEST_KVM_PROBE"
)

// violationsFileName is where a fake VMM process writes contract violations, next to its API socket.
const violationsFileName = "contract-violations.log"

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(envFakeVMM) != "":
		os.Exit(fakeVMMMain(os.Args[1:]))
	case os.Getenv(envKVMProbe) != "":
		if err := probeKVM(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fakeVMMMain serves a validating fakeVMM on the socket given by --api-socket, as cloud-hypervisor would.
func fakeVMMMain(args []string) int {
	var apiSocket string
	for i, a := range args {
		if a == "--api-socket" && i+1 < len(args) {
			apiSocket = args[i+1]
		}
	}
	if apiSocket == "" {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor: no --api-socket")
		return 2
	}
	c, err := loadContract(specPath())
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
		return 1
	}
	dir := filepath.Dir(apiSocket)
	var fileMu sync.Mutex
	report := func(v string) {
		fileMu.Lock()
		defer fileMu.Unlock()
		fmt.Fprintln(os.Stderr, "CONTRACT VIOLATION:", v)
		f, err := os.OpenFile(filepath.Join(dir, violationsFileName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err == nil {
			fmt.Fprintln(f, v)
			f.Close()
		}
	}
	exit := func() {
		// After the answer has gone out, as Cloud Hypervisor exits after answering.
		go func() {
			time.Sleep(50 * time.Millisecond)
			fmt.Fprintln(os.Stderr, "fake cloud-hypervisor: exiting")
			os.Exit(0)
		}()
	}
	vmm := newFakeVMM(exit)
	vmm.record = func(name string, body []byte) {
		os.WriteFile(filepath.Join(dir, "fake-"+name+".json"), body, 0o600)
	}
	ln, err := net.Listen("unix", apiSocket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
		return 1
	}
	// The driver starts cloud-hypervisor in its own session so that it outlives computed. A fake must not
	// outlive a test binary that crashed or timed out before its clean-up ran: exit when orphaned.
	parent := os.Getppid()
	go func() {
		for range time.Tick(200 * time.Millisecond) {
			if os.Getppid() != parent {
				fmt.Fprintln(os.Stderr, "fake cloud-hypervisor: test process gone, exiting")
				os.Exit(1)
			}
		}
	}()
	fmt.Fprintln(os.Stderr, "fake cloud-hypervisor: serving", apiSocket)
	err = http.Serve(ln, &validating{contract: c, next: vmm, report: report})
	fmt.Fprintln(os.Stderr, "fake cloud-hypervisor:", err)
	return 1
}

// inProcessVMM is a validating fakeVMM served from the test process on a Unix socket, for client tests.
type inProcessVMM struct {
	t      *testing.T
	socket string
	vmm    *fakeVMM
	exited chan struct{}

	mu         sync.Mutex
	violations []string
}

// startInProcessVMM serves a fake VMM. Violations fail the test at cleanup unless taken with takeViolations.
func startInProcessVMM(t *testing.T) *inProcessVMM {
	t.Helper()
	c, err := loadContract(specPath())
	if err != nil {
		t.Fatal(err)
	}
	return startInProcessVMMWith(t, c, nil)
}

// startInProcessVMMWith serves next (or a fake VMM if nil) behind the contract.
func startInProcessVMMWith(t *testing.T, c *contract, next http.Handler) *inProcessVMM {
	t.Helper()
	p := &inProcessVMM{t: t, socket: filepath.Join(shortTempDir(t), "api.sock"), exited: make(chan struct{})}
	var once sync.Once
	p.vmm = newFakeVMM(func() { once.Do(func() { close(p.exited) }) })
	if next == nil {
		next = p.vmm
	}
	ln, err := net.Listen("unix", p.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: &validating{contract: c, next: next, report: func(v string) {
		p.mu.Lock()
		p.violations = append(p.violations, v)
		p.mu.Unlock()
	}}}
	go srv.Serve(ln)
	t.Cleanup(func() {
		// Close, not Shutdown: it cancels requests in flight, such as a receive-migration still waiting.
		srv.Close()
		p.vmm.mu.Lock()
		p.vmm.closeSerial()
		p.vmm.mu.Unlock()
		for _, v := range p.takeViolations() {
			t.Errorf("contract violation: %s", v)
		}
	})
	return p
}

func (p *inProcessVMM) takeViolations() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.violations
	p.violations = nil
	return v
}

// shortTempDir is a temporary directory with a short path: Unix socket paths must fit in 107 bytes, and
// t.TempDir() paths grow with the test's name.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "chv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing %s: %v", dir, err)
		}
	})
	return dir
}

// checkNoViolations fails the test if a fake VMM process wrote contract violations into dir.
func checkNoViolations(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, violationsFileName))
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		t.Errorf("contract violation: %s", v)
	}
}
