package dataplane

import (
	"fmt"
	"hash/fnv"
)

// Extension ports. A port with PortPolicy.Extension has two host-side interfaces: its tap (the VM's side,
// up but attached to nothing) and an extension tap "<prefix>e<8 hex digits>" the plane creates and attaches
// to the bridge in the tap's place, with all of the port's policy. An external filter process (run by
// netd/extension) holds a packet socket on the tap and a queue of the extension tap and moves frames between
// them, inspecting, changing, dropping or originating them on the way (docs/netd.md, "Extensions").
//
// The extension tap has no carrier while no process holds it, so a port whose filter is not running is cut
// off (fails closed); mirroring and bandwidth limits stay on the VM's tap, where the VM's traffic is.

// ExtensionTap is the name of the bridge-side tap of the extension port whose tap is tap.
func ExtensionTap(prefix, tap string) string {
	h := fnv.New32a()
	h.Write([]byte(tap))
	return fmt.Sprintf("%se%08x", prefix, h.Sum32())
}

// ExtensionTap is the name of the bridge-side tap of the extension port whose tap is tap, for this plane.
func (p *Plane) ExtensionTap(tap string) string { return ExtensionTap(p.prefix, tap) }
