package nbd

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"unicode/utf8"
)

// Errors a Backend returns to choose the errno the client sees. Wrap them
// with context, for example
//
//	return fmt.Errorf("writing extent %d of volume %s: %w", ext, vol, nbd.ErrNoSpace)
//
// The server finds them with errors.Is, so any depth of wrapping works, and
// the wrapped message is sent to clients that negotiated structured replies
// (qemu and libnbd show it to the user). An error that matches none of
// these is reported as EIO. A bare syscall.Errno (as returned by os file
// operations) is mapped to the closest NBD errno.
var (
	// ErrPermission is reported as EPERM. Fenced writers (a replica that
	// lost its lease) return it so that the client stops writing.
	ErrPermission = errors.New("nbd: operation not permitted")
	// ErrIO is reported as EIO.
	ErrIO = errors.New("nbd: input/output error")
	// ErrInvalid is reported as EINVAL.
	ErrInvalid = errors.New("nbd: invalid argument")
	// ErrNoSpace is reported as ENOSPC.
	ErrNoSpace = errors.New("nbd: no space left on device")
	// ErrNotSupported is reported as ENOTSUP to a WRITE_ZEROES with the
	// FAST_ZERO flag, which is the only place the protocol allows it. From
	// WriteZeroes without FastOnly it makes the server fall back to writing
	// zero buffers; from Trim it makes the trim a successful no-op (trim
	// is advisory); elsewhere it is reported as EINVAL.
	ErrNotSupported = errors.New("nbd: operation not supported")
	// ErrShutdown is reported as ESHUTDOWN, which tells the client to
	// disconnect. Cancellation of the request context (server shutdown)
	// is reported the same way.
	ErrShutdown = errors.New("nbd: server is shutting down")

	// ErrNoSuchExport is returned (wrapped) by an ExportSource for a name
	// it does not know.
	ErrNoSuchExport = errors.New("nbd: no such export")
)

// errnoFor maps a backend error to the NBD errno for a request of type
// typ with command flags flags.
func errnoFor(err error, typ, flags uint16) uint32 {
	e := classify(err)
	if e == errnoNotSup && !(typ == cmdWriteZeroes && flags&cmdFlagFastZero != 0) {
		// The spec reserves ENOTSUP for fast-zero requests; clients treat
		// unexpected values as EINVAL anyway, so say so.
		e = errnoInval
	}
	return e
}

func classify(err error) uint32 {
	switch {
	case errors.Is(err, ErrPermission):
		return errnoPerm
	case errors.Is(err, ErrNoSpace):
		return errnoNoSpc
	case errors.Is(err, ErrInvalid):
		return errnoInval
	case errors.Is(err, ErrNotSupported):
		return errnoNotSup
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return errnoShutdown
	case errors.Is(err, ErrIO):
		return errnoIO
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return errnoPerm
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			// The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
			return errnoNoSpc
		case syscall.EINVAL:
			return errnoInval
		case syscall.EOPNOTSUPP:
			return errnoNotSup
		case syscall.ESHUTDOWN:
			return errnoShutdown
		}
	}
	return errnoIO
}

// maxErrorMessage bounds the human-readable text in an error chunk. The
// protocol allows 4096 bytes; backend errors longer than this are chains of
// context nobody reads on a console.
const maxErrorMessage = 1024

// appendMessage appends msg to b as a protocol string: valid UTF-8, no NUL
// bytes, at most maxErrorMessage bytes, cut on a rune boundary.
func appendMessage(b []byte, msg string) []byte {
	if !utf8.ValidString(msg) {
		msg = strings.ToValidUTF8(msg, "?")
	}
	if strings.IndexByte(msg, 0) >= 0 {
		msg = strings.ReplaceAll(msg, "\x00", "?")
	}
	if len(msg) > maxErrorMessage {
		n := maxErrorMessage
		for n > 0 && !utf8.RuneStart(msg[n]) {
			n--
		}
		msg = msg[:n]
	}
	return append(b, msg...)
}
