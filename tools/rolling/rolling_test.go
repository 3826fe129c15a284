package rolling

// These tests cover the pure parts (host selection, the plan, the summary, what a failure left) and the
// command runner with a real /bin/sh. The steps against a cluster — drain, wait, update, wait-up, undrain,
// return, and stopping at the first failure — are checked against the real thing by
// tools/e2e/rolling_test.go (TestRollingUpdate).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func hostStatus(node string, up bool, draining bool, vms ...string) *basaltv1.ComputeHostStatus {
	h := &basaltv1.ComputeHostStatus{Host: &basaltv1.ComputeHost{Node: node, Hostname: "m-" + node}, Up: up, Vms: vms}
	if draining {
		h.Maintenance = &basaltv1.HostMaintenance{Node: node, Draining: true}
	}
	return h
}

func nodes(hs []Host) string {
	var out []string
	for _, h := range hs {
		out = append(out, h.Node)
	}
	return strings.Join(out, ",")
}

func TestSelect(t *testing.T) {
	hosts := []*basaltv1.ComputeHostStatus{
		hostStatus("c3", true, false), hostStatus("c1", true, false, "a", "b"), hostStatus("c2", true, true),
	}
	down := append(hosts[:3:3], hostStatus("c4", false, false))
	for _, tc := range []struct {
		name          string
		hosts         []*basaltv1.ComputeHostStatus
		only, exclude []string
		want, err     string
	}{
		{name: "all, by node ID", hosts: hosts, want: "c1,c2,c3"},
		{name: "chosen and ordered", hosts: hosts, only: []string{"c3", "c1"}, want: "c3,c1"},
		{name: "excluded", hosts: hosts, exclude: []string{"c2"}, want: "c1,c3"},
		{name: "chosen less excluded", hosts: hosts, only: []string{"c3", "c2", "c1"}, exclude: []string{"c2"}, want: "c3,c1"},
		{name: "unknown host", hosts: hosts, only: []string{"c1", "cx"}, err: `--hosts: "cx" is not a computed host (hosts: c1, c2, c3)`},
		{name: "unknown exclusion", hosts: hosts, exclude: []string{"c9"}, err: `--exclude: "c9" is not a computed host`},
		{name: "twice", hosts: hosts, only: []string{"c1", "c1"}, err: `"c1" is named twice`},
		{name: "down host", hosts: down, err: "host c4 is down: it cannot be drained (bring it up, or leave it out with --exclude c4)"},
		{name: "down host left out", hosts: down, exclude: []string{"c4"}, want: "c1,c2,c3"},
		{name: "nothing left", hosts: hosts, only: []string{"c2"}, exclude: []string{"c2"}, err: "no host to update"},
		{name: "no hosts", err: "no host to update (hosts: none)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Select(tc.hosts, tc.only, tc.exclude)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, %v; want error %q", nodes(got), err, tc.err)
				}
				return
			}
			if err != nil || nodes(got) != tc.want {
				t.Fatalf("got %q, %v; want %q", nodes(got), err, tc.want)
			}
		})
	}
	got, _ := Select(hosts, nil, nil)
	if h := got[0]; h.Hostname != "m-c1" || strings.Join(h.VMs, ",") != "a,b" || h.Maintenance {
		t.Errorf("c1: %+v", h)
	}
	if !got[1].Maintenance {
		t.Errorf("c2 is draining: %+v", got[1])
	}
}

func TestFormatPlan(t *testing.T) {
	var b bytes.Buffer
	FormatPlan(&b, []Host{{Node: "c1", Hostname: "m1", VMs: []string{"a", "b"}}, {Node: "c2", Maintenance: true}},
		Options{Command: `echo "$BASALT_HOST" it's`, Compress: true, UpTimeout: time.Minute})
	for _, want := range []string{
		"Rolling update of 2 compute host(s)",
		"1. c1 (machine m1): VMs to move away and back: a, b\n",
		"2. c2 (machine -): VMs to move away and back: none; already in maintenance\n",
		"(2 at a time, compressed); at most 10m0s",
		`/bin/sh -c 'echo "$BASALT_HOST" it'\''s'`,
		"at most 30m0s; a non-zero exit fails",
		"wait-up  wait until its computed is up (and stays up for a lease period); at most 1m0s",
		"first failure stops the update and leaves that host drained",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("plan lacks %q:\n%s", want, b.String())
		}
	}
	// The steps are listed in the order they run.
	last := -1
	for _, s := range Steps[1:] {
		i := strings.Index(b.String(), "  "+string(s)+" ")
		if i < last {
			t.Errorf("step %s out of order:\n%s", s, b.String())
		}
		last = i
	}
}

