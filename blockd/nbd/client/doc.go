// Package nbdclient is a client for the Network Block Device protocol, as specified in the NBD project's
// doc/proto.md. Basalt's tools use it to read checkpoints and write volumes through any blockd (backup and
// restore), and its tests use it against qemu-nbd and nbdkit.
//
// What lives here: NBD URIs (nbd://HOST[:PORT]/EXPORT and nbd+unix:///EXPORT?socket=PATH), the fixed-newstyle
// handshake (NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT "base:allocation", NBD_OPT_GO with block size
// constraints, and a fallback to NBD_OPT_EXPORT_NAME and simple replies for servers that lack them), and the
// transmission phase: read (structured data and hole chunks, or simple replies), write with FUA, trim,
// write-zeroes, flush, block status and disconnect. Many requests may be in flight on one connection: every
// call is tagged with its own cookie and a single reader goroutine hands each reply to its caller, so a [Conn]
// is safe for concurrent use. Errors the server reports are [*Error]s that match the sentinel errors of this
// package ([ErrPermission], [ErrNoSpace], ...) with errors.Is.
//
// It depends on the standard library only. The server side of the protocol is package blockd/nbd; the two
// share no code on purpose, so that each checks the other in tests instead of agreeing on the same mistake.
//
// Why our own client: github.com/pojntfx/go-nbd, the one Go NBD library we considered, is not available from
// the Go module proxy we build with, and its client handles one request at a time without structured replies
// or block status. Oldstyle negotiation, TLS (nbds://) and extended headers are not supported: no server
// Basalt talks to needs them, and each is refused with a clear error rather than half-supported.
package nbdclient
