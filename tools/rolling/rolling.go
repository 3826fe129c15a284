package rolling

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

// Step is one stage of a host's update; they run in the order of Steps.
type Step string

const (
	StepRecord  Step = "record"  // note the VMs on the host
	StepDrain   Step = "drain"   // maintenance, and live-migrate them away
	StepUpdate  Step = "update"  // run the update command
	StepUp      Step = "wait-up" // wait until the host's computed is up again
	StepUndrain Step = "undrain" // end the maintenance
	StepReturn  Step = "return"  // migrate the VMs back
)

// Steps is every step in order.
var Steps = []Step{StepRecord, StepDrain, StepUpdate, StepUp, StepUndrain, StepReturn}

// Defaults of Options' zero fields.
const (
	DefaultParallel       = 2
	DefaultDrainTimeout   = 10 * time.Minute
	DefaultCommandTimeout = 30 * time.Minute
	DefaultUpTimeout      = 5 * time.Minute
	DefaultCallTimeout    = 10 * time.Second
	DefaultPoll           = 500 * time.Millisecond
	// stallAfter is how long a drain may show VMs left on the host and none migrating before it is declared
	// stuck (a VM whose move failed without a report, or that was put back).
	stallAfter = 15 * time.Second
)

// Options say what to update and how. Zero durations take the defaults above.
type Options struct {
	// Command is the update command, run by Runner with /bin/sh -c (Exec).
	Command string
	// Hosts are the computed node IDs to update, in order; empty: every computed host, sorted by node ID.
	// Exclude leaves hosts out.
	Hosts, Exclude []string
	// The drain's migrations: how many at once, compressed, and each stream's limit (0: none). Compress and
	// the limit apply to the migrations back too.
	Parallel                uint32
	Compress                bool
	BandwidthBytesPerSecond uint64
	// DrainTimeout bounds the drain, and the migrations back; CommandTimeout the command; UpTimeout the wait
	// for computed; CallTimeout each API call.
	DrainTimeout, CommandTimeout, UpTimeout, CallTimeout time.Duration
	// Poll is how often the cluster is read while waiting.
	Poll time.Duration
	// DryRun prints the plan and changes nothing.
	DryRun bool
	// Runner runs Command; nil: Exec.
	Runner Runner
}

func (o Options) withDefaults() Options {
	if o.Parallel == 0 {
		o.Parallel = DefaultParallel
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.DrainTimeout, DefaultDrainTimeout)
	def(&o.CommandTimeout, DefaultCommandTimeout)
	def(&o.UpTimeout, DefaultUpTimeout)
	def(&o.CallTimeout, DefaultCallTimeout)
	def(&o.Poll, DefaultPoll)
	if o.Runner == nil {
		o.Runner = Exec
	}
	return o
}

// Run updates the hosts opts selects, one at a time, writing progress to out. It returns what it did; on the
// first failure, or when ctx ends, it stops and returns a *StepError that says where, why, and what it left
// (the host it stopped at stays drained). An error of another type means nothing was changed.
func Run(ctx context.Context, vms VMAPI, nodes NodeAPI, opts Options, out io.Writer) (Report, error) {
	opts = opts.withDefaults()
	if strings.TrimSpace(opts.Command) == "" {
		return Report{}, errors.New("no update command given")
	}
	r := &run{vms: vms, nodes: nodes, opts: opts, out: out}
	hosts, err := r.listHosts(ctx)
	if err != nil {
		return Report{}, fmt.Errorf("list the compute hosts: %w", err)
	}
	plan, err := Select(hosts.GetHosts(), opts.Hosts, opts.Exclude)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Plan: plan}
	if opts.DryRun {
		FormatPlan(out, plan, opts)
		return rep, nil
	}
	for i, h := range plan {
		fmt.Fprintf(out, "== %s (%d of %d)\n", h.Node, i+1, len(plan))
		res, err := r.host(ctx, h)
		if err != nil {
			var se *StepError
			if !errors.As(err, &se) {
				se = &StepError{Host: h.Node, Err: err}
			}
			for _, d := range rep.Done {
				se.Done = append(se.Done, d.Host.Node)
			}
			for _, n := range plan[i+1:] {
				se.NotStarted = append(se.NotStarted, n.Node)
			}
			r.describe(ctx, se, res.Host.VMs)
			return rep, se
		}
		rep.Done = append(rep.Done, res)
	}
	return rep, nil
}

