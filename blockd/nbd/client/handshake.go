package nbdclient

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// defaultHandshakeTimeout bounds the negotiation when the caller's context has no deadline: a server that
// accepts connections and then says nothing must not hang a backup forever.
const defaultHandshakeTimeout = 30 * time.Second

// Dial connects to the export named by uri (see [ParseURI]) and negotiates the connection. ctx bounds the
// connection and the handshake only; every later call takes its own context.
func Dial(ctx context.Context, uri string) (*Conn, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, u.Network, u.Address)
	if err != nil {
		return nil, fmt.Errorf("connect to NBD server %s: %w", uri, err)
	}
	c, err := Open(ctx, nc, u.Export)
	if err != nil {
		return nil, fmt.Errorf("NBD server %s: %w", uri, err)
	}
	return c, nil
}

// Open negotiates the export on an established connection, which it then owns: it is closed when the
// handshake fails or the Conn is closed.
func Open(ctx context.Context, nc net.Conn, export string) (*Conn, error) {
	c, err := handshake(ctx, nc, export)
	if err != nil {
		nc.Close()
		return nil, err
	}
	c.start()
	return c, nil
}

func handshake(ctx context.Context, nc net.Conn, export string) (*Conn, error) {
	if len(export) > maxStringLen {
		return nil, fmt.Errorf("export name of %d bytes: the protocol allows %d", len(export), maxStringLen)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(defaultHandshakeTimeout)
	}
	nc.SetDeadline(deadline)
	// A cancelled context unblocks the reads and writes below by moving the deadline to the past.
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	h := &handshaker{nc: nc, br: bufio.NewReaderSize(nc, 4096), export: export}
	c, err := h.run()
	if !stop() || ctx.Err() != nil {
		return nil, fmt.Errorf("NBD handshake: %w", ctx.Err())
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("NBD handshake did not finish by %s: %w", deadline.Format(time.RFC3339), err)
		}
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	if h.br.Buffered() > 0 {
		// The server sent something nobody asked for; the transmission stream would be out of step.
		return nil, fmt.Errorf("NBD handshake: server sent %d unexpected bytes after the handshake", h.br.Buffered())
	}
	return c, nil
}

type handshaker struct {
	nc     net.Conn
	br     *bufio.Reader
	export string
}

func (h *handshaker) run() (*Conn, error) {
	var greeting [18]byte
	if _, err := io.ReadFull(h.br, greeting[:16]); err != nil {
		return nil, fmt.Errorf("reading the server greeting: %w", eofIsUnexpected(err))
	}
	if m := binary.BigEndian.Uint64(greeting[0:]); m != magicNBD {
		return nil, fmt.Errorf("not an NBD server (greeting magic %#016x)", m)
	}
	switch m := binary.BigEndian.Uint64(greeting[8:]); m {
	case magicIHaveOpt:
	case magicOldstyle:
		return nil, errors.New("the server speaks oldstyle NBD negotiation, which this client does not support")
	default:
		return nil, fmt.Errorf("not an NBD server (second greeting magic %#016x)", m)
	}
	if _, err := io.ReadFull(h.br, greeting[16:18]); err != nil {
		return nil, fmt.Errorf("reading the server greeting: %w", eofIsUnexpected(err))
	}
	sflags := binary.BigEndian.Uint16(greeting[16:])
	var cflags uint32
	if sflags&flagFixedNewstyle != 0 {
		cflags |= clientFlagFixedNewstyle
	}
	noZeroes := sflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= clientFlagNoZeroes
	}
	if err := h.write(binary.BigEndian.AppendUint32(nil, cflags)); err != nil {
		return nil, err
	}
	c := &Conn{nc: h.nc, export: h.export, minBlock: 1, prefBlock: 4096, maxBlock: defaultMaxBlock}
	if sflags&flagFixedNewstyle == 0 {
		// Without fixed newstyle an unknown option ends the connection, so only NBD_OPT_EXPORT_NAME is safe.
		return c, h.exportName(c, noZeroes)
	}

	// Structured replies carry hole chunks and error messages, and are needed for block status.
	r, err := h.option(optStructuredReply, nil)
	if err != nil {
		return nil, err
	}
	switch {
	case r.typ == repAck:
		c.structured = true
	case r.typ&repFlagError == 0:
		return nil, fmt.Errorf("unexpected reply %#x to %s", r.typ, optName(optStructuredReply))
	}

	if c.structured {
		if err := h.setMetaContext(c); err != nil {
			return nil, err
		}
	}

	fallback, err := h.goExport(c)
	if err != nil || !fallback {
		return c, err
	}
	return c, h.exportName(c, noZeroes)
}

// setMetaContext asks for base:allocation. A server that refuses it serves no block status; that is not an
// error for the connection.
func (h *handshaker) setMetaContext(c *Conn) error {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(h.export)))
	data = append(data, h.export...)
	data = binary.BigEndian.AppendUint32(data, 1)
	data = binary.BigEndian.AppendUint32(data, uint32(len(metaContextAllocation)))
	data = append(data, metaContextAllocation...)
	if err := h.sendOption(optSetMetaContext, data); err != nil {
		return err
	}
	for {
		r, err := h.reply(optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case r.typ == repMetaContext:
			if len(r.data) < 4 {
				return fmt.Errorf("%s: context reply of %d bytes", optName(optSetMetaContext), len(r.data))
			}
			if string(r.data[4:]) == metaContextAllocation {
				c.metaID, c.hasMeta = binary.BigEndian.Uint32(r.data), true
			}
		case r.typ == repAck, r.typ&repFlagError != 0:
			// An error is the final reply: the server selected nothing.
			if r.typ != repAck {
				c.hasMeta = false
			}
			return nil
		default:
			return fmt.Errorf("unexpected reply %#x to %s", r.typ, optName(optSetMetaContext))
		}
	}
}

