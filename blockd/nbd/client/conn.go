package nbdclient

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"
)

// Conn is a negotiated connection to one export. Its methods are safe for concurrent use: each call is a
// request of its own, and many may be in flight at once.
//
// A call whose context ends before the reply arrives returns the context's error at once. The request
// itself cannot be cancelled (NBD has no way to), so a write or trim may still take effect; the reply, when
// it comes, is discarded, and a read's buffer is no longer touched once the call has returned.
type Conn struct {
	nc     net.Conn
	export string

	// Negotiated in the handshake, fixed afterwards.
	size                          uint64
	tflags                        uint16
	structured                    bool
	hasMeta                       bool
	metaID                        uint32
	minBlock, prefBlock, maxBlock uint32

	// sendSlot is a one-slot semaphore: one request at a time on the wire, and waiting for it honours the
	// caller's context (a mutex could not).
	sendSlot chan struct{}

	mu      sync.Mutex
	calls   map[uint64]*call // requests awaiting their final reply, by cookie
	cookie  uint64
	closing bool
	err     error // why the connection failed; every later call returns it

	readerDone chan struct{}
}

// Extent is a run of bytes with one allocation status, as reported by block status.
type Extent struct {
	Length int64
	// Hole: the range is not allocated. It reads as zeroes unless Zero is false, which the protocol allows
	// but no server we know reports.
	Hole bool
	// Zero: the range reads as zeroes.
	Zero bool
}

// ZeroFlags qualify WriteZeroes.
type ZeroFlags struct {
	// NoHole asks the server to keep the range allocated.
	NoHole bool
	// FastOnly asks the server to fail with ErrNotSupported unless zeroing is faster than writing zeroes.
	FastOnly bool
	// FUA asks for the zeroes to be durable when the call returns.
	FUA bool
}

// call is one request awaiting its replies.
type call struct {
	typ    uint16
	off    uint64
	length uint32
	buf    []byte // a read's destination

	// mu is held by the reader while it fills buf, and taken by a caller that gives up waiting, so that the
	// buffer is never written after its owner has moved on.
	mu        sync.Mutex
	abandoned bool

	got     uint64 // a read's bytes received, data and holes
	extents []Extent
	err     error
	done    chan struct{}
}

// closeGrace is how long Close waits for the server to answer requests in flight and hang up after
// NBD_CMD_DISC.
const closeGrace = 5 * time.Second

// maxInFlightPerCall bounds the requests one large call issues at once.
const maxInFlightPerCall = 16

func (c *Conn) start() {
	c.sendSlot = make(chan struct{}, 1)
	c.calls = map[uint64]*call{}
	c.readerDone = make(chan struct{})
	go c.readLoop()
}

// Export is the export's name, as asked for.
func (c *Conn) Export() string { return c.export }

// Size is the export's size in bytes, fixed for the life of the connection.
func (c *Conn) Size() int64 { return int64(c.size) }

// ReadOnly reports whether the server refuses writes to the export.
func (c *Conn) ReadOnly() bool { return c.tflags&tflagReadOnly != 0 }

// Structured reports whether structured replies were negotiated.
func (c *Conn) Structured() bool { return c.structured }

// CanBlockStatus reports whether the server serves base:allocation block status on this connection.
func (c *Conn) CanBlockStatus() bool { return c.hasMeta }

// CanTrim, CanWriteZeroes, CanFlush and CanMultiConn report what the server advertised.
func (c *Conn) CanTrim() bool        { return c.tflags&tflagSendTrim != 0 }
func (c *Conn) CanWriteZeroes() bool { return c.tflags&tflagSendWriteZeroes != 0 }
func (c *Conn) CanFlush() bool       { return c.tflags&tflagSendFlush != 0 }
func (c *Conn) CanMultiConn() bool   { return c.tflags&tflagCanMultiConn != 0 }

// BlockSizes are the export's block size constraints: offsets and lengths must be multiples of min; reads and
// writes are split at max.
func (c *Conn) BlockSizes() (min, preferred, max uint32) { return c.minBlock, c.prefBlock, c.maxBlock }

// ReadAt fills p with the export's bytes at off. Reads longer than the maximum block size are split into
// requests sent at once.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.split(ctx, off, int64(len(p)), int64(c.maxBlock), func(ctx context.Context, at, n int64) error {
		cl := &call{typ: cmdRead, off: uint64(at), length: uint32(n), buf: p[at-off : at-off+n]}
		return c.do(ctx, cl, 0, nil)
	})
}

