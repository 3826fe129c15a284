package backup

import (
	"context"
	"fmt"
	"path/filepath"
)

// Checked is the verdict on one point.
type Checked struct {
	Volume string
	// Point is the point's directory name.
	Point string
	// Kind and DataBytes are those of the point, when its point.json could be read.
	Kind      string
	DataBytes uint64
	// Err says what is wrong, naming the file; nil means the point and its links are sound.
	Err error
}

// VerifyResult is what Verify checked.
type VerifyResult struct {
	Points []Checked
	// Leftovers are unfinished points of interrupted runs (DIR/VOLUME/.tmp-...): never used, not checked.
	Leftovers []string
}

// Bad counts the points that failed.
func (r *VerifyResult) Bad() int {
	n := 0
	for _, c := range r.Points {
		if c.Err != nil {
			n++
		}
	}
	return n
}

// Verify checks backup points without a cluster: every point.json's checksum and contents (extents sorted,
// in range, aligned, not overlapping, adding up to the data size), the links from each incremental point to
// its base, and every data file's size and SHA-256. With volume empty it checks every volume; with point set,
// that point and the chain it needs. The error is nil only if everything checked is sound; the result says
// point by point what is wrong.
func Verify(ctx context.Context, dir, volume, point string, prog Progress) (*VerifyResult, error) {
	prog = orNone(prog)
	var ls []*Listing
	if volume == "" {
		var err error
		if ls, err = List(dir); err != nil {
			return nil, err
		}
	} else {
		l, err := listVolume(dir, volume)
		if err != nil {
			return nil, err
		}
		if len(l.Points) == 0 && len(l.Damaged) == 0 {
			return nil, fmt.Errorf("%s holds no backup of volume %q", dir, volume)
		}
		ls = []*Listing{l}
	}
	res := &VerifyResult{}
	for _, l := range ls {
		for _, lo := range l.Leftovers {
			res.Leftovers = append(res.Leftovers, filepath.Join(dir, l.Volume, lo))
		}
		points := l.Points
		if point != "" {
			p, err := l.find(point)
			if err != nil {
				return nil, err
			}
			if points, err = l.chain(p); err != nil {
				res.Points = append(res.Points, Checked{Volume: l.Volume, Point: p.Name, Kind: p.Kind, DataBytes: p.DataBytes, Err: err})
				continue
			}
		} else {
			for _, d := range l.Damaged {
				res.Points = append(res.Points, Checked{Volume: l.Volume, Point: d.Name, Err: d.Err})
			}
		}
		var total int64
		for _, p := range points {
			total += int64(p.DataBytes)
		}
		prog.Begin(l.Volume+": verifying", total)
		for _, p := range points {
			c := Checked{Volume: l.Volume, Point: p.Name, Kind: p.Kind, DataBytes: p.DataBytes}
			if _, err := l.chain(p); err != nil {
				c.Err = err
			} else if err := p.checkData(ctx, filepath.Join(dir, l.Volume, p.Name), prog.Add); err != nil {
				c.Err = err
			}
			if ctx.Err() != nil {
				prog.End()
				return nil, ctx.Err()
			}
			res.Points = append(res.Points, c)
		}
		prog.End()
	}
	if n := res.Bad(); n > 0 {
		return res, fmt.Errorf("%d of %d backup points in %s are damaged or incomplete", n, len(res.Points), dir)
	}
	return res, nil
}
