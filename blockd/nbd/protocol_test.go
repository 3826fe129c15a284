package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	diskSize   = 64 << 20
	roSize     = 1 << 20
	strictSize = 1 << 20
	strictMin  = 512
	strictMax  = 64 << 10
)

// fixture is a running server with three exports: "disk" (read-write,
// multi-conn, default block sizes), "ro" (read-only) and "strict" (512
// byte minimum and 64 KiB maximum block size, to exercise the limits).
type fixture struct {
	*testServer
	disk, ro, strict *memBackend
	exports          exportMap
}

func newFixture(t testing.TB, configure ...func(*fixture)) *fixture {
	t.Helper()
	f := &fixture{disk: newMemBackend(diskSize), ro: newMemBackend(roSize), strict: newMemBackend(strictSize)}
	f.exports = exportMap{
		"disk":   {Description: "test disk", Size: diskSize, MultiConn: true, Backend: f.disk},
		"ro":     {Size: roSize, ReadOnly: true, Backend: f.ro},
		"strict": {Name: "strict", Size: strictSize, MinBlockSize: strictMin, MaxBlockSize: strictMax, Backend: f.strict},
	}
	for _, c := range configure {
		c(f)
	}
	f.testServer = startServer(t, &Server{Exports: f.exports, Workers: 8})
	return f
}

func (f *fixture) dial(t testing.TB) *rawClient {
	return dialRaw(t, "tcp", f.tcp)
}

func TestExportNameHandshake(t *testing.T) {
	f := newFixture(t)
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			c := f.dial(t)
			cflags := clientFlagFixedNewstyle
			if noZeroes {
				cflags |= clientFlagNoZeroes
			}
			c.greet(cflags)
			c.sendOpt(optExportName, []byte("disk"))
			n := 10
			if !noZeroes {
				n += 124
			}
			b := c.readFull(n)
			if size := binary.BigEndian.Uint64(b); size != diskSize {
				t.Errorf("size %d, want %d", size, diskSize)
			}
			if !bytes.Equal(b[10:], make([]byte, n-10)) {
				t.Errorf("padding is not zero")
			}
			// The next bytes must be the reply to our read, not padding.
			r := c.do(cmdRead, 0, 0, 4096, nil)
			if r.errno != 0 || len(r.data) != 4096 {
				t.Fatalf("read after NBD_OPT_EXPORT_NAME: errno %d, %d bytes", r.errno, len(r.data))
			}
		})
	}
}

func TestExportNameUnknownDisconnects(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optExportName, []byte("nope"))
	c.expectEOF()
}

func TestPlainNewstyleClient(t *testing.T) {
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE may only send
	// NBD_OPT_EXPORT_NAME, which must still work.
	f := newFixture(t)
	c := f.dial(t)
	c.greet(0)
	c.sendOpt(optExportName, []byte("ro"))
	b := c.readFull(10 + 124)
	if flags := binary.BigEndian.Uint16(b[8:]); flags&tflagReadOnly == 0 {
		t.Errorf("flags %#x lack READ_ONLY", flags)
	}
}

func TestOptList(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optList, nil)
	var names []string
	for {
		r := c.readOptReply()
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
	}
	if got := strings.Join(names, ","); got != "disk,ro,strict" {
		t.Errorf("exports %q", got)
	}
	c.sendOpt(optList, []byte("x"))
	c.expectOptReply(optList, repErrInvalid)
	c.negotiate2("disk")
}

// negotiate2 finishes a handshake that already greeted.
func (c *rawClient) negotiate2(name string) {
	c.t.Helper()
	c.sendOpt(optGo, encodeInfoRequest(name))
	info, final := c.readInfoReplies(optGo)
	if final.typ != repAck {
		c.t.Fatalf("NBD_OPT_GO ended with %#x %q", final.typ, final.data)
	}
	c.size, c.tflags = info.size, info.flags
	if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
		c.t.Fatalf("read after negotiation: errno %d", r.errno)
	}
}

func TestUnknownOptions(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	for _, opt := range []uint32{optPeekExport, optExtendedHeaders, 999, 1 << 31} {
		c.sendOpt(opt, []byte("some option data"))
		c.expectOptReply(opt, repErrUnsup)
	}
	// Too big to process, small enough to skip: the server stays in sync.
	c.sendOpt(optInfo, make([]byte, maxOptionLen+1))
	c.expectOptReply(optInfo, repErrTooBig)
	c.negotiate2("disk")
}

func TestStartTLSRefused(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optStartTLS, nil)
	r := c.expectOptReply(optStartTLS, repErrUnsup)
	if !strings.Contains(string(r.data), "TLS") {
		t.Errorf("message %q", r.data)
	}
	c.sendOpt(optStartTLS, []byte{1})
	c.expectOptReply(optStartTLS, repErrInvalid)
	c.negotiate2("disk")
}

