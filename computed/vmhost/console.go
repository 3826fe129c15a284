package vmhost

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
)

// consoleRing is how much output since the machine started on this host a console keeps in memory, for a
// viewer that follows the VM here after a migration (ConsoleInput.since_start).
const consoleRing = 1 << 20

// viewerQueue is how many chunks a viewer may lag behind before it is dropped: a slow viewer must never hold
// up the guest's serial port.
const viewerQueue = 1024

// console multiplexes a machine's one serial console stream to any number of viewers and to the console log.
// The hypervisor serves a single client on its console socket, so computed is that client for as long as the
// machine runs here.
type console struct {
	conn io.ReadWriteCloser
	log  *slog.Logger
	// id names this console among the machine's consoles on any host, for viewers that resume.
	id string

	wmu sync.Mutex // orders keystrokes from several viewers

	mu      sync.Mutex
	file    *rotatingLog
	ring    []byte // the output at offsets [total-len(ring), total)
	total   uint64
	viewers map[*viewer]struct{}
	closed  bool
	done    chan struct{}
}

// chunk is output at an offset of the console.
type chunk struct {
	b   []byte
	off uint64
}

// viewer is one attached stream.
type viewer struct {
	ch chan chunk
	// slow is set when the viewer was dropped for lagging; ch is closed either way when it ends.
	slow bool
}

// newConsole starts multiplexing conn, appending everything to file.
func newConsole(conn io.ReadWriteCloser, file *rotatingLog, log *slog.Logger) *console {
	var id [8]byte
	rand.Read(id[:])
	c := &console{conn: conn, file: file, log: log, id: hex.EncodeToString(id[:]), viewers: map[*viewer]struct{}{}, done: make(chan struct{})}
	go c.pump()
	return c
}

func (c *console) pump() {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.conn.Read(buf)
		if n > 0 {
			b := append([]byte(nil), buf[:n]...)
			c.mu.Lock()
			if werr := c.file.Write(b); werr != nil {
				c.log.Warn("write console log", "err", werr)
			}
			ch := chunk{b: b, off: c.total}
			c.total += uint64(n)
			c.ring = append(c.ring, b...)
			if over := len(c.ring) - consoleRing; over > 0 {
				c.ring = append(c.ring[:0], c.ring[over:]...)
			}
			for v := range c.viewers {
				select {
				case v.ch <- ch:
				default:
					v.slow = true
					close(v.ch)
					delete(c.viewers, v)
				}
			}
			c.mu.Unlock()
		}
		if err != nil {
			c.mu.Lock()
			c.closed = true
			for v := range c.viewers {
				close(v.ch)
				delete(c.viewers, v)
			}
			c.file.Close()
			c.mu.Unlock()
			close(c.done)
			return
		}
	}
}

// errConsoleClosed means the machine's console ended (the machine stopped or left this host).
var errConsoleClosed = errors.New("the console has ended: the machine stopped or left this host")

// resumePoint says where a viewer's live output starts: now (the zero value), at the start of what the
// console keeps (sinceStart), or at an offset of a console it was reading before (id, off).
type resumePoint struct {
	sinceStart bool
	id         string
	off        uint64
}

// subscribe attaches a viewer. It returns, read at the same instant so that nothing is missed or repeated,
// the last tail bytes of the console log (plain history) and the live output from the resume point on.
func (c *console) subscribe(tail int64, from resumePoint) (*viewer, []byte, chunk, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var history []byte
	if tail > 0 {
		b, err := c.file.Tail(tail)
		if err != nil {
			return nil, nil, chunk{}, err
		}
		history = b
	}
	first := uint64(len(c.ring))
	start := c.total - first // offset of the ring's first byte
	replay := chunk{off: c.total}
	switch {
	case from.id == c.id:
		off := min(max(from.off, start), c.total)
		replay = chunk{b: append([]byte(nil), c.ring[off-start:]...), off: off}
	case from.sinceStart || from.id != "":
		replay = chunk{b: append([]byte(nil), c.ring...), off: start}
	}
	if c.closed {
		return nil, history, replay, errConsoleClosed
	}
	v := &viewer{ch: make(chan chunk, viewerQueue)}
	c.viewers[v] = struct{}{}
	return v, history, replay, nil
}

// unsubscribe detaches a viewer that is still attached.
func (c *console) unsubscribe(v *viewer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.viewers[v]; ok {
		delete(c.viewers, v)
		close(v.ch)
	}
}

// Write sends keystrokes to the guest.
func (c *console) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.conn.Write(b)
}

// Close ends the console (viewers see their stream end) and waits until the log is closed.
func (c *console) Close() {
	c.conn.Close()
	<-c.done
}

// rotatingLog is a file that never grows past max bytes: when it would, it becomes path.1 (replacing the
// previous one) and a new file starts. So a console log holds between max and 2*max bytes of the latest output.
type rotatingLog struct {
	path string
	max  int64
	f    *os.File
	size int64
}

func openRotatingLog(path string, max int64) (*rotatingLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open console log: %w", err)
	}
	return &rotatingLog{path: path, max: max, f: f, size: info.Size()}, nil
}

func (l *rotatingLog) Write(b []byte) error {
	if l.f == nil {
		return errors.New("console log is closed")
	}
	if l.size > 0 && l.size+int64(len(b)) > l.max {
		l.f.Close()
		l.f = nil
		if err := os.Rename(l.path, l.path+".1"); err != nil {
			return fmt.Errorf("rotate console log: %w", err)
		}
		f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("rotate console log: %w", err)
		}
		l.f, l.size = f, 0
	}
	n, err := l.f.Write(b)
	l.size += int64(n)
	return err
}

// Tail returns the last n bytes of the log, across the rotation.
func (l *rotatingLog) Tail(n int64) ([]byte, error) { return tailLog(l.path, n) }

func (l *rotatingLog) Close() {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// tailLog reads the last n bytes of a console log at path and its rotated predecessor path.1. A log that does
// not exist reads as empty.
func tailLog(path string, n int64) ([]byte, error) {
	var out []byte
	for _, p := range []string{path, path + ".1"} {
		if int64(len(out)) >= n {
			break
		}
		b, err := readTail(p, n-int64(len(out)))
		if err != nil {
			return nil, err
		}
		out = append(b, out...)
	}
	return out, nil
}

func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read console log: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read console log: %w", err)
	}
	off := max(info.Size()-n, 0)
	b := make([]byte, info.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read console log: %w", err)
	}
	return b, nil
}
