package vmhost

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/computed/testguest/record"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

// sendAgent writes a command line to the guest agent through the host's own agent stream (the channel takes one
// client, and computed is it).
func sendAgent(t *testing.T, ctx context.Context, h *Host, vm, cmd string) {
	t.Helper()
	for {
		var conn io.Writer
		if w := h.worker(vm); w != nil {
			w.mu.Lock()
			mon := w.mon
			w.mu.Unlock()
			if mon != nil {
				mon.mu.Lock()
				if mon.conn != nil {
					conn = mon.conn
				}
				mon.mu.Unlock()
			}
		}
		if conn != nil {
			if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
				t.Fatalf("send %q to the agent: %v", cmd, err)
			}
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no agent channel to send %q on: %v", cmd, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestParseBeat: the host reads what the test guest's agent writes, and nothing else.
func TestParseBeat(t *testing.T) {
	seq, boot, ok := parseBeat(strings.TrimSpace(record.BeatLine(42, 0xdeadbeef)))
	if !ok || seq != 42 || boot != "00000000deadbeef" {
		t.Fatalf("parseBeat(BeatLine(42, deadbeef)) = %d, %q, %v", seq, boot, ok)
	}
	for _, bad := range []string{"", "BASALT beat", "BASALT beat seq=x boot=1", "BASALT beat seq=1 boot=", "BASALT rec seq=1 boot=1",
		"BASALT beat seq=1 boot=1 extra=1", "beat seq=1 boot=1"} {
		if _, _, ok := parseBeat(bad); ok {
			t.Errorf("parseBeat(%q) accepted", bad)
		}
	}
}

// TestVMMonitoring runs a monitored test guest (heartbeat timeout 5 s, at most one reset an hour) on a host:
// (a) its heartbeats reach the status, which is rewritten for them about every 5 s and not on every beat, and a
// guest that beats is never reset; (b) told to hang, the guest falls silent and the host resets it once the
// timeout has passed, and it boots, beats and counts on with no gap or repeat; (c) hung again, the host gives
// up (monitor_gave_up) instead of resetting it a second time, and leaves it alone afterwards.
func TestVMMonitoring(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	img := e.volume("mdisk", 64*mib)
	a := e.addHost("computed-a", 1024*mib)
	const timeout = 5 * time.Second
	spec := e.agentSpec("mdisk", a.id)
	spec.Monitoring = &basaltv1.VMMonitoring{Heartbeat: true, TimeoutSeconds: uint32(timeout / time.Second), MaxResets: 1}
	for {
		// The host publishes itself as it starts.
		if _, err := store.Get[basaltv1.ComputeHost](ctx, e.store, schema.ComputeHostKey(a.id)); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if _, err := e.api.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: "mon", Spec: spec, Start: true}); err != nil {
		t.Fatal(err)
	}
	e.waitVM("mon", "running", time.Minute, running)
	v := e.attach("mon", nil)

	// (a) Heartbeats reach the status.
	hb := func(vm *basaltv1.VM) bool { return vm.GetStatus().GetLastHeartbeat() != nil }
	first := e.waitVM("mon", "a heartbeat in the status", time.Minute, hb).GetStatus()
	revs := map[int64]bool{}
	var next *basaltv1.VMStatus
	for deadline := time.Now().Add(15 * time.Second); next == nil; time.Sleep(100 * time.Millisecond) {
		rec, err := store.Get[basaltv1.VMStatus](ctx, e.store, schema.VMStatusKey("mon"))
		if err != nil {
			t.Fatal(err)
		}
		revs[rec.ModRevision] = true
		if rec.Value.GetLastHeartbeat().AsTime().After(first.GetLastHeartbeat().AsTime()) {
			next = rec.Value
		}
		if time.Now().After(deadline) {
			t.Fatalf("last_heartbeat stayed at %s", first.GetLastHeartbeat().AsTime())
		}
	}
	gap := next.GetLastHeartbeat().AsTime().Sub(first.GetLastHeartbeat().AsTime())
	t.Logf("heartbeat seq %d -> %d, %s apart in the status; %d status revisions meanwhile", first.GetHeartbeatSeq(),
		next.GetHeartbeatSeq(), gap.Round(time.Millisecond), len(revs))
	if next.GetHeartbeatSeq() <= first.GetHeartbeatSeq() || gap < 4*time.Second || len(revs) > 3 {
		t.Fatalf("heartbeat in the status: seq %d -> %d, %s apart, %d writes; want it rewritten about every 5 s",
			first.GetHeartbeatSeq(), next.GetHeartbeatSeq(), gap, len(revs))
	}
	if n := len(next.GetMonitorResets()); n != 0 || next.GetMonitorGaveUp() {
		t.Fatalf("a guest that beats was reset %d times (gave up: %v)", n, next.GetMonitorGaveUp())
	}

	// (b) A hung guest is reset after the timeout, boots again and goes on.
	// hang tells the guest to hang and returns when it was told, and its "hang" line (console from index from).
	hang := func(from int) (time.Time, testguest.Line) {
		sent := time.Now()
		sendAgent(t, ctx, a.h, "mon", record.CmdHang)
		_, l, err := v.con.Wait(ctx, from, func(l testguest.Line) bool { return strings.HasSuffix(l.Text, "BASALT hang") })
		if err != nil {
			t.Fatalf("the guest did not take the hang command: %v\n%s", err, v.con.Tail(10))
		}
		return sent, l
	}
	sent, hung := hang(0)
	reset := e.waitVM("mon", "reset", 30*time.Second, func(vm *basaltv1.VM) bool { return len(vm.GetStatus().GetMonitorResets()) == 1 })
	resetAt := reset.GetStatus().GetMonitorResets()[0].AsTime()
	t.Logf("reset %s after the guest was told to hang", resetAt.Sub(sent).Round(time.Millisecond))
	// The last heartbeat came about a second before the command at the earliest (beats are a second apart); the
	// reset must wait out the timeout after it.
	if d := resetAt.Sub(sent); d < timeout-1500*time.Millisecond {
		t.Fatalf("reset %s after the hang, before the %s timeout", d, timeout)
	}
	lastBefore, _ := v.con.LastRecord()
	i, _, err := v.con.Wait(ctx, 0, func(l testguest.Line) bool { return l.At.After(hung.At) && strings.Contains(l.Text, "BASALT boot id=") })
	if err != nil {
		t.Fatalf("no new boot after the reset: %v\n%s", err, v.con.Tail(10))
	}
	back := e.waitVM("mon", "heartbeat after the reset", time.Minute, func(vm *basaltv1.VM) bool {
		return vm.GetStatus().GetLastHeartbeat().AsTime().After(resetAt)
	})
	t.Logf("heartbeat again %s after the reset", back.GetStatus().GetLastHeartbeat().AsTime().Sub(resetAt).Round(time.Millisecond))
	if r, err := v.con.WaitRecord(ctx, lastBefore.Seq+10); err != nil {
		t.Fatalf("the counter did not go on after the reset: %v\n%s", err, v.con.Tail(10))
	} else if r.Boot == lastBefore.Boot {
		t.Fatalf("record %d after the reset is from the hung boot", r.Seq)
	}
	if st := back.GetStatus(); st.GetMonitorGaveUp() || !running(back) {
		t.Fatalf("after the reset: state %v, gave up %v", back.GetState(), st.GetMonitorGaveUp())
	}

	// (c) Hung again with max_resets reached: the host gives up instead of resetting.
	_, hung = hang(i)
	gave := e.waitVM("mon", "monitoring gave up", 30*time.Second, func(vm *basaltv1.VM) bool { return vm.GetStatus().GetMonitorGaveUp() })
	t.Logf("gave up: %s", gave.GetStatus().GetLastError())
	time.Sleep(timeout + 2*time.Second)
	after, err := e.api.GetVM(ctx, &basaltv1.GetVMRequest{Name: "mon"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(after.GetStatus().GetMonitorResets()); n != 1 || !after.GetStatus().GetMonitorGaveUp() || !running(after) {
		t.Fatalf("after giving up: %d resets, gave up %v, state %v", n, after.GetStatus().GetMonitorGaveUp(), after.GetState())
	}
	for _, l := range v.con.Lines() {
		if l.At.After(hung.At) && strings.Contains(l.Text, "BASALT boot id=") {
			t.Fatalf("the guest was reset after monitoring gave up: %q", l.Text)
		}
	}

	recs, err := testguest.Records(v.con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	cont, err := testguest.CheckContinuity(recs)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("console: records %d..%d across the reset, longest gap %s after record %d", cont.First, cont.Last,
		cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter)
	s := verifyDisk(t, img, recs)
	if len(s.Boots) != 2 {
		t.Fatalf("the disk holds records of %d boots, want 2", len(s.Boots))
	}
}
