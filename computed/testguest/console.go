package testguest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// Line is one line of serial output and the host time its end arrived.
type Line struct {
	Text string
	At   time.Time
}

type chunk struct {
	b  []byte
	at time.Time
}

// Console collects a guest's serial output as it arrives. Lines are kept in memory for the life of the
// Console: the agent prints a few KiB per second, and tests and benchmarks run for minutes.
type Console struct {
	mu      sync.Mutex
	chunks  []chunk
	lines   []Line
	partial []byte
	changed chan struct{} // closed and replaced whenever a line arrives or the stream ends
	err     error         // why reading stopped (io.EOF for a clean end)
	done    chan struct{}
}

// WatchConsole reads r (a machine's console stream) until it fails or ends.
func WatchConsole(r io.Reader) *Console {
	c := &Console{changed: make(chan struct{}), done: make(chan struct{})}
	go c.read(r)
	return c
}

func (c *Console) read(r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			now := time.Now()
			b := append([]byte(nil), buf[:n]...)
			c.mu.Lock()
			c.chunks = append(c.chunks, chunk{b, now})
			c.lines, c.partial = appendLines(c.lines, c.partial, b, now)
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
		}
		if err != nil {
			c.mu.Lock()
			c.err = err
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
			close(c.done)
			return
		}
	}
}

// appendLines splits b into lines after partial (the unterminated tail so far), stamping each with at.
func appendLines(lines []Line, partial, b []byte, at time.Time) ([]Line, []byte) {
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return lines, append(partial, b...)
		}
		text := strings.TrimRight(string(append(partial, b[:i]...)), "\r")
		lines = append(lines, Line{Text: text, At: at})
		partial = partial[:0]
		b = b[i+1:]
	}
}

// Done is closed when the stream has ended; Err says why.
func (c *Console) Done() <-chan struct{} { return c.done }

// Err is why reading stopped (io.EOF when the machine closed the stream), nil while it goes on.
func (c *Console) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Lines returns the complete lines so far.
func (c *Console) Lines() []Line {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Line(nil), c.lines...)
}

// Tail returns the last n lines as text, for test failure messages.
func (c *Console) Tail(n int) string {
	ls := c.Lines()
	ls = ls[max(0, len(ls)-n):]
	var sb strings.Builder
	for _, l := range ls {
		sb.WriteString(l.Text)
		sb.WriteByte('\n')
	}
	return sb.String()
}

// Wait returns the first line at index from or later that match accepts, waiting for it to arrive, and its
// index (pass index+1 as from to wait for a later one).
func (c *Console) Wait(ctx context.Context, from int, match func(Line) bool) (int, Line, error) {
	for {
		c.mu.Lock()
		for i := max(from, 0); i < len(c.lines); i++ {
			if match(c.lines[i]) {
				l := c.lines[i]
				c.mu.Unlock()
				return i, l, nil
			}
		}
		from = len(c.lines)
		changed, err := c.changed, c.err
		c.mu.Unlock()
		if err != nil {
			return -1, Line{}, fmt.Errorf("console ended (%v) before the line came", err)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return -1, Line{}, fmt.Errorf("waiting for a console line: %w", ctx.Err())
		}
	}
}

// WaitRecord waits for the agent's record seq or a later one and returns it.
func (c *Console) WaitRecord(ctx context.Context, seq uint64) (Rec, error) {
	var rec Rec
	_, _, err := c.Wait(ctx, 0, func(l Line) bool {
		r, err := record.ParseLine(l.Text)
		if err == nil && r.Seq >= seq {
			rec = Rec{Record: r, At: l.At}
			return true
		}
		return false
	})
	return rec, err
}

// LastRecord returns the newest record line so far.
func (c *Console) LastRecord() (Rec, bool) {
	ls := c.Lines()
	for i := len(ls) - 1; i >= 0; i-- {
		if r, err := record.ParseLine(ls[i].Text); err == nil {
			return Rec{Record: r, At: ls[i].At}, true
		}
	}
	return Rec{}, false
}

