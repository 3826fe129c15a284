// Package rolling updates a cluster's compute hosts one at a time without stopping their VMs: the engine of
// `basalt cluster update --rolling CMD`; the CLI only parses flags and prints.
//
// For each host in turn, Run records the VMs it holds, drains it (DrainHost: maintenance, and a live migration
// of every VM to other hosts), runs the operator's update command on the machine Run runs on, waits until the
// host's computed is up again, ends the maintenance (UndrainHost) and migrates the recorded VMs back
// (MigrateVM). The first failure stops everything and leaves the host where it is, drained: Run describes
// what state things are in and how to undo it, and the operator decides.
//
// It depends on the API types only (proto/basalt/v1, reached through the small interfaces in api.go, which
// the generated gRPC clients satisfy); it never imports a daemon's internals.
package rolling
