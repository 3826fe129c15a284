package e2e

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/tools/up"
)

// vmCluster is `basalt up` with three blockd and two computed, for the tests that boot test-guest VMs.
type vmCluster struct {
	t       *testing.T
	e       *env
	c       *cluster
	dataDir string
	// base is the cluster's first port (tools/up's Plan lays the others out from it).
	base  int
	guest testguest.Guest
}

// upVMCluster skips the test without QEMU or the test guest (and in -short, saying why), starts the cluster and
// waits until every node is up. No guest outlives the test: a clean-up registered after up's, so it runs first,
// kills the VMs vms names and then any QEMU left under the data directory.
func upVMCluster(t *testing.T, ctx context.Context, why string, vms ...string) *vmCluster {
	t.Helper()
	if testing.Short() {
		t.Skipf("%s; not in -short", why)
	}
	needTool(t, "qemu-system-x86_64", "qemu-system-x86")
	needTool(t, "qemu-img", "qemu-utils")
	g, err := testguest.Build(ctx, testguest.Options{})
	if err != nil {
		t.Skipf("no test guest: %v", err)
	}
	e := newEnv(t)
	base := freeBaseFor(t, up.Options{Blockd: 3, Computed: 2})
	v := &vmCluster{t: t, e: e, dataDir: t.TempDir(), base: base, guest: g}
	v.c = e.up(v.dataDir, "--base-port", itoa(base), "--computed", "2", "--lease-ttl", "2s", "--restart-delay", "2s")
	t.Cleanup(func() {
		for _, vm := range vms {
			e.basalt(nil, "vm", "kill", vm)
		}
		for _, p := range processesUsing(v.dataDir) {
			if strings.Contains(p, "qemu-system") {
				pid, _ := strconv.Atoi(strings.SplitN(p, ":", 2)[0])
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	e.waitNodes("every node up", 30*time.Second, allUp("metad-1", "blockd-1", "blockd-2", "blockd-3", "computed-1", "computed-2", "netd-1"))
	return v
}

// basalt runs the CLI and fails the test unless it succeeds.
func (v *vmCluster) basalt(args ...string) string {
	v.t.Helper()
	out, errOut, code := v.e.basalt(nil, args...)
	if code != 0 {
		v.t.Fatalf("basalt %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// inspect returns `basalt vm inspect NAME -o json`.
func (v *vmCluster) inspect(name string) vmJSON {
	v.t.Helper()
	var vm vmJSON
	if err := json.Unmarshal([]byte(v.basalt("vm", "inspect", name, "-o", "json")), &vm); err != nil {
		v.t.Fatal(err)
	}
	return vm
}
