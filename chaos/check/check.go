// Package check holds the chaos suite's invariant checkers. Each takes what the harness observed — the records
// a guest announced on its consoles, the record ring read back from its disk, the hypervisor processes found on
// every host, the VM declarations — and returns a precise error naming the VM, the record and the hosts when an
// invariant does not hold:
//
//   - no acknowledged write lost: every record a guest announced (the agent prints a record only once its
//     O_DSYNC write returned) is on its disk, or was overwritten by a later record of the ring;
//   - no split brain: ordered by sequence number, the records on the disk and on the consoles show each boot
//     in one contiguous run (an older boot never writes after a newer one started), no sequence number is
//     announced by two boots, and at most one hypervisor process runs a VM across all hosts;
//   - placement: anti-affinity groups spread over distinct hosts when there is room, possible hosts respected,
//     NO_AUTO_START VMs not restarted by HA, restarts in priority order.
//
// It is pure (no I/O) so that the checkers themselves are tested on crafted data. It depends on the test
// guest's record format and the API types.
package check

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/testguest"
)

// Announced is a record a guest announced on its serial console, the host whose console log it was read from,
// and the time the harness read it (At: an upper bound of when the write was acknowledged).
type Announced struct {
	testguest.Rec
	Host string
}

// LostWrites checks that every record announced before cut is on the disk as announced: the same boot, time
// and CRC in its slot, unless the ring has overwritten it since (its sequence number is below the oldest record
// the disk holds). cut is when the disk image was taken (a checkpoint's creation); records announced later may
// legitimately be missing from it. The zero cut checks every record (the VM was stopped before the read).
func LostWrites(vm string, disk testguest.DiskSummary, announced []Announced, cut time.Time) error {
	for _, a := range announced {
		if !cut.IsZero() && !a.At.Before(cut) {
			continue
		}
		if err := disk.CheckAnnounced([]testguest.Rec{a.Rec}); err != nil {
			// Where and when it was announced tells which host's acknowledged write went missing.
			return fmt.Errorf("VM %s: acknowledged write lost: %w (announced by boot %016x%s at %s)",
				vm, err, a.Boot, on(a.Host), a.At.Format("15:04:05.000"))
		}
	}
	return nil
}

// run is a stretch of consecutive sequence numbers written by one boot.
type run struct {
	boot        uint64
	first, last uint64
	host        string
}

// interleaved returns an error if a boot appears in two runs: it wrote again after another boot had started
// writing, which only two live instances of one VM can do.
func interleaved(vm, where string, runs []run) error {
	seen := map[uint64]int{}
	for i, r := range runs {
		if j, ok := seen[r.boot]; ok && j != i-1 {
			// Which boot started in between: the newer instance the older one raced.
			other := runs[i-1]
			return fmt.Errorf("VM %s: split brain on the %s: boot %016x wrote records %d..%d%s after boot %016x had written records %d..%d%s",
				vm, where, r.boot, r.first, r.last, on(r.host), other.boot, other.first, other.last, on(other.host))
		}
		seen[r.boot] = i
	}
	return nil
}

func on(host string) string {
	if host == "" {
		return ""
	}
	return " (on " + host + ")"
}

// runs groups records sorted by sequence number into runs of one boot.
func runs[T any](items []T, seq func(T) uint64, boot func(T) uint64, host func(T) string) []run {
	var out []run
	for _, it := range items {
		s, b := seq(it), boot(it)
		if n := len(out); n > 0 && out[n-1].boot == b {
			out[n-1].last = s
			continue
		}
		out = append(out, run{boot: b, first: s, last: s, host: host(it)})
	}
	return out
}

// SplitBrainDisk checks the ring read from a VM's disk: ordered by sequence number, each boot's records form
// one contiguous run.
func SplitBrainDisk(vm string, disk testguest.DiskSummary) error {
	seqs := make([]uint64, 0, len(disk.Records))
	for s := range disk.Records {
		seqs = append(seqs, s)
	}
	slices.Sort(seqs)
	rs := runs(seqs, func(s uint64) uint64 { return s }, func(s uint64) uint64 { return disk.Records[s].Boot },
		func(uint64) string { return "" })
	return interleaved(vm, "disk", rs)
}

// SplitBrainConsole checks the records a VM announced on all its consoles: no sequence number is announced by
// two different boots (or twice with different contents), and ordered by sequence number each boot's records
// form one contiguous run.
func SplitBrainConsole(vm string, announced []Announced) error {
	bySeq := map[uint64]Announced{}
	for _, a := range announced {
		prev, ok := bySeq[a.Seq]
		if !ok {
			bySeq[a.Seq] = a
			continue
		}
		if prev.Boot != a.Boot || prev.CRC != a.CRC {
			return fmt.Errorf("VM %s: split brain: record %d announced twice, by boot %016x%s at %s and by boot %016x%s at %s",
				vm, a.Seq, prev.Boot, on(prev.Host), prev.At.Format("15:04:05.000"), a.Boot, on(a.Host), a.At.Format("15:04:05.000"))
		}
	}
	uniq := make([]Announced, 0, len(bySeq))
	for _, a := range bySeq {
		uniq = append(uniq, a)
	}
	sort.Slice(uniq, func(i, j int) bool { return uniq[i].Seq < uniq[j].Seq })
	rs := runs(uniq, func(a Announced) uint64 { return a.Seq }, func(a Announced) uint64 { return a.Boot },
		func(a Announced) string { return a.Host })
	return interleaved(vm, "consoles", rs)
}

// Instance is a hypervisor process found on a host.
type Instance struct {
	Host string
	PID  int
	// Stopped: the process is frozen (SIGSTOP), as on a host that has not woken up yet.
	Stopped bool
}

