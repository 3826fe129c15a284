package backup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeTestPoint writes and publishes a point of volume "vol" without a cluster: data extents with the given
// contents at the given offsets, and zero extents where content is nil.
func writeTestPoint(t *testing.T, dir string, seq int, kind, base string, exts map[uint64][]byte, zeroes ...[2]uint64) *Point {
	t.Helper()
	p := &Point{Format: Format, Volume: "vol", VolumeID: 7, Checkpoint: "ck" + string(rune('a'+seq)), SizeBytes: 1 << 20, SectorSize: 512,
		Kind: kind, Base: base, Group: []string{"vol"}, Created: time.Unix(1700000000, 0).UTC()}
	p.Name = pointName(seq, p.Checkpoint)
	w, err := newPointWriter(dir, p)
	if err != nil {
		t.Fatal(err)
	}
	type item struct {
		off  uint64
		data []byte
		zero uint64
	}
	var items []item
	for off, b := range exts {
		items = append(items, item{off: off, data: b})
	}
	for _, z := range zeroes {
		items = append(items, item{off: z[0], zero: z[1]})
	}
	for i := range items { // in offset order, as Create adds them
		for j := i + 1; j < len(items); j++ {
			if items[j].off < items[i].off {
				items[i], items[j] = items[j], items[i]
			}
		}
	}
	for _, it := range items {
		if it.data == nil {
			w.addZero(it.off, it.zero)
		} else if err := w.addData(it.off, it.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.finish(); err != nil {
		t.Fatal(err)
	}
	if err := w.publish(); err != nil {
		t.Fatal(err)
	}
	return p
}

// testChain writes a full point and two incremental ones.
func testChain(t *testing.T) string {
	dir := t.TempDir()
	full := writeTestPoint(t, dir, 1, KindFull, "", map[uint64][]byte{0: bytes.Repeat([]byte{1}, 8192), 65536: bytes.Repeat([]byte{2}, 4096)})
	inc1 := writeTestPoint(t, dir, 2, KindIncremental, full.Name, map[uint64][]byte{4096: bytes.Repeat([]byte{3}, 4096)}, [2]uint64{65536, 4096})
	writeTestPoint(t, dir, 3, KindIncremental, inc1.Name, map[uint64][]byte{512 << 10: bytes.Repeat([]byte{4}, 512)})
	return dir
}

func verifyErr(t *testing.T, dir string) string {
	t.Helper()
	res, err := Verify(context.Background(), dir, "", "", nil)
	if err == nil {
		t.Fatal("Verify found nothing wrong")
	}
	var msgs []string
	for _, c := range res.Points {
		if c.Err != nil {
			msgs = append(msgs, c.Point+": "+c.Err.Error())
		}
	}
	return strings.Join(msgs, "\n")
}

func TestPointRoundTrip(t *testing.T) {
	dir := testChain(t)
	res, err := Verify(context.Background(), dir, "", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Points) != 3 || res.Bad() != 0 {
		t.Fatalf("verified %+v", res.Points)
	}
	ls, err := List(dir)
	if err != nil || len(ls) != 1 {
		t.Fatalf("List: %v %v", ls, err)
	}
	l := ls[0]
	full := l.Points[0]
	// The full point stores 8 KiB and 4 KiB of data and no zeroes; the first incremental one records the
	// trimmed block as a zero extent with no data.
	if full.DataBytes != 12288 || len(full.Extents) != 2 || full.Extents[1] != (Extent{Offset: 65536, Length: 4096, DataOffset: 8192}) {
		t.Fatalf("full point: %d data bytes, extents %+v", full.DataBytes, full.Extents)
	}
	if inc := l.Points[1]; inc.DataBytes != 4096 || inc.Extents[1] != (Extent{Offset: 65536, Length: 4096, Zero: true}) {
		t.Fatalf("incremental point: %d data bytes, extents %+v", inc.DataBytes, inc.Extents)
	}
	chain, err := l.chain(l.Points[2])
	if err != nil || len(chain) != 3 || chain[0] != full {
		t.Fatalf("chain of the newest point: %v %v", chain, err)
	}
	for _, ref := range []string{"", "3", l.Points[2].Name, l.Points[2].Checkpoint} {
		if p, err := l.find(ref); err != nil || p != l.Points[2] {
			t.Errorf("find(%q) = %v, %v", ref, p, err)
		}
	}
	if _, err := l.find("9"); err == nil || !strings.Contains(err.Error(), "no backup point") {
		t.Errorf("find of a point that does not exist: %v", err)
	}
}

// TestDataOfZeroesIsNotStored: data read as all zeroes is recorded as zero extents (incremental) or not at
// all (full).
func TestDataOfZeroesIsNotStored(t *testing.T) {
	dir := t.TempDir()
	block := append(make([]byte, zeroBlock), bytes.Repeat([]byte{5}, zeroBlock)...)
	full := writeTestPoint(t, dir, 1, KindFull, "", map[uint64][]byte{0: block})
	if full.DataBytes != zeroBlock || len(full.Extents) != 1 || full.Extents[0].Offset != zeroBlock {
		t.Fatalf("full point of a zero block and a data block: %d data bytes, extents %+v", full.DataBytes, full.Extents)
	}
	inc := writeTestPoint(t, dir, 2, KindIncremental, full.Name, map[uint64][]byte{0: block})
	if inc.DataBytes != zeroBlock || len(inc.Extents) != 2 || !inc.Extents[0].Zero || inc.Extents[0].Length != zeroBlock {
		t.Fatalf("incremental point of a zero block and a data block: %d data bytes, extents %+v", inc.DataBytes, inc.Extents)
	}
}

func TestVerifyCorruptData(t *testing.T) {
	dir := testChain(t)
	data := filepath.Join(dir, "vol", "000002-ckc", DataFile)
	b, _ := os.ReadFile(data)
	b[100] ^= 1
	os.WriteFile(data, b, 0o644)
	msg := verifyErr(t, dir)
	if !strings.Contains(msg, "000002-ckc/data") || !strings.Contains(msg, "SHA-256") || strings.Contains(msg, "000001") || strings.Contains(msg, "000003") {
		t.Fatalf("a flipped bit in the data of point 2: %s", msg)
	}
}

func TestVerifyTruncatedData(t *testing.T) {
	dir := testChain(t)
	os.Truncate(filepath.Join(dir, "vol", "000001-ckb", DataFile), 4096)
	if msg := verifyErr(t, dir); !strings.Contains(msg, "000001-ckb/data: 4096 bytes, point.json says 12288") {
		t.Fatalf("a truncated data file: %s", msg)
	}
}

func TestVerifyTruncatedPointJSON(t *testing.T) {
	dir := testChain(t)
	f := filepath.Join(dir, "vol", "000003-ckd", PointFile)
	b, _ := os.ReadFile(f)
	os.WriteFile(f, b[:len(b)/2], 0o644)
	msg := verifyErr(t, dir)
	if !strings.Contains(msg, "000003-ckd/point.json") || !strings.Contains(msg, "truncated") {
		t.Fatalf("a truncated point.json: %s", msg)
	}
	// The damaged newest point cannot be the base of another one, nor be restored.
	l, _ := listVolume(dir, "vol")
	if _, err := l.find(""); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("newest point when it is damaged: %v", err)
	}
	os.WriteFile(f, nil, 0o644)
	if msg := verifyErr(t, dir); !strings.Contains(msg, "000003-ckd/point.json: empty") {
		t.Fatalf("an empty point.json: %s", msg)
	}
}

func TestVerifyEditedPointJSON(t *testing.T) {
	dir := testChain(t)
	f := filepath.Join(dir, "vol", "000001-ckb", PointFile)
	b, _ := os.ReadFile(f)
	edited := bytes.Replace(b, []byte(`"size_bytes": 1048576`), []byte(`"size_bytes": 2097152`), 1)
	if bytes.Equal(edited, b) {
		t.Fatal("test setup: size_bytes not found")
	}
	os.WriteFile(f, edited, 0o644)
	msg := verifyErr(t, dir)
	if !strings.Contains(msg, "000001-ckb/point.json: checksum mismatch") {
		t.Fatalf("an edited point.json: %s", msg)
	}
	// Its incremental points cannot be used either: their chain is broken.
	if !strings.Contains(msg, "000002-ckc: point 000002-ckc is based on 000001-ckb, which is damaged") {
		t.Fatalf("points based on a damaged one: %s", msg)
	}
}

func TestVerifyMissingBase(t *testing.T) {
	dir := testChain(t)
	os.RemoveAll(filepath.Join(dir, "vol", "000002-ckc"))
	msg := verifyErr(t, dir)
	if !strings.Contains(msg, "000003-ckd: point 000003-ckd is based on 000002-ckc, which is missing") {
		t.Fatalf("a missing base point: %s", msg)
	}
	// Verifying only point 1 does not need point 2.
	if _, err := Verify(context.Background(), dir, "vol", "1", nil); err != nil {
		t.Fatalf("verify of the full point alone: %v", err)
	}
	if _, err := Verify(context.Background(), dir, "vol", "3", nil); err == nil || !strings.Contains(err.Error(), "damaged or incomplete") {
		t.Fatalf("verify of the point with a missing base: %v", err)
	}
}

// TestLeftoverTempDir: an unfinished point of an interrupted run is never taken for a point; it is reported.
func TestLeftoverTempDir(t *testing.T) {
	dir := testChain(t)
	left := filepath.Join(dir, "vol", tmpPrefix+"000004-cke")
	os.Mkdir(left, 0o755)
	os.WriteFile(filepath.Join(left, DataFile), []byte("half"), 0o644)
	res, err := Verify(context.Background(), dir, "", "", nil)
	if err != nil {
		t.Fatalf("a leftover makes Verify fail: %v", err)
	}
	if len(res.Leftovers) != 1 || res.Leftovers[0] != left || len(res.Points) != 3 {
		t.Fatalf("leftovers %v, %d points", res.Leftovers, len(res.Points))
	}
	l, _ := listVolume(dir, "vol")
	if p, err := l.find(""); err != nil || p.Name != "000003-ckd" {
		t.Fatalf("newest point with a leftover beside it: %v %v", p, err)
	}
}

// TestBadExtents: a point.json with a good checksum but nonsense extents is refused, saying why.
func TestBadExtents(t *testing.T) {
	for _, tc := range []struct {
		exts []Extent
		data uint64
		want string
	}{
		{[]Extent{{Offset: 0, Length: 4096}, {Offset: 2048, Length: 4096, DataOffset: 4096}}, 8192, "overlaps"},
		{[]Extent{{Offset: 1 << 20, Length: 4096}}, 4096, "ends past the volume"},
		{[]Extent{{Offset: 100, Length: 512}}, 512, "not aligned"},
		{[]Extent{{Offset: 0, Length: 4096}, {Offset: 8192, Length: 4096, DataOffset: 0}}, 8192, "has its data at 0"},
		{[]Extent{{Offset: 0, Length: 4096}}, 8192, "add up to 4096 bytes, data_bytes says 8192"},
		{[]Extent{{Offset: 0, Length: 0}}, 0, "empty"},
	} {
		dir := t.TempDir()
		p := &Point{Format: Format, Volume: "vol", Checkpoint: "c", SizeBytes: 1 << 20, SectorSize: 512, Kind: KindFull,
			DataSHA256: strings.Repeat("0", 64), DataBytes: tc.data, Extents: tc.exts}
		b, err := encodePoint(p)
		if err != nil {
			t.Fatal(err)
		}
		pdir := filepath.Join(dir, "vol", pointName(1, "c"))
		os.MkdirAll(pdir, 0o755)
		os.WriteFile(filepath.Join(pdir, PointFile), b, 0o644)
		if _, err := readPoint(pdir); err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "point.json") {
			t.Errorf("extents %+v: %v, want an error naming point.json and saying %q", tc.exts, err, tc.want)
		}
	}
}