// goExport selects the export with NBD_OPT_GO, asking for its block size constraints (which commits us to
// honour them). It reports fallback when the server does not know the option.
func (h *handshaker) goExport(c *Conn) (fallback bool, err error) {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(h.export)))
	data = append(data, h.export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	if err := h.sendOption(optGo, data); err != nil {
		return false, err
	}
	gotExport := false
	for {
		r, err := h.reply(optGo)
		if err != nil {
			return false, err
		}
		switch r.typ {
		case repInfo:
			if len(r.data) < 2 {
				return false, fmt.Errorf("%s: information reply of %d bytes", optName(optGo), len(r.data))
			}
			switch binary.BigEndian.Uint16(r.data) {
			case infoExport:
				if len(r.data) != 12 {
					return false, fmt.Errorf("%s: export information of %d bytes, want 12", optName(optGo), len(r.data))
				}
				c.size = binary.BigEndian.Uint64(r.data[2:])
				c.tflags = binary.BigEndian.Uint16(r.data[10:])
				gotExport = true
			case infoBlockSize:
				if len(r.data) != 14 {
					return false, fmt.Errorf("%s: block size information of %d bytes, want 14", optName(optGo), len(r.data))
				}
				c.minBlock = binary.BigEndian.Uint32(r.data[2:])
				c.prefBlock = binary.BigEndian.Uint32(r.data[6:])
				c.maxBlock = binary.BigEndian.Uint32(r.data[10:])
				if err := c.checkBlockSizes(); err != nil {
					return false, err
				}
			}
			// Other information types are ignored, as the protocol asks.
		case repAck:
			if !gotExport {
				return false, fmt.Errorf("%s: the server acknowledged without describing the export", optName(optGo))
			}
			return false, nil
		case repErrUnsup:
			return true, nil
		case repErrUnknown:
			if len(r.data) > 0 {
				return false, fmt.Errorf("export %q: %w (the server says: %s)", h.export, ErrUnknownExport, r.data)
			}
			return false, fmt.Errorf("export %q: %w", h.export, ErrUnknownExport)
		default:
			if r.typ&repFlagError != 0 {
				return false, fmt.Errorf("export %q: %w", h.export, &optError{opt: optGo, typ: r.typ, msg: string(r.data)})
			}
			return false, fmt.Errorf("unexpected reply %#x to %s", r.typ, optName(optGo))
		}
	}
}

// exportName selects the export the old way: the server answers with the size and flags, or closes the
// connection if it has no such export.
func (h *handshaker) exportName(c *Conn, noZeroes bool) error {
	if err := h.sendOption(optExportName, []byte(h.export)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(h.br, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("export %q: %w (the server closed the connection after %s)", h.export, ErrUnknownExport, optName(optExportName))
		}
		return fmt.Errorf("reading the reply to %s: %w", optName(optExportName), err)
	}
	c.size = binary.BigEndian.Uint64(b)
	c.tflags = binary.BigEndian.Uint16(b[8:])
	// Block status needs the context selected on the same export with NBD_OPT_GO; servers that lack it
	// have no metadata contexts worth trusting either.
	c.hasMeta = false
	return nil
}

func (c *Conn) checkBlockSizes() error {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	if !pow2(c.minBlock) || c.minBlock > 64<<10 || !pow2(c.prefBlock) || c.maxBlock < c.minBlock || c.maxBlock%c.minBlock != 0 {
		return fmt.Errorf("the server's block sizes make no sense (minimum %d, preferred %d, maximum %d)", c.minBlock, c.prefBlock, c.maxBlock)
	}
	// A maximum over what the protocol expects every client to handle is clamped: a request that large is
	// no faster, and it pins that much memory at both ends.
	c.maxBlock = min(c.maxBlock, max(defaultMaxBlock, c.minBlock))
	return nil
}

type optReply struct {
	typ  uint32
	data []byte
}

func (h *handshaker) write(b []byte) error {
	if _, err := h.nc.Write(b); err != nil {
		return fmt.Errorf("NBD handshake: %w", err)
	}
	return nil
}

func (h *handshaker) sendOption(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return h.write(append(b, data...))
}

// option sends an option that has a single reply and returns that reply.
func (h *handshaker) option(opt uint32, data []byte) (optReply, error) {
	if err := h.sendOption(opt, data); err != nil {
		return optReply{}, err
	}
	return h.reply(opt)
}

func (h *handshaker) reply(opt uint32) (optReply, error) {
	var hdr [optReplyHeaderLen]byte
	if _, err := io.ReadFull(h.br, hdr[:]); err != nil {
		return optReply{}, fmt.Errorf("reading the reply to %s: %w", optName(opt), eofIsUnexpected(err))
	}
	if m := binary.BigEndian.Uint64(hdr[:]); m != magicOptReply {
		return optReply{}, fmt.Errorf("reply to %s: bad magic %#016x", optName(opt), m)
	}
	if got := binary.BigEndian.Uint32(hdr[8:]); got != opt {
		return optReply{}, fmt.Errorf("the server answered %s when asked %s", optName(got), optName(opt))
	}
	r := optReply{typ: binary.BigEndian.Uint32(hdr[12:])}
	n := binary.BigEndian.Uint32(hdr[16:])
	if n > maxOptReply {
		return optReply{}, fmt.Errorf("reply to %s of %d bytes: too big", optName(opt), n)
	}
	r.data = make([]byte, n)
	if _, err := io.ReadFull(h.br, r.data); err != nil {
		return optReply{}, fmt.Errorf("reading the reply to %s: %w", optName(opt), eofIsUnexpected(err))
	}
	return r, nil
}

func eofIsUnexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
