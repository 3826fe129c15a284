package osd

import (
	"context"
	"fmt"
	"strings"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Fencing (docs/fencing.md). A volume's record lists its attachments, each with a generation, and every write
// carries the generation its NBD session was opened with. The primary admits a write only if that generation
// belongs to one of the volume's attachments that is not incoming (a migration's destination before the
// switchover); a write without a generation only if the volume has no such attachment. So once metad has moved
// a volume's attachment on and every up blockd has seen that (SyncView), the old holder can never write again,
// whatever its sessions still have queued.

// fenceVerdict is what the attachment rule says about one write.
type fenceVerdict int

const (
	admit fenceVerdict = iota
	refuse
	// lagging: the generation is newer than any this node's view knows, so the view lags etcd; wait for it.
	lagging
)

// checkGeneration applies the attachment rule to a write carrying generation gen. It allocates only to refuse.
func checkGeneration(vol *basaltv1.Volume, gen uint64) (fenceVerdict, error) {
	attached := false
	for _, a := range vol.GetAttachments() {
		if a.GetIncoming() {
			continue
		}
		if gen != 0 && a.GetGeneration() == gen {
			return admit, nil
		}
		attached = true
	}
	switch {
	case gen == 0 && !attached:
		return admit, nil
	case gen > vol.GetAttachGeneration():
		return lagging, nil
	}
	return refuse, errFenced(vol, gen)
}

// errFenced explains a refused write: PermissionDenied, which the gateway does not retry and the NBD client sees
// as EPERM.
func errFenced(vol *basaltv1.Volume, gen uint64) error {
	var holders, incoming []string
	for _, a := range vol.GetAttachments() {
		h := fmt.Sprintf("host %s at generation %d", a.GetHost(), a.GetGeneration())
		if a.GetIncoming() {
			incoming = append(incoming, h)
			if a.GetGeneration() == gen {
				return status.Errorf(codes.PermissionDenied, "volume %q: generation %d belongs to host %s's incoming migration, which accepts no writes before the switchover", vol.GetName(), gen, a.GetHost())
			}
			continue
		}
		holders = append(holders, h)
	}
	where := "not attached"
	if len(holders) > 0 {
		where = "attached to " + strings.Join(holders, ", ")
	}
	if len(incoming) > 0 {
		where += "; incoming: " + strings.Join(incoming, ", ")
	}
	if gen == 0 {
		return status.Errorf(codes.PermissionDenied, "volume %q is %s: writes from sessions opened without an attachment generation are refused", vol.GetName(), where)
	}
	return status.Errorf(codes.PermissionDenied, "volume %q is fenced for generation %d (%s)", vol.GetName(), gen, where)
}

// internalKey marks the context of a write this node makes on its own behalf, not a client's (trimming what a
// shrink cut off): no attachment generation applies to it. A context value never crosses gRPC, so no other
// node and no client can claim it.
type internalKey struct{}

func internalWrite(ctx context.Context) context.Context {
	return context.WithValue(ctx, internalKey{}, true)
}

func isInternal(ctx context.Context) bool { return ctx.Value(internalKey{}) != nil }

// DrainWrites returns once every write this node admitted before the call has finished (or ctx ends). Writes
// admitted after the call are not waited for, so it returns under a steady load too. With the view already
// current, it means no write admitted under an older view of the volumes is still to land.
func (o *OSD) DrainWrites(ctx context.Context) error {
	c := o.ckpt
	c.mu.Lock()
	p := c.period
	c.period++
	var waits []chan struct{}
	for q, n := range c.admitted {
		if q > p || n == 0 {
			continue
		}
		ch := c.periodDone[q]
		if ch == nil {
			ch = make(chan struct{})
			c.periodDone[q] = ch
		}
		waits = append(waits, ch)
	}
	c.mu.Unlock()
	for _, ch := range waits {
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for writes admitted before: %w", ctx.Err())
		}
	}
	return nil
}
