package osd

import "testing"

func TestVersionsOfDifferentEpochsNeverCollide(t *testing.T) {
	// A primary at epoch 3 that wrote versions up to 3<<32+5, then a new primary at epoch 4 that had seen only
	// up to 3<<32+2: the new one's next version is above everything epoch 3 could have handed out.
	if v := nextVersion(3<<32+2, 4); v != 4<<32+1 {
		t.Fatalf("nextVersion(3<<32+2, 4) = %d, want %d", v, uint64(4<<32+1))
	}
	if v := nextVersion(4<<32+7, 4); v != 4<<32+8 {
		t.Fatalf("within an epoch versions count up: got %d", v)
	}
	if v := nextVersion(0, 1); v != 1<<32+1 {
		t.Fatalf("first version at epoch 1 = %d", v)
	}
}