// Join returns the lines of several consoles read as one stream, in order: a line that one console's stream
// ended in the middle of (a migration's switchover can split a line between the source's console and the
// destination's) is completed by the start of the next.
func Join(cs ...*Console) []Line {
	var lines []Line
	var partial []byte
	for _, c := range cs {
		c.mu.Lock()
		chunks := append([]chunk(nil), c.chunks...)
		c.mu.Unlock()
		for _, ch := range chunks {
			lines, partial = appendLines(lines, partial, ch.b, ch.at)
		}
	}
	return lines
}

// Rec is a record the agent announced on the console, with the host time its line arrived.
type Rec struct {
	record.Record
	At time.Time
}

// Records parses the record lines among lines. A line that looks like a record but does not parse (garbled,
// or a CRC that does not match its fields) is an error.
func Records(lines []Line) ([]Rec, error) {
	var out []Rec
	for _, l := range lines {
		kind, _, ok := record.Fields(l.Text)
		if !ok || kind != "rec" {
			continue
		}
		r, err := record.ParseLine(l.Text)
		if err != nil {
			return out, err
		}
		out = append(out, Rec{Record: r, At: l.At})
	}
	return out, nil
}

// Continuity summarises a run of console records.
type Continuity struct {
	First, Last uint64
	Count       int
	// MaxHostGap is the longest time between two consecutive record lines arriving at the host, and
	// MaxHostGapAfter the sequence number before it: across a migration, the guest's downtime as seen from
	// outside (plus one interval).
	MaxHostGap      time.Duration
	MaxHostGapAfter uint64
	// MaxGuestGap is the longest difference between consecutive records' guest timestamps. A guest's clock
	// does not count time it spent stopped, so this stays near the interval across a migration.
	MaxGuestGap time.Duration
}

// CheckContinuity checks that recs count up by one without a gap or a repeat, and measures the gaps.
func CheckContinuity(recs []Rec) (Continuity, error) {
	if len(recs) == 0 {
		return Continuity{}, fmt.Errorf("no records")
	}
	c := Continuity{First: recs[0].Seq, Last: recs[0].Seq, Count: 1}
	for i := 1; i < len(recs); i++ {
		prev, cur := recs[i-1], recs[i]
		if cur.Seq != prev.Seq+1 {
			return c, fmt.Errorf("record %d follows record %d on the console", cur.Seq, prev.Seq)
		}
		if g := cur.At.Sub(prev.At); g > c.MaxHostGap {
			c.MaxHostGap, c.MaxHostGapAfter = g, prev.Seq
		}
		if g := cur.Time.Sub(prev.Time); g > c.MaxGuestGap {
			c.MaxGuestGap = g
		}
		c.Last = cur.Seq
		c.Count++
	}
	return c, nil
}

// Mem is a memory report of the agent, in bytes.
type Mem struct {
	Total, Available uint64
	At               time.Time
}

// ParseMem parses an agent "mem" line.
func ParseMem(l Line) (Mem, bool) {
	kind, f, ok := record.Fields(l.Text)
	if !ok || kind != "mem" {
		return Mem{}, false
	}
	t, err1 := strconv.ParseUint(f["total"], 10, 64)
	a, err2 := strconv.ParseUint(f["avail"], 10, 64)
	if err1 != nil || err2 != nil {
		return Mem{}, false
	}
	return Mem{Total: t << 10, Available: a << 10, At: l.At}, true // /proc/meminfo counts kB
}

// Devices is an agent "dev" report: block devices with their size in bytes, network interfaces with their MAC.
type Devices struct {
	Block map[string]uint64
	Net   map[string]string
}

// ParseDevices parses an agent "dev" line.
func ParseDevices(l Line) (Devices, bool) {
	kind, f, ok := record.Fields(l.Text)
	if !ok || kind != "dev" {
		return Devices{}, false
	}
	d := Devices{Block: map[string]uint64{}, Net: map[string]string{}}
	for _, b := range strings.Split(f["blk"], ",") {
		name, sectors, ok := strings.Cut(b, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseUint(sectors, 10, 64)
		d.Block[name] = n * 512 // /sys/block/*/size counts 512-byte sectors
	}
	for _, n := range strings.Split(f["net"], ",") {
		if name, mac, ok := strings.Cut(n, "/"); ok {
			d.Net[name] = mac
		}
	}
	return d, true
}
