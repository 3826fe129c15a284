package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu/qmp"
)

// portLayout is the machine's device layout as a migration's two ends must share it: which device sits on each
// root port, then the optional devices the driver adds outside the ports (the agent channel). It is read from
// QEMU's object tree (the one truth, also for a machine found after a restart, and also before the guest's
// firmware has numbered the buses, which query-pci would need). Entries are "<device id>:<driver>", empty for a
// free port.
func (m *machine) portLayout(ctx context.Context) ([]string, error) {
	ports, fixed, err := m.deviceLayout(ctx)
	if err != nil {
		return nil, err
	}
	return append(ports, fixed...), nil
}

// deviceLayout returns the root ports' layout (one entry per port) and the optional fixed devices present.
func (m *machine) deviceLayout(ctx context.Context) (ports, fixed []string, err error) {
	var children []struct{ Name, Type string }
	if err := m.qmp.Execute(ctx, "qom-list", map[string]any{"path": "/machine/peripheral"}, &children); err != nil {
		return nil, nil, err
	}
	n := 0
	for _, c := range children {
		if strings.HasPrefix(c.Name, "port") && c.Type == "child<pcie-root-port>" {
			n++
		}
	}
	ports = make([]string, n)
	for _, c := range children {
		driver, ok := strings.CutPrefix(c.Type, "child<")
		if !ok {
			continue
		}
		driver = strings.TrimSuffix(driver, ">")
		if c.Name == agentDevID {
			fixed = append(fixed, c.Name+":"+driver)
			continue
		}
		if !(strings.HasPrefix(c.Name, "disk-") || strings.HasPrefix(c.Name, "nic-")) {
			continue
		}
		var bus string
		if err := m.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/" + c.Name, "property": "parent_bus"}, &bus); err != nil {
			return nil, nil, err
		}
		// The bus of root port portN is /machine/peripheral/portN/portN.
		parts := strings.Split(bus, "/")
		i, err := strconv.Atoi(strings.TrimPrefix(parts[len(parts)-1], "port"))
		if err != nil || i < 0 || i >= n {
			return nil, nil, fmt.Errorf("device %s sits on bus %s, not on one of the %d root ports", c.Name, bus, n)
		}
		ports[i] = c.Name + ":" + driver
	}
	return ports, fixed, nil
}

// layoutDigest is a short fingerprint of a port layout, for comparing a migration's two ends.
func layoutDigest(layout []string) string {
	h := sha256.Sum256([]byte(strings.Join(layout, ",")))
	return hex.EncodeToString(h[:6])
}

// freePort picks the lowest free root port.
func (m *machine) freePort(ctx context.Context, devID string) (int, error) {
	layout, _, err := m.deviceLayout(ctx)
	if err != nil {
		return 0, err
	}
	free := -1
	for i, l := range layout {
		if id, _, _ := strings.Cut(l, ":"); id == devID {
			return 0, fmt.Errorf("%s is already plugged", devID)
		}
		if l == "" && free < 0 {
			free = i
		}
	}
	if free < 0 {
		return 0, fmt.Errorf("all %d PCIe ports are in use", len(layout))
	}
	return free, nil
}

// AddDisk hot-plugs d: its NBD block node first, then the virtio-blk device on a free root port; the
// guest's PCIe hot-plug driver picks it up.
func (m *machine) AddDisk(ctx context.Context, d hypervisor.Disk) error {
	if err := validateDisk(d); err != nil {
		return m.errf(err, "add disk")
	}
	m.hotplug.Lock()
	defer m.hotplug.Unlock()
	port, err := m.freePort(ctx, diskDevID(d.ID))
	if err != nil {
		return m.errf(err, "add disk %s", d.ID)
	}
	if err := m.qmp.Execute(ctx, "blockdev-add", diskBackend(d), nil); err != nil {
		return m.errf(err, "add disk %s: open NBD export %s on %s", d.ID, d.Export, d.NBDSocket)
	}
	if err := m.qmp.Execute(ctx, "device_add", diskDevice(d, port), nil); err != nil {
		if derr := m.qmp.Execute(context.WithoutCancel(ctx), "blockdev-del", map[string]any{"node-name": nodeName(d.ID)}, nil); derr != nil {
			m.d.log.Warn("qemu: block node left behind after a failed hot-plug", "machine", m.spec.ID, "disk", d.ID, "err", derr)
		}
		return m.errf(err, "add disk %s: plug device", d.ID)
	}
	return nil
}

