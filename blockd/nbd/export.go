package nbd

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
)

// Backend stores the bytes of one export. The server calls it from many
// goroutines at once (up to Server.Workers per connection, and from every
// connection to the export), so it must be safe for concurrent use.
//
// Offsets and lengths are validated before the call: they lie within the
// export size as negotiated, are aligned to the export's MinBlockSize, and
// lengths of reads and writes do not exceed MaxBlockSize. The byte slices
// passed to ReadAt and WriteAt belong to the server and must not be kept
// after the call returns.
//
// ctx is cancelled when the client disconnects or the server shuts down; a
// backend should then return promptly (with ctx.Err() or a wrapped error),
// because the server waits for in-flight calls before it closes a
// connection.
//
// Errors are reported to the client as NBD errnos; see ErrIO and its
// siblings for how to choose one.
type Backend interface {
	// ReadAt fills p with the bytes at off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. With fua set it returns only once the
	// data is durable.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush returns once every write that completed before it was called
	// is durable.
	Flush(ctx context.Context) error
	// Trim tells the backend the range is no longer needed. It may
	// discard any part of it, or nothing; afterwards the client makes no
	// assumption about the contents. Returning ErrNotSupported is the
	// same as doing nothing.
	Trim(ctx context.Context, off, length int64, fua bool) error
	// WriteZeroes makes the range read back as zeroes. See ZeroFlags.
	WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error
	// BlockStatus describes the allocation of the range starting at off
	// as consecutive extents, the first starting at off. It may describe
	// less than length bytes (the client asks again for the rest) or
	// more (the excess is ignored). Extent lengths should be multiples of
	// MinBlockSize.
	BlockStatus(ctx context.Context, off, length int64) ([]Extent, error)
}

// ZeroFlags qualify a WriteZeroes call.
type ZeroFlags struct {
	// NoHole asks for the range to stay allocated, so that later writes to
	// it cannot fail for lack of space. Without it the backend may
	// deallocate the range.
	NoHole bool
	// FastOnly asks the backend to fail with ErrNotSupported, quickly and
	// without changing anything, unless zeroing is cheaper than writing
	// zeroes. Copy tools use it to decide whether to pre-zero a whole
	// disk.
	FastOnly bool
	// FUA asks for the zeroes to be durable before the call returns.
	FUA bool
}

// Extent is a run of bytes with the same allocation status.
type Extent struct {
	Length int64
	// Hole means the range is not allocated: reads return zeroes and
	// writes may fail with ErrNoSpace.
	Hole bool
	// Zero means the range is known to read as zeroes.
	Zero bool
}

// Export describes one export as offered to clients.
type Export struct {
	// Name is the canonical name of the export, reported by NBD_INFO_NAME.
	// If empty, the name the client asked for is reported.
	Name string
	// Description is shown to humans, for example by nbdinfo.
	Description string
	// Size in bytes. It is read once, when a client selects the export,
	// and fixed for the life of that connection: clients see a resize
	// when they reconnect.
	Size int64
	// MinBlockSize is the smallest request size and alignment the export
	// accepts; requests that are not aligned to it fail with EINVAL. A
	// power of two, at most 64 KiB; 0 means 1.
	MinBlockSize uint32
	// PreferredBlockSize is the size below which the backend has to do
	// read-modify-write. A power of two, at least 512 and at least
	// MinBlockSize; 0 means DefaultPreferredBlockSize (or MinBlockSize if
	// larger).
	PreferredBlockSize uint32
	// MaxBlockSize bounds the length of reads and writes (and of zeroing
	// that is not a fast zero). A multiple of MinBlockSize, at most
	// DefaultMaxBlockSize; 0 means DefaultMaxBlockSize.
	MaxBlockSize uint32
	// ReadOnly exports refuse writes, trims and zeroing with EPERM.
	ReadOnly bool
	// MultiConn says that the backend's cache, if any, is shared by all
	// connections, so that a flush on one connection covers writes
	// completed on another. Clients use several connections only then.
	MultiConn bool
	// Backend serves the export's I/O.
	Backend Backend
}

