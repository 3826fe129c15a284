package vmhost

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// A live migration, as its source host runs it:
//
//  1. status "queued" until one of the host's migration slots is free (a drain sets how many);
//  2. "preparing": ComputeService.PrepareIncoming on the target starts a machine waiting for the VM;
//  3. "active": the driver streams memory and device state; progress goes to the VM's status;
//  4. on completion the guest runs on the target (its disks and ports moved to the target in the pause before
//     the switchover, nics.go). The source records "completed", then moves the VM's
//     declaration to the target (host = target, migration cleared) in one compare-and-swap; the target
//     adopts its incoming machine when it sees that, and the source kills its stopped copy.
//  5. on failure or cancellation the driver has kept the guest running here; the source aborts the target's
//     machine and clears the migration from the declaration.

// outgoing is a migration this host runs as the source.
type outgoing struct {
	id     string
	cancel context.CancelFunc
	done   chan struct{}
}

// incoming is a machine this host started for a migration toward it.
type incoming struct {
	id  string
	rev int64 // revision of the declaration the source migrated from
	m   hypervisor.Machine
	con *console
	uri string
	// gens are the attachment generations its disks were opened with (PrepareIncoming).
	gens map[string]uint64
	// nics are the VM's NICs, whose ports carry this host's incoming placement until the switchover.
	nics []*basaltv1.VMNic

	exited atomic.Bool
}

func (in *incoming) dead() bool { return in.exited.Load() }

// release lets go of the machine without stopping it.
func (in *incoming) release() {
	in.con.Close()
	in.m.Close()
}

func (in *incoming) kill(ctx context.Context) {
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	in.m.Kill(kctx)
	in.release()
}

// startMigration runs d's migration in the background.
func (w *worker) startMigration(ctx context.Context, m hypervisor.Machine, d *basaltv1.VM, rev int64) *outgoing {
	mctx, cancel := context.WithCancel(ctx)
	o := &outgoing{id: d.GetMigration().GetId(), cancel: cancel, done: make(chan struct{})}
	w.mu.Lock()
	w.mig = o
	w.mu.Unlock()
	vm := proto.Clone(d).(*basaltv1.VM)
	vm.Revision = rev
	go func() {
		defer func() {
			cancel()
			w.mu.Lock()
			w.mig = nil
			w.mu.Unlock()
			close(o.done)
			w.poke()
		}()
		w.migrate(mctx, m, vm)
	}()
	return o
}

