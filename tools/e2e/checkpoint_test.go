package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

const mib = 1 << 20

// qemuIOAll runs qemu-io commands against one export and fails the test unless every command succeeded.
func qemuIOAll(t *testing.T, uri string, readOnly bool, cmds ...string) {
	t.Helper()
	args := []string{"-f", "raw"}
	if readOnly {
		args = append(args, "-r")
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, uri)...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io %s %v: %v\n%s", uri, cmds, err, out)
	}
}

// num reads a protojson integer (a string for 64-bit values, absent for zero).
func num(n json.Number) int64 {
	if n == "" {
		return 0
	}
	v, err := n.Int64()
	if err != nil {
		panic(err)
	}
	return v
}

// TestCheckpointsKeepTheirContent takes checkpoints of a volume between writes and trims, and checks that each
// checkpoint (a read-only export VOLUME@NAME) and the volume read back exactly; that the changed-block list
// between checkpoints is exact; that the space figures add up; that deleting a checkpoint keeps the others and
// survives a SIGKILL of a storage node mid-merge; that revert restores a checkpoint; and that bad input fails
// with a clear error.
func TestCheckpointsKeepTheirContent(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	c := e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s", "--restart-delay", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	basalt := func(args ...string) string {
		t.Helper()
		out, errOut, code := e.basalt(nil, args...)
		if code != 0 {
			t.Fatalf("basalt %s: %s", strings.Join(args, " "), errOut)
		}
		return out
	}
	uri := func(export string) string { return fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+11, export) }

	basalt("volume", "create", "ck", "--size", "64M")
	qemuIOAll(t, uri("ck"), false, "write -P 1 0 64M")
	out := basalt("checkpoint", "create", "c1", "ck")
	t.Logf("checkpoint c1: %s", strings.TrimSpace(out))
	qemuIOAll(t, uri("ck"), false, "write -P 2 0 16M", "discard 16M 4M")
	basalt("checkpoint", "create", "c2", "ck")
	qemuIOAll(t, uri("ck"), false, "write -P 3 8M 4M")

	wantC1 := []string{"read -P 1 0 64M"}
	wantC2 := []string{"read -P 2 0 16M", "read -P 0 16M 4M", "read -P 1 20M 44M"}
	wantHead := []string{"read -P 2 0 8M", "read -P 3 8M 4M", "read -P 2 12M 4M", "read -P 0 16M 4M", "read -P 1 20M 44M"}
	qemuIOAll(t, uri("ck@c1"), true, wantC1...)
	qemuIOAll(t, uri("ck@c2"), true, wantC2...)
	qemuIOAll(t, uri("ck"), true, wantHead...)

	// A checkpoint is read-only.
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write 0 4k", uri("ck@c1")).CombinedOutput(); err == nil && !strings.Contains(string(out), "ermission") && !strings.Contains(string(out), "read-only") && !strings.Contains(string(out), "read only") {
		t.Fatalf("writing a checkpoint succeeded:\n%s", out)
	}

	// Changed blocks between c1 and c2: 16 MiB of data, then 4 MiB trimmed; since c2: 4 MiB of data.
	var changed struct {
		Extents []struct {
			Offset, Length json.Number
			Zero           bool
		}
		ChangedBytes json.Number `json:"changed_bytes"`
	}
	if err := json.Unmarshal([]byte(basalt("checkpoint", "changed", "ck", "--from", "c1", "--to", "c2", "-o", "json")), &changed); err != nil {
		t.Fatal(err)
	}
	var gotExt []string
	for _, x := range changed.Extents {
		gotExt = append(gotExt, fmt.Sprintf("%d+%d zero=%v", num(x.Offset), num(x.Length), x.Zero))
	}
	if want := fmt.Sprintf("[0+%d zero=false %d+%d zero=true]", 16*mib, 16*mib, 4*mib); fmt.Sprint(gotExt) != want {
		t.Fatalf("changed c1..c2 = %v, want %s", gotExt, want)
	}
	if err := json.Unmarshal([]byte(basalt("checkpoint", "changed", "ck", "--from", "c2", "-o", "json")), &changed); err != nil {
		t.Fatal(err)
	}
	if num(changed.ChangedBytes) != 4*mib {
		t.Fatalf("changed since c2 = %s bytes, want %d", changed.ChangedBytes, 4*mib)
	}

	// The same through NBD block status, as QEMU's incremental backup reads it: the dirty bitmap c1 of the
	// export ck@c2.
	if _, err := exec.LookPath("nbdinfo"); err == nil {
		out, err := exec.Command("nbdinfo", "--map=qemu:dirty-bitmap:c1", uri("ck@c2")).CombinedOutput()
		var got []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if f := strings.Fields(l); len(f) >= 3 {
				got = append(got, strings.Join(f[:3], " "))
			}
		}
		if want := fmt.Sprintf("[0 %d 1 %d %d 0]", 20*mib, 20*mib, 44*mib); err != nil || fmt.Sprint(got) != want {
			t.Fatalf("nbdinfo --map=qemu:dirty-bitmap:c1 on ck@c2: %v\n%s\nwant %s", err, out, want)
		}
	}

	// Space: c1 alone holds the 20 MiB that later writes and the trim replaced; c2 alone the 4 MiB rewritten
	// after it.
	var list struct {
		Checkpoints []struct {
			Name           string
			ExclusiveBytes json.Number `json:"exclusive_bytes"`
			SharedBytes    json.Number `json:"shared_bytes"`
		}
	}
	if err := json.Unmarshal([]byte(basalt("checkpoint", "list", "ck", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprint([]string{"c1", fmt.Sprint(20 * mib), fmt.Sprint(44 * mib), "c2", fmt.Sprint(4 * mib), fmt.Sprint(56 * mib)})
	var got []string
	for _, c := range list.Checkpoints {
		got = append(got, c.Name, fmt.Sprint(num(c.ExclusiveBytes)), fmt.Sprint(num(c.SharedBytes)))
	}
	if fmt.Sprint(got) != want {
		t.Fatalf("checkpoint list (name, exclusive, shared) = %v, want %v", got, want)
	}

	// Bad input.
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"checkpoint", "create", "c1", "ck"}, "already has a checkpoint"},
		{[]string{"checkpoint", "create", "x", "ck", "ck"}, "named twice"},
		{[]string{"checkpoint", "create", "x", "nosuch"}, "does not exist"},
		{[]string{"checkpoint", "delete", "ck", "nosuch"}, "no checkpoint"},
		{[]string{"checkpoint", "changed", "ck", "--from", "c2", "--to", "c1"}, "not newer"},
	} {
		_, errOut, code := e.basalt(nil, bad.args...)
		if code == 0 || !strings.Contains(errOut, bad.want) {
			t.Errorf("basalt %s: exit %d, %q; want an error saying %q", strings.Join(bad.args, " "), code, errOut, bad.want)
		}
	}

	// Delete c1 and SIGKILL a storage node while it merges: c2 and the volume keep their content.
	basalt("checkpoint", "delete", "ck", "c1")
	if err := syscall.Kill(c.pid(t, "blockd-2"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e.waitNodes("blockd-2 back", 30*time.Second, allUp(fullCluster...))
	qemuIOAll(t, uri("ck@c2"), true, wantC2...)
	qemuIOAll(t, uri("ck"), true, wantHead...)
	if _, errOut, code := e.basalt(nil, "checkpoint", "changed", "ck", "--from", "c1"); code == 0 || !strings.Contains(errOut, "no checkpoint") {
		t.Fatalf("a deleted checkpoint is still usable: exit %d %s", code, errOut)
	}

	// Revert refuses an attached volume, then restores c2 once detached.
	q := startQemuIO(t, uri("ck"))
	if l, err := q.run("read 0 4k"); err != nil || !strings.HasPrefix(l, "read 4096/4096") {
		t.Fatalf("qemu-io: %q %v", l, err)
	}
	if _, errOut, code := e.basalt(nil, "checkpoint", "revert", "ck", "c2"); code == 0 || !strings.Contains(errOut, "attached") {
		t.Fatalf("revert of an attached volume: exit %d %s", code, errOut)
	}
	if err := q.close(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	// The NBD server notices the disconnect asynchronously.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, errOut, code := e.basalt(nil, "checkpoint", "revert", "ck", "c2")
		if code == 0 {
			break
		}
		if !strings.Contains(errOut, "attached") || time.Now().After(deadline) {
			t.Fatalf("revert: %s", errOut)
		}
		time.Sleep(200 * time.Millisecond)
	}
	qemuIOAll(t, uri("ck"), true, wantC2...)
	qemuIOAll(t, uri("ck@c2"), true, wantC2...)

	// Online resize with checkpoints: a shrink trims the volume only; the checkpoint keeps its bytes and its
	// size, and a grow reads zeros where the trimmed data was.
	basalt("volume", "resize", "ck", "--size", "32M", "--force")
	basalt("volume", "resize", "ck", "--size", "64M")
	qemuIOAll(t, uri("ck"), true, "read -P 2 0 16M", "read -P 0 16M 4M", "read -P 1 20M 12M", "read -P 0 32M 32M")
	qemuIOAll(t, uri("ck@c2"), true, wantC2...)
}

// TestCheckpointGroupUnderLoad checkpoints two volumes at one instant while fio writes one of them with
// verification, then deletes checkpoints while fio keeps writing: fio must see every write it made.
func TestCheckpointGroupUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("runs fio for several seconds")
	}
	needTool(t, "fio", "fio")
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	for _, v := range []string{"boot", "data"} {
		if _, errOut, code := e.basalt(nil, "volume", "create", v, "--size", "64M"); code != 0 {
			t.Fatalf("volume create: %s", errOut)
		}
	}
	qemuIOAll(t, fmt.Sprintf("nbd://127.0.0.1:%d/boot", base+21), false, "write -P 7 0 64M")
	fio := exec.Command("fio", "--name=load", "--ioengine=nbd", fmt.Sprintf("--uri=nbd://127.0.0.1:%d/data", base+11),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c", "--verify_fatal=1",
		"--verify_state_save=0", "--randrepeat=0", "--time_based=0", "--loops=3")
	var out bytes.Buffer
	fio.Stdout, fio.Stderr = &out, &out
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fio.Wait() }()
	var took []string
	for i := range 5 {
		time.Sleep(300 * time.Millisecond)
		o, errOut, code := e.basalt(nil, "checkpoint", "create", fmt.Sprintf("g%d", i), "boot", "data")
		if code != 0 {
			t.Fatalf("group checkpoint %d: %s", i, errOut)
		}
		took = append(took, strings.TrimSpace(o[strings.LastIndex(o, "took"):]))
		if i >= 2 {
			if _, errOut, code := e.basalt(nil, "checkpoint", "delete", "data", fmt.Sprintf("g%d", i-2)); code != 0 {
				t.Fatalf("delete: %s", errOut)
			}
		}
	}
	t.Logf("group checkpoints under load: %v", took)
	if err := <-done; err != nil {
		t.Fatalf("fio failed under checkpoints (a write was lost or a read was wrong): %v\n%s", err, out.String())
	}
	// The boot volume was not written after its fill: every checkpoint of it reads the fill.
	for i := range 5 {
		qemuIOAll(t, fmt.Sprintf("nbd://127.0.0.1:%d/boot@g%d", base+31, i), true, "read -P 7 0 64M")
	}
}

