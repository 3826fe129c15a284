package scenario

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/chaos/cluster"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// The bars.
const (
	// FailoverBar: a host fails → its VM's guest agent beats again on another host (3 s TCG boot included).
	FailoverBar = 10 * time.Second
	// Failover8Bar: 8 VMs on a failed host, all beating again elsewhere, restarted by priority.
	Failover8Bar = 30 * time.Second
)

// failoverWait is how long a scenario follows a failover before it gives up: well past the bar, so that a
// slow failover is measured rather than cut off.
const failoverWait = 40 * time.Second

// Scenario is one fault and the checks after it.
type Scenario struct {
	Name string
	// Doc says what the scenario does.
	Doc string
	// Hosts and EtcdMembers shape the scenario's cluster.
	Hosts       int
	EtcdMembers int
	run         func(ctx context.Context, e *Env, r *Report) error
}

// All lists every scenario, in the order `make chaos` runs them.
var All = []Scenario{KillHost, KillHost8, FreezeAndWake, PartitionLink, PartitionFirewall, DiskFull, EtcdMemberLoss}

// Named returns the scenario called name.
func Named(name string) (Scenario, bool) {
	for _, s := range All {
		if s.Name == name {
			return s, true
		}
	}
	return Scenario{}, false
}

// Options say how to run scenarios.
type Options struct {
	// Dir is the run directory; each scenario gets a subdirectory (kept: daemon logs, console logs).
	Dir string
	// BinDir and EtcdBin are the programs (see cluster.Options).
	BinDir, EtcdBin string
	Guest           testguest.Guest
	Log             *slog.Logger
}

// Run starts the scenario's cluster, runs the scenario and stops the cluster. The report holds everything,
// including the daemons' log tails when something failed.
func Run(ctx context.Context, s Scenario, o Options) *Report {
	r := &Report{Scenario: s.Name}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	c, err := cluster.Start(ctx, cluster.Options{Dir: filepath.Join(o.Dir, s.Name), BinDir: o.BinDir, EtcdBin: o.EtcdBin,
		Hosts: s.Hosts, EtcdMembers: s.EtcdMembers, Log: log})
	if err != nil {
		r.Err = err
		return r
	}
	defer c.Close()
	e := &Env{C: c, Guest: o.Guest, Log: log, vms: map[string]VMDef{}}
	if err := s.run(ctx, e, r); err != nil {
		r.Err = err
	}
	if r.Failed() {
		r.Logs = c.LogTails(30)
	}
	return r
}

// hostFault injects a fault that takes host h away at T0 and follows the failover of the VMs it ran: it fills
// the report's fault, T0 and moves, and checks that every protected VM beats again on another host.
func hostFault(ctx context.Context, e *Env, r *Report, h *cluster.Host, what string, inject func(context.Context) error) ([]*Move, error) {
	defs, err := e.VMsOn(ctx, h.ComputedID())
	if err != nil {
		return nil, err
	}
	old := map[string]map[uint64]bool{}
	for _, d := range defs {
		old[d.Name] = e.boots(d.Name)
	}
	r.Fault = what + " " + describeHost(h)
	r.T0 = time.Now()
	if err := inject(ctx); err != nil {
		return nil, err
	}
	moves, err := e.WaitFailover(ctx, defs, h.ComputedID(), r.T0, old, failoverWait)
	r.Moves = moves
	r.check("every protected VM beating again on another host", err)
	return moves, nil
}

// waitGone waits until host h runs no hypervisor for vm, and returns when it saw that (zero: not within).
func waitGone(ctx context.Context, h *cluster.Host, vm string, within time.Duration) (time.Time, []cluster.Proc) {
	deadline := time.Now().Add(within)
	for {
		ps, err := h.Procs()
		var left []cluster.Proc
		for _, p := range ps {
			if name, ok := p.QEMUGuest(); ok && name == vm {
				left = append(left, p)
			}
		}
		if err == nil && len(left) == 0 {
			return time.Now(), nil
		}
		if time.Now().After(deadline) || sleep(ctx, 100*time.Millisecond) != nil {
			return time.Time{}, left
		}
	}
}

func pids(ps []cluster.Proc) string {
	var s []string
	for _, p := range ps {
		s = append(s, fmt.Sprintf("pid %d (state %c)", p.PID, p.State))
	}
	return strings.Join(s, ", ")
}

const (
	high   = basaltv1.VMPriority_VM_PRIORITY_HIGH
	medium = basaltv1.VMPriority_VM_PRIORITY_MEDIUM
	low    = basaltv1.VMPriority_VM_PRIORITY_LOW
	noAuto = basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START
)