// migrate runs one migration to its end (see the protocol above).
func (w *worker) migrate(ctx context.Context, m hypervisor.Machine, vm *basaltv1.VM) {
	req := vm.GetMigration()
	log := w.log.With("migration", req.GetId(), "target", req.GetTarget())
	start := time.Now()
	progress := func(fn func(p *basaltv1.MigrationProgress)) {
		w.setStatus(func(st *basaltv1.VMStatus) {
			if st.Migration.GetId() != req.GetId() {
				st.Migration = &basaltv1.MigrationProgress{Id: req.GetId(), Source: req.GetSource(), Target: req.GetTarget(),
					Compress: req.GetCompress(), BandwidthBytesPerSecond: req.GetBandwidthBytesPerSecond(), StartedAt: timestamppb.New(start)}
			}
			fn(st.Migration)
			st.State = basaltv1.VMState_VM_STATE_MIGRATING
		})
		w.flushStatus(context.WithoutCancel(ctx))
	}
	progress(func(p *basaltv1.MigrationProgress) { p.Status = "queued" })
	if err := w.h.slots.acquire(ctx); err != nil {
		w.endMigration(ctx, req, "cancelled", nil)
		return
	}
	defer w.h.slots.release()

	progress(func(p *basaltv1.MigrationProgress) { p.Status = "preparing" })
	log.Info("migration starting", "compress", req.GetCompress(), "bandwidth", req.GetBandwidthBytesPerSecond())
	target, err := w.h.peers.client(ctx, req.GetTarget())
	if err != nil {
		w.endMigration(ctx, req, "failed", err)
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	resp, err := target.PrepareIncoming(pctx, &basaltv1.PrepareIncomingRequest{Vm: vm})
	cancel()
	if err != nil {
		outcome := "failed"
		if ctx.Err() != nil {
			outcome, err = "cancelled", nil
		}
		w.abortIncoming(ctx, target, req)
		w.endMigration(ctx, req, outcome, wrapRemote("prepare the target", err))
		return
	}
	progress(func(p *basaltv1.MigrationProgress) { p.Status = "active" })
	opts := hypervisor.MigrateOptions{Compress: req.GetCompress(), BandwidthBytes: req.GetBandwidthBytesPerSecond(),
		MaxDowntime: time.Duration(req.GetMaxDowntimeMs()) * time.Millisecond}
	// The disks' attachments and the ports move to the target while the guest is stopped here for the last
	// time (or, with a driver that cannot stop there, right after the migration: the target's disks were
	// accepting writes already, and its taps were ready). Moving the ports before the device state is sent
	// lets every netd converge while QEMU finishes, so the guest's traffic is at the target about when it
	// resumes there.
	pauses := w.h.pausesBeforeSwitchover()
	var portsPending atomic.Bool
	if pauses {
		opts.BeforeSwitchover = func(ctx context.Context) error {
			err := w.h.switchover(ctx, vm, req.GetTarget())
			var pe *portsNotMoved
			if errors.As(err, &pe) {
				log.Error("the disks moved to the target but the ports did not; moving them after the migration", "err", err)
				portsPending.Store(true)
				return nil
			}
			return err
		}
	}
	var lastReport time.Time
	final, err := m.Migrate(ctx, resp.GetUri(), opts, func(s hypervisor.MigrationStatus) {
		if time.Since(lastReport) < 500*time.Millisecond {
			return
		}
		lastReport = time.Now()
		progress(func(p *basaltv1.MigrationProgress) {
			p.Status = "active"
			p.TransferredBytes, p.RemainingBytes, p.TotalBytes = s.TransferredBytes, s.RemainingBytes, s.TotalBytes
		})
	})
	if err != nil || final.Status != "completed" {
		outcome := "failed"
		if ctx.Err() != nil {
			outcome, err = "cancelled", nil
		} else if err == nil {
			err = fmt.Errorf("the migration ended %s", final.Status)
		}
		log.Warn("migration did not complete; the VM stays here", "outcome", outcome, "err", err)
		w.abortIncoming(ctx, target, req)
		w.endMigration(ctx, req, outcome, err)
		return
	}
	if !pauses || portsPending.Load() {
		if err := w.h.switchover(context.WithoutCancel(ctx), vm, req.GetTarget()); err != nil {
			log.Error("the VM migrated, but its disks' attachments or its ports did not move", "err", err)
		}
	}
	w.setStatus(func(st *basaltv1.VMStatus) { st.AttachGenerations = nil }) // the switchover dropped them
	progress(func(p *basaltv1.MigrationProgress) {
		p.Status = "completed"
		p.TransferredBytes, p.RemainingBytes, p.TotalBytes = final.TransferredBytes, 0, final.TotalBytes
		p.DowntimeMs = uint32(final.Downtime.Milliseconds())
		p.FinishedAt = timestamppb.Now()
		p.Error = ""
	})
	// The guest runs on the target now, whatever happened to the request meanwhile (a late cancel, a stop):
	// the declaration must follow it.
	me := w.h.cfg.NodeID
	rev, err := w.h.updateDecl(context.WithoutCancel(ctx), w.name, func(d *basaltv1.VM) bool {
		if d.GetHost() != me {
			return false
		}
		d.Host = req.GetTarget()
		if d.GetMigration().GetId() == req.GetId() {
			d.Migration = nil
		}
		return true
	})
	if err != nil {
		log.Error("the VM migrated, but its declaration could not be moved to the target", "err", err)
		return
	}
	w.mu.Lock()
	w.movedRev = rev
	w.mu.Unlock()
	log.Info("migration completed", "took", time.Since(start).Round(time.Millisecond), "downtime", final.Downtime,
		"bytes", final.TransferredBytes)
}

// endMigration records a migration that did not move the VM and clears the request from the declaration.
func (w *worker) endMigration(ctx context.Context, req *basaltv1.VMMigration, outcome string, err error) {
	ctx = context.WithoutCancel(ctx)
	w.setStatus(func(st *basaltv1.VMStatus) {
		if st.Migration.GetId() != req.GetId() {
			st.Migration = &basaltv1.MigrationProgress{Id: req.GetId(), Source: req.GetSource(), Target: req.GetTarget(),
				Compress: req.GetCompress(), BandwidthBytesPerSecond: req.GetBandwidthBytesPerSecond()}
		}
		st.Migration.Status = outcome
		st.Migration.FinishedAt = timestamppb.Now()
		if err != nil {
			st.Migration.Error = err.Error()
			setError(st, fmt.Errorf("migration to %s failed: %w", req.GetTarget(), err))
		}
		if st.State == basaltv1.VMState_VM_STATE_MIGRATING {
			st.State = basaltv1.VMState_VM_STATE_RUNNING // corrected by the next look at the machine
		}
	})
	w.flushStatus(ctx)
	if _, err := w.h.updateDecl(ctx, w.name, func(d *basaltv1.VM) bool {
		if d.GetMigration().GetId() != req.GetId() {
			return false
		}
		d.Migration = nil
		return true
	}); err != nil {
		w.log.Warn("clear the migration request", "err", err)
	}
}

func (w *worker) abortIncoming(ctx context.Context, target basaltv1.ComputeServiceClient, req *basaltv1.VMMigration) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if _, err := target.AbortIncoming(actx, &basaltv1.AbortIncomingRequest{Name: w.name, MigrationId: req.GetId()}); err != nil {
		w.log.Warn("abort the target's incoming machine (it stops by itself when its migration is gone)", "target", req.GetTarget(), "err", err)
	}
}

