// Package record is the test guest's on-disk and on-console record format, shared by the guest agent that
// writes it and the host-side checks that read it. A record is one 4 KiB block in a ring on the guest's first
// disk: record n lives in slot n mod slots. Every byte of the block is determined by the record's header and
// covered by a CRC-32C at its end, so a torn or misplaced write cannot pass for a good record. It depends on
// the standard library only, because the agent is a static binary built from it.
package record

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"strings"
	"time"
)

// Size is the size of a record on disk, the unit the agent writes with O_DIRECT.
const Size = 4096

// Magic opens every record block.
const Magic = "BSLTREC1"

// LinePrefix opens every line the agent prints on the serial console.
const LinePrefix = "BASALT "

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one tick of the agent's counter.
type Record struct {
	// Seq counts from 1 and never repeats on one disk: after a restart the agent resumes from the highest valid
	// record it finds.
	Seq uint64
	// Time is the guest's wall clock when the agent made the record.
	Time time.Time
	// Boot identifies the guest boot that wrote the record (random per boot).
	Boot uint64
	// CRC is the CRC-32C of the block's first Size-4 bytes; it is what the block ends with.
	CRC uint32
}

const headerLen = 32 // magic, seq, time, boot

// Encode fills b (Size bytes) with r's block and returns r with its CRC set.
func Encode(b []byte, r Record) Record {
	if len(b) != Size {
		panic("record: Encode needs a Size-byte block")
	}
	copy(b, Magic)
	binary.LittleEndian.PutUint64(b[8:], r.Seq)
	binary.LittleEndian.PutUint64(b[16:], uint64(r.Time.UnixNano()))
	binary.LittleEndian.PutUint64(b[24:], r.Boot)
	// The filler depends on the sequence number, so a stale block from an older pass over the ring that a
	// torn write left half in place cannot match the new header's CRC.
	x := r.Seq*0x9E3779B97F4A7C15 ^ r.Boot
	for i := headerLen; i < Size-4; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	r.CRC = crc32.Checksum(b[:Size-4], castagnoli)
	binary.LittleEndian.PutUint32(b[Size-4:], r.CRC)
	return r
}

// ErrEmpty means the block holds no record (never written).
var ErrEmpty = errors.New("no record")

// Decode reads a block. It returns ErrEmpty for a block that does not start with Magic and an error for a block
// that does but fails its CRC (a torn or corrupted write).
func Decode(b []byte) (Record, error) {
	if len(b) != Size {
		return Record{}, fmt.Errorf("record: block of %d bytes", len(b))
	}
	if string(b[:len(Magic)]) != Magic {
		return Record{}, ErrEmpty
	}
	r := Record{
		Seq:  binary.LittleEndian.Uint64(b[8:]),
		Time: time.Unix(0, int64(binary.LittleEndian.Uint64(b[16:]))),
		Boot: binary.LittleEndian.Uint64(b[24:]),
		CRC:  binary.LittleEndian.Uint32(b[Size-4:]),
	}
	if got := crc32.Checksum(b[:Size-4], castagnoli); got != r.CRC {
		return r, fmt.Errorf("record seq %d: CRC %08x, block says %08x", r.Seq, got, r.CRC)
	}
	return r, nil
}

// Line is the console line the agent prints once record r is durable on disk.
func Line(r Record) string {
	return fmt.Sprintf("%srec seq=%d t=%d boot=%016x crc=%08x", LinePrefix, r.Seq, r.Time.UnixNano(), r.Boot, r.CRC)
}

// Fields splits a console line of the agent into its kind ("rec", "mem", "dev", ...) and key=value fields; ok
// is false for any other line.
func Fields(line string) (kind string, fields map[string]string, ok bool) {
	i := strings.Index(line, LinePrefix)
	if i < 0 {
		return "", nil, false
	}
	parts := strings.Fields(line[i+len(LinePrefix):])
	if len(parts) == 0 {
		return "", nil, false
	}
	fields = map[string]string{}
	for _, p := range parts[1:] {
		k, v, found := strings.Cut(p, "=")
		if !found {
			return "", nil, false
		}
		fields[k] = v
	}
	return parts[0], fields, true
}

// ParseLine parses a "rec" console line.
func ParseLine(line string) (Record, error) {
	kind, f, ok := Fields(line)
	if !ok || kind != "rec" {
		return Record{}, fmt.Errorf("not a record line: %q", line)
	}
	var r Record
	var err error
	if r.Seq, err = strconv.ParseUint(f["seq"], 10, 64); err != nil {
		return r, fmt.Errorf("record line %q: seq: %w", line, err)
	}
	t, err := strconv.ParseInt(f["t"], 10, 64)
	if err != nil {
		return r, fmt.Errorf("record line %q: t: %w", line, err)
	}
	r.Time = time.Unix(0, t)
	if r.Boot, err = strconv.ParseUint(f["boot"], 16, 64); err != nil {
		return r, fmt.Errorf("record line %q: boot: %w", line, err)
	}
	crc, err := strconv.ParseUint(f["crc"], 16, 32)
	if err != nil {
		return r, fmt.Errorf("record line %q: crc: %w", line, err)
	}
	r.CRC = uint32(crc)
	// The CRC covers the whole block, which the header determines: recompute it to catch a garbled line.
	var b [Size]byte
	if want := Encode(b[:], r); want.CRC != r.CRC {
		return r, fmt.Errorf("record line %q: CRC %08x does not match its fields (%08x)", line, r.CRC, want.CRC)
	}
	return r, nil
}

// The guest agent channel (VM monitoring): a virtio-serial port the host's computed holds the other end of.
// The agent writes a heartbeat line every second and obeys command lines the host sends.
const (
	// AgentPort is the port's name, as the guest finds it in /sys/class/virtio-ports/*/name; the same as
	// computed/hypervisor's AgentPort (the agent cannot import it and stay a standard-library program).
	AgentPort = "org.basalt.agent.0"
	// CmdHang makes the agent stop beating and stop writing counter records until the next boot: a hung guest,
	// as VM monitoring sees it.
	CmdHang = "hang"
)

// BeatLine is heartbeat seq (counting from 1 at each boot) of the boot with id boot, as the agent writes it to
// the agent channel, newline included. It is also a console-style line, so Fields parses it ("beat").
func BeatLine(seq, boot uint64) string {
	return fmt.Sprintf("%sbeat seq=%d boot=%016x\n", LinePrefix, seq, boot)
}

// ParseBeat parses a heartbeat line (with or without its newline).
func ParseBeat(line string) (seq, boot uint64, err error) {
	kind, f, ok := Fields(strings.TrimSpace(line))
	if !ok || kind != "beat" {
		return 0, 0, fmt.Errorf("not a heartbeat line: %q", line)
	}
	if seq, err = strconv.ParseUint(f["seq"], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("heartbeat line %q: seq: %w", line, err)
	}
	if boot, err = strconv.ParseUint(f["boot"], 16, 64); err != nil {
		return 0, 0, fmt.Errorf("heartbeat line %q: boot: %w", line, err)
	}
	return seq, boot, nil
}