// WriteAt writes p at off. With fua it returns once the data is durable; a server that does not support FUA
// is sent a flush after the write instead.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var flags uint16
	if fua && c.tflags&tflagSendFUA != 0 {
		flags = cmdFlagFUA
	}
	err := c.split(ctx, off, int64(len(p)), int64(c.maxBlock), func(ctx context.Context, at, n int64) error {
		cl := &call{typ: cmdWrite, off: uint64(at), length: uint32(n)}
		return c.do(ctx, cl, flags, p[at-off:at-off+n])
	})
	if err == nil && fua && flags == 0 && c.CanFlush() {
		err = c.Flush(ctx)
	}
	return err
}

// Flush returns once every write that completed before it was called is durable.
func (c *Conn) Flush(ctx context.Context) error {
	if !c.CanFlush() {
		return fmt.Errorf("nbd flush: the server does not advertise it: %w", ErrNotSupported)
	}
	return c.do(ctx, &call{typ: cmdFlush}, 0, nil)
}

// Trim tells the server the range is no longer needed. Its content is undefined afterwards: use WriteZeroes
// to make a range read as zeroes.
func (c *Conn) Trim(ctx context.Context, off, length int64) error {
	if !c.CanTrim() {
		return fmt.Errorf("nbd trim: the server does not advertise it: %w", ErrNotSupported)
	}
	return c.split(ctx, off, length, int64(c.maxBlock), func(ctx context.Context, at, n int64) error {
		return c.do(ctx, &call{typ: cmdTrim, off: uint64(at), length: uint32(n)}, 0, nil)
	})
}

// WriteZeroes makes the range read as zeroes, without sending them. Long ranges are split at the maximum
// block size, because some servers (blockd among them) bound zeroing by it.
func (c *Conn) WriteZeroes(ctx context.Context, off, length int64, f ZeroFlags) error {
	if !c.CanWriteZeroes() {
		return fmt.Errorf("nbd write-zeroes: the server does not advertise it: %w", ErrNotSupported)
	}
	if f.FastOnly && c.tflags&tflagSendFastZero == 0 {
		return fmt.Errorf("nbd write-zeroes: the server does not advertise fast zeroing: %w", ErrNotSupported)
	}
	var flags uint16
	if f.NoHole {
		flags |= cmdFlagNoHole
	}
	if f.FastOnly {
		flags |= cmdFlagFastZero
	}
	if f.FUA && c.tflags&tflagSendFUA != 0 {
		flags |= cmdFlagFUA
	}
	err := c.split(ctx, off, length, int64(c.maxBlock), func(ctx context.Context, at, n int64) error {
		return c.do(ctx, &call{typ: cmdWriteZeroes, off: uint64(at), length: uint32(n)}, flags, nil)
	})
	if err == nil && f.FUA && flags&cmdFlagFUA == 0 && c.CanFlush() {
		err = c.Flush(ctx)
	}
	return err
}

// BlockStatus describes the allocation of [off, off+length) as consecutive extents that cover it exactly,
// asking the server as many times as it takes. It needs the base:allocation context (CanBlockStatus).
func (c *Conn) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	if !c.hasMeta {
		return nil, fmt.Errorf("nbd block status: the server did not agree to %s: %w", metaContextAllocation, ErrNotSupported)
	}
	if err := c.checkRange(off, length); err != nil {
		return nil, err
	}
	// One request covers at most 4 GiB, less a block so that the length stays aligned.
	limit := int64(math.MaxUint32) &^ int64(c.minBlock-1)
	var out []Extent
	for at, end := off, off+length; at < end; {
		n := min(end-at, limit)
		cl := &call{typ: cmdBlockStatus, off: uint64(at), length: uint32(n)}
		if err := c.do(ctx, cl, 0, nil); err != nil {
			return nil, err
		}
		covered := int64(0)
		for _, e := range cl.extents {
			e.Length = min(e.Length, end-at)
			if e.Length == 0 {
				break
			}
			if k := len(out); k > 0 && out[k-1].Hole == e.Hole && out[k-1].Zero == e.Zero {
				out[k-1].Length += e.Length
			} else {
				out = append(out, e)
			}
			at += e.Length
			covered += e.Length
		}
		if covered == 0 {
			return nil, fmt.Errorf("nbd block status at offset %d: the server described no bytes", at)
		}
	}
	return out, nil
}