func wrapRemote(what string, err error) error {
	if err == nil {
		return nil
	}
	if st, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", what, st.Message())
	}
	return fmt.Errorf("%s: %w", what, err)
}

// updateDecl changes a VM's declaration with compare-and-swap, retrying on conflicts; fn returns false to
// leave it unchanged. It returns the revision written (0 if nothing was).
func (h *Host) updateDecl(ctx context.Context, name string, fn func(*basaltv1.VM) bool) (int64, error) {
	for attempt := 0; ; attempt++ {
		rec, err := store.Get[basaltv1.VM](ctx, h.cfg.Store, schema.VMKey(name))
		if errors.Is(err, store.ErrNotFound) {
			return 0, nil
		}
		if err != nil {
			if ctx.Err() != nil || attempt > 50 {
				return 0, err
			}
			time.Sleep(200 * time.Millisecond)
			continue
		}
		vm := rec.Value
		if !fn(vm) {
			return 0, nil
		}
		vm.Generation++
		rev, err := h.cfg.Store.Update(ctx, rec.Key, vm, rec.ModRevision)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		return rev, err
	}
}

// prepareIncoming starts, for a migration toward this host, a machine waiting for the VM.
func (h *Host) prepareIncoming(ctx context.Context, vm *basaltv1.VM) (string, error) {
	h.prepMu.Lock()
	defer h.prepMu.Unlock()
	name, req := vm.GetName(), vm.GetMigration()
	if err := schema.ValidateName("VM", name); err != nil {
		return "", status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetTarget() != h.cfg.NodeID {
		return "", status.Errorf(codes.InvalidArgument, "the migration of %s targets %s, not this host (%s)", name, req.GetTarget(), h.cfg.NodeID)
	}
	// The source acts on its copy of the declaration; the stored one says whether the request still stands.
	cur, err := store.Get[basaltv1.VM](ctx, h.cfg.Store, schema.VMKey(name))
	if err != nil {
		return "", status.Errorf(codes.FailedPrecondition, "read the declaration of %s: %v", name, err)
	}
	if m := cur.Value.GetMigration(); m.GetId() != req.GetId() || m.GetCancel() {
		return "", status.Errorf(codes.FailedPrecondition, "the migration %s of %s is no longer requested", req.GetId(), name)
	}
	if in := h.getIncoming(name); in != nil {
		if in.id == req.GetId() && !in.dead() {
			return in.uri, nil
		}
		h.dropIncoming(ctx, name, in.id, "a newer migration replaces it")
	}
	if w := h.worker(name); w != nil {
		if m, _ := w.machine(); m != nil {
			return "", status.Errorf(codes.FailedPrecondition, "VM %s already has a machine on this host", name)
		}
	}
	sock, err := h.nbdSocket(ctx)
	if err != nil {
		return "", status.Error(codes.FailedPrecondition, err.Error())
	}
	nics, err := h.prepareNICs(ctx, vm)
	if err != nil {
		return "", err
	}
	prepared := false
	defer func() {
		if !prepared {
			h.clearIncomingPorts(ctx, vm.GetSpec().GetNics())
		}
	}()
	gens, err := h.prepareDisks(ctx, vm)
	if err != nil {
		return "", status.Error(codes.FailedPrecondition, err.Error())
	}
	defer func() {
		if !prepared {
			h.detachDisks(ctx, gens)
		}
	}()
	spec := h.machineSpec(vm, &sock, nics, gens)
	opts := hypervisor.MigrateOptions{Compress: req.GetCompress()}
	sctx, cancel := context.WithTimeout(ctx, h.cfg.StartTimeout)
	defer cancel()
	var m hypervisor.Machine
	var uri string
	if with, ok := h.cfg.Driver.(interface {
		StartIncomingWith(context.Context, hypervisor.Spec, string, hypervisor.MigrateOptions) (hypervisor.Machine, string, error)
	}); ok {
		m, uri, err = with.StartIncomingWith(sctx, spec, h.cfg.MigrationHost, opts)
	} else if opts.Compress {
		return "", status.Errorf(codes.Unimplemented, "the %s driver cannot receive a compressed migration", h.cfg.Driver.Name())
	} else {
		m, uri, err = h.cfg.Driver.StartIncoming(sctx, spec, h.cfg.MigrationHost)
	}
	if err != nil {
		return "", status.Errorf(codes.Internal, "start the incoming machine: %v", err)
	}
	con, err := openConsole(ctx, m, h.dir(name), h.cfg.ConsoleLogBytes, h.log.With("vm", name))
	if err != nil {
		m.Kill(context.WithoutCancel(ctx))
		m.Close()
		return "", status.Errorf(codes.Internal, "incoming machine: %v", err)
	}
	in := &incoming{id: req.GetId(), rev: vm.GetRevision(), m: m, con: con, uri: uri, gens: gens, nics: vm.GetSpec().GetNics()}
	prepared = true
	h.addIncoming(name, in)
	h.dispatch(name, cur.Value, cur.ModRevision)
	h.log.Info("incoming migration prepared", "vm", name, "migration", req.GetId(), "source", req.GetSource(), "uri", uri)
	return uri, nil
}

// addIncoming registers an incoming machine and watches it: one that exits before it is adopted is dropped.
func (h *Host) addIncoming(name string, in *incoming) {
	h.mu.Lock()
	h.incoming[name] = in
	ctx := h.ctx
	h.mu.Unlock()
	if ctx == nil {
		ctx = context.Background()
	}
	go func() {
		if in.m.Wait(context.WithoutCancel(ctx)) != nil {
			return // the handle was closed: released or adopted
		}
		in.exited.Store(true)
		h.mu.Lock()
		mine := h.incoming[name] == in
		if mine {
			delete(h.incoming, name)
		}
		h.mu.Unlock()
		if mine {
			h.log.Info("incoming machine exited before the migration completed", "vm", name, "migration", in.id)
			in.release()
			h.clearIncomingPorts(ctx, in.nics)
		}
	}()
}

func (h *Host) getIncoming(name string) *incoming {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.incoming[name]
}

// takeIncoming removes and returns the VM's incoming machine.
func (h *Host) takeIncoming(name string) *incoming {
	h.mu.Lock()
	defer h.mu.Unlock()
	in := h.incoming[name]
	delete(h.incoming, name)
	return in
}

// dropIncoming kills the VM's incoming machine (of migration id, or any if id is empty).
func (h *Host) dropIncoming(ctx context.Context, name, id, why string) bool {
	h.mu.Lock()
	in := h.incoming[name]
	if in == nil || (id != "" && in.id != id) {
		h.mu.Unlock()
		return false
	}
	delete(h.incoming, name)
	h.mu.Unlock()
	h.log.Info("stopping an incoming machine", "vm", name, "migration", in.id, "why", why)
	in.kill(ctx)
	h.detachDisks(ctx, in.gens)
	h.clearIncomingPorts(ctx, in.nics)
	return true
}

// peers holds gRPC connections to other computed nodes, redialled when a node's address changes.
type peers struct {
	store *store.Store
	mu    sync.Mutex
	conns map[string]*peerConn
}

type peerConn struct {
	addr string
	conn *grpc.ClientConn
}

func newPeers(s *store.Store) *peers { return &peers{store: s, conns: map[string]*peerConn{}} }

func (p *peers) client(ctx context.Context, node string) (basaltv1.ComputeServiceClient, error) {
	n, err := store.Get[basaltv1.Node](ctx, p.store, schema.NodeKey(node))
	if err != nil {
		return nil, fmt.Errorf("find host %s: %w", node, err)
	}
	addr := n.Value.GetGrpcAddress()
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.conns[node]; c != nil && c.addr == addr {
		return basaltv1.NewComputeServiceClient(c.conn), nil
	} else if c != nil {
		c.conn.Close()
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connect to host %s at %s: %w", node, addr, err)
	}
	p.conns[node] = &peerConn{addr: addr, conn: conn}
	return basaltv1.NewComputeServiceClient(conn), nil
}

func (p *peers) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, c := range p.conns {
		c.conn.Close()
		delete(p.conns, k)
	}
}