// TestLinkedClonesAndOffloadedCopy makes linked clones of a checkpoint, checks they share its blocks, diverge
// independently (including sub-block writes and trims over parent data), keep the parent checkpoint from being
// deleted until flattened, flatten online under writes, and that an offloaded copy (whole volume and range)
// reads back exactly.
func TestLinkedClonesAndOffloadedCopy(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	basalt := func(args ...string) string {
		t.Helper()
		out, errOut, code := e.basalt(nil, args...)
		if code != 0 {
			t.Fatalf("basalt %s: %s", strings.Join(args, " "), errOut)
		}
		return out
	}
	uri := func(node int, export string) string {
		return fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+10*node+1, export)
	}

	basalt("volume", "create", "golden", "--size", "24M")
	qemuIOAll(t, uri(1, "golden"), false, "write -P 9 0 24M")
	basalt("checkpoint", "create", "v1", "golden")
	qemuIOAll(t, uri(1, "golden"), false, "write -P 8 0 24M") // the parent moves on; clones keep v1

	start := time.Now()
	for _, n := range []string{"c1", "c2"} {
		out := basalt("volume", "create", n, "--from", "golden@v1")
		if !strings.Contains(out, "linked clone of golden@v1") {
			t.Fatalf("create clone: %s", out)
		}
	}
	t.Logf("two linked clones of a 24 MiB checkpoint created in %s", time.Since(start))
	qemuIOAll(t, uri(2, "c1"), true, "read -P 9 0 24M")
	// Clones diverge: c1 writes whole blocks, a 512-byte piece inside a parent block, and trims over the parent.
	qemuIOAll(t, uri(2, "c1"), false, "write -P 1 4M 1M", "write -P 2 8M 512", "discard 12M 4M")
	qemuIOAll(t, uri(3, "c2"), false, "write -P 3 0 64k")
	qemuIOAll(t, uri(1, "c1"), true, "read -P 9 0 4M", "read -P 1 4M 1M", "read -P 9 5M 3M", "read -P 2 8M 512",
		"read -P 9 8389120 3584", "read -P 9 8392704 4190208", "read -P 0 12M 4M", "read -P 9 16M 8M")
	qemuIOAll(t, uri(2, "c2"), true, "read -P 3 0 64k", "read -P 9 64k 24512k")
	qemuIOAll(t, uri(3, "golden@v1"), true, "read -P 9 0 24M")
	qemuIOAll(t, uri(3, "golden"), true, "read -P 8 0 24M")

	// The parent checkpoint and volume are protected while clones depend on them.
	if _, errOut, code := e.basalt(nil, "checkpoint", "delete", "golden", "v1"); code == 0 || !strings.Contains(errOut, "c1, c2") {
		t.Fatalf("deleting a checkpoint with clones: exit %d %s", code, errOut)
	}
	if _, errOut, code := e.basalt(nil, "volume", "delete", "golden"); code == 0 || !strings.Contains(errOut, "linked clones") {
		t.Fatalf("deleting a parent volume: exit %d %s", code, errOut)
	}
	if _, errOut, code := e.basalt(nil, "volume", "create", "bad", "--from", "golden"); code == 0 || !strings.Contains(errOut, "VOLUME@CHECKPOINT") {
		t.Fatalf("clone without a checkpoint: exit %d %s", code, errOut)
	}

	// Flatten c1 while another client writes it, then the parent checkpoint goes once c2 is flattened too.
	q := startQemuIO(t, uri(1, "c1"))
	done := make(chan error, 1)
	go func() {
		for i := range 40 {
			if l, err := q.run(fmt.Sprintf("write -P 4 %d 4k", 20*mib+i*4096)); err != nil || !strings.HasPrefix(l, "wrote") {
				done <- fmt.Errorf("write during flatten: %q %v", l, err)
				return
			}
		}
		done <- nil
	}()
	basalt("volume", "flatten", "c1")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := q.close(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	basalt("volume", "flatten", "c2")
	basalt("checkpoint", "delete", "golden", "v1")
	qemuIOAll(t, uri(2, "c1"), true, "read -P 9 0 4M", "read -P 1 4M 1M", "read -P 9 5M 3M", "read -P 2 8M 512",
		"read -P 9 8389120 3584", "read -P 9 8392704 4190208", "read -P 0 12M 4M", "read -P 9 16M 4M",
		"read -P 4 20M 160k", "read -P 9 20640k 3936k")
	qemuIOAll(t, uri(3, "c2"), true, "read -P 3 0 64k", "read -P 9 64k 24512k")

	// Offloaded copy: a whole volume into a new one, and a range onto an existing one.
	out := basalt("volume", "copy", "golden", "gcopy", "--create")
	t.Logf("copy: %s", strings.TrimSpace(out))
	qemuIOAll(t, uri(1, "gcopy"), true, "read -P 8 0 24M")
	basalt("volume", "copy", "c2", "gcopy", "--source-offset", "0", "--destination-offset", "1M", "--length", "1M")
	qemuIOAll(t, uri(2, "gcopy"), true, "read -P 8 0 1M", "read -P 3 1M 64k", "read -P 9 1088k 960k", "read -P 8 2M 22M")
	if _, errOut, code := e.basalt(nil, "volume", "copy", "c2", "gcopy", "--source-offset", "0", "--destination-offset", "24M", "--length", "1M"); code == 0 || !strings.Contains(errOut, "past the end") {
		t.Fatalf("copy past the end: exit %d %s", code, errOut)
	}

	// A clone larger than its parent reads zeros past the parent's end, and grows and shrinks like any volume.
	basalt("checkpoint", "create", "snap", "golden")
	basalt("volume", "create", "big", "--from", "golden@snap", "--size", "32M")
	qemuIOAll(t, uri(1, "big"), false, "read -P 8 0 24M", "read -P 0 24M 8M", "write -P 5 30M 1M")
	basalt("volume", "resize", "big", "--size", "16M", "--force")
	basalt("volume", "resize", "big", "--size", "32M")
	qemuIOAll(t, uri(2, "big"), true, "read -P 8 0 16M", "read -P 0 16M 16M")
}