// Instances checks that no VM has more than one hypervisor process across all hosts (frozen ones count: a
// frozen host may wake up at any time).
func Instances(byVM map[string][]Instance) error {
	var errs []error
	names := make([]string, 0, len(byVM))
	for n := range byVM {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, vm := range names {
		is := byVM[vm]
		if len(is) <= 1 {
			continue
		}
		var where []string
		for _, i := range is {
			s := fmt.Sprintf("%s pid %d", i.Host, i.PID)
			if i.Stopped {
				s += " (frozen)"
			}
			where = append(where, s)
		}
		errs = append(errs, fmt.Errorf("VM %s: split brain: %d hypervisor processes: %s", vm, len(is), strings.Join(where, ", ")))
	}
	return errors.Join(errs...)
}

// Running reports whether a VM runs where it is declared: its host's status says running on its assigned host.
func Running(vm *basaltv1.VM) bool {
	return vm.GetState() == basaltv1.VMState_VM_STATE_RUNNING && vm.GetStatus().GetHost() == vm.GetHost() && vm.GetHost() != ""
}

// Placement checks the placement rules over the VMs that run: a VM runs only on one of its possible hosts,
// and the running members of an anti-affinity group sit on distinct hosts when there are at least as many up
// hosts as members, or no host holds more than its share (rounded up) otherwise. up is the number of compute
// hosts that are up.
func Placement(vms []*basaltv1.VM, up int) error {
	var errs []error
	groups := map[string][]*basaltv1.VM{}
	for _, vm := range vms {
		if !Running(vm) {
			continue
		}
		p := vm.GetSpec().GetPlacement()
		if ph := p.GetPossibleHosts(); len(ph) > 0 && !slices.Contains(ph, vm.GetHost()) {
			errs = append(errs, fmt.Errorf("VM %s runs on %s, not one of its possible hosts %v", vm.GetName(), vm.GetHost(), ph))
		}
		if g := p.GetAntiAffinityGroup(); g != "" {
			groups[g] = append(groups[g], vm)
		}
	}
	gnames := make([]string, 0, len(groups))
	for g := range groups {
		gnames = append(gnames, g)
	}
	slices.Sort(gnames)
	for _, g := range gnames {
		members := groups[g]
		perHost := map[string][]string{}
		for _, vm := range members {
			perHost[vm.GetHost()] = append(perHost[vm.GetHost()], vm.GetName())
		}
		limit := 1
		if up > 0 && len(members) > up {
			limit = (len(members) + up - 1) / up
		}
		hosts := make([]string, 0, len(perHost))
		for h := range perHost {
			hosts = append(hosts, h)
		}
		slices.Sort(hosts)
		for _, h := range hosts {
			if n := perHost[h]; len(n) > limit {
				errs = append(errs, fmt.Errorf("anti-affinity group %s: %s runs %d of its %d members (%s) with %d hosts up; at most %d belong there",
					g, h, len(n), len(members), strings.Join(n, ", "), up, limit))
			}
		}
	}
	return errors.Join(errs...)
}

// NotRestarted checks that VMs whose priority is NO_AUTO_START and whose host failed were left stopped: not
// running or starting, and not declared running on another host.
func NotRestarted(vms []*basaltv1.VM, failedHost string) error {
	var errs []error
	for _, vm := range vms {
		if vm.GetSpec().GetPriority() != basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START {
			continue
		}
		moved := vm.GetHost() != failedHost && vm.GetHost() != "" && vm.GetDesiredState() == basaltv1.VMState_VM_STATE_RUNNING
		st := vm.GetState()
		if moved || st == basaltv1.VMState_VM_STATE_RUNNING || st == basaltv1.VMState_VM_STATE_STARTING {
			errs = append(errs, fmt.Errorf("VM %s (NO_AUTO_START, was on failed host %s) was restarted: host %s, state %s",
				vm.GetName(), failedHost, vm.GetHost(), strings.TrimPrefix(st.String(), "VM_STATE_")))
		}
	}
	return errors.Join(errs...)
}

// Restart is when HA placed a VM on its new host.
type Restart struct {
	VM       string
	Priority basaltv1.VMPriority
	Placed   time.Time
}

// rank orders priorities for HA: high first; unspecified counts as medium.
func rank(p basaltv1.VMPriority) int {
	switch p {
	case basaltv1.VMPriority_VM_PRIORITY_HIGH:
		return 0
	case basaltv1.VMPriority_VM_PRIORITY_MEDIUM, basaltv1.VMPriority_VM_PRIORITY_UNSPECIFIED:
		return 1
	case basaltv1.VMPriority_VM_PRIORITY_LOW:
		return 2
	}
	return 3
}

// PriorityName is a priority as the timeline prints it.
func PriorityName(p basaltv1.VMPriority) string {
	switch rank(p) {
	case 0:
		return "high"
	case 1:
		return "medium"
	case 2:
		return "low"
	}
	return "no-auto"
}

// PriorityOrder checks that every VM was placed no later than any VM of a lower priority.
func PriorityOrder(rs []Restart) error {
	sorted := slices.Clone(rs)
	slices.SortFunc(sorted, func(a, b Restart) int { return cmp.Compare(rank(a.Priority), rank(b.Priority)) })
	var errs []error
	for i, hi := range sorted {
		for _, lo := range sorted[i+1:] {
			if rank(lo.Priority) > rank(hi.Priority) && hi.Placed.After(lo.Placed) {
				errs = append(errs, fmt.Errorf("priority order: %s (%s) was placed %s after %s (%s)",
					hi.VM, PriorityName(hi.Priority), hi.Placed.Sub(lo.Placed).Round(time.Millisecond), lo.VM, PriorityName(lo.Priority)))
			}
		}
	}
	return errors.Join(errs...)
}
