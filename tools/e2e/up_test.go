package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const ttl = 2 * time.Second

func allUp(want ...string) func(map[string]string) bool {
	return func(s map[string]string) bool {
		if len(s) != len(want) {
			return false
		}
		for _, id := range want {
			if s[id] != "NODE_STATE_UP" {
				return false
			}
		}
		return true
	}
}

var fullCluster = []string{"metad-1", "blockd-1", "blockd-2", "blockd-3", "computed-1", "netd-1"}

// TestUpThenKillAndRestartABlockd is the foundation's acceptance test: `basalt up`, every node healthy, a
// SIGKILLed blockd leaves the list within the lease TTL and is back after its restart, Ctrl-C stops everything,
// and the cluster comes back with its data.
func TestUpThenKillAndRestartABlockd(t *testing.T) {
	e := newEnv(t)
	dataDir := t.TempDir()
	base := freeBase(t, 3)
	c := e.up(dataDir, "--base-port", itoa(base), "--lease-ttl", ttl.String(), "--restart-delay", "6s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))

	// The client config written by `basalt up` is what the commands above used; check it names this cluster.
	cfg, err := os.ReadFile(filepath.Join(e.config, "basalt", "config"))
	if err != nil || !strings.Contains(string(cfg), itoa(base)) {
		t.Fatalf("client config = %q, %v; want it to name port %d", cfg, err, base)
	}

	var status struct {
		Info struct {
			ClusterID string `json:"cluster_id"`
		} `json:"info"`
		Etcd struct {
			Embedded bool `json:"embedded"`
			Members  int  `json:"members"`
		} `json:"etcd"`
		Nodes []struct {
			Kind string `json:"kind"`
			Up   int    `json:"up"`
		} `json:"nodes"`
	}
	out, errOut, code := e.basalt(nil, "cluster", "status", "-o", "json")
	if code != 0 {
		t.Fatalf("cluster status: %s", errOut)
	}
	if err := json.Unmarshal([]byte(out), &status); err != nil {
		t.Fatal(err)
	}
	if status.Info.ClusterID == "" || !status.Etcd.Embedded || status.Etcd.Members != 1 {
		t.Fatalf("cluster status = %s", out)
	}
	for _, n := range status.Nodes {
		if n.Kind == "NODE_KIND_BLOCKD" && n.Up != 3 {
			t.Fatalf("cluster status counts %d blockd up, want 3", n.Up)
		}
	}
	if out, _, _ := e.basalt(nil, "cluster", "status"); !strings.Contains(out, "blockd    3 up, 0 down") {
		t.Errorf("cluster status table:\n%s", out)
	}

	// A thin 1 PiB volume, placed on all three blockd.
	if _, errOut, code := e.basalt(nil, "volume", "create", "big", "--size", "1P"); code != 0 {
		t.Fatalf("volume create: %s", errOut)
	}
	if out, _, _ := e.basalt(nil, "volume", "inspect", "big"); !strings.Contains(out, "healthy: 64 placement groups, 64 healthy") {
		t.Fatalf("volume inspect of a healthy cluster:\n%s", out)
	}

	// SIGKILL one blockd: it must leave the list within the lease TTL (plus polling slack).
	killed := c.pid(t, "blockd-2")
	if err := syscall.Kill(killed, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	took := e.waitNodes("blockd-2 leaves the list", ttl+3*time.Second, func(s map[string]string) bool {
		_, listed := s["blockd-2"]
		return !listed && len(s) == len(fullCluster)-1
	})
	t.Logf("blockd-2 left the node list %s after SIGKILL (lease TTL %s)", took.Round(time.Millisecond), ttl)
	if s := e.nodes("--all"); s["blockd-2"] != "NODE_STATE_DOWN" {
		t.Fatalf("node list --all: blockd-2 is %q, want down", s["blockd-2"])
	}
	// The cluster map controller marks it down in a new epoch: the volume's placement groups are degraded.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _, _ := e.basalt(nil, "volume", "inspect", "big", "-o", "json")
		if strings.Contains(out, `"pgs_degraded": 64`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume not reported degraded after a blockd died:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// basalt up restarts it after --restart-delay; it comes back as the same node with a new process.
	e.waitNodes("blockd-2 back after its restart", 20*time.Second, allUp(fullCluster...))
	if pid := c.pid(t, "blockd-2"); pid == killed {
		t.Fatalf("blockd-2 still has the killed pid %d", pid)
	}
	if !strings.Contains(c.out.String(), "blockd-2 exited (signal: killed); restarting in 6s") {
		t.Errorf("basalt up did not report the crash:\n%s", c.out)
	}

	// Endpoint precedence: BASALT_ENDPOINT beats the config file, --endpoint beats both.
	_, errOut, code = e.basalt([]string{"BASALT_ENDPOINT=127.0.0.1:1"}, "node", "list")
	oneLine(t, "node list with a wrong BASALT_ENDPOINT", errOut, code, 1, "cannot reach metad at 127.0.0.1:1 (from BASALT_ENDPOINT)")
	if _, errOut, code := e.basalt([]string{"BASALT_ENDPOINT=127.0.0.1:1"}, "node", "list", "--endpoint", "127.0.0.1:"+itoa(base)); code != 0 {
		t.Errorf("--endpoint did not override BASALT_ENDPOINT: %s", errOut)
	}

	// A second `basalt up` on the same data directory, or on the same ports, fails at once and starts nothing.
	_, errOut, code = e.basalt(nil, "up", "--data-dir", dataDir, "--bin-dir", binDir, "--base-port", itoa(base))
	oneLine(t, "second basalt up on the same data directory", errOut, code, 1, "is locked by another process")
	other := t.TempDir()
	_, errOut, code = e.basalt(nil, "up", "--data-dir", other, "--bin-dir", binDir, "--base-port", itoa(base), "--no-client-config")
	oneLine(t, "basalt up on taken ports", errOut, code, 1, "is not free")
	if ps := processesUsing(other); len(ps) > 0 {
		t.Errorf("a failed basalt up left processes running: %v", ps)
	}

	// Ctrl-C stops every process and removes the state file.
	pids := c.state(t).Processes
	c.stop(t)
	for _, p := range pids {
		if syscall.Kill(p.PID, 0) == nil {
			t.Errorf("%s (pid %d) still runs after basalt up stopped", p.ID, p.PID)
		}
	}
	if _, err := os.Stat(filepath.Join(dataDir, "up.json")); !os.IsNotExist(err) {
		t.Errorf("state file left behind: %v", err)
	}
	_, errOut, code = e.basalt(nil, "node", "list")
	oneLine(t, "node list with the cluster stopped", errOut, code, 1, "cannot reach metad")

	// The same data directory brings the same cluster back.
	e.up(dataDir, "--base-port", itoa(base), "--lease-ttl", ttl.String())
	e.waitNodes("every node up after the restart", 10*time.Second, allUp(fullCluster...))
	out, _, _ = e.basalt(nil, "cluster", "status", "-o", "json")
	if !strings.Contains(out, status.Info.ClusterID) {
		t.Fatalf("after restarting on the same data the cluster ID changed: %s, was %s", out, status.Info.ClusterID)
	}
}

// TestBadInputFailsCleanly checks that operator mistakes give one clear line, a non-zero exit, and leave
// nothing half-started.
func TestBadInputFailsCleanly(t *testing.T) {
	e := newEnv(t)

	_, errOut, code := e.basalt(nil, "up", "--no-such-flag")
	oneLine(t, "unknown flag", errOut, code, 2, "unknown flag: --no-such-flag")
	_, errOut, code = e.basalt(nil, "up", "--blockd", "0")
	oneLine(t, "--blockd 0", errOut, code, 1, "--blockd 0 is out of range")
	_, errOut, code = e.basalt(nil, "node", "list", "-o", "yaml")
	oneLine(t, "-o yaml", errOut, code, 2, `--output "yaml"`)
	_, errOut, code = e.basalt(nil, "node", "get")
	oneLine(t, "node get without an ID", errOut, code, 2, "takes one node ID")

	// A data directory written by an incompatible version.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "BASALT_FORMAT"), []byte(`{"format":99,"component":"basalt-up"}`), 0o640); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = e.basalt(nil, "up", "--data-dir", dir, "--bin-dir", binDir, "--base-port", itoa(freeBase(t, 3)), "--no-client-config")
	oneLine(t, "incompatible data directory", errOut, code, 1, "was written by data format 99")

	// A node that cannot start (its own data directory is incompatible) makes `basalt up` fail and stop what
	// it had started: nothing half-started is left running.
	dir = t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "blockd-2"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "blockd-2", "BASALT_FORMAT"), []byte(`{"format":99,"component":"blockd"}`), 0o640); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = e.basalt(nil, "up", "--data-dir", dir, "--bin-dir", binDir, "--base-port", itoa(freeBase(t, 3)), "--no-client-config")
	oneLine(t, "a node that cannot start", errOut, code, 1, "blockd-2 exited while starting")
	if !strings.Contains(errOut, "format 99") {
		t.Errorf("the error does not carry the node's own reason: %s", errOut)
	}
	if ps := processesUsing(dir); len(ps) > 0 {
		t.Errorf("a failed basalt up left processes running: %v", ps)
	}

	// A daemon pointed at an etcd that does not answer.
	cmd := execDaemon("netd", "--data-dir", t.TempDir(), "--node-id", "netd-x", "--listen", "127.0.0.1:0",
		"--etcd-endpoints", "http://127.0.0.1:1", "--etcd-timeout", "2s")
	out, _ := cmd.CombinedOutput()
	oneLine(t, "netd with unreachable etcd", string(out), cmd.ProcessState.ExitCode(), 1, "cannot reach etcd at http://127.0.0.1:1")
	cmd = execDaemon("blockd", "--lease-ttl", "1s", "--data-dir", t.TempDir())
	out, _ = cmd.CombinedOutput()
	oneLine(t, "blockd with a too-short lease", string(out), cmd.ProcessState.ExitCode(), 1, "shorter than the minimum")
	cmd = execDaemon("metad", "--bogus")
	out, _ = cmd.CombinedOutput()
	oneLine(t, "metad with an unknown flag", string(out), cmd.ProcessState.ExitCode(), 2, "flag provided but not defined: -bogus")
}

func TestHelpAndCompletion(t *testing.T) {
	e := newEnv(t)
	out, _, code := e.basalt(nil, "up", "--help")
	if code != 0 || !strings.Contains(out, "--base-port") || !strings.Contains(out, "Ctrl-C") {
		t.Errorf("basalt up --help:\n%s", out)
	}
	out, _, code = e.basalt(nil, "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_basalt") {
		t.Errorf("basalt completion bash: exit %d", code)
	}
	out, _, code = e.basalt(nil, "__complete", "node", "list", "--kind", "")
	if code != 0 || !strings.Contains(out, "blockd") {
		t.Errorf("completion of --kind:\n%s", out)
	}
}

// execDaemon prepares a daemon binary run.
func execDaemon(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = filteredEnviron()
	return cmd
}

func itoa(i int) string { return strconv.Itoa(i) }
