package scenario

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/chaos/cluster"
)

// Faults a randomized round picks from.
var Faults = []string{"kill", "freeze", "partition-link", "partition-nft", "disk-full", "etcd-member"}

// RoundsOptions configure RunRounds.
type RoundsOptions struct {
	Options
	Rounds int
	// Seed makes a run repeatable (0: random, printed).
	Seed uint64
	// Out receives a line per round, the full report of a failed one, and the summary.
	Out io.Writer
}

// Summary is what the rounds found.
type Summary struct {
	Seed           uint64
	Rounds, Failed int
	// LostWrites and SplitBrains count rounds where that checker failed: the bars are zero.
	LostWrites, SplitBrains int
	// Single and Multi are the failure → beating times of the VMs moved by host faults, when the failed host
	// ran one protected VM (the 10 s bar) or several (restarted tier by tier, booting at once);
	// BarMisses counts single-VM failovers over FailoverBar, Never the VMs that did not beat elsewhere.
	Single, Multi    []time.Duration
	BarMisses, Never int
	ByFault          map[string]int
}

// Print writes the summary.
func (s *Summary) Print(w io.Writer) {
	fmt.Fprintf(w, "\n=== randomized rounds (seed %d)\n", s.Seed)
	var faults []string
	for f, n := range s.ByFault {
		faults = append(faults, fmt.Sprintf("%s %d", f, n))
	}
	sort.Strings(faults)
	fmt.Fprintf(w, "  rounds: %d (%s), failed: %d\n", s.Rounds, strings.Join(faults, ", "), s.Failed)
	fmt.Fprintf(w, "  acknowledged writes lost: %d rounds; split brain: %d rounds (bar: 0 and 0)\n", s.LostWrites, s.SplitBrains)
	stats := func(ds []time.Duration) string {
		if len(ds) == 0 {
			return "none"
		}
		sorted := slices.Clone(ds)
		slices.Sort(sorted)
		return fmt.Sprintf("%d, failure -> beating median %s, max %s", len(sorted), fmtDur(sorted[len(sorted)/2]), fmtDur(sorted[len(sorted)-1]))
	}
	fmt.Fprintf(w, "  failovers of a host's only protected VM: %s; over the %s bar: %d\n", stats(s.Single), fmtDur(FailoverBar), s.BarMisses)
	fmt.Fprintf(w, "  failovers of hosts with several protected VMs (per VM): %s\n", stats(s.Multi))
	fmt.Fprintf(w, "  protected VMs never beating on another host: %d\n", s.Never)
	verdict := "PASS"
	if s.Failed > 0 {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, "--- %s randomized rounds\n", verdict)
}

// roundVMs run through every round: every priority, an anti-affinity pair, one per host to start.
func roundVMs(c *cluster.Cluster) []VMDef {
	h := func(i int) string { return c.Hosts[i%len(c.Hosts)].ComputedID() }
	return []VMDef{
		{Name: "r-high", Host: h(0), Priority: high},
		{Name: "r-med", Host: h(1), Priority: medium},
		{Name: "r-low", Host: h(2), Priority: low},
		{Name: "r-aa-1", Host: h(0), Priority: medium, Group: "r-aa"},
		{Name: "r-aa-2", Host: h(1), Priority: medium, Group: "r-aa"},
		{Name: "r-noauto", Host: h(2), Priority: noAuto},
	}
}

// RunRounds runs randomized rounds on one long-lived cluster (3 hosts, 3 etcd members, 6 VMs): each round
// injects a random fault on a random host (or etcd member), follows the failover, restores the fault, waits
// until every VM runs and beats again, and runs every checker. Faults accumulate their effects across rounds
// (a host that returns catches up, VMs end up anywhere), which is the point.
func RunRounds(ctx context.Context, o RoundsOptions) (*Summary, error) {
	s := &Summary{Seed: o.Seed, ByFault: map[string]int{}}
	if s.Seed == 0 {
		s.Seed = rand.Uint64()
	}
	rng := rand.New(rand.NewPCG(s.Seed, s.Seed^0x9e3779b97f4a7c15))
	c, err := cluster.Start(ctx, cluster.Options{Dir: filepath.Join(o.Dir, "rounds"), BinDir: o.BinDir, EtcdBin: o.EtcdBin,
		Hosts: 3, EtcdMembers: 3, Log: o.Log})
	if err != nil {
		return s, err
	}
	defer c.Close()
	e := &Env{C: c, Guest: o.Guest, Log: o.Log, vms: map[string]VMDef{}}
	if err := e.CreateVMs(ctx, roundVMs(c)); err != nil {
		return s, fmt.Errorf("%w\n%s", err, c.LogTails(30))
	}
	fmt.Fprintf(o.Out, "randomized rounds: seed %d, %d rounds, cluster in %s\n", s.Seed, o.Rounds, c.Opts.Dir)
	for i := 1; i <= o.Rounds && ctx.Err() == nil; i++ {
		fault := Faults[rng.IntN(len(Faults))]
		r := &Report{Scenario: fmt.Sprintf("round %d/%d: %s", i, o.Rounds, fault)}
		if err := e.round(ctx, r, fault, rng); err != nil {
			r.Err = err
		}
		s.Rounds++
		s.ByFault[fault]++
		var moved []*Move
		for _, m := range r.Moves {
			if m.Priority != noAuto {
				moved = append(moved, m)
			}
		}
		for _, m := range moved {
			if m.Beating.IsZero() {
				s.Never++
				continue
			}
			d := m.Beating.Sub(r.T0)
			if len(moved) == 1 {
				s.Single = append(s.Single, d)
				if d > FailoverBar {
					s.BarMisses++
				}
			} else {
				s.Multi = append(s.Multi, d)
			}
		}
		for _, ch := range r.Checks {
			if ch.Err == nil {
				continue
			}
			switch {
			case strings.Contains(ch.Name, "acknowledged write"):
				s.LostWrites++
			case strings.Contains(ch.Name, "split brain"), strings.Contains(ch.Name, "hypervisor process"):
				s.SplitBrains++
			}
		}
		if r.Failed() {
			s.Failed++
			r.Print(o.Out)
			fmt.Fprintf(o.Out, "daemon logs:\n%s\n", c.LogTails(20))
			continue
		}
		fmt.Fprintf(o.Out, "%s  %s: %s\n", time.Now().Format("15:04:05"), r.Scenario, r.oneLine())
	}
	return s, ctx.Err()
}

