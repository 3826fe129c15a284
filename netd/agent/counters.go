package agent

import (
	"context"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// GetPortCounters reads a local port's counters from the kernel: the data plane's policy counters and the
// statistics of its host-side interface (what the host receives on the tap is what the VM sent).
func (a *Agent) GetPortCounters(ctx context.Context, r *basaltv1.GetPortCountersRequest) (*basaltv1.PortCounters, error) {
	name := portName(r.GetNetwork(), r.GetName())
	a.mu.Lock()
	p := a.ports[name]
	var tap string
	programmed := false
	if a.applied != nil {
		for _, lp := range a.applied.Ports {
			if lp.Name == name {
				programmed, tap = true, lp.Tap
			}
		}
	}
	a.mu.Unlock()
	switch {
	case p == nil:
		return nil, status.Errorf(codes.NotFound, "port %q does not exist in network %q", r.GetName(), r.GetNetwork())
	case p.GetHost() != a.cfg.NodeID:
		return nil, status.Errorf(codes.FailedPrecondition, "port %q is bound to %q, not to this host %q", r.GetName(), p.GetHost(), a.cfg.NodeID)
	case !programmed:
		return nil, status.Errorf(codes.Unavailable, "port %q is not programmed on %q yet", r.GetName(), a.cfg.NodeID)
	}
	all, err := a.cfg.Plane.Counters(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read counters: %v", err)
	}
	c := all[name]
	out := &basaltv1.PortCounters{
		Network: r.GetNetwork(), Name: r.GetName(), Host: a.cfg.NodeID,
		SpoofDrops:     &basaltv1.Counter{Packets: c.SpoofDrops.Packets, Bytes: c.SpoofDrops.Bytes},
		DhcpDrops:      &basaltv1.Counter{Packets: c.DHCPDrops.Packets, Bytes: c.DHCPDrops.Bytes},
		IsolationDrops: &basaltv1.Counter{Packets: c.IsolationDrops.Packets, Bytes: c.IsolationDrops.Bytes},
	}
	for _, ac := range c.ACL {
		out.Acl = append(out.Acl, &basaltv1.AclCounter{Id: ac.ID, Packets: ac.Packets, Bytes: ac.Bytes})
	}
	if l, err := a.nl.LinkByName(tap); err == nil && l.Attrs().Statistics != nil {
		s := l.Attrs().Statistics
		out.FromVm = &basaltv1.Counter{Packets: s.RxPackets, Bytes: s.RxBytes}
		out.ToVm = &basaltv1.Counter{Packets: s.TxPackets, Bytes: s.TxBytes}
	}
	return out, nil
}
