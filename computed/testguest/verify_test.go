package testguest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/testguest/record"
)

func TestRecordFormat(t *testing.T) {
	b := make([]byte, record.Size)
	r := record.Encode(b, record.Record{Seq: 42, Time: time.Unix(1700000000, 123), Boot: 0xabc})
	got, err := record.Decode(b)
	if err != nil || got.Seq != 42 || !got.Time.Equal(r.Time) || got.Boot != 0xabc || got.CRC != r.CRC {
		t.Fatalf("Decode = %+v, %v; encoded %+v", got, err, r)
	}
	for _, off := range []int{9, 100, record.Size - 5} {
		c := bytes.Clone(b)
		c[off] ^= 1
		if _, err := record.Decode(c); err == nil || errors.Is(err, record.ErrEmpty) {
			t.Errorf("flipped byte %d: %v", off, err)
		}
	}
	if _, err := record.Decode(make([]byte, record.Size)); !errors.Is(err, record.ErrEmpty) {
		t.Errorf("zero block: %v", err)
	}
	// A block whose second half is from an older pass over the ring (a torn write) fails too.
	old := make([]byte, record.Size)
	record.Encode(old, record.Record{Seq: 42 - 8, Time: time.Unix(1, 0), Boot: 0xabc})
	torn := append(bytes.Clone(b[:record.Size/2]), old[record.Size/2:]...)
	if _, err := record.Decode(torn); err == nil {
		t.Error("torn block accepted")
	}

	line := "junk before " + record.Line(r)
	p, err := record.ParseLine(line)
	if err != nil || p != r {
		t.Fatalf("ParseLine(%q) = %+v, %v", line, p, err)
	}
	for _, bad := range []string{
		strings.Replace(record.Line(r), "seq=42", "seq=43", 1), // fields no longer match the CRC
		strings.Replace(record.Line(r), "crc=", "crc=x", 1),
		"BASALT rec seq=1",
		"BASALT mem total=1 avail=1",
	} {
		if _, err := record.ParseLine(bad); err == nil {
			t.Errorf("ParseLine(%q) accepted", bad)
		}
	}
}

// ring builds a disk image of slots blocks holding the given records in their slots.
func ring(slots int, recs ...record.Record) []byte {
	img := make([]byte, slots*record.Size)
	for _, r := range recs {
		s := int(r.Seq % uint64(slots))
		record.Encode(img[s*record.Size:(s+1)*record.Size], r)
	}
	return img
}

func recs(from, to uint64) []record.Record {
	var out []record.Record
	for s := from; s <= to; s++ {
		out = append(out, record.Record{Seq: s, Time: time.Unix(0, int64(s)*20e6), Boot: 7})
	}
	return out
}

func TestVerifyDisk(t *testing.T) {
	verify := func(img []byte) (DiskSummary, error) { return VerifyDisk(bytes.NewReader(img), int64(len(img))) }

	s, err := verify(ring(8, recs(1, 5)...))
	if err != nil || s.First != 1 || s.Last != 5 || len(s.Records) != 5 || s.Boots[7] != 5 {
		t.Fatalf("5 records: %+v, %v", s, err)
	}
	s, err = verify(ring(8, recs(1, 12)...)) // wrapped: 5..12 remain
	if err != nil || s.First != 5 || s.Last != 12 {
		t.Fatalf("wrapped ring: %+v, %v", s, err)
	}
	all := recs(1, 6)
	if _, err := verify(ring(8, append(all[:3:3], all[4:]...)...)); err == nil || !strings.Contains(err.Error(), "record 4 is missing") {
		t.Errorf("gap: %v", err)
	}
	img := ring(8, recs(1, 5)...)
	img[2*record.Size+100] ^= 1
	if _, err := verify(img); err == nil || !strings.Contains(err.Error(), "bad blocks") {
		t.Errorf("corrupt block: %v", err)
	}
	img = ring(8, recs(1, 5)...)
	copy(img[6*record.Size:7*record.Size], img[3*record.Size:4*record.Size]) // record 3 also in slot 6
	if _, err := verify(img); err == nil || !strings.Contains(err.Error(), "belongs in slot 3") {
		t.Errorf("misplaced record: %v", err)
	}
	if _, err := verify(make([]byte, 8*record.Size)); err == nil {
		t.Error("empty ring verified")
	}

	s, _ = verify(ring(8, recs(1, 5)...))
	announced := func(rs ...record.Record) []Rec {
		var out []Rec
		for _, r := range rs {
			b := make([]byte, record.Size)
			out = append(out, Rec{Record: record.Encode(b, r)})
		}
		return out
	}
	if err := s.CheckAnnounced(announced(recs(2, 5)...)); err != nil {
		t.Errorf("announced records on disk: %v", err)
	}
	if err := s.CheckAnnounced(announced(recs(5, 6)...)); err == nil {
		t.Error("record announced but not on disk accepted")
	}
	other := recs(3, 3)
	other[0].Boot = 8
	if err := s.CheckAnnounced(announced(other...)); err == nil {
		t.Error("record differing from the disk's accepted")
	}
}

