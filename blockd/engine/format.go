package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// On-disk format. docs/engine.md describes it byte by byte; keep the two in
// step. All integers are little-endian.

const (
	// BlockSize is the engine's unit of storage and of checksumming: the
	// log stores whole blocks only, each with its own CRC32C.
	BlockSize = 4096
	// SectorSize is the alignment of offsets and lengths passed to the
	// engine. Writes that cover part of a block are merged with the
	// block's current content (read-modify-write) inside the engine.
	SectorSize = 512
	// ObjectSize is the logical size of one object: a volume's address
	// space is cut into objects of this size, and every offset passed to
	// the engine is within one object.
	ObjectSize = 4 << 20

	objectBlocks = ObjectSize / BlockSize

	segMagic      = "BSLTSEG1"
	segVersion    = 1
	segHeaderSize = 64

	recMagic      = 0x5243_4c42 // "BLCR" read as little-endian bytes
	recHeaderSize = 64

	// maxRecordBlocks caps one record's data at 1 MiB, so that a large
	// write does not hold the append position for long and a segment is
	// filled to within 1 MiB of its size.
	maxRecordBlocks = 256
)

// Record types.
const (
	recWrite   = 1 // count blocks of data follow, with count CRCs
	recTrim    = 2 // blocks [start, start+count) become holes
	recVersion = 3 // the object's version is at least version
	recSync    = 4 // every byte of this segment before aux was durable
	recClear   = 5 // every layer of the object loses the blocks of records with a lower sequence number
)

