package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Host is one hypervisor host: a network namespace with a blockd and a computed.
type Host struct {
	// Name is h1, h2, ...; NS the namespace (bch-h1); IP its address.
	Name, NS string
	IP       netip.Addr
	// Dir holds the host's data, run directory and logs; DiskDir is its tmpfs (blockd's data lives below).
	Dir, DiskDir string
	Blockd       *Daemon
	Computed     *Daemon

	c *Cluster
}

// ComputedID is the host's computed node ID, the name the API knows the host by.
func (h *Host) ComputedID() string { return h.Computed.ID }

// RunDir is computed's run directory: a subdirectory per VM with its console log.
func (h *Host) RunDir() string { return filepath.Join(h.Dir, "vms") }

// NBDAddr is the TCP address of the host's blockd NBD server.
func (h *Host) NBDAddr() string { return net.JoinHostPort(h.IP.String(), strconv.Itoa(NBDPort)) }

// Daemons returns the host's daemons.
func (h *Host) Daemons() []*Daemon { return []*Daemon{h.Blockd, h.Computed} }

// Procs lists the host's live processes (daemons and hypervisors).
func (h *Host) Procs() ([]Proc, error) { return procsIn(h.NS) }

// Kill SIGKILLs every process of the host, QEMU included, and waits until none is left: the host died.
func (h *Host) Kill(ctx context.Context) error {
	if err := killNS(ctx, h.NS); err != nil {
		return fmt.Errorf("kill host %s: %w", h.Name, err)
	}
	for _, d := range h.Daemons() {
		if err := d.waitExit(ctx); err != nil {
			return fmt.Errorf("kill host %s: %w", h.Name, err)
		}
	}
	return nil
}

// Freeze SIGSTOPs every process of the host and waits until all are stopped: the host hangs.
func (h *Host) Freeze(ctx context.Context) error {
	err := signalAll(ctx, h.NS, syscall.SIGSTOP, func(ps []Proc) bool {
		for _, p := range ps {
			if !p.Stopped() {
				return false
			}
		}
		return true
	}, 10*time.Second)
	if err != nil {
		return fmt.Errorf("freeze host %s: %w", h.Name, err)
	}
	return nil
}

// Thaw SIGCONTs every process of the host: it wakes up, unaware that time has passed.
func (h *Host) Thaw(ctx context.Context) error {
	err := signalAll(ctx, h.NS, syscall.SIGCONT, func(ps []Proc) bool {
		for _, p := range ps {
			if p.Stopped() {
				return false
			}
		}
		return true
	}, 10*time.Second)
	if err != nil {
		return fmt.Errorf("thaw host %s: %w", h.Name, err)
	}
	return nil
}

// PartitionMode is how a host is cut off.
type PartitionMode int

const (
	// LinkDown pulls the cable: the root end of the host's veth goes down, both ends lose carrier.
	LinkDown PartitionMode = iota
	// Firewall drops every packet in and out of the host's eth0 with nftables inside its namespace; the link
	// stays up.
	Firewall
)

func (m PartitionMode) String() string {
	if m == Firewall {
		return "nftables drop"
	}
	return "link down"
}

// Partition cuts the host off the network.
func (h *Host) Partition(mode PartitionMode) error {
	if mode == Firewall {
		return setFirewall(h.NS, true)
	}
	return setCable(h.NS, false)
}

// Heal undoes both kinds of partition.
func (h *Host) Heal() error {
	return errors.Join(setFirewall(h.NS, false), setCable(h.NS, true))
}

// FillDisk fills the host's blockd file system and returns the bytes it took.
func (h *Host) FillDisk() (int64, error) { return fill(h.DiskDir) }

// FreeDisk removes what FillDisk wrote.
func (h *Host) FreeDisk() error { return freeSpace(h.DiskDir) }

// DiskFree returns the free bytes on the host's blockd file system.
func (h *Host) DiskFree() (int64, error) { return diskFree(h.DiskDir) }

// Revive starts the host's daemons that are not running (after Kill) and waits until both are up with their
// new process: the host came back.
func (h *Host) Revive(ctx context.Context) error {
	var started []*Daemon
	for _, d := range h.Daemons() {
		if d.Running() {
			continue
		}
		if err := d.start(); err != nil {
			return fmt.Errorf("revive host %s: %w", h.Name, err)
		}
		started = append(started, d)
	}
	if err := h.c.WaitUp(ctx, started, time.Minute); err != nil {
		return fmt.Errorf("revive host %s: %w", h.Name, err)
	}
	return nil
}

// Member is an etcd member (EtcdMembers 3).
type Member struct {
	Name, NS  string
	IP        netip.Addr
	ClientURL string
	Daemon    *Daemon
}

// Kill SIGKILLs the member.
func (m *Member) Kill(ctx context.Context) error {
	if err := killNS(ctx, m.NS); err != nil {
		return fmt.Errorf("kill etcd member %s: %w", m.Name, err)
	}
	return m.Daemon.waitExit(ctx)
}
