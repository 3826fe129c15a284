package check_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/computed/testguest/record"
)

const (
	bootA = 0xaaaa
	bootB = 0xbbbb
)

var t0 = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

// write is one record the crafted guest wrote: its sequence number and boot.
type write struct {
	seq  uint64
	boot uint64
}

func seqs(boot uint64, from, to uint64) []write {
	var ws []write
	for s := from; s <= to; s++ {
		ws = append(ws, write{s, boot})
	}
	return ws
}

// ring builds a disk image of slots records holding the writes in order (a later write to a slot replaces an
// earlier one, as on the real ring), and returns the records as the agent would have announced them.
func ring(t *testing.T, slots int64, writes ...[]write) ([]byte, []check.Announced) {
	t.Helper()
	img := make([]byte, slots*record.Size)
	var ann []check.Announced
	for _, ws := range writes {
		for _, w := range ws {
			r := record.Encode(img[int64(w.seq%uint64(slots))*record.Size:][:record.Size],
				record.Record{Seq: w.seq, Boot: w.boot, Time: t0.Add(time.Duration(w.seq) * 50 * time.Millisecond)})
			ann = append(ann, check.Announced{Rec: testguest.Rec{Record: r, At: r.Time}, Host: "computed-1"})
		}
	}
	return img, ann
}

func verify(t *testing.T, img []byte) testguest.DiskSummary {
	t.Helper()
	sum, err := testguest.VerifyDisk(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatalf("crafted ring does not verify: %v", err)
	}
	return sum
}

func wantErr(t *testing.T, what string, err error, contains ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error", what)
	}
	for _, c := range contains {
		if !strings.Contains(err.Error(), c) {
			t.Fatalf("%s: error %q does not mention %q", what, err, c)
		}
	}
}

func TestLostWrites(t *testing.T) {
	// A failover: boot A wrote 1..40, boot B resumed at 41.
	img, ann := ring(t, 64, seqs(bootA, 1, 40), seqs(bootB, 41, 60))
	sum := verify(t, img)
	if err := check.LostWrites("vm", sum, ann, time.Time{}); err != nil {
		t.Fatalf("every announced record is on the disk: %v", err)
	}

	// Record 30 was acknowledged to the guest, but the disk holds another record 30 (another instance's write,
	// or a torn one that happens to verify): the announced one is lost.
	other := bytes.Clone(img)
	record.Encode(other[30*record.Size:][:record.Size], record.Record{Seq: 30, Boot: bootB, Time: t0})
	wantErr(t, "a record with other content", check.LostWrites("vm", verify(t, other), ann, time.Time{}),
		"VM vm", "acknowledged write lost", "record 30", "differs", "000000000000aaaa", "computed-1")

	// Record 60, the newest, announced but never reached the disk (the ring still verifies: 1..59).
	img2, _ := ring(t, 64, seqs(bootA, 1, 40), seqs(bootB, 41, 59))
	sum = verify(t, img2)
	wantErr(t, "a missing newest record", check.LostWrites("vm", sum, ann, time.Time{}), "record 60", "not on the disk")
	// ... unless it was announced after the image was cut: then it may legitimately be missing.
	if err := check.LostWrites("vm", sum, ann, ann[59].At); err != nil {
		t.Fatalf("a record announced after the cut counted as lost: %v", err)
	}

	// The ring wrapped: records 1..36 were overwritten by 65..100; they are superseded, not lost.
	img3, ann3 := ring(t, 64, seqs(bootA, 1, 100))
	sum = verify(t, img3)
	if sum.First != 37 {
		t.Fatalf("wrapped ring starts at %d, want 37", sum.First)
	}
	if err := check.LostWrites("vm", sum, ann3, time.Time{}); err != nil {
		t.Fatalf("overwritten records counted as lost: %v", err)
	}
}

func TestSplitBrainDisk(t *testing.T) {
	img, _ := ring(t, 64, seqs(bootA, 1, 40), seqs(bootB, 41, 60))
	if err := check.SplitBrainDisk("vm", verify(t, img)); err != nil {
		t.Fatalf("a clean failover: %v", err)
	}
	// The old instance (A) kept writing after the new one (B) started: B wrote 41..50, then A 51..55, then B.
	img, _ = ring(t, 64, seqs(bootA, 1, 40), seqs(bootB, 41, 50), seqs(bootA, 51, 55), seqs(bootB, 56, 60))
	wantErr(t, "interleaved boots", check.SplitBrainDisk("vm", verify(t, img)), "split brain", "000000000000aaaa", "51..55",
		"000000000000bbbb", "41..50")
}