// TestCheckpointsSurviveRecovery takes a checkpoint while a storage node is down, writes and trims around it,
// lets the node come back and be recovered, then kills the two other nodes: the recovered node alone must
// serve every checkpoint's content and the volume's, so recovery copied every layer.
func TestCheckpointsSurviveRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("kills nodes; slow")
	}
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	c := e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s", "--restart-delay", "8s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	basalt := func(args ...string) {
		t.Helper()
		if _, errOut, code := e.basalt(nil, args...); code != 0 {
			t.Fatalf("basalt %s: %s", strings.Join(args, " "), errOut)
		}
	}
	uri := func(node int, export string) string {
		return fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+10*node+1, export)
	}
	basalt("volume", "create", "rk", "--size", "32M")
	qemuIOAll(t, uri(1, "rk"), false, "write -P 1 0 32M")
	basalt("checkpoint", "create", "k1", "rk")

	if err := syscall.Kill(c.pid(t, "blockd-3"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The checkpoint cannot be taken until the map says blockd-3 is down (it cannot be asked to hold writes);
	// then it is, without it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		qemuIOAll(t, uri(1, "rk"), false, "write -P 2 0 8M", "discard 8M 4M")
		_, errOut, code := e.basalt(nil, "checkpoint", "create", "k2", "rk")
		if code == 0 {
			break
		}
		if !strings.Contains(errOut, "blockd-3") || time.Now().After(deadline) {
			t.Fatalf("checkpoint while blockd-3 is down: %s", errOut)
		}
		time.Sleep(300 * time.Millisecond)
	}
	qemuIOAll(t, uri(2, "rk"), false, "write -P 3 4M 2M")
	e.waitNodes("blockd-3 back", 30*time.Second, allUp(fullCluster...))
	waitMembersAgree(t, c.state(t), nil, 8)

	for _, n := range []string{"blockd-1", "blockd-2"} {
		if err := syscall.Kill(c.pid(t, n), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	// Reads through blockd-3 retry until the map moves the PGs to it alone.
	qemuIOAll(t, uri(3, "rk@k1"), true, "read -P 1 0 32M")
	qemuIOAll(t, uri(3, "rk@k2"), true, "read -P 2 0 8M", "read -P 0 8M 4M", "read -P 1 12M 20M")
	qemuIOAll(t, uri(3, "rk"), true, "read -P 2 0 4M", "read -P 3 4M 2M", "read -P 2 6M 2M", "read -P 0 8M 4M", "read -P 1 12M 20M")
}
