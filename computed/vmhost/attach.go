package vmhost

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
)

// Attacher records which host may write a volume (metad/attach.Client; docs/fencing.md). Every machine opens
// its disks with the generation Attach (or, on a migration's destination, PrepareIncoming) gave this host, and
// blockd refuses the writes of a session whose generation is no longer the volume's.
type Attacher interface {
	Attach(ctx context.Context, volume, host string) (*basaltv1.Attachment, error)
	PrepareIncoming(ctx context.Context, volume, host string, incoming bool) (*basaltv1.Attachment, error)
	Switchover(ctx context.Context, volumes []string, host string) error
	Detach(ctx context.Context, volume, host string) error
}

// diskVolumes lists the volumes of a VM's disks.
func diskVolumes(vm *basaltv1.VM) []string {
	var out []string
	for _, d := range vm.GetSpec().GetDisks() {
		out = append(out, d.GetVolume())
	}
	return out
}

// attachDisks attaches every disk of vm to this host with a new generation (taking over from any host that
// held it: the VM is declared here, so that host's sessions must stop writing) and returns the generations.
// Without an Attacher, disks are opened without a generation. On error nothing stays attached.
func (h *Host) attachDisks(ctx context.Context, vm *basaltv1.VM) (map[string]uint64, error) {
	return h.attachEach(ctx, diskVolumes(vm), func(vol string) (*basaltv1.Attachment, error) {
		return h.cfg.Attacher.Attach(ctx, vol, h.cfg.NodeID)
	})
}

// prepareDisks attaches every disk of vm for a migration's destination: incoming (no writes until the
// switchover) when the driver pauses before the switchover, else at once beside the source.
func (h *Host) prepareDisks(ctx context.Context, vm *basaltv1.VM) (map[string]uint64, error) {
	incoming := h.pausesBeforeSwitchover()
	return h.attachEach(ctx, diskVolumes(vm), func(vol string) (*basaltv1.Attachment, error) {
		return h.cfg.Attacher.PrepareIncoming(ctx, vol, h.cfg.NodeID, incoming)
	})
}

func (h *Host) attachEach(ctx context.Context, vols []string, attach func(string) (*basaltv1.Attachment, error)) (map[string]uint64, error) {
	if h.cfg.Attacher == nil || len(vols) == 0 {
		return nil, nil
	}
	gens := map[string]uint64{}
	for _, vol := range vols {
		a, err := attach(vol)
		if err != nil {
			h.detachDisks(ctx, gens)
			return nil, fmt.Errorf("attach volume %s: %w", vol, err)
		}
		gens[vol] = a.GetGeneration()
	}
	return gens, nil
}

// detachDisks drops this host's attachments of the volumes in gens (a map of volume → generation).
func (h *Host) detachDisks(ctx context.Context, gens map[string]uint64) {
	if h.cfg.Attacher == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	for _, vol := range slices.Sorted(maps.Keys(gens)) {
		if err := h.cfg.Attacher.Detach(ctx, vol, h.cfg.NodeID); err != nil {
			h.log.Warn("detach volume", "volume", vol, "err", err)
		}
	}
}

// pausesBeforeSwitchover reports whether the driver calls MigrateOptions.BeforeSwitchover.
func (h *Host) pausesBeforeSwitchover() bool {
	p, ok := h.cfg.Driver.(hypervisor.SwitchoverPauser)
	return ok && p.PausesBeforeSwitchover()
}

// switchover moves vm's disks to target: from then on only the target's sessions may write them. Then it moves
// the VM's ports to the target's netd (nics.go). The disks go first because their move cannot be undone: a
// failure there leaves everything at the source, where the guest can resume. Once they have moved the guest
// can only go on at the target, so a failure to move the ports is then a *portsNotMoved, for the caller to
// retry after the migration rather than cancel it.
func (h *Host) switchover(ctx context.Context, vm *basaltv1.VM, target string) error {
	disksMoved := false
	if h.cfg.Attacher != nil && len(vm.GetSpec().GetDisks()) > 0 {
		if err := h.cfg.Attacher.Switchover(ctx, diskVolumes(vm), target); err != nil {
			return fmt.Errorf("move the disks' attachments to %s: %w", target, err)
		}
		disksMoved = true
	}
	if err := h.movePorts(ctx, vm, target); err != nil {
		if disksMoved {
			return &portsNotMoved{err}
		}
		return err
	}
	return nil
}

// detachRun drops the attachments the worker's machine was opened with, once it no longer runs here.
func (w *worker) detachRun(ctx context.Context) {
	w.stMu.Lock()
	gens := w.st.AttachGenerations
	w.st.AttachGenerations = nil
	w.stMu.Unlock()
	w.h.detachDisks(ctx, gens)
}

// guardLease pauses every guest of this host when it cannot reach etcd for most of its lease TTL, before the
// HA controller may take the host for dead and restart its VMs elsewhere, so that two copies of a guest never
// run at once (its disks are fenced as well: docs/fencing.md). Once etcd answers again each worker reads its
// declaration afresh before anything is resumed: a VM that was moved away meanwhile is killed, not resumed.
func (h *Host) guardLease(ctx context.Context) {
	ttl := h.cfg.LeaseTTL
	if ttl <= 0 {
		return
	}
	limit := ttl - ttl/4
	probe := max(ttl/8, 100*time.Millisecond)
	lastOK := time.Now()
	tick := time.NewTicker(probe)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		pctx, cancel := context.WithTimeout(ctx, probe*2)
		_, err := h.cfg.Store.Client.Get(pctx, schema.ComputeHostKey(h.cfg.NodeID))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			lastOK = time.Now()
			if h.selfFenced.Load() {
				h.refreshDeclarations(ctx)
				h.selfFenced.Store(false)
				h.log.Warn("etcd answers again: guests this host still holds resume", "unreachable_for", time.Since(h.fencedAt).Round(time.Millisecond))
				for _, w := range h.workerList() {
					w.poke()
				}
			}
			continue
		}
		if h.selfFenced.Load() || time.Since(lastOK) < limit {
			continue
		}
		h.selfFenced.Store(true)
		h.fencedAt = time.Now()
		h.log.Error("etcd unreachable for most of the lease TTL: pausing every guest on this host", "last_ok", lastOK.Format(time.StampMilli), "ttl", ttl, "err", err)
		for _, w := range h.workerList() {
			if m, _ := w.machine(); m != nil {
				pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				if err := m.Pause(pctx); err != nil {
					w.log.Error("pause the guest while this host is cut off", "err", err)
				}
				cancel()
			}
		}
	}
}

// refreshDeclarations hands every worker its VM's declaration as stored now.
func (h *Host) refreshDeclarations(ctx context.Context) {
	for _, w := range h.workerList() {
		rec, err := store.Get[basaltv1.VM](ctx, h.cfg.Store, schema.VMKey(w.name))
		switch {
		case err == nil:
			w.update(rec.Value, rec.ModRevision)
		case !errors.Is(err, store.ErrNotFound): // a deletion comes through the watch
			h.log.Warn("read a declaration after etcd came back", "vm", w.name, "err", err)
		}
	}
}