type run struct {
	vms   VMAPI
	nodes NodeAPI
	opts  Options
	out   io.Writer
}

func (r *run) logf(h Host, format string, args ...any) {
	fmt.Fprintf(r.out, "%s: %s\n", h.Node, fmt.Sprintf(format, args...))
}

// host updates one host. The returned result's Host.VMs are the VMs recorded, also on failure.
func (r *run) host(ctx context.Context, h Host) (HostResult, error) {
	res := HostResult{Host: h}
	step := func(s Step, fn func() error) error {
		if err := ctx.Err(); err != nil {
			return &StepError{Host: h.Node, Step: s, Err: fmt.Errorf("stopped before the step began: %w", context.Cause(ctx)), Interrupted: true}
		}
		if err := fn(); err != nil {
			return &StepError{Host: h.Node, Step: s, Err: err, Interrupted: ctx.Err() != nil}
		}
		return nil
	}
	var lease *basaltv1.Liveness
	var start time.Time
	steps := []struct {
		s  Step
		fn func() error
	}{
		{StepRecord, func() (err error) {
			res.Host, err = r.record(ctx, h)
			return err
		}},
		{StepDrain, func() (err error) {
			start = time.Now()
			ids, err := r.drain(ctx, &res.Host)
			if err == nil {
				err = r.waitDrained(ctx, res.Host, ids)
			}
			res.Drain = time.Since(start)
			return err
		}},
		{StepUpdate, func() (err error) {
			// The lease before the command, to tell afterwards whether computed restarted.
			if lease, err = r.liveness(ctx, h.Node); err != nil {
				return err
			}
			start = time.Now()
			return r.update(ctx, res.Host)
		}},
		{StepUp, func() (err error) {
			res.Restarted, err = r.waitUp(ctx, h, lease)
			res.Update = time.Since(start)
			return err
		}},
		{StepUndrain, func() error {
			start = time.Now()
			if _, err := r.undrain(ctx, h.Node); err != nil {
				return fmt.Errorf("end the maintenance: %w", err)
			}
			r.logf(h, "out of maintenance")
			return nil
		}},
		{StepReturn, func() (err error) {
			res.Moved, res.NotReturned, err = r.moveBack(ctx, res.Host)
			res.Return = time.Since(start)
			return err
		}},
	}
	for _, st := range steps {
		if err := step(st.s, st.fn); err != nil {
			return res, err
		}
	}
	r.logf(h, "updated (drain %s, update %s, return %s)", roundDuration(res.Drain), roundDuration(res.Update), roundDuration(res.Return))
	return res, nil
}

// call runs one API call with the call timeout, turning its error into a sentence.
func call[T any](ctx context.Context, r *run, fn func(context.Context) (T, error)) (T, error) {
	cctx, cancel := context.WithTimeout(ctx, r.opts.CallTimeout)
	defer cancel()
	v, err := fn(cctx)
	if err != nil {
		if ctx.Err() != nil {
			return v, context.Cause(ctx)
		}
		return v, apiError(err)
	}
	return v, nil
}

func (r *run) listHosts(ctx context.Context) (*basaltv1.ListHostsResponse, error) {
	return call(ctx, r, func(ctx context.Context) (*basaltv1.ListHostsResponse, error) {
		return r.vms.ListHosts(ctx, &basaltv1.ListHostsRequest{})
	})
}

func (r *run) listVMs(ctx context.Context) (*basaltv1.ListVMsResponse, error) {
	return call(ctx, r, func(ctx context.Context) (*basaltv1.ListVMsResponse, error) {
		return r.vms.ListVMs(ctx, &basaltv1.ListVMsRequest{})
	})
}

func (r *run) undrain(ctx context.Context, host string) (*basaltv1.ComputeHostStatus, error) {
	return call(ctx, r, func(ctx context.Context) (*basaltv1.ComputeHostStatus, error) {
		return r.vms.UndrainHost(ctx, &basaltv1.UndrainHostRequest{Host: host})
	})
}

// liveness is the node's current lease, nil when it is down.
func (r *run) liveness(ctx context.Context, node string) (*basaltv1.Liveness, error) {
	n, err := call(ctx, r, func(ctx context.Context) (*basaltv1.NodeStatus, error) {
		return r.nodes.GetNode(ctx, &basaltv1.GetNodeRequest{Id: node})
	})
	if err != nil {
		return nil, fmt.Errorf("read node %s: %w", node, err)
	}
	if n.GetState() != basaltv1.NodeState_NODE_STATE_UP {
		return nil, nil
	}
	return n.GetLiveness(), nil
}