func TestOptAbort(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optAbort, nil)
	c.expectOptReply(optAbort, repAck)
	c.expectEOF()
}

func TestOptInfoThenGo(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optStructuredReply, nil)
	c.expectOptReply(optStructuredReply, repAck)
	c.structured = true

	req := encodeInfoRequest("disk", infoName, infoDescription, infoBlockSize, 0x7777)
	c.sendOpt(optInfo, req)
	info, final := c.readInfoReplies(optInfo)
	if final.typ != repAck {
		t.Fatalf("NBD_OPT_INFO ended with %#x %q", final.typ, final.data)
	}
	want := exportInfo{
		size:  diskSize,
		flags: tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagSendDF | tflagCanMultiConn | tflagSendCache,
		min:   1, preferred: 4096, max: 32 << 20,
		name: "disk", description: "test disk",
	}
	if info != want {
		t.Errorf("NBD_OPT_INFO:\n got %+v\nwant %+v", info, want)
	}
	// INFO does not end negotiation: options still work.
	c.sendOpt(optStructuredReply, nil)
	c.expectOptReply(optStructuredReply, repAck)

	c.sendOpt(optGo, req)
	info2, final := c.readInfoReplies(optGo)
	if final.typ != repAck {
		t.Fatalf("NBD_OPT_GO ended with %#x %q", final.typ, final.data)
	}
	if info2 != info {
		t.Errorf("NBD_OPT_GO reported %+v, NBD_OPT_INFO %+v", info2, info)
	}
	if r := c.do(cmdRead, 0, 0, 4096, nil); r.errno != 0 || len(r.data) != 4096 || !r.structured {
		t.Fatalf("read: %+v", r)
	}
}

func TestOptGoErrors(t *testing.T) {
	f := newFixture(t, func(f *fixture) {
		f.exports["broken"] = &Export{Size: 1 << 20, MinBlockSize: 3, Backend: newMemBackend(1 << 20)}
	})
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)

	c.sendOpt(optGo, encodeInfoRequest("missing"))
	r := c.expectOptReply(optGo, repErrUnknown)
	if !strings.Contains(string(r.data), `"missing"`) {
		t.Errorf("message %q does not name the export", r.data)
	}
	for _, bad := range [][]byte{
		nil,
		{0, 0, 0, 9, 'd', 'i', 's', 'k', 0, 0}, // name overruns
		append(encodeInfoRequest("disk"), 0),   // trailing byte
		encodeInfoRequest("disk", 1, 2)[:12],   // count mismatch
	} {
		c.sendOpt(optGo, bad)
		c.expectOptReply(optGo, repErrInvalid)
	}

	// A misconfigured export is refused, not served.
	c.sendOpt(optInfo, encodeInfoRequest("broken"))
	c.expectOptReply(optInfo, repErrUnknown)

	c.negotiate2("disk")
}

func TestMetaContextNegotiation(t *testing.T) {
	f := newFixture(t)
	c := f.dial(t)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)

	// SET needs structured replies first.
	c.sendOpt(optSetMetaContext, encodeMetaRequest("disk", metaContextAllocation))
	c.expectOptReply(optSetMetaContext, repErrInvalid)
	c.sendOpt(optStructuredReply, nil)
	c.expectOptReply(optStructuredReply, repAck)
	c.structured = true

	list := func(queries ...string) []string {
		t.Helper()
		c.sendOpt(optListMetaContext, encodeMetaRequest("disk", queries...))
		var got []string
		for {
			r := c.readOptReply()
			if r.typ == repAck {
				return got
			}
			if r.typ != repMetaContext {
				t.Fatalf("reply %#x %q", r.typ, r.data)
			}
			if id := binary.BigEndian.Uint32(r.data); id != 0 {
				t.Errorf("LIST reply context ID %d, want 0", id)
			}
			got = append(got, string(r.data[4:]))
		}
	}
	for _, tc := range []struct {
		queries []string
		want    string
	}{
		{nil, metaContextAllocation},
		{[]string{"base:"}, metaContextAllocation},
		{[]string{"base:allocation"}, metaContextAllocation},
		{[]string{"base:allocation", "base:"}, metaContextAllocation},
		{[]string{"base:other"}, ""},
		{[]string{"qemu:dirty-bitmap:x"}, ""},
	} {
		if got := strings.Join(list(tc.queries...), ","); got != tc.want {
			t.Errorf("LIST %q = %q, want %q", tc.queries, got, tc.want)
		}
	}
	c.sendOpt(optListMetaContext, encodeMetaRequest("disk", "nocolon"))
	c.expectOptReply(optListMetaContext, repErrInvalid)
	c.sendOpt(optListMetaContext, encodeMetaRequest("missing"))
	c.expectOptReply(optListMetaContext, repErrUnknown)
	c.sendOpt(optSetMetaContext, encodeMetaRequest("disk", metaContextAllocation)[:9])
	c.expectOptReply(optSetMetaContext, repErrInvalid)

	// "base:" selects nothing in SET.
	c.sendOpt(optSetMetaContext, encodeMetaRequest("disk", "base:"))
	c.expectOptReply(optSetMetaContext, repAck)
	// Selecting for one export and going to another selects nothing.
	c.sendOpt(optSetMetaContext, encodeMetaRequest("disk", metaContextAllocation))
	r := c.expectOptReply(optSetMetaContext, repMetaContext)
	if id := binary.BigEndian.Uint32(r.data); id != allocationContextID {
		t.Errorf("context ID %d", id)
	}
	c.expectOptReply(optSetMetaContext, repAck)
	c.sendOpt(optGo, encodeInfoRequest("strict"))
	if _, final := c.readInfoReplies(optGo); final.typ != repAck {
		t.Fatalf("GO: %#x", final.typ)
	}
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errnoInval {
		t.Errorf("block status without a context for this export: errno %d", r.errno)
	}
}