// Record flags.
const (
	flagGC   = 1 << 0 // written by the garbage collector (a copy)
	flagZero = 1 << 1 // TRIM: the blocks become zero extents in the record's layer instead of being removed
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func crc32c(p []byte) uint32 { return crc32.Checksum(p, crcTable) }

// recHeader is the decoded fixed header of a record.
type recHeader struct {
	typ     uint8
	flags   uint8
	count   uint32 // blocks: of data (write) or of range (trim)
	start   uint32 // first block in the object
	id      ObjectID
	version uint64
	seq     uint64
	aux     uint64 // recSync: durable offset
	tag     uint32 // WRITE, TRIM: the layer tag (raw: effective layers are derived from it at replay)
}

func align8(n int64) int64 { return (n + 7) &^ 7 }

// crcArrayLen is the length of the CRC array of a record, padded to 8 bytes.
func (h *recHeader) crcArrayLen() int64 {
	if h.typ != recWrite {
		return 0
	}
	return align8(4 * int64(h.count))
}

// length is the whole record's length on disk.
func (h *recHeader) length() int64 {
	n := int64(recHeaderSize) + h.crcArrayLen()
	if h.typ == recWrite {
		n += int64(h.count) * BlockSize
	}
	return n
}

// encode writes the header into b[:recHeaderSize] and the CRC array into
// the bytes after it, then seals both with the header CRC. b must have room
// for recHeaderSize+crcArrayLen bytes.
func (h *recHeader) encode(b []byte, crcs []uint32) []byte {
	n := recHeaderSize + int(h.crcArrayLen())
	b = b[:n]
	le := binary.LittleEndian
	le.PutUint32(b[0:], recMagic)
	b[4] = h.typ
	b[5] = h.flags
	le.PutUint16(b[6:], 0)
	le.PutUint32(b[8:], h.count)
	le.PutUint32(b[12:], h.start)
	le.PutUint64(b[16:], h.id.Volume)
	le.PutUint64(b[24:], h.id.Index)
	le.PutUint64(b[32:], h.version)
	le.PutUint64(b[40:], h.seq)
	le.PutUint64(b[48:], h.aux)
	le.PutUint32(b[56:], h.tag)
	if h.typ == recWrite {
		for i, c := range crcs {
			le.PutUint32(b[recHeaderSize+4*i:], c)
		}
		for i := recHeaderSize + 4*len(crcs); i < n; i++ {
			b[i] = 0
		}
	}
	sum := crc32.Update(crc32c(b[:60]), crcTable, b[recHeaderSize:n])
	le.PutUint32(b[60:], sum)
	return b
}

var (
	errBadRecord = errors.New("bad record")
	errTorn      = errors.New("record extends past the end of the segment")
)

// decodeHeader checks the fixed fields of a record header. It does not
// check the header CRC, which also covers the CRC array.
func decodeHeader(b []byte) (recHeader, error) {
	le := binary.LittleEndian
	if le.Uint32(b[0:]) != recMagic {
		return recHeader{}, fmt.Errorf("%w: bad magic %#x", errBadRecord, le.Uint32(b[0:]))
	}
	h := recHeader{
		typ:     b[4],
		flags:   b[5],
		count:   le.Uint32(b[8:]),
		start:   le.Uint32(b[12:]),
		id:      ObjectID{Volume: le.Uint64(b[16:]), Index: le.Uint64(b[24:])},
		version: le.Uint64(b[32:]),
		seq:     le.Uint64(b[40:]),
		aux:     le.Uint64(b[48:]),
		tag:     le.Uint32(b[56:]),
	}
	if h.flags&flagZero != 0 && h.typ != recTrim {
		return recHeader{}, fmt.Errorf("%w: zero flag on a record of type %d", errBadRecord, h.typ)
	}
	switch h.typ {
	case recWrite, recTrim:
		if h.count == 0 || h.start >= objectBlocks || h.count > objectBlocks-h.start {
			return recHeader{}, fmt.Errorf("%w: block range %d+%d out of object", errBadRecord, h.start, h.count)
		}
		if h.seq == 0 {
			return recHeader{}, fmt.Errorf("%w: zero sequence number", errBadRecord)
		}
	case recVersion, recClear:
		if h.count != 0 || h.start != 0 || h.seq == 0 || h.tag != 0 {
			return recHeader{}, fmt.Errorf("%w: malformed record of type %d", errBadRecord, h.typ)
		}
	case recSync:
		if h.count != 0 || h.start != 0 || h.tag != 0 {
			return recHeader{}, fmt.Errorf("%w: malformed sync record", errBadRecord)
		}
	default:
		return recHeader{}, fmt.Errorf("%w: unknown type %d", errBadRecord, h.typ)
	}
	return h, nil
}

// checkHeaderCRC verifies the CRC that seals a header and its CRC array;
// b holds both.
func checkHeaderCRC(b []byte) error {
	want := binary.LittleEndian.Uint32(b[60:])
	got := crc32.Update(crc32c(b[:60]), crcTable, b[recHeaderSize:])
	if got != want {
		return fmt.Errorf("%w: header checksum %#x, stored %#x", errBadRecord, got, want)
	}
	return nil
}

// segHeader is the first segHeaderSize bytes of every segment file.
type segHeader struct {
	id       uint64
	firstSeq uint64 // every record written to the segment has seq >= firstSeq, except copied trims
}

func (h segHeader) encode() []byte {
	b := make([]byte, segHeaderSize)
	le := binary.LittleEndian
	copy(b, segMagic)
	le.PutUint32(b[8:], segVersion)
	le.PutUint32(b[12:], BlockSize)
	le.PutUint64(b[16:], h.id)
	le.PutUint64(b[24:], h.firstSeq)
	le.PutUint32(b[60:], crc32c(b[:60]))
	return b
}

func decodeSegHeader(b []byte) (segHeader, error) {
	le := binary.LittleEndian
	if string(b[:8]) != segMagic {
		return segHeader{}, errors.New("not a segment (bad magic)")
	}
	if got, want := crc32c(b[:60]), le.Uint32(b[60:]); got != want {
		return segHeader{}, fmt.Errorf("segment header checksum %#x, stored %#x", got, want)
	}
	if v := le.Uint32(b[8:]); v != segVersion {
		return segHeader{}, fmt.Errorf("unsupported segment format version %d", v)
	}
	if bs := le.Uint32(b[12:]); bs != BlockSize {
		return segHeader{}, fmt.Errorf("segment block size %d, want %d", bs, BlockSize)
	}
	return segHeader{id: le.Uint64(b[16:]), firstSeq: le.Uint64(b[24:])}, nil
}