// record reads the host again (the plan may be minutes old) and notes the VMs it holds.
func (r *run) record(ctx context.Context, h Host) (Host, error) {
	hosts, err := r.listHosts(ctx)
	if err != nil {
		return h, fmt.Errorf("list the compute hosts: %w", err)
	}
	hs := findHost(hosts.GetHosts(), h.Node)
	if hs == nil {
		return h, fmt.Errorf("%s is no longer a computed host", h.Node)
	}
	if !hs.GetUp() {
		return h, fmt.Errorf("%s is down: it cannot be drained", h.Node)
	}
	h.Hostname, h.VMs, h.Maintenance = hs.GetHost().GetHostname(), hs.GetVms(), hs.GetMaintenance().GetDraining()
	r.logf(h, "VMs on it: %s", listOr(h.VMs, "none"))
	return h, nil
}

// drain puts the host in maintenance and requests its VMs' migrations. It returns the migration ID of each VM
// moving; VMs that were moving already, or that the drain found and the record had not, join h.VMs.
func (r *run) drain(ctx context.Context, h *Host) (map[string]string, error) {
	resp, err := call(ctx, r, func(ctx context.Context) (*basaltv1.DrainHostResponse, error) {
		return r.vms.DrainHost(ctx, &basaltv1.DrainHostRequest{Host: h.Node, Parallel: r.opts.Parallel,
			Compress: r.opts.Compress, BandwidthBytesPerSecond: r.opts.BandwidthBytesPerSecond})
	})
	if err != nil {
		return nil, fmt.Errorf("request the drain: %w", err)
	}
	ids := map[string]string{}
	var moves []string
	for _, vm := range resp.GetMoving() {
		ids[vm.GetName()] = vm.GetMigration().GetId()
		moves = append(moves, vm.GetName()+" -> "+vm.GetMigration().GetTarget())
	}
	for _, n := range append(resp.GetHost().GetVms(), resp.GetHost().GetMigrating()...) {
		if !slices.Contains(h.VMs, n) {
			h.VMs = append(h.VMs, n)
		}
	}
	if p := resp.GetProblems(); len(p) > 0 {
		return ids, fmt.Errorf("cannot move %s", strings.Join(p, "; "))
	}
	r.logf(*h, "draining, %d migration(s) at once: %s", r.opts.Parallel, listOr(moves, "nothing to move"))
	return ids, nil
}

// waitDrained waits until the host holds no VM, printing each migration's state as it changes; a
// migration that fails or is cancelled fails the drain at once.
func (r *run) waitDrained(ctx context.Context, h Host, ids map[string]string) error {
	shown := map[string]string{}
	var idleSince time.Time
	return r.wait(ctx, r.opts.DrainTimeout, func(ctx context.Context) (bool, string, error) {
		hosts, err := r.listHosts(ctx)
		if err != nil {
			return false, "", err
		}
		vms, err := r.listVMs(ctx)
		if err != nil {
			return false, "", err
		}
		hs := findHost(hosts.GetHosts(), h.Node)
		if hs == nil {
			return false, "", fmt.Errorf("%s is no longer a computed host", h.Node)
		}
		byName := vmsByName(vms.GetVms())
		var pending []string
		for _, n := range hs.GetVms() {
			vm := byName[n]
			if vm == nil {
				continue // deleted between the two reads
			}
			id := ids[n]
			if id == "" {
				id = vm.GetMigration().GetId()
			}
			line := progressLine(vm, id)
			if vm.GetMigration() == nil && vm.GetStatus().GetMigration().GetId() != id {
				line = fmt.Sprintf("%s: %s, not migrating", n, stateWord(vm.GetState()))
			}
			if shown[n] != line {
				r.logf(h, "%s", line)
				shown[n] = line
			}
			if p := vm.GetStatus().GetMigration(); id != "" && p.GetId() == id && (p.GetStatus() == "failed" || p.GetStatus() == "cancelled") {
				return false, "", fmt.Errorf("the migration of %s to %s %s: %s; it stays on %s", n, p.GetTarget(), p.GetStatus(), orDash(p.GetError()), h.Node)
			}
			pending = append(pending, line)
		}
		// VMs that left: report their last state once (completed, with the downtime).
		for _, n := range slices.Sorted(maps.Keys(ids)) {
			if vm := byName[n]; vm != nil && !slices.Contains(hs.GetVms(), n) {
				if line := progressLine(vm, ids[n]); shown[n] != line {
					r.logf(h, "%s", line)
					shown[n] = line
				}
			}
		}
		if len(hs.GetVms()) == 0 {
			r.logf(h, "drained")
			return true, "", nil
		}
		if len(hs.GetMigrating()) > 0 {
			idleSince = time.Time{}
		} else if idleSince.IsZero() {
			idleSince = time.Now()
		} else if time.Since(idleSince) > stallAfter {
			return false, "", fmt.Errorf("%s still holds %s, and nothing is migrating (see 'basalt vm inspect' for why)", h.Node, strings.Join(hs.GetVms(), ", "))
		}
		return false, fmt.Sprintf("%s still holds %s", h.Node, strings.Join(pending, "; ")), nil
	})
}

