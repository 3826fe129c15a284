// Package buildinfo reports which build of Basalt is running. It depends on nothing but the standard library;
// every binary and the API report the same string.
package buildinfo

import "runtime/debug"

// version is set at link time by the Makefile (-X .../buildinfo.version=...).
var version string

// Version returns the build's version: the linker-stamped one, else the module version, else "dev".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