// Close disconnects: it sends NBD_CMD_DISC, lets the server answer the requests in flight (for up to a few
// seconds), and closes the connection. Calls made after Close fail with ErrClosed. Close does not flush:
// call Flush first for writes to be durable.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerDone
		return nil
	}
	c.closing = true
	failed := c.err != nil
	c.mu.Unlock()
	if !failed {
		grace := time.NewTimer(closeGrace)
		defer grace.Stop()
		select {
		case c.sendSlot <- struct{}{}:
			// An error here means the connection is already gone, which is what we want.
			c.nc.Write(encodeRequest(0, cmdDisc, 0, 0, 0))
			<-c.sendSlot
			select {
			case <-c.readerDone:
			case <-grace.C:
			}
		case <-grace.C:
			// A request is stuck on the wire (the server stopped reading): hang up without saying so.
		}
	}
	c.nc.Close()
	<-c.readerDone
	return nil
}

// checkRange rejects what no server could accept, before it goes on the wire: negative or overflowing
// ranges, and offsets or lengths not aligned to the minimum block size we promised to honour.
func (c *Conn) checkRange(off, length int64) error {
	if off < 0 || length < 0 || off > math.MaxInt64-length {
		return fmt.Errorf("nbd: range of %d bytes at offset %d: %w", length, off, ErrInvalid)
	}
	if m := int64(c.minBlock); off%m != 0 || length%m != 0 {
		return fmt.Errorf("nbd: range of %d bytes at offset %d is not aligned to the export's %d-byte blocks: %w", length, off, m, ErrInvalid)
	}
	return nil
}

