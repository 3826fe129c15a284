// Package backup writes, verifies, lists and restores backups of Basalt volumes in a plain directory, with the
// format described in docs/backup.md. It is the engine of `basalt backup`; the CLI only parses flags and prints.
//
// A backup directory holds, per volume, a chain of points: a full point, then incremental points that each
// hold only what changed since the point before. A point is a directory with point.json (what the point is,
// where each extent's bytes are, and SHA-256 checksums of the data and of point.json itself) and data (the
// extents' bytes, concatenated). Points are written in a temporary directory, made durable, then renamed into
// place, so a point that exists is complete.
//
// Create takes a checkpoint of the volumes through the API (one checkpoint for all of them: a consistency
// group), and reads the checkpoint export VOLUME@CHECKPOINT over NBD: everything allocated for a full point,
// only the changed extents (CheckpointService.GetChangedExtents) for an incremental one. Restore checks the
// whole chain before it creates anything, writes a new volume through NBD, and deletes that volume if
// anything fails. Verify checks everything without a cluster.
//
// It depends on the API types (proto/basalt/v1, reached through the small interfaces in api.go, which the
// generated gRPC clients satisfy) and on the NBD client (blockd/nbd/client). It never imports a daemon's
// internals.
package backup