// DirtyBitmaps is implemented by backends that can tell which ranges changed since a named point (for Basalt,
// a checkpoint). A client selects one as the metadata context "qemu:dirty-bitmap:NAME", the name QEMU's
// incremental backup tools use, and block status then answers it next to base:allocation.
type DirtyBitmaps interface {
	// HasDirtyBitmap reports whether name can be asked about.
	HasDirtyBitmap(ctx context.Context, name string) bool
	// DirtyStatus describes [off, off+length) from its start, in runs changed (Dirty) or not since name.
	DirtyStatus(ctx context.Context, name string, off, length int64) ([]DirtyExtent, error)
}

// DirtyExtent is a run of an export that did or did not change since a dirty bitmap's point.
type DirtyExtent struct {
	Length int64
	Dirty  bool
}

// SessionTracker is implemented by backends that want to know which clients use them: Begin is called when a
// client enters transmission with the export, End when that connection ends. Describing an export
// (NBD_OPT_INFO) calls neither.
type SessionTracker interface {
	Begin()
	End()
}

// ExportSource finds exports by name. It is consulted during the handshake
// only, so the Export it returns is a snapshot for one connection.
type ExportSource interface {
	// Export returns the export called name. The empty name is the
	// client's request for a default export; the source may map it to one
	// or return ErrNoSuchExport. For a name it does not know, it returns
	// an error wrapping ErrNoSuchExport; for a name it cannot accept as
	// written, one wrapping ErrInvalid, whose message the client is shown.
	Export(ctx context.Context, name string) (*Export, error)
	// ExportNames lists the exports offered to NBD_OPT_LIST.
	ExportNames(ctx context.Context) ([]string, error)
}

// Block size defaults, as recommended by the protocol.
const (
	DefaultPreferredBlockSize = 4096
	// DefaultMaxBlockSize is also the hard limit: it is the largest
	// request every client is expected to handle, and it bounds the
	// memory one request can pin.
	DefaultMaxBlockSize = 32 << 20
	maxMinBlockSize     = 64 << 10
)

// blockSizes are an export's block size constraints with defaults applied.
type blockSizes struct {
	min, preferred, max uint32
}

// blockSizes applies defaults and checks the constraints the protocol puts
// on advertised block sizes, so that a misconfigured export is refused at
// the handshake rather than confusing clients.
func (e *Export) blockSizes() (blockSizes, error) {
	if e.Backend == nil {
		return blockSizes{}, errors.New("export has no backend")
	}
	if e.Size < 0 {
		return blockSizes{}, fmt.Errorf("negative export size %d", e.Size)
	}
	bs := blockSizes{min: e.MinBlockSize, preferred: e.PreferredBlockSize, max: e.MaxBlockSize}
	if bs.min == 0 {
		bs.min = 1
	}
	if bs.preferred == 0 {
		bs.preferred = max(DefaultPreferredBlockSize, bs.min)
	}
	if bs.max == 0 {
		bs.max = DefaultMaxBlockSize
	}
	switch {
	case bits.OnesCount32(bs.min) != 1 || bs.min > maxMinBlockSize:
		return blockSizes{}, fmt.Errorf("minimum block size %d is not a power of two up to %d", bs.min, maxMinBlockSize)
	case bits.OnesCount32(bs.preferred) != 1 || bs.preferred < max(bs.min, 512):
		return blockSizes{}, fmt.Errorf("preferred block size %d is not a power of two of at least 512 and the minimum block size", bs.preferred)
	case bs.max > DefaultMaxBlockSize || bs.max%bs.min != 0:
		return blockSizes{}, fmt.Errorf("maximum block size %d is not a multiple of the minimum block size up to %d", bs.max, DefaultMaxBlockSize)
	case int64(bs.max) < min(int64(bs.preferred), e.Size):
		return blockSizes{}, fmt.Errorf("maximum block size %d is smaller than the preferred block size %d", bs.max, bs.preferred)
	}
	return bs, nil
}

// transmissionFlags are the flags advertised for e, given whether
// structured replies were negotiated.
func transmissionFlags(e *Export, structured bool) uint16 {
	f := tflagHasFlags | tflagSendFlush | tflagSendCache
	if e.ReadOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if structured {
		// Reads are always answered with a single data chunk, so "don't
		// fragment" costs nothing; the spec forbids the flag without
		// structured replies.
		f |= tflagSendDF
	}
	if e.MultiConn {
		f |= tflagCanMultiConn
	}
	return f
}
