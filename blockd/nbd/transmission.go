package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
)

// maxExtents bounds the descriptors in one block status reply. The spec
// lets the server describe less than asked; clients continue where the
// reply ends.
const maxExtents = 16 << 10

// zeroChunk is the size of the writes used to emulate WRITE_ZEROES for
// backends that cannot zero.
const zeroChunk = 1 << 20

var (
	errClientDisc = errors.New("client sent NBD_CMD_DISC")
	errWrite      = errors.New("writing reply")
)

// conn is one client connection.
type conn struct {
	srv *Server
	nc  net.Conn
	br  *bufio.Reader
	log *slog.Logger
	// ctx is passed to the backend. It is cancelled when the connection
	// is torn down, so that in-flight calls stop early.
	ctx    context.Context
	cancel context.CancelCauseFunc
	sess   *session

	// wmu serialises replies so that each goes out whole.
	wmu  sync.Mutex
	dead bool // a reply write failed; guarded by wmu

	errs atomic.Uint64 // requests answered with an error
}

// session is what the handshake settled for the transmission phase.
type session struct {
	name           string
	backend        Backend
	size           int64
	bs             blockSizes
	readOnly       bool
	structured     bool
	metaAllocation bool
	metaDirty      string // the dirty bitmap selected, if any
}

// check validates a request against the negotiated session. It returns the
// errno to answer with, without calling the backend, and why; or 0.
func (s *session) check(r *request) (uint32, string) {
	// FUA is accepted on every command: the spec notes clients that set
	// it on reads, and it is harmless there.
	allowed := cmdFlagFUA
	switch r.typ {
	case cmdRead:
		if s.structured {
			allowed |= cmdFlagDF
		}
	case cmdWrite, cmdTrim, cmdFlush, cmdCache:
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if !s.readOnly {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	default:
		return errnoInval, "unknown command"
	}
	if r.flags&^allowed != 0 {
		return errnoInval, "command flags not valid for this command"
	}

	switch r.typ {
	case cmdFlush:
		return 0, ""
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if s.readOnly {
			return errnoPerm, "export is read-only"
		}
	case cmdBlockStatus:
		if !s.metaAllocation && s.metaDirty == "" {
			return errnoInval, "no metadata context was negotiated"
		}
		if r.length == 0 {
			return errnoInval, "zero-length block status request"
		}
	}

	size := uint64(s.size)
	if r.off > size || uint64(r.length) > size-r.off {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errnoNoSpc, "request extends beyond the end of the export"
		}
		return errnoInval, "request extends beyond the end of the export"
	}
	if m := uint64(s.bs.min); m > 1 {
		end := r.off + uint64(r.length)
		// The tail of an export whose size is not a multiple of the
		// minimum block size is reachable only with a short length.
		if r.off%m != 0 || (end%m != 0 && end != size) {
			return errnoInval, "request not aligned to the minimum block size"
		}
	}
	switch r.typ {
	case cmdRead, cmdWrite, cmdCache:
		if r.length > s.bs.max {
			return errnoInval, "request longer than the maximum block size"
		}
	case cmdWriteZeroes:
		// Fast zero requests may exceed the maximum: they fail fast
		// rather than tie up the backend.
		if r.flags&cmdFlagFastZero == 0 && r.length > s.bs.max {
			return errnoInval, "request longer than the maximum block size"
		}
	}
	return 0, ""
}

// transmit runs the transmission phase: this goroutine reads requests and
// hands them to a pool of workers. It returns the number of requests read
// and why reading stopped.
func (c *conn) transmit(sess *session) (int, error) {
	c.sess = sess
	reqs := make(chan request)
	var wg sync.WaitGroup
	for range c.srv.workers() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := worker{c: c}
			for r := range reqs {
				w.handle(&r)
			}
		}()
	}
	n, err := c.readRequests(reqs)
	if !errors.Is(err, errClientDisc) {
		// A hard disconnect: nobody will read the replies of in-flight
		// requests, so stop their backend calls. After NBD_CMD_DISC the
		// spec wants them completed instead.
		c.cancel(err)
	}
	close(reqs)
	wg.Wait()
	return n, err
}

// readRequests reads requests until the client disconnects or breaks the
// protocol. It never waits for the backend, only for a free worker, so the
// memory pinned by write payloads is bounded by the worker count.
func (c *conn) readRequests(reqs chan<- request) (int, error) {
	var hdr [requestHeaderLen]byte
	for n := 0; ; n++ {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return n, fmt.Errorf("reading request header: %w", err)
		}
		var r request
		if err := decodeRequest(hdr[:], &r); err != nil {
			return n, err
		}
		if r.typ == cmdDisc {
			return n, errClientDisc
		}
		r.errno, r.msg = c.sess.check(&r)
		if r.typ == cmdWrite {
			if r.length > DefaultMaxBlockSize {
				// Skipping gigabytes to stay in sync is not worth it;
				// the spec allows treating this as denial of service.
				return n, fmt.Errorf("write request with a %d byte payload", r.length)
			}
			if r.errno != 0 {
				if _, err := c.br.Discard(int(r.length)); err != nil {
					return n, fmt.Errorf("skipping payload of rejected write: %w", err)
				}
			} else {
				r.buf = c.srv.bufs.get(int(r.length))
				if _, err := io.ReadFull(c.br, (*r.buf)[hdrRoom:hdrRoom+int(r.length)]); err != nil {
					// A truncated write is dropped, not applied.
					c.srv.bufs.put(r.buf)
					return n, fmt.Errorf("reading write payload: %w", err)
				}
			}
		}
		reqs <- r
	}
}