// oneLine summarises a passed round.
func (r *Report) oneLine() string {
	parts := []string{"PASS", r.Fault}
	for _, m := range r.Moves {
		if !m.Beating.IsZero() {
			parts = append(parts, fmt.Sprintf("%s %s->%s beating %s", m.VM, m.From, m.To, since(r.T0, m.Beating)))
		}
	}
	return strings.Join(parts, "; ")
}

// round injects one fault, restores it and checks.
func (e *Env) round(ctx context.Context, r *Report, fault string, rng *rand.Rand) error {
	h := e.C.Hosts[rng.IntN(len(e.C.Hosts))]
	var noauto []string
	if defs, err := e.VMsOn(ctx, h.ComputedID()); err == nil {
		for _, d := range defs {
			if !d.Protected() {
				noauto = append(noauto, d.Name)
			}
		}
	}
	hostDown := true
	switch fault {
	case "kill":
		if _, err := hostFault(ctx, e, r, h, "SIGKILL of every process of", h.Kill); err != nil {
			return err
		}
		if err := e.holdDown(ctx, r); err != nil {
			return err
		}
		if err := h.Revive(ctx); err != nil {
			return err
		}
		r.event(h.Name+" back", time.Now())
	case "freeze":
		if _, err := hostFault(ctx, e, r, h, "SIGSTOP of every process of", h.Freeze); err != nil {
			return err
		}
		if err := e.holdDown(ctx, r); err != nil {
			h.Thaw(context.WithoutCancel(ctx))
			return err
		}
		if err := h.Thaw(ctx); err != nil {
			return err
		}
		r.event(h.Name+" thawed", time.Now())
	case "partition-link", "partition-nft":
		mode := cluster.LinkDown
		if fault == "partition-nft" {
			mode = cluster.Firewall
		}
		_, err := hostFault(ctx, e, r, h, fmt.Sprintf("network partition (%s) of", mode), func(context.Context) error { return h.Partition(mode) })
		if err != nil {
			h.Heal()
			return err
		}
		if err := e.holdDown(ctx, r); err != nil {
			h.Heal()
			return err
		}
		if err := h.Heal(); err != nil {
			return err
		}
		r.event(h.Name+" healed", time.Now())
	case "disk-full":
		hostDown = false
		r.Fault = "fill the blockd disk of " + h.Name
		r.T0 = time.Now()
		if _, err := h.FillDisk(); err != nil {
			h.FreeDisk()
			return err
		}
		serr := sleep(ctx, 5*time.Second)
		if err := h.FreeDisk(); err != nil {
			return err
		}
		if serr != nil {
			return serr
		}
		r.event(h.Name+"'s disk freed", time.Now())
	case "etcd-member":
		hostDown = false
		m := e.C.Etcd[rng.IntN(len(e.C.Etcd))]
		r.Fault = "SIGKILL of etcd member " + m.Name
		r.T0 = time.Now()
		if err := m.Kill(ctx); err != nil {
			return err
		}
		if err := sleep(ctx, 3*e.C.Opts.LeaseTTL); err != nil {
			return err
		}
		if err := e.C.ReviveMember(ctx, m); err != nil {
			return err
		}
		r.event(m.Name+" back", time.Now())
	default:
		return fmt.Errorf("unknown fault %q", fault)
	}
	restored := time.Now()
	if hostDown {
		if err := e.C.WaitUp(ctx, h.Daemons(), time.Minute); err != nil {
			return err
		}
		if len(noauto) > 0 {
			lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			l, err := e.C.VMs.ListVMs(lctx, &basaltv1.ListVMsRequest{})
			cancel()
			if err != nil {
				return fmt.Errorf("list VMs: %w", err)
			}
			r.check("NO_AUTO_START VMs of the failed host not restarted", check.NotRestarted(l.GetVms(), h.ComputedID()))
			// Start them again (wherever placement says), so that they take part in later rounds.
			for _, n := range noauto {
				sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				_, err := e.C.VMs.StartVM(sctx, &basaltv1.StartVMRequest{Name: n})
				cancel()
				if err != nil {
					r.note("start %s again: %v", n, err)
				}
			}
		}
	}
	r.check("every VM running and beating again after the fault was restored", e.WaitAllRunning(ctx, restored, time.Minute))
	e.Invariants(ctx, r, 20*time.Second)
	return nil
}

// holdDown keeps a host fault in place until at least three lease TTLs after T0, so that it is seen even on a
// host that ran no VM.
func (e *Env) holdDown(ctx context.Context, r *Report) error {
	return sleep(ctx, time.Until(r.T0.Add(3*e.C.Opts.LeaseTTL)))
}
