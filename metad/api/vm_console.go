package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/metering"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// consoleFollowTimeout bounds how long a console relay waits for a VM that left its host (migrated, or its
// computed restarting) to be reachable again.
const consoleFollowTimeout = 2 * time.Minute

// StreamConsole relays a console viewer to ComputeService.StreamConsole on the VM's host. When the host's
// stream ends because the VM moved (live migration), the relay reconnects to the new host asking for
// everything the console printed there since the machine started, so the viewer sees one continuous stream.
func (s *VMServer) StreamConsole(stream basaltv1.VMService_StreamConsoleServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	name := first.GetName()
	rec, st, err := s.get(ctx, name)
	if err != nil {
		return err
	}
	host := hostOf(rec, st)
	if host == "" {
		return status.Errorf(codes.FailedPrecondition, "VM %q has never run: it has no console yet", name)
	}

	var mu sync.Mutex
	var upstream basaltv1.ComputeService_StreamConsoleClient
	// Keystrokes go to whichever host holds the VM now. The viewer closing its side only ends the input.
	go func() {
		for {
			in, err := stream.Recv()
			if err != nil {
				return
			}
			mu.Lock()
			u := upstream
			mu.Unlock()
			if u != nil && len(in.GetData()) > 0 {
				u.Send(&basaltv1.ConsoleInput{Data: in.GetData()}) // a failed send shows up on the output side
			}
		}
	}()

	open := &basaltv1.ConsoleInput{Name: name, TailBytes: first.GetTailBytes(), NoFollow: first.GetNoFollow()}
	var outage time.Time // since when the viewer has had no working stream
	var lastNotice string
	var pos consolePos
	for attempt := 0; ; attempt++ {
		delivered, err := s.relay(ctx, host, open, stream, &pos, func(u basaltv1.ComputeService_StreamConsoleClient) {
			mu.Lock()
			upstream = u
			mu.Unlock()
		})
		if ctx.Err() != nil {
			return nil // the viewer left
		}
		if attempt == 0 && err != nil && status.Code(err) != codes.Unavailable {
			return err // the host refused the viewer: the VM does not run there, and so on
		}
		if open.GetNoFollow() {
			return err
		}
		if delivered || outage.IsZero() {
			outage = time.Now()
		}
		next, notice, err := s.followVM(ctx, name, host, outage)
		if err != nil {
			return err
		}
		if next == "" {
			return stream.Send(&basaltv1.ConsoleOutput{Notice: notice})
		}
		if notice != lastNotice {
			if err := stream.Send(&basaltv1.ConsoleOutput{Notice: notice}); err != nil {
				return err
			}
			lastNotice = notice
		}
		// On a new host, replay what it printed since the machine started there: the output between the
		// switchover and this reconnection. On the same host, go on where the stream broke (or, if computed
		// restarted there, from the start of its new console).
		open = &basaltv1.ConsoleInput{Name: name, SinceStart: next != host}
		if next == host && pos.id != "" {
			open.ResumeConsoleId, open.ResumeOffset = pos.id, pos.next
		}
		host, pos = next, consolePos{}
		if open.ResumeConsoleId != "" {
			pos = consolePos{id: open.ResumeConsoleId, next: open.ResumeOffset}
		}
	}
}

// consolePos is where a relay is in a host's console: the console and the offset of the next byte.
type consolePos struct {
	id   string
	next uint64
}

// relay copies one host's console stream to the viewer until it ends. It returns nil when the host ended the
// stream cleanly, and whether anything reached the viewer. pos follows the live output's place in the host's
// console, for resuming.
func (s *VMServer) relay(ctx context.Context, host string, open *basaltv1.ConsoleInput, viewer basaltv1.VMService_StreamConsoleServer,
	pos *consolePos, setUpstream func(basaltv1.ComputeService_StreamConsoleClient)) (delivered bool, err error) {
	c, err := s.compute(ctx, host)
	if err != nil {
		return false, err
	}
	uctx, cancel := context.WithCancel(ctx)
	defer cancel()
	u, err := c.StreamConsole(uctx)
	if err != nil {
		return false, err
	}
	if err := u.Send(open); err != nil {
		_, err = u.Recv() // the reason is on the receiving side
		return false, err
	}
	setUpstream(u)
	defer setUpstream(nil)
	for {
		out, err := u.Recv()
		if errors.Is(err, io.EOF) {
			return delivered, nil
		}
		if err != nil {
			return delivered, err
		}
		if out.GetConsoleId() != "" {
			pos.id, pos.next = out.GetConsoleId(), out.GetOffset()+uint64(len(out.GetData()))
		}
		out.ConsoleId, out.Offset = "", 0 // the viewer's stream is one stream
		if err := viewer.Send(out); err != nil {
			return delivered, err
		}
		delivered = true
	}
}

