package datadir

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOpenStampsAndReopens(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d")
	d, err := Open(dir, "blockd", "blockd-1")
	if err != nil {
		t.Fatal(err)
	}
	if d.Stamp != (Stamp{Format: Format, Component: "blockd", NodeID: "blockd-1"}) {
		t.Fatalf("stamp = %+v", d.Stamp)
	}
	d.Close()
	d, err = Open(dir, "blockd", "")
	if err != nil {
		t.Fatalf("reopen without a node ID: %v", err)
	}
	if d.Stamp.NodeID != "blockd-1" {
		t.Fatalf("reopened stamp lost the node ID: %+v", d.Stamp)
	}
	d.Close()
}

func TestOpenRefusesIncompatibleDirectories(t *testing.T) {
	dir := t.TempDir()
	d, err := Open(dir, "blockd", "blockd-1")
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	for _, tc := range []struct{ component, node, want string }{
		{"netd", "", "belongs to blockd"},
		{"blockd", "blockd-2", `belongs to node "blockd-1"`},
	} {
		_, err := Open(dir, tc.component, tc.node)
		if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%s, %s) = %v, want ErrIncompatible mentioning %q", tc.component, tc.node, err, tc.want)
		}
	}
	// A directory written by a future format version.
	if err := os.WriteFile(filepath.Join(dir, stampFile), []byte(`{"format":99,"component":"blockd"}`), 0o640); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir, "blockd", "")
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "format 99") {
		t.Fatalf("Open of a format-99 directory = %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, stampFile), []byte("garbage"), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, "blockd", ""); !errors.Is(err, ErrIncompatible) {
		t.Fatalf("Open of a garbage stamp = %v", err)
	}
}

func TestOpenLocksOutASecondOwner(t *testing.T) {
	dir := t.TempDir()
	d, err := Open(dir, "metad", "")
	if err != nil {
		t.Fatal(err)
	}
	// flock locks belong to an open file description, so a second Open in this process is excluded too.
	_, err = Open(dir, "metad", "")
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "pid") {
		t.Fatalf("second Open = %v, want ErrLocked naming the pid", err)
	}
	d.Close()
	d2, err := Open(dir, "metad", "")
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	d2.Close()
}
