package testguest

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// cpioWriter writes the "newc" cpio format, the one the kernel unpacks an initramfs from. Every entry gets
// mtime 0 and uid/gid 0 so that the same inputs give the same archive, byte for byte.
type cpioWriter struct {
	w   *bufio.Writer
	ino uint32
	err error
}

func newCPIO(w io.Writer) *cpioWriter { return &cpioWriter{w: bufio.NewWriter(w), ino: 1} }

const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioChar    = 0o020000
)

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(name, "/")
	nlink := uint32(1)
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.ino++
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad(len(hdr) + len(name) + 1)
	c.write(data)
	c.pad(len(data))
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}

// pad aligns to 4 bytes after n bytes, as newc requires after the header+name and after the data.
func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) Dir(name string)                         { c.entry(name, cpioDir|0o755, nil, 0, 0) }
func (c *cpioWriter) File(name string, perm uint32, b []byte) { c.entry(name, cpioFile|perm, b, 0, 0) }
func (c *cpioWriter) Symlink(name, target string) {
	c.entry(name, cpioSymlink|0o777, []byte(target), 0, 0)
}
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, cpioChar|perm, nil, major, minor)
}

// Close writes the trailer and flushes.
func (c *cpioWriter) Close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}

// cpioEntry is one parsed entry, for tests and for checking what a build produced.
type cpioEntry struct {
	Name         string
	Mode         uint32
	Data         []byte
	Major, Minor uint32
}

// readCPIO parses a newc archive up to its trailer.
func readCPIO(r io.Reader) ([]cpioEntry, error) {
	br := bufio.NewReader(r)
	var out []cpioEntry
	read := func(n int) ([]byte, error) {
		b := make([]byte, n)
		_, err := io.ReadFull(br, b)
		return b, err
	}
	skipPad := func(n int) error {
		if r := n % 4; r != 0 {
			_, err := read(4 - r)
			return err
		}
		return nil
	}
	for {
		hdr, err := read(110)
		if err != nil {
			return nil, fmt.Errorf("cpio header: %w", err)
		}
		if string(hdr[:6]) != "070701" {
			return nil, fmt.Errorf("cpio: bad magic %q", hdr[:6])
		}
		field := func(i int) (uint32, error) {
			var v uint32
			_, err := fmt.Sscanf(string(hdr[6+8*i:6+8*i+8]), "%08x", &v)
			return v, err
		}
		var f [13]uint32
		for i := range f {
			if f[i], err = field(i); err != nil {
				return nil, fmt.Errorf("cpio header field %d: %w", i, err)
			}
		}
		name, err := read(int(f[11]))
		if err != nil {
			return nil, err
		}
		if err := skipPad(110 + int(f[11])); err != nil {
			return nil, err
		}
		data, err := read(int(f[6]))
		if err != nil {
			return nil, err
		}
		if err := skipPad(int(f[6])); err != nil {
			return nil, err
		}
		e := cpioEntry{Name: strings.TrimSuffix(string(name), "\x00"), Mode: f[1], Data: data, Major: f[9], Minor: f[10]}
		if e.Name == "TRAILER!!!" {
			return out, nil
		}
		out = append(out, e)
	}
}
