package engine

import (
	"context"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
)

// Benchmarks report IOPS or MB/s with b.ReportMetric; they assert nothing
// about time. They use the default segment size (256 MiB) and run on the
// file system of the test's temporary directory.

func benchEngine(b *testing.B) *Engine {
	b.Helper()
	e, err := Open(b.TempDir(), Options{GCInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return e
}

// benchSpace is the address space random benchmarks cover: 1 GiB.
const benchObjects = (1 << 30) / ObjectSize

func randBlock(r *rand.Rand) (ObjectID, int64) {
	return ObjectID{1, uint64(r.IntN(benchObjects))}, int64(r.IntN(objectBlocks)) * BlockSize
}

func reportIOPS(b *testing.B) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

func BenchmarkWrite4KRandom(b *testing.B) {
	e := benchEngine(b)
	ctx := context.Background()
	p := make([]byte, BlockSize)
	fillPattern(p, 1)
	r := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(BlockSize)
	b.ReportAllocs()
	for b.Loop() {
		id, off := randBlock(r)
		if err := e.Write(ctx, id, off, p, WriteOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	reportIOPS(b)
}

// BenchmarkWrite4KRandomFUA32: 32 goroutines each issue 4 KiB FUA writes,
// as 32 NBD requests in flight would; group commit shares fdatasyncs.
func BenchmarkWrite4KRandomFUA32(b *testing.B) {
	e := benchEngine(b)
	ctx := context.Background()
	var seed atomic.Uint64
	b.SetBytes(BlockSize)
	b.SetParallelism((32 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(seed.Add(1), 2))
		p := make([]byte, BlockSize)
		fillPattern(p, 2)
		for pb.Next() {
			id, off := randBlock(r)
			if err := e.Write(ctx, id, off, p, WriteOptions{Sync: true}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	reportIOPS(b)
	st := e.Stats()
	b.ReportMetric(float64(st.Syncs)/float64(b.N), "fdatasyncs/op")
}

func prefill(b *testing.B, e *Engine) {
	b.Helper()
	ctx := context.Background()
	p := make([]byte, 1<<20)
	fillPattern(p, 3)
	for i := range benchObjects / 4 { // 256 MiB
		for off := int64(0); off < ObjectSize; off += int64(len(p)) {
			if err := e.Write(ctx, ObjectID{1, uint64(i)}, off, p, WriteOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := e.Sync(ctx); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkRead4KRandom(b *testing.B) {
	e := benchEngine(b)
	prefill(b, e)
	ctx := context.Background()
	p := make([]byte, BlockSize)
	r := rand.New(rand.NewPCG(4, 4))
	b.SetBytes(BlockSize)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		id := ObjectID{1, uint64(r.IntN(benchObjects / 4))}
		if err := e.Read(ctx, id, int64(r.IntN(objectBlocks))*BlockSize, p); err != nil {
			b.Fatal(err)
		}
	}
	reportIOPS(b)
}

func BenchmarkRead4KRandomParallel32(b *testing.B) {
	e := benchEngine(b)
	prefill(b, e)
	ctx := context.Background()
	var seed atomic.Uint64
	b.SetBytes(BlockSize)
	b.SetParallelism((32 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(seed.Add(1), 5))
		p := make([]byte, BlockSize)
		for pb.Next() {
			id := ObjectID{1, uint64(r.IntN(benchObjects / 4))}
			if err := e.Read(ctx, id, int64(r.IntN(objectBlocks))*BlockSize, p); err != nil {
				b.Error(err)
				return
			}
		}
	})
	reportIOPS(b)
}

func BenchmarkWrite1MSequential(b *testing.B) {
	e := benchEngine(b)
	ctx := context.Background()
	p := make([]byte, 1<<20)
	fillPattern(p, 6)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	var pos int64
	for b.Loop() {
		id := ObjectID{1, uint64(pos / ObjectSize)}
		if err := e.Write(ctx, id, pos%ObjectSize, p, WriteOptions{}); err != nil {
			b.Fatal(err)
		}
		pos += int64(len(p))
	}
}

// BenchmarkIndexMemory measures the heap the index takes per GiB written,
// for the worst case (random 4 KiB writes, no two adjacent: one extent
// each) and the best (1 MiB sequential writes).
func BenchmarkIndexMemory(b *testing.B) {
	for _, c := range []struct {
		name  string
		chunk int
	}{{"random4K", BlockSize}, {"seq1M", 1 << 20}} {
		b.Run(c.name, func(b *testing.B) {
			const total = 256 << 20
			for b.Loop() {
				b.StopTimer()
				e, err := Open(b.TempDir(), Options{GCInterval: -1})
				if err != nil {
					b.Fatal(err)
				}
				ctx := context.Background()
				p := make([]byte, c.chunk)
				r := rand.New(rand.NewPCG(7, 7))
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				b.StartTimer()
				for i := 0; i < total/c.chunk; i++ {
					var id ObjectID
					var off int64
					if c.chunk == BlockSize {
						// 64 GiB of address space, even blocks only.
						id, off = ObjectID{1, uint64(r.IntN(1 << 14))}, int64(r.IntN(objectBlocks/2))*2*BlockSize
					} else {
						id, off = ObjectID{1, uint64(i * c.chunk / ObjectSize)}, int64(i*c.chunk%ObjectSize)
					}
					if err := e.Write(ctx, id, off, p, WriteOptions{}); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				runtime.GC()
				runtime.ReadMemStats(&after)
				st := e.Stats()
				grown := max(int64(after.HeapAlloc)-int64(before.HeapAlloc), 0)
				b.ReportMetric(float64(grown)/float64(st.LiveBytes)*(1<<30)/(1<<20), "heapMiB/GiB")
				b.ReportMetric(float64(st.Extents), "extents")
				e.Close()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkOpen measures recovery: Open of a log of 256 MiB written as
// 4 KiB random writes (one record each, the worst case for header replay)
// or 1 MiB writes, with a warm page cache. Close left a sync marker, so
// only headers and CRC arrays are read.
func BenchmarkOpen(b *testing.B) {
	for _, c := range []struct {
		name  string
		chunk int
	}{{"random4K", BlockSize}, {"seq1M", 1 << 20}} {
		b.Run(c.name, func(b *testing.B) {
			const total = 256 << 20
			dir := b.TempDir()
			e, err := Open(dir, Options{GCInterval: -1})
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			p := make([]byte, c.chunk)
			r := rand.New(rand.NewPCG(8, 8))
			for i := 0; i < total/c.chunk; i++ {
				id, off := ObjectID{1, uint64(i * c.chunk / ObjectSize)}, int64(i*c.chunk%ObjectSize)
				if c.chunk == BlockSize {
					id, off = randBlock(r)
				}
				if err := e.Write(ctx, id, off, p, WriteOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			if err := e.Close(); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				e, err := Open(dir, Options{GCInterval: -1})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				e.Close()
				b.StartTimer()
			}
			b.ReportMetric(b.Elapsed().Seconds()*1000/float64(b.N)*4, "ms/GiB")
		})
	}
}
