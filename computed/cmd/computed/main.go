// Command computed is a Basalt compute node: it runs the VMs the cluster assigns to it through a hypervisor
// driver (QEMU by default), serves their consoles and meters, and live-migrates them. See docs/compute.md.
package main

import (
	"os"

	"github.com/basalt-hv/basalt/computed/daemon"
)

func main() {
	var c daemon.Config
	os.Exit(daemon.Daemon(&c).Main(os.Args[1:]))
}
