package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/testguest"
)

// hostsJSON is the part of `basalt host list -o json` the tests read.
type hostsJSON struct {
	Hosts []struct {
		Host struct {
			Node     string `json:"node"`
			Hostname string `json:"hostname"`
		} `json:"host"`
		Up          bool `json:"up"`
		Maintenance *struct {
			Draining bool `json:"draining"`
		} `json:"maintenance"`
		VMs       []string `json:"vms"`
		Migrating []string `json:"migrating"`
	} `json:"hosts"`
}

// TestRollingUpdate runs `basalt cluster update --rolling` on `basalt up --computed 2` with one test guest on
// each host. The update command logs the host and SIGKILLs the host's computed (which `basalt up` restarts), as
// an update that restarts computed does: each host is drained, updated, waited for and refilled in turn, each
// guest ends on its own host, and its counter never skips. Then an update command that fails on the first host
// stops everything there: the host is left drained and the second is not touched. A Ctrl-C during the command
// stops it and says where; the undo commands printed for the failure put things back.
func TestRollingUpdate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vc := upVMCluster(t, ctx, "boots two QEMU guests under TCG and migrates them", "roll1", "roll2")
	e, c, g := vc.e, vc.c, vc.guest
	basalt, inspect := vc.basalt, vc.inspect
	hosts := []string{"computed-1", "computed-2"}
	guests := map[string]string{"computed-1": "roll1", "computed-2": "roll2"}
	hostList := func() hostsJSON {
		t.Helper()
		var l hostsJSON
		if err := json.Unmarshal([]byte(basalt("host", "list", "-o", "json")), &l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	draining := func() map[string]bool {
		t.Helper()
		m := map[string]bool{}
		for _, h := range hostList().Hosts {
			m[h.Host.Node] = h.Maintenance != nil && h.Maintenance.Draining
		}
		return m
	}
	onItsHost := func(name, host string) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
			vm := inspect(name)
			if vm.State == "VM_STATE_RUNNING" && vm.Host == host && vm.Status.Host == host && vm.Migration == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("VM %s is not running on %s: %+v", name, host, vm)
			}
		}
	}
	readFile := func(path string) string {
		b, _ := os.ReadFile(path)
		return string(b)
	}

	// The smallest guests the other tests boot; 32 MiB disks, as there (the agent scans its ring at boot).
	consoles := map[string]*consoleViewer{}
	for _, h := range hosts {
		vm := guests[h]
		basalt("volume", "create", vm+"-boot", "--size", "32M")
		basalt("vm", "create", vm, "--memory", "128M", "--disk", vm+"-boot:1",
			"--kernel", g.Kernel, "--initrd", g.Initrd, "--cmdline", g.Cmdline("basalt.interval=50ms"))
		basalt("vm", "start", vm, "--host", h)
	}
	for _, h := range hosts {
		vm := guests[h]
		consoles[vm] = e.console(vm)
		if _, err := consoles[vm].con.WaitRecord(ctx, 10); err != nil {
			t.Fatalf("no counter on %s's console: %v\n%s", vm, err, consoles[vm].con.Tail(20))
		}
	}
	hostname, _ := os.Hostname()

	t.Run("dry run changes nothing", func(t *testing.T) {
		out := basalt("cluster", "update", "--rolling", "false", "--dry-run")
		for _, want := range []string{"1. computed-1 (machine " + hostname + "): VMs to move away and back: roll1",
			"2. computed-2 (machine " + hostname + "): VMs to move away and back: roll2", "/bin/sh -c 'false'"} {
			if !strings.Contains(out, want) {
				t.Errorf("plan lacks %q:\n%s", want, out)
			}
		}
		if d := draining(); d["computed-1"] || d["computed-2"] {
			t.Errorf("a dry run drained a host: %v", d)
		}
		_, errOut, code := e.basalt(nil, "cluster", "update", "--rolling", "true", "--hosts", "computed-1,computed-9")
		oneLine(t, "an unknown host", errOut, code, 1, `--hosts: "computed-9" is not a computed host (hosts: computed-1, computed-2)`)
		_, errOut, code = e.basalt(nil, "cluster", "update")
		oneLine(t, "no command", errOut, code, 2, "--rolling CMD")
	})

	var lastMigration = map[string]string{}
	t.Run("every host in turn, each guest back home", func(t *testing.T) {
		updated := filepath.Join(t.TempDir(), "updated")
		pids := map[string]int{}
		for _, h := range hosts {
			pids[h] = c.pid(t, h)
		}
		// SIGKILL, as a crash in the middle of an update would: the lease lingers until it expires, and the
		// command returns before computed is back.
		cmd := fmt.Sprintf(`echo "$BASALT_HOST $BASALT_HOSTNAME" >> %s; echo "updating $BASALT_HOST"; case "$BASALT_HOST" in computed-1) kill -9 %d;; computed-2) kill -9 %d;; esac`,
			updated, pids["computed-1"], pids["computed-2"])
		before := map[string]uint64{}
		for _, vm := range guests {
			r, _ := consoles[vm].con.LastRecord()
			before[vm] = r.Seq
		}
		start := time.Now()
		out, errOut, code := e.basalt(nil, "cluster", "update", "--rolling", cmd, "--drain-timeout", "3m", "--up-timeout", "1m", "--command-timeout", "1m")
		t.Logf("rolling update in %s:\n%s", time.Since(start).Round(time.Millisecond), out)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errOut)
		}
		if got, want := readFile(updated), fmt.Sprintf("computed-1 %s\ncomputed-2 %s\n", hostname, hostname); got != want {
			t.Errorf("the command ran for %q, want %q", got, want)
		}
		for _, want := range []string{
			"computed-1: roll1 computed-1 -> computed-2: completed", "[computed-1] updating computed-1",
			"computed-1: computed is up again (restarted: pid", "computed-1: roll1 computed-2 -> computed-1: completed",
			"computed-2: roll2 computed-2 -> computed-1: completed", "[computed-2] updating computed-2",
			"computed-2: roll2 computed-1 -> computed-2: completed",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
		// The summary: one line per host, in order, each with its VM moved and computed's restart.
		i1, i2 := strings.Index(out, "\ncomputed-1  roll1"), strings.Index(out, "\ncomputed-2  roll2")
		if !strings.Contains(out, "HOST        VMS MOVED") || i1 < 0 || i2 < i1 || strings.Count(out, "computed restarted") != 2 {
			t.Errorf("summary missing or wrong:\n%s", out)
		}
		for _, h := range hosts {
			onItsHost(guests[h], h)
			vm := inspect(guests[h])
			if m := vm.Status.Migration; m.Status != "completed" || m.Target != h || m.Source == h {
				t.Errorf("%s's last migration: %+v; want one back to %s", guests[h], m, h)
			}
			lastMigration[guests[h]] = vm.Status.Migration.ID
			if c.pid(t, h) == pids[h] {
				t.Errorf("%s was not restarted", h)
			}
		}
		if d := draining(); d["computed-1"] || d["computed-2"] {
			t.Errorf("hosts left in maintenance: %v", d)
		}
		// The counters ran on through two migrations each, one record after the other.
		for vm, v := range consoles {
			if _, err := v.con.WaitRecord(ctx, before[vm]+40); err != nil {
				t.Fatalf("%s's counter stopped: %v\n%s", vm, err, v.con.Tail(10))
			}
			recs, err := testguest.Records(v.con.Lines())
			if err != nil {
				t.Fatal(err)
			}
			cont, err := testguest.CheckContinuity(recs)
			if err != nil {
				t.Fatalf("%s: %v", vm, err)
			}
			t.Logf("%s: records %d..%d on the console, longest gap %s (after %d)", vm, cont.First, cont.Last,
				cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter)
		}
	})
	if t.Failed() {
		return
	}

	var undo []string
	t.Run("a failure stops at its host", func(t *testing.T) {
		ran := filepath.Join(t.TempDir(), "ran")
		_, errOut, code := e.basalt(nil, "cluster", "update", "--rolling", fmt.Sprintf(`echo "$BASALT_HOST" >> %s; exit 3`, ran),
			"--drain-timeout", "3m")
		if code != 1 {
			t.Fatalf("exit %d, want 1: %s", code, errOut)
		}
		t.Logf("stderr:\n%s", errOut)
		for _, want := range []string{
			"basalt: rolling update failed at host computed-1, step update: the update command failed: command exited with status 3\n",
			"Hosts updated: none; not started (untouched): computed-2.",
			"computed-1: up, in maintenance (drained: no VM is placed there), holds no VMs",
			"VM roll1 (was on computed-1): running on computed-2",
			"To undo:\n  basalt host undrain computed-1\n  basalt vm migrate roll1 --to computed-1\n",
		} {
			if !strings.Contains(errOut, want) {
				t.Errorf("stderr lacks %q", want)
			}
		}
		if got := readFile(ran); got != "computed-1\n" {
			t.Errorf("the command ran for %q, want computed-1 only", got)
		}
		if d := draining(); !d["computed-1"] || d["computed-2"] {
			t.Errorf("maintenance after the failure: %v; want computed-1 only", d)
		}
		onItsHost("roll1", "computed-2")
		onItsHost("roll2", "computed-2")
		if id := inspect("roll2").Status.Migration.ID; id != lastMigration["roll2"] {
			t.Errorf("roll2 migrated (migration %s, before %s): the second host was touched", id, lastMigration["roll2"])
		}
		_, rest, _ := strings.Cut(errOut, "To undo:\n")
		for _, l := range strings.Split(rest, "\n") {
			if strings.HasPrefix(l, "  basalt ") {
				undo = append(undo, strings.TrimPrefix(l, "  basalt "))
			}
		}
	})
	if t.Failed() {
		return
	}

	t.Run("Ctrl-C stops the command and says where", func(t *testing.T) {
		mark := filepath.Join(t.TempDir(), "mark")
		cmd := exec.Command(filepath.Join(binDir, "basalt"), "cluster", "update", "--hosts", "computed-1",
			"--rolling", fmt.Sprintf("echo started >> %s; sleep 300; echo finished >> %s", mark, mark))
		cmd.Env = append(filteredEnviron(), e.vars...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		defer func() { cmd.Process.Kill(); <-exited }()
		for deadline := time.Now().Add(time.Minute); readFile(mark) == ""; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the command did not start: %s%s", out.String(), errOut.String())
			}
		}
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			t.Fatal("basalt cluster update did not stop within 30s of SIGINT")
		}
		if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(errOut.String(), "interrupted at host computed-1, step update") {
			t.Fatalf("after SIGINT: exit %d, stderr:\n%s", code, errOut.String())
		}
		time.Sleep(500 * time.Millisecond)
		if got := readFile(mark); got != "started\n" {
			t.Errorf("the command went on after the interrupt: %q", got)
		}
	})

	t.Run("the printed undo puts things back", func(t *testing.T) {
		if len(undo) != 2 {
			t.Fatalf("undo commands: %q", undo)
		}
		for _, u := range undo {
			basalt(strings.Fields(u)...)
		}
		onItsHost("roll1", "computed-1")
		if d := draining(); d["computed-1"] || d["computed-2"] {
			t.Errorf("maintenance after the undo: %v", d)
		}
		for vm, v := range consoles {
			last, _ := v.con.LastRecord()
			if _, err := v.con.WaitRecord(ctx, last.Seq+20); err != nil {
				t.Fatalf("%s's counter stopped: %v", vm, err)
			}
			recs, _ := testguest.Records(v.con.Lines())
			if _, err := testguest.CheckContinuity(recs); err != nil {
				t.Errorf("%s: %v", vm, err)
			}
		}
	})
}
