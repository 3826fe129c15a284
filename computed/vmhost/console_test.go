package vmhost

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestConsoleMultiplexing drives a console over a pipe standing in for the hypervisor's console socket: every
// viewer sees all output, keystrokes reach the guest side, a resumed viewer misses and repeats nothing, a slow
// viewer is dropped without holding up the others, and the log rotates at its bound and reads back across the
// rotation.
func TestConsoleMultiplexing(t *testing.T) {
	guest, host := net.Pipe()
	dir := t.TempDir()
	file, err := openRotatingLog(filepath.Join(dir, "console.log"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	c := newConsole(host, file, slog.Default())
	defer c.Close()

	a, _, _, err := c.subscribe(0, resumePoint{})
	if err != nil {
		t.Fatal(err)
	}
	b, _, _, _ := c.subscribe(0, resumePoint{})
	slow, _, _, _ := c.subscribe(0, resumePoint{})
	var lines []string
	for i := range 1200 {
		lines = append(lines, strings.Repeat("x", i%7)+"line\n")
	}
	all := strings.Join(lines, "")
	go func() {
		for _, l := range lines {
			guest.Write([]byte(l))
		}
	}()
	read := func(v *viewer, n int) (string, uint64) {
		t.Helper()
		var sb strings.Builder
		var first uint64
		for sb.Len() < n {
			select {
			case ch, ok := <-v.ch:
				if !ok {
					t.Fatalf("viewer ended after %d bytes", sb.Len())
				}
				if sb.Len() == 0 {
					first = ch.off
				}
				sb.Write(ch.b)
			case <-time.After(10 * time.Second):
				t.Fatalf("viewer got %d of %d bytes", sb.Len(), n)
			}
		}
		return sb.String(), first
	}
	half := len(all) / 2
	gotA, off := read(a, half)
	if off != 0 || gotA != all[:len(gotA)] {
		t.Fatalf("viewer a: offset %d, wrong bytes", off)
	}
	// a leaves half way; it comes back resuming at the next byte it needs.
	c.unsubscribe(a)
	gotB, _ := read(b, len(all))
	if gotB != all {
		t.Fatal("viewer b did not see exactly the output")
	}
	a2, _, replay, err := c.subscribe(0, resumePoint{id: c.id, off: uint64(len(gotA))})
	if err != nil {
		t.Fatal(err)
	}
	if replay.off != uint64(len(gotA)) || gotA+string(replay.b) != all {
		t.Fatalf("resume: replay from %d, %d bytes; want the rest from %d", replay.off, len(replay.b), len(gotA))
	}
	c.unsubscribe(a2)
	// A resume point of another console (computed restarted) replays everything this one holds.
	_, _, replay, _ = c.subscribe(0, resumePoint{id: "other", off: 5})
	if replay.off != 0 || string(replay.b) != all {
		t.Fatalf("foreign resume point: replay from %d, %d bytes", replay.off, len(replay.b))
	}
	// The slow viewer never read: it was dropped once its queue filled, and knows why.
	for range slow.ch {
	}
	if !slow.slow {
		t.Fatal("a viewer that never reads was not dropped")
	}

	// Keystrokes reach the guest.
	go c.Write([]byte("ls\n"))
	buf := make([]byte, 3)
	if _, err := io.ReadFull(guest, buf); err != nil || string(buf) != "ls\n" {
		t.Fatalf("guest read %q, %v", buf, err)
	}

	// The log holds the latest output, bounded: between 1000 and 2000 bytes, in two files.
	info, err := os.Stat(filepath.Join(dir, "console.log"))
	if err != nil || info.Size() > 1000 {
		t.Fatalf("console.log: %v, %v", info, err)
	}
	tail, err := c.file.Tail(1500)
	if err != nil || string(tail) != all[len(all)-1500:] {
		t.Fatalf("tail across the rotation: %d bytes, %v", len(tail), err)
	}
	if b, _ := tailLog(filepath.Join(dir, "console.log"), 1<<20); len(b) > 2000 || !bytes.HasSuffix([]byte(all), b) {
		t.Fatalf("whole log: %d bytes", len(b))
	}

	// The guest side closing ends every viewer, and later viewers are told.
	v, _, _, _ := c.subscribe(0, resumePoint{})
	guest.Close()
	for range v.ch {
	}
	if _, hist, _, err := c.subscribe(100, resumePoint{}); err != errConsoleClosed || len(hist) != 100 {
		t.Fatalf("subscribe after the end: %v, %d bytes of history", err, len(hist))
	}
}