func TestHandshakeGarbage(t *testing.T) {
	f := newFixture(t)
	cases := map[string]func(c *rawClient){
		"random bytes instead of flags and options": func(c *rawClient) {
			c.readFull(18)
			c.write([]byte("GET / HTTP/1.1\r\nHost: example\r\n\r\n"))
		},
		"unknown client flags": func(c *rawClient) {
			c.greet(clientFlagFixedNewstyle | 1<<7)
		},
		"bad option magic": func(c *rawClient) {
			c.greet(clientFlagFixedNewstyle)
			b := encodeOpt(optGo, encodeInfoRequest("disk"))
			b[0] ^= 0xff
			c.write(b)
		},
		"huge option": func(c *rawClient) {
			c.greet(clientFlagFixedNewstyle)
			b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
			b = binary.BigEndian.AppendUint32(b, optGo)
			b = binary.BigEndian.AppendUint32(b, 1<<30)
			c.write(b)
		},
		"truncated option": func(c *rawClient) {
			c.greet(clientFlagFixedNewstyle)
			c.write(encodeOpt(optGo, encodeInfoRequest("disk"))[:20])
			c.nc.(*net.TCPConn).CloseWrite()
		},
	}
	for name, send := range cases {
		t.Run(name, func(t *testing.T) {
			c := f.dial(t)
			send(c)
			c.expectEOF()
		})
	}
	// The server survives all of that.
	c := f.dial(t)
	c.negotiate("disk", true, true)
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, &Server{Exports: exportMap{}, HandshakeTimeout: 200 * time.Millisecond})
	c := dialRaw(t, "tcp", ts.tcp)
	c.greet(clientFlagFixedNewstyle)
	start := time.Now()
	c.expectEOF()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("closed after %v", d)
	}
}

func TestTransmissionFlags(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		export     string
		structured bool
		want       uint16
	}{
		{"disk", false, tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagCanMultiConn | tflagSendCache},
		{"disk", true, tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagCanMultiConn | tflagSendCache | tflagSendDF},
		{"ro", false, tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendCache},
	} {
		c := f.dial(t)
		info := c.negotiate(tc.export, tc.structured, false)
		if info.flags != tc.want {
			t.Errorf("%s structured=%v: flags %#x, want %#x", tc.export, tc.structured, info.flags, tc.want)
		}
	}
}

