package rolling

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

// Host is one host of the plan, as it was when the plan was made.
type Host struct {
	// Node is the computed's node ID; Hostname the machine's name it publishes.
	Node, Hostname string
	// VMs are the VMs assigned to the host that should run.
	VMs []string
	// Maintenance: the host was already in maintenance (an earlier drain, or a stopped rolling update).
	Maintenance bool
}

// Select picks the hosts to update, in order, from a ListHosts answer: every computed host sorted by node ID,
// or only (in the order given), less exclude. Every host named must exist, none twice, and every host picked
// must be up: a down host cannot be drained.
func Select(hosts []*basaltv1.ComputeHostStatus, only, exclude []string) ([]Host, error) {
	byNode := map[string]*basaltv1.ComputeHostStatus{}
	var all []string
	for _, h := range hosts {
		byNode[h.GetHost().GetNode()] = h
		all = append(all, h.GetHost().GetNode())
	}
	sort.Strings(all)
	known := func(flag, n string) error {
		if byNode[n] == nil {
			return fmt.Errorf("%s: %q is not a computed host (hosts: %s)", flag, n, listOr(all, "none"))
		}
		return nil
	}
	skip := map[string]bool{}
	for _, n := range exclude {
		if err := known("--exclude", n); err != nil {
			return nil, err
		}
		skip[n] = true
	}
	order := all
	if len(only) > 0 {
		seen := map[string]bool{}
		for _, n := range only {
			if err := known("--hosts", n); err != nil {
				return nil, err
			}
			if seen[n] {
				return nil, fmt.Errorf("--hosts: %q is named twice", n)
			}
			seen[n] = true
		}
		order = only
	}
	var out []Host
	for _, n := range order {
		if skip[n] {
			continue
		}
		h := byNode[n]
		if !h.GetUp() {
			return nil, fmt.Errorf("host %s is down: it cannot be drained (bring it up, or leave it out with --exclude %s)", n, n)
		}
		out = append(out, Host{Node: n, Hostname: h.GetHost().GetHostname(), VMs: h.GetVms(), Maintenance: h.GetMaintenance().GetDraining()})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no host to update (hosts: %s)", listOr(all, "none"))
	}
	return out, nil
}

// FormatPlan writes what Run would do with plan and opts (--dry-run).
func FormatPlan(w io.Writer, plan []Host, opts Options) {
	opts = opts.withDefaults()
	fmt.Fprintf(w, "Rolling update of %d compute host(s), one at a time, in this order:\n", len(plan))
	for i, h := range plan {
		note := ""
		if h.Maintenance {
			note = "; already in maintenance"
		}
		fmt.Fprintf(w, "  %d. %s (machine %s): VMs to move away and back: %s%s\n", i+1, h.Node, orDash(h.Hostname), listOr(h.VMs, "none"), note)
	}
	how := fmt.Sprintf("%d at a time", opts.Parallel)
	if opts.Compress {
		how += ", compressed"
	}
	if opts.BandwidthBytesPerSecond > 0 {
		how += fmt.Sprintf(", at most %d bytes/s each", opts.BandwidthBytesPerSecond)
	}
	fmt.Fprintf(w, "For each host:\n")
	fmt.Fprintf(w, "  %-8s live-migrate its VMs to other hosts (%s); at most %s\n", StepDrain, how, opts.DrainTimeout)
	fmt.Fprintf(w, "  %-8s run on this machine: /bin/sh -c %s\n", StepUpdate, shellQuote(opts.Command))
	fmt.Fprintf(w, "  %-8s   with BASALT_HOST=<node ID> and BASALT_HOSTNAME=<machine>; at most %s; a non-zero exit fails\n", "", opts.CommandTimeout)
	fmt.Fprintf(w, "  %-8s wait until its computed is up (and stays up for a lease period); at most %s\n", StepUp, opts.UpTimeout)
	fmt.Fprintf(w, "  %-8s end its maintenance\n", StepUndrain)
	fmt.Fprintf(w, "  %-8s migrate its VMs back (those that still exist and run); at most %s\n", StepReturn, opts.DrainTimeout)
	fmt.Fprintf(w, "The first failure stops the update and leaves that host drained.\n")
}

// HostResult is one host updated.
type HostResult struct {
	Host Host
	// Moved are the VMs that left the host and came back; NotReturned those that left and were not moved
	// back, each with the reason ("web3: stopped").
	Moved, NotReturned []string
	// Restarted: computed came back with a new lease (the update command restarted it).
	Restarted bool
	// Drain is the drain's time; Update the command's plus the wait for computed; Return the undrain's plus
	// the migrations back.
	Drain, Update, Return time.Duration
}

// Report is what Run did.
type Report struct {
	Plan []Host
	Done []HostResult
}

// FormatSummary writes one line per host updated.
func FormatSummary(w io.Writer, rep Report) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tVMS MOVED\tDRAIN\tUPDATE\tRETURN\tNOTES")
	for _, r := range rep.Done {
		var notes []string
		if r.Restarted {
			notes = append(notes, "computed restarted")
		}
		if len(r.NotReturned) > 0 {
			notes = append(notes, "not moved back: "+strings.Join(r.NotReturned, ", "))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Host.Node, listOr(r.Moved, "-"), roundDuration(r.Drain),
			roundDuration(r.Update), roundDuration(r.Return), orDash(strings.Join(notes, "; ")))
	}
	return tw.Flush()
}

