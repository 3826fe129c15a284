package schema

// VMs and compute hosts (docs/compute.md). A VM has two records so that each has one writer: its declaration
// (VM, written by metad) and its status (VMStatus, written by the computed the VM is assigned to).

// VMsPrefix holds one VM record per VM, keyed by name: the declaration (spec, desired state, host, migration).
// metad writes declarations that change what a host must hold (starts, migrations, memory) with a transaction
// that compares the whole prefix with the revision it read, so two such writes never commit the same host
// memory twice.
const VMsPrefix = Root + "vms/"

// VMStatusPrefix holds one VMStatus record per VM that a host has reported on, keyed by name.
const VMStatusPrefix = Root + "vmstatus/"

// ComputeHostsPrefix holds one ComputeHost record per computed, keyed by node ID: what the host offers.
const ComputeHostsPrefix = Root + "compute/hosts/"

// HostMaintenancePrefix holds one HostMaintenance record per host in maintenance, keyed by node ID.
const HostMaintenancePrefix = Root + "compute/maintenance/"

// VMKey is the key of a VM's declaration.
func VMKey(name string) string { return VMsPrefix + name }

// VMStatusKey is the key of a VM's status.
func VMStatusKey(name string) string { return VMStatusPrefix + name }

// ComputeHostKey is the key of a computed's host record.
func ComputeHostKey(node string) string { return ComputeHostsPrefix + node }

// HostMaintenanceKey is the key of a host's maintenance record.
func HostMaintenanceKey(node string) string { return HostMaintenancePrefix + node }

// VMMeteringPrefix holds one VMMeteringHistory record per VM, keyed by name: its metering samples, appended by
// the host it runs on (one write a minute) and bounded in length.
const VMMeteringPrefix = Root + "metering/"

// VMMeteringKey is the key of a VM's metering history.
func VMMeteringKey(name string) string { return VMMeteringPrefix + name }