// TestPointJSONChecksumIsOverBytes: the checksum covers the bytes, so a field this version does not know (from
// a later one of the same format) does not break it, and any change to the bytes does.
func TestPointJSONChecksumIsOverBytes(t *testing.T) {
	p := &Point{Format: Format, Volume: "vol", Checkpoint: "c", SizeBytes: 4096, SectorSize: 512, Kind: KindFull, DataSHA256: strings.Repeat("a", 64), Extents: []Extent{}}
	b, err := encodePoint(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodePoint(b); err != nil {
		t.Fatal(err)
	}
	// A later writer's extra field, with the checksum computed as encodePoint does.
	doc := append([]byte("{\n  \"future_field\": 1,"), b[1:bytes.LastIndex(b, []byte(sumPrefix))]...)
	doc = append(doc, "\n}\n"...)
	sum := sha256.Sum256(doc)
	later := append(append(doc[:len(doc)-3], sumPrefix+hex.EncodeToString(sum[:])...), sumSuffix...)
	if _, err := decodePoint(later); err != nil {
		t.Fatalf("a point.json with a field this version does not know: %v", err)
	}
	for i := 0; i < len(b)-len(sumSuffix)-len(sumPrefix)-64; i += 7 {
		c := append([]byte{}, b...)
		c[i] ^= 0x20
		if _, err := decodePoint(c); err == nil {
			t.Fatalf("a change at byte %d (%q) went unnoticed", i, b[i])
		}
	}
}