// update runs the command.
func (r *run) update(ctx context.Context, h Host) error {
	r.logf(h, "running the update command")
	cctx, cancel := context.WithTimeout(ctx, r.opts.CommandTimeout)
	defer cancel()
	start := time.Now()
	if err := r.opts.Runner(cctx, h, r.opts.Command, r.out); err != nil {
		if ctx.Err() == nil && cctx.Err() != nil {
			return fmt.Errorf("the update command did not finish within %s (--command-timeout); it was stopped", r.opts.CommandTimeout)
		}
		return fmt.Errorf("the update command failed: %w", err)
	}
	r.logf(h, "update command done in %s", roundDuration(time.Since(start)))
	return nil
}

// waitUp waits until the host's computed is up, and has held one lease for a lease period and a half: a
// command that killed computed and returned may leave its old lease looking alive until it expires. It
// reports whether computed came back with another lease than before (a restart).
func (r *run) waitUp(ctx context.Context, h Host, before *basaltv1.Liveness) (bool, error) {
	var lease *basaltv1.Liveness
	var since time.Time
	wasDown := false
	err := r.wait(ctx, r.opts.UpTimeout, func(ctx context.Context) (bool, string, error) {
		hosts, err := r.listHosts(ctx)
		if err != nil {
			return false, "", err
		}
		l, err := r.liveness(ctx, h.Node)
		if err != nil {
			return false, "", err
		}
		if !findHost(hosts.GetHosts(), h.Node).GetUp() || l == nil {
			if !wasDown {
				r.logf(h, "computed is down; waiting for it")
				wasDown = true
			}
			lease = nil
			return false, "its computed is down", nil
		}
		if lease.GetLeaseId() != l.GetLeaseId() {
			lease, since = l, time.Now()
		}
		settle := time.Duration(l.GetLeaseTtlSeconds()) * time.Second * 3 / 2
		if time.Since(since) < settle {
			return false, "its computed's lease is new", nil
		}
		return true, "", nil
	})
	if err != nil {
		return false, err
	}
	restarted := lease.GetLeaseId() != before.GetLeaseId()
	if restarted {
		r.logf(h, "computed is up again (restarted: pid %d -> %d)", before.GetPid(), lease.GetPid())
	} else {
		r.logf(h, "computed is up (same process, pid %d)", lease.GetPid())
	}
	return restarted, nil
}