// KillHost SIGKILLs every process of the host that runs a protected VM (blockd, computed, QEMU: the host
// died), follows the VM to another host against the 10 s bar, brings the host back, and checks.
var KillHost = Scenario{
	Name:  "kill-host",
	Doc:   "SIGKILL every process of the host running a protected VM; the VM must beat on another host within 10 s; the host returns",
	Hosts: 3,
	run: func(ctx context.Context, e *Env, r *Report) error {
		h := e.C.Hosts[0]
		if err := e.CreateVMs(ctx, []VMDef{{Name: "ha1", Host: h.ComputedID(), Priority: high}}); err != nil {
			return err
		}
		moves, err := hostFault(ctx, e, r, h, "SIGKILL of every process of", h.Kill)
		if err != nil {
			return err
		}
		r.Bars = append(r.Bars, failoverBar(r.T0, moves[0], FailoverBar))
		return backAndCheck(ctx, e, r, h)
	},
}

// backAndCheck revives a killed host (its computed must not start again a VM that moved) and runs the
// invariants.
func backAndCheck(ctx context.Context, e *Env, r *Report, h *cluster.Host) error {
	if err := h.Revive(ctx); err != nil {
		return err
	}
	r.event(h.Name+" back: blockd and computed restarted and up", time.Now())
	e.Invariants(ctx, r, 20*time.Second)
	return nil
}

// KillHost8 kills a host running 8 VMs of mixed priorities and placement rules.
var KillHost8 = Scenario{
	Name: "kill-host-8",
	Doc: "SIGKILL a host running 8 VMs (2 high, 3 medium, 2 low, 1 no-auto-start; one limited to two hosts, one in " +
		"an anti-affinity group); all protected VMs beating elsewhere within 30 s, placed in priority order, rules respected",
	Hosts: 3,
	run: func(ctx context.Context, e *Env, r *Report) error {
		h1, h2, h3 := e.C.Hosts[0].ComputedID(), e.C.Hosts[1].ComputedID(), e.C.Hosts[2].ComputedID()
		defs := []VMDef{
			{Name: "k8-high-1", Host: h1, Priority: high},
			// Its group's other member runs on h2: with h3 free, it must go to h3.
			{Name: "k8-high-2", Host: h1, Priority: high, Group: "k8-aa"},
			{Name: "k8-med-1", Host: h1, Priority: medium},
			{Name: "k8-med-2", Host: h1, Priority: medium},
			// It may only run on h1 and h3: it must go to h3.
			{Name: "k8-med-3", Host: h1, Priority: medium, Possible: []string{h1, h3}},
			{Name: "k8-low-1", Host: h1, Priority: low},
			{Name: "k8-low-2", Host: h1, Priority: low},
			{Name: "k8-noauto", Host: h1, Priority: noAuto},
			{Name: "k8-aa-peer", Host: h2, Priority: medium, Group: "k8-aa"},
		}
		if err := e.CreateVMs(ctx, defs); err != nil {
			return err
		}
		h := e.C.Hosts[0]
		moves, err := hostFault(ctx, e, r, h, "SIGKILL of every process of", h.Kill)
		if err != nil {
			return err
		}
		all := Bar{Name: "8 VMs on a failed host: every protected one beating on another host", Limit: Failover8Bar}
		var restarts []check.Restart
		var first, last time.Duration
		for _, m := range moves {
			if m.Priority == noAuto {
				continue
			}
			if m.Beating.IsZero() {
				all.Missing = true
			} else {
				d := m.Beating.Sub(r.T0)
				if first == 0 || d < first {
					first = d
				}
				last = max(last, d)
			}
			restarts = append(restarts, check.Restart{VM: m.VM, Priority: m.Priority, Placed: m.Placed})
		}
		all.Got = last
		all.Detail = fmt.Sprintf("first beating %s, last %s", fmtDur(first), fmtDur(last))
		order := Bar{Name: "restarted in priority order (placed_at: high before medium before low)"}
		for _, rs := range restarts {
			if rs.Placed.IsZero() {
				order.Missing = true
				order.Detail = rs.VM + " was never placed"
			}
		}
		if !order.Missing {
			if err := check.PriorityOrder(restarts); err != nil {
				order.Failed = true
				order.Detail = err.Error()
			}
		}
		r.Bars = append(r.Bars, all, order)
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		l, err := e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
		cancel()
		if err != nil {
			return fmt.Errorf("list VMs: %w", err)
		}
		r.check("the NO_AUTO_START VM was not restarted", check.NotRestarted(l.GetVms(), h1))
		if err := backAndCheck(ctx, e, r, h); err != nil {
			return err
		}
		lctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		l, err = e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
		cancel()
		if err != nil {
			return fmt.Errorf("list VMs: %w", err)
		}
		r.check("the NO_AUTO_START VM was not started by its host on its return", check.NotRestarted(l.GetVms(), h1))
		return nil
	},
}

