package cloudhv

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// The client side of the NBD fixed-newstyle handshake (doc/proto.md in the NBD project), enough to select an
// export with NBD_OPT_GO and hand the connection to the kernel. github.com/pojntfx/go-nbd has a client for
// this, but it is not available from the Go module proxy this project builds with, and the handshake is small.

const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	nbdIHaveOpt      = 0x49484156454F5054 // "IHAVEOPT"
	nbdOldstyleMagic = 0x00420281861253
	nbdReplyMagic    = 0x0003e889045565a9

	nbdFlagFixedNewstyle = 1 << 0
	nbdFlagNoZeroes      = 1 << 1

	nbdOptGo = 7

	nbdRepAck  = 1
	nbdRepInfo = 3

	nbdInfoExport    = 0
	nbdInfoBlockSize = 3

	nbdRepFlagError = 1 << 31

	// maxNBDReplyData bounds an option reply we are willing to read; the replies to NBD_OPT_GO are a few bytes.
	maxNBDReplyData = 1 << 20
)

// Transmission flags (NBD_FLAG_*), as the server reports them for an export and as NBD_SET_FLAGS takes them.
const (
	NBDFlagHasFlags        = 1 << 0
	NBDFlagReadOnly        = 1 << 1
	NBDFlagSendFlush       = 1 << 2
	NBDFlagSendFUA         = 1 << 3
	NBDFlagRotational      = 1 << 4
	NBDFlagSendTrim        = 1 << 5
	NBDFlagSendWriteZeroes = 1 << 6
	NBDFlagSendDF          = 1 << 7
	NBDFlagCanMultiConn    = 1 << 8
	NBDFlagSendResize      = 1 << 9
	NBDFlagSendCache       = 1 << 10
	NBDFlagSendFastZero    = 1 << 11
)

// NBDExport is what the server said about the export during the handshake.
type NBDExport struct {
	Size uint64
	// Flags are the transmission flags (NBDFlag*).
	Flags uint16
	// Block size constraints from NBD_INFO_BLOCK_SIZE; all zero if the server sent none.
	MinBlockSize, PreferredBlockSize, MaxBlockSize uint32
}

// NBDError is an error reply (NBD_REP_ERR_*) to an option.
type NBDError struct {
	Option  uint32
	Type    uint32
	Message string
}

func (e *NBDError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = "(no message)"
	}
	return fmt.Sprintf("nbd server refused option %d with %s: %s", e.Option, nbdReplyName(e.Type), msg)
}

func nbdReplyName(t uint32) string {
	names := map[uint32]string{
		nbdRepFlagError | 1:  "NBD_REP_ERR_UNSUP",
		nbdRepFlagError | 2:  "NBD_REP_ERR_POLICY",
		nbdRepFlagError | 3:  "NBD_REP_ERR_INVALID",
		nbdRepFlagError | 4:  "NBD_REP_ERR_PLATFORM",
		nbdRepFlagError | 5:  "NBD_REP_ERR_TLS_REQD",
		nbdRepFlagError | 6:  "NBD_REP_ERR_UNKNOWN",
		nbdRepFlagError | 7:  "NBD_REP_ERR_SHUTDOWN",
		nbdRepFlagError | 8:  "NBD_REP_ERR_BLOCK_SIZE_REQD",
		nbdRepFlagError | 9:  "NBD_REP_ERR_TOO_BIG",
		nbdRepFlagError | 10: "NBD_REP_ERR_EXT_HEADER_REQD",
	}
	if n, ok := names[t]; ok {
		return n
	}
	return fmt.Sprintf("reply type %#x", t)
}

// NBDHandshake negotiates export on conn with NBD_OPT_GO and leaves conn in the transmission phase with simple
// replies (no structured replies, which the kernel's NBD client does not speak). ctx bounds the handshake; the
// connection's deadline is cleared on return.
func NBDHandshake(ctx context.Context, conn net.Conn, export string) (NBDExport, error) {
	if len(export) > 4096 {
		return NBDExport{}, fmt.Errorf("nbd handshake: export name is %d bytes, longer than the protocol's 4096", len(export))
	}
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return NBDExport{}, fmt.Errorf("nbd handshake: setting deadline: %w", err)
		}
	}
	// Cancellation interrupts blocked reads and writes by moving the deadline into the past.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	exp, err := nbdHandshake(conn, export)
	if !stop() && ctx.Err() != nil {
		return NBDExport{}, fmt.Errorf("nbd handshake for export %q: %w", export, ctx.Err())
	}
	if deadline, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(deadline) {
		// The connection's deadline is the context's: report it as the context's.
		return NBDExport{}, fmt.Errorf("nbd handshake for export %q: %w (%v)", export, context.DeadlineExceeded, err)
	}
	if err != nil {
		return NBDExport{}, fmt.Errorf("nbd handshake for export %q: %w", export, err)
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return NBDExport{}, fmt.Errorf("nbd handshake: clearing deadline: %w", err)
	}
	return exp, nil
}

