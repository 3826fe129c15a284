// Package basaltv1 holds the generated Go code of Basalt's public API (the .proto files beside it) and the few
// hand-written helpers every client of the API needs. Generated files end in .pb.go; `make proto` rewrites them.
package basaltv1

import (
	"fmt"
	"strings"
)

// Name is the short, lower-case name of a node kind: "metad", "blockd", "computed" or "netd".
func (k NodeKind) Name() string {
	return strings.ToLower(strings.TrimPrefix(k.String(), "NODE_KIND_"))
}

// ParseNodeKind is the inverse of NodeKind.Name; "" is UNSPECIFIED (every kind).
func ParseNodeKind(s string) (NodeKind, error) {
	if s == "" {
		return NodeKind_NODE_KIND_UNSPECIFIED, nil
	}
	if v, ok := NodeKind_value["NODE_KIND_"+strings.ToUpper(s)]; ok && v != 0 {
		return NodeKind(v), nil
	}
	return 0, fmt.Errorf("unknown node kind %q (want metad, blockd, computed or netd)", s)
}

// Name is the short, lower-case name of a node state: "up" or "down".
func (s NodeState) Name() string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "NODE_STATE_"))
}

// CheckpointNamed returns the volume's live checkpoint called name, or nil.
func (v *Volume) CheckpointNamed(name string) *Checkpoint {
	for _, c := range v.GetCheckpoints() {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

// AttachedExport is the NBD export name a host opens an attached volume with: the volume and the attachment
// generation it was given ("VOLUME?generation=N"). Writes through the session carry the generation, and an
// exclusive volume refuses them once its attachment has moved on (docs/fencing.md).
func AttachedExport(volume string, generation uint64) string {
	if generation == 0 {
		return volume
	}
	return fmt.Sprintf("%s?generation=%d", volume, generation)
}

// ParseAttachedExport splits an export name made by AttachedExport; a name without "?generation=" has
// generation 0.
func ParseAttachedExport(export string) (volume string, generation uint64, err error) {
	volume, gen, ok := strings.Cut(export, "?")
	if !ok {
		return export, 0, nil
	}
	num, ok := strings.CutPrefix(gen, "generation=")
	if !ok {
		return "", 0, fmt.Errorf("export %q: want VOLUME?generation=N", export)
	}
	if _, err := fmt.Sscan(num, &generation); err != nil || generation == 0 || fmt.Sprint(generation) != num {
		return "", 0, fmt.Errorf("export %q: generation %q is not a positive number", export, num)
	}
	return volume, generation, nil
}
