package backup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Format names this version of the on-disk format. A reader refuses points of any other format.
const Format = "basalt-backup/1"

// File names inside a point directory.
const (
	PointFile = "point.json"
	DataFile  = "data"
	// tmpPrefix starts the name of a point being written. Anything so named is the leftover of an interrupted
	// run: never a point.
	tmpPrefix = ".tmp-"
	// manifestFile is the human-readable summary at the top of a backup directory.
	manifestFile = "README.txt"
	// lockFile is held (flock) by a Create, so that two runs never write the same directory at once.
	lockFile = ".lock"
)

// Kinds of point.
const (
	KindFull        = "full"
	KindIncremental = "incremental"
)

// Extent is a range of the volume recorded in a point: data (its bytes are in the data file at DataOffset) or
// zero (the range reads as zeroes; nothing is stored).
type Extent struct {
	Offset     uint64 `json:"offset"`
	Length     uint64 `json:"length"`
	Zero       bool   `json:"zero"`
	DataOffset uint64 `json:"data_offset"`
}

// Point is one backup point: the content of point.json.
type Point struct {
	Format string `json:"format"`
	Volume string `json:"volume"`
	// VolumeID is the cluster's number for the volume; a volume deleted and created again under the same
	// name has another, and an incremental point is never based on a point of the old one.
	VolumeID   uint64 `json:"volume_id"`
	Checkpoint string `json:"checkpoint"`
	SizeBytes  uint64 `json:"size_bytes"`
	SectorSize uint32 `json:"sector_size"`
	Kind       string `json:"kind"`
	// Base is the directory name of the point this one is based on (incremental points only).
	Base string `json:"base,omitempty"`
	// Group lists the volumes checkpointed at the same instant, this one included.
	Group   []string  `json:"group"`
	Created time.Time `json:"created"`
	// BytesRead is how many bytes were read from the cluster to make the point.
	BytesRead uint64 `json:"bytes_read"`
	// DataBytes is the size of the data file: the sum of the lengths of the data extents.
	DataBytes  uint64 `json:"data_bytes"`
	DataSHA256 string `json:"data_sha256"`
	// Extents are sorted by offset and do not overlap. Ranges in none of them are unchanged since the base
	// point (incremental), or read as zeroes (full).
	Extents []Extent `json:"extents"`

	// Name is the point's directory name, NNNNNN-CHECKPOINT. It is not stored in point.json.
	Name string `json:"-"`
}

// Seq is the point's number within its volume's directory, from its name.
func (p *Point) Seq() int {
	n, _ := parsePointName(p.Name)
	return n
}

var pointNameRE = regexp.MustCompile(`^([0-9]{6})-(.+)$`)

// pointName is the directory name of point number seq of checkpoint.
func pointName(seq int, checkpoint string) string { return fmt.Sprintf("%06d-%s", seq, checkpoint) }

// parsePointName returns the number of a point directory name, and whether it is one.
func parsePointName(name string) (int, bool) {
	m := pointNameRE.FindStringSubmatch(name)
	if m == nil {
		return 0, false
	}
	n, err := strconv.Atoi(m[1])
	return n, err == nil && n > 0
}

// The checksum line closes point.json: `,\n  "sha256": "HEX"\n}\n`. HEX is the SHA-256 of the file without that
// line, that is of the JSON document that ends `\n}\n` right after the extents. Fields this version does not
// know still count, so a point is checked byte for byte, not as this version understands it.
const (
	sumPrefix = ",\n  \"sha256\": \""
	sumSuffix = "\"\n}\n"
)

// encodePoint returns the bytes of point.json for p.
func encodePoint(p *Point) ([]byte, error) {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", PointFile, err)
	}
	b = append(b, '\n')
	sum := sha256.Sum256(b)
	body := b[:len(b)-len("\n}\n")]
	out := make([]byte, 0, len(b)+100)
	out = append(out, body...)
	out = append(out, sumPrefix...)
	out = append(out, hex.EncodeToString(sum[:])...)
	out = append(out, sumSuffix...)
	return out, nil
}

// decodePoint checks point.json's own checksum and format and decodes it. Errors say what is wrong, not where:
// the caller names the file.
func decodePoint(b []byte) (*Point, error) {
	i := bytes.LastIndex(b, []byte(sumPrefix))
	if i < 0 || !bytes.HasSuffix(b, []byte(sumSuffix)) || len(b)-i != len(sumPrefix)+64+len(sumSuffix) {
		if len(b) == 0 {
			return nil, errors.New("empty: the point is incomplete")
		}
		return nil, errors.New("no checksum line at its end: the file is truncated or was not written by basalt backup")
	}
	want := string(b[i+len(sumPrefix) : i+len(sumPrefix)+64])
	doc := append(append([]byte{}, b[:i]...), "\n}\n"...)
	sum := sha256.Sum256(doc)
	if got := hex.EncodeToString(sum[:]); got != want {
		return nil, fmt.Errorf("checksum mismatch (content hashes to %s, the file says %s): the file was changed or damaged", got[:12], want[:min(12, len(want))])
	}
	var p Point
	if err := json.Unmarshal(doc, &p); err != nil {
		return nil, fmt.Errorf("not valid JSON despite a good checksum: %w", err)
	}
	if p.Format != Format {
		return nil, fmt.Errorf("format %q: this basalt reads %q", p.Format, Format)
	}
	return &p, nil
}

