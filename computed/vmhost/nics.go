package vmhost

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// NICs and live migration. A VM's NIC is a netd port, and the port's host is the netd whose host carries the
// port's traffic: that netd creates the tap and applies the port's policy, and every other netd points the
// port's MAC at that host. A live migration moves the ports in two steps, beside the disks' attachments:
//
//  1. prepare (the target, in PrepareIncoming): incoming_host = the target's netd on every port of the VM.
//     That netd creates the taps with their policy, and the incoming machine opens them; the traffic still
//     goes to host.
//  2. switchover (the source, while the guest is stopped there for the last time, after the disks): host =
//     incoming_host and incoming_host cleared, for all the VM's ports in one etcd transaction. The target's
//     netd takes the traffic, every other netd points the MACs at the target, and the source's netd removes
//     its taps.
//
// A dropped incoming machine (an aborted migration) clears its placement. Source and target must have
// distinct netd: two hypervisors cannot share one tap (docs/netd.md, "Live migration").

// netdNode is this host's netd ("" if it has none).
func (h *Host) netdNode() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.hostRec.GetNetdNode()
}

// updatePort changes the port of a NIC with compare-and-swap, retrying on conflicts; fn returns false to leave
// it unchanged, or an error to give up. It returns the port as it is stored afterwards.
func (h *Host) updatePort(ctx context.Context, n *basaltv1.VMNic, fn func(*basaltv1.Port) (bool, error)) (*basaltv1.Port, error) {
	key := schema.PortKey(n.GetNetwork(), n.GetPort())
	for {
		rec, err := store.Get[basaltv1.Port](ctx, h.cfg.Store, key)
		if err != nil {
			return nil, err
		}
		change, err := fn(rec.Value)
		if err != nil || !change {
			return rec.Value, err
		}
		_, err = h.cfg.Store.Update(ctx, key, rec.Value, rec.ModRevision)
		if !errors.Is(err, store.ErrConflict) {
			return rec.Value, err
		}
	}
}

// prepareNICs gives every port of vm's NICs an incoming placement on this host's netd and waits for the taps
// that netd creates, and returns the NICs of the incoming machine: the same IDs, MACs and taps, in the same
// order, as the source's (machineSpec puts them after the disks, so the PCI layouts match). Errors are gRPC
// statuses; on error no placement of this host's stays behind.
func (h *Host) prepareNICs(ctx context.Context, vm *basaltv1.VM) ([]hypervisor.NIC, error) {
	nics := vm.GetSpec().GetNics()
	if len(nics) == 0 {
		return nil, nil
	}
	netd := h.netdNode()
	if netd == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "this host (%s) has no netd: it cannot take a VM with NICs", h.cfg.NodeID)
	}
	done := false
	defer func() {
		if !done {
			h.clearIncomingPorts(ctx, nics)
		}
	}()
	ports := make([]*basaltv1.Port, len(nics))
	for i, n := range nics {
		var sameNetd bool
		p, err := h.updatePort(ctx, n, func(p *basaltv1.Port) (bool, error) {
			sameNetd = p.GetHost() == netd
			if sameNetd || p.GetIncomingHost() == netd {
				return false, nil
			}
			p.IncomingHost = netd
			return true, nil
		})
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "prepare port %s/%s on netd %s: %v", n.GetNetwork(), n.GetPort(), netd, err)
		}
		if sameNetd {
			// Its tap is the one the source's hypervisor holds, and a tap admits one hypervisor only.
			return nil, status.Errorf(codes.FailedPrecondition,
				"port %s/%s already lives on netd %s, this host's: the source and the target share one netd (two computed on one machine, as in basalt up), and the source's hypervisor holds the port's tap, which a second one cannot open; migrate to a host with its own netd",
				n.GetNetwork(), n.GetPort(), netd)
		}
		ports[i] = p
	}
	// The placements are all written before waiting: netd creates the taps in one apply.
	out := make([]hypervisor.NIC, 0, len(nics))
	for i, n := range nics {
		if err := h.waitForTap(ctx, ports[i].GetTap(), 30*time.Second); err != nil {
			return nil, status.Errorf(codes.Unavailable, "port %s/%s: %v", n.GetNetwork(), n.GetPort(), err)
		}
		out = append(out, nicOf(n, ports[i]))
	}
	done = true
	return out, nil
}

