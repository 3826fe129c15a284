package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/tools/up"
)

// vmJSON is the part of `basalt vm inspect -o json` the tests read.
type vmJSON struct {
	Name       string      `json:"name"`
	State      string      `json:"state"`
	Host       string      `json:"host"`
	Generation json.Number `json:"generation"`
	Migration  *struct {
		ID     string `json:"id"`
		Target string `json:"target"`
	} `json:"migration"`
	Status struct {
		Host              string      `json:"host"`
		State             string      `json:"state"`
		Pid               int         `json:"pid"`
		Accel             string      `json:"accel"`
		ConsoleLog        string      `json:"console_log"`
		LastError         string      `json:"last_error"`
		MemoryActualBytes json.Number `json:"memory_actual_bytes"`
		Migration         struct {
			ID               string      `json:"id"`
			Status           string      `json:"status"`
			Source           string      `json:"source"`
			Target           string      `json:"target"`
			Error            string      `json:"error"`
			TransferredBytes json.Number `json:"transferred_bytes"`
			DowntimeMs       int         `json:"downtime_ms"`
		} `json:"migration"`
	} `json:"status"`
}

// freeBaseFor is freeBase for a cluster with o's node counts.
func freeBaseFor(t *testing.T, o up.Options) int {
	t.Helper()
	for range 50 {
		o.BasePort = 12000 + 100*rand.IntN(200)
		o.DataDir = "x"
		o.LeaseTTL = time.Second
		plan, err := up.Plan(o)
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
			return o.BasePort
		}
	}
	t.Fatal("no free port range found")
	return 0
}

// consoleViewer is `basalt vm console NAME` running, its output collected.
type consoleViewer struct {
	con    *testguest.Console
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	mu     sync.Mutex
	stderr bytes.Buffer
	exited chan struct{}
}

func (v *consoleViewer) Write(b []byte) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stderr.Write(b)
}

func (v *consoleViewer) notices() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stderr.String()
}

func (e *env) console(name string) *consoleViewer {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "basalt"), "vm", "console", name)
	cmd.Env = append(filteredEnviron(), e.vars...)
	v := &consoleViewer{cmd: cmd, exited: make(chan struct{})}
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if v.stdin, err = cmd.StdinPipe(); err != nil {
		e.t.Fatal(err)
	}
	cmd.Stderr = v
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	v.con = testguest.WatchConsole(out)
	go func() { <-v.con.Done(); cmd.Wait(); close(v.exited) }()
	e.t.Cleanup(func() {
		cmd.Process.Kill()
		<-v.exited
	})
	return v
}