func TestSplitBrainConsole(t *testing.T) {
	_, ann := ring(t, 64, seqs(bootA, 1, 40), seqs(bootB, 41, 60))
	// The console saw some records twice (a relay resuming) and missed others (no computed held the console).
	dup := append(append([]check.Announced(nil), ann[:30]...), ann[25:]...)
	gappy := append(append([]check.Announced(nil), ann[:20]...), ann[35:]...)
	for name, a := range map[string][]check.Announced{"clean": ann, "repeated lines": dup, "gap": gappy} {
		if err := check.SplitBrainConsole("vm", a); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	// Both instances announced record 45: each believed its write had landed.
	_, twin := ring(t, 64, seqs(bootA, 45, 45))
	twin[0].Host = "computed-2"
	wantErr(t, "one record announced by two boots", check.SplitBrainConsole("vm", append(ann, twin...)),
		"record 45 announced twice", "000000000000bbbb", "000000000000aaaa", "computed-2")
	// The old instance announced records after the new one started, with numbers the new one had not used.
	_, a1 := ring(t, 64, seqs(bootA, 1, 40))
	_, b := ring(t, 64, seqs(bootB, 41, 50))
	_, a2 := ring(t, 64, seqs(bootA, 51, 52))
	wantErr(t, "interleaved boots", check.SplitBrainConsole("vm", append(append(a1, b...), a2...)), "split brain", "51..52")
}

func TestInstances(t *testing.T) {
	ok := map[string][]check.Instance{"a": {{Host: "computed-1", PID: 10}}, "b": {}}
	if err := check.Instances(ok); err != nil {
		t.Fatal(err)
	}
	two := map[string][]check.Instance{"a": {{Host: "computed-1", PID: 10, Stopped: true}, {Host: "computed-2", PID: 20}}}
	wantErr(t, "two hypervisors", check.Instances(two), "VM a", "2 hypervisor processes", "computed-1 pid 10 (frozen)", "computed-2 pid 20")
}

func vm(name, host string, prio basaltv1.VMPriority, group string, possible ...string) *basaltv1.VM {
	return &basaltv1.VM{
		Name: name, Host: host, State: basaltv1.VMState_VM_STATE_RUNNING, DesiredState: basaltv1.VMState_VM_STATE_RUNNING,
		Status: &basaltv1.VMStatus{Host: host},
		Spec:   &basaltv1.VMSpec{Priority: prio, Placement: &basaltv1.VMPlacement{AntiAffinityGroup: group, PossibleHosts: possible}},
	}
}

func TestPlacement(t *testing.T) {
	m := basaltv1.VMPriority_VM_PRIORITY_MEDIUM
	good := []*basaltv1.VM{vm("a", "computed-2", m, "g"), vm("b", "computed-3", m, "g"), vm("c", "computed-3", m, "", "computed-1", "computed-3")}
	if err := check.Placement(good, 3); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "a VM off its possible hosts", check.Placement([]*basaltv1.VM{vm("c", "computed-2", m, "", "computed-1", "computed-3")}, 3),
		"VM c runs on computed-2", "possible hosts")
	together := []*basaltv1.VM{vm("a", "computed-2", m, "g"), vm("b", "computed-2", m, "g")}
	wantErr(t, "anti-affinity members together with room left", check.Placement(together, 3), "group g", "computed-2 runs 2")
	// Three members on two hosts: two may share one host, not three.
	if err := check.Placement(append(together, vm("c", "computed-3", m, "g")), 2); err != nil {
		t.Fatalf("spread as evenly as possible: %v", err)
	}
	wantErr(t, "three members on one of two hosts", check.Placement(append(together, vm("c", "computed-2", m, "g")), 2), "computed-2 runs 3")
	// A stopped member does not count.
	stopped := vm("c", "computed-2", m, "g")
	stopped.State = basaltv1.VMState_VM_STATE_STOPPED
	if err := check.Placement([]*basaltv1.VM{vm("a", "computed-2", m, "g"), stopped}, 3); err != nil {
		t.Fatal(err)
	}
}

func TestNotRestarted(t *testing.T) {
	na := basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START
	left := vm("n", "computed-1", na, "")
	left.State, left.DesiredState = basaltv1.VMState_VM_STATE_STOPPED, basaltv1.VMState_VM_STATE_STOPPED
	if err := check.NotRestarted([]*basaltv1.VM{left, vm("p", "computed-2", basaltv1.VMPriority_VM_PRIORITY_HIGH, "")}, "computed-1"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "restarted elsewhere", check.NotRestarted([]*basaltv1.VM{vm("n", "computed-2", na, "")}, "computed-1"),
		"VM n", "was restarted", "computed-2")
	wantErr(t, "restarted by its returning host", check.NotRestarted([]*basaltv1.VM{vm("n", "computed-1", na, "")}, "computed-1"),
		"RUNNING")
}

func TestPriorityOrder(t *testing.T) {
	h, m, l := basaltv1.VMPriority_VM_PRIORITY_HIGH, basaltv1.VMPriority_VM_PRIORITY_MEDIUM, basaltv1.VMPriority_VM_PRIORITY_LOW
	ordered := []check.Restart{{"a", l, t0.Add(2 * time.Second)}, {"b", h, t0}, {"c", m, t0.Add(time.Second)}, {"d", h, t0}}
	if err := check.PriorityOrder(ordered); err != nil {
		t.Fatal(err)
	}
	wrong := []check.Restart{{"b", h, t0.Add(time.Second)}, {"c", m, t0}, {"d", basaltv1.VMPriority_VM_PRIORITY_UNSPECIFIED, t0}}
	wantErr(t, "a high VM placed after a medium one", check.PriorityOrder(wrong), "b (high) was placed 1s after c (medium)")
}
