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
