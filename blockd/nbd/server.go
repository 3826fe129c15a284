package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// Defaults for the Server's tunables.
const (
	// DefaultWorkers is enough to keep a replicated backend busy at the
	// queue depths qemu and the Linux driver use (up to 128), without a
	// goroutine per request.
	DefaultWorkers = 32
	// DefaultHandshakeTimeout bounds option negotiation, which real
	// clients finish in milliseconds.
	DefaultHandshakeTimeout = 10 * time.Second
)

// shutdownWriteGrace is how long replies may still take to reach a client
// once the server is shutting down, so that a client that stopped reading
// cannot hold up shutdown.
const shutdownWriteGrace = 2 * time.Second

// readBufferSize is the size of a connection's read buffer. A few small
// requests (a 4 KiB write is 28+4096 bytes) fit, so that one read system
// call picks up several pipelined requests.
const readBufferSize = 64 << 10

// Server serves NBD clients. Set its fields before the first call to Serve
// or ServeConn and do not change them afterwards. A Server must not be
// copied after first use.
type Server struct {
	// Exports finds the exports clients ask for. Required.
	Exports ExportSource
	// Logger receives connection-level events; nothing is logged per
	// request. Nil means slog.Default().
	Logger *slog.Logger
	// Workers is the number of requests served concurrently per
	// connection; further requests wait, unread, in the socket. Zero
	// means DefaultWorkers.
	Workers int
	// HandshakeTimeout bounds the option negotiation of a connection.
	// Zero means DefaultHandshakeTimeout; negative means no limit.
	HandshakeTimeout time.Duration

	bufs bufPool
}

// Serve accepts connections on ln and serves each in its own goroutine. It
// returns when ctx is cancelled (returning nil) or when ln fails with an
// error that is not temporary. Before returning it closes ln, cancels the
// contexts of all in-flight requests, closes every connection and waits for
// their goroutines to finish.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.Exports == nil {
		ln.Close()
		return errors.New("nbd: Server.Exports is nil")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var (
		wg      sync.WaitGroup
		err     error
		backoff time.Duration
	)
	for {
		nc, aerr := ln.Accept()
		if aerr != nil {
			if ctx.Err() != nil {
				break
			}
			if temporaryAcceptError(aerr) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("nbd: accept failed, retrying", "addr", ln.Addr(), "err", aerr, "backoff", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
				}
				continue
			}
			err = fmt.Errorf("nbd: accepting connections on %s: %w", ln.Addr(), aerr)
			break
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.ServeConn(ctx, nc)
		}()
	}
	cancel()
	ln.Close()
	wg.Wait()
	return err
}

// temporaryAcceptError reports whether Accept failed for a reason that may
// go away (file descriptor exhaustion, a connection reset before it was
// accepted), in which case the listener is still usable.
func temporaryAcceptError(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.ECONNRESET} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// ServeConn serves one client connection and returns when the client
// disconnects, the connection fails, or ctx is cancelled. It always closes
// nc. On cancellation, requests in flight see their context cancelled and
// are answered with ESHUTDOWN if the client is still reading.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	defer nc.Close()
	start := time.Now()
	log := s.logger().With("remote", nc.RemoteAddr().String())
	if s.Exports == nil {
		log.Error("nbd: Server.Exports is nil")
		return
	}

	parent := ctx
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	c := &conn{
		srv:    s,
		nc:     nc,
		br:     bufio.NewReaderSize(nc, readBufferSize),
		log:    log,
		ctx:    ctx,
		cancel: cancel,
	}
	// Unblock whatever the connection is waiting for once it is cancelled,
	// whether by the server's ctx, a failed reply write, or the reader
	// giving up on the client.
	stop := context.AfterFunc(ctx, func() {
		nc.SetReadDeadline(time.Unix(1, 0))
		nc.SetWriteDeadline(time.Now().Add(shutdownWriteGrace))
	})
	defer stop()

	if d := s.handshakeTimeout(); d > 0 {
		nc.SetDeadline(time.Now().Add(d))
	}
	sess, err := c.handshake()
	if err != nil {
		switch {
		case errors.Is(err, errAbort):
			log.Debug("nbd: client aborted negotiation")
		case parent.Err() != nil:
			log.Debug("nbd: connection closed during negotiation by server shutdown")
		case isHangup(err):
			log.Debug("nbd: client hung up during negotiation", "err", err)
		default:
			log.Info("nbd: negotiation failed", "err", err)
		}
		return
	}
	// Clearing the deadline may undo the AfterFunc's if cancellation raced
	// with the end of the handshake; checking ctx after clearing catches
	// that.
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		return
	}

	log = log.With("export", sess.name)
	c.log = log
	if t, ok := sess.backend.(SessionTracker); ok {
		t.Begin()
		defer t.End()
	}
	log.Info("nbd: client connected", "size", sess.size, "structured", sess.structured, "block_status", sess.metaAllocation)
	n, err := c.transmit(sess)
	if cause := context.Cause(ctx); cause != nil {
		// The first failure is the interesting one: a failed reply write
		// makes the reader fail too, with a less telling error.
		err = cause
	}
	attrs := []any{"requests", n, "errors", c.errs.Load(), "duration", time.Since(start).Round(time.Millisecond)}
	switch {
	case errors.Is(err, errClientDisc):
		log.Info("nbd: client disconnected", attrs...)
	case parent.Err() != nil:
		log.Info("nbd: connection closed by server shutdown", attrs...)
	case isHangup(err):
		log.Info("nbd: client hung up", append(attrs, "err", err)...)
	default:
		log.Warn("nbd: connection dropped", append(attrs, "err", err)...)
	}
}

// isHangup reports whether err means the client went away, as opposed to
// a protocol violation or a local failure.
func isHangup(err error) bool {
	for _, e := range []error{io.EOF, io.ErrUnexpectedEOF, net.ErrClosed, io.ErrClosedPipe, syscall.ECONNRESET, syscall.EPIPE} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) workers() int {
	if s.Workers > 0 {
		return s.Workers
	}
	return DefaultWorkers
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout == 0 {
		return DefaultHandshakeTimeout
	}
	return s.HandshakeTimeout
}