func TestConsole(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	line := func(seq uint64) string {
		b := make([]byte, record.Size)
		return record.Line(record.Encode(b, record.Record{Seq: seq, Time: time.Unix(0, int64(seq)*20e6), Boot: 1}))
	}

	// Two consoles, one stream split between them in the middle of record 3's line (a migration's switchover).
	stream := line(1) + "\r\n" + line(2) + "\r\n" + line(3) + "\r\n" + line(4) + "\r\n"
	cut := strings.Index(stream, line(3)) + 10
	pr1, pw1 := io.Pipe()
	pr2, pw2 := io.Pipe()
	c1, c2 := WatchConsole(pr1), WatchConsole(pr2)
	go func() {
		pw1.Write([]byte(stream[:cut/2]))
		pw1.Write([]byte(stream[cut/2 : cut]))
		pw1.Close()
		pw2.Write([]byte(stream[cut:]))
		pw2.Write([]byte("BASALT mem total=1000 avail=500\nBASALT dev blk=vda:2048,vdb:8 net=eth0/52:54:00:00:00:01\n"))
		pw2.Close()
	}()
	if r, err := c1.WaitRecord(ctx, 2); err != nil || r.Seq != 2 {
		t.Fatalf("WaitRecord = %+v, %v", r, err)
	}
	<-c1.Done()
	<-c2.Done()
	if _, err := c1.WaitRecord(ctx, 3); err == nil {
		t.Fatal("record 3 found in the console that only saw half of it")
	}
	if _, err := record.ParseLine(c2.Lines()[0].Text); err == nil {
		t.Fatalf("second console starts with a whole record: %q", c2.Lines()[0].Text)
	}
	rs, err := Records(Join(c1, c2))
	if err != nil {
		t.Fatal(err)
	}
	cont, err := CheckContinuity(rs)
	if err != nil || cont.First != 1 || cont.Last != 4 || cont.Count != 4 || cont.MaxGuestGap != 20*time.Millisecond {
		t.Fatalf("joined: %+v, %v", cont, err)
	}
	_, l, err := c2.Wait(ctx, 0, func(l Line) bool { _, ok := ParseMem(l); return ok })
	if mem, _ := ParseMem(l); err != nil || mem.Total != 1000<<10 || mem.Available != 500<<10 {
		t.Fatalf("mem line: %+v, %v", mem, err)
	}
	_, l, err = c2.Wait(ctx, 0, func(l Line) bool { _, ok := ParseDevices(l); return ok })
	if dev, _ := ParseDevices(l); err != nil || dev.Block["vda"] != 2048*512 || dev.Block["vdb"] != 8*512 || dev.Net["eth0"] != "52:54:00:00:00:01" {
		t.Fatalf("dev line: %+v, %v", dev, err)
	}
	if _, _, err := c2.Wait(ctx, 0, func(l Line) bool { return false }); err == nil {
		t.Fatal("Wait on an ended console returned no error")
	}

	// Gaps and repeats are errors; a garbled record line is an error, not a skipped line.
	var gap []Rec
	for _, s := range []uint64{1, 2, 4} {
		r, _ := record.ParseLine(line(s))
		gap = append(gap, Rec{Record: r})
	}
	if _, err := CheckContinuity(gap); err == nil {
		t.Error("gap accepted")
	}
	if _, err := CheckContinuity(append(gap[:2:2], gap[1])); err == nil {
		t.Error("repeat accepted")
	}
	if _, err := Records([]Line{{Text: strings.Replace(line(1), "boot=", "boot=9", 1)}}); err == nil {
		t.Error("garbled record line accepted")
	}
}
