// Package scenario holds the chaos suite's scenarios and the randomized rounds: each starts a chaos cluster
// (chaos/cluster), runs test-guest VMs on it, injects a fault at T0, follows what the cluster does about it
// (failure → detected → fenced → restarted → guest beating), restores the fault, and runs the invariant
// checkers (chaos/check) over what it observed. The outcome is a Report that prints as a timeline with offsets
// from T0, the bars with their figures, and each checker's verdict. The Go tests in chaos/ and the
// basalt-chaos runner (`make chaos`) both run scenarios through this package.
package scenario

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/chaos/cluster"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/computed/testguest/record"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Guest options: a record every 50 ms (the resolution of "beating"), on a 16 MiB disk (4096 slots: 200 s of
// history before the ring wraps, and a boot-time scan the agent does in well under a second).
const (
	guestInterval = "50ms"
	diskSize      = 16 << 20
	guestMemory   = 128 << 20
)

// Env is a running cluster with the test guest, for one scenario or a series of rounds.
type Env struct {
	C     *cluster.Cluster
	Guest testguest.Guest
	Log   *slog.Logger
	// vms are the VMs the scenario created, by name.
	vms map[string]VMDef
}

// VMDef is a test-guest VM a scenario creates.
type VMDef struct {
	Name string
	// Host is the computed node to start it on.
	Host      string
	Priority  basaltv1.VMPriority
	Group     string
	Possible  []string
	Preferred []string
}

// Protected reports whether HA restarts the VM after its host fails.
func (d VMDef) Protected() bool { return d.Priority != basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START }

func (e *Env) spec(d VMDef) *basaltv1.VMSpec {
	return &basaltv1.VMSpec{
		Vcpus:    1,
		Memory:   &basaltv1.VMMemory{StartupBytes: guestMemory},
		Disks:    []*basaltv1.VMDisk{{Volume: d.Name, BootOrder: 1}},
		Firmware: basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL,
		Kernel:   e.Guest.Kernel, Initrd: e.Guest.Initrd, Cmdline: e.Guest.Cmdline("basalt.interval=" + guestInterval),
		Priority: d.Priority,
		Placement: &basaltv1.VMPlacement{PreferredHosts: d.Preferred, PossibleHosts: d.Possible,
			AntiAffinityGroup: d.Group},
		// Heartbeat monitoring as an operator would set it for protected VMs: the HA controller then starts a
		// priority tier once the tier before it has booted (docs/ha.md). The timeout is generous: the suite's
		// 2 cores are shared by up to nine TCG guests.
		Monitoring: &basaltv1.VMMonitoring{Heartbeat: true, TimeoutSeconds: 30},
	}
}

// CreateVMs creates each VM on a 3-replica volume of its own name, starts it on its host, and waits until
// every one runs and its guest beats there.
func (e *Env) CreateVMs(ctx context.Context, defs []VMDef) error {
	for _, d := range defs {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := e.C.Volumes.CreateVolume(cctx, &basaltv1.CreateVolumeRequest{Name: d.Name, SizeBytes: diskSize, Replicas: 3})
		if err == nil {
			_, err = e.C.VMs.CreateVM(cctx, &basaltv1.CreateVMRequest{Name: d.Name, Spec: e.spec(d)})
		}
		if err == nil {
			_, err = e.C.VMs.StartVM(cctx, &basaltv1.StartVMRequest{Name: d.Name, Host: d.Host})
		}
		cancel()
		if err != nil {
			return fmt.Errorf("create VM %s on %s: %w", d.Name, d.Host, err)
		}
		e.vms[d.Name] = d
	}
	for _, d := range defs {
		if err := e.WaitBeating(ctx, d.Name, d.Host, time.Time{}, 2*time.Minute); err != nil {
			return err
		}
	}
	// Let the guests write for a while: the fault then hits a disk with history and writes in flight.
	return sleep(ctx, runBeforeFault)
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runBeforeFault is how long the guests write before a fault; runAfter how long they write after recovering,
// before the checkers read their disks.
const (
	runBeforeFault = 3 * time.Second
	runAfter       = 2 * time.Second
)

// WaitBeating waits until VM vm runs on host and its guest announces a record there read after after.
func (e *Env) WaitBeating(ctx context.Context, vm, host string, after time.Time, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	_, err := e.C.Consoles.WaitRecord(ctx, vm, func(a check.Announced) bool { return a.Host == host && a.At.After(after) })
	if err != nil {
		st := e.describe(context.Background(), vm)
		return fmt.Errorf("VM %s: no guest record on %s within %s (%s)", vm, host, within, st)
	}
	return nil
}

// describe summarises a VM's record for an error message.
func (e *Env) describe(ctx context.Context, name string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	vm, err := e.C.VMs.GetVM(ctx, &basaltv1.GetVMRequest{Name: name})
	if err != nil {
		return fmt.Sprintf("GetVM: %v", err)
	}
	s := fmt.Sprintf("state %s on %s (status from %s", strings.TrimPrefix(vm.GetState().String(), "VM_STATE_"), vm.GetHost(), vm.GetStatus().GetHost())
	if le := vm.GetStatus().GetLastError(); le != "" {
		s += ", last error: " + le
	}
	s += ")"
	if f := vm.GetFailover(); f != nil {
		s += fmt.Sprintf("; failover from %s to %q, reason %q, error %q", f.GetFromHost(), f.GetToHost(), f.GetReason(), f.GetError())
	} else {
		s += "; no failover recorded (VM.failover unset)"
	}
	return s
}

// VMsOn returns the scenario's VMs that the cluster has assigned to host now.
func (e *Env) VMsOn(ctx context.Context, host string) ([]VMDef, error) {
	l, err := e.C.VMs.ListVMs(ctx, &basaltv1.ListVMsRequest{Host: host})
	if err != nil {
		return nil, fmt.Errorf("list the VMs of %s: %w", host, err)
	}
	var out []VMDef
	for _, vm := range l.GetVms() {
		if d, ok := e.vms[vm.GetName()]; ok && vm.GetDesiredState() == basaltv1.VMState_VM_STATE_RUNNING {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// boots returns the boot IDs VM vm has announced records from so far.
func (e *Env) boots(vm string) map[uint64]bool {
	out := map[uint64]bool{}
	for _, a := range e.C.Consoles.Records(vm) {
		out[a.Boot] = true
	}
	return out
}

// WaitFailover follows the VMs in defs, which were on host from when it failed at t0, until each protected one
// runs on another host with a new boot beating, or within passes. It returns each VM's move (whatever was
// reached) and an error naming the VMs that did not come back.
func (e *Env) WaitFailover(ctx context.Context, defs []VMDef, from string, t0 time.Time, old map[string]map[uint64]bool, within time.Duration) ([]*Move, error) {
	moves := map[string]*Move{}
	var order []*Move
	for _, d := range defs {
		m := &Move{VM: d.Name, Priority: d.Priority, From: from}
		moves[d.Name] = m
		order = append(order, m)
	}
	deadline := time.Now().Add(within)
	for {
		pending := 0
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		l, err := e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
		cancel()
		if err == nil {
			for _, vm := range l.GetVms() {
				m := moves[vm.GetName()]
				if m == nil {
					continue
				}
				e.follow(m, vm, t0, old[vm.GetName()])
			}
		}
		for _, d := range defs {
			if d.Protected() && moves[d.Name].Beating.IsZero() {
				pending++
			}
		}
		if pending == 0 {
			return order, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			var errs []error
			for _, d := range defs {
				if d.Protected() && moves[d.Name].Beating.IsZero() {
					errs = append(errs, fmt.Errorf("VM %s not beating on another host %s after the failure: %s",
						d.Name, fmtDur(time.Since(t0)), e.describe(context.Background(), d.Name)))
				}
			}
			return order, errors.Join(errs...)
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// follow updates m from the VM's record and its consoles.
func (e *Env) follow(m *Move, vm *basaltv1.VM, t0 time.Time, oldBoots map[uint64]bool) {
	// A failover recorded before t0 is an earlier round's.
	if f := vm.GetFailover(); f != nil && f.GetFromHost() == m.From && !ts(f.GetDetectedAt()).Before(t0) {
		m.Detected = ts(f.GetDetectedAt())
		m.Fenced = ts(f.GetFencedAt())
		m.Placed = ts(f.GetPlacedAt())
		m.Error = f.GetError()
		if f.GetToHost() != "" {
			m.To = f.GetToHost()
		}
	}
	if check.Running(vm) && vm.GetHost() != m.From {
		m.To = vm.GetHost()
		if m.Running.IsZero() {
			m.Running = time.Now()
			if st := vm.GetStatus().GetStartedAt(); st != nil && st.AsTime().After(t0) {
				m.Running = st.AsTime()
			}
		}
	}
	if m.To != "" && m.To != m.From && m.Booted.IsZero() {
		for _, l := range e.C.Consoles.Lines(m.VM) {
			if l.Host == m.To && l.At.After(t0) && strings.HasPrefix(l.Text, record.LinePrefix+"boot ") {
				m.Booted = l.At
				break
			}
		}
	}
	if m.To != "" && m.To != m.From && m.Beating.IsZero() {
		for _, a := range e.C.Consoles.Records(m.VM) {
			if a.Host == m.To && !oldBoots[a.Boot] && a.At.After(t0) {
				m.Beating = a.At
				break
			}
		}
	}
}

// ts converts an optional protobuf timestamp (nil: the zero time).
func ts(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// ReadDisk takes a checkpoint of volume, reads it over NBD through the first host whose blockd answers, and
// verifies the record ring on it. cut is when the checkpoint was requested: every record announced before it
// must be on the image.
func (e *Env) ReadDisk(ctx context.Context, volume string) (testguest.DiskSummary, time.Time, error) {
	name := fmt.Sprintf("chaos-%d", time.Now().UnixNano())
	cut := time.Now()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	_, err := e.C.Checkpoints.CreateCheckpoint(cctx, &basaltv1.CreateCheckpointRequest{Name: name, Volumes: []string{volume}})
	cancel()
	if err != nil {
		return testguest.DiskSummary{}, cut, fmt.Errorf("checkpoint volume %s: %w", volume, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := e.C.Checkpoints.DeleteCheckpoint(dctx, &basaltv1.DeleteCheckpointRequest{Volume: volume, Name: name}); err != nil {
			e.Log.Warn("delete the checker's checkpoint", "volume", volume, "checkpoint", name, "err", err)
		}
	}()
	var errs []error
	for _, h := range e.C.Hosts {
		img, err := readExport(ctx, "nbd://"+h.NBDAddr()+"/"+volume+"@"+name)
		if err != nil {
			errs = append(errs, fmt.Errorf("through %s: %w", h.Name, err))
			continue
		}
		sum, err := testguest.VerifyDisk(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			return sum, cut, fmt.Errorf("volume %s: %w", volume, err)
		}
		return sum, cut, nil
	}
	return testguest.DiskSummary{}, cut, fmt.Errorf("read checkpoint %s of %s: %w", name, volume, errors.Join(errs...))
}

// readExport reads a whole NBD export into memory.
func readExport(ctx context.Context, uri string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := nbdclient.Dial(ctx, uri)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	img := make([]byte, conn.Size())
	if err := conn.ReadAt(ctx, img, 0); err != nil {
		return nil, fmt.Errorf("read %s: %w", uri, err)
	}
	return img, nil
}

// Invariants runs every checker over the scenario's VMs and adds the results to r: at most one hypervisor
// process per VM (waiting up to settle for a woken or healed host's computed to stop what it must), and, per
// VM, no acknowledged write lost and no split brain on its disk and consoles; then the placement rules.
func (e *Env) Invariants(ctx context.Context, r *Report, settle time.Duration) {
	if err := sleep(ctx, runAfter); err != nil {
		r.check("invariants", err)
		return
	}
	var instErr error
	deadline := time.Now().Add(settle)
	for {
		instErr = e.instances()
		if instErr == nil || time.Now().After(deadline) || sleep(ctx, 200*time.Millisecond) != nil {
			break
		}
	}
	r.check("at most one hypervisor process per VM across all hosts", instErr)

	names := make([]string, 0, len(e.vms))
	for n := range e.vms {
		names = append(names, n)
	}
	slices.Sort(names)
	var lost, diskSB, conSB []error
	var summary []string
	for _, n := range names {
		sum, cut, err := e.ReadDisk(ctx, n)
		recs := e.C.Consoles.Records(n)
		if err != nil {
			lost = append(lost, fmt.Errorf("VM %s: %w", n, err))
		} else {
			lost = append(lost, check.LostWrites(n, sum, recs, cut))
			diskSB = append(diskSB, check.SplitBrainDisk(n, sum))
			summary = append(summary, fmt.Sprintf("%s %d..%d/%d boots", n, sum.First, sum.Last, len(sum.Boots)))
		}
		conSB = append(conSB, check.SplitBrainConsole(n, recs))
		if g := e.C.Consoles.Garbled(n); g > 0 {
			r.note("VM %s: %d console record lines cut by a killed hypervisor (not counted; the disk check covers them)", n, g)
		}
	}
	r.check("no acknowledged write lost (every announced record on the disk)", errors.Join(lost...))
	r.check("no split brain on the disks (each boot one contiguous run)", errors.Join(diskSB...))
	r.check("no split brain on the consoles (no record announced twice, each boot one run)", errors.Join(conSB...))
	if len(summary) > 0 {
		r.note("disks: %s", strings.Join(summary, ", "))
	}

	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	l, err := e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
	if err != nil {
		r.check("placement rules", fmt.Errorf("list VMs: %w", err))
		return
	}
	r.check("placement rules (possible hosts, anti-affinity)", check.Placement(l.GetVms(), e.upHosts(ctx)))
}

// instances checks the hypervisor processes of every host.
func (e *Env) instances() error {
	qs, err := e.C.QEMUs()
	if err != nil {
		return err
	}
	byVM := map[string][]check.Instance{}
	for vm, ps := range qs {
		for _, p := range ps {
			byVM[vm] = append(byVM[vm], check.Instance{Host: p.Host, PID: p.PID, Stopped: p.Stopped()})
		}
	}
	return check.Instances(byVM)
}

// upHosts counts the compute hosts that are up.
func (e *Env) upHosts(ctx context.Context) int {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	states, err := e.C.NodeStates(ctx)
	if err != nil {
		return len(e.C.Hosts)
	}
	n := 0
	for _, h := range e.C.Hosts {
		if states[h.ComputedID()] == basaltv1.NodeState_NODE_STATE_UP {
			n++
		}
	}
	return n
}

// WaitAllRunning waits until every VM of the scenario that should run runs and beats after after.
func (e *Env) WaitAllRunning(ctx context.Context, after time.Time, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		l, err := e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
		cancel()
		var pending []string
		if err != nil {
			pending = append(pending, "ListVMs: "+err.Error())
		} else {
			for _, vm := range l.GetVms() {
				if _, ours := e.vms[vm.GetName()]; !ours || vm.GetDesiredState() != basaltv1.VMState_VM_STATE_RUNNING {
					continue
				}
				last, ok := e.C.Consoles.Last(vm.GetName())
				if !check.Running(vm) || !ok || last.Host != vm.GetHost() || !last.At.After(after) {
					pending = append(pending, vm.GetName())
				}
			}
		}
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			var ds []string
			for _, n := range pending {
				ds = append(ds, n+": "+e.describe(ctx, n))
			}
			return fmt.Errorf("not running and beating %s after recovery: %s", within, strings.Join(ds, "; "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// describeHost names what a fault on a host hits: its daemons and hypervisors.
func describeHost(h *cluster.Host) string {
	ps, err := h.Procs()
	if err != nil {
		return h.Name
	}
	var qemus []string
	for _, p := range ps {
		if vm, ok := p.QEMUGuest(); ok {
			qemus = append(qemus, fmt.Sprintf("QEMU of %s (pid %d)", vm, p.PID))
		}
	}
	s := fmt.Sprintf("%s (%s pid %d, %s pid %d", h.Name, h.Blockd.ID, h.Blockd.PID(), h.Computed.ID, h.Computed.PID())
	if len(qemus) > 0 {
		s += ", " + strings.Join(qemus, ", ")
	}
	return s + ")"
}
