package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/tools/up"
)

// binDir holds the binaries under test: $BASALT_BIN_DIR (set by `make test`), else a fresh build.
var binDir string

func TestMain(m *testing.M) {
	binDir = os.Getenv("BASALT_BIN_DIR")
	if binDir == "" {
		dir, err := os.MkdirTemp("", "basalt-e2e-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		build := exec.Command("go", "build", "-o", dir+"/", "../cmd/basalt", "../../metad/cmd/metad",
			"../../blockd/cmd/blockd", "../../computed/cmd/computed", "../../netd/cmd/netd")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build binaries:", err)
			os.Exit(1)
		}
		binDir = dir
		code := m.Run()
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// env is a user's environment: their own config directory, so tests never touch the real one.
type env struct {
	t      *testing.T
	config string
	vars   []string
}

func newEnv(t *testing.T) *env {
	cfg := t.TempDir()
	return &env{t: t, config: cfg, vars: []string{"XDG_CONFIG_HOME=" + cfg}}
}

// basalt runs the CLI to completion.
func (e *env) basalt(extraEnv []string, args ...string) (stdout, stderr string, code int) {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "basalt"), args...)
	cmd.Env = append(append(filteredEnviron(), e.vars...), extraEnv...)
	var o, er bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &er
	err := cmd.Run()
	code = cmd.ProcessState.ExitCode()
	if err != nil && code < 0 {
		e.t.Fatalf("run basalt %v: %v", args, err)
	}
	return o.String(), er.String(), code
}

// filteredEnviron drops the caller's BASALT_ENDPOINT so it cannot steer the CLI under test.
func filteredEnviron() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BASALT_ENDPOINT=") && !strings.HasPrefix(kv, "XDG_CONFIG_HOME=") {
			out = append(out, kv)
		}
	}
	return out
}

// freeBase finds a base port whose whole range for a cluster of nBlockd nodes is free right now. Ranges stay
// below 32768, where Linux's ephemeral ports begin: an outgoing connection could otherwise take a port between
// this check and the daemon's bind.
func freeBase(t *testing.T, nBlockd int) int {
	t.Helper()
	for range 50 {
		base := 12000 + 100*rand.IntN(200)
		plan, err := up.Plan(up.Options{DataDir: "x", Blockd: nBlockd, BasePort: base, LeaseTTL: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		free := true
		for _, p := range plan.Processes {
			for _, port := range p.Ports {
				l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
				if err != nil {
					free = false
					break
				}
				l.Close()
			}
		}
		if free {
			return base
		}
	}
	t.Fatal("no free port range found")
	return 0
}

// cluster is a running `basalt up`.
type cluster struct {
	cmd     *exec.Cmd
	dataDir string
	out     *lockedBuffer
	exited  chan struct{}
}

type lockedBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func (b *lockedBuffer) add(s string) { b.mu <- struct{}{}; b.buf.WriteString(s); <-b.mu }
func (b *lockedBuffer) String() string {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.String()
}

// up starts `basalt up` and waits until it says the cluster is up.
func (e *env) up(dataDir string, args ...string) *cluster {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "basalt"), append([]string{"up", "--data-dir", dataDir, "--bin-dir", binDir}, args...)...)
	cmd.Env = append(filteredEnviron(), e.vars...)
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	c := &cluster{cmd: cmd, dataDir: dataDir, out: &lockedBuffer{mu: make(chan struct{}, 1)}, exited: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			c.out.add(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "Press Ctrl-C") {
				close(ready)
			}
		}
		cmd.Wait()
		close(c.exited)
	}()
	e.t.Cleanup(func() {
		select {
		case <-c.exited:
		default:
			cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-c.exited:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
			}
		}
		c.checkLogs(e.t)
	})
	select {
	case <-ready:
	case <-c.exited:
		e.t.Fatalf("basalt up exited before the cluster was up:\n%s", c.out)
	case <-time.After(2 * time.Minute):
		e.t.Fatalf("basalt up not ready after 2 minutes:\n%s", c.out)
	}
	return c
}

// checkLogs fails the test if a daemon reported a data race (binaries built with -race), and shows the end of
// every daemon's log when the test failed, since the data directory is removed with the test.
func (c *cluster) checkLogs(t *testing.T) {
	logs, _ := filepath.Glob(filepath.Join(c.dataDir, "logs", "*.log"))
	for _, l := range logs {
		b, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		if i := bytes.Index(b, []byte("WARNING: DATA RACE")); i >= 0 {
			t.Errorf("%s reports a data race:\n%s", filepath.Base(l), b[i:min(len(b), i+4000)])
		}
		if t.Failed() {
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Logf("last lines of %s:\n%s", filepath.Base(l), strings.Join(lines[max(0, len(lines)-15):], "\n"))
		}
	}
}

// stop sends Ctrl-C and waits for a clean exit.
func (c *cluster) stop(t *testing.T) {
	t.Helper()
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.exited:
	case <-time.After(45 * time.Second):
		t.Fatalf("basalt up did not stop within 45s after Ctrl-C:\n%s", c.out)
	}
	if code := c.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("basalt up exited %d after Ctrl-C:\n%s", code, c.out)
	}
}

func (c *cluster) state(t *testing.T) *up.State {
	t.Helper()
	s, err := up.ReadState(c.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *cluster) pid(t *testing.T, id string) int {
	t.Helper()
	for _, p := range s.state(t).Processes {
		if p.ID == id {
			return p.PID
		}
	}
	t.Fatalf("no process %s in the state file", id)
	return 0
}

// nodeList is the part of `basalt node list -o json` the tests read.
type nodeList struct {
	Nodes []struct {
		Node struct {
			ID   string `json:"id"`
			Kind string `json:"kind"`
		} `json:"node"`
		State    string `json:"state"`
		Liveness struct {
			PID int `json:"pid"`
		} `json:"liveness"`
	} `json:"nodes"`
}

func (e *env) nodes(args ...string) map[string]string {
	e.t.Helper()
	out, errOut, code := e.basalt(nil, append([]string{"node", "list", "-o", "json"}, args...)...)
	if code != 0 {
		e.t.Fatalf("basalt node list: exit %d: %s", code, errOut)
	}
	var l nodeList
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		e.t.Fatalf("decode node list: %v\n%s", err, out)
	}
	states := map[string]string{}
	for _, n := range l.Nodes {
		states[n.Node.ID] = n.State
	}
	return states
}

// waitNodes polls `basalt node list` until cond holds and returns how long that took.
func (e *env) waitNodes(what string, within time.Duration, cond func(map[string]string) bool, args ...string) time.Duration {
	e.t.Helper()
	start := time.Now()
	for {
		states := e.nodes(args...)
		if cond(states) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			e.t.Fatalf("%s: not within %s; nodes: %v", what, within, states)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// oneLine checks that a failure was reported as exactly one line on stderr, mentioning want.
func oneLine(t *testing.T, what, stderr string, code, wantCode int, want string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
	if code != wantCode || len(lines) != 1 || !strings.Contains(stderr, want) {
		t.Errorf("%s: exit %d, stderr %q; want exit %d and one line mentioning %q", what, code, stderr, wantCode, want)
	}
}

// processesUsing lists running processes whose command line mentions dir.
func processesUsing(dir string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(dir)) {
			out = append(out, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}
