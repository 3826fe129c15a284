// Package datadir owns a daemon's data directory: it stamps the directory with the on-disk format version and
// the component that wrote it, refuses directories written by an incompatible version or by another
// component, and holds an exclusive lock so that two processes never share one directory. It depends only on
// the standard library.
package datadir

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Format is the version of the on-disk layout this build reads and writes. Bump it when a change makes older
// builds misread the directory; Open then refuses directories of another version with a clear error.
const Format = 1

const (
	stampFile = "BASALT_FORMAT"
	lockFile  = "LOCK"
)

// Stamp is the content of the stamp file at the root of a data directory.
type Stamp struct {
	Format    int    `json:"format"`
	Component string `json:"component"`
	NodeID    string `json:"node_id,omitempty"`
}

// Dir is an open, locked data directory.
type Dir struct {
	Path  string
	Stamp Stamp
	lock  *os.File
}

// ErrIncompatible is returned (wrapped) when a directory was written by another format version or component.
var ErrIncompatible = errors.New("incompatible data directory")

// ErrLocked is returned (wrapped) when another process holds the directory.
var ErrLocked = errors.New("data directory in use")

// Open creates path if needed, locks it, and checks or writes its stamp. nodeID may be empty (no identity is
// recorded) or, when the directory already records one, must match it: a directory belongs to one node.
func Open(path, component, nodeID string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o750); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("resolve data directory %s: %w", path, err)
	}
	lf, err := os.OpenFile(filepath.Join(abs, lockFile), os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		owner, _ := os.ReadFile(filepath.Join(abs, lockFile))
		lf.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked by another process (pid %s)", ErrLocked, abs, trimPID(owner))
		}
		return nil, fmt.Errorf("lock data directory %s: %w", abs, err)
	}
	// The pid is informational only (for the error above); the flock is what excludes.
	if err := lf.Truncate(0); err == nil {
		fmt.Fprintf(lf, "%d\n", os.Getpid())
	}
	d := &Dir{Path: abs, lock: lf}
	if err := d.checkStamp(component, nodeID); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func trimPID(b []byte) string {
	s := string(b)
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == ' ') {
		s = s[:len(s)-1]
	}
	if s == "" {
		return "unknown"
	}
	return s
}

func (d *Dir) checkStamp(component, nodeID string) error {
	p := filepath.Join(d.Path, stampFile)
	b, err := os.ReadFile(p)
	switch {
	case errors.Is(err, os.ErrNotExist):
		d.Stamp = Stamp{Format: Format, Component: component, NodeID: nodeID}
		return writeFileAtomic(p, d.Stamp)
	case err != nil:
		return fmt.Errorf("read %s: %w", p, err)
	}
	var s Stamp
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%w: %s is not a Basalt format stamp: %v", ErrIncompatible, p, err)
	}
	if s.Format != Format {
		return fmt.Errorf("%w: %s was written by data format %d; this build reads format %d", ErrIncompatible, d.Path, s.Format, Format)
	}
	if s.Component != component {
		return fmt.Errorf("%w: %s belongs to %s, not %s", ErrIncompatible, d.Path, s.Component, component)
	}
	if nodeID != "" && s.NodeID != "" && s.NodeID != nodeID {
		return fmt.Errorf("%w: %s belongs to node %q, not %q", ErrIncompatible, d.Path, s.NodeID, nodeID)
	}
	if nodeID != "" && s.NodeID == "" {
		s.NodeID = nodeID
		if err := writeFileAtomic(p, s); err != nil {
			return err
		}
	}
	d.Stamp = s
	return nil
}

// writeFileAtomic writes v as JSON through a temporary file, fsync and rename, so a crash leaves either the old
// stamp or the new one, never a torn file.
func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", path, err)
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("open %s: %w", filepath.Dir(path), err)
	}
	defer dir.Close()
	if err := dir.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", filepath.Dir(path), err)
	}
	return nil
}

// Sub returns the path of a subdirectory, creating it.
func (d *Dir) Sub(name string) (string, error) {
	p := filepath.Join(d.Path, name)
	if err := os.MkdirAll(p, 0o750); err != nil {
		return "", fmt.Errorf("create %s: %w", p, err)
	}
	return p, nil
}

// Close releases the lock.
func (d *Dir) Close() error {
	if d.lock == nil {
		return nil
	}
	err := d.lock.Close() // closing the descriptor drops the flock
	d.lock = nil
	return err
}