// FreezeAndWake freezes a host past its lease, lets HA restart its VM elsewhere, then wakes it up.
var FreezeAndWake = Scenario{
	Name: "freeze-and-wake",
	Doc: "SIGSTOP every process of a host past its lease; its VM must beat elsewhere within 10 s; on SIGCONT the old " +
		"QEMU must not write (fenced) and its computed must stop it; no split brain",
	Hosts: 3,
	run: func(ctx context.Context, e *Env, r *Report) error {
		h := e.C.Hosts[0]
		if err := e.CreateVMs(ctx, []VMDef{{Name: "fz1", Host: h.ComputedID(), Priority: high}}); err != nil {
			return err
		}
		moves, err := hostFault(ctx, e, r, h, "SIGSTOP of every process of", h.Freeze)
		if err != nil {
			return err
		}
		r.Bars = append(r.Bars, failoverBar(r.T0, moves[0], FailoverBar))
		// Frozen a little longer than the failover took: it wakes up after its VM runs elsewhere, unaware.
		if err := sleep(ctx, 2*time.Second); err != nil {
			h.Thaw(context.WithoutCancel(ctx))
			return err
		}
		thawed := time.Now()
		if err := h.Thaw(ctx); err != nil {
			return err
		}
		r.event(h.Name+" thawed (SIGCONT): its QEMU resumes mid-write", thawed)
		gone, left := waitGone(ctx, h, "fz1", 30*time.Second)
		if gone.IsZero() {
			r.check("the woken host stops its old QEMU", fmt.Errorf("%s still runs a QEMU of fz1 30 s after waking: %s", h.Name, pids(left)))
		} else {
			r.event(h.Name+"'s old QEMU of fz1 gone", gone)
			r.check("the woken host stops its old QEMU", nil)
		}
		if err := e.C.WaitUp(ctx, h.Daemons(), 30*time.Second); err != nil {
			r.check("the woken host's daemons register again", err)
		} else {
			r.event(h.Name+"'s blockd and computed up again", time.Now())
		}
		e.Invariants(ctx, r, 20*time.Second)
		return nil
	},
}

// partition cuts the host running a protected VM off the network with mode.
func partition(name string, mode cluster.PartitionMode) Scenario {
	vm := name + "-vm"
	return Scenario{
		Name: name,
		Doc: fmt.Sprintf("cut the host running a protected VM off the network (%s); the VM must beat elsewhere within 10 s, "+
			"the cut-off guest must stop writing before its lease expires (self-fencing); heal: the old QEMU is killed; no split brain", mode),
		Hosts: 3,
		run: func(ctx context.Context, e *Env, r *Report) error {
			h := e.C.Hosts[0]
			if err := e.CreateVMs(ctx, []VMDef{{Name: vm, Host: h.ComputedID(), Priority: high}}); err != nil {
				return err
			}
			healed := false
			defer func() {
				if !healed {
					h.Heal()
				}
			}()
			old := e.boots(vm)
			moves, err := hostFault(ctx, e, r, h, fmt.Sprintf("network partition (%s) of", mode), func(context.Context) error {
				return h.Partition(mode)
			})
			if err != nil {
				return err
			}
			r.Bars = append(r.Bars, failoverBar(r.T0, moves[0], FailoverBar))
			// Both copies exist now: the new one running, the old one cut off with its guest paused by its own
			// computed (self-fencing, before its lease could expire) and its disk fenced. Keep it so a while.
			if err := sleep(ctx, 3*time.Second); err != nil {
				return err
			}
			r.check("the cut-off guest stops announcing writes before its lease expires (self-fenced)",
				silentAfter(e.C.Consoles.Records(vm), h.ComputedID(), old, r.T0.Add(e.C.Opts.LeaseTTL+500*time.Millisecond)))
			if err := h.Heal(); err != nil {
				return err
			}
			healed = true
			r.event(h.Name+" healed", time.Now())
			gone, left := waitGone(ctx, h, vm, 30*time.Second)
			if gone.IsZero() {
				r.check("the healed host kills its old QEMU (the VM moved away)", fmt.Errorf("%s still runs a QEMU of %s 30 s after healing: %s",
					h.Name, vm, pids(left)))
			} else {
				r.event(h.Name+"'s old QEMU of "+vm+" gone", gone)
				r.check("the healed host kills its old QEMU (the VM moved away)", nil)
			}
			if err := e.C.WaitUp(ctx, h.Daemons(), 30*time.Second); err != nil {
				r.check("the healed host's daemons register again", err)
			} else {
				r.event(h.Name+"'s blockd and computed up again", time.Now())
			}
			e.Invariants(ctx, r, 20*time.Second)
			return nil
		},
	}
}

