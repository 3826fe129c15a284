// Package qmp is a small client for the QEMU Machine Protocol (QMP) over a Unix socket: it reads the greeting,
// negotiates capabilities, runs commands with request ids for any number of concurrent callers, and delivers
// asynchronous events to subscribers. It is our own because no maintained Go QMP library that fits is available
// through the module proxy (the best known one, digitalocean/go-qemu's qmp package, comes with its own monitor
// abstraction and libvirt transports we do not want); the protocol is small enough that a few hundred lines
// cover what the qemu driver needs. It depends on the standard library and golang.org/x/sys/unix only.
//
// The protocol: QEMU sends a greeting, the client sends qmp_capabilities, and from then on every line the
// client sends is {"execute": ..., "arguments": ..., "id": ...}; QEMU answers each with {"return": ..., "id": ...}
// or {"error": {"class": ..., "desc": ...}, "id": ...} in order, interleaved with {"event": ..., "data": ...,
// "timestamp": ...} lines at any time.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned for calls on a client whose connection has ended; errors.Is finds it in the error that
// Err and failed calls return, wrapped with the cause.
var ErrClosed = errors.New("qmp connection closed")

// ErrEventsDropped is returned once by Subscription.Next when the subscriber fell so far behind that events were
// discarded; the subscriber should re-read whatever state it tracks through events.
var ErrEventsDropped = errors.New("qmp events dropped: subscriber too slow")

// maxQueuedEvents bounds each subscription's queue, so a subscriber that stops reading cannot grow memory
// without bound (QEMU can emit events quickly, e.g. BLOCK_JOB or balloon changes).
const maxQueuedEvents = 4096

// Error is an error QEMU answered a command with.
type Error struct {
	// Command is the command that failed.
	Command string
	// Class is QMP's error class, e.g. "GenericError", "DeviceNotFound", "CommandNotFound".
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	// Package is the distribution's package version string, e.g. "Debian 1:7.2+dfsg-7+deb12u18".
	Package string
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// Event is an asynchronous QMP event.
type Event struct {
	Name string
	Data json.RawMessage
	// Time is when QEMU emitted the event (QEMU's clock, microsecond resolution).
	Time time.Time
}

// Client is a QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn net.Conn
	// Version is the QEMU version from the greeting; Capabilities what the greeting offered.
	version      Version
	capabilities []string

	wmu sync.Mutex // serialises writes; a partial write would corrupt the stream

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan response
	subs    map[*Subscription]struct{}
	err     error // why the connection ended; set once, before done is closed

	done chan struct{}
}

type response struct {
	ret json.RawMessage
	err *Error
}

// message is any line QEMU sends.
type message struct {
	QMP       *json.RawMessage `json:"QMP"`
	Return    json.RawMessage  `json:"return"`
	Error     *struct{ Class, Desc string }
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	ID json.RawMessage `json:"id"`
}

// Dial connects to the QMP socket at path, reads the greeting and negotiates capabilities.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect to %s: %w", path, err)
	}
	c, err := New(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s: %w", path, err)
	}
	return c, nil
}

