package cluster

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/computed/testguest/record"
)

func recLine(seq, boot uint64) string {
	var b [record.Size]byte
	return record.Line(record.Encode(b[:], record.Record{Seq: seq, Boot: boot, Time: time.Unix(1700000000, int64(seq))}))
}

func appendFile(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func waitRecs(t *testing.T, c *Consoles, vm string, n int) []check.Announced {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		rs := c.Records(vm)
		if len(rs) >= n {
			return rs
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s: %d records read, want %d", vm, len(rs), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestConsolesFollowLogs checks the console follower on files written as computed writes them: lines split
// across writes, other output mixed in, a rotation (rename to console.log.1 and a new file) with a line split
// across it, a second host's log of the same VM, and a line torn by a killed hypervisor.
func TestConsolesFollowLogs(t *testing.T) {
	dir := t.TempDir()
	h1, h2 := filepath.Join(dir, "h1"), filepath.Join(dir, "h2")
	for _, d := range []string{filepath.Join(h1, "vm1"), filepath.Join(h2, "vm1")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	c := newConsoles(map[string]string{"computed-1": h1, "computed-2": h2})
	defer c.close()
	log1 := filepath.Join(h1, "vm1", "console.log")

	appendFile(t, log1, "[    0.1] Linux version\r\nBASALT boot id=00000000000000aa\n"+recLine(1, 0xaa)+"\n")
	l2 := recLine(2, 0xaa) + "\n"
	appendFile(t, log1, l2[:20])
	waitRecs(t, c, "vm1", 1)
	appendFile(t, log1, l2[20:])
	waitRecs(t, c, "vm1", 2)

	// Rotation in the middle of a line.
	l3 := recLine(3, 0xaa) + "\n"
	appendFile(t, log1, l3[:10])
	time.Sleep(3 * consolePoll)
	if err := os.Rename(log1, log1+".1"); err != nil {
		t.Fatal(err)
	}
	appendFile(t, log1, l3[10:]+recLine(4, 0xaa)+"\n")
	rs := waitRecs(t, c, "vm1", 4)

	// The VM moves to computed-2; the old host's QEMU was killed in the middle of a line, and a later boot on
	// it continues the same file.
	appendFile(t, filepath.Join(h2, "vm1", "console.log"), recLine(5, 0xbb)+"\n")
	appendFile(t, log1, recLine(5, 0xaa)[:30])
	rs = waitRecs(t, c, "vm1", 5)
	appendFile(t, log1, recLine(6, 0xcc)+"\n")
	time.Sleep(3 * consolePoll)

	rs = c.Records("vm1")
	want := []struct {
		seq, boot uint64
		host      string
	}{{1, 0xaa, "computed-1"}, {2, 0xaa, "computed-1"}, {3, 0xaa, "computed-1"}, {4, 0xaa, "computed-1"}, {5, 0xbb, "computed-2"}, {6, 0xcc, "computed-1"}}
	if len(rs) != len(want) {
		t.Fatalf("records %+v, want %+v", rs, want)
	}
	for i, w := range want {
		if rs[i].Seq != w.seq || rs[i].Boot != w.boot || rs[i].Host != w.host {
			t.Fatalf("record %d: %d/%x on %s, want %d/%x on %s", i, rs[i].Seq, rs[i].Boot, rs[i].Host, w.seq, w.boot, w.host)
		}
	}
	if g := c.Garbled("vm1"); g != 1 {
		t.Fatalf("%d garbled lines, want the torn one", g)
	}
	lines := c.Lines("vm1")
	if lines[0].Text != "BASALT boot id=00000000000000aa" {
		t.Fatalf("first agent line %q", lines[0].Text)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if a, err := c.WaitRecord(ctx, "vm1", func(a check.Announced) bool { return a.Host == "computed-2" }); err != nil || a.Seq != 5 {
		t.Fatalf("WaitRecord: %+v, %v", a, err)
	}
}

func TestQEMUGuest(t *testing.T) {
	p := Proc{Args: []string{"/usr/bin/qemu-system-x86_64", "-nodefaults", "-name", "guest=k8-med-1,debug-threads=on", "-S"}}
	if vm, ok := p.QEMUGuest(); !ok || vm != "k8-med-1" {
		t.Fatalf("QEMUGuest = %q, %v", vm, ok)
	}
	for _, args := range [][]string{{"/bin/computed", "-name", "guest=x"}, {"qemu-system-x86_64", "-name"}, {"qemu-system-x86_64"}} {
		if vm, ok := (Proc{Args: args}).QEMUGuest(); ok {
			t.Fatalf("%v: QEMUGuest = %q", args, vm)
		}
	}
}
