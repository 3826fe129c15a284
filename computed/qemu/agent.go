package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// Agent connects to the guest agent channel (Spec.Agent): the virtio-serial port's chardev socket. Only one
// stream may be open at a time, as for the console (QEMU serves one client on the socket and would silently
// queue a second). While no stream is open, QEMU tells the guest the host end is closed.
func (m *machine) Agent(ctx context.Context) (io.ReadWriteCloser, error) {
	if !m.hasAgent {
		return nil, m.errf(hypervisor.ErrNoAgent, "agent")
	}
	m.mu.Lock()
	if m.agentOpen {
		m.mu.Unlock()
		return nil, m.errf(errors.New("already open"), "agent")
	}
	m.agentOpen = true
	m.mu.Unlock()
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", m.paths.agent)
	if err != nil {
		m.mu.Lock()
		m.agentOpen = false
		m.mu.Unlock()
		return nil, m.errf(err, "agent")
	}
	return &agentConn{Conn: conn, m: m}, nil
}

type agentConn struct {
	net.Conn
	m    *machine
	once sync.Once
}

func (c *agentConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.m.mu.Lock()
		c.m.agentOpen = false
		c.m.mu.Unlock()
	})
	return err
}

// Reset is QEMU's system_reset: the guest restarts from its firmware (or kernel) at once, QEMU and its
// sockets stay. It refuses a machine whose guest is not here to reset: one waiting for an incoming migration
// (its state is about to be overwritten) or one that migrated away (the guest runs on the destination now).
func (m *machine) Reset(ctx context.Context) error {
	st, err := m.status(ctx)
	if err != nil {
		return m.errf(err, "reset")
	}
	switch st.Status {
	case "inmigrate", "postmigrate", "finish-migrate":
		return m.errf(fmt.Errorf("the machine is %s", st.Status), "reset")
	}
	if err := m.qmp.Execute(ctx, "system_reset", nil, nil); err != nil {
		return m.errf(err, "reset")
	}
	return nil
}
