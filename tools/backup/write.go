package backup

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

// zeroBlock is the granularity at which read data that is all zeroes is recorded as a zero extent instead of
// being stored: guests write zeroes more often than one would think (filesystems zeroing journals, dd).
const zeroBlock = 64 << 10

var zeroes = make([]byte, zeroBlock)

// pointWriter builds one point in a temporary directory next to where it will live.
type pointWriter struct {
	p    *Point
	vdir string // DIR/VOLUME
	tmp  string // DIR/VOLUME/.tmp-NAME

	data *os.File
	buf  *bufio.Writer
	hash hash.Hash
}

func newPointWriter(dir string, p *Point) (*pointWriter, error) {
	vdir := filepath.Join(dir, p.Volume)
	if _, err := os.Stat(vdir); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(vdir, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", vdir, err)
		}
		if err := syncDir(dir); err != nil {
			return nil, err
		}
	}
	tmp := filepath.Join(vdir, tmpPrefix+p.Name)
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	f, err := os.OpenFile(filepath.Join(tmp, DataFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("create %s: %w", filepath.Join(tmp, DataFile), err)
	}
	return &pointWriter{p: p, vdir: vdir, tmp: tmp, data: f, buf: bufio.NewWriterSize(f, 1<<20), hash: sha256.New()}, nil
}

// addData records b as the content at off. Blocks of it that are all zeroes are recorded as zero extents.
// Ranges must be added in increasing offset order.
func (w *pointWriter) addData(off uint64, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), zeroBlock)
		if bytes.Equal(b[:n], zeroes[:n]) {
			w.addZero(off, uint64(n))
		} else {
			if _, err := w.buf.Write(b[:n]); err != nil {
				return fmt.Errorf("write %s: %w", filepath.Join(w.tmp, DataFile), err)
			}
			w.hash.Write(b[:n])
			w.add(Extent{Offset: off, Length: uint64(n), DataOffset: w.p.DataBytes})
			w.p.DataBytes += uint64(n)
		}
		off += uint64(n)
		b = b[n:]
	}
	return nil
}

// addZero records that [off, off+n) reads as zeroes. A full point does not record zeroes: a volume restored
// from it starts as zeroes.
func (w *pointWriter) addZero(off, n uint64) {
	if w.p.Kind == KindFull {
		return
	}
	w.add(Extent{Offset: off, Length: n, Zero: true})
}

// add appends an extent, merging it into the previous one when they are adjacent and of the same kind.
func (w *pointWriter) add(e Extent) {
	if k := len(w.p.Extents); k > 0 {
		last := &w.p.Extents[k-1]
		if last.Zero == e.Zero && last.Offset+last.Length == e.Offset {
			last.Length += e.Length
			return
		}
	}
	w.p.Extents = append(w.p.Extents, e)
}

// finish makes the point durable in its temporary directory: data and point.json written and fsynced, and
// the directory fsynced.
func (w *pointWriter) finish() error {
	w.p.DataSHA256 = hex.EncodeToString(w.hash.Sum(nil))
	if w.p.Extents == nil {
		w.p.Extents = []Extent{} // "extents": [] reads better than null
	}
	// Never write a point that a reader would refuse.
	if err := w.p.check(w.p.Volume); err != nil {
		return fmt.Errorf("point %s of %s is inconsistent (a bug): %w", w.p.Name, w.p.Volume, err)
	}
	dataPath := filepath.Join(w.tmp, DataFile)
	if err := w.buf.Flush(); err != nil {
		return fmt.Errorf("write %s: %w", dataPath, err)
	}
	if err := w.data.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dataPath, err)
	}
	if err := w.data.Close(); err != nil {
		return fmt.Errorf("close %s: %w", dataPath, err)
	}
	w.data = nil
	b, err := encodePoint(w.p)
	if err != nil {
		return err
	}
	if err := writeFileSync(filepath.Join(w.tmp, PointFile), b); err != nil {
		return err
	}
	return syncDir(w.tmp)
}

// publish renames the finished point into place and makes the rename durable.
func (w *pointWriter) publish() error {
	final := filepath.Join(w.vdir, w.p.Name)
	if err := os.Rename(w.tmp, final); err != nil {
		return fmt.Errorf("publish point %s: %w", final, err)
	}
	return syncDir(w.vdir)
}

// abort removes whatever was written.
func (w *pointWriter) abort() {
	if w.data != nil {
		w.data.Close()
	}
	os.RemoveAll(w.tmp)
}

func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	return nil
}

// syncDir makes the entries of a directory (files created, renamed or removed in it) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// lockDir takes the backup directory's lock, so that two runs never write points into it at once (they
// would pick the same point numbers and clean each other's work as leftovers).
func lockDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another backup is writing to %s (it holds %s)", dir, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// writeManifest rewrites DIR/README.txt: what the directory is and which points it holds. It is for humans
// only; nothing reads it back.
func writeManifest(dir string) error {
	ls, err := List(dir)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `Basalt volume backups (format %s)

Each directory here holds one volume's backup points, oldest first: a full point, then incremental points,
each holding only what changed since the point before it (its "base"). A point NNNNNN-CHECKPOINT holds
point.json (the volume's size, the extents the point records, and SHA-256 checksums of the data and of
point.json itself) and data (the extents' bytes, back to back). Directories starting with .tmp- are
unfinished points of an interrupted run; they are never used and the next backup removes them.

  basalt backup list DIR                                  list the points
  basalt backup verify DIR [VOLUME [POINT]]               check every checksum and link
  basalt backup restore DIR VOLUME [--point P] --to NEW   restore a point into a new volume

The format is described in docs/backup.md of the Basalt source. This file was written %s.
`, Format, time.Now().UTC().Format(time.RFC3339))
	for _, l := range ls {
		fmt.Fprintf(&b, "\nVolume %s\n", l.Volume)
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  POINT\tKIND\tTAKEN (UTC)\tVOLUME SIZE\tDATA\tBASE\tGROUP")
		for _, p := range l.Points {
			base := p.Base
			if base == "" {
				base = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%d\t%s\t%s\n", p.Name, p.Kind, p.Created.UTC().Format("2006-01-02 15:04:05"),
				p.SizeBytes, p.DataBytes, base, strings.Join(p.Group, ","))
		}
		for _, d := range l.Damaged {
			fmt.Fprintf(tw, "  %s\tDAMAGED\t%v\n", d.Name, d.Err)
		}
		tw.Flush()
	}
	tmp := filepath.Join(dir, tmpPrefix+manifestFile)
	if err := writeFileSync(tmp, b.Bytes()); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, manifestFile)); err != nil {
		return fmt.Errorf("write %s: %w", filepath.Join(dir, manifestFile), err)
	}
	return syncDir(dir)
}