// StepError is a rolling update that stopped: at which host and step, why, and what it left.
type StepError struct {
	Host string
	Step Step
	Err  error
	// Interrupted: the context ended (Ctrl-C), rather than the step failing.
	Interrupted bool
	// Done are the hosts updated before; NotStarted those not reached, untouched.
	Done, NotStarted []string
	// State describes the host and its VMs as they were left, one line each; Undo are the commands that put
	// them back.
	State, Undo []string
}

func (e *StepError) Error() string {
	if e.Interrupted {
		return fmt.Sprintf("rolling update interrupted at host %s, step %s: %v", e.Host, e.Step, e.Err)
	}
	return fmt.Sprintf("rolling update failed at host %s, step %s: %v", e.Host, e.Step, e.Err)
}

func (e *StepError) Unwrap() error { return e.Err }

// FormatFailure writes what a stopped update left and how to undo it.
func FormatFailure(w io.Writer, e *StepError) {
	verb := "failed"
	if e.Interrupted {
		verb = "was interrupted"
	}
	fmt.Fprintf(w, "The rolling update %s at host %s, step %s. Hosts updated: %s; not started (untouched): %s.\n",
		verb, e.Host, e.Step, listOr(e.Done, "none"), listOr(e.NotStarted, "none"))
	fmt.Fprintln(w, "Left as it is:")
	for _, l := range e.State {
		fmt.Fprintf(w, "  %s\n", l)
	}
	if len(e.Undo) > 0 {
		fmt.Fprintln(w, "To undo:")
		for _, l := range e.Undo {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
}

// leftState describes, from a ListHosts and a ListVMs answer, the host an update stopped at and the VMs it
// held (recorded), and lists the commands that restore them: end the maintenance, then move the VMs back.
func leftState(host string, recorded []string, hosts []*basaltv1.ComputeHostStatus, vms []*basaltv1.VM) (state, undo []string) {
	h := findHost(hosts, host)
	if h == nil {
		return []string{host + ": no longer a computed host"}, nil
	}
	words := "up"
	if !h.GetUp() {
		words = "down"
	}
	if h.GetMaintenance().GetDraining() {
		words += ", in maintenance (drained: no VM is placed there)"
		undo = append(undo, "basalt host undrain "+host)
	} else {
		words += ", not in maintenance"
	}
	state = append(state, fmt.Sprintf("%s: %s, holds %s", host, words, listOr(h.GetVms(), "no VMs")))
	if len(h.GetMigrating()) > 0 {
		state = append(state, fmt.Sprintf("%s: still migrating away: %s", host, strings.Join(h.GetMigrating(), ", ")))
	}
	byName := vmsByName(vms)
	for _, n := range recorded {
		vm := byName[n]
		switch {
		case vm == nil:
			state = append(state, fmt.Sprintf("VM %s (was on %s): deleted", n, host))
		case vm.GetMigration() != nil:
			m := vm.GetMigration()
			state = append(state, fmt.Sprintf("VM %s (was on %s): migrating %s -> %s", n, host, m.GetSource(), m.GetTarget()))
		case vm.GetHost() == host:
			state = append(state, fmt.Sprintf("VM %s: %s on %s", n, stateWord(vm.GetState()), host))
		default:
			state = append(state, fmt.Sprintf("VM %s (was on %s): %s on %s", n, host, stateWord(vm.GetState()), vm.GetHost()))
			if movable(vm) {
				undo = append(undo, fmt.Sprintf("basalt vm migrate %s --to %s", n, host))
			}
		}
	}
	return state, undo
}

// movable reports whether MigrateVM would take vm: it runs (or is paused) and is not moving already.
func movable(vm *basaltv1.VM) bool {
	s := vm.GetState()
	return vm.GetMigration() == nil && vm.GetDesiredState() != basaltv1.VMState_VM_STATE_STOPPED &&
		(s == basaltv1.VMState_VM_STATE_RUNNING || s == basaltv1.VMState_VM_STATE_PAUSED)
}

// progressLine is one VM's migration as a progress line: where it goes and how far it is (queued,
// preparing, active, completed, failed or cancelled, as its source host reports), without byte counts so
// that the line changes only when the migration's state does.
func progressLine(vm *basaltv1.VM, id string) string {
	p := vm.GetStatus().GetMigration()
	if p.GetId() != id {
		// Requested, not picked up by its source host yet.
		m := vm.GetMigration()
		return fmt.Sprintf("%s %s -> %s: requested", vm.GetName(), m.GetSource(), m.GetTarget())
	}
	s := fmt.Sprintf("%s %s -> %s: %s", vm.GetName(), p.GetSource(), p.GetTarget(), p.GetStatus())
	if p.GetStatus() == "completed" {
		s += fmt.Sprintf(" (downtime %d ms)", p.GetDowntimeMs())
	}
	if p.GetError() != "" {
		s += ": " + p.GetError()
	}
	return s
}

func stateWord(s basaltv1.VMState) string {
	if s == basaltv1.VMState_VM_STATE_UNSPECIFIED {
		return "unknown"
	}
	return strings.ToLower(strings.TrimPrefix(s.String(), "VM_STATE_"))
}

func listOr(l []string, none string) string {
	if len(l) == 0 {
		return none
	}
	return strings.Join(l, ", ")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func roundDuration(d time.Duration) string {
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// shellQuote quotes s for a POSIX shell, so the plan shows a line that could be pasted.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