// worker serves requests for one connection. Its scratch space holds small
// replies, so that replying allocates nothing.
type worker struct {
	c       *conn
	scratch [structuredHeaderLen + 6 + maxErrorMessage]byte
}

func (w *worker) handle(r *request) {
	c := w.c
	if r.errno != 0 {
		w.replyErrno(r, r.errno, r.msg)
		return
	}
	if c.ctx.Err() != nil {
		if r.buf != nil {
			c.srv.bufs.put(r.buf)
		}
		w.replyErrno(r, errnoShutdown, "connection is shutting down")
		return
	}
	be := c.sess.backend
	fua := r.flags&cmdFlagFUA != 0
	switch r.typ {
	case cmdRead:
		w.read(r)
	case cmdWrite:
		err := be.WriteAt(c.ctx, (*r.buf)[hdrRoom:hdrRoom+int(r.length)], int64(r.off), fua)
		c.srv.bufs.put(r.buf)
		w.finish(r, err)
	case cmdFlush:
		w.finish(r, be.Flush(c.ctx))
	case cmdTrim:
		err := be.Trim(c.ctx, int64(r.off), int64(r.length), fua)
		if errors.Is(err, ErrNotSupported) {
			err = nil
		}
		w.finish(r, err)
	case cmdWriteZeroes:
		w.writeZeroes(r)
	case cmdCache:
		// A hint with no effect on semantics; the backends have no use
		// for it yet.
		w.finish(r, nil)
	case cmdBlockStatus:
		w.blockStatus(r)
	}
}

func (w *worker) read(r *request) {
	c := w.c
	n := int(r.length)
	if n == 0 {
		w.finish(r, nil)
		return
	}
	bp := c.srv.bufs.get(n)
	defer c.srv.bufs.put(bp)
	b := (*bp)[:hdrRoom+n]
	if err := c.sess.backend.ReadAt(c.ctx, b[hdrRoom:], int64(r.off)); err != nil {
		w.replyError(r, err)
		return
	}
	// The header goes right in front of the data, so the reply is one
	// contiguous buffer and one write call.
	var msg []byte
	if c.sess.structured {
		msg = b[hdrRoom-structuredHeaderLen-8:]
		putChunkHeader(msg, replyFlagDone, replyTypeOffsetData, r.cookie, uint32(8+n))
		binary.BigEndian.PutUint64(msg[structuredHeaderLen:], r.off)
	} else {
		msg = b[hdrRoom-simpleReplyLen:]
		putSimpleReply(msg, 0, r.cookie)
	}
	c.send(msg)
}

func (w *worker) writeZeroes(r *request) {
	c := w.c
	flags := ZeroFlags{
		NoHole:   r.flags&cmdFlagNoHole != 0,
		FastOnly: r.flags&cmdFlagFastZero != 0,
		FUA:      r.flags&cmdFlagFUA != 0,
	}
	err := c.sess.backend.WriteZeroes(c.ctx, int64(r.off), int64(r.length), flags)
	if errors.Is(err, ErrNotSupported) && !flags.FastOnly {
		err = w.writeZeroBuffers(r, flags.FUA)
	}
	w.finish(r, err)
}

// writeZeroBuffers emulates WRITE_ZEROES with writes, for backends that
// cannot zero, so that the server can always advertise it.
func (w *worker) writeZeroBuffers(r *request, fua bool) error {
	c := w.c
	chunk := min(int(r.length), zeroChunk)
	bp := c.srv.bufs.get(chunk)
	defer c.srv.bufs.put(bp)
	zeroes := (*bp)[hdrRoom : hdrRoom+chunk]
	clear(zeroes)
	off, end := int64(r.off), int64(r.off)+int64(r.length)
	for off < end {
		n := min(int64(chunk), end-off)
		if err := c.sess.backend.WriteAt(c.ctx, zeroes[:n], off, fua); err != nil {
			return fmt.Errorf("writing zeroes at %d: %w", off, err)
		}
		off += n
	}
	return nil
}

