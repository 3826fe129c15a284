package nbd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants from the NBD protocol specification (doc/proto.md), those
// this server uses. Names follow the specification without the NBD_ prefix,
// so that they can be looked up there.

const (
	magicNBD        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt   uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply   uint64 = 0x0003e889045565a9
	magicRequest    uint32 = 0x25609513
	magicSimple     uint32 = 0x67446698
	magicStructured uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4
	repErrUnsup    uint32 = 1<<31 + 1
	repErrPolicy   uint32 = 1<<31 + 2
	repErrInvalid  uint32 = 1<<31 + 3
	repErrUnknown  uint32 = 1<<31 + 6
	repErrShutdown uint32 = 1<<31 + 7
	repErrTooBig   uint32 = 1<<31 + 9
)

// Information types for NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 + 1
)

// Error values carried in replies.
const (
	errnoPerm     uint32 = 1
	errnoIO       uint32 = 5
	errnoInval    uint32 = 22
	errnoNoSpc    uint32 = 28
	errnoNotSup   uint32 = 95
	errnoShutdown uint32 = 108
)

// Flags of the base:allocation metadata context.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

const (
	metaContextAllocation = "base:allocation"
	// allocationContextID is the ID we hand out for base:allocation in
	// NBD_OPT_SET_META_CONTEXT. Any value works.
	allocationContextID uint32 = 1
	// metaContextDirtyPrefix names a dirty bitmap context, as QEMU does:
	// "qemu:dirty-bitmap:NAME". Its one flag, stateDirty, marks ranges
	// changed since the bitmap's point.
	metaContextDirtyPrefix        = "qemu:dirty-bitmap:"
	dirtyContextID         uint32 = 2
	stateDirty             uint32 = 1 << 0
)

// Message sizes.
const (
	requestHeaderLen    = 28
	simpleReplyLen      = 16
	structuredHeaderLen = 20
	optHeaderLen        = 16
	optReplyHeaderLen   = 20
	// maxStringLen is the protocol's limit for names and messages.
	maxStringLen = 4096
)

// request is one transmission-phase request as read off the wire, plus what
// the reader decided about it before handing it to a worker.
type request struct {
	cookie uint64
	off    uint64
	length uint32
	flags  uint16
	typ    uint16

	// errno, when non-zero, is the reply to send without calling the
	// backend; msg explains it to a human.
	errno uint32
	msg   string
	// buf holds a WRITE payload at buf[hdrRoom:hdrRoom+length].
	buf *[]byte
}

// decodeRequest parses a request header. Only a bad magic is an error: it
// means the stream is out of sync, and the connection must be dropped.
// Everything else is judged by session.check, which can answer with an
// errno and keep the connection.
func decodeRequest(b []byte, r *request) error {
	if len(b) < requestHeaderLen {
		return fmt.Errorf("request header of %d bytes, want %d", len(b), requestHeaderLen)
	}
	if m := binary.BigEndian.Uint32(b[0:]); m != magicRequest {
		return fmt.Errorf("bad request magic %#08x", m)
	}
	r.flags = binary.BigEndian.Uint16(b[4:])
	r.typ = binary.BigEndian.Uint16(b[6:])
	r.cookie = binary.BigEndian.Uint64(b[8:])
	r.off = binary.BigEndian.Uint64(b[16:])
	r.length = binary.BigEndian.Uint32(b[24:])
	return nil
}

// putSimpleReply encodes a simple reply header into b[:simpleReplyLen].
func putSimpleReply(b []byte, errno uint32, cookie uint64) {
	_ = b[simpleReplyLen-1]
	binary.BigEndian.PutUint32(b[0:], magicSimple)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// putChunkHeader encodes a structured reply chunk header into
// b[:structuredHeaderLen].
func putChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[structuredHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:], magicStructured)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
}