// TestReadWrite exercises every command once with simple and with
// structured replies.
func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			f := newFixture(t)
			c := f.dial(t)
			c.negotiate("disk", structured, structured)

			pattern := bytes.Repeat([]byte{0xa5, 0x5a, 0x01, 0xfe}, 64<<10/4)
			if r := c.do(cmdWrite, cmdFlagFUA, 1<<20, uint32(len(pattern)), pattern); r.errno != 0 {
				t.Fatalf("write: errno %d", r.errno)
			}
			if r := c.do(cmdRead, 0, 1<<20, uint32(len(pattern)), nil); r.errno != 0 || !bytes.Equal(r.data, pattern) {
				t.Fatalf("read back: errno %d, equal %v", r.errno, bytes.Equal(r.data, pattern))
			}
			// Unaligned I/O is fine with the default minimum block size.
			if r := c.do(cmdWrite, 0, 1<<20+3, 5, []byte("hello")); r.errno != 0 {
				t.Fatalf("unaligned write: errno %d", r.errno)
			}
			if r := c.do(cmdRead, 0, 1<<20+1, 9, nil); r.errno != 0 || string(r.data) != "\x5a\x01hello\xa5\x5a" {
				t.Fatalf("unaligned read: errno %d, %q", r.errno, r.data)
			}
			if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 || f.disk.flushes.Load() != 1 {
				t.Fatalf("flush: errno %d, %d flushes", r.errno, f.disk.flushes.Load())
			}
			if r := c.do(cmdCache, 0, 0, 1<<20, nil); r.errno != 0 {
				t.Fatalf("cache: errno %d", r.errno)
			}
			if r := c.do(cmdTrim, cmdFlagFUA, 1<<20, 16<<10, nil); r.errno != 0 {
				t.Fatalf("trim: errno %d", r.errno)
			}
			if r := c.do(cmdWriteZeroes, cmdFlagNoHole, 1<<20+16<<10, 16<<10, nil); r.errno != 0 {
				t.Fatalf("write zeroes: errno %d", r.errno)
			}
			if r := c.do(cmdWriteZeroes, cmdFlagFastZero, 1<<20+32<<10, 16<<10, nil); r.errno != 0 {
				t.Fatalf("fast write zeroes: errno %d", r.errno)
			}
			r := c.do(cmdRead, 0, 1<<20, uint32(len(pattern)), nil)
			want := append(make([]byte, 48<<10), pattern[48<<10:]...)
			if r.errno != 0 || !bytes.Equal(r.data, want) {
				t.Fatalf("read after trim and zeroing: errno %d, equal %v", r.errno, bytes.Equal(r.data, want))
			}
			if r := c.do(cmdRead, 0, 0, 0, nil); r.errno != 0 || len(r.data) != 0 {
				t.Fatalf("zero-length read: %+v", r)
			}
			// Pages: 1M..1M+16K trimmed (holes), +16K..+32K zeroed with
			// NO_HOLE (allocated), +32K..+48K fast-zeroed (holes),
			// +48K..+64K data.
			wantPages := []int64{}
			for off := int64(1<<20 + 16<<10); off < 1<<20+32<<10; off += memPageSize {
				wantPages = append(wantPages, off)
			}
			for off := int64(1<<20 + 48<<10); off < 1<<20+64<<10; off += memPageSize {
				wantPages = append(wantPages, off)
			}
			if got := f.disk.allocated(); fmt.Sprint(got) != fmt.Sprint(wantPages) {
				t.Errorf("allocated pages %v, want %v", got, wantPages)
			}
			if !structured {
				return
			}
			r = c.do(cmdBlockStatus, 0, 1<<20-4096, 72<<10, nil)
			wantExt := [][2]uint32{
				{4096 + 16<<10, stateHole | stateZero},
				{16 << 10, 0},
				{16 << 10, stateHole | stateZero},
				{16 << 10, 0},
				{4096, stateHole | stateZero},
			}
			if r.errno != 0 || r.contextID != allocationContextID || fmt.Sprint(r.extents) != fmt.Sprint(wantExt) {
				t.Errorf("block status: errno %d, context %d, extents %v, want %v", r.errno, r.contextID, r.extents, wantExt)
			}
			r = c.do(cmdBlockStatus, cmdFlagReqOne, 1<<20+16<<10, 64<<10, nil)
			if fmt.Sprint(r.extents) != fmt.Sprint([][2]uint32{{16 << 10, 0}}) {
				t.Errorf("block status with REQ_ONE: %v", r.extents)
			}
			r = c.do(cmdBlockStatus, cmdFlagReqOne, 0, 4096, nil)
			if fmt.Sprint(r.extents) != fmt.Sprint([][2]uint32{{4096, stateHole | stateZero}}) {
				t.Errorf("block status with REQ_ONE: %v", r.extents)
			}
			// DF: one data chunk, as always.
			r = c.do(cmdRead, cmdFlagDF, 1<<20, 64<<10, nil)
			if r.errno != 0 || len(r.chunkTypes) != 1 || r.chunkTypes[0] != replyTypeOffsetData {
				t.Errorf("read with DF: errno %d, chunks %v", r.errno, r.chunkTypes)
			}
		})
	}
}