// followVM finds out, after a host's console stream ended, where the VM's console continues: the VM's new
// host after a migration, the same host once its computed answers again, or nowhere (stopped, deleted), with
// a notice for the viewer.
func (s *VMServer) followVM(ctx context.Context, name, host string, outage time.Time) (next, notice string, err error) {
	deadline := outage.Add(consoleFollowTimeout)
	for first := true; ; first = false {
		rec, err := store.Get[basaltv1.VM](ctx, s.Store, schema.VMKey(name))
		if errors.Is(err, store.ErrNotFound) {
			return "", fmt.Sprintf("VM %s was deleted", name), nil
		}
		if err != nil && ctx.Err() != nil {
			return "", "", ctx.Err()
		}
		if err == nil {
			vm := rec.Value
			switch {
			case vm.GetHost() != host:
				return vm.GetHost(), fmt.Sprintf("VM %s moved from %s to %s", name, host, vm.GetHost()), nil
			case vm.GetDesiredState() == basaltv1.VMState_VM_STATE_STOPPED:
				return "", fmt.Sprintf("VM %s stopped", name), nil
			}
			st, serr := store.Get[basaltv1.VMStatus](ctx, s.Store, schema.VMStatusKey(name))
			if serr == nil && st.Value.GetHost() == host && st.Value.GetState() == basaltv1.VMState_VM_STATE_STOPPED {
				return "", fmt.Sprintf("VM %s stopped", name), nil
			}
			// Still meant to run here: its computed restarted, or the stream broke. Try again (the relay resumes
			// where it was), not faster than once a second.
			if serr == nil && st.Value.GetHost() == host && running(st.Value) && !first {
				return host, fmt.Sprintf("console of VM %s reconnecting on %s", name, host), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Sprintf("lost the console of VM %s: host %s did not answer for %s", name, host, consoleFollowTimeout), nil
		}
		select {
		case <-ctx.Done():
			return "", "", ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// GetVMStats relays to the VM's host for the current meters. With history it also reads the VM's metering
// history from etcd, where the hosts keep it, and then answers for a VM that does not run (or whose host does
// not answer) too: the history is what was asked for, and the current meters are left empty (no host, no
// sampled_at).
func (s *VMServer) GetVMStats(ctx context.Context, r *basaltv1.GetVMStatsRequest) (*basaltv1.VMStats, error) {
	rec, st, err := s.get(ctx, r.GetName())
	if err != nil {
		return nil, err
	}
	live, err := s.liveStats(ctx, r.GetName(), rec.Value, st)
	if !r.GetHistory() {
		return live, err
	}
	hist, herr := metering.History(ctx, s.Store, r.GetName())
	if herr != nil {
		return nil, toStatus(herr)
	}
	if err != nil {
		live = &basaltv1.VMStats{Name: r.GetName()}
	}
	live.History = hist
	return live, nil
}

// liveStats asks the VM's host for its current meters.
func (s *VMServer) liveStats(ctx context.Context, name string, vm *basaltv1.VM, st *basaltv1.VMStatus) (*basaltv1.VMStats, error) {
	if !running(st) || st.GetHost() != vm.GetHost() {
		return nil, status.Errorf(codes.FailedPrecondition, "VM %q is %s: meters exist only while it runs", name, stateWord(observedState(vm, st)))
	}
	c, err := s.compute(ctx, st.GetHost())
	if err != nil {
		return nil, err
	}
	return c.GetVMStats(ctx, &basaltv1.GetVMStatsRequest{Name: name})
}
