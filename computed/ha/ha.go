// Package ha is the HA controller (docs/ha.md): every computed runs one, and the one elected leader (an etcd
// election; a new leader takes over within the election TTL when the leader dies) watches the compute hosts'
// leases. When a host has failed it fences the host (every volume the host had attached gets a new attachment
// generation, and every up blockd has seen it before anything restarts: the host can never write them again),
// then restarts the host's VMs elsewhere in priority order (high, medium, low; no-auto-start VMs are left
// stopped), one priority tier at a time, through metad's placement (possible and preferred hosts,
// anti-affinity, capacity). It also moves VMs whose heartbeat monitoring gave up on their host. Each move is
// recorded on the VM (VM.failover: detected, fenced, placed).
//
// A host has failed when its computed's lease is gone and so is its blockd's (ComputeHost.blockd_node): the
// whole host is down or cut off. A computed alone that is down (a crash, a restart) leaves its guests running
// on their local blockd, so it is given DaemonGrace to come back before its VMs are moved.
//
// It depends on metad's store, schema, registry, election, watch and api packages (placement lives in the
// latter) and on a Fencer (metad/attach.Client).
package ha

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/election"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ElectionName is the etcd election the HA controllers campaign in.
const ElectionName = "ha"

// Fencer fences a host's volumes (metad/attach.Client.FenceHost).
type Fencer interface {
	FenceHost(ctx context.Context, host string) ([]string, int64, error)
}

// Config configures a Controller.
type Config struct {
	// Candidate names this controller in the election (the computed's node ID).
	Candidate string
	Store     *store.Store
	VMs       *api.VMServer
	Fencer    Fencer
	// ElectionTTL is how long leadership survives a silent leader; 0: 2 s.
	ElectionTTL time.Duration
	// DaemonGrace is how long a host whose computed is down while its blockd is up keeps its VMs; 0: 60 s.
	DaemonGrace time.Duration
	// TierWait bounds the wait for a priority tier's VMs to be up before the next tier is placed; 0: 5 s. It
	// trades the head start of the higher tiers (their guests boot without the lower ones competing for the
	// CPUs) against the time until the last VM is back.
	TierWait time.Duration
	// Interval is how often the leader looks at every host even without a change; 0: 1 s.
	Interval time.Duration
	Log      *slog.Logger
}

// Controller is one HA controller replica.
type Controller struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	downSince map[string]time.Time // computed hosts seen down, since when (this leader's view)
	busy      map[string]bool      // hosts with a failover in progress
}

// New returns a controller; Run starts it.
func New(cfg Config) (*Controller, error) {
	if cfg.Store == nil || cfg.VMs == nil || cfg.Fencer == nil {
		return nil, errors.New("ha: a store, a VM server and a fencer are required")
	}
	if err := schema.ValidateName("node", cfg.Candidate); err != nil {
		return nil, err
	}
	if cfg.ElectionTTL <= 0 {
		cfg.ElectionTTL = 2 * time.Second
	}
	if cfg.DaemonGrace <= 0 {
		cfg.DaemonGrace = 60 * time.Second
	}
	if cfg.TierWait <= 0 {
		cfg.TierWait = 5 * time.Second
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Controller{cfg: cfg, log: cfg.Log, downSince: map[string]time.Time{}, busy: map[string]bool{}}, nil
}

// Run campaigns, leads while elected, and campaigns again after losing leadership, until ctx ends.
func (c *Controller) Run(ctx context.Context) error {
	election.Run(ctx, c.cfg.Store.Client, ElectionName, c.cfg.Candidate, c.cfg.ElectionTTL, c.log.With("controller", "HA"), c.lead)
	return nil
}

// lead acts as leader until ctx ends.
func (c *Controller) lead(ctx context.Context) {
	c.mu.Lock()
	c.downSince = map[string]time.Time{}
	c.mu.Unlock()
	wake := make(chan struct{}, 1)
	poke := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(2)
	// A lease that expires deletes its liveness key: look at once instead of at the next tick.
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.Liveness](ctx, c.cfg.Store, schema.AlivePrefix, watch.Handlers[*basaltv1.Liveness]{
			Sync:   func([]store.Record[*basaltv1.Liveness], int64) error { poke(); return nil },
			Put:    func(store.Record[*basaltv1.Liveness]) error { poke(); return nil },
			Delete: func(string, int64) error { poke(); return nil },
		}, c.log)
	}()
	go func() {
		defer wg.Done()
		watch.Run[basaltv1.VMStatus](ctx, c.cfg.Store, schema.VMStatusPrefix, watch.Handlers[*basaltv1.VMStatus]{
			Put: func(r store.Record[*basaltv1.VMStatus]) error {
				if r.Value.GetMonitorGaveUp() {
					poke()
				}
				return nil
			},
		}, c.log)
	}()
	tick := time.NewTicker(c.cfg.Interval)
	defer tick.Stop()
	for {
		if err := c.scan(ctx, &wg); err != nil && ctx.Err() == nil {
			c.log.Warn("HA controller: scan", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-tick.C:
		}
	}
}

