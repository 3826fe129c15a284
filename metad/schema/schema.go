// Package schema is the layout of Basalt's keys in etcd and the rules for the names that appear in them. It is
// the single place that spells a key; docs/metadata.md describes the same layout for operators. It depends only
// on the standard library.
//
// Every key lives under Root. Records are protobuf messages (binary wire format) from proto/basalt/v1.
package schema

import (
	"fmt"
	"strings"
)

// Root prefixes every Basalt key; the version segment lets a future incompatible layout live beside this one.
const Root = "/basalt/v1/"

// Cluster holds the ClusterInfo record, written once when the cluster is initialised.
const Cluster = Root + "cluster"

// NodesPrefix holds one Node record per registered node, keyed by node ID. Registrations are permanent
// until a node is removed.
const NodesPrefix = Root + "nodes/"

// AlivePrefix holds one Liveness record per running node, attached to the node's lease: the key vanishes when
// the node stops renewing it.
const AlivePrefix = Root + "alive/"

// ClusterMap holds the ClusterMap record: storage nodes, pools and the epoch placement is computed at.
const ClusterMap = Root + "clustermap"

// VolumesPrefix holds one Volume record per volume, keyed by name.
const VolumesPrefix = Root + "volumes/"

// VolumeIDCounter holds the last volume ID handed out (decimal text); IDs are never reused.
const VolumeIDCounter = Root + "counters/volume-id"

// RecoveryPrefix holds one PGRecovery record per PG whose primary is recovering members, keyed "<pool>.<pg>".
const RecoveryPrefix = Root + "recovery/"

// RecoveryKey is the key of a PG's recovery progress.
func RecoveryKey(pool, pg uint32) string { return fmt.Sprintf("%s%d.%d", RecoveryPrefix, pool, pg) }

// VolumeKey is the key of a volume's record.
func VolumeKey(name string) string { return VolumesPrefix + name }

// ElectionsPrefix holds the etcd election keys of leader-elected controllers, one sub-prefix per election.
const ElectionsPrefix = Root + "elections/"

// NodeKey is the key of a node's registration.
func NodeKey(id string) string { return NodesPrefix + id }

// AliveKey is the key of a node's lease-bound liveness record.
func AliveKey(id string) string { return AlivePrefix + id }

// ElectionPrefix is the prefix of one named election.
func ElectionPrefix(name string) string { return ElectionsPrefix + name + "/" }

// IDFromKey returns the last segment of a key under prefix.
func IDFromKey(prefix, key string) string { return strings.TrimPrefix(key, prefix) }

// MaxNameLen bounds names so keys stay short and names fit in NBD export names and interface names.
const MaxNameLen = 63

// ValidateName checks a node ID or object name: 1 to 63 characters, lower-case letters, digits, '-', '_' and
// '.', starting with a letter or digit. what names the thing being named, for the error message.
func ValidateName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", what)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%s name %q is %d characters long; the limit is %d", what, name, len(name), MaxNameLen)
	}
	for i, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		default:
			return fmt.Errorf("%s name %q: character %q at position %d is not allowed (use a-z, 0-9, and '-', '_', '.' after the first character)", what, name, r, i+1)
		}
	}
	return nil
}
