package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"sync"
	"testing"
	"time"
)

// flatBackend is a dense in-memory disk with as little cost as possible,
// so that benchmarks measure the server rather than the backend.
type flatBackend struct {
	mu   sync.RWMutex
	data []byte
}

func (m *flatBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.mu.RLock()
	copy(p, m.data[off:])
	m.mu.RUnlock()
	return nil
}

func (m *flatBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	m.mu.Lock()
	copy(m.data[off:], p)
	m.mu.Unlock()
	return nil
}

func (m *flatBackend) Flush(ctx context.Context) error { return nil }
func (m *flatBackend) Trim(ctx context.Context, off, length int64, fua bool) error {
	return nil
}

func (m *flatBackend) WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error {
	m.mu.Lock()
	clear(m.data[off : off+length])
	m.mu.Unlock()
	return nil
}

func (m *flatBackend) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	return []Extent{{Length: length}}, nil
}

func BenchmarkServer4KRead(b *testing.B)  { benchmarkServer(b, cmdRead) }
func BenchmarkServer4KWrite(b *testing.B) { benchmarkServer(b, cmdWrite) }

// benchmarkServer drives 4 KiB requests at queue depth 32 over loopback
// TCP, one connection, simple replies (what the Linux driver uses). Profile
// the server with -cpuprofile; the client side is kept lean so that it
// shows up little.
func benchmarkServer(b *testing.B, typ uint16) {
	const (
		size       = 64 << 20
		blockSize  = 4096
		queueDepth = 32
	)
	backend := &flatBackend{data: make([]byte, size)}
	ts := startServer(b, &Server{Exports: exportMap{"bench": {Size: size, Backend: backend}}})
	c := dialRaw(b, "tcp", ts.tcp)
	c.nc.SetDeadline(time.Time{})
	c.negotiate("bench", false, false)

	// Requests cycle through the disk so that reads and writes touch
	// different memory, as on a real disk.
	slots := make(chan uint64, queueDepth)
	for i := range uint64(queueDepth) {
		slots <- i
	}
	errc := make(chan error, 1)
	b.SetBytes(blockSize)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()

	go func() {
		w := bufio.NewWriterSize(c.nc, 64<<10)
		msg := make([]byte, requestHeaderLen+blockSize)
		for i := 0; i < b.N; i++ {
			var slot uint64
			select {
			case slot = <-slots:
			default:
				// The queue is full: push out what is buffered, then wait.
				if err := w.Flush(); err != nil {
					errc <- err
					return
				}
				slot = <-slots
			}
			off := uint64(i) * blockSize % size
			n := requestHeaderLen
			binary.BigEndian.PutUint32(msg[0:], magicRequest)
			binary.BigEndian.PutUint16(msg[4:], 0)
			binary.BigEndian.PutUint16(msg[6:], typ)
			binary.BigEndian.PutUint64(msg[8:], slot)
			binary.BigEndian.PutUint64(msg[16:], off)
			binary.BigEndian.PutUint32(msg[24:], blockSize)
			if typ == cmdWrite {
				n += blockSize
			}
			if _, err := w.Write(msg[:n]); err != nil {
				errc <- err
				return
			}
		}
		errc <- w.Flush()
	}()

	reply := make([]byte, simpleReplyLen+blockSize)
	for i := 0; i < b.N; i++ {
		n := simpleReplyLen
		if typ == cmdRead {
			n += blockSize
		}
		if _, err := io.ReadFull(c.br, reply[:n]); err != nil {
			b.Fatalf("reading reply %d: %v", i, err)
		}
		if m, errno := binary.BigEndian.Uint32(reply), binary.BigEndian.Uint32(reply[4:]); m != magicSimple || errno != 0 {
			b.Fatalf("reply %d: magic %#x errno %d", i, m, errno)
		}
		slots <- binary.BigEndian.Uint64(reply[8:])
	}
	elapsed := time.Since(start)
	b.StopTimer()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "IOPS")
}
