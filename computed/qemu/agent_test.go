package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// beat is a heartbeat read from the agent channel, with the host time it arrived.
type beat struct {
	seq, boot uint64
	at        time.Time
}

// readBeats parses heartbeats from an agent stream until it ends (at the latest when the test does); anything
// else on the stream fails the test.
func readBeats(t *testing.T, r io.ReadCloser) <-chan beat {
	t.Cleanup(func() { r.Close() })
	ch := make(chan beat, 1024)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			seq, boot, err := record.ParseBeat(sc.Text())
			if err != nil {
				t.Errorf("agent channel: %v", err)
				return
			}
			ch <- beat{seq, boot, time.Now()}
		}
	}()
	return ch
}

// nextBeat returns the first beat from ch for which ok holds.
func nextBeat(ctx context.Context, ch <-chan beat, ok func(beat) bool) (beat, error) {
	for {
		select {
		case b, open := <-ch:
			if !open {
				return beat{}, errors.New("agent stream ended")
			}
			if ok(b) {
				return b, nil
			}
		case <-ctx.Done():
			return beat{}, fmt.Errorf("waiting for a heartbeat: %w", ctx.Err())
		}
	}
}

func anyBeat(beat) bool { return true }

// bootID is the boot id of the guest's latest "boot" line from line from on.
func bootID(t *testing.T, ctx context.Context, con *testguest.Console, from int) (uint64, int) {
	t.Helper()
	i, l, err := con.Wait(ctx, from, func(l testguest.Line) bool { k, _, ok := record.Fields(l.Text); return ok && k == "boot" })
	if err != nil {
		t.Fatalf("no boot line: %v\n%s", err, con.Tail(10))
	}
	_, f, _ := record.Fields(l.Text)
	var id uint64
	if _, err := fmt.Sscanf(f["id"], "%x", &id); err != nil {
		t.Fatalf("boot line %q: %v", l.Text, err)
	}
	return id, i
}