// scan looks at every compute host once and starts the failovers that are due.
func (c *Controller) scan(ctx context.Context, wg *sync.WaitGroup) error {
	hosts, _, err := store.List[basaltv1.ComputeHost](ctx, c.cfg.Store, schema.ComputeHostsPrefix)
	if err != nil {
		return err
	}
	nodes, err := registry.List(ctx, c.cfg.Store, basaltv1.NodeKind_NODE_KIND_UNSPECIFIED, true)
	if err != nil {
		return err
	}
	up := map[string]bool{}
	for _, n := range nodes {
		up[n.GetNode().GetId()] = n.GetState() == basaltv1.NodeState_NODE_STATE_UP
	}
	now := time.Now()
	for _, r := range hosts {
		h := r.Value
		id := h.GetNode()
		c.mu.Lock()
		if up[id] {
			delete(c.downSince, id)
			c.mu.Unlock()
			continue
		}
		since, seen := c.downSince[id]
		if !seen {
			since = now
			c.downSince[id] = now
		}
		busy := c.busy[id]
		c.mu.Unlock()
		blockd := h.GetBlockdNode()
		failed := blockd == "" || !up[blockd] || now.Sub(since) >= c.cfg.DaemonGrace
		if !failed || busy {
			continue
		}
		why := "host down (computed and blockd " + blockd + " leases expired)"
		switch {
		case blockd == "":
			why = "host down (computed lease expired; the host names no blockd)"
		case up[blockd]:
			why = fmt.Sprintf("computed down for %s (its blockd is up)", now.Sub(since).Round(time.Second))
		}
		c.start(ctx, wg, id, func(ctx context.Context) { c.failHost(ctx, id, why, since) })
	}
	return c.scanMonitoring(ctx, wg, up)
}

// start runs fn for host in the background unless a failover of host is already running.
func (c *Controller) start(ctx context.Context, wg *sync.WaitGroup, host string, fn func(context.Context)) {
	c.mu.Lock()
	if c.busy[host] {
		c.mu.Unlock()
		return
	}
	c.busy[host] = true
	c.mu.Unlock()
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer func() {
			c.mu.Lock()
			delete(c.busy, host)
			c.mu.Unlock()
		}()
		fn(ctx)
	}()
}

// failHost fences a failed host and restarts its VMs elsewhere, tier by tier.
func (c *Controller) failHost(ctx context.Context, host, why string, downSince time.Time) {
	vms, err := c.cfg.VMs.FailedVMs(ctx, host)
	if err != nil {
		c.log.Warn("HA: list the failed host's VMs", "host", host, "err", err)
		return
	}
	if len(vms) == 0 {
		return
	}
	detected := time.Now()
	log := c.log.With("host", host)
	log.Warn("HA: host failed; fencing it", "why", why, "vms", len(vms), "down_for", detected.Sub(downSince).Round(time.Millisecond))
	vols, rev, err := c.cfg.Fencer.FenceHost(ctx, host)
	if err != nil {
		// Nothing restarts before the host is fenced; the next scan tries again.
		log.Error("HA: fence the failed host", "err", err)
		return
	}
	fenced := time.Now()
	log.Warn("HA: host fenced", "volumes", len(vols), "revision", rev, "took", fenced.Sub(detected).Round(time.Millisecond))
	rec := &basaltv1.VMFailover{Reason: why, DetectedAt: timestamppb.New(detected), FencedAt: timestamppb.New(fenced)}
	c.restart(ctx, log, host, vms, rec)
}