func nbdHandshake(rw io.ReadWriter, export string) (NBDExport, error) {
	var greeting struct {
		Magic, Opt uint64
		Flags      uint16
	}
	if err := binary.Read(rw, binary.BigEndian, &greeting.Magic); err != nil {
		return NBDExport{}, fmt.Errorf("reading server greeting: %w", err)
	}
	if greeting.Magic != nbdMagic {
		return NBDExport{}, fmt.Errorf("not an NBD server: greeting magic %#x", greeting.Magic)
	}
	if err := binary.Read(rw, binary.BigEndian, &greeting.Opt); err != nil {
		return NBDExport{}, fmt.Errorf("reading server greeting: %w", err)
	}
	if greeting.Opt == nbdOldstyleMagic {
		return NBDExport{}, errors.New("server speaks oldstyle negotiation, which cannot select an export")
	}
	if greeting.Opt != nbdIHaveOpt {
		return NBDExport{}, fmt.Errorf("unexpected newstyle magic %#x", greeting.Opt)
	}
	if err := binary.Read(rw, binary.BigEndian, &greeting.Flags); err != nil {
		return NBDExport{}, fmt.Errorf("reading handshake flags: %w", err)
	}
	if greeting.Flags&nbdFlagFixedNewstyle == 0 {
		return NBDExport{}, errors.New("server does not offer fixed newstyle negotiation, needed for NBD_OPT_GO")
	}
	clientFlags := uint32(nbdFlagFixedNewstyle)
	if greeting.Flags&nbdFlagNoZeroes != 0 {
		clientFlags |= nbdFlagNoZeroes
	}

	// Client flags, then NBD_OPT_GO: export name, and one information request (block size; the export
	// size and flags always come).
	msg := binary.BigEndian.AppendUint32(nil, clientFlags)
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, nbdInfoBlockSize)
	msg = binary.BigEndian.AppendUint64(msg, nbdIHaveOpt)
	msg = binary.BigEndian.AppendUint32(msg, nbdOptGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := rw.Write(msg); err != nil {
		return NBDExport{}, fmt.Errorf("sending NBD_OPT_GO: %w", err)
	}

	var exp NBDExport
	haveExport := false
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(rw, hdr[:]); err != nil {
			return NBDExport{}, fmt.Errorf("reading option reply: %w", err)
		}
		magic := binary.BigEndian.Uint64(hdr[0:8])
		opt := binary.BigEndian.Uint32(hdr[8:12])
		typ := binary.BigEndian.Uint32(hdr[12:16])
		length := binary.BigEndian.Uint32(hdr[16:20])
		if magic != nbdReplyMagic {
			return NBDExport{}, fmt.Errorf("option reply magic %#x", magic)
		}
		if opt != nbdOptGo {
			return NBDExport{}, fmt.Errorf("reply for option %d, expected NBD_OPT_GO", opt)
		}
		if length > maxNBDReplyData {
			return NBDExport{}, fmt.Errorf("option reply of %d bytes is too big", length)
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(rw, payload); err != nil {
			return NBDExport{}, fmt.Errorf("reading option reply data: %w", err)
		}
		switch {
		case typ&nbdRepFlagError != 0:
			return NBDExport{}, &NBDError{Option: opt, Type: typ, Message: string(payload)}
		case typ == nbdRepInfo:
			if len(payload) < 2 {
				return NBDExport{}, fmt.Errorf("NBD_REP_INFO of %d bytes", len(payload))
			}
			switch binary.BigEndian.Uint16(payload[0:2]) {
			case nbdInfoExport:
				if len(payload) != 12 {
					return NBDExport{}, fmt.Errorf("NBD_INFO_EXPORT of %d bytes, want 12", len(payload))
				}
				exp.Size = binary.BigEndian.Uint64(payload[2:10])
				exp.Flags = binary.BigEndian.Uint16(payload[10:12])
				haveExport = true
			case nbdInfoBlockSize:
				if len(payload) != 14 {
					return NBDExport{}, fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes, want 14", len(payload))
				}
				exp.MinBlockSize = binary.BigEndian.Uint32(payload[2:6])
				exp.PreferredBlockSize = binary.BigEndian.Uint32(payload[6:10])
				exp.MaxBlockSize = binary.BigEndian.Uint32(payload[10:14])
			default:
				// Information we did not ask for (name, description) is allowed and ignored.
			}
		case typ == nbdRepAck:
			if !haveExport {
				return NBDExport{}, errors.New("server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT")
			}
			return exp, nil
		default:
			return NBDExport{}, fmt.Errorf("unexpected reply type %#x to NBD_OPT_GO", typ)
		}
	}
}