// PartitionLink and PartitionFirewall are the two kinds of network partition.
var (
	PartitionLink     = partition("partition-link", cluster.LinkDown)
	PartitionFirewall = partition("partition-nft", cluster.Firewall)
)

// DiskFull fills the disk of a blockd that holds a replica of the VM's volume.
var DiskFull = Scenario{
	Name: "disk-full",
	Doc: "fill the disk of a blockd holding a replica of a running VM's volume for 10 s; writes go on through the other " +
		"replicas or fail cleanly; once space is back the guest beats again; no acknowledged write lost",
	Hosts: 3,
	run: func(ctx context.Context, e *Env, r *Report) error {
		h := e.C.Hosts[0]
		if err := e.CreateVMs(ctx, []VMDef{{Name: "df1", Host: h.ComputedID(), Priority: high}}); err != nil {
			return err
		}
		full := e.C.Hosts[1]
		r.Fault = fmt.Sprintf("fill %s's blockd disk (a replica of every PG: 3 replicas on 3 hosts); df1 runs on %s", full.Name, h.Name)
		r.T0 = time.Now()
		n, err := full.FillDisk()
		defer full.FreeDisk()
		if err != nil {
			return err
		}
		r.note("filled %s's %d MiB tmpfs with %d MiB", full.Name, e.C.Opts.DiskSize>>20, n>>20)
		if err := sleep(ctx, 10*time.Second); err != nil {
			return err
		}
		end := time.Now()
		var acked, errs int
		for _, a := range e.C.Consoles.Records("df1") {
			if a.At.After(r.T0) && a.At.Before(end) {
				acked++
			}
		}
		for _, l := range e.C.Consoles.Lines("df1") {
			if l.At.After(r.T0) && l.At.Before(end) && strings.Contains(l.Text, "BASALT error write") {
				errs++
			}
		}
		r.note("while the disk was full (10 s): %d records acknowledged, %d write errors reported by the guest; VM: %s",
			acked, errs, e.describe(ctx, "df1"))
		if err := full.FreeDisk(); err != nil {
			return err
		}
		freed := time.Now()
		r.event(full.Name+"'s disk freed", freed)
		err = e.WaitBeating(ctx, "df1", h.ComputedID(), freed, 30*time.Second)
		if err == nil {
			last, _ := e.C.Consoles.Last("df1")
			r.event("df1's guest beating again", last.At)
			gap, _ := maxGap(e.C.Consoles.Records("df1"), r.T0.Add(-time.Second), last.At)
			r.note("df1's guest was stalled (no write acknowledged) for %s", fmtDur(gap))
		}
		r.check("the guest beats again once space is back", err)
		e.Invariants(ctx, r, 5*time.Second)
		return nil
	},
}

