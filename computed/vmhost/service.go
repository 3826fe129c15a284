package vmhost

import (
	"context"
	"errors"
	"path/filepath"
	"sort"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// MaxConsoleTail bounds ConsoleInput.tail_bytes: the console log holds at most twice its file limit anyway.
const MaxConsoleTail = 16 << 20

// Service is ComputeService on this host.
type Service struct {
	basaltv1.UnimplementedComputeServiceServer
	h *Host
}

// Service returns the host's ComputeService implementation, for the node's gRPC server.
func (h *Host) Service() *Service { return &Service{h: h} }

// StreamConsole attaches a viewer to a VM's console on this host.
func (s *Service) StreamConsole(stream basaltv1.ComputeService_StreamConsoleServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	name := first.GetName()
	if err := schema.ValidateName("VM", name); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	tail := int64(min(first.GetTailBytes(), MaxConsoleTail))
	con := s.h.consoleOf(name)
	if con == nil {
		if first.GetTailBytes() > 0 {
			b, err := tailLog(filepath.Join(s.h.dir(name), "console.log"), tail)
			if err != nil {
				return status.Error(codes.Internal, err.Error())
			}
			if err := sendChunks(stream, b); err != nil {
				return err
			}
		}
		if first.GetNoFollow() {
			return nil
		}
		return status.Errorf(codes.FailedPrecondition, "VM %s does not run on host %s (its console log is kept: 'basalt vm console %s --log')", name, s.h.cfg.NodeID, name)
	}
	v, history, replay, err := con.subscribe(tail, resumePoint{sinceStart: first.GetSinceStart(), id: first.GetResumeConsoleId(), off: first.GetResumeOffset()})
	if err := sendChunks(stream, history); err != nil {
		if v != nil {
			con.unsubscribe(v)
		}
		return err
	}
	if err := sendLive(stream, con.id, replay); err != nil {
		if v != nil {
			con.unsubscribe(v)
		}
		return err
	}
	if first.GetNoFollow() || errors.Is(err, errConsoleClosed) {
		if v != nil {
			con.unsubscribe(v)
		}
		return nil
	}
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	defer con.unsubscribe(v)
	go func() {
		for {
			in, err := stream.Recv()
			if err != nil {
				return
			}
			if len(in.GetData()) > 0 {
				if _, err := con.Write(in.GetData()); err != nil {
					return
				}
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ch, ok := <-v.ch:
			if !ok {
				if v.slow {
					return stream.Send(&basaltv1.ConsoleOutput{Notice: "this viewer fell too far behind the console and was detached"})
				}
				return nil
			}
			if err := sendLive(stream, con.id, ch); err != nil {
				return err
			}
		}
	}
}

// sendLive sends live output with its place in the console, in pieces of at most 32 KiB.
func sendLive(stream basaltv1.ComputeService_StreamConsoleServer, id string, ch chunk) error {
	for b, off := ch.b, ch.off; len(b) > 0; {
		n := min(len(b), 32<<10)
		if err := stream.Send(&basaltv1.ConsoleOutput{Data: b[:n], ConsoleId: id, Offset: off}); err != nil {
			return err
		}
		b, off = b[n:], off+uint64(n)
	}
	return nil
}

func sendChunks(stream basaltv1.ComputeService_StreamConsoleServer, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), 32<<10)
		if err := stream.Send(&basaltv1.ConsoleOutput{Data: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// consoleOf is the console of the VM's machine on this host: running, or waiting for a migration.
func (h *Host) consoleOf(name string) *console {
	if w := h.worker(name); w != nil {
		if _, con := w.machine(); con != nil {
			return con
		}
	}
	if in := h.getIncoming(name); in != nil {
		return in.con
	}
	return nil
}

// GetVMStats reads a VM's meters now.
func (s *Service) GetVMStats(ctx context.Context, r *basaltv1.GetVMStatsRequest) (*basaltv1.VMStats, error) {
	w := s.h.worker(r.GetName())
	if w == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %s does not run on host %s", r.GetName(), s.h.cfg.NodeID)
	}
	m, _ := w.machine()
	if m == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %s does not run on host %s", r.GetName(), s.h.cfg.NodeID)
	}
	w.sample(ctx, m)
	st := w.stats()
	if st == nil {
		return nil, status.Errorf(codes.Unavailable, "VM %s: no meters yet", r.GetName())
	}
	return st, nil
}

// stats builds the VM's meters from its two latest samples (rates need two).
func (w *worker) stats() *basaltv1.VMStats {
	w.mu.Lock()
	older, newer := w.samples[0], w.samples[1]
	d := w.decl
	w.mu.Unlock()
	if newer.at.IsZero() {
		return nil
	}
	st := w.statusSnapshot()
	out := &basaltv1.VMStats{
		Name: w.name, Host: w.h.cfg.NodeID, SampledAt: timestamppb.New(newer.at),
		CpuTimeNs:         uint64(newer.st.CPUTime.Nanoseconds()),
		MemoryTargetBytes: st.GetMemoryTargetBytes(), MemoryActualBytes: newer.st.BalloonActual,
		MemoryMaximumBytes: max(d.GetSpec().GetMemory().GetMaximumBytes(), d.GetSpec().GetMemory().GetStartupBytes()),
	}
	var secs float64
	if !older.at.IsZero() {
		secs = newer.at.Sub(older.at).Seconds()
	}
	if secs > 0 {
		out.CpuUsage = (newer.st.CPUTime - older.st.CPUTime).Seconds() / secs
	}
	ids := make([]string, 0, len(newer.st.Disks))
	for id := range newer.st.Disks {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		n := newer.st.Disks[id]
		ds := &basaltv1.DiskStats{Volume: id, ReadBytes: n.ReadBytes, WriteBytes: n.WriteBytes, ReadOps: n.ReadOps, WriteOps: n.WriteOps}
		if o, ok := older.st.Disks[id]; ok && secs > 0 && n.ReadOps >= o.ReadOps && n.WriteOps >= o.WriteOps {
			ds.ReadIops = float64(n.ReadOps-o.ReadOps) / secs
			ds.WriteIops = float64(n.WriteOps-o.WriteOps) / secs
		}
		out.Disks = append(out.Disks, ds)
	}
	return out
}

// PrepareIncoming starts the target's machine of a migration toward this host.
func (s *Service) PrepareIncoming(ctx context.Context, r *basaltv1.PrepareIncomingRequest) (*basaltv1.PrepareIncomingResponse, error) {
	uri, err := s.h.prepareIncoming(ctx, r.GetVm())
	if err != nil {
		return nil, err
	}
	return &basaltv1.PrepareIncomingResponse{Uri: uri}, nil
}

// AbortIncoming stops the machine of a failed or cancelled migration toward this host.
func (s *Service) AbortIncoming(ctx context.Context, r *basaltv1.AbortIncomingRequest) (*basaltv1.AbortIncomingResponse, error) {
	if r.GetMigrationId() == "" {
		return nil, status.Error(codes.InvalidArgument, "name the migration to abort")
	}
	s.h.dropIncoming(ctx, r.GetName(), r.GetMigrationId(), "its source aborted the migration")
	return &basaltv1.AbortIncomingResponse{}, nil
}
