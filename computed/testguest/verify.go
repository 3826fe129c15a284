package testguest

import (
	"errors"
	"fmt"
	"io"

	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// DiskSummary is what a verified record ring holds.
type DiskSummary struct {
	Slots int64
	// First and Last bound the records the ring holds, all of them present: First is 1 until the ring wraps.
	First, Last uint64
	// Records are the ring's records by sequence number.
	Records map[uint64]record.Record
	// Boots counts records per boot id: more than one boot wrote to the disk when the guest was restarted.
	Boots map[uint64]int
}

// VerifyDisk reads the agent's record ring from a disk image of size bytes and checks it: every block that
// starts a record has a good CRC and sits in its slot, and the records form one unbroken run ending at the
// highest sequence number (so no acknowledged write went missing, whatever happened to the guest in between).
func VerifyDisk(r io.ReaderAt, size int64) (DiskSummary, error) {
	s := DiskSummary{Slots: size / record.Size, Records: map[uint64]record.Record{}, Boots: map[uint64]int{}}
	if s.Slots < 2 {
		return s, fmt.Errorf("disk of %d bytes holds no ring", size)
	}
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	var bad []error
	for off := int64(0); off < s.Slots*record.Size; off += chunk {
		n := min(int64(chunk), s.Slots*record.Size-off)
		if _, err := r.ReadAt(buf[:n], off); err != nil && !(errors.Is(err, io.EOF) && n > 0) {
			return s, fmt.Errorf("read ring at %d: %w", off, err)
		}
		for i := int64(0); i < n; i += record.Size {
			slot := (off + i) / record.Size
			rec, err := record.Decode(buf[i : i+record.Size])
			switch {
			case errors.Is(err, record.ErrEmpty):
				continue
			case err != nil:
				bad = append(bad, fmt.Errorf("slot %d: %w", slot, err))
				continue
			case int64(rec.Seq%uint64(s.Slots)) != slot:
				bad = append(bad, fmt.Errorf("slot %d holds record %d, which belongs in slot %d", slot, rec.Seq, rec.Seq%uint64(s.Slots)))
				continue
			}
			s.Records[rec.Seq] = rec
			s.Boots[rec.Boot]++
			s.Last = max(s.Last, rec.Seq)
		}
	}
	if len(bad) > 0 {
		return s, fmt.Errorf("%d bad blocks in the ring, first: %w", len(bad), bad[0])
	}
	if len(s.Records) == 0 {
		return s, fmt.Errorf("no records on the disk")
	}
	s.First = 1
	if s.Last > uint64(s.Slots) {
		s.First = s.Last - uint64(s.Slots) + 1
	}
	for seq := s.Last; seq >= s.First && seq > 0; seq-- {
		if _, ok := s.Records[seq]; !ok {
			return s, fmt.Errorf("record %d is missing from the disk (records %d..%d expected, %d present)",
				seq, s.First, s.Last, len(s.Records))
		}
	}
	return s, nil
}

// CheckAnnounced checks that every record the console announced, back to the oldest the ring still holds, is
// on the disk exactly as announced: the agent prints a record only after its write returned, so one that is
// missing or different was lost or torn below the guest.
func (s DiskSummary) CheckAnnounced(recs []Rec) error {
	for _, r := range recs {
		if r.Seq < s.First {
			continue
		}
		d, ok := s.Records[r.Seq]
		if !ok {
			return fmt.Errorf("record %d was announced on the console but is not on the disk (disk holds %d..%d)", r.Seq, s.First, s.Last)
		}
		if d.CRC != r.CRC || d.Boot != r.Boot || !d.Time.Equal(r.Time) {
			return fmt.Errorf("record %d on the disk (%+v) differs from the console's (%+v)", r.Seq, d, r.Record)
		}
	}
	return nil
}
