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
//     it is for as long as a checkpoint's layer references it.
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
// In memory, each object has, per layer, a B-tree of extents mapping block
// ranges to the record that holds them, and each segment a table of the
// CRCs of its blocks, so a read is one pread per extent and verifies every
// block it returns. Memory grows with data written (about 1 MiB per GiB
// for CRCs plus 32 bytes per extent), never with volume size: a petabyte
// volume with one block written costs one extent.
//
// # Layers
//
// Every write and trim carries a layer tag: the id of its volume's newest
// checkpoint (0 if none). An object is a stack of layers keyed by tag; a
// view reads the head (all layers) or a checkpoint c (the layers below c).
// Within a layer the record with the higher (tag, sequence number) wins.
// Trims above layer 0, and opaque trims, record zero extents, which hide
// what is beneath; a range in no layer is a hole the caller may fill from a
// linked clone's parent. DeleteCheckpoint records the deletion durably in a
// small table and then merges the layer into the one below in memory,
// object by object: the blocks it shadows become garbage for the
// collector, and no data is copied. Changed, Layers/ReadLayer, ClearObject
// and Usage serve incremental copies, wholesale copies and accounting.
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
// layers and merges, durability, memory use, limits and what is left for
// later (index checkpoints for fast restarts).
package engine
