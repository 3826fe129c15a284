package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Limits on option data. Real options are a few hundred bytes; the larger
// limit lets us answer a merely oversized option with NBD_REP_ERR_TOO_BIG
// and stay in sync, the smaller one drops clients that are not speaking NBD
// at all without reading megabytes from them.
const (
	maxOptionLen        = 64 << 10
	maxDiscardOptionLen = 1 << 20
)

var errAbort = errors.New("client sent NBD_OPT_ABORT")

// negotiation is the state option haggling builds up.
type negotiation struct {
	noZeroes   bool
	structured bool
	// metaExport is the export named by the last NBD_OPT_SET_META_CONTEXT,
	// and metaAllocation whether it selected base:allocation. They only
	// count if the client then goes to the same export.
	metaExport     string
	metaAllocation bool
	// metaDirty is the dirty bitmap selected, if any.
	metaDirty string
}

// handshake runs the fixed newstyle handshake up to the transmission phase.
// A nil error means the client selected an export with NBD_OPT_GO or
// NBD_OPT_EXPORT_NAME; any error means the connection must be closed.
func (c *conn) handshake() (*session, error) {
	var greeting [18]byte
	binary.BigEndian.PutUint64(greeting[0:], magicNBD)
	binary.BigEndian.PutUint64(greeting[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(greeting[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(greeting[:]); err != nil {
		return nil, fmt.Errorf("sending greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(cf[:])
	if cflags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		// The spec requires dropping the connection: the client expects
		// something we did not offer.
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE speaks plain newstyle,
	// which only has NBD_OPT_EXPORT_NAME; that option works the same
	// either way, so such clients are served too.
	n := negotiation{noZeroes: cflags&clientFlagNoZeroes != 0}

	var hdr [optHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return nil, fmt.Errorf("reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != magicIHaveOpt {
			return nil, fmt.Errorf("bad option magic %#016x", m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLen {
			if length > maxDiscardOptionLen {
				return nil, fmt.Errorf("option %d with %d bytes of data", opt, length)
			}
			if _, err := c.br.Discard(int(length)); err != nil {
				return nil, fmt.Errorf("skipping data of option %d: %w", opt, err)
			}
			if opt == optExportName {
				return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME with %d bytes of data", length)
			}
			if err := c.optError(opt, repErrTooBig, "option data too large"); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("reading data of option %d: %w", opt, err)
		}

		var (
			sess *session
			err  error
		)
		switch opt {
		case optExportName:
			return c.optExportName(&n, data)
		case optAbort:
			// The client may already have closed; the ACK is a courtesy.
			c.optReply(opt, repAck, nil)
			return nil, errAbort
		case optList:
			err = c.optList(data)
		case optStartTLS:
			if len(data) != 0 {
				err = c.optError(opt, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
			} else {
				err = c.optError(opt, repErrUnsup, "TLS is not supported by this server")
			}
		case optInfo, optGo:
			sess, err = c.optInfo(&n, opt, data)
			if sess != nil {
				return sess, nil
			}
		case optStructuredReply:
			if len(data) != 0 {
				err = c.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
			} else {
				n.structured = true
				err = c.optReply(opt, repAck, nil)
			}
		case optListMetaContext, optSetMetaContext:
			err = c.optMetaContext(&n, opt, data)
		default:
			err = c.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
		}
		if err != nil {
			return nil, err
		}
	}
}

// optReply sends one option reply with payload.
func (c *conn) optReply(opt, typ uint32, payload []byte) error {
	b := make([]byte, optReplyHeaderLen, optReplyHeaderLen+len(payload))
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(payload)))
	b = append(b, payload...)
	if _, err := c.nc.Write(b); err != nil {
		return fmt.Errorf("replying to option %d: %w", opt, err)
	}
	return nil
}

// optError sends an error reply carrying a message for humans.
func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, appendMessage(nil, msg))
}

// lookup finds an export and checks its configuration. On failure it
// returns the option error reply to send and a message for the client.
func (c *conn) lookup(name string) (*Export, blockSizes, uint32, string) {
	exp, err := c.srv.Exports.Export(c.ctx, name)
	if err == nil && exp == nil {
		err = ErrNoSuchExport
	}
	if err != nil {
		switch {
		case errors.Is(err, ErrNoSuchExport):
			return nil, blockSizes{}, repErrUnknown, fmt.Sprintf("export %q does not exist", name)
		case errors.Is(err, ErrInvalid):
			// A malformed name: the source's message says what is wrong with it.
			return nil, blockSizes{}, repErrInvalid, err.Error()
		case errors.Is(err, ErrShutdown) || c.ctx.Err() != nil:
			return nil, blockSizes{}, repErrShutdown, "server is shutting down"
		}
		c.log.Warn("nbd: looking up export failed", "export", name, "err", err)
		return nil, blockSizes{}, repErrUnknown, fmt.Sprintf("export %q is unavailable", name)
	}
	bs, err := exp.blockSizes()
	if err != nil {
		c.log.Error("nbd: export is misconfigured", "export", name, "err", err)
		return nil, blockSizes{}, repErrUnknown, fmt.Sprintf("export %q is unavailable", name)
	}
	return exp, bs, 0, ""
}

func (c *conn) newSession(n *negotiation, name string, exp *Export, bs blockSizes) *session {
	structured := n.structured
	sess := &session{
		name:           name,
		backend:        exp.Backend,
		size:           exp.Size,
		bs:             bs,
		readOnly:       exp.ReadOnly,
		structured:     structured,
		metaAllocation: structured && n.metaAllocation && n.metaExport == name,
	}
	if structured && n.metaExport == name {
		sess.metaDirty = n.metaDirty
	}
	return sess
}

// optExportName handles NBD_OPT_EXPORT_NAME, which cannot report errors:
// an unknown export ends the connection.
func (c *conn) optExportName(n *negotiation, data []byte) (*session, error) {
	if len(data) > maxStringLen {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME with a %d byte name", len(data))
	}
	name := string(data)
	exp, bs, rep, msg := c.lookup(name)
	if rep != 0 {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: %s", msg)
	}
	b := make([]byte, 10, 10+124)
	binary.BigEndian.PutUint64(b[0:], uint64(exp.Size))
	binary.BigEndian.PutUint16(b[8:], transmissionFlags(exp, n.structured))
	if !n.noZeroes {
		b = b[:10+124]
	}
	if _, err := c.nc.Write(b); err != nil {
		return nil, fmt.Errorf("replying to NBD_OPT_EXPORT_NAME: %w", err)
	}
	return c.newSession(n, name, exp, bs), nil
}

func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.optError(optList, repErrInvalid, "NBD_OPT_LIST takes no data")
	}
	names, err := c.srv.Exports.ExportNames(c.ctx)
	if err != nil {
		c.log.Warn("nbd: listing exports failed", "err", err)
		return c.optError(optList, repErrPolicy, "listing exports failed")
	}
	for _, name := range names {
		if len(name) > maxStringLen {
			continue
		}
		p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		if err := c.optReply(optList, repServer, append(p, name...)); err != nil {
			return err
		}
	}
	return c.optReply(optList, repAck, nil)
}

// optInfo handles NBD_OPT_INFO and NBD_OPT_GO. It returns a session only
// when NBD_OPT_GO succeeded.
func (c *conn) optInfo(n *negotiation, opt uint32, data []byte) (*session, error) {
	// Data: u32 name length, name, u16 count, count × u16 info type.
	if len(data) < 6 {
		return nil, c.optError(opt, repErrInvalid, "request too short")
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return nil, c.optError(opt, repErrInvalid, "export name overruns the request")
	}
	if nameLen > maxStringLen {
		return nil, c.optError(opt, repErrInvalid, "export name too long")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return nil, c.optError(opt, repErrInvalid, "information request list does not match its count")
	}
	var wantName, wantDescription bool
	for i := 0; i < count; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDescription = true
		}
	}

	exp, bs, rep, msg := c.lookup(name)
	if rep != 0 {
		return nil, c.optError(opt, rep, msg)
	}

	// NBD_INFO_EXPORT is mandatory. NBD_INFO_BLOCK_SIZE is sent even
	// unrequested (the spec allows it) so that every client can see the
	// constraints we enforce.
	p := make([]byte, 0, 64)
	p = binary.BigEndian.AppendUint16(p, infoExport)
	p = binary.BigEndian.AppendUint64(p, uint64(exp.Size))
	p = binary.BigEndian.AppendUint16(p, transmissionFlags(exp, n.structured))
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	p = binary.BigEndian.AppendUint16(p[:0], infoBlockSize)
	p = binary.BigEndian.AppendUint32(p, bs.min)
	p = binary.BigEndian.AppendUint32(p, bs.preferred)
	p = binary.BigEndian.AppendUint32(p, bs.max)
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	if wantName {
		canonical := exp.Name
		if canonical == "" {
			canonical = name
		}
		if len(canonical) <= maxStringLen {
			p = binary.BigEndian.AppendUint16(p[:0], infoName)
			if err := c.optReply(opt, repInfo, append(p, canonical...)); err != nil {
				return nil, err
			}
		}
	}
	if wantDescription && exp.Description != "" {
		p = binary.BigEndian.AppendUint16(p[:0], infoDescription)
		if err := c.optReply(opt, repInfo, appendMessage(p, exp.Description)); err != nil {
			return nil, err
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt != optGo {
		return nil, nil
	}
	return c.newSession(n, name, exp, bs), nil
}

// optMetaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The only context is base:allocation.
func (c *conn) optMetaContext(n *negotiation, opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		// A SET replaces the previous selection even when it fails.
		n.metaExport, n.metaAllocation, n.metaDirty = "", false, ""
		if !n.structured {
			return c.optError(opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT requires structured replies")
		}
	}
	name, queries, ok := parseMetaContextRequest(data)
	if !ok {
		return c.optError(opt, repErrInvalid, "malformed metadata context request")
	}
	exp, _, rep, msg := c.lookup(name)
	if rep != 0 {
		return c.optError(opt, rep, msg)
	}
	bitmaps, _ := exp.Backend.(DirtyBitmaps)

	var allocation bool
	var dirty string
	if opt == optListMetaContext && len(queries) == 0 {
		allocation = true
	}
	for _, q := range queries {
		ns, leaf, found := strings.Cut(q, ":")
		if !found || ns == "" {
			return c.optError(opt, repErrInvalid, fmt.Sprintf("metadata context query %q has no namespace", q))
		}
		// Unknown namespaces and leaves are ignored, as the spec requires;
		// the empty leaf is a wildcard for listing only.
		if ns == "base" && (leaf == "allocation" || (leaf == "" && opt == optListMetaContext)) {
			allocation = true
		}
		if bm, ok := strings.CutPrefix(q, metaContextDirtyPrefix); ok && bm != "" && bitmaps != nil && bitmaps.HasDirtyBitmap(c.ctx, bm) {
			dirty = bm
		}
	}
	if allocation {
		// Context IDs in a LIST reply are reserved and should be zero.
		var id uint32
		if opt == optSetMetaContext {
			id = allocationContextID
			n.metaExport, n.metaAllocation = name, true
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, repMetaContext, append(p, metaContextAllocation...)); err != nil {
			return err
		}
	}
	if dirty != "" {
		var id uint32
		if opt == optSetMetaContext {
			id = dirtyContextID
			n.metaExport, n.metaDirty = name, dirty
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, repMetaContext, append(p, metaContextDirtyPrefix+dirty...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// parseMetaContextRequest parses the data of NBD_OPT_LIST_META_CONTEXT
// and NBD_OPT_SET_META_CONTEXT: u32 name length, name, u32 query count,
// then count × (u32 length, query).
func parseMetaContextRequest(data []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(data) < 4 {
			return "", false
		}
		l := binary.BigEndian.Uint32(data)
		if l > maxStringLen || uint64(l) > uint64(len(data)-4) {
			return "", false
		}
		s := string(data[4 : 4+l])
		data = data[4+l:]
		return s, true
	}
	if name, ok = str(); !ok || len(data) < 4 {
		return "", nil, false
	}
	count := binary.BigEndian.Uint32(data)
	data = data[4:]
	// Each query takes at least 4 bytes, which bounds count by the option
	// length before anything is allocated.
	if uint64(count) > uint64(len(data)/4) {
		return "", nil, false
	}
	queries = make([]string, 0, count)
	for i := uint32(0); i < count; i++ {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(data) != 0 {
		return "", nil, false
	}
	return name, queries, true
}