// TestVMThroughBasaltUp runs the agent test guest through the real binaries: `basalt up` with three blockd
// and two computed, the guest's disk a 3-replica Basalt volume attached through each host's own blockd. It
// checks the serial console through the API, the balloon, metering (API and Prometheus), live migration while
// the counter runs, a refused second migration, a cancelled migration, a SIGKILLed computed that leaves the
// guest running, a drain, a live clone, a fenced run replaced by a new one, an ACPI stop, bad input, and finally
// that the volume holds every record the console announced with no gap.
func TestVMThroughBasaltUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vc := upVMCluster(t, ctx, "boots QEMU guests under TCG for about two minutes", "agent", "agent2")
	e, c, dataDir, g, base := vc.e, vc.c, vc.dataDir, vc.guest, vc.base
	basalt, inspect := vc.basalt, vc.inspect
	waitVM := func(name, what string, within time.Duration, cond func(vmJSON) bool) vmJSON {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			vm := inspect(name)
			if cond(vm) {
				return vm
			}
			if time.Now().After(deadline) {
				t.Fatalf("VM %s: %s: not within %s; last: %+v", name, what, within, vm)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	runningOn := func(host string) func(vmJSON) bool {
		return func(vm vmJSON) bool {
			return vm.State == "VM_STATE_RUNNING" && vm.Host == host && vm.Status.Host == host && vm.Migration == nil
		}
	}
	qemuOf := func(host string) []string {
		var out []string
		for _, p := range processesUsing(filepath.Join(dataDir, host, "vms")) {
			if strings.Contains(p, "qemu-system") {
				out = append(out, strings.SplitN(p, ":", 2)[0])
			}
		}
		return out
	}

	// 32 MiB: the agent scans its whole ring at boot, through three replicas.
	out := basalt("volume", "create", "boot0", "--size", "32M")
	if !strings.Contains(out, "3 replicas") {
		t.Fatalf("volume create: %s", out)
	}
	basalt("vm", "create", "agent", "--memory", "160M", "--memory-min", "64M", "--memory-max", "192M", "--disk", "boot0:1",
		"--kernel", g.Kernel, "--initrd", g.Initrd, "--cmdline", g.Cmdline("basalt.interval=50ms"))
	start := time.Now()
	out = basalt("vm", "start", "agent", "--host", "computed-1")
	t.Logf("%s", strings.TrimSpace(out))
	vm := inspect("agent")
	if vm.Status.Accel == "" || vm.Status.Pid == 0 || !strings.HasPrefix(vm.Status.ConsoleLog, filepath.Join(dataDir, "computed-1")) {
		t.Fatalf("status after the start: %+v", vm.Status)
	}

	v := e.console("agent")
	if _, err := v.con.WaitRecord(ctx, 10); err != nil {
		t.Fatalf("no counter on `basalt vm console`: %v\n%s\nstderr: %s", err, v.con.Tail(20), v.notices())
	}
	t.Logf("agent guest on a 3-replica volume: counter on the console through the API %s after `vm start`", time.Since(start).Round(time.Millisecond))

	t.Run("bad input", func(t *testing.T) {
		_, errOut, code := e.basalt(nil, "vm", "create", "huge", "--memory", "64G", "--kernel", g.Kernel)
		oneLine(t, "more memory than a host has", errOut, code, 1, "more than any host")
		_, errOut, code = e.basalt(nil, "vm", "create", "lost", "--memory", "64M", "--disk", "missing:1")
		oneLine(t, "a missing volume", errOut, code, 1, `volume "missing" does not exist`)
		_, errOut, code = e.basalt(nil, "vm", "create", "twin", "--memory", "64M", "--disk", "boot0:1")
		oneLine(t, "a volume another VM uses", errOut, code, 1, `disk of VM "agent"`)
		_, errOut, code = e.basalt(nil, "vm", "migrate", "agent", "--to", "computed-1")
		oneLine(t, "a migration to its own host", errOut, code, 1, "the VM's own host")
		_, errOut, code = e.basalt(nil, "vm", "memory", "agent", "1G")
		oneLine(t, "memory above the maximum", errOut, code, 1, "maximum 192 MiB")
		var l struct {
			VMs []vmJSON `json:"vms"`
		}
		json.Unmarshal([]byte(basalt("vm", "list", "-o", "json")), &l)
		if len(l.VMs) != 1 {
			t.Fatalf("VMs after refused calls: %+v", l.VMs)
		}
	})

	t.Run("balloon seen in the guest", func(t *testing.T) {
		mem := func(from int, ok func(testguest.Mem) bool) testguest.Mem {
			t.Helper()
			_, l, err := v.con.Wait(ctx, from, func(l testguest.Line) bool { m, isMem := testguest.ParseMem(l); return isMem && ok(m) })
			if err != nil {
				t.Fatalf("%v\n%s", err, v.con.Tail(5))
			}
			m, _ := testguest.ParseMem(l)
			return m
		}
		before := mem(0, func(testguest.Mem) bool { return true })
		from := len(v.con.Lines())
		basalt("vm", "memory", "agent", "96M")
		after := mem(from, func(m testguest.Mem) bool { return m.Total <= before.Total-48<<20 })
		t.Logf("guest MemTotal %d MiB -> %d MiB after `basalt vm memory agent 96M`", before.Total>>20, after.Total>>20)
	})

	t.Run("metering", func(t *testing.T) {
		var st struct {
			CPU   json.Number `json:"cpu_time_ns"`
			Disks []struct {
				Volume   string      `json:"volume"`
				WriteOps json.Number `json:"write_ops"`
				Written  json.Number `json:"write_bytes"`
			} `json:"disks"`
		}
		if err := json.Unmarshal([]byte(basalt("vm", "stats", "agent", "-o", "json")), &st); err != nil {
			t.Fatal(err)
		}
		if num(st.CPU) == 0 || len(st.Disks) != 1 || st.Disks[0].Volume != "boot0" || num(st.Disks[0].WriteOps) == 0 {
			t.Fatalf("stats: %+v", st)
		}
		// computed-1 is node 4 of the plan (after metad's range and three blockd): metrics on its second port.
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", base+41))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`basalt_vm_cpu_seconds_total{host="computed-1",vm="agent"}`, `basalt_vm_disk_writes_total{host="computed-1",vm="agent",volume="boot0"}`,
			`basalt_vm_memory_actual_bytes{host="computed-1",vm="agent"}`} {
			if !strings.Contains(string(body), want) {
				t.Fatalf("metrics lack %s:\n%s", want, body)
			}
		}
		t.Logf("stats: cpu %s, %d writes (%d bytes) on boot0; Prometheus endpoint serves them", time.Duration(num(st.CPU)),
			num(st.Disks[0].WriteOps), num(st.Disks[0].Written))
	})

	// attachment returns the host and generation boot0 is attached to, from `basalt volume attachments`.
	attachment := func() (host string, gen int) {
		t.Helper()
		var lines []string
		for _, l := range strings.Split(strings.TrimSpace(basalt("volume", "attachments", "boot0")), "\n")[1:] {
			lines = append(lines, l)
		}
		if len(lines) != 1 {
			t.Fatalf("boot0 attachments: %q, want one", lines)
		}
		f := strings.Fields(lines[0])
		if len(f) < 4 || strings.Contains(lines[0], "incoming") {
			t.Fatalf("boot0 attachment: %q", lines[0])
		}
		n, _ := strconv.Atoi(f[2])
		return f[1], n
	}
	if h, _ := attachment(); h != "computed-1" {
		t.Fatalf("boot0 attached to %s, want computed-1", h)
	}

	t.Run("live migration while the counter runs", func(t *testing.T) {
		_, genBefore := attachment()
		before, _ := v.con.LastRecord()
		basalt("vm", "migrate", "agent", "--to", "computed-2", "--no-wait")
		_, errOut, code := e.basalt(nil, "vm", "migrate", "agent", "--to", "computed-2")
		oneLine(t, "a second migration at once", errOut, code, 1, "already migrating")
		vm := waitVM("agent", "on computed-2", 2*time.Minute, runningOn("computed-2"))
		m := vm.Status.Migration
		if m.Status != "completed" || m.Source != "computed-1" || num(m.TransferredBytes) == 0 {
			t.Fatalf("migration: %+v", m)
		}
		t.Logf("migrated computed-1 -> computed-2: %d MiB, downtime %d ms (%+v)", num(m.TransferredBytes)>>20, m.DowntimeMs, m)
		if _, err := v.con.WaitRecord(ctx, before.Seq+40); err != nil {
			t.Fatalf("the counter did not go on after the migration: %v\n%s", err, v.con.Tail(10))
		}
		if q := qemuOf("computed-1"); len(q) != 0 {
			t.Fatalf("QEMU left on computed-1: %v", q)
		}
		// The attachment moved with the guest, to a newer generation: computed-1's sessions can no longer write.
		if h, gen := attachment(); h != "computed-2" || gen <= genBefore {
			t.Fatalf("after the migration boot0 is attached to %s at generation %d (before: %d)", h, gen, genBefore)
		}
		// And back with the CLI following it, compressed.
		out := basalt("vm", "migrate", "agent", "--to", "computed-1", "--compress")
		t.Logf("%s", strings.TrimSpace(out))
		waitVM("agent", "on computed-1", time.Minute, runningOn("computed-1"))
	})

	t.Run("cancelled migration keeps the guest at its source", func(t *testing.T) {
		basalt("vm", "migrate", "agent", "--to", "computed-2", "--bandwidth", "1M", "--no-wait")
		waitVM("agent", "migration active", time.Minute, func(vm vmJSON) bool {
			return vm.Status.Migration.Status == "active" && num(vm.Status.Migration.TransferredBytes) > 0
		})
		basalt("vm", "migrate", "agent", "--cancel")
		vm := waitVM("agent", "cancelled", time.Minute, func(vm vmJSON) bool {
			return vm.Migration == nil && vm.Status.Migration.Status == "cancelled"
		})
		if !runningOn("computed-1")(vm) {
			t.Fatalf("after the cancel: %+v", vm)
		}
		last, _ := v.con.LastRecord()
		if _, err := v.con.WaitRecord(ctx, last.Seq+20); err != nil {
			t.Fatalf("the counter stopped after the cancel: %v", err)
		}
		for deadline := time.Now().Add(30 * time.Second); len(qemuOf("computed-2")) > 0; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the cancelled migration's target still runs QEMU: %v", qemuOf("computed-2"))
			}
		}
	})

	var restart struct{ from, to time.Time }
	t.Run("SIGKILLed computed leaves the guest running", func(t *testing.T) {
		before := qemuOf("computed-1")
		if len(before) != 1 {
			t.Fatalf("QEMU on computed-1: %v", before)
		}
		restart.from = time.Now()
		old := c.pid(t, "computed-1")
		if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// basalt up restarts it after --restart-delay; it is back when it registers with a new pid.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			out, _, _ := e.basalt(nil, "node", "list", "-o", "json")
			var l nodeList
			json.Unmarshal([]byte(out), &l)
			back := false
			for _, n := range l.Nodes {
				back = back || (n.Node.ID == "computed-1" && n.State == "NODE_STATE_UP" && n.Liveness.PID != 0 && n.Liveness.PID != old)
			}
			if back {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("computed-1 not back after its SIGKILL: %s", out)
			}
		}
		if after := qemuOf("computed-1"); strings.Join(after, ",") != strings.Join(before, ",") {
			t.Fatalf("QEMU after computed's restart: %v, before %v", after, before)
		}
		last, _ := v.con.LastRecord()
		if _, err := v.con.WaitRecord(ctx, last.Seq+20); err != nil {
			t.Fatalf("the console did not come back after computed restarted: %v\n%s", err, v.notices())
		}
		restart.to = time.Now()
		waitVM("agent", "running after the restart", 30*time.Second, runningOn("computed-1"))
	})

	t.Run("drain empties the host", func(t *testing.T) {
		out := basalt("host", "drain", "computed-1", "--parallel", "1")
		t.Logf("%s", strings.TrimSpace(out))
		var hosts struct {
			Hosts []struct {
				Host struct {
					Node string `json:"node"`
				} `json:"host"`
				VMs []string `json:"vms"`
			} `json:"hosts"`
		}
		json.Unmarshal([]byte(basalt("host", "list", "-o", "json")), &hosts)
		for _, h := range hosts.Hosts {
			if h.Host.Node == "computed-1" && len(h.VMs) != 0 {
				t.Fatalf("drained host still holds %v", h.VMs)
			}
		}
		waitVM("agent", "on computed-2", time.Minute, runningOn("computed-2"))
		for deadline := time.Now().Add(30 * time.Second); len(qemuOf("computed-1")) > 0; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("QEMU still runs on the drained host: %v", qemuOf("computed-1"))
			}
		}
		basalt("host", "undrain", "computed-1")
	})

	t.Run("live clone", func(t *testing.T) {
		last, _ := v.con.LastRecord()
		out := basalt("vm", "clone", "agent", "agent2", "--start")
		t.Logf("%s", strings.TrimSpace(out))
		// The source ran on through the checkpoint.
		if _, err := v.con.WaitRecord(ctx, last.Seq+20); err != nil {
			t.Fatalf("the source's counter stopped at the clone: %v", err)
		}
		waitVM("agent2", "running", 2*time.Minute, func(vm vmJSON) bool { return vm.State == "VM_STATE_RUNNING" })
		cv := e.console("agent2")
		// The clone's agent resumes from the records on its disk, the checkpoint's.
		var resume uint64
		if _, _, err := cv.con.Wait(ctx, 0, func(l testguest.Line) bool {
			if i := strings.Index(l.Text, "BASALT resume seq="); i >= 0 {
				fmt.Sscanf(l.Text[i:], "BASALT resume seq=%d", &resume)
				return true
			}
			return false
		}); err != nil {
			t.Fatalf("clone: %v\n%s", err, cv.con.Tail(10))
		}
		rec, err := cv.con.WaitRecord(ctx, 1)
		if err != nil || resume < last.Seq || rec.Seq != resume+1 {
			t.Fatalf("the clone resumed at %d (first record %d, %v); the source was at %d when cloned", resume, rec.Seq, err, last.Seq)
		}
		t.Logf("clone resumed its counter at %d (the source was at %d when the clone was asked for)", resume, last.Seq)
		basalt("vm", "kill", "agent2")
		basalt("vm", "delete", "agent2")
	})

	// The console, read through the API as one stream across three migrations, a cancelled one and a SIGKILL
	// of computed: the counter goes up by one, except for what the guest printed while no computed held its
	// serial port (QEMU drops it); the disk check below covers those records.
	recs, err := testguest.Records(v.con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	split := 0
	for i := 1; i < len(recs); i++ {
		if recs[i].Seq != recs[i-1].Seq+1 {
			if split != 0 || recs[i-1].At.After(restart.to) || recs[i].At.Before(restart.from) {
				t.Fatalf("console: record %d follows record %d outside computed's restart", recs[i].Seq, recs[i-1].Seq)
			}
			split = i
			t.Logf("console: records %d..%d printed while computed was down were not read", recs[i-1].Seq+1, recs[i].Seq-1)
		}
	}
	for _, part := range [][]testguest.Rec{recs[:max(split, 1)], recs[split:]} {
		cont, err := testguest.CheckContinuity(part)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("console records %d..%d: longest gap between lines %s (after %d)", cont.First, cont.Last, cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter)
	}

	t.Run("a fenced run is replaced", func(t *testing.T) {
		// Fencing the host by hand makes the guest's writes fail (EPERM: its QEMU pauses on the error); its host
		// sees that the run's attachment is gone, kills it, and starts the VM again with a new one.
		before := inspect("agent")
		host := before.Host
		_, genBefore := attachment()
		out := basalt("host", "fence", host)
		if !strings.Contains(out, "boot0") {
			t.Fatalf("host fence: %s", out)
		}
		vm := waitVM("agent", "running again in a new run", 2*time.Minute, func(vm vmJSON) bool {
			return runningOn(host)(vm) && vm.Status.Pid != 0 && vm.Status.Pid != before.Status.Pid
		})
		if h, gen := attachment(); h != host || gen <= genBefore {
			t.Fatalf("after the fence boot0 is attached to %s at generation %d (before: %d)", h, gen, genBefore)
		}
		last, _ := v.con.LastRecord()
		cv := e.console("agent")
		if _, err := cv.con.WaitRecord(ctx, last.Seq+5); err != nil {
			t.Fatalf("the counter did not go on in the new run: %v\n%s", err, cv.con.Tail(10))
		}
		t.Logf("fenced run (pid %d) replaced by pid %d on %s; last error: %s", before.Status.Pid, vm.Status.Pid, host, vm.Status.LastError)
	})

	t.Run("ACPI stop", func(t *testing.T) {
		out := basalt("vm", "stop", "agent")
		if !strings.Contains(out, "powered off") {
			t.Fatalf("stop: %s", out)
		}
		select {
		case <-v.exited:
		case <-time.After(30 * time.Second):
			t.Fatal("`basalt vm console` did not end after the VM stopped")
		}
		if !strings.Contains(v.notices(), "VM agent stopped") {
			t.Fatalf("console notices: %s", v.notices())
		}
	})

	// Every record the console announced is on the 3-replica volume, in one unbroken run.
	img := filepath.Join(t.TempDir(), "boot0.img")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", fmt.Sprintf("nbd://127.0.0.1:%d/boot0", base+21), img).CombinedOutput(); err != nil {
		t.Fatalf("read the volume: %v: %s", err, out)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, _ := f.Stat()
	sum, err := testguest.VerifyDisk(f, info.Size())
	if err != nil {
		t.Fatal(err)
	}
	all, _ := testguest.Records(v.con.Lines())
	if err := sum.CheckAnnounced(all); err != nil {
		t.Fatal(err)
	}
	t.Logf("volume: records %d..%d, no gap, every announced record present (%d boots)", sum.First, sum.Last, len(sum.Boots))
	if len(sum.Boots) != 2 {
		t.Fatalf("the guest booted %d times; it must have run once across every move, and once more after the fence", len(sum.Boots))
	}
	_, errOut, code := e.basalt(nil, "vm", "console", "agent", "--log", "--tail", "2K")
	if code != 0 || errOut != "" {
		t.Fatalf("console log after the stop: exit %d: %s", code, errOut)
	}
	basalt("vm", "delete", "agent")
}
