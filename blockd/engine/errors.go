package engine

import (
	"errors"
	"fmt"
	"syscall"
)

// Errors returned by the engine. They are wrapped with what was being done;
// test for them with errors.Is.
var (
	// ErrCorrupt reports a block or record whose checksum does not match.
	// Read wraps it in a *CorruptError that names the damaged range, so the
	// replication layer can repair it from a good replica with a Write.
	ErrCorrupt = errors.New("engine: checksum mismatch")
	// ErrClosed is returned by every call after Close.
	ErrClosed = errors.New("engine: closed")
	// ErrInvalid reports an offset or length that is not a multiple of
	// SectorSize, or a range that does not fit in one object.
	ErrInvalid = errors.New("engine: invalid argument")
	// ErrNoSpace reports that the file system is full (ENOSPC or EDQUOT);
	// the NBD layer replies ENOSPC to the client.
	ErrNoSpace = errors.New("engine: no space left on device")
	// ErrFailed is wrapped by every write after an fdatasync failed. After
	// a failed fdatasync the kernel may have dropped dirty pages, so the
	// only safe continuation is to close and reopen the engine, which
	// re-verifies the tail of the log.
	ErrFailed = errors.New("engine: failed, reopen required")
)

// CorruptError names the range of an object whose stored checksum does not
// match its data. errors.Is(err, ErrCorrupt) is true for it.
type CorruptError struct {
	ID ObjectID
	// Offset and Length are in bytes within the object, aligned to
	// BlockSize: the whole blocks to rewrite to heal the damage.
	Offset, Length int64
	// Layer is the effective tag of the layer holding the bad blocks. A
	// Write with that tag heals them only if no record of a higher tag
	// was merged into the layer (see docs/engine.md, Layers); copying the
	// object again (ClearObject, then its layers) always does.
	Layer uint32
	// Where the first bad block is stored, for the operator.
	Segment    string
	FileOffset int64
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("engine: object %v: checksum mismatch in [%d, %d) (first bad block at %s offset %d)",
		e.ID, e.Offset, e.Offset+e.Length, e.Segment, e.FileOffset)
}

// Unwrap makes errors.Is(err, ErrCorrupt) true.
func (e *CorruptError) Unwrap() error { return ErrCorrupt }

// noSpaceError is a full file system: errors.Is matches both ErrNoSpace
// and the errno.
type noSpaceError struct{ errno error }

func (e *noSpaceError) Error() string   { return ErrNoSpace.Error() + " (" + e.errno.Error() + ")" }
func (e *noSpaceError) Unwrap() []error { return []error{ErrNoSpace, e.errno} }

// ioErr wraps an error from the file system with what was being done, and
// with ErrNoSpace when the file system is full.
func ioErr(what string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%s: %w", what, &noSpaceError{err})
	}
	return fmt.Errorf("%s: %w", what, err)
}
