package schema

import "time"

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

// VMMeteringPrefix holds VMs' metering histories: per VM, one VMMeteringHistory record per hour of samples
// (keyed "<vm>/<hour>", the hour in UTC as 2006-01-02T15), appended by the host the VM runs on once a minute.
// An append rewrites one small record, never a day's worth: etcd keeps every version until it compacts.
const VMMeteringPrefix = Root + "metering/"

// VMMeteringVMPrefix is the prefix of one VM's metering records.
func VMMeteringVMPrefix(name string) string { return VMMeteringPrefix + name + "/" }

// VMMeteringKey is the key of the record of a VM's samples that end in the hour of t.
func VMMeteringKey(name string, t time.Time) string {
	return VMMeteringVMPrefix(name) + t.UTC().Format("2006-01-02T15")
}
