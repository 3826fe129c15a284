package gateway

import (
	"testing"

	"github.com/basalt-hv/basalt/blockd/engine"
)

func TestPiecesSplitAtObjectBoundaries(t *testing.T) {
	const obj = engine.ObjectSize
	for _, tc := range []struct {
		off, length int64
		want        []piece
	}{
		{0, 4096, []piece{{0, 0, 4096, 0, 0}}},
		{obj - 4096, 8192, []piece{{0, obj - 4096, 4096, 0, 0}, {1, 0, 4096, 4096, 0}}},
		{obj, obj, []piece{{1, 0, obj, 0, 0}}},
		{512, 2*obj + 1024, []piece{{0, 512, obj - 512, 0, 0}, {1, 0, obj, obj - 512, 0}, {2, 0, 1536, 2*obj - 512, 0}}},
		{5 * obj, 0, nil},
	} {
		got := pieces(tc.off, tc.length)
		if len(got) != len(tc.want) {
			t.Fatalf("pieces(%d, %d) = %v, want %v", tc.off, tc.length, got, tc.want)
		}
		var total int64
		for i := range got {
			if got[i] != tc.want[i] {
				t.Fatalf("pieces(%d, %d)[%d] = %+v, want %+v", tc.off, tc.length, i, got[i], tc.want[i])
			}
			total += got[i].length
		}
		if total != tc.length {
			t.Fatalf("pieces(%d, %d) cover %d bytes", tc.off, tc.length, total)
		}
	}
}