// restart places vms (sorted for restart) off host, one priority tier at a time: a tier's VMs are placed
// together, and the next tier waits until they are up or TierWait passes — up meaning their guest agent's first
// heartbeat for VMs with heartbeat monitoring (so a higher tier has booted before a lower one competes with it
// for the CPUs), and their machine running for the others.
func (c *Controller) restart(ctx context.Context, log *slog.Logger, host string, vms []*basaltv1.VM, rec *basaltv1.VMFailover) {
	// No-auto-start VMs only need declaring stopped: at once, so that the host, should it come back, does not
	// start them again.
	var tiers []*basaltv1.VM
	for _, vm := range vms {
		if vm.GetSpec().GetPriority() != basaltv1.VMPriority_VM_PRIORITY_NO_AUTO_START {
			tiers = append(tiers, vm)
			continue
		}
		if _, err := c.cfg.VMs.Failover(ctx, vm.GetName(), host, rec); err != nil && !api.IsNotOnHost(err) {
			log.Error("HA: declare a no-auto-start VM stopped", "vm", vm.GetName(), "err", err)
			continue
		}
		log.Warn("HA: VM left stopped (priority no-auto-start)", "vm", vm.GetName())
	}
	vms = tiers
	for len(vms) > 0 {
		if c.hostUp(ctx, host) {
			// Back (and fenced: its guests were killed or can no longer write): it restarts what is still
			// assigned to it, as after any restart.
			log.Warn("HA: the failed host is back; it restarts the VMs not moved yet", "vms", len(vms))
			return
		}
		rank := api.PriorityRank(vms[0].GetSpec().GetPriority())
		n := sort.Search(len(vms), func(i int) bool { return api.PriorityRank(vms[i].GetSpec().GetPriority()) > rank })
		tier := vms[:n]
		vms = vms[n:]
		placed := map[string]placement{}
		for _, vm := range tier {
			name := vm.GetName()
			moved, err := c.cfg.VMs.Failover(ctx, name, host, rec)
			switch {
			case api.IsNotOnHost(err):
				continue
			case status.Code(err) == codes.FailedPrecondition:
				log.Error("HA: no host can take the VM now; it stays down and is tried again", "vm", name, "err", status.Convert(err).Message())
				if rerr := c.cfg.VMs.RecordFailoverError(ctx, name, host, rec, err); rerr != nil && !api.IsNotOnHost(rerr) {
					log.Warn("HA: record the failover error", "vm", name, "err", rerr)
				}
				continue
			case err != nil:
				log.Error("HA: move the VM", "vm", name, "err", err)
				continue
			}
			placed[name] = placement{host: moved.GetHost(), beats: moved.GetSpec().GetMonitoring().GetHeartbeat()}
			log.Warn("HA: VM restarting elsewhere", "vm", name, "to", moved.GetHost(), "priority", api.PriorityName(vm.GetSpec().GetPriority()))
		}
		if len(vms) > 0 && len(placed) > 0 {
			c.waitRunning(ctx, placed)
		}
	}
}

// hostUp reports whether host's computed holds a live lease again.
func (c *Controller) hostUp(ctx context.Context, host string) bool {
	n, err := registry.Get(ctx, c.cfg.Store, host)
	return err == nil && n.GetState() == basaltv1.NodeState_NODE_STATE_UP
}

// placement is where a tier's VM went, and whether its guest's heartbeat says it is up.
type placement struct {
	host  string
	beats bool
}

// waitRunning waits until every VM of placed is up on its new host, or TierWait passes.
func (c *Controller) waitRunning(ctx context.Context, placed map[string]placement) {
	deadline := time.Now().Add(c.cfg.TierWait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		all := true
		for name, p := range placed {
			rec, err := store.Get[basaltv1.VMStatus](ctx, c.cfg.Store, schema.VMStatusKey(name))
			st := rec.Value
			// A new run's status starts without a heartbeat: one there was sent by this run's guest.
			if err != nil || st.GetHost() != p.host || st.GetState() != basaltv1.VMState_VM_STATE_RUNNING ||
				(p.beats && st.GetLastHeartbeat() == nil) {
				all = false
				break
			}
		}
		if all {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// scanMonitoring moves the VMs whose heartbeat monitoring gave up on their (live) host.
func (c *Controller) scanMonitoring(ctx context.Context, wg *sync.WaitGroup, up map[string]bool) error {
	sts, _, err := store.List[basaltv1.VMStatus](ctx, c.cfg.Store, schema.VMStatusPrefix)
	if err != nil {
		return err
	}
	for _, r := range sts {
		st := r.Value
		if !st.GetMonitorGaveUp() || !up[st.GetHost()] {
			continue
		}
		name, host := schema.IDFromKey(schema.VMStatusPrefix, r.Key), st.GetHost()
		c.start(ctx, wg, "monitor/"+name, func(ctx context.Context) {
			now := timestamppb.Now()
			// Moving the VM is its fence: the new host's attach takes its volumes over, and this host kills
			// the machine it no longer holds.
			rec := &basaltv1.VMFailover{Reason: "heartbeat monitoring gave up", DetectedAt: now, FencedAt: now}
			vm, err := c.cfg.VMs.Failover(ctx, name, host, rec)
			switch {
			case api.IsNotOnHost(err):
			case err != nil:
				c.log.Warn("HA: move a VM whose monitoring gave up", "vm", name, "host", host, "err", err)
				if status.Code(err) == codes.FailedPrecondition {
					c.cfg.VMs.RecordFailoverError(ctx, name, host, rec, err)
				}
			default:
				c.log.Warn("HA: VM moved: its heartbeat monitoring gave up", "vm", name, "from", host, "to", vm.GetHost())
			}
		})
	}
	return nil
}
