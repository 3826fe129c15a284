package nbdclient

import (
	"errors"
	"fmt"
)

// Errors a server can report, as sentinel values: an [*Error] from a request matches the one for its errno
// with errors.Is, so callers need not know NBD's numbers.
var (
	ErrPermission   = errors.New("operation not permitted (EPERM)")
	ErrIO           = errors.New("input/output error (EIO)")
	ErrNoMemory     = errors.New("out of memory (ENOMEM)")
	ErrInvalid      = errors.New("invalid argument (EINVAL)")
	ErrNoSpace      = errors.New("no space left on device (ENOSPC)")
	ErrOverflow     = errors.New("value too large (EOVERFLOW)")
	ErrNotSupported = errors.New("operation not supported (ENOTSUP)")
	ErrShutdown     = errors.New("server is shutting down (ESHUTDOWN)")
)

// Errors of the client itself.
var (
	// ErrClosed is returned by calls on a connection after Close.
	ErrClosed = errors.New("nbd connection closed")
	// ErrUnknownExport is returned (wrapped) by Dial when the server has no export of that name.
	ErrUnknownExport = errors.New("no such export")
)

// NBD errno values (the protocol's, which are Linux's).
const (
	errnoPerm     uint32 = 1
	errnoIO       uint32 = 5
	errnoNoMem    uint32 = 12
	errnoInval    uint32 = 22
	errnoNoSpc    uint32 = 28
	errnoOverflow uint32 = 75
	errnoNotSup   uint32 = 95
	errnoShutdown uint32 = 108
)

// Error is a request the server failed.
type Error struct {
	// Op is the command: "read", "write", "flush", "trim", "write-zeroes" or "block status".
	Op             string
	Offset, Length uint64
	// Errno is the NBD error value the server sent.
	Errno uint32
	// Message is the server's explanation, when it sent one (structured replies only).
	Message string
}

func (e *Error) Error() string {
	s := fmt.Sprintf("nbd %s of %d bytes at offset %d: %v", e.Op, e.Length, e.Offset, e.Unwrap())
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap returns the sentinel error for the errno. The protocol asks clients to treat a value they do not
// know as EINVAL.
func (e *Error) Unwrap() error {
	switch e.Errno {
	case errnoPerm:
		return ErrPermission
	case errnoIO:
		return ErrIO
	case errnoNoMem:
		return ErrNoMemory
	case errnoInval:
		return ErrInvalid
	case errnoNoSpc:
		return ErrNoSpace
	case errnoOverflow:
		return ErrOverflow
	case errnoNotSup:
		return ErrNotSupported
	case errnoShutdown:
		return ErrShutdown
	}
	return ErrInvalid
}

// optError is an option the server refused during the handshake.
type optError struct {
	opt, typ uint32
	msg      string
}

func (e *optError) Error() string {
	what := map[uint32]string{
		repErrUnsup:     "not supported",
		repErrPolicy:    "forbidden by the server's policy",
		repErrInvalid:   "invalid",
		repErrPlatform:  "not supported on the server's platform",
		repErrTLSReqd:   "refused: the server requires TLS (nbds://), which this client does not support",
		repErrUnknown:   "unknown export",
		repErrShutdown:  "refused: the server is shutting down",
		repErrBlockSize: "refused: block size constraints required",
		repErrTooBig:    "too big",
	}[e.typ]
	if what == "" {
		what = fmt.Sprintf("refused with error %#x", e.typ)
	}
	s := fmt.Sprintf("option %s %s", optName(e.opt), what)
	if e.msg != "" {
		s += ": " + e.msg
	}
	return s
}

func optName(opt uint32) string {
	switch opt {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option %d", opt)
}
