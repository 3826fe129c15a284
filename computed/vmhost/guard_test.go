package vmhost

import (
	"context"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// TestCutOffHostPausesItsGuests: a host that cannot reach etcd for most of its lease TTL pauses its guest
// (before the HA controller could restart it elsewhere), keeps it paused while cut off, and resumes it once etcd
// answers again and the VM is still declared on it.
func TestCutOffHostPausesItsGuests(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	e.leaseTTL = 2 * time.Second
	e.volume("disk0", 64*mib)
	a := e.addHost("computed-a", 1024*mib)
	if _, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "agent", Spec: e.agentSpec("disk0", a.id), Start: true}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("agent", "running", time.Minute, running)
	w := a.h.worker("agent")
	if w == nil {
		t.Fatal("no worker for the VM")
	}
	m, _ := w.machine()
	state := func() hypervisor.State {
		info, err := m.Info(ctx)
		if err != nil {
			t.Fatalf("machine info: %v", err)
		}
		return info.State
	}
	waitState := func(want hypervisor.State, within time.Duration) time.Duration {
		start := time.Now()
		for state() != want {
			if time.Since(start) > within {
				t.Fatalf("machine is %s after %s, want %s", state(), within, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
		return time.Since(start)
	}

	e.etcd.Stop() // returns once etcd has shut down, which takes a few seconds
	took := waitState(hypervisor.StatePaused, 5*time.Second)
	if took > e.leaseTTL {
		t.Fatalf("guest paused %s after etcd went away: later than the lease TTL %s", took, e.leaseTTL)
	}
	t.Logf("guest paused %s after etcd had stopped (lease TTL %s)", took.Round(time.Millisecond), e.leaseTTL)
	time.Sleep(3 * time.Second) // several reconcile ticks: nothing may resume it meanwhile
	if s := state(); s != hypervisor.StatePaused {
		t.Fatalf("guest %s while the host is cut off", s)
	}

	e.etcd.Restart(t)
	took = waitState(hypervisor.StateRunning, 30*time.Second)
	t.Logf("guest running again %s after etcd came back", took.Round(time.Millisecond))
	if a.h.selfFenced.Load() {
		t.Fatal("host still self-fenced after etcd came back")
	}
	// Now, while etcd runs: the restarted etcd's clean-up was registered last, so it would run first.
	e.stopHost(a)
}
