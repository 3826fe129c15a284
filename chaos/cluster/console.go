package cluster

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/chaos/check"
	"github.com/basalt-hv/basalt/computed/testguest"
	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// consolePoll is how often the console logs are read: the resolution of the "guest beating" time in a
// timeline.
const consolePoll = 50 * time.Millisecond

// Consoles follows the console log every computed keeps for each VM (<run-dir>/<vm>/console.log, rotated to
// console.log.1) on every host, straight from the files: the hosts share this machine's file system, so the
// harness sees what a host's console captured even while that host is frozen, cut off or dead, and it does
// not depend on metad's console relay, which is itself under test. Each line is stamped with the time it was
// first read. Only the agent's lines are kept ("BASALT ..."), in memory, for the life of the cluster.
type Consoles struct {
	roots map[string]string // computed node ID → its run directory

	mu    sync.Mutex
	tails map[string]*tail             // host + "/" + vm
	lines map[string][]ConsoleLine     // vm → agent lines in the order read
	recs  map[string][]check.Announced // vm → parsed records in the order read
	bad   map[string]int               // vm → lines that looked like records but did not parse (torn by a kill)

	stop chan struct{}
	done chan struct{}
}

// ConsoleLine is one line of the agent's output on a host.
type ConsoleLine struct {
	testguest.Line
	Host string
}

func newConsoles(roots map[string]string) *Consoles {
	c := &Consoles{roots: roots, tails: map[string]*tail{}, lines: map[string][]ConsoleLine{},
		recs: map[string][]check.Announced{}, bad: map[string]int{}, stop: make(chan struct{}), done: make(chan struct{})}
	go c.loop()
	return c
}

func (c *Consoles) loop() {
	defer close(c.done)
	t := time.NewTicker(consolePoll)
	defer t.Stop()
	for {
		c.poll(time.Now())
		select {
		case <-c.stop:
			c.poll(time.Now())
			c.mu.Lock()
			for _, t := range c.tails {
				t.close()
			}
			c.mu.Unlock()
			return
		case <-t.C:
		}
	}
}

// close stops following the logs after a last read.
func (c *Consoles) close() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

func (c *Consoles) poll(now time.Time) {
	for host, root := range c.roots {
		ents, err := os.ReadDir(root)
		if err != nil {
			continue // not created yet
		}
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			vm := e.Name()
			key := host + "/" + vm
			c.mu.Lock()
			t := c.tails[key]
			if t == nil {
				t = &tail{path: filepath.Join(root, vm, "console.log")}
				c.tails[key] = t
			}
			c.mu.Unlock()
			lines := t.read()
			if len(lines) == 0 {
				continue
			}
			c.mu.Lock()
			for _, text := range lines {
				// A line a killed hypervisor left unterminated is continued by whatever the host prints next for
				// the VM (its next boot): only the last agent line in it is whole.
				segs := strings.Split(text, record.LinePrefix)
				if len(segs) < 2 {
					continue
				}
				for _, torn := range segs[1 : len(segs)-1] {
					if strings.HasPrefix(torn, "rec ") {
						c.bad[vm]++
					}
				}
				l := ConsoleLine{Line: testguest.Line{Text: record.LinePrefix + segs[len(segs)-1], At: now}, Host: host}
				c.lines[vm] = append(c.lines[vm], l)
				kind, _, ok := record.Fields(l.Text)
				if !ok || kind != "rec" {
					continue
				}
				r, err := record.ParseLine(l.Text)
				if err != nil {
					// Garbled otherwise: the console is not the data path, the disk check covers the record.
					c.bad[vm]++
					continue
				}
				c.recs[vm] = append(c.recs[vm], check.Announced{Rec: testguest.Rec{Record: r, At: now}, Host: host})
			}
			c.mu.Unlock()
		}
	}
}

// Records returns every record VM vm announced, on every host, in the order read.
func (c *Consoles) Records(vm string) []check.Announced {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]check.Announced(nil), c.recs[vm]...)
}

// Lines returns the agent's lines of VM vm, on every host, in the order read.
func (c *Consoles) Lines(vm string) []ConsoleLine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]ConsoleLine(nil), c.lines[vm]...)
}

// Garbled counts the record lines of vm that did not parse.
func (c *Consoles) Garbled(vm string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bad[vm]
}

// VMs lists the VMs seen on any console.
func (c *Consoles) VMs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for vm := range c.lines {
		out = append(out, vm)
	}
	sort.Strings(out)
	return out
}

// Last returns the newest record of vm read so far.
func (c *Consoles) Last(vm string) (check.Announced, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rs := c.recs[vm]
	if len(rs) == 0 {
		return check.Announced{}, false
	}
	return rs[len(rs)-1], true
}

// WaitRecord waits until vm announces a record that match accepts, and returns it.
func (c *Consoles) WaitRecord(ctx context.Context, vm string, match func(check.Announced) bool) (check.Announced, error) {
	from := 0
	for {
		c.mu.Lock()
		rs := c.recs[vm]
		for ; from < len(rs); from++ {
			if match(rs[from]) {
				r := rs[from]
				c.mu.Unlock()
				return r, nil
			}
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return check.Announced{}, ctx.Err()
		case <-time.After(consolePoll):
		}
	}
}

// tail follows one console log across rotations (a rename to console.log.1 and a new file) and restarts (the
// file is appended to).
type tail struct {
	path    string
	f       *os.File
	ino     uint64
	partial []byte
}

func (t *tail) close() {
	if t.f != nil {
		t.f.Close()
		t.f = nil
	}
}

// read returns the complete lines written since the last call.
func (t *tail) read() []string {
	var lines []string
	for range 3 { // at most: the rest of a rotated file, then the new one
		if t.f == nil {
			f, err := os.Open(t.path)
			if err != nil {
				return lines
			}
			t.f, t.ino = f, inodeOf(f)
		}
		lines = append(lines, t.drain()...)
		st, err := os.Stat(t.path)
		if err != nil || st.Sys().(*syscall.Stat_t).Ino == t.ino {
			return lines
		}
		// Rotated: what was written to the old file before the rename has been read above.
		t.close()
	}
	return lines
}

// drain reads the open file to its end and splits off complete lines.
func (t *tail) drain() []string {
	b, err := io.ReadAll(t.f)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil
	}
	if len(b) == 0 {
		return nil
	}
	data := append(t.partial, b...)
	var lines []string
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		lines = append(lines, strings.TrimRight(string(data[:i]), "\r"))
		data = data[i+1:]
	}
	t.partial = append([]byte(nil), data...)
	return lines
}

func inodeOf(f *os.File) uint64 {
	st, err := f.Stat()
	if err != nil {
		return 0
	}
	return st.Sys().(*syscall.Stat_t).Ino
}
