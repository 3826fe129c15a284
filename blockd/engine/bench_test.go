package engine

import (
	"context"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
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

// BenchmarkWrite4KRandomAfterCheckpoint compares 4 KiB random writes over
// 256 MiB of data in layer 0, in layer 0 ("same") and right after a
// checkpoint, in layer 1 ("new"): redirect-on-write copies nothing, so the
// two should run at the same speed (the second also keeps every
// overwritten block live for the checkpoint).
func BenchmarkWrite4KRandomAfterCheckpoint(b *testing.B) {
	for _, c := range []struct {
		name string
		tag  uint32
	}{{"same", 0}, {"new", 1}} {
		b.Run(c.name, func(b *testing.B) {
			e := benchEngine(b)
			prefill(b, e)
			ctx := context.Background()
			p := make([]byte, BlockSize)
			fillPattern(p, 1)
			r := rand.New(rand.NewPCG(1, 1))
			b.SetBytes(BlockSize)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				id := ObjectID{1, uint64(r.IntN(benchObjects / 4))}
				if err := e.Write(ctx, id, int64(r.IntN(objectBlocks))*BlockSize, p, WriteOptions{Layer: c.tag}); err != nil {
					b.Fatal(err)
				}
			}
			reportIOPS(b)
		})
	}
}

// BenchmarkDeleteCheckpoint measures the online merge: 1 GiB written in
// layer 0, then every block of it overwritten in the next layer, then the
// checkpoint between them deleted. One of the two layers is written with
// 1 MiB writes, the other with 4 KiB writes in random order (one extent
// per block, the worst case for the index): "lower4K" or "upper4K". The
// merge drops 1 GiB of shadowed blocks from the index without touching
// data: reported as merge-ms and freed-MB/s. compact-s is the time the
// collector then takes to return the space, and disk-MiB-freed what it
// returned. The setup writes 2 GiB per iteration, so the framework runs
// one iteration by default.
func BenchmarkDeleteCheckpoint(b *testing.B) {
	for _, c := range []struct {
		name    string
		upper4K bool
	}{{"lower4K", false}, {"upper4K", true}} {
		b.Run(c.name, func(b *testing.B) { benchDeleteCheckpoint(b, c.upper4K) })
	}
}

func benchDeleteCheckpoint(b *testing.B, upper4K bool) {
	const total = 1 << 30
	e := benchEngine(b)
	ctx := context.Background()
	p := make([]byte, 1<<20)
	fillPattern(p, 1)
	blocks := make([]int, total/BlockSize)
	for i := range blocks {
		blocks[i] = i
	}
	r := rand.New(rand.NewPCG(2, 2))
	writeLayer := func(tag uint32, small bool) {
		if !small {
			for i := range total / ObjectSize {
				for off := int64(0); off < ObjectSize; off += int64(len(p)) {
					if err := e.Write(ctx, ObjectID{1, uint64(i)}, off, p, WriteOptions{Layer: tag}); err != nil {
						b.Fatal(err)
					}
				}
			}
			return
		}
		r.Shuffle(len(blocks), func(i, j int) { blocks[i], blocks[j] = blocks[j], blocks[i] })
		for _, blk := range blocks {
			id := ObjectID{1, uint64(blk / objectBlocks)}
			if err := e.Write(ctx, id, int64(blk%objectBlocks)*BlockSize, p[:BlockSize], WriteOptions{Layer: tag}); err != nil {
				b.Fatal(err)
			}
		}
	}
	writeLayer(0, !upper4K)
	var merge, compact time.Duration
	var freedDisk int64
	for i := 0; i < b.N; i++ {
		tag := uint32(i + 1)
		writeLayer(tag, upper4K)
		before := e.Stats()
		start := time.Now()
		if err := e.DeleteCheckpoint(ctx, 1, tag); err != nil {
			b.Fatal(err)
		}
		merge += time.Since(start)
		if live := e.Stats().LiveBytes; before.LiveBytes-live != total {
			b.Fatalf("the merge freed %d bytes, want %d", before.LiveBytes-live, total)
		}
		start = time.Now()
		if err := e.Compact(ctx); err != nil {
			b.Fatal(err)
		}
		compact += time.Since(start)
		freedDisk += before.DiskBytes - e.Stats().DiskBytes
	}
	n := float64(b.N)
	b.ReportMetric(merge.Seconds()*1000/n, "merge-ms")
	b.ReportMetric(total/(1<<20)/(merge.Seconds()/n), "freed-MB/s")
	b.ReportMetric(compact.Seconds()/n, "compact-s")
	b.ReportMetric(float64(freedDisk)/(1<<20)/n, "disk-MiB-freed")
}