// TestAgentChannel runs the test guest with an agent channel: heartbeats arrive on Machine.Agent from the first
// second of the boot; one stream at a time; a new driver's Find reconnects the channel; "hang" stops the
// heartbeat and the counter, Reset reboots the guest in the same QEMU and both resume (the counter with no gap
// or repeat); the channel is part of the migration layout (a destination without it is refused before any
// data moves) and works on the destination after a migration. A machine without the channel says so.
func TestAgentChannel(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := newDriver(t)
	disk, img := nbdDisk(t, "root", 64<<20)
	spec := guestSpec(t, "agent", 128, disk)
	spec.Agent = true
	m := start(t, ctx, d, spec)
	con, closeCon := watch(t, ctx, m)
	ag, err := m.Agent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	beats := readBeats(t, ag)
	boot1, _ := bootID(t, ctx, con, 0)
	first, err := nextBeat(ctx, beats, anyBeat)
	if err != nil {
		t.Fatalf("%v\n%s", err, con.Tail(10))
	}
	// The host end was open from the start, so the guest's very first beat arrives.
	if first.seq != 1 || first.boot != boot1 {
		t.Fatalf("first heartbeat seq=%d boot=%016x; want seq=1 of boot %016x", first.seq, first.boot, boot1)
	}
	second, err := nextBeat(ctx, beats, anyBeat)
	if err != nil {
		t.Fatal(err)
	}
	if gap := second.at.Sub(first.at); second.seq != 2 || gap < 500*time.Millisecond || gap > 3*time.Second {
		t.Fatalf("second heartbeat seq=%d %s after the first", second.seq, gap)
	}
	if _, err := m.Agent(ctx); err == nil {
		t.Fatal("a second agent stream was opened")
	}

	// computed restarts: a new driver finds the machine, and its agent channel, through the run directory.
	closeCon()
	ag.Close()
	for range beats {
	}
	recs1, err := testguest.Records(con.Lines())
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	d2 := newDriver(t)
	findSpec := spec
	findSpec.Agent = false // Find learns it from QEMU
	m2, err := d2.Find(ctx, findSpec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupMachine(t, m2, spec)
	con2, _ := watch(t, ctx, m2)
	ag2, err := m2.Agent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	beats2 := readBeats(t, ag2)
	if _, err := nextBeat(ctx, beats2, func(b beat) bool { return b.boot == boot1 && b.seq > second.seq }); err != nil {
		t.Fatalf("no heartbeat after Find: %v", err)
	}

	// "hang": no more heartbeats or records.
	if _, err := io.WriteString(ag2, record.CmdHang+"\n"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := con2.Wait(ctx, 0, func(l testguest.Line) bool { return strings.HasSuffix(l.Text, "BASALT hang") }); err != nil {
		t.Fatalf("the guest did not take the command: %v\n%s", err, con2.Tail(10))
	}
	time.Sleep(300 * time.Millisecond) // a record or beat on its way
	hungAt, _ := con2.LastRecord()
	for len(beats2) > 0 {
		<-beats2
	}
	select {
	case b := <-beats2:
		t.Fatalf("heartbeat %d after hang", b.seq)
	case <-time.After(2500 * time.Millisecond):
	}
	if now, _ := con2.LastRecord(); now.Seq != hungAt.Seq {
		t.Fatalf("the counter went on after hang: %d -> %d", hungAt.Seq, now.Seq)
	}

	// Reset: a new boot in the same QEMU, heartbeats from seq 1 again, the counter resumes after its last record.
	n := len(con2.Lines())
	resetAt := time.Now()
	if err := m2.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	boot2, _ := bootID(t, ctx, con2, n)
	if boot2 == boot1 {
		t.Fatal("the reset guest reused its boot id")
	}
	b, err := nextBeat(ctx, beats2, anyBeat)
	if err != nil {
		t.Fatalf("no heartbeat after Reset: %v\n%s", err, con2.Tail(10))
	}
	if b.boot != boot2 || b.seq != 1 {
		t.Fatalf("first heartbeat after Reset: seq=%d boot=%016x, want seq=1 boot=%016x", b.seq, b.boot, boot2)
	}
	r, err := con2.WaitRecord(ctx, hungAt.Seq+1)
	if err != nil || r.Boot != boot2 {
		t.Fatalf("counter after Reset: %+v, %v", r, err)
	}
	t.Logf("after Reset: first heartbeat in %s, first record in %s", b.at.Sub(resetAt).Round(time.Millisecond), r.At.Sub(resetAt).Round(time.Millisecond))
	if info, err := m2.Info(ctx); err != nil || info.State != hypervisor.StateRunning {
		t.Fatalf("Info after Reset: %+v, %v", info, err)
	}

	// Migration: the channel is part of the layout.
	respec := func(agent bool) hypervisor.Spec {
		s := spec
		s.RunDir, s.Agent = shortDir(t, "vm"), agent
		return s
	}
	plain, uriPlain := startIncoming(t, ctx, d2, respec(false), hypervisor.MigrateOptions{})
	if _, err := m2.Migrate(ctx, uriPlain, hypervisor.MigrateOptions{}, nil); err == nil || !strings.Contains(err.Error(), "layout") {
		t.Fatalf("migration to a destination without the agent channel: %v", err)
	}
	if _, err := plain.Agent(ctx); !errors.Is(err, hypervisor.ErrNoAgent) {
		t.Fatalf("Agent of a machine without the channel: %v", err)
	}
	if err := plain.Reset(ctx); err == nil {
		t.Fatal("Reset of a machine waiting for a migration succeeded")
	}
	if err := plain.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	dst, uri := startIncoming(t, ctx, d2, respec(true), hypervisor.MigrateOptions{})
	conDst, _ := watch(t, ctx, dst)
	agDst, err := dst.Agent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	beatsDst := readBeats(t, agDst)
	if _, err := m2.Migrate(ctx, uri, hypervisor.MigrateOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := nextBeat(ctx, beatsDst, func(b beat) bool { return b.boot == boot2 }); err != nil {
		t.Fatalf("no heartbeat from the destination: %v", err)
	}
	if err := m2.Reset(ctx); err == nil {
		t.Fatal("Reset of the migrated-away source succeeded")
	}
	lastSrc, _ := con2.LastRecord()
	if _, err := conDst.WaitRecord(ctx, lastSrc.Seq+10); err != nil {
		t.Fatalf("counter did not go on at the destination: %v", err)
	}
	if err := m2.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dst.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	<-conDst.Done()

	// Continuity from the found machine's console on (what the guest printed while no console was connected,
	// around the Find, is lost); the disk holds every record announced, the first console's too.
	recs, err := testguest.Records(testguest.Join(con2, conDst))
	if err != nil {
		t.Fatal(err)
	}
	cont, err := testguest.CheckContinuity(recs)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("console: records %d..%d across a Find, a hang, a Reset and a migration; longest gap %s after record %d",
		cont.First, cont.Last, cont.MaxHostGap.Round(time.Millisecond), cont.MaxHostGapAfter)
	verifyDisk(t, img, append(recs1, recs...))
}

// TestAgentArgs: the agent channel adds its chardev (in the run directory, like the console's), a virtio-serial
// controller and the named port, and moves nothing else: the root ports and the devices on them are the same
// with and without it.
func TestAgentArgs(t *testing.T) {
	spec := hypervisor.Spec{ID: "vm1", VCPUs: 1, Memory: 64 * mib, RunDir: "/run/vms/vm,1",
		Disks: []hypervisor.Disk{{ID: "root", NBDSocket: "/run/nbd.sock", Export: "v", BootIndex: 1}}}
	p := runPaths(spec.RunDir)
	la := launchArgs{accel: "tcg", cpu: "max", ports: 4}
	without := buildArgs(spec, p, la)
	spec.Agent = true
	with := buildArgs(spec, p, la)
	joined := strings.Join(with, " ")
	for _, want := range []string{
		"-chardev socket,id=agent0,path=/run/vms/vm,,1/agent.sock,server=on,wait=off",
		`"driver":"virtio-serial-pci"`,
		`"chardev":"agent0"`, `"name":"org.basalt.agent.0"`, `"driver":"virtserialport"`,
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("args lack %q:\n%s", want, joined)
		}
	}
	if strings.Contains(strings.Join(without, " "), "agent") {
		t.Errorf("a machine without Spec.Agent has an agent channel: %s", strings.Join(without, " "))
	}
	var added []string
	i := 0
	for _, a := range with {
		if i < len(without) && a == without[i] {
			i++
			continue
		}
		added = append(added, a)
	}
	if i != len(without) || len(added) != 6 {
		t.Errorf("the agent channel changed other arguments; added %q", added)
	}
}