// readPoint reads and checks the point.json of the point directory path.
func readPoint(path string) (*Point, error) {
	f := filepath.Join(path, PointFile)
	b, err := os.ReadFile(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	p, err := decodePoint(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	p.Name = filepath.Base(path)
	if err := p.check(filepath.Base(filepath.Dir(path))); err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	return p, nil
}

// check verifies what point.json says against itself: names, kind, and that the extents are sorted, in
// range, aligned, not overlapping, and laid out back to back in the data file.
func (p *Point) check(volumeDir string) error {
	seq, ok := parsePointName(p.Name)
	switch {
	case !ok || p.Name != pointName(seq, p.Checkpoint):
		return fmt.Errorf("point of checkpoint %q is in directory %q, want NNNNNN-%s", p.Checkpoint, p.Name, p.Checkpoint)
	case p.Volume != volumeDir:
		return fmt.Errorf("point of volume %q is in the directory of volume %q", p.Volume, volumeDir)
	case p.SectorSize != 512 && p.SectorSize != 4096:
		return fmt.Errorf("sector size %d: want 512 or 4096", p.SectorSize)
	case p.SizeBytes == 0 || p.SizeBytes%uint64(p.SectorSize) != 0:
		return fmt.Errorf("volume size %d is not a positive multiple of the %d-byte sector", p.SizeBytes, p.SectorSize)
	case p.Kind == KindFull && p.Base != "":
		return fmt.Errorf("a full point has a base (%q)", p.Base)
	case p.Kind == KindIncremental && p.Base == "":
		return errors.New("an incremental point has no base")
	case p.Kind != KindFull && p.Kind != KindIncremental:
		return fmt.Errorf("kind %q: want %s or %s", p.Kind, KindFull, KindIncremental)
	case len(p.DataSHA256) != 64:
		return fmt.Errorf("data_sha256 %q is not a SHA-256", p.DataSHA256)
	}
	sector := uint64(p.SectorSize)
	var end, data uint64
	for i, e := range p.Extents {
		switch {
		case e.Length == 0:
			return fmt.Errorf("extent %d (offset %d) is empty", i, e.Offset)
		case e.Offset < end:
			return fmt.Errorf("extent %d (offset %d) overlaps or precedes the one before it, which ends at %d", i, e.Offset, end)
		case e.Offset > p.SizeBytes || e.Length > p.SizeBytes-e.Offset:
			return fmt.Errorf("extent %d (%d bytes at %d) ends past the volume's %d bytes", i, e.Length, e.Offset, p.SizeBytes)
		case e.Offset%sector != 0 || e.Length%sector != 0:
			return fmt.Errorf("extent %d (%d bytes at %d) is not aligned to the %d-byte sector", i, e.Length, e.Offset, sector)
		case e.Zero && e.DataOffset != 0:
			return fmt.Errorf("zero extent %d (offset %d) has data at %d", i, e.Offset, e.DataOffset)
		case !e.Zero && e.DataOffset != data:
			return fmt.Errorf("extent %d (offset %d) has its data at %d of the data file, want %d (right after the extent before)", i, e.Offset, e.DataOffset, data)
		}
		end = e.Offset + e.Length
		if !e.Zero {
			data += e.Length
		}
	}
	if data != p.DataBytes {
		return fmt.Errorf("data extents add up to %d bytes, data_bytes says %d", data, p.DataBytes)
	}
	return nil
}

// checkData hashes the point's data file and compares its size and checksum with point.json. add, if not
// nil, is told of the bytes as they are hashed.
func (p *Point) checkData(ctx context.Context, path string, add func(int64)) error {
	f := filepath.Join(path, DataFile)
	fh, err := os.Open(f)
	if err != nil {
		return fmt.Errorf("%s: %w", f, err)
	}
	defer fh.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, progressReader{ctx, fh, add}, make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: reading: %w", f, err)
	}
	if uint64(n) != p.DataBytes {
		return fmt.Errorf("%s: %d bytes, point.json says %d: the data file is truncated or too long", f, n, p.DataBytes)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != p.DataSHA256 {
		return fmt.Errorf("%s: SHA-256 is %s, point.json says %s: the data file is damaged", f, got[:12], p.DataSHA256[:12])
	}
	return nil
}

// progressReader reports what is read, and stops when ctx ends (hashing 10 GiB takes a while).
type progressReader struct {
	ctx context.Context
	r   io.Reader
	add func(int64)
}

func (r progressReader) Read(b []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := r.r.Read(b)
	if r.add != nil && n > 0 {
		r.add(int64(n))
	}
	return n, err
}

// Listing is what a backup directory holds for one volume.
type Listing struct {
	Volume string
	// Points are the readable points, oldest first.
	Points []*Point
	// Damaged are point directories whose point.json cannot be read or makes no sense, with the reason.
	Damaged []Damaged
	// Leftovers are directories of interrupted runs (never points), cleaned by the next Create.
	Leftovers []string
	// maxSeq is the highest point number in use, damaged points included.
	maxSeq int
}

// Damaged is a point directory that is not a usable point.
type Damaged struct {
	Name string
	Err  error
}

// List reads every volume's points in dir, checking each point.json (not the data: see Verify).
func List(dir string) ([]*Listing, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("backup directory: %w", err)
	}
	var out []*Listing
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		l, err := listVolume(dir, e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	return out, nil
}

// listVolume reads one volume's points. A volume with no directory has no points.
func listVolume(dir, volume string) (*Listing, error) {
	l := &Listing{Volume: volume}
	vdir := filepath.Join(dir, volume)
	entries, err := os.ReadDir(vdir)
	if errors.Is(err, os.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return nil, fmt.Errorf("backup directory: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, tmpPrefix) {
			l.Leftovers = append(l.Leftovers, name)
			continue
		}
		seq, ok := parsePointName(name)
		if !ok || !e.IsDir() {
			continue // not ours; left alone
		}
		l.maxSeq = max(l.maxSeq, seq)
		p, err := readPoint(filepath.Join(vdir, name))
		if err != nil {
			l.Damaged = append(l.Damaged, Damaged{Name: name, Err: err})
			continue
		}
		l.Points = append(l.Points, p)
	}
	sort.Slice(l.Points, func(i, j int) bool { return l.Points[i].Name < l.Points[j].Name })
	return l, nil
}

// find returns the point named by ref: its directory name, its checkpoint name, or its number; "" is the
// newest point.
func (l *Listing) find(ref string) (*Point, error) {
	if ref == "" {
		if len(l.Points) == 0 {
			return nil, fmt.Errorf("volume %q has no readable backup point", l.Volume)
		}
		newest := l.Points[len(l.Points)-1]
		for _, d := range l.Damaged {
			if d.Name > newest.Name {
				return nil, fmt.Errorf("the newest point of %q is damaged: %v", l.Volume, d.Err)
			}
		}
		return newest, nil
	}
	seq, numeric := 0, false
	if n, err := strconv.Atoi(ref); err == nil {
		seq, numeric = n, true
	}
	for _, p := range l.Points {
		if p.Name == ref || p.Checkpoint == ref || numeric && p.Seq() == seq {
			return p, nil
		}
	}
	for _, d := range l.Damaged {
		if n, _ := parsePointName(d.Name); d.Name == ref || strings.HasSuffix(d.Name, "-"+ref) || numeric && n == seq {
			return nil, fmt.Errorf("point %s of %q is damaged: %v", d.Name, l.Volume, d.Err)
		}
	}
	return nil, fmt.Errorf("volume %q has no backup point %q (see 'basalt backup list')", l.Volume, ref)
}

// chain returns the points to apply, full point first, to rebuild point p, checking the links between them.
func (l *Listing) chain(p *Point) ([]*Point, error) {
	byName := map[string]*Point{}
	for _, q := range l.Points {
		byName[q.Name] = q
	}
	damaged := map[string]error{}
	for _, d := range l.Damaged {
		damaged[d.Name] = d.Err
	}
	chain := []*Point{p}
	for cur := p; cur.Kind == KindIncremental; {
		base, ok := byName[cur.Base]
		switch {
		case damaged[cur.Base] != nil:
			return nil, fmt.Errorf("point %s is based on %s, which is damaged: %v", cur.Name, cur.Base, damaged[cur.Base])
		case !ok:
			return nil, fmt.Errorf("point %s is based on %s, which is missing from %s: the chain is incomplete", cur.Name, cur.Base, l.Volume)
		case base.Name >= cur.Name:
			return nil, fmt.Errorf("point %s is based on %s, which is not older", cur.Name, base.Name)
		case base.VolumeID != cur.VolumeID:
			return nil, fmt.Errorf("point %s (volume id %d) is based on %s of another volume of the same name (id %d)", cur.Name, cur.VolumeID, base.Name, base.VolumeID)
		case base.SectorSize != cur.SectorSize:
			return nil, fmt.Errorf("point %s has %d-byte sectors, its base %s %d-byte ones", cur.Name, cur.SectorSize, base.Name, base.SectorSize)
		}
		chain = append(chain, base)
		cur = base
	}
	for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
		chain[i], chain[j] = chain[j], chain[i]
	}
	return chain, nil
}