// New runs the QMP handshake on conn and returns a client that owns it. On error the caller still owns conn.
func New(ctx context.Context, conn net.Conn) (*Client, error) {
	// The handshake is synchronous: a deadline from ctx bounds it, and cancelling ctx interrupts the reads.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	r := bufio.NewReader(conn)
	dec := json.NewDecoder(r)
	var greeting struct {
		QMP *struct {
			Version struct {
				QEMU struct {
					Major int `json:"major"`
					Minor int `json:"minor"`
					Micro int `json:"micro"`
				} `json:"qemu"`
				Package string `json:"package"`
			} `json:"version"`
			Capabilities []string `json:"capabilities"`
		} `json:"QMP"`
	}
	if err := dec.Decode(&greeting); err != nil {
		return nil, fmt.Errorf("read greeting: %w", ctxErr(ctx, err))
	}
	if greeting.QMP == nil {
		return nil, errors.New("read greeting: peer did not send a QMP greeting")
	}
	c := &Client{
		conn: conn,
		version: Version{
			Major: greeting.QMP.Version.QEMU.Major, Minor: greeting.QMP.Version.QEMU.Minor,
			Micro: greeting.QMP.Version.QEMU.Micro, Package: greeting.QMP.Version.Package,
		},
		capabilities: greeting.QMP.Capabilities,
		pending:      map[uint64]chan response{},
		subs:         map[*Subscription]struct{}{},
		done:         make(chan struct{}),
	}
	// We ask for no optional capabilities (such as out-of-band execution): commands run in order, which is all
	// the driver needs.
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities","id":0}` + "\n")); err != nil {
		return nil, fmt.Errorf("send qmp_capabilities: %w", ctxErr(ctx, err))
	}
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			return nil, fmt.Errorf("read qmp_capabilities reply: %w", ctxErr(ctx, err))
		}
		if m.Event != "" {
			continue // QEMU sends none before negotiation ends, but an event here would be harmless
		}
		if m.Error != nil {
			return nil, &Error{Command: "qmp_capabilities", Class: m.Error.Class, Desc: m.Error.Desc}
		}
		if m.Return == nil {
			return nil, fmt.Errorf("read qmp_capabilities reply: unexpected message without return")
		}
		break
	}
	conn.SetDeadline(time.Time{})
	c.nextID = 1
	go c.read(dec)
	return c, nil
}

// ctxErr attributes an I/O error to ctx when ctx is why it happened: cancelled, or past its deadline (the
// connection's deadline, set from ctx's, can fire a moment before ctx notices).
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	if dl, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(dl) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

// Version is the QEMU version the greeting announced.
func (c *Client) Version() Version { return c.version }

// Capabilities are the optional capabilities the greeting offered (none are enabled).
func (c *Client) Capabilities() []string { return append([]string(nil), c.capabilities...) }

// PeerPID is the process id of the QMP server, from the socket's peer credentials. It lets a caller that
// found QEMU through a pid file check that the socket really belongs to that process.
func (c *Client) PeerPID() (int, error) {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return 0, errors.New("qmp: peer credentials need a Unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("qmp: peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("qmp: peer credentials: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("qmp: peer credentials: %w", serr)
	}
	return int(cred.Pid), nil
}

// read is the connection's only reader: it routes replies to their callers and events to subscribers until
// the connection fails.
func (c *Client) read(dec *json.Decoder) {
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.EOF // QEMU exited or closed the monitor
			}
			c.fail(err)
			return
		}
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				ev.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			c.publish(ev)
		case m.ID != nil:
			id, err := strconv.ParseUint(string(m.ID), 10, 64)
			if err != nil {
				continue // not an id we sent: nobody waits for it
			}
			var resp response
			switch {
			case m.Error != nil:
				resp.err = &Error{Class: m.Error.Class, Desc: m.Error.Desc}
			case m.Return != nil:
				resp.ret = m.Return
			default:
				c.fail(fmt.Errorf("reply %d has neither return nor error", id))
				return
			}
			c.mu.Lock()
			ch := c.pending[id]
			delete(c.pending, id)
			c.mu.Unlock()
			if ch != nil {
				ch <- resp // buffered; the caller may have gone (cancelled), which is fine
			}
		default:
			// A reply without id answers a request we did not send, and a second greeting is meaningless: ignore
			// both rather than tear down a working connection.
		}
	}
}

func (c *Client) publish(ev Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.subs {
		s.push(ev)
	}
}

// fail ends the connection with err; the first cause wins.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	pending := c.pending
	c.pending = nil
	subs := c.subs
	c.subs = nil
	c.mu.Unlock()
	c.conn.Close()
	for _, ch := range pending {
		close(ch)
	}
	for s := range subs {
		s.end()
	}
	close(c.done)
}