// RemoveDisk unplugs the disk: the device first (which needs the guest to let go of it; QEMU reports the end
// with DEVICE_DELETED), then its block node, which closes the NBD connection. Removing a disk whose device
// is already gone just removes the node, so a removal interrupted by ctx can be retried.
func (m *machine) RemoveDisk(ctx context.Context, id string) error {
	m.hotplug.Lock()
	defer m.hotplug.Unlock()
	gone, err := m.unplug(ctx, diskDevID(id))
	if err != nil {
		return m.errf(err, "remove disk %s", id)
	}
	err = m.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": nodeName(id)}, nil)
	var qe *qmp.Error
	if errors.As(err, &qe) && gone && strings.Contains(qe.Desc, "find node") {
		return m.errf(fmt.Errorf("no disk %s", id), "remove disk")
	}
	if err != nil {
		return m.errf(err, "remove disk %s: close block node", id)
	}
	return nil
}

// AddNIC hot-plugs n: the tap backend, then the virtio-net device on a free root port.
func (m *machine) AddNIC(ctx context.Context, n hypervisor.NIC) error {
	if err := validateNIC(n); err != nil {
		return m.errf(err, "add nic")
	}
	m.hotplug.Lock()
	defer m.hotplug.Unlock()
	port, err := m.freePort(ctx, nicDevID(n.ID))
	if err != nil {
		return m.errf(err, "add nic %s", n.ID)
	}
	if err := m.qmp.Execute(ctx, "netdev_add", nicBackend(n, m.accel == "kvm" && m.d.vhostNet()), nil); err != nil {
		return m.errf(err, "add nic %s: open tap %s", n.ID, n.Tap)
	}
	if err := m.qmp.Execute(ctx, "device_add", nicDevice(n, port), nil); err != nil {
		if derr := m.qmp.Execute(context.WithoutCancel(ctx), "netdev_del", map[string]any{"id": netdevID(n.ID)}, nil); derr != nil {
			m.d.log.Warn("qemu: netdev left behind after a failed hot-plug", "machine", m.spec.ID, "nic", n.ID, "err", derr)
		}
		return m.errf(err, "add nic %s: plug device", n.ID)
	}
	return nil
}

// RemoveNIC unplugs the NIC's device, then removes its tap backend (the tap itself belongs to netd).
func (m *machine) RemoveNIC(ctx context.Context, id string) error {
	m.hotplug.Lock()
	defer m.hotplug.Unlock()
	gone, err := m.unplug(ctx, nicDevID(id))
	if err != nil {
		return m.errf(err, "remove nic %s", id)
	}
	err = m.qmp.Execute(ctx, "netdev_del", map[string]any{"id": netdevID(id)}, nil)
	var qe *qmp.Error
	if errors.As(err, &qe) && gone && qe.Class == "DeviceNotFound" {
		return m.errf(fmt.Errorf("no nic %s", id), "remove nic")
	}
	if err != nil {
		return m.errf(err, "remove nic %s: remove netdev", id)
	}
	return nil
}

// unplug asks for device devID to be removed and waits until QEMU has deleted it. alreadyGone is true when
// there was no such device to begin with.
func (m *machine) unplug(ctx context.Context, devID string) (alreadyGone bool, err error) {
	// Subscribe first: the event may come right after device_del returns.
	sub := m.qmp.Subscribe("DEVICE_DELETED")
	defer sub.Close()
	err = m.qmp.Execute(ctx, "device_del", map[string]any{"id": devID}, nil)
	var qe *qmp.Error
	if errors.As(err, &qe) && qe.Class == "DeviceNotFound" {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("unplug %s: %w", devID, err)
	}
	for {
		ev, err := sub.Next(ctx)
		if errors.Is(err, qmp.ErrEventsDropped) {
			if present, err := m.devicePresent(ctx, devID); err != nil || !present {
				return false, err
			}
			continue
		}
		if err != nil {
			return false, fmt.Errorf("waiting for the guest to release %s: %w", devID, err)
		}
		var data struct{ Device string }
		if json.Unmarshal(ev.Data, &data) == nil && data.Device == devID {
			return false, nil
		}
	}
}

func (m *machine) devicePresent(ctx context.Context, devID string) (bool, error) {
	var children []struct{ Name string }
	if err := m.qmp.Execute(ctx, "qom-list", map[string]any{"path": "/machine/peripheral"}, &children); err != nil {
		return false, err
	}
	for _, c := range children {
		if c.Name == devID {
			return true, nil
		}
	}
	return false, nil
}