func (w *worker) blockStatus(r *request) {
	c := w.c
	type run struct {
		length int64
		status uint32
	}
	var chunks [][]run
	var ids []uint32
	if c.sess.metaAllocation {
		exts, err := c.sess.backend.BlockStatus(c.ctx, int64(r.off), int64(r.length))
		if err != nil {
			w.replyError(r, err)
			return
		}
		runs := make([]run, 0, len(exts))
		for _, e := range exts {
			var status uint32
			if e.Hole {
				status |= stateHole
			}
			if e.Zero {
				status |= stateZero
			}
			runs = append(runs, run{e.Length, status})
		}
		chunks, ids = append(chunks, runs), append(ids, allocationContextID)
	}
	if c.sess.metaDirty != "" {
		exts, err := c.sess.backend.(DirtyBitmaps).DirtyStatus(c.ctx, c.sess.metaDirty, int64(r.off), int64(r.length))
		if err != nil {
			w.replyError(r, err)
			return
		}
		runs := make([]run, 0, len(exts))
		for _, e := range exts {
			var status uint32
			if e.Dirty {
				status = stateDirty
			}
			runs = append(runs, run{e.Length, status})
		}
		chunks, ids = append(chunks, runs), append(ids, dirtyContextID)
	}
	limit := maxExtents
	if r.flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	for i, runs := range chunks {
		bp := c.srv.bufs.get(4 + 8*min(len(runs)+1, limit))
		b := (*bp)[hdrRoom-structuredHeaderLen : hdrRoom+4]
		binary.BigEndian.PutUint32(b[structuredHeaderLen:], ids[i])

		// Clip the runs to the request (the first N-1 must not reach its
		// end, and with REQ_ONE neither may the only one), drop empty ones
		// and merge neighbours with equal status, which makes for shorter
		// replies.
		remaining := uint64(r.length)
		count := 0
		var last uint32
		for _, e := range runs {
			if remaining == 0 {
				break
			}
			if e.length <= 0 {
				continue
			}
			l := min(uint64(e.length), remaining)
			if count > 0 && e.status == last {
				d := b[len(b)-8:]
				binary.BigEndian.PutUint32(d, binary.BigEndian.Uint32(d)+uint32(l))
			} else {
				if count == limit {
					break
				}
				b = binary.BigEndian.AppendUint32(b, uint32(l))
				b = binary.BigEndian.AppendUint32(b, e.status)
				count++
				last = e.status
			}
			remaining -= l
		}
		if count == 0 {
			// The safe answer when the backend said nothing: allocated for
			// base:allocation, dirty for a dirty bitmap.
			var safe uint32
			if ids[i] == dirtyContextID {
				safe = stateDirty
			}
			b = binary.BigEndian.AppendUint32(b, r.length)
			b = binary.BigEndian.AppendUint32(b, safe)
		}
		var flags uint16
		if i == len(chunks)-1 {
			flags = replyFlagDone
		}
		putChunkHeader(b, flags, replyTypeBlockStatus, r.cookie, uint32(len(b)-structuredHeaderLen))
		c.send(b)
		c.srv.bufs.put(bp)
	}
}

// finish replies to a command without reply payload.
func (w *worker) finish(r *request, err error) {
	if err != nil {
		w.replyError(r, err)
		return
	}
	if r.typ == cmdRead && w.c.sess.structured {
		// A zero-length read: the spec forbids simple replies to reads
		// once structured replies are on.
		b := w.scratch[:structuredHeaderLen]
		putChunkHeader(b, replyFlagDone, replyTypeNone, r.cookie, 0)
		w.c.send(b)
		return
	}
	// Simple replies are allowed for everything but reads, and shorter.
	b := w.scratch[:simpleReplyLen]
	putSimpleReply(b, 0, r.cookie)
	w.c.send(b)
}

func (w *worker) replyError(r *request, err error) {
	w.replyErrno(r, errnoFor(err, r.typ, r.flags), err.Error())
}

func (w *worker) replyErrno(r *request, errno uint32, msg string) {
	w.c.errs.Add(1)
	if !w.c.sess.structured {
		b := w.scratch[:simpleReplyLen]
		putSimpleReply(b, errno, r.cookie)
		w.c.send(b)
		return
	}
	// Structured error chunks carry the message to the user.
	b := appendMessage(w.scratch[:structuredHeaderLen+6], msg)
	putChunkHeader(b, replyFlagDone, replyTypeError, r.cookie, uint32(len(b)-structuredHeaderLen))
	binary.BigEndian.PutUint32(b[structuredHeaderLen:], errno)
	binary.BigEndian.PutUint16(b[structuredHeaderLen+4:], uint16(len(b)-structuredHeaderLen-6))
	w.c.send(b)
}

// send writes one whole reply. After a failed write the connection is
// useless: the client may have seen part of a reply. It is torn down and
// further replies are dropped.
func (c *conn) send(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.dead {
		return
	}
	if _, err := c.nc.Write(b); err != nil {
		c.dead = true
		c.cancel(fmt.Errorf("%w: %w", errWrite, err))
	}
}