func TestFormatSummary(t *testing.T) {
	var b bytes.Buffer
	FormatSummary(&b, Report{Done: []HostResult{
		{Host: Host{Node: "computed-1"}, Moved: []string{"a", "b"}, Restarted: true, Drain: 3200 * time.Millisecond, Update: 61 * time.Second, Return: 450 * time.Millisecond},
		{Host: Host{Node: "computed-2"}, NotReturned: []string{"c: stopped"}, Drain: time.Second},
	}})
	want := `HOST        VMS MOVED  DRAIN  UPDATE  RETURN  NOTES
computed-1  a, b       3.2s   1m1s    450ms   computed restarted
computed-2  -          1s     0s      0s      not moved back: c: stopped
`
	if b.String() != want {
		t.Errorf("summary:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestLeftState(t *testing.T) {
	hosts := []*basaltv1.ComputeHostStatus{hostStatus("c1", true, true, "stuck"), hostStatus("c2", true, false, "a", "b")}
	hosts[0].Migrating = []string{"stuck"}
	vm := func(name, host string, st basaltv1.VMState) *basaltv1.VM {
		return &basaltv1.VM{Name: name, Host: host, State: st, DesiredState: basaltv1.VMState_VM_STATE_RUNNING}
	}
	vms := []*basaltv1.VM{
		vm("a", "c2", basaltv1.VMState_VM_STATE_RUNNING),
		vm("b", "c2", basaltv1.VMState_VM_STATE_PAUSED),
		vm("stuck", "c1", basaltv1.VMState_VM_STATE_MIGRATING),
		vm("off", "c2", basaltv1.VMState_VM_STATE_STOPPED),
	}
	vms[2].Migration = &basaltv1.VMMigration{Source: "c1", Target: "c2"}
	vms[3].DesiredState = basaltv1.VMState_VM_STATE_STOPPED
	state, undo := leftState("c1", []string{"a", "b", "stuck", "off", "gone"}, hosts, vms)
	wantState := []string{
		"c1: up, in maintenance (drained: no VM is placed there), holds stuck",
		"c1: still migrating away: stuck",
		"VM a (was on c1): running on c2",
		"VM b (was on c1): paused on c2",
		"VM stuck (was on c1): migrating c1 -> c2",
		"VM off (was on c1): stopped on c2",
		"VM gone (was on c1): deleted",
	}
	wantUndo := []string{"basalt host undrain c1", "basalt vm migrate a --to c1", "basalt vm migrate b --to c1"}
	if strings.Join(state, "\n") != strings.Join(wantState, "\n") {
		t.Errorf("state:\n%s\nwant:\n%s", strings.Join(state, "\n"), strings.Join(wantState, "\n"))
	}
	if strings.Join(undo, "\n") != strings.Join(wantUndo, "\n") {
		t.Errorf("undo: %q, want %q", undo, wantUndo)
	}

	// A host that failed before its drain: nothing to undo.
	state, undo = leftState("c2", []string{"a"}, hosts, vms)
	if len(undo) != 0 || state[0] != "c2: up, not in maintenance, holds a, b" || state[1] != "VM a: running on c2" {
		t.Errorf("undrained host: %q, %q", state, undo)
	}

	var b bytes.Buffer
	FormatFailure(&b, &StepError{Host: "c1", Step: StepUpdate, Err: errors.New("boom"), Done: []string{"c0"},
		NotStarted: []string{"c2", "c3"}, State: []string{"s1"}, Undo: []string{"u1"}})
	want := "The rolling update failed at host c1, step update. Hosts updated: c0; not started (untouched): c2, c3.\nLeft as it is:\n  s1\nTo undo:\n  u1\n"
	if b.String() != want {
		t.Errorf("failure report:\n%s\nwant:\n%s", b.String(), want)
	}
	se := &StepError{Host: "c1", Step: StepDrain, Err: context.Canceled, Interrupted: true}
	if se.Error() != "rolling update interrupted at host c1, step drain: context canceled" || !errors.Is(se, context.Canceled) {
		t.Errorf("interrupted: %v", se)
	}
}

func TestProgressLine(t *testing.T) {
	vm := &basaltv1.VM{Name: "a", Migration: &basaltv1.VMMigration{Id: "m2", Source: "c1", Target: "c2"},
		Status: &basaltv1.VMStatus{Migration: &basaltv1.MigrationProgress{Id: "m1", Source: "c1", Target: "c3", Status: "failed"}}}
	// The status still shows the last migration: the new one is only requested.
	if got := progressLine(vm, "m2"); got != "a c1 -> c2: requested" {
		t.Errorf("requested: %q", got)
	}
	vm.Status.Migration = &basaltv1.MigrationProgress{Id: "m2", Source: "c1", Target: "c2", Status: "active", TransferredBytes: 5}
	if got := progressLine(vm, "m2"); got != "a c1 -> c2: active" {
		t.Errorf("active: %q", got)
	}
	vm.Status.Migration.Status, vm.Status.Migration.DowntimeMs = "completed", 80
	vm.Status.Migration.FinishedAt = timestamppb.Now()
	if got := progressLine(vm, "m2"); got != "a c1 -> c2: completed (downtime 80 ms)" {
		t.Errorf("completed: %q", got)
	}
	vm.Status.Migration.Status, vm.Status.Migration.Error = "failed", "target gone"
	if got := progressLine(vm, "m2"); got != "a c1 -> c2: failed: target gone" {
		t.Errorf("failed: %q", got)
	}
}

func TestWait(t *testing.T) {
	r := &run{opts: Options{Poll: time.Millisecond}.withDefaults()}
	ctx := context.Background()

	// Transient API errors are retried; done ends the wait.
	n := 0
	err := r.wait(ctx, time.Minute, func(context.Context) (bool, string, error) {
		n++
		if n < 3 {
			return false, "", apiError(status.Error(codes.Unavailable, "connection refused"))
		}
		return true, "", nil
	})
	if err != nil || n != 3 {
		t.Fatalf("after transient errors: %v after %d checks", err, n)
	}
	// Other errors end it at once.
	err = r.wait(ctx, time.Minute, func(context.Context) (bool, string, error) {
		return false, "", apiError(status.Error(codes.FailedPrecondition, "VM a is stopped"))
	})
	if err == nil || err.Error() != "VM a is stopped" {
		t.Fatalf("failed precondition: %v", err)
	}
	// A timeout says what was still pending, and the last error.
	n = 0
	err = r.wait(ctx, 20*time.Millisecond, func(context.Context) (bool, string, error) {
		n++
		if n%2 == 0 {
			return false, "", apiError(status.Error(codes.DeadlineExceeded, ""))
		}
		return false, "c1 still holds a", nil
	})
	if err == nil || !strings.HasPrefix(err.Error(), "not done within 20ms: c1 still holds a") {
		t.Fatalf("timeout: %v", err)
	}
	// Cancellation stops the wait and says so.
	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(20*time.Millisecond, cancel)
	err = r.wait(cctx, time.Minute, func(context.Context) (bool, string, error) { return false, "c1 still holds a", nil })
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "c1 still holds a") {
		t.Fatalf("cancelled: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a command's two streams.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestPrefixWriter(t *testing.T) {
	var b bytes.Buffer
	p := newPrefixWriter(&b, "[c1] ")
	for _, s := range []string{"one\ntw", "o\n", "", "\nthree"} {
		p.Write([]byte(s))
	}
	p.Flush()
	if want := "[c1] one\n[c1] two\n[c1] \n[c1] three\n"; b.String() != want {
		t.Errorf("got %q, want %q", b.String(), want)
	}
	b.Reset()
	p.Write(bytes.Repeat([]byte("x"), maxLine+10))
	p.Flush()
	if lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n"); len(lines) != 2 || len(lines[0]) != len("[c1] ")+maxLine {
		t.Errorf("a line longer than maxLine: %d lines", len(lines))
	}
}

func TestExec(t *testing.T) {
	h := Host{Node: "computed-7", Hostname: "machine-7"}
	ctx := context.Background()

	var out syncBuffer
	err := Exec(ctx, h, `echo "host $BASALT_HOST on $BASALT_HOSTNAME"; echo oops >&2; printf partial`, &out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"[computed-7] host computed-7 on machine-7\n", "[computed-7] oops\n", "[computed-7] partial\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q: %q", want, out.String())
		}
	}

	if err := Exec(ctx, h, "exit 3", &out); err == nil || err.Error() != "command exited with status 3" {
		t.Errorf("exit 3: %v", err)
	}
	if err := Exec(ctx, h, "kill -KILL $$", &out); err == nil || err.Error() != "command killed by signal killed" {
		t.Errorf("killed: %v", err)
	}

	// Cancelling stops the whole process group: the shell and what it started.
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- Exec(cctx, h, fmt.Sprintf("sleep 300 & echo $! > %s; wait", pidFile), &out) }()
	var pid int
	for deadline := time.Now().Add(10 * time.Second); pid == 0; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(pidFile)
		if strings.HasSuffix(string(b), "\n") {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		if time.Now().After(deadline) {
			t.Fatal("the command did not start its sleep")
		}
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "command stopped (context canceled)") {
			t.Errorf("cancelled: %v", err)
		}
	case <-time.After(StopGrace + 5*time.Second):
		t.Fatal("Exec did not return after its context ended")
	}
	if time.Since(start) > StopGrace/2 {
		t.Errorf("SIGTERM took %s to stop the command", time.Since(start))
	}
	// The sleep got SIGTERM with its group; it may take a moment to be reaped by init.
	for deadline := time.Now().Add(5 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(10 * time.Millisecond) {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); strings.Contains(string(b), ") Z ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command's child %d outlived the cancellation", pid)
		}
	}
}