// EtcdMemberLoss kills the etcd leader of a three-member cluster under a running VM.
var EtcdMemberLoss = Scenario{
	Name: "etcd-member-loss",
	Doc: "SIGKILL the leader of a 3-member etcd cluster; the cluster keeps serving (API writes, every lease held, the VM " +
		"beating where it is, no failover); the member returns and rejoins",
	Hosts:       3,
	EtcdMembers: 3,
	run: func(ctx context.Context, e *Env, r *Report) error {
		h := e.C.Hosts[0]
		if err := e.CreateVMs(ctx, []VMDef{{Name: "em1", Host: h.ComputedID(), Priority: high}}); err != nil {
			return err
		}
		leader, err := e.C.EtcdLeader(ctx)
		if err != nil {
			return err
		}
		w := watchNodes(ctx, e.C)
		r.Fault = fmt.Sprintf("SIGKILL of etcd member %s (the leader, %s)", leader.Name, leader.IP)
		r.T0 = time.Now()
		if err := leader.Kill(ctx); err != nil {
			return err
		}
		for deadline := time.Now().Add(15 * time.Second); ctx.Err() == nil; sleep(ctx, 100*time.Millisecond) {
			if nl, err := e.C.EtcdLeader(ctx); err == nil && nl != leader {
				r.event("new etcd leader: "+nl.Name, time.Now())
				break
			}
			if time.Now().After(deadline) {
				r.check("the two members left elect a leader", errors.New("no new etcd leader within 15 s"))
				break
			}
		}
		wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		_, err = e.C.Volumes.CreateVolume(wctx, &basaltv1.CreateVolumeRequest{Name: "em-probe", SizeBytes: 1 << 20, Replicas: 3})
		cancel()
		if err == nil {
			r.event("API write (CreateVolume) acknowledged", time.Now())
		}
		r.check("the API takes writes with one member lost", err)
		// Long enough for every lease to have been renewed several times through the two members left.
		if err := sleep(ctx, time.Until(r.T0.Add(5*e.C.Opts.LeaseTTL))); err != nil {
			return err
		}
		if err := e.C.ReviveMember(ctx, leader); err != nil {
			r.check("the lost member returns and rejoins", err)
		} else {
			r.event(leader.Name+" back and serving", time.Now())
			n := e.C.EtcdHealthy(ctx)
			var err error
			if n != 3 {
				err = fmt.Errorf("%d of 3 members healthy after %s returned", n, leader.Name)
			}
			r.check("the lost member returns and rejoins", err)
		}
		down := w.stop()
		r.note("metad answered %d of %d node listings polled every 200 ms through the loss", w.polls-w.failed, w.polls)
		r.check("every node kept its lease (none reported down)", down)
		gap, at := maxGap(e.C.Consoles.Records("em1"), r.T0.Add(-time.Second), time.Now())
		r.note("em1's longest gap between records read around the loss: %s (before record read at %s)", fmtDur(gap), at.Format("15:04:05.000"))
		var gapErr error
		if gap > 2*e.C.Opts.LeaseTTL {
			gapErr = fmt.Errorf("em1's guest stalled %s (more than two lease TTLs)", fmtDur(gap))
		}
		r.check("the guest beat on throughout", gapErr)
		gctx, gcancel := context.WithTimeout(ctx, 5*time.Second)
		vm, err := e.C.VMs.GetVM(gctx, &basaltv1.GetVMRequest{Name: "em1"})
		gcancel()
		if err == nil && (vm.GetHost() != h.ComputedID() || (vm.GetFailover() != nil && !ts(vm.GetFailover().GetDetectedAt()).Before(r.T0))) {
			err = fmt.Errorf("em1 was moved: %s", e.describe(ctx, "em1"))
		}
		r.check("the VM stayed where it ran (no failover)", err)
		e.Invariants(ctx, r, 5*time.Second)
		return nil
	},
}

// silentAfter returns an error if a boot in old (the VM's boots before the fault) announced a record on host
// that was read after t.
func silentAfter(recs []check.Announced, host string, old map[uint64]bool, t time.Time) error {
	for _, a := range recs {
		if a.Host == host && old[a.Boot] && a.At.After(t) {
			return fmt.Errorf("boot %016x announced record %d on %s at %s, %s after the cut", a.Boot, a.Seq, host,
				a.At.Format("15:04:05.000"), fmtDur(a.At.Sub(t)))
		}
	}
	return nil
}

// maxGap returns the longest time between consecutive records read within [from, to], and when the record
// after it was read.
func maxGap(recs []check.Announced, from, to time.Time) (time.Duration, time.Time) {
	var gap time.Duration
	var at, prev time.Time
	for _, a := range recs {
		if a.At.Before(from) || a.At.After(to) {
			continue
		}
		if !prev.IsZero() && a.At.Sub(prev) > gap {
			gap, at = a.At.Sub(prev), a.At
		}
		prev = a.At
	}
	return gap, at
}

// nodeWatch records nodes that metad reports down while it runs.
type nodeWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	down   map[string]time.Time
	// polls and failed count metad's answers: the API's availability through the loss.
	polls, failed int
}

func watchNodes(ctx context.Context, c *cluster.Cluster) *nodeWatch {
	ctx, cancel := context.WithCancel(ctx)
	w := &nodeWatch{cancel: cancel, done: make(chan struct{}), down: map[string]time.Time{}}
	go func() {
		defer close(w.done)
		for ctx.Err() == nil {
			sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
			states, err := c.NodeStates(sctx)
			scancel()
			w.mu.Lock()
			w.polls++
			if err != nil {
				w.failed++
			}
			for id, st := range states {
				if _, seen := w.down[id]; st != basaltv1.NodeState_NODE_STATE_UP && !seen {
					w.down[id] = time.Now()
				}
			}
			w.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return w
}

// stop ends the watch and returns an error naming every node seen down.
func (w *nodeWatch) stop() error {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	var errs []error
	for id, at := range w.down {
		errs = append(errs, fmt.Errorf("%s reported down at %s", id, at.Format("15:04:05.000")))
	}
	return errors.Join(errs...)
}
