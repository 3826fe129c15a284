package nbdclient

import "strconv"

// Wire constants from the NBD protocol specification (doc/proto.md). Names follow the specification without
// the NBD_ prefix, so that they can be looked up there.

const (
	magicNBD        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt   uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOldstyle   uint64 = 0x00420281861253
	magicOptReply   uint64 = 0x0003e889045565a9
	magicRequest    uint32 = 0x25609513
	magicSimple     uint32 = 0x67446698
	magicStructured uint32 = 0x668e33ef
)

// Handshake flags sent by the server, and the client's answer.
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
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	optExportName      uint32 = 1
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optSetMetaContext  uint32 = 10
)

// Option reply types. Errors have the top bit set.
const (
	repAck          uint32 = 1
	repInfo         uint32 = 3
	repMetaContext  uint32 = 4
	repFlagError    uint32 = 1 << 31
	repErrUnsup     uint32 = repFlagError + 1
	repErrPolicy    uint32 = repFlagError + 2
	repErrInvalid   uint32 = repFlagError + 3
	repErrPlatform  uint32 = repFlagError + 4
	repErrTLSReqd   uint32 = repFlagError + 5
	repErrUnknown   uint32 = repFlagError + 6
	repErrShutdown  uint32 = repFlagError + 7
	repErrBlockSize uint32 = repFlagError + 8
	repErrTooBig    uint32 = repFlagError + 9
)

// Information types for NBD_OPT_GO.
const (
	infoExport    uint16 = 0
	infoBlockSize uint16 = 3
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeErrorBit    uint16 = 1 << 15
	replyTypeError       uint16 = replyTypeErrorBit + 1
	replyTypeErrorOffset uint16 = replyTypeErrorBit + 2
)

// Flags of the base:allocation metadata context.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

const metaContextAllocation = "base:allocation"

// Sizes.
const (
	requestHeaderLen  = 28
	optReplyHeaderLen = 20
	// maxStringLen is the protocol's limit for export names and messages.
	maxStringLen = 4096
	// maxOptReply bounds the data of one option reply we accept; real replies are a few hundred bytes.
	maxOptReply = 1 << 20
	// defaultMaxBlock is the largest read or write a client may send when the server states no limit.
	defaultMaxBlock = 32 << 20
	// defaultPort is the IANA port of NBD.
	defaultPort = "10809"
)

func cmdName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block status"
	}
	return "command " + strconv.Itoa(int(typ))
}