// split runs fn over [off, off+length) in pieces of at most limit bytes (a multiple of the minimum block
// size), several at once, and returns the first error.
func (c *Conn) split(ctx context.Context, off, length, limit int64, fn func(ctx context.Context, off, n int64) error) error {
	if err := c.checkRange(off, length); err != nil {
		return err
	}
	if length == 0 {
		// Nothing to send: some servers refuse empty requests, and none is needed.
		return nil
	}
	if length <= limit {
		return fn(ctx, off, length)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	slots := make(chan struct{}, maxInFlightPerCall)
loop:
	for at := off; at < off+length; at += limit {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			break loop
		}
		wg.Add(1)
		go func(at, n int64) {
			defer wg.Done()
			defer func() { <-slots }()
			if err := fn(ctx, at, n); err != nil {
				errOnce.Do(func() { firstErr = err; cancel() })
			}
		}(at, min(limit, off+length-at))
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return firstErr
}

func encodeRequest(flags, typ uint16, cookie, off uint64, length uint32) []byte {
	b := make([]byte, requestHeaderLen)
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return b
}

// do sends one request and waits for its final reply.
func (c *Conn) do(ctx context.Context, cl *call, flags uint16, payload []byte) error {
	cl.done = make(chan struct{})
	select {
	case c.sendSlot <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	c.mu.Lock()
	if err := c.unusable(); err != nil {
		c.mu.Unlock()
		<-c.sendSlot
		return err
	}
	c.cookie++
	cookie := c.cookie
	c.calls[cookie] = cl
	c.mu.Unlock()

	bufs := net.Buffers{encodeRequest(flags, cl.typ, cookie, cl.off, cl.length)}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	// Once started, a request is written whole whatever the context says: half a request would leave the
	// stream out of step for every other caller.
	_, err := bufs.WriteTo(c.nc)
	<-c.sendSlot
	if err != nil {
		c.abort(fmt.Errorf("sending nbd %s: %w", cmdName(cl.typ), err))
	}
	select {
	case <-cl.done:
		return cl.err
	case <-ctx.Done():
		cl.mu.Lock()
		cl.abandoned = true
		cl.mu.Unlock()
		return ctx.Err()
	}
}

// unusable returns why no request may be sent. c.mu is held.
func (c *Conn) unusable() error {
	switch {
	case c.closing:
		return ErrClosed
	case c.err != nil:
		return c.err
	}
	return nil
}

// abort marks the connection broken with err (the first reason wins) and closes the socket, which stops the
// reader; the reader then fails every request in flight. Any goroutine may call it.
func (c *Conn) abort(err error) {
	c.mu.Lock()
	if c.err == nil {
		if c.closing {
			err = ErrClosed
		}
		c.err = err
	}
	c.mu.Unlock()
	c.nc.Close()
}

// failCalls completes every request in flight with the connection's error. Only the reader calls it, once it
// has stopped, so that no reply is being handled for a call while it is failed.
func (c *Conn) failCalls() {
	c.mu.Lock()
	calls := c.calls
	c.calls = map[uint64]*call{}
	err := c.err
	c.mu.Unlock()
	for _, cl := range calls {
		cl.err = err
		close(cl.done)
	}
}

// finish completes the call with cookie: it is removed first, so that it completes once only.
func (c *Conn) finish(cookie uint64, cl *call) {
	c.mu.Lock()
	_, ok := c.calls[cookie]
	delete(c.calls, cookie)
	c.mu.Unlock()
	if ok {
		close(cl.done)
	}
}

func (c *Conn) lookup(cookie uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[cookie]
}

// readLoop reads replies until the connection ends, handing each to its call.
func (c *Conn) readLoop() {
	defer close(c.readerDone)
	br := bufio.NewReaderSize(c.nc, 256<<10)
	var hdr [20]byte
	for {
		if err := c.readReply(br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				err = fmt.Errorf("nbd connection to export %q closed by the server: %w", c.export, io.ErrUnexpectedEOF)
			}
			c.abort(err)
			c.failCalls()
			return
		}
	}
}

// protocolError is a reply that breaks the protocol badly enough that the stream cannot be trusted.
func protocolError(format string, args ...any) error {
	return fmt.Errorf("nbd protocol error: "+format, args...)
}

func (c *Conn) readReply(br *bufio.Reader, hdr []byte) error {
	if _, err := io.ReadFull(br, hdr[:4]); err != nil {
		return err
	}
	switch m := binary.BigEndian.Uint32(hdr); m {
	case magicSimple:
		if _, err := io.ReadFull(br, hdr[4:16]); err != nil {
			return eofIsUnexpected(err)
		}
		errno := binary.BigEndian.Uint32(hdr[4:])
		cookie := binary.BigEndian.Uint64(hdr[8:])
		cl := c.lookup(cookie)
		if cl == nil {
			return protocolError("simple reply for unknown cookie %d", cookie)
		}
		if errno != 0 {
			cl.setErr(&Error{Op: cmdName(cl.typ), Offset: cl.off, Length: uint64(cl.length), Errno: errno})
		} else if cl.typ == cmdRead {
			// Data follows a successful simple reply to a read, whatever was negotiated.
			if err := cl.fill(br, cl.buf); err != nil {
				return err
			}
			cl.got = uint64(len(cl.buf))
		} else if cl.typ == cmdBlockStatus {
			cl.setErr(protocolError("simple reply to block status"))
		}
		c.finish(cookie, cl)
		return nil
	case magicStructured:
		if !c.structured {
			return protocolError("structured reply without structured replies negotiated")
		}
		if _, err := io.ReadFull(br, hdr[4:20]); err != nil {
			return eofIsUnexpected(err)
		}
		flags := binary.BigEndian.Uint16(hdr[4:])
		typ := binary.BigEndian.Uint16(hdr[6:])
		cookie := binary.BigEndian.Uint64(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[16:])
		cl := c.lookup(cookie)
		if cl == nil {
			return protocolError("reply chunk for unknown cookie %d", cookie)
		}
		if err := c.chunk(br, cl, typ, length); err != nil {
			return err
		}
		if flags&replyFlagDone != 0 {
			if cl.err == nil && cl.typ == cmdRead && cl.got != uint64(len(cl.buf)) {
				cl.setErr(protocolError("read of %d bytes at offset %d answered with %d bytes", len(cl.buf), cl.off, cl.got))
			}
			if cl.err == nil && cl.typ == cmdBlockStatus && len(cl.extents) == 0 {
				cl.setErr(protocolError("block status at offset %d answered with no extents", cl.off))
			}
			c.finish(cookie, cl)
		}
		return nil
	default:
		return protocolError("bad reply magic %#08x", m)
	}
}

// chunk handles one structured reply chunk of length bytes for cl. A chunk that does not fit its request is
// that request's error; the stream stays usable because its length is known.
func (c *Conn) chunk(br *bufio.Reader, cl *call, typ uint16, length uint32) error {
	skip := func(why string) error {
		cl.setErr(protocolError("%s (nbd %s at offset %d)", why, cmdName(cl.typ), cl.off))
		_, err := br.Discard(int(length))
		return eofIsUnexpected(err)
	}
	switch typ {
	case replyTypeNone:
		if length != 0 {
			return skip("NONE chunk with a payload")
		}
		return nil
	case replyTypeOffsetData, replyTypeOffsetHole:
		if cl.typ != cmdRead {
			return skip("data chunk in reply to a command that is not a read")
		}
		if typ == replyTypeOffsetData && length <= 8 || typ == replyTypeOffsetHole && length != 12 {
			return skip(fmt.Sprintf("read chunk of %d bytes", length))
		}
		var b [12]byte
		n := 8
		if typ == replyTypeOffsetHole {
			n = 12
		}
		if _, err := io.ReadFull(br, b[:n]); err != nil {
			return eofIsUnexpected(err)
		}
		off := binary.BigEndian.Uint64(b[:])
		size := uint64(length) - 8
		if typ == replyTypeOffsetHole {
			size = uint64(binary.BigEndian.Uint32(b[8:]))
		}
		if off < cl.off || off-cl.off > uint64(len(cl.buf)) || size > uint64(len(cl.buf))-(off-cl.off) || size == 0 {
			cl.setErr(protocolError("read chunk of %d bytes at offset %d outside the request (%d bytes at %d)", size, off, len(cl.buf), cl.off))
			if typ == replyTypeOffsetData {
				_, err := br.Discard(int(size))
				return eofIsUnexpected(err)
			}
			return nil
		}
		dst := cl.buf[off-cl.off : off-cl.off+size]
		if typ == replyTypeOffsetData {
			if err := cl.fill(br, dst); err != nil {
				return err
			}
		} else {
			cl.mu.Lock()
			if !cl.abandoned {
				clear(dst)
			}
			cl.mu.Unlock()
		}
		cl.got += size
		return nil
	case replyTypeBlockStatus:
		if cl.typ != cmdBlockStatus {
			return skip("block status chunk in reply to another command")
		}
		if length < 12 || (length-4)%8 != 0 || length > 64<<20 {
			return skip(fmt.Sprintf("block status chunk of %d bytes", length))
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(br, b); err != nil {
			return eofIsUnexpected(err)
		}
		if id := binary.BigEndian.Uint32(b); id != c.metaID {
			// Not the context we asked for; nothing to learn from it.
			return nil
		}
		for d := b[4:]; len(d) >= 8; d = d[8:] {
			n := binary.BigEndian.Uint32(d)
			state := binary.BigEndian.Uint32(d[4:])
			if n == 0 {
				cl.setErr(protocolError("block status extent of length 0"))
				return nil
			}
			cl.extents = append(cl.extents, Extent{Length: int64(n), Hole: state&stateHole != 0, Zero: state&stateZero != 0})
		}
		return nil
	}
	if typ&replyTypeErrorBit == 0 {
		return skip(fmt.Sprintf("unknown reply chunk type %d", typ))
	}
	if length < 6 || length > 64<<10 {
		return skip(fmt.Sprintf("error chunk of %d bytes", length))
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(br, b); err != nil {
		return eofIsUnexpected(err)
	}
	e := &Error{Op: cmdName(cl.typ), Offset: cl.off, Length: uint64(cl.length), Errno: binary.BigEndian.Uint32(b)}
	if n := int(binary.BigEndian.Uint16(b[4:])); n <= len(b)-6 {
		e.Message = string(b[6 : 6+n])
	}
	if e.Errno == 0 {
		// The protocol forbids an error chunk with no error; do not let it pass for success.
		e.Errno = errnoInval
	}
	cl.setErr(e)
	return nil
}

// fill reads len(dst) bytes into dst, unless the caller has given up on the call, in which case they are
// read and dropped.
func (cl *call) fill(br *bufio.Reader, dst []byte) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.abandoned {
		_, err := br.Discard(len(dst))
		return eofIsUnexpected(err)
	}
	_, err := io.ReadFull(br, dst)
	return eofIsUnexpected(err)
}

// setErr records the first error of a call. Only the reader calls it, before the call completes.
func (cl *call) setErr(err error) {
	if cl.err == nil {
		cl.err = err
	}
}