// blockingBackend wraps memBackend hooks so that a read at one offset
// blocks until released.
func TestOutOfOrderReplies(t *testing.T) {
	const slowOff, fastOff = 0, 1 << 20
	entered := make(chan struct{})
	release := make(chan struct{})
	f := newFixture(t, func(f *fixture) {
		f.disk.onRead = func(ctx context.Context, off int64) error {
			if off == slowOff {
				close(entered)
				select {
				case <-release:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return nil
		}
	})
	c := f.dial(t)
	c.negotiate("disk", false, false)
	c.write(append(encodeRequest(cmdWrite, 0, 3, fastOff, 4), "fast"...))
	if r := c.readReply(); r.cookie != 3 || r.errno != 0 {
		t.Fatalf("write reply %+v", r)
	}

	c.send(cmdRead, 0, 1, slowOff, 4096, nil)
	<-entered // request 1 is now stuck in the backend
	c.send(cmdRead, 0, 2, fastOff, 4, nil)
	r := c.readReply()
	if r.cookie != 2 || string(r.data) != "fast" {
		t.Fatalf("first reply: cookie %d data %q; want the later request's reply first", r.cookie, r.data)
	}
	close(release)
	if r := c.readReply(); r.cookie != 1 || r.errno != 0 || len(r.data) != 4096 {
		t.Fatalf("second reply: cookie %d errno %d len %d", r.cookie, r.errno, len(r.data))
	}
}

func TestManyInFlight(t *testing.T) {
	// More requests than workers, all in flight, all answered.
	f := newFixture(t)
	c := f.dial(t)
	c.negotiate("disk", true, false)
	const n = 200
	go func() {
		for i := range n {
			p := bytes.Repeat([]byte{byte(i)}, 4096)
			c.write(append(encodeRequest(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096), p...))
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		r := c.readReply()
		if r.errno != 0 || seen[r.cookie] {
			t.Fatalf("reply %+v (seen before: %v)", r, seen[r.cookie])
		}
		seen[r.cookie] = true
	}
	for i := range n {
		c.send(cmdRead, 0, uint64(i), uint64(i)*4096, 4096, nil)
	}
	for range n {
		r := c.readReply()
		if want := bytes.Repeat([]byte{byte(r.cookie)}, 4096); r.errno != 0 || !bytes.Equal(r.data, want) {
			t.Fatalf("read %d: errno %d, wrong data", r.cookie, r.errno)
		}
	}
}

func TestBackendErrors(t *testing.T) {
	errs := map[int64]error{
		0 << 12: fmt.Errorf("replica 3 out of space: %w", ErrNoSpace),
		1 << 12: fmt.Errorf("volume fenced: %w", ErrPermission),
		2 << 12: errors.New("something broke"),
		3 << 12: fmt.Errorf("checksum mismatch: %w", ErrIO),
		4 << 12: fmt.Errorf("open: %w", syscall.EDQUOT),
		5 << 12: fmt.Errorf("stopping: %w", ErrShutdown),
		6 << 12: fmt.Errorf("bad offset: %w", ErrInvalid),
		7 << 12: ErrNotSupported, // not allowed on reads: EINVAL
		8 << 12: fmt.Errorf("bad \x00 message \xff: %w", ErrIO),
	}
	want := map[int64]uint32{0: errnoNoSpc, 1 << 12: errnoPerm, 2 << 12: errnoIO, 3 << 12: errnoIO, 4 << 12: errnoNoSpc, 5 << 12: errnoShutdown, 6 << 12: errnoInval, 7 << 12: errnoInval, 8 << 12: errnoIO}
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			f := newFixture(t, func(f *fixture) {
				f.disk.onRead = func(ctx context.Context, off int64) error { return errs[off] }
				f.disk.onWrite = func(ctx context.Context, off int64) error { return errs[off] }
				f.disk.onFlush = func(ctx context.Context) error { return errs[2<<12] }
			})
			c := f.dial(t)
			c.negotiate("disk", structured, false)
			for off, errno := range want {
				r := c.do(cmdRead, 0, uint64(off), 4096, nil)
				if r.errno != errno || len(r.data) != 0 {
					t.Errorf("read at %d: errno %d with %d bytes, want errno %d", off, r.errno, len(r.data), errno)
				}
				if structured && r.msg != strings.ToValidUTF8(strings.ReplaceAll(errs[off].Error(), "\x00", "?"), "?") {
					t.Errorf("read at %d: message %q", off, r.msg)
				}
				r = c.do(cmdWrite, 0, uint64(off), 4096, make([]byte, 4096))
				if r.errno != errno {
					t.Errorf("write at %d: errno %d, want %d", off, r.errno, errno)
				}
			}
			if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != errnoIO {
				t.Errorf("flush: errno %d", r.errno)
			}
			// The connection is still fine.
			if r := c.do(cmdRead, 0, 1<<20, 4096, nil); r.errno != 0 || len(r.data) != 4096 {
				t.Fatalf("read after errors: %+v", r)
			}
		})
	}
}

func TestWriteZeroesFallbacks(t *testing.T) {
	f := newFixture(t, func(f *fixture) {
		// A backend that cannot zero at all.
		f.disk.onZero = func(ctx context.Context, off, length int64, flags ZeroFlags) error {
			return fmt.Errorf("zeroing %d+%d: %w", off, length, ErrNotSupported)
		}
	})
	c := f.dial(t)
	c.negotiate("disk", true, false)
	c.do(cmdWrite, 0, 0, 8192, bytes.Repeat([]byte{1}, 8192))
	if r := c.do(cmdWriteZeroes, cmdFlagFastZero, 0, 8192, nil); r.errno != errnoNotSup {
		t.Errorf("fast zero on a backend that cannot: errno %d, want ENOTSUP", r.errno)
	}
	if r := c.do(cmdRead, 0, 0, 8192, nil); !bytes.Equal(r.data, bytes.Repeat([]byte{1}, 8192)) {
		t.Errorf("failed fast zero changed the data")
	}
	// Without FAST_ZERO the server writes zeroes itself, 3 MiB in 1 MiB
	// writes.
	writes := f.disk.writes.Load()
	if r := c.do(cmdWriteZeroes, 0, 0, 3<<20, nil); r.errno != 0 {
		t.Errorf("write zeroes: errno %d", r.errno)
	}
	if n := f.disk.writes.Load() - writes; n != 3 {
		t.Errorf("%d writes to emulate zeroing, want 3", n)
	}
	if r := c.do(cmdRead, 0, 0, 8192, nil); !bytes.Equal(r.data, make([]byte, 8192)) {
		t.Errorf("data not zeroed")
	}
}

