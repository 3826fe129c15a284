// Package nbd implements the server side of the Network Block Device
// protocol, as specified in the NBD project's doc/proto.md. blockd uses it
// to expose volumes to hypervisors (qemu, the Linux nbd driver, libnbd
// tools) without a kernel module on the storage side.
//
// What lives here: the fixed-newstyle handshake (NBD_OPT_GO/INFO/LIST,
// structured replies, the base:allocation metadata context), the
// transmission phase (read, write, flush, trim, write-zeroes, cache, block
// status, FUA), request validation, and the mapping from Go errors to NBD
// errnos. What does not: storage. The server calls a [Backend] per export;
// blockd's storage engine and replication layer implement Backend, and an
// [ExportSource] (backed by metad) decides which exports exist. This package
// depends on the standard library only so that it can be tested, fuzzed and
// profiled on its own, and so that the storage packages can depend on it
// and not the other way round.
//
// Why not github.com/pojntfx/go-nbd: its server handles one request at a
// time per connection, implements only READ, WRITE and DISC (no FLUSH, TRIM,
// WRITE_ZEROES, block status or structured replies), and drops the
// connection when the backend fails instead of replying with an NBD error.
// A block store behind a hypervisor needs queue depth, flush/FUA for crash
// consistency, discard for thin provisioning, and errors the guest can see
// and retry.
//
// # Concurrency
//
// Each connection has one goroutine reading requests and a fixed pool of
// [Server.Workers] goroutines calling the backend, so many requests are in
// flight at once and replies go out in completion order, which the protocol
// allows. The reader never waits for a backend call, only for a free
// worker, which bounds the memory held by queued write payloads. Each reply
// is written whole, with one write call, under a per-connection lock.
//
// # Export size
//
// The export size is read from the [Export] when a client negotiates it and
// is fixed for the life of that connection, because NBD has no way to tell
// a connected client that the size changed. After an online resize,
// clients see the new size when they reconnect.
package nbd
