package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// rawClient is a minimal NBD client for protocol tests and benchmarks. It
// speaks the wire format directly so that tests can send anything,
// including what a real client never would.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader

	structured bool
	size       uint64
	tflags     uint16

	mu      sync.Mutex
	pending map[uint64]uint32 // cookie → length of reads awaiting a simple reply
}

func dialRaw(t testing.TB, network, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return newRawClient(t, nc)
}

func newRawClient(t testing.TB, nc net.Conn) *rawClient {
	// Tests must fail rather than hang when the server misbehaves.
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawClient{t: t, nc: nc, br: bufio.NewReaderSize(nc, 1<<20), pending: map[uint64]uint32{}}
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawClient) readFull(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting and answers with client flags.
func (c *rawClient) greet(cflags uint32) {
	c.t.Helper()
	b := c.readFull(18)
	if m := binary.BigEndian.Uint64(b); m != magicNBD {
		c.t.Fatalf("greeting magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(b[8:]); m != magicIHaveOpt {
		c.t.Fatalf("greeting option magic %#x", m)
	}
	if f := binary.BigEndian.Uint16(b[16:]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.write(binary.BigEndian.AppendUint32(nil, cflags))
}

func (c *rawClient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	c.write(encodeOpt(opt, data))
}

func encodeOpt(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *rawClient) readOptReply() optReply {
	c.t.Helper()
	b := c.readFull(optReplyHeaderLen)
	if m := binary.BigEndian.Uint64(b); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(b[8:]), typ: binary.BigEndian.Uint32(b[12:])}
	r.data = c.readFull(int(binary.BigEndian.Uint32(b[16:])))
	return r
}

// expectOptReply reads one reply and checks its option and type.
func (c *rawClient) expectOptReply(opt, typ uint32) optReply {
	c.t.Helper()
	r := c.readOptReply()
	if r.opt != opt || r.typ != typ {
		c.t.Fatalf("option reply (opt %d, type %#x, %q), want (opt %d, type %#x)", r.opt, r.typ, r.data, opt, typ)
	}
	return r
}

func encodeInfoRequest(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func encodeMetaRequest(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// exportInfo is what NBD_OPT_INFO/GO reported.
type exportInfo struct {
	size                uint64
	flags               uint16
	min, preferred, max uint32
	name, description   string
}

// readInfoReplies reads NBD_REP_INFO replies up to the final one, which it
// returns.
func (c *rawClient) readInfoReplies(opt uint32) (exportInfo, optReply) {
	c.t.Helper()
	var info exportInfo
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != repInfo {
			return info, r
		}
		switch binary.BigEndian.Uint16(r.data) {
		case infoExport:
			info.size = binary.BigEndian.Uint64(r.data[2:])
			info.flags = binary.BigEndian.Uint16(r.data[10:])
		case infoBlockSize:
			info.min = binary.BigEndian.Uint32(r.data[2:])
			info.preferred = binary.BigEndian.Uint32(r.data[6:])
			info.max = binary.BigEndian.Uint32(r.data[10:])
		case infoName:
			info.name = string(r.data[2:])
		case infoDescription:
			info.description = string(r.data[2:])
		}
	}
}

// negotiate runs a typical modern handshake and enters transmission.
func (c *rawClient) negotiate(name string, structured, meta bool) exportInfo {
	c.t.Helper()
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		c.sendOpt(optStructuredReply, nil)
		c.expectOptReply(optStructuredReply, repAck)
		c.structured = true
	}
	if meta {
		c.sendOpt(optSetMetaContext, encodeMetaRequest(name, metaContextAllocation))
		r := c.expectOptReply(optSetMetaContext, repMetaContext)
		if got := string(r.data[4:]); got != metaContextAllocation {
			c.t.Fatalf("selected context %q", got)
		}
		c.expectOptReply(optSetMetaContext, repAck)
	}
	c.sendOpt(optGo, encodeInfoRequest(name, infoBlockSize))
	info, final := c.readInfoReplies(optGo)
	if final.typ != repAck {
		c.t.Fatalf("NBD_OPT_GO(%q) ended with %#x %q", name, final.typ, final.data)
	}
	c.size, c.tflags = info.size, info.flags
	return info
}

func encodeRequest(typ, flags uint16, cookie, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(make([]byte, 0, requestHeaderLen), magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// send sends a request; payload is appended for writes.
func (c *rawClient) send(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	if typ == cmdRead {
		c.mu.Lock()
		c.pending[cookie] = length
		c.mu.Unlock()
	}
	c.write(append(encodeRequest(typ, flags, cookie, off, length), payload...))
}

type reply struct {
	cookie     uint64
	errno      uint32
	msg        string
	data       []byte
	extents    [][2]uint32 // length, status
	contextID  uint32
	structured bool
	chunkTypes []uint16
}

// readReply reads the next complete reply (all chunks up to DONE).
func (c *rawClient) readReply() reply {
	c.t.Helper()
	r, err := c.tryReadReply()
	if err != nil {
		c.t.Fatal(err)
	}
	return r
}

func (c *rawClient) tryReadReply() (reply, error) {
	var r reply
	first := true
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return r, fmt.Errorf("reading reply magic: %w", err)
		}
		switch m := binary.BigEndian.Uint32(hdr[:]); m {
		case magicSimple:
			if !first {
				return r, fmt.Errorf("simple reply in the middle of a structured reply")
			}
			var b [12]byte
			if _, err := io.ReadFull(c.br, b[:]); err != nil {
				return r, err
			}
			r.errno = binary.BigEndian.Uint32(b[0:])
			r.cookie = binary.BigEndian.Uint64(b[4:])
			c.mu.Lock()
			length, isRead := c.pending[r.cookie]
			delete(c.pending, r.cookie)
			c.mu.Unlock()
			if isRead && c.structured {
				return r, fmt.Errorf("simple reply to a read with structured replies on")
			}
			if isRead && r.errno == 0 {
				r.data = make([]byte, length)
				if _, err := io.ReadFull(c.br, r.data); err != nil {
					return r, err
				}
			}
			return r, nil
		case magicStructured:
			if !c.structured {
				return r, fmt.Errorf("structured reply without negotiation")
			}
			var b [16]byte
			if _, err := io.ReadFull(c.br, b[:]); err != nil {
				return r, err
			}
			flags := binary.BigEndian.Uint16(b[0:])
			typ := binary.BigEndian.Uint16(b[2:])
			cookie := binary.BigEndian.Uint64(b[4:])
			payload := make([]byte, binary.BigEndian.Uint32(b[12:]))
			if _, err := io.ReadFull(c.br, payload); err != nil {
				return r, err
			}
			if !first && cookie != r.cookie {
				return r, fmt.Errorf("chunk for cookie %d inside reply to %d", cookie, r.cookie)
			}
			r.cookie, r.structured = cookie, true
			r.chunkTypes = append(r.chunkTypes, typ)
			first = false
			switch typ {
			case replyTypeNone:
			case replyTypeOffsetData:
				r.data = append(r.data, payload[8:]...)
			case replyTypeBlockStatus:
				r.contextID = binary.BigEndian.Uint32(payload)
				for p := payload[4:]; len(p) >= 8; p = p[8:] {
					r.extents = append(r.extents, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
				}
			case replyTypeError:
				r.errno = binary.BigEndian.Uint32(payload)
				n := binary.BigEndian.Uint16(payload[4:])
				r.msg = string(payload[6 : 6+n])
			default:
				return r, fmt.Errorf("unexpected chunk type %#x", typ)
			}
			if flags&replyFlagDone != 0 {
				c.mu.Lock()
				delete(c.pending, cookie)
				c.mu.Unlock()
				return r, nil
			}
		default:
			return r, fmt.Errorf("bad reply magic %#x", m)
		}
	}
}

// expectEOF checks that the server closed the connection.
func (c *rawClient) expectEOF() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c.br)
	// Closing a socket with unread input resets it; that is a close too.
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("waiting for the server to close the connection: %v (after %d bytes)", err, len(b))
	}
}

// do sends one request and returns its reply.
func (c *rawClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	c.send(typ, flags, 7, off, length, payload)
	r := c.readReply()
	if r.cookie != 7 {
		c.t.Fatalf("reply cookie %d, want 7", r.cookie)
	}
	return r
}
