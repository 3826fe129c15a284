// Package engine is the local storage engine of one blockd node: it stores,
// durably and with checksums, the objects (ObjectSize pieces of volumes)
// that this node holds replicas of. Placement, replication, recovery and
// the NBD server are other packages that call it; this one knows nothing of
// epochs, peers or clients. It depends on the standard library,
// github.com/google/btree and golang.org/x/sys/unix only, so it can be
// tested, fuzzed and benchmarked on its own.
//
// # Design
//
// Storage is a log: data is only ever appended, never overwritten in
// place. Three reasons:
//
//   - Torn writes. An in-place overwrite torn by a crash cannot be told
//     from a good block unless its checksum is written atomically with it,
//     which needs a journal, that is writing everything twice. An
//     append-only log is its own journal: a torn append is the end of the
//     log, found by its checksums and cut off at recovery.
//   - Snapshots. Checkpoints and clones (redirect-on-write, O(1)
//     snapshots) follow from never overwriting: an old version stays where
//     it is for as long as a snapshot references it.
//   - Speed. Sequential appends are the fastest write pattern on every
//     device, and one append position makes group commit natural.
//
// The log is a sequence of segment files (seg-<16 hex digits>.log, 256 MiB
// by default). A record is a 64-byte header (type, object, block range,
// caller's version, sequence number, CRC32C of header and CRC array), then
// for a write one CRC32C per 4 KiB block and the blocks themselves. Records
// are packed (8-byte aligned), not padded to 4 KiB: a 4 KiB write costs
// 4168 bytes, not 8192. Records store whole blocks only; a write of part
// of a block is merged with the block's current content first, with an
// optimistic compare-and-swap against concurrent writers of the same block.
//
// In memory, each object has a B-tree of extents mapping block ranges to
// the record that holds them, and each segment a table of the CRCs of its
// blocks, so a read is one pread per extent and verifies every block it
// returns. Memory grows with data written (about 1 MiB per GiB for CRCs
// plus 32 bytes per extent), never with volume size: a petabyte volume
// with one block written costs one extent.
//
// Open replays the log, reading headers and CRC arrays but not data, except
// for the tail of the last segment written after the last sync marker: a
// crash may have torn it, so its data is verified and the segment is cut at
// the first bad record. Damage anywhere else is reported as ErrCorrupt, not
// skipped. Sync and FUA writes share fdatasyncs (group commit). A
// collector copies the live blocks of mostly-dead segments to the head and
// deletes them once the copies are durable.
//
// docs/engine.md describes the format byte by byte, recovery, collection,
// durability, memory use, limits and what is left for later (index
// checkpoints for fast restarts, snapshot generations).
package engine