func TestBadRequests(t *testing.T) {
	type tc struct {
		name       string
		export     string
		typ, flags uint16
		off        uint64
		length     uint32
		payload    bool // send length bytes of payload
		want       uint32
		needsMeta  bool
		simpleOnly bool
	}
	cases := []tc{
		{name: "read past end", export: "disk", typ: cmdRead, off: diskSize - 512, length: 1024, want: errnoInval},
		{name: "read offset past end", export: "disk", typ: cmdRead, off: 1 << 62, length: 1, want: errnoInval},
		{name: "read offset overflow", export: "disk", typ: cmdRead, off: ^uint64(0), length: 2, want: errnoInval},
		{name: "write past end", export: "disk", typ: cmdWrite, off: diskSize - 512, length: 1024, payload: true, want: errnoNoSpc},
		{name: "trim past end", export: "disk", typ: cmdTrim, off: diskSize, length: 1, want: errnoInval},
		{name: "zero past end", export: "disk", typ: cmdWriteZeroes, off: diskSize, length: 1, want: errnoNoSpc},
		{name: "block status past end", export: "disk", typ: cmdBlockStatus, off: diskSize, length: 1, want: errnoInval, needsMeta: true},
		{name: "read over max block size", export: "strict", typ: cmdRead, length: strictMax * 2, want: errnoInval},
		{name: "write over max block size", export: "strict", typ: cmdWrite, length: strictMax * 2, payload: true, want: errnoInval},
		{name: "zero over max block size", export: "strict", typ: cmdWriteZeroes, length: strictMax * 2, want: errnoInval},
		{name: "cache over max block size", export: "strict", typ: cmdCache, length: strictMax * 2, want: errnoInval},
		{name: "misaligned read offset", export: "strict", typ: cmdRead, off: 1, length: strictMin, want: errnoInval},
		{name: "misaligned write length", export: "strict", typ: cmdWrite, length: strictMin + 1, payload: true, want: errnoInval},
		{name: "misaligned trim", export: "strict", typ: cmdTrim, off: 256, length: strictMin, want: errnoInval},
		{name: "unknown command", export: "disk", typ: 42, want: errnoInval},
		{name: "resize command", export: "disk", typ: 8, length: 4096, want: errnoInval},
		{name: "unknown flag", export: "disk", typ: cmdRead, flags: 1 << 9, length: 512, want: errnoInval},
		{name: "flag for another command", export: "disk", typ: cmdWrite, flags: cmdFlagNoHole, length: 512, payload: true, want: errnoInval},
		{name: "DF without structured replies", export: "disk", typ: cmdRead, flags: cmdFlagDF, length: 512, want: errnoInval, simpleOnly: true},
		{name: "write to read-only", export: "ro", typ: cmdWrite, length: 4096, payload: true, want: errnoPerm},
		{name: "trim on read-only", export: "ro", typ: cmdTrim, length: 4096, want: errnoPerm},
		{name: "zero on read-only", export: "ro", typ: cmdWriteZeroes, length: 4096, want: errnoPerm},
		{name: "fast zero on read-only", export: "ro", typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 4096, want: errnoInval},
		{name: "block status without context", export: "disk", typ: cmdBlockStatus, length: 4096, want: errnoInval},
		{name: "zero-length block status", export: "disk", typ: cmdBlockStatus, length: 0, want: errnoInval, needsMeta: true},
	}
	for _, structured := range []bool{false, true} {
		f := newFixture(t)
		for _, tc := range cases {
			if (tc.needsMeta && !structured) || (tc.simpleOnly && structured) {
				continue
			}
			t.Run(fmt.Sprintf("%s/structured=%v", tc.name, structured), func(t *testing.T) {
				c := f.dial(t)
				c.negotiate(tc.export, structured, tc.needsMeta)
				var payload []byte
				if tc.payload {
					payload = bytes.Repeat([]byte{0xee}, int(tc.length))
				}
				r := c.do(tc.typ, tc.flags, tc.off, tc.length, payload)
				if r.errno != tc.want {
					t.Errorf("errno %d, want %d", r.errno, tc.want)
				}
				if structured && r.msg == "" {
					t.Errorf("no error message")
				}
				// The stream is still in sync.
				if r := c.do(cmdRead, 0, 0, strictMin, nil); r.errno != 0 || len(r.data) != strictMin {
					t.Fatalf("read after bad request: %+v", r)
				}
			})
		}
		for _, b := range []*memBackend{f.disk, f.ro, f.strict} {
			if n := b.writes.Load(); n != 0 {
				t.Errorf("rejected requests reached the backend: %d writes", n)
			}
		}
	}
}