// moveBack migrates back every VM recorded that still exists, should run, runs (or is paused) and is
// elsewhere, and waits for those migrations. It returns the VMs moved back, and the others that left the
// host with why they were not moved.
func (r *run) moveBack(ctx context.Context, h Host) (moved, skipped []string, err error) {
	vms, err := r.listVMs(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("list the VMs: %w", err)
	}
	byName := vmsByName(vms.GetVms())
	ids := map[string]string{}
	var order []string
	for _, n := range h.VMs {
		vm := byName[n]
		why := ""
		switch {
		case vm == nil:
			why = "deleted"
		case vm.GetHost() == h.Node && vm.GetMigration() == nil:
			continue // it never left, or came back by itself
		case vm.GetMigration() != nil:
			why = "migrating to " + vm.GetMigration().GetTarget()
		case vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED:
			why = "stopped"
		case !movable(vm):
			why = stateWord(vm.GetState())
		}
		if why != "" {
			skipped = append(skipped, n+": "+why)
			r.logf(h, "not moving %s back: %s", n, why)
			continue
		}
		m, err := call(ctx, r, func(ctx context.Context) (*basaltv1.VM, error) {
			return r.vms.MigrateVM(ctx, &basaltv1.MigrateVMRequest{Name: n, TargetHost: h.Node, Compress: r.opts.Compress,
				BandwidthBytesPerSecond: r.opts.BandwidthBytesPerSecond})
		})
		if err != nil {
			return moved, skipped, fmt.Errorf("move %s back from %s: %w", n, vm.GetHost(), err)
		}
		ids[n] = m.GetMigration().GetId()
		order = append(order, n)
	}
	if len(ids) == 0 {
		return nil, skipped, nil
	}
	shown := map[string]string{}
	err = r.wait(ctx, r.opts.DrainTimeout, func(ctx context.Context) (bool, string, error) {
		vms, err := r.listVMs(ctx)
		if err != nil {
			return false, "", err
		}
		byName := vmsByName(vms.GetVms())
		var pending []string
		for _, n := range order {
			vm := byName[n]
			if vm == nil {
				return false, "", fmt.Errorf("VM %s was deleted while it moved back", n)
			}
			if line := progressLine(vm, ids[n]); shown[n] != line {
				r.logf(h, "%s", line)
				shown[n] = line
			}
			if vm.GetMigration().GetId() == ids[n] {
				pending = append(pending, shown[n])
				continue
			}
			// The request is gone: its source reported the outcome before clearing it.
			p := vm.GetStatus().GetMigration()
			if vm.GetHost() != h.Node {
				if p.GetId() == ids[n] {
					return false, "", fmt.Errorf("the migration of %s back to %s %s: %s; it stays on %s", n, h.Node, p.GetStatus(), orDash(p.GetError()), vm.GetHost())
				}
				return false, "", fmt.Errorf("the migration of %s back to %s ended without a report; it is on %s", n, h.Node, vm.GetHost())
			}
		}
		if len(pending) > 0 {
			return false, "still moving back: " + strings.Join(pending, "; "), nil
		}
		return true, "", nil
	})
	if err != nil {
		return nil, skipped, err
	}
	return order, skipped, nil
}

// wait calls check every poll interval until it reports done or fails, timeout passes (the error says what
// check last said was pending), or ctx ends. API calls that failed for want of metad are retried.
func (r *run) wait(ctx context.Context, timeout time.Duration, check func(context.Context) (done bool, pending string, err error)) error {
	deadline := time.Now().Add(timeout)
	var pending string
	var lastErr error
	for {
		done, p, err := check(ctx)
		switch {
		case err != nil && ctx.Err() != nil:
			return fmt.Errorf("stopped waiting: %w", context.Cause(ctx))
		case err != nil && !transient(err):
			return err
		case err != nil:
			lastErr = err
		case done:
			return nil
		default:
			pending, lastErr = p, nil
		}
		if time.Now().After(deadline) {
			if lastErr != nil {
				return fmt.Errorf("not done within %s: %s (last error: %v)", timeout, orDash(pending), lastErr)
			}
			return fmt.Errorf("not done within %s: %s", timeout, pending)
		}
		t := time.NewTimer(r.opts.Poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("stopped waiting (%s): %w", orDash(pending), context.Cause(ctx))
		case <-t.C:
		}
	}
}

// describe fills in what a stopped update left, read afresh. It has a context of its own: ctx may be what
// ended.
func (r *run) describe(ctx context.Context, se *StepError, recorded []string) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.CallTimeout)
	defer cancel()
	hosts, err := r.vms.ListHosts(dctx, &basaltv1.ListHostsRequest{})
	var vms *basaltv1.ListVMsResponse
	if err == nil {
		vms, err = r.vms.ListVMs(dctx, &basaltv1.ListVMsRequest{})
	}
	if err != nil {
		se.State = []string{fmt.Sprintf("unknown: cannot read the cluster (%v); see 'basalt host list' and 'basalt vm list'", apiError(err))}
		se.Undo = []string{fmt.Sprintf("basalt host undrain %s    (if 'basalt host list' shows it draining)", se.Host)}
		return
	}
	se.State, se.Undo = leftState(se.Host, recorded, hosts.GetHosts(), vms.GetVms())
}