// clearIncomingPorts removes this host's incoming placement from the ports of nics (an incoming machine that
// goes away without the migration completing); a port placed elsewhere meanwhile, or moved here by the
// switchover, is left as it is.
func (h *Host) clearIncomingPorts(ctx context.Context, nics []*basaltv1.VMNic) {
	netd := h.netdNode()
	if netd == "" || len(nics) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	for _, n := range nics {
		_, err := h.updatePort(ctx, n, func(p *basaltv1.Port) (bool, error) {
			if p.GetIncomingHost() != netd {
				return false, nil
			}
			p.IncomingHost = ""
			return true, nil
		})
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			h.log.Warn("clear the incoming placement of a port", "port", n.GetNetwork()+"/"+n.GetPort(), "netd", netd, "err", err)
		}
	}
}

// portsNotMoved is switchover's error when the disks' attachments have moved to the target but the ports have
// not: the guest can then only go on at the target, and its ports are to be moved after the migration.
type portsNotMoved struct{ err error }

func (e *portsNotMoved) Error() string { return e.err.Error() }
func (e *portsNotMoved) Unwrap() error { return e.err }

// movePorts makes the target's netd the host of every port of vm's NICs, in one etcd transaction, so that all
// the VM's traffic moves at once. Each port must carry the target's incoming placement (PrepareIncoming set
// it), or already be the target's. From here on the source's taps go away.
func (h *Host) movePorts(ctx context.Context, vm *basaltv1.VM, target string) error {
	nics := vm.GetSpec().GetNics()
	if len(nics) == 0 {
		return nil
	}
	start := time.Now()
	th, err := store.Get[basaltv1.ComputeHost](ctx, h.cfg.Store, schema.ComputeHostKey(target))
	if err != nil {
		return fmt.Errorf("move the ports to %s: read its host record: %w", target, err)
	}
	netd := th.Value.GetNetdNode()
	if netd == "" {
		return fmt.Errorf("move the ports to %s: it has no netd", target)
	}
	for attempt := 0; ; attempt++ {
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		var names []string
		for _, n := range nics {
			name := n.GetNetwork() + "/" + n.GetPort()
			rec, err := store.Get[basaltv1.Port](ctx, h.cfg.Store, schema.PortKey(n.GetNetwork(), n.GetPort()))
			if err != nil {
				return fmt.Errorf("move port %s to netd %s: %w", name, netd, err)
			}
			p := rec.Value
			switch {
			case p.GetIncomingHost() == netd:
			case p.GetHost() == netd && p.GetIncomingHost() == "":
				continue // moved already (a retry)
			default:
				return fmt.Errorf("move port %s to netd %s: it is not prepared there (host %q, incoming host %q)", name, netd, p.GetHost(), p.GetIncomingHost())
			}
			p.Host, p.IncomingHost = netd, ""
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(p)
			if err != nil {
				return fmt.Errorf("move port %s: %w", name, err)
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(rec.Key), "=", rec.ModRevision))
			ops = append(ops, clientv3.OpPut(rec.Key, string(b)))
			names = append(names, name)
		}
		if len(ops) == 0 {
			return nil
		}
		resp, err := h.cfg.Store.Client.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return fmt.Errorf("move ports %s to netd %s: %w", strings.Join(names, ", "), netd, err)
		}
		if resp.Succeeded {
			h.log.Info("ports moved", "vm", vm.GetName(), "ports", names, "netd", netd, "revision", resp.Header.Revision,
				"took", time.Since(start).Round(time.Microsecond))
			return nil
		}
		// A port changed since it was read (its policy, say): read them again.
		if attempt >= 20 {
			return fmt.Errorf("move ports %s to netd %s: they keep changing", strings.Join(names, ", "), netd)
		}
	}
}