func TestFatalRequests(t *testing.T) {
	f := newFixture(t)
	for name, req := range map[string][]byte{
		"bad magic":      append([]byte{0xde, 0xad, 0xbe, 0xef}, encodeRequest(cmdRead, 0, 1, 0, 512)[4:]...),
		"absurd write":   encodeRequest(cmdWrite, 0, 1, 0, 1<<30),
		"absurd write 2": encodeRequest(cmdWrite, 0, 1, 0, DefaultMaxBlockSize+1),
		"http":           []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
	} {
		t.Run(name, func(t *testing.T) {
			c := f.dial(t)
			c.negotiate("disk", true, false)
			c.write(req)
			c.expectEOF()
		})
	}
	if n := f.disk.writes.Load(); n != 0 {
		t.Errorf("%d writes reached the backend", n)
	}
}

// TestHangupMidWrite checks that a client vanishing in the middle of a
// write payload leaves nothing written, no goroutines behind, and other
// connections working.
func TestHangupMidWrite(t *testing.T) {
	f := newFixture(t)
	other := f.dial(t)
	other.negotiate("disk", false, false)
	// A reply proves the server side of other is fully running.
	other.do(cmdRead, 0, 0, 4096, nil)
	before := countGoroutines()

	for _, structured := range []bool{false, true} {
		c := f.dial(t)
		c.negotiate("disk", structured, false)
		c.write(encodeRequest(cmdWrite, 0, 1, 0, 64<<10))
		c.write(bytes.Repeat([]byte{0x77}, 1000))
		c.nc.Close()
	}
	waitGoroutines(t, before)
	if n := f.disk.writes.Load(); n != 0 {
		t.Errorf("truncated write reached the backend (%d writes)", n)
	}
	if r := other.do(cmdRead, 0, 0, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, make([]byte, 4096)) {
		t.Errorf("other connection: %+v", r)
	}
}

// TestHangupCancelsInFlight checks that backend calls of a connection
// that went away see their context cancelled.
func TestHangupCancelsInFlight(t *testing.T) {
	entered := make(chan struct{}, 8)
	cancelled := make(chan struct{}, 8)
	f := newFixture(t, func(f *fixture) {
		f.disk.onRead = func(ctx context.Context, off int64) error {
			entered <- struct{}{}
			<-ctx.Done()
			cancelled <- struct{}{}
			return ctx.Err()
		}
	})
	before := countGoroutines()
	c := f.dial(t)
	c.negotiate("disk", true, false)
	for i := range 3 {
		c.send(cmdRead, 0, uint64(i), 0, 4096, nil)
		<-entered
	}
	c.nc.Close()
	for range 3 {
		select {
		case <-cancelled:
		case <-time.After(5 * time.Second):
			t.Fatal("backend call not cancelled after the client hung up")
		}
	}
	waitGoroutines(t, before)
}

// TestDiscCompletesInFlight checks that NBD_CMD_DISC lets requests in
// flight finish and answers them before closing.
func TestDiscCompletesInFlight(t *testing.T) {
	release := make(chan struct{})
	f := newFixture(t, func(f *fixture) {
		f.disk.onWrite = func(ctx context.Context, off int64) error {
			<-release
			return nil
		}
	})
	c := f.dial(t)
	c.negotiate("disk", false, false)
	c.send(cmdWrite, 0, 1, 0, 4, []byte("data"))
	c.send(cmdDisc, 0, 2, 0, 0, nil)
	time.Sleep(50 * time.Millisecond)
	close(release)
	if r := c.readReply(); r.cookie != 1 || r.errno != 0 {
		t.Fatalf("reply %+v", r)
	}
	c.expectEOF()
	if n := f.disk.writes.Load(); n != 1 {
		t.Errorf("%d writes", n)
	}
}

// TestShutdown checks that cancelling Serve's context ends connections
// with requests in flight, answering them with ESHUTDOWN.
func TestShutdown(t *testing.T) {
	entered := make(chan struct{})
	disk := newMemBackend(1 << 20)
	disk.onRead = func(ctx context.Context, off int64) error {
		close(entered)
		<-ctx.Done()
		return ctx.Err()
	}
	srv := &Server{Exports: exportMap{"disk": {Size: 1 << 20, Backend: disk}}, Logger: testLogger(t)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	before := countGoroutines()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, ln) }()

	c := dialRaw(t, "tcp", ln.Addr().String())
	c.negotiate("disk", true, false)
	c.send(cmdRead, 0, 1, 0, 4096, nil)
	<-entered
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancellation")
	}
	r, err := c.tryReadReply()
	if err == nil && (r.cookie != 1 || r.errno != errnoShutdown) {
		t.Errorf("reply %+v, want ESHUTDOWN", r)
	}
	c.expectEOF()
	waitGoroutines(t, before)
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Errorf("listener still open after Serve returned")
	}
}

func TestServeListenerFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	srv := &Server{Exports: exportMap{}, Logger: testLogger(t)}
	if err := srv.Serve(context.Background(), ln); err == nil {
		t.Fatal("Serve on a closed listener returned nil")
	}
}

func TestErrnoMapping(t *testing.T) {
	for _, tc := range []struct {
		err   error
		typ   uint16
		flags uint16
		want  uint32
	}{
		{fmt.Errorf("x: %w", ErrNotSupported), cmdWriteZeroes, cmdFlagFastZero, errnoNotSup},
		{fmt.Errorf("x: %w", ErrNotSupported), cmdWriteZeroes, 0, errnoInval},
		{syscall.EROFS, cmdWrite, 0, errnoPerm},
		{syscall.EFBIG, cmdWrite, 0, errnoNoSpc},
		{syscall.EOPNOTSUPP, cmdWriteZeroes, cmdFlagFastZero, errnoNotSup},
		{context.Canceled, cmdRead, 0, errnoShutdown},
		{context.DeadlineExceeded, cmdRead, 0, errnoIO},
		{errors.New("?"), cmdRead, 0, errnoIO},
	} {
		if got := errnoFor(tc.err, tc.typ, tc.flags); got != tc.want {
			t.Errorf("errnoFor(%v, %d, %#x) = %d, want %d", tc.err, tc.typ, tc.flags, got, tc.want)
		}
	}
}

func TestAppendMessage(t *testing.T) {
	long := strings.Repeat("é", maxErrorMessage) // 2 bytes per rune
	for in, want := range map[string]string{
		"plain":         "plain",
		"nul\x00inside": "nul?inside",
		"bad\xffutf8":   "bad?utf8",
		long:            long[:maxErrorMessage],
		"x" + long:      "x" + long[:maxErrorMessage-2],
	} {
		if got := string(appendMessage(nil, in)); got != want {
			t.Errorf("appendMessage(%.20q...) = %.20q... (len %d), want len %d", in, got, len(got), len(want))
		}
	}
}

func TestExportValidation(t *testing.T) {
	be := newMemBackend(1 << 20)
	for _, tc := range []struct {
		e  Export
		ok bool
	}{
		{Export{Size: 1 << 20, Backend: be}, true},
		{Export{Size: 1 << 20, MinBlockSize: 4096, Backend: be}, true},
		{Export{Size: 0, Backend: be}, true},
		{Export{Size: 1 << 20}, false},
		{Export{Size: -1, Backend: be}, false},
		{Export{Size: 1 << 20, MinBlockSize: 3, Backend: be}, false},
		{Export{Size: 1 << 20, MinBlockSize: 128 << 10, Backend: be}, false},
		{Export{Size: 1 << 20, PreferredBlockSize: 256, Backend: be}, false},
		{Export{Size: 1 << 20, MinBlockSize: 4096, PreferredBlockSize: 512, Backend: be}, false},
		{Export{Size: 1 << 20, MaxBlockSize: 64 << 20, Backend: be}, false},
		{Export{Size: 1 << 20, MinBlockSize: 4096, MaxBlockSize: 6000, Backend: be}, false},
		{Export{Size: 1 << 20, MaxBlockSize: 1024, Backend: be}, false},
		{Export{Size: 100, MaxBlockSize: 1024, Backend: be}, true},
	} {
		if _, err := tc.e.blockSizes(); (err == nil) != tc.ok {
			t.Errorf("%+v: err %v, want ok=%v", tc.e, err, tc.ok)
		}
	}
}

// invalidNames refuses every name it does not hold with ErrInvalid, as a source that parses its names does.
type invalidNames struct{ exportMap }

func (s invalidNames) Export(ctx context.Context, name string) (*Export, error) {
	if e, ok := s.exportMap[name]; ok {
		return e, nil
	}
	return nil, fmt.Errorf("export %q: want VOLUME?generation=N: %w", name, ErrInvalid)
}

// TestOptGoInvalidName: a name the source cannot accept is NBD_REP_ERR_INVALID with the source's reason, so the
// client learns what is wrong with it rather than that it does not exist.
func TestOptGoInvalidName(t *testing.T) {
	ts := startServer(t, &Server{Exports: invalidNames{exportMap{"disk": {Size: diskSize, Backend: newMemBackend(diskSize)}}}})
	c := dialRaw(t, "tcp", ts.tcp)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOpt(optGo, encodeInfoRequest("disk?generation=x"))
	r := c.expectOptReply(optGo, repErrInvalid)
	if !strings.Contains(string(r.data), "want VOLUME?generation=N") {
		t.Errorf("message %q does not say what is wrong with the name", r.data)
	}
	c.negotiate2("disk")
}
