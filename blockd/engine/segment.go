package engine

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// segment is one file of the log.
type segment struct {
	id       uint32
	path     string
	f        *os.File
	fd       int
	firstSeq uint64

	// refs counts the engine's own reference (dropped when the garbage
	// collector removes the segment) plus one per reader, GC pass or sync
	// that is using the file descriptor. The file is closed at zero.
	refs atomic.Int64
	// size is the number of bytes of valid records (the file size of a
	// sealed segment, the append offset of the head).
	size atomic.Int64

	// crcs holds the CRC32C of every data block of the segment, in the order
	// the blocks were appended; extents point into it. Entries are written
	// once by the appender (or replay) before any extent referring to them
	// is published under Engine.idx, and never change afterwards.
	crcs    []uint32
	nblocks uint32 // entries of crcs in use; appender/replay only

	// Accounting for the garbage collector, guarded by Engine.idx.
	liveBlocks int64  // data blocks still referenced by the index
	liveZeros  int64  // zero extents in the index whose TRIM record is here
	trimBytes  int64  // bytes of trim records
	maxTrimSeq uint64 // highest sequence number of a trim record
	verObjs    int64  // objects whose version-carrying record is here
}

func segName(id uint32) string { return fmt.Sprintf("seg-%016x.log", uint64(id)) }

// acquire takes a reference; the caller must know the segment is alive
// (it holds Engine.idx or already holds a reference).
func (s *segment) acquire() { s.refs.Add(1) }

// release drops a reference and closes the file after the last one.
func (s *segment) release() {
	if s.refs.Add(-1) == 0 {
		s.f.Close()
	}
}

// pread fills p from the segment file at off.
func pread(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// pwritev writes the concatenation of iov at off. It consumes iov.
func pwritev(fd int, iov [][]byte, off int64) error {
	for len(iov) > 0 {
		n, err := unix.Pwritev(fd, iov, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		off += int64(n)
		for n > 0 && len(iov) > 0 {
			if n >= len(iov[0]) {
				n -= len(iov[0])
				iov = iov[1:]
			} else {
				iov[0] = iov[0][n:]
				n = 0
			}
		}
		for len(iov) > 0 && len(iov[0]) == 0 {
			iov = iov[1:]
		}
	}
	return nil
}

func fdatasync(fd int) error {
	for {
		err := unix.Fdatasync(fd)
		if err != unix.EINTR {
			return err
		}
	}
}

// syncDir makes the creation, rename and removal of files in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// createSegment creates a new segment file with its header, durably: the
// header is written to a temporary file that is synced and then renamed,
// and the directory is synced, so a seg-*.log file always starts with a
// valid header.
func createSegment(dir string, id uint32, firstSeq uint64, crcCap int) (*segment, error) {
	name := segName(id)
	tmp := filepath.Join(dir, name+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, ioErr("creating segment", err)
	}
	fail := func(what string, err error) (*segment, error) {
		f.Close()
		os.Remove(tmp)
		return nil, ioErr(what+" "+name, err)
	}
	if _, err := f.WriteAt(segHeader{id: uint64(id), firstSeq: firstSeq}.encode(), 0); err != nil {
		return fail("writing header of", err)
	}
	if err := fdatasync(int(f.Fd())); err != nil {
		return fail("syncing", err)
	}
	path := filepath.Join(dir, name)
	if err := os.Rename(tmp, path); err != nil {
		return fail("renaming", err)
	}
	if err := syncDir(dir); err != nil {
		f.Close()
		return nil, ioErr("syncing directory after creating "+name, err)
	}
	s := &segment{id: id, path: path, f: f, fd: int(f.Fd()), firstSeq: firstSeq, crcs: make([]uint32, crcCap)}
	s.refs.Store(1)
	s.size.Store(segHeaderSize)
	return s, nil
}

// scanner reads record headers and CRC arrays of a segment through a
// window, so that scanning small records costs one pread per window and
// scanning large records skips their data.
type scanner struct {
	fd     int
	size   int64
	buf    []byte
	bufOff int64
	bufLen int
}

const scanWindow = 64 << 10

func newScanner(fd int, size int64) *scanner {
	return &scanner{fd: fd, size: size, buf: make([]byte, scanWindow+recHeaderSize+4*objectBlocks+8)}
}

// at returns the n bytes at off, or errTorn if the segment ends before.
func (s *scanner) at(off int64, n int) ([]byte, error) {
	if off+int64(n) > s.size {
		return nil, errTorn
	}
	if off >= s.bufOff && off+int64(n) <= s.bufOff+int64(s.bufLen) {
		i := int(off - s.bufOff)
		return s.buf[i : i+n], nil
	}
	want := max(n, scanWindow)
	if rest := s.size - off; int64(want) > rest {
		want = int(rest)
	}
	if err := pread(s.fd, s.buf[:want], off); err != nil {
		return nil, err
	}
	s.bufOff, s.bufLen = off, want
	return s.buf[:n], nil
}

// record reads and checks the record at off. It returns the header and the
// CRC array bytes (valid until the next call). The error wraps errTorn when
// the record runs past the end of the segment, errBadRecord when it is
// malformed, or is an I/O error.
func (s *scanner) record(off int64) (recHeader, []byte, error) {
	b, err := s.at(off, recHeaderSize)
	if err != nil {
		return recHeader{}, nil, err
	}
	h, err := decodeHeader(b)
	if err != nil {
		return recHeader{}, nil, err
	}
	n := recHeaderSize + int(h.crcArrayLen())
	b, err = s.at(off, n)
	if err != nil {
		return recHeader{}, nil, err
	}
	if err := checkHeaderCRC(b); err != nil {
		return recHeader{}, nil, err
	}
	if off+h.length() > s.size {
		return recHeader{}, nil, errTorn
	}
	return h, b[recHeaderSize:], nil
}
