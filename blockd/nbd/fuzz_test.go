package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"testing"
	"time"
)

// fuzzSessions are the negotiated states requests are checked against.
var fuzzSessions = []session{
	{size: 1 << 20, bs: blockSizes{1, 4096, 32 << 20}},
	{size: 1 << 20, bs: blockSizes{512, 4096, 64 << 10}, structured: true, metaAllocation: true},
	{size: 1<<20 + 100, bs: blockSizes{4096, 4096, 1 << 20}, readOnly: true, structured: true},
	{size: 0, bs: blockSizes{1, 4096, 32 << 20}},
}

func FuzzRequestDecode(f *testing.F) {
	for _, typ := range []uint16{cmdRead, cmdWrite, cmdDisc, cmdFlush, cmdTrim, cmdCache, cmdWriteZeroes, cmdBlockStatus, 8, 0xffff} {
		f.Add(encodeRequest(typ, 0, 1, 0, 4096))
		f.Add(encodeRequest(typ, cmdFlagFUA|cmdFlagNoHole|cmdFlagFastZero, 2, 1<<20-512, 512))
		f.Add(encodeRequest(typ, cmdFlagDF|cmdFlagReqOne, ^uint64(0), ^uint64(0), ^uint32(0)))
	}
	f.Add([]byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		var r request
		err := decodeRequest(b, &r)
		if len(b) < requestHeaderLen || binary.BigEndian.Uint32(b) != magicRequest {
			if err == nil {
				t.Fatalf("decoded a request from %x", b)
			}
			return
		}
		if err != nil {
			t.Fatalf("decodeRequest: %v", err)
		}
		if enc := encodeRequest(r.typ, r.flags, r.cookie, r.off, r.length); !bytes.Equal(enc, b[:requestHeaderLen]) {
			t.Fatalf("round trip: %x became %x", b[:requestHeaderLen], enc)
		}
		for _, s := range fuzzSessions {
			errno, msg := s.check(&r)
			if errno != 0 {
				if msg == "" {
					t.Errorf("errno %d without a message", errno)
				}
				continue
			}
			// Whatever passes the check must be safe to hand to a
			// backend.
			if r.typ > cmdBlockStatus || r.typ == cmdDisc {
				t.Fatalf("command %d accepted", r.typ)
			}
			if r.typ == cmdFlush {
				continue
			}
			end := r.off + uint64(r.length)
			if end < r.off || end > uint64(s.size) || r.off > 1<<63-1 {
				t.Fatalf("range %d+%d accepted for size %d", r.off, r.length, s.size)
			}
			if r.off%uint64(s.bs.min) != 0 || (end%uint64(s.bs.min) != 0 && end != uint64(s.size)) {
				t.Fatalf("misaligned range %d+%d accepted for minimum %d", r.off, r.length, s.bs.min)
			}
			if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > s.bs.max {
				t.Fatalf("length %d accepted over maximum %d", r.length, s.bs.max)
			}
			if s.readOnly && (r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes) {
				t.Fatalf("write command %d accepted on a read-only export", r.typ)
			}
			if r.typ == cmdBlockStatus && (!s.metaAllocation || r.length == 0) {
				t.Fatalf("block status accepted without a context")
			}
			if r.flags&cmdFlagDF != 0 && !s.structured {
				t.Fatalf("DF accepted without structured replies")
			}
		}
	})
}

// handshakeSeed builds client-to-server bytes: client flags, then options.
func handshakeSeed(cflags uint32, opts ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, cflags)
	for _, o := range opts {
		b = append(b, o...)
	}
	return b
}

func FuzzHandshake(f *testing.F) {
	const fixed = clientFlagFixedNewstyle | clientFlagNoZeroes
	goDisk := encodeOpt(optGo, encodeInfoRequest("disk", infoBlockSize, infoName, infoDescription))
	reqs := append(encodeRequest(cmdWrite, cmdFlagFUA, 1, 0, 8), "abcdefgh"...)
	reqs = append(reqs, encodeRequest(cmdRead, 0, 2, 0, 8)...)
	reqs = append(reqs, encodeRequest(cmdBlockStatus, cmdFlagReqOne, 3, 0, 4096)...)
	reqs = append(reqs, encodeRequest(cmdWriteZeroes, cmdFlagFastZero, 4, 0, 4096)...)
	reqs = append(reqs, encodeRequest(cmdDisc, 0, 5, 0, 0)...)

	f.Add(handshakeSeed(fixed, goDisk))
	f.Add(handshakeSeed(fixed, goDisk, reqs))
	f.Add(handshakeSeed(fixed, encodeOpt(optStructuredReply, nil), encodeOpt(optSetMetaContext, encodeMetaRequest("disk", "base:allocation")), goDisk, reqs))
	f.Add(handshakeSeed(fixed, encodeOpt(optList, nil), encodeOpt(optInfo, encodeInfoRequest("disk")), encodeOpt(optAbort, nil)))
	f.Add(handshakeSeed(fixed, encodeOpt(optListMetaContext, encodeMetaRequest("disk")), encodeOpt(optStartTLS, nil), encodeOpt(999, []byte("xyz"))))
	f.Add(handshakeSeed(0, encodeOpt(optExportName, []byte("disk")), reqs))
	f.Add(handshakeSeed(fixed, encodeOpt(optGo, encodeInfoRequest("nope")), encodeOpt(optExportName, []byte("ro")), reqs))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))

	exports := func() exportMap {
		return exportMap{
			"disk": {Size: 1 << 20, Backend: newMemBackend(1 << 20)},
			"ro":   {Size: 64 << 10, MinBlockSize: 512, MaxBlockSize: 64 << 10, ReadOnly: true, Backend: newMemBackend(64 << 10)},
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		srv := &Server{
			Exports:          exports(),
			Logger:           slog.New(slog.DiscardHandler),
			Workers:          2,
			HandshakeTimeout: 2 * time.Second,
		}
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ServeConn(context.Background(), server)
		}()
		drained := make(chan struct{})
		go func() {
			defer close(drained)
			discard(client)
		}()
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		client.Write(data) // fails early if the server hangs up, which is fine
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("ServeConn did not return after the client closed")
		}
		<-drained
	})
}