// Done is closed when the connection has ended; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended, or nil while it is open.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection. Commands in flight return an error wrapping ErrClosed.
func (c *Client) Close() error {
	c.fail(errors.New("closed by client"))
	return nil
}

// Execute runs cmd with args (nil for none; anything encoding/json marshals to an object) and decodes QEMU's
// return value into result (nil to discard it). A QEMU error is returned as *Error. If ctx ends first Execute
// returns ctx's error, but the command may still run: QMP has no way to withdraw a command once sent.
func (c *Client) Execute(ctx context.Context, cmd string, args any, result any) error {
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{Execute: cmd, Arguments: args}
	// A typed nil (a nil map in an interface) would marshal as "arguments": null, which QEMU rejects.
	if v := reflect.ValueOf(args); args != nil && (v.Kind() == reflect.Map || v.Kind() == reflect.Pointer) && v.IsNil() {
		req.Arguments = nil
	}

	ch := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	req.ID = c.nextID
	c.nextID++
	c.pending[req.ID] = ch
	c.mu.Unlock()

	line, err := json.Marshal(req)
	if err != nil {
		c.forget(req.ID)
		return fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
	}
	if err := c.write(ctx, append(line, '\n')); err != nil {
		c.forget(req.ID)
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp %s: %w", cmd, c.Err())
		}
		if resp.err != nil {
			resp.err.Command = cmd
			return resp.err
		}
		if result != nil {
			if err := json.Unmarshal(resp.ret, result); err != nil {
				return fmt.Errorf("qmp %s: decode return value: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		c.forget(req.ID)
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// write sends one request line. A write that ctx interrupts half way would leave a torn line in QEMU's parser,
// so any write error ends the connection.
func (c *Client) write(ctx context.Context, line []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(dl)
	} else {
		c.conn.SetWriteDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Unix(1, 0)) })
	_, err := c.conn.Write(line)
	stop()
	if err != nil {
		err = ctxErr(ctx, err)
		c.fail(fmt.Errorf("write: %w", err))
		return err
	}
	return nil
}

// Subscribe starts queueing the events named in names (all events if none) for the returned subscription,
// from now on. Subscribe before issuing the command whose event you wait for, so it cannot be missed.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, notify: make(chan struct{}, 1)}
	if len(names) > 0 {
		s.names = map[string]bool{}
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	if c.subs == nil {
		s.ended = true
	} else {
		c.subs[s] = struct{}{}
	}
	c.mu.Unlock()
	return s
}

// Subscription is a queue of events. Its methods are safe for concurrent use.
type Subscription struct {
	c      *Client
	names  map[string]bool
	notify chan struct{}

	mu      sync.Mutex
	queue   []Event
	dropped bool
	ended   bool
}

func (s *Subscription) push(ev Event) {
	if s.names != nil && !s.names[ev.Name] {
		return
	}
	s.mu.Lock()
	if len(s.queue) >= maxQueuedEvents {
		s.queue = s.queue[1:]
		s.dropped = true
	}
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *Subscription) end() {
	s.mu.Lock()
	s.ended = true
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Next returns the oldest queued event, waiting for one if none is queued. It returns ErrEventsDropped once
// after events were discarded, and an error wrapping ErrClosed once the queue is empty and the connection or
// the subscription has ended.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if s.dropped {
			s.dropped = false
			s.mu.Unlock()
			return Event{}, ErrEventsDropped
		}
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return ev, nil
		}
		ended := s.ended
		s.mu.Unlock()
		if ended {
			if err := s.c.Err(); err != nil {
				return Event{}, err
			}
			return Event{}, fmt.Errorf("%w: subscription closed", ErrClosed)
		}
		select {
		case <-s.notify:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Close stops the subscription; queued events are discarded.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	if s.c.subs != nil {
		delete(s.c.subs, s)
	}
	s.c.mu.Unlock()
	s.mu.Lock()
	s.queue = nil
	s.mu.Unlock()
	s.end()
}
